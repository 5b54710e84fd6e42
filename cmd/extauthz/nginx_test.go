package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// nginxConf is the configuration users copy (README, "nginx"), with the
// addresses filled in. auth_request sends a subrequest to extauthz's fixed
// address with the original method, URI and host in the headers of the
// family extauthz reads ({{fam}}: X-Forwarded, the default, or X-Original
// with EXTAUTHZ_FORWARDED_HEADERS=x-original); proxy_set_header replaces
// a client's own copies of those. The tenant headers are copied into the
// proxied request; an empty value drops the header, so nothing forged
// gets through.
const nginxConf = `
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
      proxy_set_header Host             $host;         # the app sees the host the client asked for
      proxy_pass http://{{upstream}};
    }

    location = /_extauthz {
      internal;
      proxy_pass http://{{extauthz}}/check;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header {{fam}}-Method $request_method;
      proxy_set_header {{fam}}-Uri    $request_uri;
      proxy_set_header {{fam}}-Host   $host;
    }
  }
`

// nginxMain wraps a server block of the configs above in what every test
// nginx needs: in the foreground, its files in the test's directory.
const nginxMain = `
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
{{server}}}
`

// nginxStaticConf is an upstream that serves files the way nginx does:
// it decodes the path (%2F included) and resolves dot segments.
const nginxStaticConf = `
  server {
    listen {{listen}};
    root {{root}};
  }
`

// startNginx runs nginx with nginxConf in front of upstream.
func startNginx(t *testing.T, fam, extauthzHTTP, upstream string) string {
	t.Helper()
	return runNginx(t, nginxConf, "{{fam}}", fam, "{{upstream}}", upstream, "{{extauthz}}", extauthzHTTP)
}

// runNginx runs nginx in the foreground with the server block conf in
// nginxMain, its {{dir}} and {{listen}} filled in and the other pairs
// replaced; it returns the address nginx listens on.
func runNginx(t *testing.T, conf string, replace ...string) string {
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
	conf = strings.Replace(nginxMain, "{{server}}", conf, 1)
	conf = strings.NewReplacer(append([]string{"{{dir}}", dir, "{{listen}}", addr}, replace...)...).Replace(conf)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-e", filepath.Join(dir, "error.log"), "-p", dir, "-c", path)
	// The process writes from exec's copying goroutines while
	// waitListening may read: a locked buffer.
	var out syncBuffer
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
// It serves files as an upstream that decodes its path does (Go's
// net/http with path.Clean, Python's http.server, nginx): %2F, %5C and
// %2e%2e included, and path parameters dropped as Tomcat does.
type recorder struct {
	mu   sync.Mutex
	last http.Header
	hits int
}

// adminSecret is the body of the file only admin keys may read.
const adminSecret = "ADMIN-ONLY-REPORT"

func (r *recorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.last, r.hits = req.Header.Clone(), r.hits+1
	r.mu.Unlock()
	raw, _, _ := strings.Cut(req.RequestURI, "?")
	segs := strings.Split(raw, "/")
	for i, s := range segs {
		segs[i], _, _ = strings.Cut(s, ";") // path parameters, as Tomcat drops them
	}
	p, err := url.PathUnescape(strings.Join(segs, "/"))
	if err != nil {
		http.Error(w, "bad path", 400)
		return
	}
	switch path.Clean(strings.ReplaceAll(p, "\\", "/")) {
	case "/admin/report.txt":
		io.WriteString(w, adminSecret)
	default:
		io.WriteString(w, "upstream")
	}
}

func (r *recorder) seen() (http.Header, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last, r.hits
}

func TestNginxAuthRequest(t *testing.T) {
	for _, fam := range []string{"X-Forwarded", "X-Original"} {
		t.Run(fam, func(t *testing.T) { testForwardAuthProxy(t, fam, startNginx) })
	}
}

// testForwardAuthProxy runs extauthz's HTTP mode behind a real reverse
// proxy (started by start, given the forwarded-header family, extauthz's
// HTTP address and the upstream's) and checks what clients get and what
// the upstream sees, attacks included.
func testForwardAuthProxy(t *testing.T, fam string, start func(t *testing.T, fam, extauthzHTTP, upstream string) string) {
	routes := filepath.Join(t.TempDir(), "routes.json")
	os.WriteFile(routes, []byte(`{"routes":[{"path_prefix":"/admin","scopes":["admin"]},{"path_prefix":"/public","public":true}]}`), 0o600)
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(), "EXTAUTHZ_ROUTES": routes,
		"EXTAUTHZ_FORWARDED_HEADERS": strings.ToLower(fam)}}
	k := c.ok("", "keys", "create", "--tenant", "acme", "--scopes", "read")[0]
	cred := k["credential"].(string)
	srv := startServer(t, c)
	up := &recorder{}
	upstream := httptest.NewServer(up)
	defer upstream.Close()
	proxy := start(t, fam, srv.addrs.HTTP, strings.TrimPrefix(upstream.URL, "http://"))
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
	// Underscored names would reach WSGI and CGI apps as the identity
	// headers (x_tenant_id is HTTP_X_TENANT_ID): the proxy drops them.
	if code, _ := get("/v1/orders", map[string]string{"authorization": "Bearer " + cred, "x_tenant_id": "forged", "X_Api_Key_Scopes": "admin"}); code != 200 {
		t.Fatalf("with a key and underscored headers: %d", code)
	}
	if seen, _ := up.seen(); seen.Get("x-tenant-id") != "acme" {
		t.Fatalf("upstream saw tenant %q", seen.Get("x-tenant-id"))
	} else {
		for name := range seen {
			if strings.Contains(name, "_") {
				t.Errorf("upstream received %s: %q", name, seen[name])
			}
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
	attackForwardAuth(t, proxy, upstream.URL, cred, c.ok("", "keys", "create", "--tenant", "ops", "--scopes", "admin")[0]["credential"].(string))
	// Revoked: 401 again.
	c.ok("", "keys", "revoke", k["id"].(string))
	eventually(t, "revoke through the proxy", func() bool {
		code, _ := get("/v1/orders", map[string]string{"authorization": "Bearer " + cred})
		return code == 401
	})
}

// forgedOriginals are a client's own copies of both header families,
// naming a public route: the proxy must overwrite the family extauthz
// reads, and extauthz must never read the other.
var forgedOriginals = map[string]string{
	"X-Forwarded-Uri": "/public/x", "X-Forwarded-Method": "GET", "X-Forwarded-Host": "public.example.com",
	"X-Original-Uri": "/public/x", "X-Original-Method": "GET", "X-Original-Host": "public.example.com",
}

// rawPathAttacks are spellings of /admin/report.txt that a decoding
// upstream serves as that file.
var rawPathAttacks = []string{
	"/admin/report.txt", "/%61dmin/report.txt", "//admin/report.txt", "/x/../admin/report.txt",
	"/public/../admin/report.txt", "/public/%2e%2e/admin/report.txt", "/public/.%2E/admin/report.txt",
	"/public%2F..%2Fadmin%2Freport.txt", "/public/..%2Fadmin/report.txt", "/public/%2E%2E%2Fadmin%2Freport.txt",
	"/public/..%5Cadmin/report.txt", "/public/..;/admin/report.txt", "/public/%2e%2e;x/admin/report.txt",
	"/public/./../admin/./report.txt", "/public//..//admin/report.txt",
}

// attackForwardAuth sends, through a real proxy, requests that must not
// reach /admin/report.txt without a key holding the admin scope: forged
// forwarded headers of both families, and every raw spelling of the path,
// with no key and with a read-only one. adminKey proves the file is there.
func attackForwardAuth(t *testing.T, proxy, upstream, readKey, adminKey string) {
	t.Helper()
	// The upstream itself serves the file for each spelling: without
	// extauthz these attacks would work.
	for _, p := range rawPathAttacks {
		if code, body := rawGet(t, strings.TrimPrefix(upstream, "http://"), p, nil); code != 200 || body != adminSecret {
			t.Fatalf("control: the upstream does not serve %s as the admin file (%d %q)", p, code, body)
		}
	}
	if code, body := rawGet(t, proxy, "/admin/report.txt", map[string]string{"Authorization": "Bearer " + adminKey}); code != 200 || body != adminSecret {
		t.Fatalf("control: an admin key does not read the file through the proxy: %d %q", code, body)
	}
	for _, p := range append(rawPathAttacks, "/admin/users") {
		for name, h := range map[string]map[string]string{"no key": {}, "read-only key": {"Authorization": "Bearer " + readKey}} {
			for _, forge := range []bool{false, true} {
				hdr := map[string]string{}
				for k, v := range h {
					hdr[k] = v
				}
				if forge {
					for k, v := range forgedOriginals {
						hdr[k] = v
					}
				}
				code, body := rawGet(t, proxy, p, hdr)
				if code == 200 || strings.Contains(body, adminSecret) {
					t.Errorf("%s, %s, forged headers %v: %d %q: reached the admin route", p, name, forge, code, body)
				}
			}
		}
	}
	// The forged headers alone, on a private path.
	if code, _ := rawGet(t, proxy, "/v1/orders", forgedOriginals); code != 401 {
		t.Errorf("forged forwarded headers, no key: %d, want 401", code)
	}
	// An absolute-form request line names another path than its host part.
	if code, body := rawGet(t, proxy, "http://"+proxy+"/public/../admin/report.txt", nil); code == 200 || strings.Contains(body, adminSecret) {
		t.Errorf("absolute-form request line: %d %q", code, body)
	}
}

// rawGet sends a GET with target written exactly as given (no client-side
// cleaning or escaping) and returns the status and body.
func rawGet(t *testing.T, addr, target string, h map[string]string) (int, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n", target, addr)
	for k, v := range h {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(conn, b.String()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestNginxRawPathsToStaticFiles puts nginx's own file serving behind the
// README's nginx block: every spelling of /admin/report.txt that the file
// server resolves to that file must be denied without the admin scope.
func TestNginxRawPathsToStaticFiles(t *testing.T) {
	root := t.TempDir()
	// nginx's workers run as nobody when the test runs as root.
	os.Chmod(root, 0o755)
	os.Chmod(filepath.Dir(root), 0o755)
	for name, body := range map[string]string{"admin/report.txt": adminSecret, "public/index.txt": "public"} {
		os.MkdirAll(filepath.Join(root, filepath.Dir(name)), 0o755)
		if err := os.WriteFile(filepath.Join(root, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	static := runNginx(t, nginxStaticConf, "{{root}}", root)
	var served []string
	for _, p := range rawPathAttacks {
		if code, body := rawGet(t, static, p, nil); code == 200 && body == adminSecret {
			served = append(served, p)
		}
	}
	t.Logf("nginx serves the admin file for %d spellings: %v", len(served), served)
	if len(served) < 8 {
		t.Fatalf("control: nginx serves only %v as the admin file", served)
	}
	routes := filepath.Join(t.TempDir(), "routes.json")
	os.WriteFile(routes, []byte(`{"routes":[{"path_prefix":"/admin","scopes":["admin"]},{"path_prefix":"/public","public":true}]}`), 0o600)
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(), "EXTAUTHZ_ROUTES": routes}}
	read := c.ok("", "keys", "create", "--tenant", "acme", "--scopes", "read")[0]["credential"].(string)
	admin := c.ok("", "keys", "create", "--tenant", "ops", "--scopes", "admin")[0]["credential"].(string)
	srv := startServer(t, c)
	proxy := startNginx(t, "X-Forwarded", srv.addrs.HTTP, static)
	if code, body := rawGet(t, proxy, "/public/index.txt", nil); code != 200 || body != "public" {
		t.Fatalf("public file: %d %q", code, body)
	}
	if code, body := rawGet(t, proxy, "/admin/report.txt", map[string]string{"Authorization": "Bearer " + admin}); code != 200 || body != adminSecret {
		t.Fatalf("admin key: %d %q", code, body)
	}
	for _, p := range served {
		for _, h := range []map[string]string{nil, {"Authorization": "Bearer " + read}, forgedOriginals} {
			if code, body := rawGet(t, proxy, p, h); code == 200 || strings.Contains(body, adminSecret) {
				t.Errorf("%s with %v: %d, the admin file was served", p, h, code)
			}
		}
	}
}

// TestForwardAuthAddressWithTrailingSlash: a proxy configured to call
// /check/ instead of /check sends "GET /check/" with the original request
// in headers. Judging that request line would judge "GET /": it must deny
// everything instead, through real nginx and (when built) Caddy.
func TestForwardAuthAddressWithTrailingSlash(t *testing.T) {
	routes := filepath.Join(t.TempDir(), "routes.json")
	os.WriteFile(routes, []byte(`{"routes":[{"path_prefix":"/","public":true},{"path_prefix":"/admin","scopes":["admin"]}]}`), 0o600)
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(), "EXTAUTHZ_ROUTES": routes}}
	read := c.ok("", "keys", "create", "--tenant", "acme", "--scopes", "read")[0]["credential"].(string)
	srv := startServer(t, c)
	upstream := httptest.NewServer(&recorder{})
	defer upstream.Close()
	up := strings.TrimPrefix(upstream.URL, "http://")
	proxies := map[string]func() string{
		"nginx": func() string {
			conf := strings.Replace(nginxConf, "/check;", "/check/;", 1)
			return runNginx(t, conf, "{{fam}}", "X-Forwarded", "{{upstream}}", up, "{{extauthz}}", srv.addrs.HTTP)
		},
	}
	if bin := os.Getenv("EXTAUTHZ_TEST_CADDY"); bin != "" {
		proxies["caddy"] = func() string {
			return runCaddy(t, bin, strings.Replace(caddyfile, "uri /check\n", "uri /check/\n", 1), srv.addrs.HTTP, up)
		}
	}
	for name, start := range proxies {
		t.Run(name, func(t *testing.T) {
			proxy := start()
			for _, h := range []map[string]string{nil, {"Authorization": "Bearer " + read}} {
				if code, body := rawGet(t, proxy, "/admin/report.txt", h); code == 200 || strings.Contains(body, adminSecret) {
					t.Errorf("/admin/report.txt with %v through %s calling /check/: %d %q", h, name, code, body)
				}
			}
		})
	}
}
