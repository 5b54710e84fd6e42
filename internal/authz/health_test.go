package authz

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestHTTPHealth(t *testing.T) {
	t.Parallel()
	h := NewHealth()
	srv := httptest.NewServer(h.HTTPHandler(nil))
	defer srv.Close()
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("healthz = %d", code)
	}
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "no key store contact") {
		t.Errorf("readyz before contact = %d %q", code, body)
	}
	h.SetReady(true, "key store unreachable; serving cached decisions")
	if code, body := get("/readyz"); code != 200 || !strings.Contains(body, "cached") {
		t.Errorf("readyz degraded = %d %q", code, body)
	}
	h.Shutdown()
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "shutting down") {
		t.Errorf("readyz shutting down = %d %q", code, body)
	}
	// Never redirected: ServeMux would answer 301 to these.
	for _, p := range []string{"//healthz", "/a/../readyz", "/x/./y"} {
		req, _ := http.NewRequest("GET", srv.URL+p, nil)
		resp, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 404 {
			t.Errorf("%s: %d, want 404", p, resp.StatusCode)
		}
	}
}
