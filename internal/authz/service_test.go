package authz

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/extauthz/extauthz/internal/tokens"
)

// httpReq builds a CheckRequest as Envoy's HTTP filter sends it by default
// (the headers map, lowercased keys, pseudo-headers included).
func httpReq(h map[string]string) *authv3.CheckRequest {
	all := map[string]string{":method": "GET", ":path": "/v1/orders?id=7", ":authority": "api.example.com", "x-request-id": "r-1"}
	for k, v := range h {
		all[k] = v
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: all[":method"], Path: all[":path"], Host: all[":authority"], Headers: all,
		}},
	}}
}

// rawReq builds the encode_raw_headers / proxyless gRPC form: header_map
// with raw_value bytes, one entry per header line.
func rawReq(lines ...[2]string) *authv3.CheckRequest {
	hm := &corev3.HeaderMap{}
	for _, l := range lines {
		hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: l[0], RawValue: []byte(l[1])})
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "POST", Path: "/pkg.Svc/Method", HeaderMap: hm,
		}},
	}}
}

type denyWant struct {
	code   codes.Code
	http   int
	reason string
}

// checkDeny asserts the full shape of a denial.
func checkDeny(t *testing.T, r *authv3.CheckResponse, want denyWant) {
	t.Helper()
	if r.GetStatus() == nil {
		t.Fatal("status unset: Envoy would allow")
	}
	if got := codes.Code(r.GetStatus().GetCode()); got != want.code {
		t.Fatalf("code = %v, want %v", got, want.code)
	}
	dr := r.GetDeniedResponse()
	if dr == nil {
		t.Fatal("no denied_response: Envoy would send a bare 403")
	}
	if r.GetOkResponse() != nil {
		t.Fatal("deny carries an ok_response")
	}
	if got := int(dr.GetStatus().GetCode()); got != want.http {
		t.Fatalf("http status = %d, want %d", got, want.http)
	}
	if len(dr.GetBody()) >= 1024 {
		t.Fatalf("body %d bytes, want < 1 KiB", len(dr.GetBody()))
	}
	var body struct{ Error, Reason string }
	if err := json.Unmarshal([]byte(dr.GetBody()), &body); err != nil {
		t.Fatalf("body not JSON: %v", err)
	}
	if body.Reason != want.reason {
		t.Fatalf("reason = %q, want %q", body.Reason, want.reason)
	}
	hdr := map[string]string{}
	for _, h := range dr.GetHeaders() {
		// Envoy <= 1.36 reads only the deprecated append field: it must stay unset.
		//lint:ignore SA1019 asserting the deprecated field is not set
		appendSet := h.Append != nil
		if h.GetAppendAction() != overwrite || appendSet {
			t.Errorf("deny header %s: append_action %v, append set %v", h.GetHeader().GetKey(), h.GetAppendAction(), appendSet)
		}
		hdr[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	if hdr["content-type"] != "application/json" {
		t.Errorf("content-type = %q", hdr["content-type"])
	}
	wa := hdr["www-authenticate"]
	if want.http == 401 && !strings.HasPrefix(wa, `Bearer realm="`) {
		t.Errorf("401 without a Bearer challenge: %q", wa)
	}
	if r.GetDynamicMetadata().GetFields()["reason"].GetStringValue() != want.reason {
		t.Errorf("metadata reason = %v", r.GetDynamicMetadata())
	}
}

func TestDenials(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{StripCredential: true})
	good := e.issue(t, tokens.IssueParams{Scopes: []string{"read"}})
	revoked := e.issue(t, tokens.IssueParams{})
	if err := e.store.Revoke(ctx(t), revoked.Key.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	expired := e.issue(t, tokens.IssueParams{TTL: time.Nanosecond})
	other := e.issue(t, tokens.IssueParams{})
	wrongSecret := good.PublicKey + ":" + other.SecretKey
	unknownPub, unknownSec, _ := tokens.GeneratePair()
	unknown := unknownPub + ":" + unknownSec

	unauth := func(reason string) denyWant { return denyWant{codes.Unauthenticated, 401, reason} }
	cases := []struct {
		name string
		req  *authv3.CheckRequest
		want denyWant
	}{
		{"no credential", httpReq(nil), unauth("missing_credential")},
		{"network filter: no http request", &authv3.CheckRequest{Attributes: &authv3.AttributeContext{}}, unauth("missing_credential")},
		{"empty request", &authv3.CheckRequest{}, unauth("missing_credential")},
		{"empty header", httpReq(map[string]string{"x-api-key": ""}), unauth("malformed_credential")},
		{"unknown scheme", httpReq(map[string]string{"authorization": "Token " + good.Credential}), unauth("malformed_credential")},
		{"bare credential in authorization", httpReq(map[string]string{"authorization": good.Credential}), unauth("malformed_credential")},
		{"envoy-merged duplicate", httpReq(map[string]string{"authorization": "Bearer " + good.Credential + ",Bearer " + good.Credential}), unauth("malformed_credential")},
		{"header_map duplicate lines", rawReq([2]string{"x-api-key", good.Credential}, [2]string{"x-api-key", good.Credential}), unauth("malformed_credential")},
		{"over 4 KiB", httpReq(map[string]string{"x-api-key": strings.Repeat("a", 5000)}), unauth("malformed_credential")},
		{"non-printable", httpReq(map[string]string{"x-api-key": "abc\x01defghij"}), unauth("malformed_credential")},
		{"sanitised utf-8 (envoy turns bad bytes into !), rejected before lookup", httpReq(map[string]string{"x-api-key": "tok!!en" + strings.Repeat("!", 3)}), unauth("malformed_credential")},
		{"bad checksum", httpReq(map[string]string{"x-api-key": good.Credential[:len(good.Credential)-1] + "Q"}), unauth("malformed_credential")},
		{"pair with empty half", httpReq(map[string]string{"x-api-key": good.PublicKey + ":"}), unauth("malformed_credential")},
		{"both places, equal copies", httpReq(map[string]string{"authorization": "Bearer " + good.Credential, "x-api-key": good.Credential}), unauth("ambiguous_credential")},
		{"unknown key", httpReq(map[string]string{"x-api-key": unknown}), unauth("invalid_credential")},
		{"wrong secret", httpReq(map[string]string{"x-api-key": wrongSecret}), unauth("invalid_credential")},
		{"unknown token", httpReq(map[string]string{"authorization": "Bearer legacy-token-never-issued"}), unauth("invalid_credential")},
		{"revoked", httpReq(map[string]string{"x-api-key": revoked.Credential}), unauth("revoked")},
		{"expired", httpReq(map[string]string{"x-api-key": expired.Credential}), unauth("expired")},
		{"missing scope from context_extensions", withScopes(httpReq(map[string]string{"x-api-key": good.Credential}), "read,admin"), denyWant{codes.PermissionDenied, 403, "insufficient_scope"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r, err := e.svc.Check(ctx(t), tc.req)
			if err != nil {
				t.Fatalf("rpc error %v: a denial must be a response", err)
			}
			checkDeny(t, r, tc.want)
		})
	}
}

func withScopes(r *authv3.CheckRequest, scopes string) *authv3.CheckRequest {
	r.Attributes.ContextExtensions = map[string]string{"scopes": scopes}
	return r
}

// An unknown key and a wrong secret must look identical from outside.
func TestUnknownAndWrongSecretIdentical(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{})
	good := e.issue(t, tokens.IssueParams{})
	other := e.issue(t, tokens.IssueParams{})
	pub, sec, _ := tokens.GeneratePair()
	a, _ := e.svc.Check(ctx(t), httpReq(map[string]string{"x-api-key": pub + ":" + sec}))
	b, _ := e.svc.Check(ctx(t), httpReq(map[string]string{"x-api-key": good.PublicKey + ":" + other.SecretKey}))
	if d := cmp.Diff(a, b, protocmp.Transform()); d != "" {
		t.Fatalf("responses differ (-unknown +wrong secret):\n%s", d)
	}
}

func TestAllow(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{StripCredential: true})
	is := e.issue(t, tokens.IssueParams{Tenant: "acme", Scopes: []string{"read", "write"}})
	basic := "Basic " + base64.StdEncoding.EncodeToString([]byte(is.Credential))
	for name, req := range map[string]*authv3.CheckRequest{
		"bearer":            httpReq(map[string]string{"authorization": "Bearer " + is.Credential}),
		"bearer lowercase":  httpReq(map[string]string{"authorization": "bearer   " + is.Credential}),
		"basic":             httpReq(map[string]string{"authorization": basic}),
		"required scopes":   withScopes(httpReq(map[string]string{"authorization": "Bearer " + is.Credential}), "write, read"),
		"header_map wins":   withHeaders(rawReq([2]string{"authorization", "Bearer " + is.Credential}), map[string]string{"authorization": "Bearer nonsense"}),
		"forged tenant too": httpReq(map[string]string{"authorization": "Bearer " + is.Credential, "x-tenant-id": "evil"}),
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			r, err := e.svc.Check(ctx(t), req)
			if err != nil {
				t.Fatal(err)
			}
			want := &authv3.CheckResponse{
				Status: r.GetStatus(), // checked below: explicit and OK
				HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
					Headers: []*corev3.HeaderValueOption{
						setHeader("x-tenant-id", "acme"), setHeader("x-api-key-id", is.Key.ID),
						setHeader("x-api-key-scopes", "read,write"),
					},
					HeadersToRemove: []string{"authorization"},
				}},
				DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{
					"tenant_id": structpb.NewStringValue("acme"), "key_id": structpb.NewStringValue(is.Key.ID),
					"scopes": structpb.NewStringValue("read,write"),
				}},
			}
			if r.GetStatus() == nil || r.GetStatus().GetCode() != 0 {
				t.Fatalf("status = %v, want explicit OK", r.GetStatus())
			}
			if d := cmp.Diff(want, r, protocmp.Transform()); d != "" {
				t.Fatalf("response (-want +got):\n%s", d)
			}
		})
	}
}

func withHeaders(r *authv3.CheckRequest, h map[string]string) *authv3.CheckRequest {
	r.Attributes.Request.Http.Headers = h
	return r
}

func TestAllowWithoutScopesRemovesScopesHeader(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{StripCredential: false})
	is := e.issue(t, tokens.IssueParams{Kind: tokens.KindToken})
	r, err := e.svc.Check(ctx(t), httpReq(map[string]string{"x-api-key": is.Credential, "x-api-key-scopes": "admin"}))
	if err != nil {
		t.Fatal(err)
	}
	ok := r.GetOkResponse()
	for _, h := range ok.GetHeaders() {
		if h.GetHeader().GetKey() == HeaderScopes {
			t.Fatal("empty scopes header sent")
		}
	}
	if d := cmp.Diff([]string{HeaderScopes}, ok.GetHeadersToRemove()); d != "" {
		t.Fatalf("headers_to_remove (-want +got):\n%s", d)
	}
}

func TestOutageIsUnavailableError(t *testing.T) {
	t.Parallel()
	h, _ := tokens.NewHasher(testPepper)
	a := tokens.NewAuthenticator(h, failingFinder{}, tokens.Options{})
	svc := NewService(a, Options{})
	pub, sec, _ := tokens.GeneratePair()
	r, err := svc.Check(ctx(t), httpReq(map[string]string{"x-api-key": pub + ":" + sec}))
	if status.Code(err) != codes.Unavailable || r != nil {
		t.Fatalf("got %v, %v; want no response and UNAVAILABLE", r, err)
	}
	// Malformed input is still decided without the store.
	r, err = svc.Check(ctx(t), httpReq(map[string]string{"x-api-key": "pk_x:sk_y"}))
	if err != nil {
		t.Fatal(err)
	}
	checkDeny(t, r, denyWant{codes.Unauthenticated, 401, "malformed_credential"})
}

func TestRoutes(t *testing.T) {
	t.Parallel()
	routes, err := ParseRoutes([]byte(`{"routes": [
		{"path_prefix": "/public", "public": true},
		{"path_prefix": "/admin", "scopes": ["admin"]},
		{"host": "*.example.com", "path_prefix": "/v1/orders", "methods": ["post"], "scopes": ["write"]}
	]}`), PathOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, Options{Routes: routes})
	reader := e.issue(t, tokens.IssueParams{Scopes: []string{"read"}})
	req := func(method, host, path string, h map[string]string) *authv3.CheckRequest {
		r := httpReq(h)
		r.Attributes.Request.Http.Method, r.Attributes.Request.Http.Host, r.Attributes.Request.Http.Path = method, host, path
		return r
	}
	key := map[string]string{"x-api-key": reader.Credential}

	// Public: no key needed, forged identity removed.
	r, err := e.svc.Check(ctx(t), req("GET", "x", "/public/logo.png?v=1", map[string]string{"x-tenant-id": "evil"}))
	if err != nil || r.GetStatus().GetCode() != 0 {
		t.Fatalf("public: %v %v", r, err)
	}
	if d := cmp.Diff([]string{HeaderTenant, HeaderKeyID, HeaderScopes}, r.GetOkResponse().GetHeadersToRemove()); d != "" {
		t.Errorf("public headers_to_remove:\n%s", d)
	}
	// The query string is not part of the path; a prefix in the query is no match.
	r, _ = e.svc.Check(ctx(t), req("GET", "x", "/data?/public", nil))
	checkDeny(t, r, denyWant{codes.Unauthenticated, 401, "missing_credential"})
	// An encoded slash means what the upstream makes of it: not judged.
	r, _ = e.svc.Check(ctx(t), req("GET", "x", "/public%2F..%2Fadmin", key))
	checkDeny(t, r, denyWant{codes.InvalidArgument, 400, "malformed_path"})
	r, _ = e.svc.Check(ctx(t), req("GET", "x", "/admin/users", key))
	checkDeny(t, r, denyWant{codes.PermissionDenied, 403, "insufficient_scope"})
	r, _ = e.svc.Check(ctx(t), req("POST", "api.example.com:8443", "/v1/orders/9", key))
	checkDeny(t, r, denyWant{codes.PermissionDenied, 403, "insufficient_scope"})
	// Hosts compare without case, port or trailing dot.
	for _, host := range []string{"API.example.com", "api.example.com.", "api.example.com.:443"} {
		r, _ = e.svc.Check(ctx(t), req("POST", host, "/v1/orders", key))
		checkDeny(t, r, denyWant{codes.PermissionDenied, 403, "insufficient_scope"})
	}
	// Prefixes match whole segments: /public is not /publications.
	for _, p := range []string{"/publications", "/public-internal/admin", "/publicx"} {
		r, _ = e.svc.Check(ctx(t), req("GET", "x", p, nil))
		checkDeny(t, r, denyWant{codes.Unauthenticated, 401, "missing_credential"})
	}
	// A public rule never waives the scopes of the route's context_extensions.
	ext := req("GET", "x", "/public/report", nil)
	ext.Attributes.ContextExtensions = map[string]string{"scopes": "admin"}
	r, _ = e.svc.Check(ctx(t), ext)
	checkDeny(t, r, denyWant{codes.Unauthenticated, 401, "missing_credential"})
	ext = req("GET", "x", "/public/report", key)
	ext.Attributes.ContextExtensions = map[string]string{"scopes": "admin"}
	r, _ = e.svc.Check(ctx(t), ext)
	checkDeny(t, r, denyWant{codes.PermissionDenied, 403, "insufficient_scope"})
	ext.Attributes.ContextExtensions = map[string]string{"scopes": "read"}
	if r, _ = e.svc.Check(ctx(t), ext); r.GetStatus().GetCode() != 0 || r.GetOkResponse().GetHeaders() == nil {
		t.Errorf("public rule + context scope the key has: %v, want an allow with identity", r)
	}
	ext.Attributes.ContextExtensions = map[string]string{"scopes": " , "}
	ext.Attributes.Request.Http.Headers = nil
	if r, _ = e.svc.Check(ctx(t), ext); r.GetStatus().GetCode() != 0 {
		t.Errorf("public rule + empty context scopes: %v, want public", r)
	}
	// Spellings of /admin an upstream decodes to /admin are /admin.
	for _, p := range []string{"/%61dmin/users", "//admin/users", "/x/../admin/users", "/public/../admin/report.txt", "/public/%2e%2e/admin"} {
		r, _ = e.svc.Check(ctx(t), req("GET", "x", p, key))
		checkDeny(t, r, denyWant{codes.PermissionDenied, 403, "insufficient_scope"})
		r, _ = e.svc.Check(ctx(t), req("GET", "x", p, nil))
		checkDeny(t, r, denyWant{codes.Unauthenticated, 401, "missing_credential"})
	}
	for _, p := range []string{"/public%2F..%2Fadmin%2Freport.txt", "/public/..%5Cadmin", "/public/..;/admin", "admin", "*"} {
		r, _ = e.svc.Check(ctx(t), req("GET", "x", p, nil))
		checkDeny(t, r, denyWant{codes.InvalidArgument, 400, "malformed_path"})
	}
	// HEAD runs the GET handler: a rule naming GET holds it too.
	getRule, _ := ParseRoutes([]byte(`{"routes":[{"path_prefix":"/","public":true},{"path_prefix":"/reports","methods":["GET"],"scopes":["reports"]}]}`), PathOptions{})
	eg := newEnv(t, Options{Routes: getRule})
	for _, m := range []string{"GET", "HEAD", "head"} {
		r, _ = eg.svc.Check(ctx(t), req(m, "x", "/reports/q1.txt", nil))
		checkDeny(t, r, denyWant{codes.Unauthenticated, 401, "missing_credential"})
	}
	// A method that is not one matches no rule's methods: not judged either.
	r, _ = e.svc.Check(ctx(t), req("POST, GET", "api.example.com", "/v1/orders", key))
	checkDeny(t, r, denyWant{codes.InvalidArgument, 400, "malformed_path"})
	for _, c := range [][3]string{{"GET", "api.example.com", "/v1/orders"}, {"POST", "example.org", "/v1/orders"}} {
		r, _ = e.svc.Check(ctx(t), req(c[0], c[1], c[2], key))
		if r.GetStatus().GetCode() != 0 {
			t.Errorf("%v: denied, want allow (rule does not match)", c)
		}
	}
}

func TestParseRoutesRejects(t *testing.T) {
	t.Parallel()
	for name, body := range map[string]string{
		"unknown field":   `{"routes":[{"path_prefx":"/a"}]}`,
		"relative prefix": `{"routes":[{"path_prefix":"a"}]}`,
		"public + scopes": `{"routes":[{"path_prefix":"/a","public":true,"scopes":["x"]}]}`,
		"bad wildcard":    `{"routes":[{"path_prefix":"/a","host":"a.*.com"}]}`,
		"bad scope":       `{"routes":[{"path_prefix":"/a","scopes":["a,b"]}]}`,
		"not json":        `routes: []`,
		"parameters":      `{"routes":[{"path_prefix":"/a;b"}]}`,
		"query":           `{"routes":[{"path_prefix":"/a?b"}]}`,
		"encoded slash":   `{"routes":[{"path_prefix":"/a%2Fb"}]}`,
		"bad escape":      `{"routes":[{"path_prefix":"/a%zz"}]}`,
		// Typos that would have loaded and then matched nothing they name.
		"method with space":  `{"routes":[{"path_prefix":"/admin","methods":["GET "],"scopes":["admin"]}]}`,
		"empty method":       `{"routes":[{"path_prefix":"/admin","methods":[""],"scopes":["admin"]}]}`,
		"star method":        `{"routes":[{"path_prefix":"/admin","methods":["*"],"scopes":["admin"]}]}`,
		"host with scheme":   `{"routes":[{"host":"https://api.example.com","path_prefix":"/admin","scopes":["admin"]}]}`,
		"host with path":     `{"routes":[{"host":"api.example.com/","path_prefix":"/admin","scopes":["admin"]}]}`,
		"host with space":    `{"routes":[{"host":"api.example.com ","path_prefix":"/admin","scopes":["admin"]}]}`,
		"host bad port":      `{"routes":[{"host":"api.example.com:https","path_prefix":"/admin","scopes":["admin"]}]}`,
		"glob prefix":        `{"routes":[{"path_prefix":"/admin/*","scopes":["admin"]}]}`,
		"glob prefix 2":      `{"routes":[{"path_prefix":"/admin*","scopes":["admin"]}]}`,
		"duplicate key":      `{"routes":[{"path_prefix":"/admin","scopes":["admin"],"scopes":[]}]}`,
		"duplicate routes":   `{"routes":[{"path_prefix":"/admin","scopes":["admin"]}],"routes":[]}`,
		"trailing data":      `{"routes":[]} {"routes":[{"path_prefix":"/","public":true}]}`,
		"same rule twice":    `{"routes":[{"path_prefix":"/admin","scopes":["admin"]},{"path_prefix":"/admin/","public":true}]}`,
		"same rule, methods": `{"routes":[{"path_prefix":"/a","methods":["get","POST"],"scopes":["x"]},{"path_prefix":"/a","methods":["POST","GET"],"public":true}]}`,
	} {
		if _, err := ParseRoutes([]byte(body), PathOptions{}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestParseRoutesAccepts(t *testing.T) {
	t.Parallel()
	for _, body := range []string{
		`{"routes":[{"host":"api.example.com:8443","path_prefix":"/a"}]}`,
		`{"routes":[{"host":"*.example.com.","path_prefix":"/a"}]}`,
		`{"routes":[{"host":"10.0.0.1","path_prefix":"/a"}]}`,
		`{"routes":[{"host":"[::1]:80","path_prefix":"/a"}]}`,
		`{"routes":[{"path_prefix":"/a","methods":["GET"]},{"path_prefix":"/a","methods":["POST"]},{"host":"x.example","path_prefix":"/a"}]}`,
		`{"routes":[]}` + "\n",
	} {
		if _, err := ParseRoutes([]byte(body), PathOptions{}); err != nil {
			t.Errorf("%s: %v", body, err)
		}
	}
}

func TestWWWAuthenticate(t *testing.T) {
	t.Parallel()
	for r, want := range map[Reason]string{
		MissingCredential:   `Bearer realm="api"`,
		MalformedCredential: `Bearer realm="api", error="invalid_token"`,
		InvalidCredential:   `Bearer realm="api", error="invalid_token"`,
		Revoked:             `Bearer realm="api", error="invalid_token"`,
		AmbiguousCredential: `Bearer realm="api", error="invalid_request"`,
		InsufficientScope:   `Bearer realm="api", error="insufficient_scope"`,
	} {
		if got := WWWAuthenticate("api", r); got != want {
			t.Errorf("%v: %q, want %q", r, got, want)
		}
	}
}

// A denial is logged with its reason and request id, never the credential.
func TestDenialLog(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zap.InfoLevel)
	e := newEnv(t, Options{Logger: zap.New(core)})
	const cred = "tk_notarealtokennotarealtoken"
	if _, err := e.svc.Check(ctx(t), httpReq(map[string]string{"authorization": "Bearer " + cred})); err != nil {
		t.Fatal(err)
	}
	entries := logs.All()
	if len(entries) != 1 {
		t.Fatalf("%d log entries, want 1", len(entries))
	}
	f := entries[0].ContextMap()
	if f["request_id"] != "r-1" || f["reason"] == nil || f["credential_header"] != "authorization" {
		t.Fatalf("fields = %v", f)
	}
	if strings.Contains(fmt.Sprint(f), cred) {
		t.Fatal("credential logged")
	}
}

// A credential sent where no credential is read (path, query, host,
// method, request id), plain or percent-encoded, never reaches the
// decision log, whatever the decision; long values are cut.
func TestDecisionLogRedactsCredentialsAnywhere(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zap.DebugLevel)
	e := newEnv(t, Options{Logger: zap.New(core)})
	is := e.issue(t, tokens.IssueParams{Kind: tokens.KindPair})
	tok := e.issue(t, tokens.IssueParams{Kind: tokens.KindToken})
	pair, token := is.Credential, tok.Credential
	enc := func(s string) string { return "%" + fmt.Sprintf("%02x", s[0]) + s[1:] } // %70k_...
	cases := []struct {
		name string
		req  Request
	}{
		{"pair in the path", Request{Path: "/v1/" + pair + "/orders"}},
		{"token in the path, encoded", Request{Path: "/v1/" + enc(token)}},
		{"pair in the query (never logged)", Request{Path: "/v1/orders?key=" + pair}},
		{"token in the request id", Request{ID: "req-" + token}},
		{"bearer in the request id", Request{ID: "Bearer " + token}},
		{"token in x-request-id", Request{Header: tokens.HeaderFunc(func(n string) (string, bool) {
			if n == "x-request-id" {
				return "id " + pair, true
			}
			return "", false
		})}},
		{"token in the host", Request{Host: token + ".api.example.com"}},
		{"pair in the method", Request{Method: pair}},
		{"allowed, with the pair in the path too", Request{Path: "/" + pair, Header: tokens.HeaderFunc(func(n string) (string, bool) {
			if n == "authorization" {
				return "Bearer " + pair, true
			}
			return "", false
		})}},
	}
	for _, tc := range cases {
		req := tc.req
		req.HasHTTP = true
		if req.Header == nil {
			req.Header = tokens.HeaderFunc(func(string) (string, bool) { return "", false })
		}
		if req.Method == "" {
			req.Method = "GET"
		}
		if req.Path == "" {
			req.Path = "/v1/orders"
		}
		if _, err := e.svc.Decide(ctx(t), &req); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		entries := logs.TakeAll()
		if len(entries) != 1 {
			t.Fatalf("%s: %d log entries, want 1", tc.name, len(entries))
		}
		line := entries[0].Message + " " + fmt.Sprint(entries[0].ContextMap())
		for _, s := range []string{is.SecretKey[3:], is.PublicKey[3:], token[3:]} {
			if strings.Contains(line, s) {
				t.Errorf("%s: the log holds a credential: %s", tc.name, line)
			}
		}
		if !strings.Contains(line, tokens.Redacted) && !strings.Contains(tc.name, "never logged") {
			t.Errorf("%s: nothing redacted: %s", tc.name, line)
		}
	}
	// Long values are cut.
	long := strings.Repeat("a", 20000)
	if _, err := e.svc.Decide(ctx(t), &Request{HasHTTP: true, Header: tokens.HeaderFunc(func(string) (string, bool) { return "", false }),
		Method: long, Host: long, Path: "/" + long, ID: long}); err != nil {
		t.Fatal(err)
	}
	f := logs.TakeAll()[0].ContextMap()
	for field, bound := range map[string]int{"method": maxLoggedMethod, "host": maxLoggedHost, "path": maxLoggedPath, "request_id": maxLoggedRequestID} {
		v, _ := f[field].(string)
		if len(v) > bound+40 || !strings.Contains(v, "cut from") {
			t.Errorf("%s: %d bytes logged (bound %d): %.60q...", field, len(v), bound, v)
		}
	}
}

// With EXTAUTHZ_ENCODED_SLASHES=keep, %2F is data to extauthz, but an
// upstream may decode it: the rules of both readings must be satisfied.
func TestRoutesKeepEncodedSlashes(t *testing.T) {
	t.Parallel()
	o := PathOptions{KeepEncodedSlashes: true}
	routes, err := ParseRoutes([]byte(`{"routes":[{"path_prefix":"/public","public":true},{"path_prefix":"/admin","scopes":["admin"]}]}`), o)
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, Options{Routes: routes, Paths: o})
	reader := map[string]string{"x-api-key": e.issue(t, tokens.IssueParams{Scopes: []string{"read"}}).Credential}
	req := func(path string, h map[string]string) *authv3.CheckRequest {
		r := httpReq(h)
		r.Attributes.Request.Http.Path = path
		return r
	}
	for _, tc := range []struct {
		path string
		h    map[string]string
		want denyWant
	}{
		{"/admin%2Freport.txt", reader, denyWant{codes.PermissionDenied, 403, "insufficient_scope"}},
		{"/x%2Fadmin", reader, denyWant{}},
		{"/public%2Fx", nil, denyWant{codes.Unauthenticated, 401, "missing_credential"}},
		{"/public/..%2Fadmin/report.txt", nil, denyWant{codes.InvalidArgument, 400, "malformed_path"}},
		{"/admin%2Fx/..", nil, denyWant{codes.InvalidArgument, 400, "malformed_path"}},
		{"/%2Fadmin", reader, denyWant{codes.InvalidArgument, 400, "malformed_path"}},
	} {
		r, err := e.svc.Check(ctx(t), req(tc.path, tc.h))
		if err != nil {
			t.Fatal(err)
		}
		if tc.want.code == codes.OK {
			if r.GetStatus().GetCode() != 0 {
				t.Errorf("%s: denied %v, want allowed", tc.path, r.GetStatus())
			}
			continue
		}
		checkDeny(t, r, tc.want)
	}
	r, _ := e.svc.Check(ctx(t), req("/public/a%2Fb", nil))
	if r.GetStatus().GetCode() != 0 {
		t.Errorf("/public/a%%2Fb: both readings public, got %v", r.GetStatus())
	}
}

// A denial's log names the client's address as the caller reports it,
// read the same by both decoders.
func TestDenialLogNamesClientAddress(t *testing.T) {
	t.Parallel()
	for _, stock := range []bool{false, true} {
		core, logs := observer.New(zap.InfoLevel)
		e := newEnv(t, Options{Logger: zap.New(core), ProtoCodec: stock})
		client := authv3.NewAuthorizationClient(serve(t, e.svc, NewHealth()))
		r := httpReq(nil)
		r.Attributes.Source = &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "203.0.113.7", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 4711}},
		}}}
		if _, err := client.Check(ctx(t), r); err != nil {
			t.Fatal(err)
		}
		entries := logs.FilterMessage("denied").All()
		if len(entries) != 1 || entries[0].ContextMap()["client_address"] != "203.0.113.7" {
			t.Errorf("stock=%v: denial log %v, want client_address 203.0.113.7", stock, entries)
		}
	}
}
