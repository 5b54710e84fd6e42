package main

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// nginxConf is the configuration users copy (README, "nginx"), with the
// addresses filled in. auth_request sends a subrequest to extauthz's fixed
// address, passes the original method and URI, and copies the tenant
// headers into the proxied request; an empty value drops the header, and a
// proxy_set_header replaces the client's own copy, so nothing forged gets
// through.
const nginxConf = `
daemon off;
worker_processes 1;
pid {{dir}}/nginx.pid;
error_log {{dir}}/error.log warn;
events {}
http {
  access_log off;
  client_body_temp_path {{dir}}/body;
  proxy_temp_path {{dir}}/proxy;
  fastcgi_temp_path {{dir}}/fastcgi;
  uwsgi_temp_path {{dir}}/uwsgi;
  scgi_temp_path {{dir}}/scgi;
  server {
    listen {{listen}};

    location / {
      auth_request /_extauthz;
      auth_request_set $tenant_id $upstream_http_x_tenant_id;
      auth_request_set $key_id    $upstream_http_x_api_key_id;
      auth_request_set $scopes    $upstream_http_x_api_key_scopes;
      proxy_set_header X-Tenant-Id      $tenant_id;
      proxy_set_header X-Api-Key-Id     $key_id;
      proxy_set_header X-Api-Key-Scopes $scopes;
      proxy_set_header Authorization    "";
      proxy_set_header X-Api-Key        "";
      proxy_pass http://{{upstream}};
    }

    location = /_extauthz {
      internal;
      proxy_pass http://{{extauthz}}/check;
      proxy_pass_request_body off;
      proxy_set_header Content-Length    "";
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Original-URI    $request_uri;
      proxy_set_header X-Forwarded-Host  $host;
    }
  }
}
`

// startNginx runs nginx in the foreground with nginxConf.
func startNginx(t *testing.T, extauthzHTTP, upstream string) string {
	t.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		for _, p := range []string{"/usr/sbin/nginx", "/usr/local/sbin/nginx"} {
			if _, serr := os.Stat(p); serr == nil {
				bin, err = p, nil
			}
		}
	}
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("nginx not installed in CI (.ci/run installs nginx-light)")
		}
		t.Skip("SKIPPED: nginx not installed (apt-get install nginx-light); the nginx auth_request test needs it")
	}
	dir := t.TempDir()
	addr := freeLoopbackAddr(t)
	conf := strings.NewReplacer("{{dir}}", dir, "{{listen}}", addr, "{{upstream}}", upstream, "{{extauthz}}", extauthzHTTP).Replace(nginxConf)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-e", filepath.Join(dir, "error.log"), "-p", dir, "-c", path)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
		}
	})
	waitListening(t, addr, 5*time.Second, func() string {
		log, _ := os.ReadFile(filepath.Join(dir, "error.log"))
		return "nginx: " + out.String() + string(log)
	})
	return addr
}

// freeLoopbackAddr returns a loopback address with a port free just now.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	return lis.Addr().String()
}

// waitListening waits until addr accepts connections, failing with what
// describe says (the process's output) after timeout.
func waitListening(t *testing.T, addr string, timeout time.Duration, describe func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not start listening: %s", addr, describe())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// recorder is an upstream that remembers the headers of its last request.
type recorder struct {
	mu   sync.Mutex
	last http.Header
	hits int
}

func (r *recorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.last, r.hits = req.Header.Clone(), r.hits+1
	r.mu.Unlock()
	io.WriteString(w, "upstream")
}

func (r *recorder) seen() (http.Header, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last, r.hits
}

func TestNginxAuthRequest(t *testing.T) {
	testForwardAuthProxy(t, startNginx)
}

// testForwardAuthProxy runs extauthz's HTTP mode behind a real reverse
// proxy (started by start, given extauthz's HTTP address and the upstream's)
// and checks what clients get and what the upstream sees.
func testForwardAuthProxy(t *testing.T, start func(t *testing.T, extauthzHTTP, upstream string) string) {
	routes := filepath.Join(t.TempDir(), "routes.json")
	os.WriteFile(routes, []byte(`{"routes":[{"path_prefix":"/admin","scopes":["admin"]},{"path_prefix":"/public","public":true}]}`), 0o600)
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(), "EXTAUTHZ_ROUTES": routes}}
	k := c.ok("", "keys", "create", "--tenant", "acme", "--scopes", "read")[0]
	cred := k["credential"].(string)
	srv := startServer(t, c)
	up := &recorder{}
	upstream := httptest.NewServer(up)
	defer upstream.Close()
	proxy := start(t, srv.addrs.HTTP, strings.TrimPrefix(upstream.URL, "http://"))
	get := func(path string, h map[string]string) (int, http.Header) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+proxy+path, nil)
		for k, v := range h {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, resp.Header
	}

	// No key: 401 with the challenge, and the upstream is never reached.
	code, h := get("/v1/orders", map[string]string{"x-tenant-id": "forged"})
	if code != 401 || !strings.HasPrefix(h.Get("www-authenticate"), "Bearer") {
		t.Fatalf("no key: %d %v", code, h)
	}
	if _, hits := up.seen(); hits != 0 {
		t.Fatal("upstream reached without a key")
	}
	// A key: the upstream sees extauthz's tenant, never the client's, and no credential.
	for _, hdr := range []map[string]string{
		{"authorization": "Bearer " + cred, "x-tenant-id": "forged", "x-api-key-id": "forged"},
		{"x-api-key": cred, "x-tenant-id": "forged"},
	} {
		if code, _ := get("/v1/orders?id=7", hdr); code != 200 {
			t.Fatalf("with a key: %d", code)
		}
		seen, _ := up.seen()
		if seen.Get("x-tenant-id") != "acme" || seen.Get("x-api-key-id") != k["id"] || seen.Get("x-api-key-scopes") != "read" {
			t.Fatalf("upstream saw tenant %q key %q scopes %q", seen.Get("x-tenant-id"), seen.Get("x-api-key-id"), seen.Get("x-api-key-scopes"))
		}
		if len(seen.Values("x-tenant-id")) != 1 {
			t.Fatalf("upstream saw %d x-tenant-id headers", len(seen.Values("x-tenant-id")))
		}
		if seen.Get("authorization") != "" || seen.Get("x-api-key") != "" {
			t.Fatal("the credential reached the upstream")
		}
	}
	// A key without scopes: a client's own x-api-key-scopes must not pass either.
	bare := c.ok("", "keys", "create", "--tenant", "beta")[0]["credential"].(string)
	if code, _ := get("/v1/orders", map[string]string{"authorization": "Bearer " + bare, "x-api-key-scopes": "admin"}); code != 200 {
		t.Fatalf("key without scopes: %d", code)
	}
	if seen, _ := up.seen(); seen.Get("x-api-key-scopes") != "" || seen.Get("x-tenant-id") != "beta" {
		t.Fatalf("key without scopes: upstream saw scopes %q tenant %q", seen.Get("x-api-key-scopes"), seen.Get("x-tenant-id"))
	}
	// Route rules see the original URI the proxy forwards.
	if code, _ := get("/admin/users", map[string]string{"authorization": "Bearer " + cred}); code != 403 {
		t.Fatalf("/admin without the scope: %d, want 403", code)
	}
	// Public: no key needed, and a forged tenant is dropped.
	if code, _ := get("/public/logo.png", map[string]string{"x-tenant-id": "forged"}); code != 200 {
		t.Fatalf("public: %d", code)
	}
	if seen, _ := up.seen(); seen.Get("x-tenant-id") != "" {
		t.Fatalf("forged tenant %q reached the upstream on a public route", seen.Get("x-tenant-id"))
	}
	// Revoked: 401 again.
	c.ok("", "keys", "revoke", k["id"].(string))
	eventually(t, "revoke through the proxy", func() bool {
		code, _ := get("/v1/orders", map[string]string{"authorization": "Bearer " + cred})
		return code == 401
	})
}
