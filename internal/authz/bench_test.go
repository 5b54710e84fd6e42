package authz

import (
	"context"
	"net/http/httptest"
	"testing"

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
