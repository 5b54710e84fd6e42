package authz

import (
	"bytes"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// wireSeeds are CheckRequests of every shape Envoy sends, plus the merge
// cases of the protobuf wire format that a hand decoder could get wrong.
func wireSeeds(t testing.TB) [][]byte {
	bench := httpReq(map[string]string{
		"authorization": "Bearer tk_abc", ":scheme": "https", "accept": "application/json",
		"x-forwarded-for": "10.0.0.1", "x-ext-authz": "allow",
	})
	bench.Attributes.ContextExtensions = map[string]string{"virtual_host": "api", "scopes": "read, write"}
	bench.Attributes.Source = &authv3.AttributeContext_Peer{Principal: "spiffe://a/b", Labels: map[string]string{"k": "v"},
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: "10.1.0.10", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 40000}}}}}
	raw := rawReq([2]string{"authorization", "Bearer x"}, [2]string{"x-api-key", "a"}, [2]string{"x-api-key", "b"})
	raw.Attributes.Request.Http.HeaderMap.Headers = append(raw.Attributes.Request.Http.HeaderMap.Headers,
		&corev3.HeaderValue{Key: "x-api-key", Value: "c"},
		&corev3.HeaderValue{Key: ":path", Value: "/v", RawValue: []byte("/raw")})
	var out [][]byte
	for _, m := range []*authv3.CheckRequest{
		bench, raw, {}, {Attributes: &authv3.AttributeContext{}},
		{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{}}},
		{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{}}}},
		httpReq(map[string]string{"x-api-key": "k", "": ""}),
	} {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	// Two occurrences of attributes merge: the second's path wins, header
	// maps join, the first's extensions survive.
	a, _ := proto.Marshal(bench)
	b, _ := proto.Marshal(httpReq(map[string]string{"authorization": "Bearer second", ":path": "/second"}))
	out = append(out, append(append([]byte(nil), a...), b...))
	// Known fields with the wrong wire type are unknown fields, not errors.
	c := protowire.AppendTag(nil, fieldCheckAttributes, protowire.VarintType)
	c = protowire.AppendVarint(c, 7)
	out = append(out, append(c, a...))
	return out
}

// FuzzWireRequest proves the lean decoder equal to the stock one on every
// field a check reads: whenever the stock decoder accepts a message, the
// lean one accepts it and extracts the same request; whenever the lean one
// rejects a message, so does the stock one. (The lean decoder may accept a
// message the stock one rejects for invalid UTF-8 in a field it never
// reads.)
func FuzzWireRequest(f *testing.F) {
	for _, s := range wireSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var stock authv3.CheckRequest
		stockErr := proto.Unmarshal(b, &stock)
		var w wireRequest
		leanErr := w.unmarshal(bytes.Clone(b))
		switch {
		case stockErr == nil && leanErr != nil:
			t.Fatalf("lean decoder rejects what the stock one accepts: %v", leanErr)
		case leanErr != nil:
			return
		case stockErr != nil:
			return
		}
		want, got := checkRequest(&stock), w.request()
		if want.HasHTTP != got.HasHTTP || want.Method != got.Method || want.Host != got.Host ||
			want.Path != got.Path || want.Scopes != got.Scopes || want.ID != got.ID || want.Source != got.Source {
			t.Fatalf("request differs:\nstock %+v\nlean  %+v", fields(want), fields(got))
		}
		if !want.HasHTTP {
			return
		}
		names := []string{"authorization", "x-api-key", ":path", "x-request-id", "absent", ""}
		h := stock.GetAttributes().GetRequest().GetHttp()
		for k := range h.GetHeaders() {
			names = append(names, k)
		}
		for _, hv := range h.GetHeaderMap().GetHeaders() {
			names = append(names, hv.GetKey())
		}
		for _, n := range names {
			wv, wok := want.Header.Get(n)
			gv, gok := got.Header.Get(n)
			if wv != gv || wok != gok {
				t.Fatalf("header %q: stock (%q, %v), lean (%q, %v)", n, wv, wok, gv, gok)
			}
		}
	})
}

func fields(r Request) []any {
	return []any{r.HasHTTP, r.Method, r.Host, r.Path, r.Scopes, r.ID}
}

// The lean decoder reads the bench request with one allocation per header
// line at most; the stock one needs about 114.
func BenchmarkWireDecode(b *testing.B) {
	msg := benchRequest(b, "Bearer tk_abc")
	data, err := proto.Marshal(msg)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("lean", func(b *testing.B) {
		var w wireRequest
		b.ReportAllocs()
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			w.reset()
			if err := w.unmarshal(bytes.Clone(data)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("stock", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			var m authv3.CheckRequest
			if err := proto.Unmarshal(data, &m); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// Strings the lean decoder reads must be UTF-8, as proto3 requires and
// the stock decoder enforces; bytes (raw_value) need not be.
func TestWireRequestUTF8(t *testing.T) {
	t.Parallel()
	bad := string([]byte{0xff, 0xfe})
	// The stock encoder refuses invalid UTF-8, so build one by hand: a
	// header_map line whose value is invalid (rejected) or whose raw_value
	// is (accepted).
	line := func(field protowire.Number) []byte {
		hv := protowire.AppendTag(nil, fieldHeaderKey, protowire.BytesType)
		hv = protowire.AppendString(hv, "authorization")
		hv = protowire.AppendTag(hv, field, protowire.BytesType)
		hv = protowire.AppendString(hv, "Bearer "+bad)
		hm := protowire.AppendTag(nil, fieldHeaderMapHeaders, protowire.BytesType)
		hm = protowire.AppendBytes(hm, hv)
		h := protowire.AppendTag(nil, fieldHTTPHeaderMap, protowire.BytesType)
		h = protowire.AppendBytes(h, hm)
		r := protowire.AppendTag(nil, fieldRequestHTTP, protowire.BytesType)
		r = protowire.AppendBytes(r, h)
		a := protowire.AppendTag(nil, fieldAttrRequest, protowire.BytesType)
		a = protowire.AppendBytes(a, r)
		c := protowire.AppendTag(nil, fieldCheckAttributes, protowire.BytesType)
		return protowire.AppendBytes(c, a)
	}
	for _, tc := range []struct {
		field protowire.Number
		ok    bool
	}{{fieldHeaderValue, false}, {fieldHeaderRawValue, true}} {
		b := line(tc.field)
		var w wireRequest
		leanErr := w.unmarshal(bytes.Clone(b))
		stockErr := proto.Unmarshal(b, new(authv3.CheckRequest))
		if (leanErr == nil) != tc.ok || (stockErr == nil) != tc.ok {
			t.Fatalf("field %d: lean %v, stock %v, want ok=%v", tc.field, leanErr, stockErr, tc.ok)
		}
	}
}

// Repeated header_map lines are joined in linear time: the cost of a
// check grows with its size, not its square. 40,000 lines of one name
// took 38 s when joined line by line; the benchmark reports ns per line.
func BenchmarkJoinRepeatedLines(b *testing.B) {
	lines := make([]wireHeader, 40000)
	for i := range lines {
		lines[i] = wireHeader{"x-api-key", "value-of-some-length"}
	}
	b.ReportAllocs()
	for b.Loop() {
		if v, ok := joinLines(lines, wireHeader.kv, "x-api-key"); !ok || len(v) != 40000*21-1 {
			b.Fatalf("joined %d bytes", len(v))
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(lines)), "ns/line")
}

func TestJoinLines(t *testing.T) {
	t.Parallel()
	lines := []wireHeader{{"a", "1"}, {"b", "x"}, {"a", ""}, {"a", "3"}}
	for name, want := range map[string]string{"a": "1,,3", "b": "x"} {
		if got, ok := joinLines(lines, wireHeader.kv, name); !ok || got != want {
			t.Errorf("%s: %q, %v; want %q", name, got, ok, want)
		}
	}
	if got, ok := joinLines([]wireHeader{{"a", ""}, {"a", "2"}}, wireHeader.kv, "a"); !ok || got != ",2" {
		t.Errorf("empty first line: %q", got)
	}
	if _, ok := joinLines(lines, wireHeader.kv, "c"); ok {
		t.Error("absent header found")
	}
}

func TestPooledRequestDropsGrownSlices(t *testing.T) {
	t.Parallel()
	w := &wireRequest{lines: make([]wireHeader, 40000), headers: make([]wireHeader, 10)}
	w.reset()
	if cap(w.lines) != 0 || cap(w.headers) != 10 {
		t.Errorf("after reset: lines cap %d (want 0: dropped), headers cap %d (want 10: kept)", cap(w.lines), cap(w.headers))
	}
}
