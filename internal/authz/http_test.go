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
	routes, _ := ParseRoutes([]byte(`{"routes":[{"path_prefix":"/public","public":true},{"path_prefix":"/admin","scopes":["admin"]}]}`), PathOptions{})
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
	// Route rules see the path as the upstream will act on it, however it
	// was spelt; Envoy's path_prefix "/check/" adds a slash, merged too.
	for _, p := range []string{"/check/admin/users", "/check/a/../admin", "/check/%61dmin/users", "/check//admin",
		"/check/%2e%2e/admin", "/check/x/%2E./admin/", "/check/public/../admin/report.txt"} {
		if r := send(t, srv, "GET", p, bearer); r.code != 403 {
			t.Errorf("%s without the admin scope: %d, want 403", p, r.code)
		}
	}
	for _, p := range []string{"/check/public%2F..%2Fadmin%2Freport.txt", "/check/public/%5c../admin", "/check/public/..;/admin", "/check/admin;x/users", "/check/a%00"} {
		if r := send(t, srv, "GET", p, nil); r.code != 400 || !strings.Contains(r.body, `"malformed_path"`) {
			t.Errorf("%s: %d %s, want 400 malformed_path", p, r.code, r.body)
		}
	}
	// Under the prefix, an original URI or method of either family is a
	// forward-auth proxy whose address ends in "/" (proxy_pass .../check/,
	// Caddy's uri /check/): its request line is "GET /", not the client's,
	// so nothing is judged, with a key or without.
	for _, h := range []string{"x-forwarded-uri", "x-original-uri", "x-forwarded-method", "x-original-method"} {
		for _, p := range []string{"/check/", "/check/admin", "/check/public/x"} {
			hdr := map[string]string{h: "/public/x", "authorization": "Bearer " + is.Credential}
			if r := send(t, srv, "GET", p, hdr); r.code != 400 {
				t.Errorf("%s with %s: %d, want 400", p, h, r.code)
			}
		}
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
// request in headers of one family; the other family is never read, so a
// client cannot pick the route judged by sending the headers its proxy
// does not set.
func TestHTTPForwardAuth(t *testing.T) {
	t.Parallel()
	routes, _ := ParseRoutes([]byte(`{"routes":[{"host":"admin.example.com","path_prefix":"/","methods":["POST"],"scopes":["admin"]},{"path_prefix":"/public","public":true}]}`), PathOptions{})
	for _, fam := range []ForwardedHeaders{ForwardedXForwarded, ForwardedXOriginal} {
		t.Run(fam.String(), func(t *testing.T) {
			t.Parallel()
			e, srv := newHTTPEnv(t, Options{Routes: routes, Forwarded: fam})
			is := e.issue(t, tokens.IssueParams{Tenant: "acme", Scopes: []string{"read"}})
			key := is.Credential
			own, other := "x-forwarded-", "x-original-"
			if fam == ForwardedXOriginal {
				own, other = other, own
			}
			orig := func(method, uri, host string, extra map[string]string) map[string]string {
				h := map[string]string{own + "method": method, own + "uri": uri, own + "host": host}
				for k, v := range extra {
					h[k] = v
				}
				return h
			}
			for _, tc := range []struct {
				name string
				h    map[string]string
				code int
			}{
				{"GET", orig("GET", "/v1/items", "admin.example.com", map[string]string{"x-api-key": key}), 200},
				{"POST to admin host", orig("POST", "/v1/items", "admin.example.com", map[string]string{"x-api-key": key}), 403},
				{"POST to admin host, upper case and trailing dot", orig("POST", "/v1/items", "ADMIN.example.com.:443", map[string]string{"x-api-key": key}), 403},
				{"public", orig("GET", "/public/a?b=c", "x", nil), 200},
				{"private", orig("GET", "/private", "x", nil), 401},
				{"public, dot segments to a private path", orig("GET", "/public/../private", "x", nil), 401},
				{"public, encoded slash", orig("GET", "/public%2F..%2Fprivate", "x", nil), 400},
				{"/publications is not under /public", orig("GET", "/publications", "x", nil), 401},
				// The attack: the proxy sets its family, the client sends the other.
				{"other family forged to a public path", orig("GET", "/private", "x", map[string]string{other + "uri": "/public/x", other + "method": "GET"}), 401},
				{"other family forged, with a key", orig("POST", "/v1/items", "admin.example.com", map[string]string{"x-api-key": key, other + "method": "GET", other + "host": "x"}), 403},
				{"only the other family", map[string]string{other + "method": "GET", other + "uri": "/public/x", other + "host": "x"}, 400},
				{"uri missing", map[string]string{own + "method": "GET", own + "host": "x"}, 400},
				{"method missing", map[string]string{own + "uri": "/public/x", own + "host": "x"}, 400},
				{"host missing", map[string]string{own + "method": "GET", own + "uri": "/public/x"}, 400},
				{"two methods in one line", orig("GET, POST", "/v1/items", "admin.example.com", map[string]string{"x-api-key": key}), 400},
				{"not a method", orig("PO ST", "/v1/items", "admin.example.com", map[string]string{"x-api-key": key}), 400},
			} {
				r := send(t, srv, "GET", "/check", tc.h)
				if r.code != tc.code {
					t.Errorf("%s: %d %s, want %d", tc.name, r.code, r.body, tc.code)
				}
			}
			// Two copies (the client's and the proxy's appended one) are not
			// a choice extauthz makes.
			req, _ := http.NewRequest("GET", srv.URL+"/check", nil)
			req.Header.Add(own+"uri", "/public/x")
			req.Header.Add(own+"uri", "/private")
			req.Header.Set(own+"method", "GET")
			req.Header.Set(own+"host", "x")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 400 {
				t.Errorf("two %suri lines: %d, want 400", own, resp.StatusCode)
			}
		})
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
