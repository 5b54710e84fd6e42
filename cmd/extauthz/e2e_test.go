package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
)

// syncBuffer is a log sink safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

type server struct {
	addrs boundAddrs
	log   *syncBuffer
	stop  func() int // SIGTERM; returns the exit code
}

// startServer runs `extauthz serve` in process on loopback ports.
func startServer(t *testing.T, c *cli) *server {
	t.Helper()
	return startServerEnv(t, c.env)
}

// startServerEnv is startServer for benchmarks too.
func startServerEnv(t testing.TB, cenv map[string]string) *server {
	t.Helper()
	envm := map[string]string{
		"EXTAUTHZ_GRPC_ADDR": "127.0.0.1:0", "EXTAUTHZ_HTTP_ADDR": "127.0.0.1:0", "EXTAUTHZ_ADMIN_ADDR": "127.0.0.1:0",
		"EXTAUTHZ_LOG_LEVEL": "debug", "EXTAUTHZ_USAGE_INTERVAL": "1h",
	}
	for k, v := range cenv {
		envm[k] = v
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &server{log: &syncBuffer{}}
	ready := make(chan boundAddrs, 1)
	done := make(chan int, 1)
	go func() {
		done <- realMain(ctx, []string{"serve"}, &env{
			stdin: strings.NewReader(""), stdout: io.Discard, stderr: s.log,
			lookup: lookupMap(envm), ready: func(a boundAddrs) { ready <- a },
		})
	}()
	select {
	case s.addrs = <-ready:
	case code := <-done:
		t.Fatalf("serve exited %d: %s", code, s.log)
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not start")
	}
	var once sync.Once
	code := 0
	s.stop = func() int {
		once.Do(func() { cancel(); code = <-done })
		return code
	}
	t.Cleanup(func() { s.stop() })
	return s
}

func (s *server) client(t *testing.T) (authv3.AuthorizationClient, healthpb.HealthClient) {
	t.Helper()
	conn, err := grpc.NewClient(s.addrs.GRPC, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return authv3.NewAuthorizationClient(conn), healthpb.NewHealthClient(conn)
}

func checkReq(h map[string]string) *authv3.CheckRequest {
	h[":path"], h[":method"], h[":authority"] = "/v1/orders", "GET", "api.example.com"
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
		Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/v1/orders", Host: "api.example.com", Headers: h},
	}}}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// eventually polls cond for up to a second: the revocation promise.
// eventually polls cond until it holds and returns how long that took,
// failing past propagationDeadline (5 s in make test, the product's 1 s
// bound under make propagation).
func eventually(t *testing.T, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	within(t, propagationDeadline(), what, cond)
	return time.Since(start)
}

func TestServeEndToEnd(t *testing.T) {
	for name, open := range stores(t) {
		t.Run(name, func(t *testing.T) {
			c := open(t)
			c.env["EXTAUTHZ_PPROF"] = "true"
			k := c.ok("", "keys", "create", "--tenant", "acme", "--scopes", "read")[0]
			gone := c.ok("", "keys", "create", "--tenant", "acme", "--kind", "token")[0]
			srv := startServer(t, c)
			authz, hc := srv.client(t)
			ctx := context.Background()

			eventually(t, "readiness", func() bool { code, _ := httpGet(t, "http://"+srv.addrs.HTTP+"/readyz"); return code == 200 })
			hr, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "envoy.service.auth.v3.Authorization"})
			if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("grpc health: %v %v", hr, err)
			}

			allowed := func(cred string) bool {
				r, err := authz.Check(ctx, checkReq(map[string]string{"authorization": "Bearer " + cred}))
				if err != nil {
					t.Fatalf("check: %v", err)
				}
				return r.GetStatus().GetCode() == 0
			}
			if !allowed(k["credential"].(string)) || !allowed(gone["credential"].(string)) {
				t.Fatal("fresh keys denied")
			}
			// The same decision over HTTP check mode.
			req, _ := http.NewRequest("GET", "http://"+srv.addrs.HTTP+"/check/v1/orders", nil)
			req.Header.Set("authorization", "Bearer "+k["credential"].(string))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 || resp.Header.Get("x-tenant-id") != "acme" {
				t.Fatalf("http check: %d tenant %q", resp.StatusCode, resp.Header.Get("x-tenant-id"))
			}
			// A key created after the server started works at once.
			late := c.ok("", "keys", "create", "--tenant", "beta")[0]
			eventually(t, "new key", func() bool { return allowed(late["credential"].(string)) })

			// Revoke and delete through the CLI (another process's view): the
			// server's cached allow must not survive a second.
			c.ok("", "keys", "revoke", k["id"].(string))
			lag := eventually(t, "revoke", func() bool { return !allowed(k["credential"].(string)) })
			c.ok("", "keys", "delete", gone["id"].(string))
			lag2 := eventually(t, "delete", func() bool { return !allowed(gone["credential"].(string)) })
			t.Logf("revoke seen after %v, delete after %v", lag, lag2)

			if code, _ := httpGet(t, "http://"+srv.addrs.Admin+"/debug/pprof/"); code != 200 {
				t.Errorf("pprof with EXTAUTHZ_PPROF=true: %d", code)
			}
			_, metrics := httpGet(t, "http://"+srv.addrs.Admin+"/metrics")
			for _, want := range []string{
				`extauthz_checks_total{reason="allowed",result="allow"}`, `extauthz_checks_total{reason="revoked",result="deny"}`,
				`extauthz_cache_lookups_total{result="hit"}`, "extauthz_check_duration_seconds_bucket", "extauthz_store_lookups_total",
				"extauthz_singleflight_shared_total", "extauthz_cache_invalidations_total",
				`extauthz_build_info{goversion="go`,
			} {
				if !strings.Contains(metrics, want) {
					t.Errorf("metrics lack %s", want)
				}
			}

			if code := srv.stop(); code != 0 {
				t.Fatalf("SIGTERM: exit %d", code)
			}
			// Usage is written at shutdown (the interval is an hour here).
			used := map[string]map[string]any{}
			for _, l := range c.ok("", "keys", "list") {
				used[l["id"].(string)] = l
			}
			for _, id := range []string{k["id"].(string), late["id"].(string)} {
				if n, _ := used[id]["request_count"].(float64); n < 1 || used[id]["last_used_at"] == nil {
					t.Errorf("key %s after shutdown: request_count %v, last_used_at %v", id, used[id]["request_count"], used[id]["last_used_at"])
				}
			}
			logs := srv.log.String()
			for _, secret := range []string{k["secret_key"].(string), gone["credential"].(string), late["credential"].(string)} {
				if strings.Contains(logs, secret[3:]) {
					t.Fatal("a secret reached the log")
				}
			}
			for _, want := range []string{`"msg":"denied"`, `"reason":"revoked"`, `"key_id":"` + k["id"].(string), "shutting down", `"msg":"stopped"`} {
				if !strings.Contains(logs, want) {
					t.Errorf("log lacks %s", want)
				}
			}
			if name == "embedded" && !strings.Contains(strings.SplitN(logs, "\n", 2)[0], "embedded default") {
				t.Errorf("first log line does not say embedded default: %s", strings.SplitN(logs, "\n", 2)[0])
			}
		})
	}
}

// Health flips to NOT_SERVING on SIGTERM while in-flight checks finish.
func TestServeShutdownHealth(t *testing.T) {
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(), "EXTAUTHZ_SHUTDOWN_DELAY": "300ms"}}
	srv := startServer(t, c)
	if code, _ := httpGet(t, "http://"+srv.addrs.Admin+"/debug/pprof/"); code != 404 {
		t.Errorf("pprof served by default: %d", code)
	}
	_, hc := srv.client(t)
	ctx := context.Background()
	stream, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: ""})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := stream.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("first status %v %v", r, err)
	}
	codec := make(chan int, 1)
	go func() { codec <- srv.stop() }()
	r, err := stream.Recv()
	if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("after SIGTERM: %v %v, want NOT_SERVING before the drain", r, err)
	}
	// The stream ends: an open Watch must not hold the drain until its timeout.
	for {
		r, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Fatalf("after NOT_SERVING: %v %v, want the stream to end", r, err)
		}
	}
	if code := <-codec; code != 0 {
		t.Fatalf("exit %d", code)
	}
}

// Every HTTP server bounds each connection's request: a client trickling
// a body it never finishes is cut off at the read timeout instead of
// holding the connection (here 200 ms; the deadline below is what only a
// missing timeout exceeds). The body is under net/http's 256 KiB, which
// it reads to discard after the handler; a larger one it would not wait
// for.
func TestHTTPServersCutTrickledBodies(t *testing.T) {
	t.Parallel()
	srv := boundedHTTPServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(200) }), 200*time.Millisecond, time.Second)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(func() { srv.Close() })
	conn, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "POST /check HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
	start := time.Now()
	for time.Since(start) < 20*time.Second {
		if _, err := conn.Write(make([]byte, 64)); err != nil {
			return // the server closed the connection
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("a trickled body held the connection for 20 s")
}

// The served limits: a message over EXTAUTHZ_MAX_REQUEST_BYTES or with more
// header lines than EXTAUTHZ_MAX_HEADERS is refused (RESOURCE_EXHAUSTED)
// without being decided; under both it is decided as usual.
func TestServeRequestLimits(t *testing.T) {
	t.Parallel()
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(), "EXTAUTHZ_MAX_REQUEST_BYTES": "32768", "EXTAUTHZ_MAX_HEADERS": "40"}}
	cred := c.ok("", "keys", "create", "--tenant", "acme")[0]["credential"].(string)
	client, _ := startServer(t, c).client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ok := map[string]string{"authorization": "Bearer " + cred, "x-big": strings.Repeat("a", 16<<10)}
	if r, err := client.Check(ctx, checkReq(ok)); err != nil || r.GetStatus().GetCode() != 0 {
		t.Fatalf("under the limits: %v %v", r.GetStatus(), err)
	}
	big := map[string]string{"authorization": "Bearer " + cred, "x-big": strings.Repeat("a", 40<<10)}
	if _, err := client.Check(ctx, checkReq(big)); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("40 KiB header, 32 KiB limit: %v, want RESOURCE_EXHAUSTED", err)
	}
	many := map[string]string{"authorization": "Bearer " + cred}
	for i := range 40 {
		many[fmt.Sprintf("x-h%d", i)] = "v"
	}
	if _, err := client.Check(ctx, checkReq(many)); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("44 headers, limit 40: %v, want RESOURCE_EXHAUSTED", err)
	}
}

// gRPC reflection is opt-in (EXTAUTHZ_GRPC_REFLECTION): off, the
// reflection service is unimplemented; on, it lists the Authorization and
// health services.
func TestGRPCReflection(t *testing.T) {
	t.Parallel()
	for _, on := range []bool{false, true} {
		c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(), "EXTAUTHZ_GRPC_REFLECTION": fmt.Sprint(on)}}
		srv := startServer(t, c)
		conn, err := grpc.NewClient(srv.addrs.GRPC, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
		if err == nil {
			err = stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
		}
		var resp *reflectionpb.ServerReflectionResponse
		if err == nil {
			resp, err = stream.Recv()
		}
		if !on {
			if status.Code(err) != codes.Unimplemented {
				t.Errorf("reflection off: %v, want UNIMPLEMENTED", err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("reflection on: %v", err)
		}
		var names []string
		for _, s := range resp.GetListServicesResponse().GetService() {
			names = append(names, s.GetName())
		}
		if !slices.Contains(names, "envoy.service.auth.v3.Authorization") || !slices.Contains(names, "grpc.health.v1.Health") {
			t.Errorf("reflection lists %v", names)
		}
	}
}

// The routes file is reloaded when it changes, without a restart; a
// version that does not parse keeps the rules in force and is logged.
func TestRoutesReloadOnChange(t *testing.T) {
	t.Parallel()
	routes := filepath.Join(t.TempDir(), "routes.json")
	write := func(body string) {
		t.Helper()
		// As a ConfigMap update does: a new file moved into place.
		tmp := routes + ".tmp"
		if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, routes); err != nil {
			t.Fatal(err)
		}
	}
	write(`{"routes":[{"path_prefix":"/admin","scopes":["admin"]}]}`)
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(), "EXTAUTHZ_ROUTES": routes}}
	cred := c.ok("", "keys", "create", "--tenant", "acme", "--scopes", "read")[0]["credential"].(string)
	srv := startServer(t, c)
	code := func() int {
		return httpStatus(t, "http://"+srv.addrs.HTTP+"/check/admin/users", map[string]string{"authorization": "Bearer " + cred})
	}
	if got := code(); got != 403 {
		t.Fatalf("before the change: %d, want 403", got)
	}
	write(`{"routes":[{"path_prefix":"/admin","scopes":["read"]}]}`)
	// Polled every second; 10 s is what only a reload that never comes exceeds.
	within(t, 10*time.Second, "the changed routes file in force", func() bool { return code() == 200 })
	write(`{"routes":[{"path_prefix":"/admin","scopes":["admin"]},]}`) // a trailing comma
	within(t, 10*time.Second, "the invalid file logged", func() bool { return strings.Contains(srv.log.String(), "routes file invalid") })
	if got := code(); got != 200 {
		t.Errorf("after an invalid file: %d, want the rules in force (200)", got)
	}
}

// httpStatus sends a GET with headers and returns the status.
func httpStatus(t *testing.T, url string, h map[string]string) int {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for k, v := range h {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// within polls cond every 5 ms (so that a measured lag is that precise)
// until it holds, failing after d.
func within(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
