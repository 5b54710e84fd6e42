package authz

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/extauthz/extauthz/internal/tokens"
)

type httpResult struct {
	code   int
	header http.Header
	body   string
}

// send issues a raw request (no client-side path cleaning).
func send(t *testing.T, srv *httptest.Server, method, target string, h map[string]string) httpResult {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.URL.Opaque = target // sent as the request line verbatim
	for k, v := range h {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return httpResult{resp.StatusCode, resp.Header, string(b)}
}

func newHTTPEnv(t *testing.T, o Options) (*env, *httptest.Server) {
	t.Helper()
	e := newEnv(t, o)
	srv := httptest.NewServer(NewHealth().HTTPHandler(e.svc.HTTPHandler("/check")))
	t.Cleanup(srv.Close)
	return e, srv
}

func TestHTTPEnvoyMode(t *testing.T) {
	t.Parallel()
	routes, _ := ParseRoutes([]byte(`{"routes":[{"path_prefix":"/public","public":true},{"path_prefix":"/admin","scopes":["admin"]}]}`))
	e, srv := newHTTPEnv(t, Options{StripCredential: true, Routes: routes})
	is := e.issue(t, tokens.IssueParams{Tenant: "acme", Scopes: []string{"read"}})
	bearer := map[string]string{"authorization": "Bearer " + is.Credential}

	// Allow: exactly 200, tenant headers, credential removal for Envoy.
	for _, m := range []string{"GET", "POST", "DELETE", "OPTIONS", "PATCH", "HEAD"} {
		r := send(t, srv, m, "/check/v1/orders?id=7", bearer)
		if r.code != 200 {
			t.Fatalf("%s: %d %s, want 200", m, r.code, r.body)
		}
		if r.header.Get(HeaderTenant) != "acme" || r.header.Get(HeaderKeyID) != is.Key.ID || r.header.Get(HeaderScopes) != "read" {
			t.Fatalf("%s: headers %v", m, r.header)
		}
		if r.header.Get(HeaderRemove) != "authorization" {
			t.Fatalf("%s: %s = %q", m, HeaderRemove, r.header.Get(HeaderRemove))
		}
	}
	// Paths that ServeMux would clean or redirect are answered as they are.
	for _, p := range []string{"/check//v1//orders", "/check/a/../admin", "/check/./x", "/check/%2e%2e/admin", "/check"} {
		if r := send(t, srv, "GET", p, bearer); r.code == 301 || r.code == 308 || r.code == 404 {
			t.Errorf("%s: %d, want a decision", p, r.code)
		}
	}
	// Route rules see the original path, as sent: /a/../admin is not under /admin.
	if r := send(t, srv, "GET", "/check/admin/users", bearer); r.code != 403 {
		t.Errorf("/admin without the scope: %d, want 403", r.code)
	}
	if r := send(t, srv, "GET", "/check/a/../admin", bearer); r.code != 200 {
		t.Errorf("/a/../admin matched as sent: %d, want 200", r.code)
	}
	// A client's own X-Forwarded-Uri is ignored in Envoy mode.
	forged := map[string]string{"x-forwarded-uri": "/public/x", "x-original-uri": "/public/x"}
	if r := send(t, srv, "GET", "/check/admin", forged); r.code != 401 {
		t.Errorf("forged x-forwarded-uri: %d, want 401 (the request line decides)", r.code)
	}
	// Public: allowed without a key, identity headers removed.
	r := send(t, srv, "GET", "/check/public/logo.png", map[string]string{"x-tenant-id": "evil"})
	if r.code != 200 || r.header.Get(HeaderTenant) != "" || !strings.Contains(r.header.Get(HeaderRemove), HeaderTenant) {
		t.Errorf("public: %d %v", r.code, r.header)
	}
	// Not under the prefix.
	if r := send(t, srv, "GET", "/other", bearer); r.code != 404 {
		t.Errorf("outside the prefix: %d", r.code)
	}
	if r := send(t, srv, "GET", "/checkout", bearer); r.code != 404 {
		t.Errorf("/checkout is not under /check: %d", r.code)
	}
}

func TestHTTPDenials(t *testing.T) {
	t.Parallel()
	e, srv := newHTTPEnv(t, Options{})
	is := e.issue(t, tokens.IssueParams{})
	cases := []struct {
		name   string
		h      map[string]string
		code   int
		reason string
	}{
		{"missing", nil, 401, "missing_credential"},
		{"malformed", map[string]string{"x-api-key": "pk_x:sk_y"}, 401, "malformed_credential"},
		{"ambiguous", map[string]string{"x-api-key": is.Credential, "authorization": "Bearer " + is.Credential}, 401, "ambiguous_credential"},
		{"unknown", map[string]string{"authorization": "Bearer legacy-never-issued"}, 401, "invalid_credential"},
	}
	for _, tc := range cases {
		r := send(t, srv, "GET", "/check/x", tc.h)
		var body struct{ Error, Reason string }
		json.Unmarshal([]byte(r.body), &body)
		if r.code != tc.code || body.Reason != tc.reason || r.header.Get("content-type") != "application/json" {
			t.Errorf("%s: %d %q", tc.name, r.code, r.body)
		}
		if !strings.HasPrefix(r.header.Get("www-authenticate"), `Bearer realm="extauthz"`) {
			t.Errorf("%s: www-authenticate %q", tc.name, r.header.Get("www-authenticate"))
		}
		if r.header.Get(HeaderTenant) != "" {
			t.Errorf("%s: tenant header on a deny", tc.name)
		}
	}
	// Repeated header lines are judged like Envoy's merged form.
	req, _ := http.NewRequest("GET", srv.URL+"/check/x", nil)
	req.Header.Add("x-api-key", is.Credential)
	req.Header.Add("x-api-key", is.Credential)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Errorf("duplicate x-api-key lines: %d, want 401", resp.StatusCode)
	}
}

// Forward-auth proxies call a fixed address and forward the original
// request in headers.
func TestHTTPForwardAuth(t *testing.T) {
	t.Parallel()
	routes, _ := ParseRoutes([]byte(`{"routes":[{"host":"admin.example.com","path_prefix":"/","methods":["POST"],"scopes":["admin"]},{"path_prefix":"/public","public":true}]}`))
	e, srv := newHTTPEnv(t, Options{Routes: routes})
	is := e.issue(t, tokens.IssueParams{Tenant: "acme", Scopes: []string{"read"}})
	key := is.Credential
	for _, tc := range []struct {
		name string
		h    map[string]string
		code int
	}{
		{"traefik/caddy GET", map[string]string{"x-api-key": key, "x-forwarded-method": "GET", "x-forwarded-uri": "/v1/items", "x-forwarded-host": "admin.example.com"}, 200},
		{"traefik/caddy POST to admin host", map[string]string{"x-api-key": key, "x-forwarded-method": "POST", "x-forwarded-uri": "/v1/items", "x-forwarded-host": "admin.example.com"}, 403},
		{"nginx original uri, public", map[string]string{"x-original-method": "GET", "x-original-uri": "/public/a?b=c"}, 200},
		{"nginx original uri, private", map[string]string{"x-original-method": "GET", "x-original-uri": "/private"}, 401},
	} {
		r := send(t, srv, "GET", "/check", tc.h)
		if r.code != tc.code {
			t.Errorf("%s: %d %s, want %d", tc.name, r.code, r.body, tc.code)
		}
	}
}

func TestHTTPOutageIs503(t *testing.T) {
	t.Parallel()
	h, _ := tokens.NewHasher(testPepper)
	svc := NewService(tokens.NewAuthenticator(h, failingFinder{}, tokens.Options{}), Options{})
	srv := httptest.NewServer(svc.HTTPHandler("/check"))
	defer srv.Close()
	r := send(t, srv, "GET", "/check/x", map[string]string{"authorization": "Bearer legacy-token-123456"})
	if r.code != 503 {
		t.Fatalf("outage: %d, want 503 so that status_on_error / failure_mode_allow decide", r.code)
	}
}
