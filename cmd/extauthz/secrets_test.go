package main

import (
	"strings"
	"testing"

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
