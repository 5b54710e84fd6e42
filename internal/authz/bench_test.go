package authz

import (
	"context"
	"fmt"
	"net/http/httptest"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.uber.org/zap"

	"github.com/extauthz/extauthz/internal/tokens"
)

// BenchmarkCheck is a whole Check on an in-process cache hit, as the bench
// request shape of ../shared/bench (13 headers, one context extension).
func BenchmarkCheck(b *testing.B) {
	e := newEnv(b, Options{StripCredential: true, Logger: zap.NewNop()})
	is := e.issue(b, tokens.IssueParams{Scopes: []string{"read"}})
	req := httpReq(map[string]string{
		"authorization": "Bearer " + is.Credential, ":scheme": "https", "accept": "application/json",
		"content-type": "application/json", "user-agent": "bench/1.0", "x-forwarded-for": "10.0.0.1",
		"x-forwarded-proto": "https", "x-envoy-expected-rq-timeout-ms": "200", "x-ext-authz": "allow",
	})
	req.Attributes.ContextExtensions = map[string]string{"virtual_host": "api"}
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

// BenchmarkCheckManyKeys is BenchmarkCheck with a different key on every
// request, cycling through 100,000 warmed keys: the shape of real traffic,
// where the cache, principals and usage counters are spread over the heap.
func BenchmarkCheckManyKeys(b *testing.B) {
	const n = 100000
	e := newEnv(b, Options{StripCredential: true, Logger: zap.NewNop(), Usage: tokens.NewUsageRecorder(discardUsage{}, tokens.UsageOptions{MaxPending: n})})
	keys := make([]*tokens.Key, n)
	reqs := make([]*authv3.CheckRequest, n)
	for i := range keys {
		is, err := e.hasher.Issue(tokens.IssueParams{Tenant: fmt.Sprintf("tenant-%03d", i%1000), Kind: tokens.KindToken, Scopes: []string{"read"}})
		if err != nil {
			b.Fatal(err)
		}
		keys[i] = is.Key
		reqs[i] = httpReq(map[string]string{"authorization": "Bearer " + is.Credential, "accept": "application/json", "user-agent": "bench/1.0"})
	}
	if err := e.store.Import(context.Background(), keys); err != nil {
		b.Fatal(err)
	}
	// Room for every key (shards fill unevenly): every measured check is a hit.
	a := tokens.NewAuthenticator(e.hasher, e.store, tokens.Options{CacheSize: 2 * n})
	e.svc = NewService(a, e.svc.opts)
	ctx := context.Background()
	for _, r := range reqs {
		if resp, _ := e.svc.Check(ctx, r); resp.GetStatus().GetCode() != 0 {
			b.Fatal("not allowed")
		}
	}
	misses := a.Stats().CacheMisses.Load()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := e.svc.Check(ctx, reqs[i%n]); err != nil {
			b.Fatal(err)
		}
		i++
	}
	b.ReportMetric(float64(a.Stats().CacheMisses.Load()-misses)/float64(i), "misses/op")
}

type discardUsage struct{}

func (discardUsage) RecordUsage(context.Context, []tokens.Usage) error { return nil }
