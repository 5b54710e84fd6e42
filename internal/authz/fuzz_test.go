package authz

import (
	"bytes"
	"strings"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/extauthz/extauthz/internal/tokens"
)

// FuzzCheck decodes arbitrary bytes as a CheckRequest and checks it. It must
// never panic, every response must carry an explicit status, every denial a
// denied_response with a 401 or 403, no response or error may contain the
// secret of the key the corpus knows, and the served path (lean decoder and
// encoder) must give the same answer as Service.Check.
func FuzzCheck(f *testing.F) {
	e := newEnv(f, Options{StripCredential: true, Logger: zap.NewNop()})
	is := e.issue(f, tokens.IssueParams{Scopes: []string{"read"}})
	secret := is.SecretKey[3:]
	for _, r := range []*authv3.CheckRequest{
		httpReq(map[string]string{"authorization": "Bearer " + is.Credential}),
		httpReq(map[string]string{"x-api-key": is.Credential}),
		withScopes(httpReq(map[string]string{"x-api-key": is.Credential}), "admin"),
		httpReq(map[string]string{"authorization": "Bearer " + is.Credential + ",x"}),
		rawReq([2]string{"authorization", "Bearer " + is.Credential}),
		rawReq([2]string{"x-api-key", is.Credential}, [2]string{"x-api-key", "x"}),
		{},
	} {
		b, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var req authv3.CheckRequest
		if err := proto.Unmarshal(b, &req); err != nil {
			return
		}
		r, err := e.svc.Check(t.Context(), &req)
		if err != nil {
			t.Fatalf("rpc error with a working store: %v", err)
		}
		if r.GetStatus() == nil {
			t.Fatal("status unset")
		}
		if r.GetStatus().GetCode() != 0 {
			dr := r.GetDeniedResponse()
			if dr == nil || (dr.GetStatus().GetCode() != 401 && dr.GetStatus().GetCode() != 403) {
				t.Fatalf("deny without a 401/403 denied_response: %v", r)
			}
		} else if r.GetOkResponse() == nil {
			t.Fatal("allow without ok_response")
		}
		out, _ := proto.Marshal(r)
		if strings.Contains(string(out), secret) {
			t.Fatal("secret in response")
		}
		// The served path, lean decoder and encoder, answers the same.
		var w wireRequest
		if err := w.unmarshal(bytes.Clone(b)); err != nil {
			t.Fatalf("lean decoder rejects what the stock one accepts: %v", err)
		}
		lb, err := e.svc.checkWire(t.Context(), &w)
		if err != nil {
			t.Fatalf("lean path: rpc error with a working store: %v", err)
		}
		var lean authv3.CheckResponse
		if err := proto.Unmarshal(lb.ReadOnlyData(), &lean); err != nil {
			t.Fatalf("lean answer does not decode: %v", err)
		}
		if d := cmp.Diff(r, &lean, protocmp.Transform()); d != "" {
			t.Fatalf("lean answer differs (-stock +lean):\n%s", d)
		}
	})
}
