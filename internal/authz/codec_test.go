package authz

import (
	"testing"
	"time"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/extauthz/extauthz/internal/tokens"
)

// FuzzAllowEncoding proves appendAllow equal to the message allowResponse
// builds, for any principal and removal list.
func FuzzAllowEncoding(f *testing.F) {
	f.Add("acme", "key_1", "read,write", "authorization", true)
	f.Add("t", "k", "", "x-api-key", false)
	f.Add("", "", "", "", true)
	f.Add(string(make([]byte, 300)), "é", "a", "authorization", true)
	f.Fuzz(func(t *testing.T, tenant, keyID, scopes, from string, strip bool) {
		for _, s := range []string{tenant, keyID, scopes, from} {
			if !utf8.ValidString(s) {
				return // not a principal: ids and scopes are validated ASCII
			}
		}
		svc := &Service{opts: Options{StripCredential: strip}}
		d := Decision{Reason: Allowed, From: from, Result: tokens.Result{
			Principal: tokens.Principal{KeyID: keyID, TenantID: tenant, ScopesHeader: scopes},
		}}
		var rm [2]string
		b := appendAllow(nil, &d.Result.Principal, svc.removals(rm[:0], &d))
		var got authv3.CheckResponse
		if err := proto.Unmarshal(b, &got); err != nil {
			t.Fatalf("lean allow does not decode: %v", err)
		}
		if diff := cmp.Diff(svc.allowResponse(&d), &got, protocmp.Transform()); diff != "" {
			t.Fatalf("lean allow differs (-stock +lean):\n%s", diff)
		}
		if len(b) != cap(b) {
			t.Fatalf("size computed %d, wrote %d", cap(b), len(b))
		}
	})
}

// The lean and stock codecs give the same answer to every kind of check,
// through a real gRPC server.
func TestCodecsAgree(t *testing.T) {
	t.Parallel()
	routes, err := ParseRoutes([]byte(`{"routes":[{"path_prefix":"/public","public":true},{"path_prefix":"/admin","scopes":["admin"]}]}`), PathOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, Options{StripCredential: true, Routes: routes})
	scoped := e.issue(t, tokens.IssueParams{Tenant: "acme", Scopes: []string{"read", "write"}})
	bare := e.issue(t, tokens.IssueParams{Tenant: "globex", Kind: tokens.KindToken})
	revoked := e.issue(t, tokens.IssueParams{Tenant: "acme"})
	if err := e.store.Revoke(ctx(t), revoked.Key.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	lean := authv3.NewAuthorizationClient(serve(t, e.svc, NewHealth()))
	stockSvc := NewService(e.auth, Options{StripCredential: true, Routes: routes, ProtoCodec: true})
	stock := authv3.NewAuthorizationClient(serve(t, stockSvc, NewHealth()))

	public := httpReq(map[string]string{":path": "/public/x"})
	public.Attributes.Request.Http.Path = "/public/x"
	admin := httpReq(map[string]string{"authorization": "Bearer " + scoped.Credential})
	admin.Attributes.Request.Http.Path = "/admin/users"
	cases := map[string]*authv3.CheckRequest{
		"allow with scopes":        benchRequest(t, "Bearer "+scoped.Credential),
		"allow without scopes":     httpReq(map[string]string{"x-api-key": bare.Credential}),
		"allow from header_map":    rawReq([2]string{"authorization", "Bearer " + bare.Credential}),
		"public route":             public,
		"route scope missing":      admin,
		"context scope missing":    withScopes(httpReq(map[string]string{"x-api-key": scoped.Credential}), "read, admin"),
		"revoked":                  httpReq(map[string]string{"authorization": "Bearer " + revoked.Credential}),
		"unknown":                  httpReq(map[string]string{"authorization": "Bearer tk_unknownunknownunknown"}),
		"malformed":                httpReq(map[string]string{"authorization": "Bearer pk_x:sk_y"}),
		"ambiguous":                httpReq(map[string]string{"authorization": "Bearer " + bare.Credential, "x-api-key": bare.Credential}),
		"missing":                  httpReq(nil),
		"network filter (no http)": {Attributes: &authv3.AttributeContext{}},
	}
	for name, req := range cases {
		want, wantErr := stock.Check(ctx(t), req)
		got, gotErr := lean.Check(ctx(t), req)
		if status.Code(wantErr) != status.Code(gotErr) {
			t.Fatalf("%s: stock error %v, lean error %v", name, wantErr, gotErr)
		}
		if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
			t.Errorf("%s: responses differ (-stock +lean):\n%s", name, diff)
		}
		if name == "allow with scopes" && got.GetOkResponse() == nil {
			t.Fatalf("%s: not allowed: %v", name, got)
		}
	}
}

func BenchmarkAppendAllow(b *testing.B) {
	p := &tokens.Principal{KeyID: "key_2bX9kQ4mN7pR", TenantID: "tenant-042", ScopesHeader: "read,write"}
	remove := []string{"authorization"}
	b.ReportAllocs()
	for b.Loop() {
		if len(appendAllow(nil, p, remove)) == 0 {
			b.Fatal("empty")
		}
	}
}

// A principal too large for the pooled buffer is encoded into its own,
// and the pooled one is not handed out twice.
func TestEncodeAllowOutgrowsBuffer(t *testing.T) {
	big := &tokens.Principal{KeyID: "k", TenantID: string(make([]byte, allowBufSize)), ScopesHeader: "read"}
	small := &tokens.Principal{KeyID: "k", TenantID: "t", ScopesHeader: "read"}
	a := encodeAllow(big, nil)
	b := encodeAllow(small, nil)
	if want := appendAllow(nil, big, nil); string(a.ReadOnlyData()) != string(want) {
		t.Fatal("large allow differs from appendAllow")
	}
	if want := appendAllow(nil, small, nil); string(b.ReadOnlyData()) != string(want) {
		t.Fatal("small allow overwritten")
	}
	a.Free()
	b.Free()
}
