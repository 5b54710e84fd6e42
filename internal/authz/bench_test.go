package authz

import (
	"bytes"
	"context"
	"fmt"
	"net/http/httptest"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/extauthz/extauthz/internal/tokens"
)

// BenchmarkCheck is a whole Check on an in-process cache hit, as the bench
// request shape of ../shared/bench (13 headers, one context extension).
func BenchmarkCheck(b *testing.B) {
	e := newEnv(b, Options{StripCredential: true, Logger: zap.NewNop()})
	is := e.issue(b, tokens.IssueParams{Scopes: []string{"read"}})
	req := benchRequest(b, "Bearer "+is.Credential)
	ctx := context.Background()
	if r, _ := e.svc.Check(ctx, req); r.GetStatus().GetCode() != 0 {
		b.Fatal("not allowed")
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.svc.Check(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// benchRequest is shaped like ../shared/bench's request: 13 headers, peers,
// one context extension.
func benchRequest(_ testing.TB, authorization string) *authv3.CheckRequest {
	req := httpReq(map[string]string{
		"authorization": authorization, ":scheme": "https", "accept": "application/json",
		"content-type": "application/json", "user-agent": "bench/1.0", "x-forwarded-for": "10.0.0.1",
		"x-forwarded-proto": "https", "x-envoy-expected-rq-timeout-ms": "200", "x-ext-authz": "allow",
	})
	req.Attributes.ContextExtensions = map[string]string{"virtual_host": "api"}
	req.Attributes.Source = &authv3.AttributeContext_Peer{Address: socket("10.0.0.1", 52000)}
	req.Attributes.Destination = &authv3.AttributeContext_Peer{Address: socket("10.0.0.2", 8080)}
	h := req.Attributes.Request.Http
	h.Scheme, h.Protocol, h.Size, h.Id = "https", "HTTP/2", 0, "r-1"
	req.Attributes.Request.Time = timestamppb.Now()
	return req
}

func socket(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

// leanDecoded is m as the lean codec hands it to checkWire.
func leanDecoded(tb testing.TB, m *authv3.CheckRequest) *wireRequest {
	tb.Helper()
	data, err := proto.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	w := new(wireRequest)
	if err := w.unmarshal(data); err != nil {
		tb.Fatal(err)
	}
	return w
}

// BenchmarkCheckDenyMalformed is the cost of a garbage key: no hash, no cache.
func BenchmarkCheckDenyMalformed(b *testing.B) {
	e := newEnv(b, Options{Logger: zap.NewNop()})
	req := httpReq(map[string]string{"authorization": "Bearer pk_garbage:sk_garbage"})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.svc.Check(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHTTPCheck is the HTTP check handler on a cache hit, without the
// network: what Envoy's http_service mode and forward-auth proxies cost.
func BenchmarkHTTPCheck(b *testing.B) {
	e := newEnv(b, Options{StripCredential: true, Logger: zap.NewNop()})
	is := e.issue(b, tokens.IssueParams{Scopes: []string{"read"}})
	h := e.svc.HTTPHandler("/check")
	req := httptest.NewRequest("GET", "/check/v1/orders?id=7", nil)
	req.Header.Set("authorization", "Bearer "+is.Credential)
	b.ReportAllocs()
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != 200 {
			b.Fatal(w.Code)
		}
	}
}

// BenchmarkCheckManyKeys is BenchmarkCheckLean with a different key on
// every request, cycling through 100,000 warmed keys: the shape of real
// traffic, where the cache, decisions and usage counters are spread over
// the heap.
func BenchmarkCheckManyKeys(b *testing.B) {
	const n = 100000
	e := newEnv(b, Options{StripCredential: true, Logger: zap.NewNop(), Usage: tokens.NewUsageRecorder(discardUsage{}, tokens.UsageOptions{MaxPending: n})})
	keys := make([]*tokens.Key, n)
	reqs := make([]*wireRequest, n)
	for i := range keys {
		is, err := e.hasher.Issue(tokens.IssueParams{Tenant: fmt.Sprintf("tenant-%03d", i%1000), Kind: tokens.KindToken, Scopes: []string{"read"}})
		if err != nil {
			b.Fatal(err)
		}
		keys[i] = is.Key
		reqs[i] = leanDecoded(b, httpReq(map[string]string{"authorization": "Bearer " + is.Credential, "accept": "application/json", "user-agent": "bench/1.0"}))
	}
	if err := e.store.Import(context.Background(), keys); err != nil {
		b.Fatal(err)
	}
	// Room for every key (shards fill unevenly): every measured check is a hit.
	a := tokens.NewAuthenticator(e.hasher, e.store, tokens.Options{CacheSize: 2 * n})
	e.svc = NewService(a, e.svc.opts)
	ctx := context.Background()
	check := func(w *wireRequest) {
		out, err := e.svc.checkWire(ctx, w)
		if err != nil || len(out.ReadOnlyData()) < 100 {
			b.Fatal("not allowed", err)
		}
		out.Free()
	}
	for _, w := range reqs {
		check(w)
	}
	misses := a.Stats().CacheMisses.Load()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		check(reqs[i%n])
		i++
	}
	b.ReportMetric(float64(a.Stats().CacheMisses.Load()-misses)/float64(i), "misses/op")
}

type discardUsage struct{}

func (discardUsage) RecordUsage(context.Context, []tokens.Usage) error { return nil }

// BenchmarkCheckWire is the server's whole work on a cache hit short of the
// transport: decode the bench request, check it, encode the answer; with
// the lean codec and with the stock protobuf codec.
func BenchmarkCheckWire(b *testing.B) {
	e := newEnv(b, Options{StripCredential: true, Logger: zap.NewNop()})
	is := e.issue(b, tokens.IssueParams{Scopes: []string{"read"}})
	data, err := proto.Marshal(benchRequest(b, "Bearer "+is.Credential))
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.Run("lean", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			w := wireRequests.Get().(*wireRequest)
			if err := w.unmarshal(bytes.Clone(data)); err != nil {
				b.Fatal(err)
			}
			out, err := e.svc.checkWire(ctx, w)
			if err != nil || len(out.ReadOnlyData()) == 0 {
				b.Fatal(err)
			}
			out.Free()
			w.reset()
			wireRequests.Put(w)
		}
	})
	b.Run("proto", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var in authv3.CheckRequest
			if err := proto.Unmarshal(data, &in); err != nil {
				b.Fatal(err)
			}
			r, err := e.svc.Check(ctx, &in)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := proto.Marshal(r); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkCheckLean is BenchmarkCheck on the path the server takes: the
// request already decoded by the lean codec (as the ideal check gets it
// decoded), the answer encoded for the wire.
func BenchmarkCheckLean(b *testing.B) {
	e := newEnv(b, Options{StripCredential: true, Logger: zap.NewNop()})
	is := e.issue(b, tokens.IssueParams{Scopes: []string{"read"}})
	w := leanDecoded(b, benchRequest(b, "Bearer "+is.Credential))
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		out, err := e.svc.checkWire(ctx, w)
		if err != nil || len(out.ReadOnlyData()) < 100 {
			b.Fatal(err)
		}
		out.Free() // as gRPC does once it has written the answer
	}
}

// BenchmarkCheckNegativeHit is a well-formed key the store does not know,
// answered from the negative cache: what a client retrying a deleted key
// costs.
func BenchmarkCheckNegativeHit(b *testing.B) {
	e := newEnv(b, Options{StripCredential: true, Logger: zap.NewNop()})
	gone := e.issue(b, tokens.IssueParams{})
	if err := e.store.Delete(context.Background(), gone.Key.ID); err != nil {
		b.Fatal(err)
	}
	w := leanDecoded(b, benchRequest(b, "Bearer "+gone.Credential))
	ctx := context.Background()
	if _, err := e.svc.checkWire(ctx, w); err != nil {
		b.Fatal(err)
	}
	want := e.svc.denies[InvalidCredential].wire.ReadOnlyData()
	lookups := e.auth.Stats().StoreLookups.Load()
	b.ReportAllocs()
	for b.Loop() {
		out, err := e.svc.checkWire(ctx, w)
		if err != nil || string(out.ReadOnlyData()) != string(want) {
			b.Fatal("not the invalid_credential denial", err)
		}
	}
	if e.auth.Stats().StoreLookups.Load() != lookups {
		b.Fatal("the negative cache did not answer")
	}
}
