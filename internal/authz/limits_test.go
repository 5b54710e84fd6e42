package authz

import (
	"net/http"
	"strconv"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/extauthz/extauthz/internal/tokens"
)

// manyHeaders is a CheckRequest with n header lines (header_map) and the
// same n in the headers map, the credential first.
func manyHeaders(cred string, n int) *authv3.CheckRequest {
	r := httpReq(map[string]string{"authorization": "Bearer " + cred})
	hm := &corev3.HeaderMap{}
	hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: "authorization", RawValue: []byte("Bearer " + cred)})
	for i := range n - 1 {
		hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: "x-filler", RawValue: []byte(strconv.Itoa(i))})
	}
	r.Attributes.Request.Http.Headers = nil
	r.Attributes.Request.Http.HeaderMap = hm
	return r
}

// A check with more header lines than EXTAUTHZ_MAX_HEADERS is refused
// before any work, through both codecs; at the limit it is decided.
func TestHeaderLimit(t *testing.T) {
	t.Parallel()
	for _, stock := range []bool{false, true} {
		e := newEnv(t, Options{MaxHeaders: 50, ProtoCodec: stock})
		cred := e.issue(t, tokens.IssueParams{}).Credential
		client := authv3.NewAuthorizationClient(serve(t, e.svc, NewHealth()))
		r, err := client.Check(ctx(t), manyHeaders(cred, 50))
		if err != nil || r.GetStatus().GetCode() != 0 {
			t.Errorf("stock=%v, 50 lines: %v %v, want an allow", stock, r.GetStatus(), err)
		}
		// The repeated lines of one name, joined, would be quadratic work.
		for _, n := range []int{51, 40000} {
			if _, err := client.Check(ctx(t), manyHeaders(cred, n)); status.Code(err) != codes.ResourceExhausted {
				t.Errorf("stock=%v, %d lines: %v, want RESOURCE_EXHAUSTED", stock, n, err)
			}
		}
	}
	_, srv := newHTTPEnv(t, Options{MaxHeaders: 20})
	req, _ := http.NewRequest("GET", srv.URL+"/check/x", nil)
	for i := range 25 {
		req.Header.Add("x-filler", strconv.Itoa(i))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("HTTP with 25 lines: %d, want 431", resp.StatusCode)
	}
}

// BenchmarkCheckLargestAllowed decodes and decides the largest check the
// default limits let through: DefaultMaxHeaders lines, one of them the
// credential, 1 KiB each (about 256 KiB, the default message limit).
func BenchmarkCheckLargestAllowed(b *testing.B) {
	e := newEnv(b, Options{})
	cred := e.issue(b, tokens.IssueParams{}).Credential
	r := manyHeaders(cred, DefaultMaxHeaders)
	for _, h := range r.Attributes.Request.Http.HeaderMap.Headers[1:] {
		h.RawValue = make([]byte, 1000)
	}
	msg, err := proto.Marshal(r)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	for b.Loop() {
		w := &wireRequest{maxHeaders: DefaultMaxHeaders}
		if err := w.unmarshal(append([]byte(nil), msg...)); err != nil || w.tooMany {
			b.Fatal(err, w.tooMany)
		}
		if _, err := e.svc.checkWire(ctx(b), w); err != nil {
			b.Fatal(err)
		}
	}
}
