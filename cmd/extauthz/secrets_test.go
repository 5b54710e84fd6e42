package main

import (
	"strings"
	"testing"
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
