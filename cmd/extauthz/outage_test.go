package main

import (
	"context"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/extauthz/extauthz/internal/testsvc"
)

// checker returns a function giving the gRPC code of a check and whether
// it was allowed.
func checker(t *testing.T, srv *server) func(cred string) (codes.Code, bool) {
	authz, _ := srv.client(t)
	return func(cred string) (codes.Code, bool) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		r, err := authz.Check(ctx, checkReq(map[string]string{"x-api-key": cred}))
		if err != nil {
			return status.Code(err), false
		}
		return codes.OK, r.GetStatus().GetCode() == 0
	}
}

var redisErrors = regexp.MustCompile(`(?m)^extauthz_shared_cache_errors_total (\d+)`)

func TestRedisOutage(t *testing.T) {
	c := newCluster(t, true)
	proxy := testsvc.NewProxy(t, strings.TrimPrefix(strings.TrimSuffix(testsvc.RedisURL(), "/0"), "redis://"))
	c.env["EXTAUTHZ_REDIS_URL"] = "redis://" + proxy.Addr() + "/0"
	_, cached := c.newKey("")
	_, later := c.newKey("")
	r := startReplica(t, c.cli)
	check := checker(t, r.srv)
	if code, ok := check(cached); code != codes.OK || !ok {
		t.Fatal("not allowed before the outage")
	}

	proxy.Cut()
	// No check fails: cached keys from the process cache, others from the store.
	for range 50 {
		for _, cred := range []string{cached, later} {
			if code, ok := check(cred); code != codes.OK || !ok {
				t.Fatalf("with Redis down: code %v allowed %v", code, ok)
			}
		}
	}
	if metricValue(t, r, redisErrors) == 0 {
		t.Error("redis errors not counted")
	}
	// Revocations still arrive through Postgres.
	id, cred := c.newKey("")
	check(cred)
	c.sql(`UPDATE extauthz.keys SET revoked_at = now() WHERE id = $1`, id)
	deniedEverywhere(t, time.Now(), cred, r)

	proxy.Restore()
	// After reconnecting, the subscription drops nothing: the cached key is
	// answered from the process cache, without the store.
	eventually3s(t, "resubscribed", func() bool { return strings.Contains(r.srv.log.String(), "invalidation channel resubscribed") })
	lookups := metricValue(t, r, storeLookups)
	if code, ok := check(cached); code != codes.OK || !ok || metricValue(t, r, storeLookups) != lookups {
		t.Fatal("not allowed from the process cache after Redis came back")
	}
}

func TestPostgresOutage(t *testing.T) {
	c := newCluster(t, false)
	_, cached := c.newKey("")
	_, uncached := c.newKey("")
	// The server reaches Postgres through a proxy the test can cut.
	proxy := testsvc.NewProxy(t, "127.0.0.1:5432")
	env := map[string]string{}
	for k, v := range c.env {
		env[k] = v
	}
	env["EXTAUTHZ_STORE"] = proxiedDSN(t, c.dsn, proxy.Addr())
	env["EXTAUTHZ_CACHE_TTL"], env["EXTAUTHZ_NEGATIVE_TTL"], env["EXTAUTHZ_MAX_STALE"] = "1s", "1s", "10m"
	srv := startServer(t, &cli{t: t, env: env})
	check := checker(t, srv)
	eventually(t, "ready", func() bool { code, _ := httpGet(t, "http://"+srv.addrs.HTTP+"/readyz"); return code == 200 })
	if code, ok := check(cached); code != codes.OK || !ok {
		t.Fatal("not allowed before the outage")
	}

	proxy.Cut()
	if code, ok := check(cached); code != codes.OK || !ok {
		t.Fatalf("cached key, store down, within TTL: %v %v", code, ok)
	}
	time.Sleep(1100 * time.Millisecond) // past the 1s TTL: stale now
	if code, ok := check(cached); code != codes.OK || !ok {
		t.Fatalf("cached key, store down, past TTL within max stale: %v %v, want allow", code, ok)
	}
	start := time.Now()
	if code, _ := check(uncached); code != codes.Unavailable {
		t.Fatalf("uncached key, store down: %v, want UNAVAILABLE", code)
	}
	t.Logf("an uncached key with the store down is answered UNAVAILABLE in %v", time.Since(start).Round(time.Millisecond))
	// Malformed input is decided without the store.
	if code, ok := check("garbage!"); code != codes.OK || ok {
		t.Fatalf("malformed with store down: %v %v, want a clean deny", code, ok)
	}
	eventually3s(t, "readiness says degraded", func() bool {
		code, body := httpGet(t, "http://"+srv.addrs.HTTP+"/readyz")
		return code == 200 && strings.Contains(body, "degraded")
	})

	proxy.Restore()
	eventually3s(t, "recovery", func() bool { code, ok := check(uncached); return code == codes.OK && ok })
	eventually3s(t, "readiness ok", func() bool {
		_, body := httpGet(t, "http://"+srv.addrs.HTTP+"/readyz")
		return strings.HasPrefix(body, "ok")
	})
	// The LISTEN connection was lost too: after it is back, revocations arrive again.
	eventually3s(t, "listen reconnect", func() bool {
		return strings.Contains(srv.log.String(), "key change notifications resumed")
	})
	id := c.ok("", "keys", "list")[1]["id"].(string)
	c.ok("", "keys", "revoke", id)
	eventually3s(t, "revocation after reconnect", func() bool { _, ok := check(uncached); return !ok })
}

// A black-holed store: every store call must end at EXTAUTHZ_STORE_TIMEOUT,
// well inside Envoy's 200ms budget, and never hang a check.
func TestPostgresBlackHole(t *testing.T) {
	c := newCluster(t, false)
	_, uncached := c.newKey("")
	proxy := testsvc.NewProxy(t, "127.0.0.1:5432")
	env := map[string]string{"EXTAUTHZ_STORE": proxiedDSN(t, c.dsn, proxy.Addr()), "EXTAUTHZ_STORE_TIMEOUT": "100ms"}
	for k, v := range c.env {
		if _, set := env[k]; !set {
			env[k] = v
		}
	}
	srv := startServer(t, &cli{t: t, env: env})
	check := checker(t, srv)
	eventually(t, "ready", func() bool { code, _ := httpGet(t, "http://"+srv.addrs.HTTP+"/readyz"); return code == 200 })
	proxy.Stall()
	for range 3 {
		start := time.Now()
		code, _ := check(uncached)
		elapsed := time.Since(start)
		if code != codes.Unavailable {
			t.Fatalf("black-holed store: %v after %v, want UNAVAILABLE", code, elapsed)
		}
		t.Logf("UNAVAILABLE after %v", elapsed.Round(time.Millisecond))
	}
	// Shutdown is not held by connections to the unresponsive store.
	if code := srv.stop(); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if !strings.Contains(srv.log.String(), `"msg":"stopped"`) {
		t.Fatal("did not stop cleanly")
	}
	proxy.Restore()
}

func eventually3s(t *testing.T, what string, cond func() bool) {
	t.Helper()
	// 3 s is the bound these outage tests check; on a loaded machine only
	// the 10 s deadline of make test fails them (make propagation keeps 3 s).
	d := 10 * time.Second
	if os.Getenv("EXTAUTHZ_TEST_STRICT_PROPAGATION") != "" {
		d = 3 * time.Second
	}
	within(t, d, what, cond)
}

// SIGTERM under load: checks keep being answered while health is
// NOT_SERVING (the shutdown delay), in-flight checks finish, only new
// ones after the drain starts are refused, usage is written, exit 0.
func TestShutdownUnderLoad(t *testing.T) {
	c := newCluster(t, true)
	id, cred := c.newKey("")
	env := map[string]string{"EXTAUTHZ_SHUTDOWN_DELAY": "500ms"}
	for k, v := range c.env {
		env[k] = v
	}
	srv := startServer(t, &cli{t: t, env: env})
	authz, _ := srv.client(t)

	var ok, refused, other atomic.Int64
	var afterStop atomic.Int64 // allowed checks answered after SIGTERM
	var stopping atomic.Bool
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for {
				r, err := authz.Check(context.Background(), checkReq(map[string]string{"x-api-key": cred}))
				switch {
				case err == nil && r.GetStatus().GetCode() == 0:
					ok.Add(1)
					if stopping.Load() {
						afterStop.Add(1)
					}
				case status.Code(err) == codes.Unavailable && stopping.Load():
					refused.Add(1)
					return
				default:
					other.Add(1)
					t.Errorf("check failed: %v %v", r.GetStatus(), err)
					return
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	stopping.Store(true)
	code := srv.stop()
	wg.Wait()
	t.Logf("allowed %d (%d after SIGTERM), refused after the drain %d, failed %d", ok.Load(), afterStop.Load(), refused.Load(), other.Load())
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	if afterStop.Load() == 0 {
		t.Fatal("no check answered after SIGTERM: the shutdown delay did not keep serving")
	}
	var served int64
	for _, l := range c.ok("", "keys", "list") {
		if l["id"] == id {
			served = int64(l["request_count"].(float64))
		}
	}
	if served != ok.Load() {
		t.Fatalf("request_count %d, want the %d allowed checks", served, ok.Load())
	}
}
