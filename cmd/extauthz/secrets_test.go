package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/extauthz/extauthz/internal/testsvc"
)

// Attacks on what extauthz prints (issue 9, finding 4): secrets in the
// configuration must not reach the start-up log.

// A password in the Postgres DSN's query (which url.Redacted does not
// hide) and in the Redis URL was logged at start.
func TestServeNeverLogsURLSecrets(t *testing.T) {
	c := stores(t)["postgres"](t)
	const pgSecret, redisSecret = "s3cr3tQueryPW", "s3cr3tRedisPW"
	c.env["EXTAUTHZ_STORE"] += "&password=" + pgSecret // trust auth: ignored by the server
	// Nothing listens on port 1: the shared tier is down, which is logged.
	c.env["EXTAUTHZ_REDIS_URL"] = "redis://user:" + redisSecret + "@127.0.0.1:1/0"
	srv := startServer(t, c)
	eventually3s(t, "ready", func() bool { code, _ := httpGet(t, "http://"+srv.addrs.HTTP+"/readyz"); return code == 200 })
	if code := srv.stop(); code != 0 {
		t.Fatalf("exit %d: %s", code, srv.log)
	}
	logs := srv.log.String()
	if !strings.Contains(logs, `"store":"postgres://postgres@127.0.0.1:5432/`) || !strings.Contains(logs, "password=xxxxx") {
		t.Errorf("start-up line does not describe the store with the password masked:\n%s", logs)
	}
	for _, s := range []string{pgSecret, redisSecret} {
		if strings.Contains(logs, s) {
			t.Errorf("the log holds %s:\n%s", s, logs)
		}
	}
}

// /readyz showed pgx's error: the database user, name and host.
func TestReadinessHidesConnectionDetails(t *testing.T) {
	t.Parallel()
	dsn := testsvc.NewDatabase(t) // reachable, but not migrated
	cases := []struct {
		name, store, want string
		hidden            []string
	}{
		{"unreachable", "postgres://Wallace_user@127.0.0.1:1/Gromit_db?sslmode=disable", "unreachable", []string{"Wallace_user", "Gromit_db", "127.0.0.1"}},
		{"not migrated", dsn, "run: extauthz migrate", []string{"extauthz_test_", "127.0.0.1", "postgres"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := &cli{t: t, env: map[string]string{"EXTAUTHZ_STORE": tc.store, "EXTAUTHZ_HMAC_SECRETS": "k1:" + pepper32}}
			srv := startServer(t, c)
			var body string
			eventually3s(t, "readiness says why", func() bool {
				var code int
				code, body = httpGet(t, "http://"+srv.addrs.HTTP+"/readyz")
				return code == 503 && strings.Contains(body, tc.want)
			})
			for _, h := range tc.hidden {
				if strings.Contains(body, h) {
					t.Errorf("/readyz shows %q: %s", h, body)
				}
			}
			// The operator still finds the cause in the log.
			if !strings.Contains(srv.log.String(), `"msg":"readiness changed"`) || !strings.Contains(srv.log.String(), `"error":`) {
				t.Errorf("the log lacks the readiness error:\n%s", srv.log)
			}
		})
	}
}

// A real key sent where no credential is read (the path, a query,
// x-request-id, the host), over HTTP and gRPC, allowed or denied, never
// reaches the log.
func TestServeNeverLogsKeysFromTheRequest(t *testing.T) {
	t.Parallel()
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir()}}
	k := c.ok("", "keys", "create", "--tenant", "acme")[0]
	tk := c.ok("", "keys", "create", "--tenant", "acme", "--kind", "token")[0]
	pair, token := k["credential"].(string), tk["credential"].(string)
	srv := startServer(t, c) // at debug: allows are logged too
	hc := &http.Client{}
	send := func(path string, h map[string]string) {
		t.Helper()
		req, err := http.NewRequest("GET", "http://"+srv.addrs.HTTP+"/check"+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range h {
			req.Header.Set(k, v)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	pathEsc := url.PathEscape(pair)
	send("/v1/"+pair+"/orders", nil)
	send("/v1/"+pathEsc+"?api_key="+pair, nil)
	send("/v1/%74"+token[1:], nil) // %74 is t
	send("/v1/orders", map[string]string{"x-request-id": "Bearer " + token})
	send("/v1/orders", map[string]string{"x-request-id": pair, "authorization": "Bearer " + pair}) // allowed
	send("/v1/"+token, map[string]string{"x-api-key": token})                                      // allowed
	// Forward-auth mode: the original request in forwarded headers.
	send("", map[string]string{"x-forwarded-uri": "/v1/" + pair, "x-forwarded-host": token + ".example.com", "x-forwarded-method": token,
		"x-original-uri": "/" + token, "x-original-method": pair})
	authz, _ := srv.client(t)
	for _, h := range []map[string]string{
		{"x-request-id": token},
		{"x-request-id": "id:" + pair, "authorization": "Bearer " + pair},
	} {
		r := checkReq(h)
		r.Attributes.Request.Http.Path = "/v1/" + token + "/x"
		r.Attributes.Request.Http.Host = pair
		if _, err := authz.Check(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	if code := srv.stop(); code != 0 {
		t.Fatalf("exit %d", code)
	}
	logs := srv.log.String()
	if n := strings.Count(logs, `"msg":"allowed"`); n < 3 {
		t.Fatalf("%d allows logged, want 3 at least:\n%s", n, logs)
	}
	for _, s := range []string{pair[3:strings.IndexByte(pair, ':')], pair[strings.IndexByte(pair, ':')+4:], token[3:]} {
		if strings.Contains(logs, s) {
			t.Fatalf("a credential reached the log:\n%s", logs)
		}
	}
}

// A flood of 3,000 requests with 16 KiB paths wrote 41 MiB of log.
func TestLogFloodOfLongPathsIsBounded(t *testing.T) {
	t.Parallel()
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir()}}
	srv := startServer(t, c)
	hc := &http.Client{}
	long := "/" + strings.Repeat("a", 16<<10)
	for i := range 3000 {
		req, err := http.NewRequest("GET", "http://"+srv.addrs.HTTP+"/check"+long, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("x-request-id", strings.Repeat("r", 4<<10))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	srv.stop()
	logs := srv.log.String()
	lines := strings.Split(strings.TrimSpace(logs), "\n")
	for _, l := range lines {
		if len(l) > 1<<10 {
			t.Fatalf("a log line of %d bytes: %.200s...", len(l), l)
		}
	}
	// Even unsampled, 3,000 lines of at most 1 KiB.
	if len(logs) > 3000<<10 {
		t.Fatalf("%d bytes of log", len(logs))
	}
	t.Logf("3,000 requests with 16 KiB paths and 4 KiB request ids: %d log lines, %d bytes", len(lines), len(logs))
}

// An HTTP check whose request line Go cannot parse (GET /check/%) got a
// connection reset when the client was still sending: now a 400 with the
// malformed_path deny body, and a graceful close, on a raw connection.
func TestHTTPUnparsableRequestLine(t *testing.T) {
	t.Parallel()
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir()}}
	srv := startServer(t, c)
	good := "GET /check/v1/orders HTTP/1.1\r\nHost: api\r\n\r\n"
	for _, tc := range []struct {
		name  string
		parts []string
		want  []int // statuses, in order
	}{
		{"in one write", []string{"GET /check/% HTTP/1.1\r\nHost: api\r\n\r\n"}, []int{400}},
		{"headers still coming", []string{"GET /check/% HTTP/1.1\r\n", "Host: api\r\n", "x-request-id: 1\r\n\r\n"}, []int{400}},
		{"invalid escape", []string{"GET /check/v1/%zz/orders HTTP/1.1\r\n", "Host: api\r\n\r\n"}, []int{400}},
		{"control byte", []string{"GET /check/v1/\x01 HTTP/1.1\r\n", "Host: api\r\n\r\n"}, []int{400}},
		{"a body still coming", []string{"POST /check/% HTTP/1.1\r\nHost: api\r\nContent-Length: 100000\r\n\r\n", strings.Repeat("x", 100000)}, []int{400}},
		{"after a good request on the same connection", []string{good, "GET /check/% HTTP/1.1\r\n", "Host: api\r\n\r\n"}, []int{401, 400}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			conn, err := net.Dial("tcp", srv.addrs.HTTP)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			for _, p := range tc.parts {
				if _, err := io.WriteString(conn, p); err != nil {
					t.Fatalf("write: %v (the server reset the connection)", err)
				}
				time.Sleep(20 * time.Millisecond) // let the server answer before the rest arrives
			}
			raw, err := io.ReadAll(conn)
			if err != nil {
				t.Fatalf("read: %v after %q", err, raw)
			}
			br := bufio.NewReader(bytes.NewReader(raw))
			for i, want := range tc.want {
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("response %d: %v in %q", i, err, raw)
				}
				body, _ := io.ReadAll(resp.Body)
				if resp.StatusCode != want {
					t.Fatalf("response %d: %d %s, want %d", i, resp.StatusCode, body, want)
				}
				if want == 400 && (string(body) != `{"error":"bad_request","reason":"malformed_path"}` || resp.Header.Get("content-type") != "application/json") {
					t.Errorf("400 with %s %q", resp.Header.Get("content-type"), body)
				}
			}
		})
	}
}
