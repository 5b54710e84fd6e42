package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"

	"github.com/extauthz/extauthz/internal/testsvc"
)

// These tests inject the faults of issue 10 around a revocation and assert
// SPEC §4: a revoked or deleted key is never allowed again by any replica
// later than the propagation deadline after the change committed, and a
// shared entry written before a change it missed is never adopted after
// it.

// withEnv returns a CLI like c with some settings changed.
func withEnv(c *cli, kv ...string) *cli {
	env := map[string]string{}
	for k, v := range c.env {
		env[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		env[kv[i]] = kv[i+1]
	}
	return &cli{t: c.t, env: env}
}

// saveShared copies every cached decision in the cluster's Redis and
// returns a function that puts the copies back: what a Redis failover to
// a replica that lagged does, or whoever can write to Redis.
func saveShared(t *testing.T, c *cluster) (restore func()) {
	t.Helper()
	o, err := redis.ParseURL(testsvc.RedisURL())
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(o)
	t.Cleanup(func() { rdb.Close() })
	ctx := context.Background()
	keys, err := rdb.Keys(ctx, c.env["EXTAUTHZ_REDIS_PREFIX"]+"d:*").Result()
	if err != nil || len(keys) == 0 {
		t.Fatalf("no shared entries to save: %v", err)
	}
	saved := map[string]string{}
	for _, k := range keys {
		saved[k] = rdb.Get(ctx, k).Val()
	}
	return func() {
		for k, v := range saved {
			if err := rdb.Set(ctx, k, v, time.Minute).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// neverAllowed checks cred on every replica for a while (past the
// negative TTL, so that checks reach the shared tier again) and fails at
// the first allow.
func neverAllowed(t *testing.T, what, cred string, rs ...*replica) {
	t.Helper()
	for end := time.Now().Add(2500 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		for _, r := range rs {
			if r.allowed(cred) {
				t.Fatalf("%s: allowed again on %s", what, r.srv.addrs.GRPC)
			}
		}
	}
}

// A key cached in Redis is revoked (CLI and SQL) while Redis is down: the
// deletes of its shared entries fail and the entries stay. When Redis
// returns, no replica adopts them: not the ones that heard of the
// revocation, not one started afterwards.
func TestRevokedDuringRedisOutageStaysRevoked(t *testing.T) {
	c := newCluster(t, true)
	proxy := testsvc.NewProxy(t, strings.TrimPrefix(strings.TrimSuffix(testsvc.RedisURL(), "/0"), "redis://"))
	c.env["EXTAUTHZ_REDIS_URL"] = "redis://" + proxy.Addr() + "/0"
	c.env["EXTAUTHZ_NEGATIVE_TTL"] = "500ms"
	idSQL, credSQL := c.newKey("")
	idCLI, credCLI := c.newKey("")
	r1, r2 := startReplica(t, c.cli), startReplica(t, c.cli)
	for _, cred := range []string{credSQL, credCLI} {
		for _, r := range []*replica{r1, r2, r1, r2} {
			if !r.allowed(cred) {
				t.Fatal("fresh key denied")
			}
		}
	}
	time.Sleep(100 * time.Millisecond) // the shared write-backs land
	restore := saveShared(t, c)

	proxy.Cut()
	start := time.Now()
	c.sql(`UPDATE extauthz.keys SET revoked_at = now() WHERE id = $1`, idSQL)
	c.ok("", "keys", "revoke", idCLI)
	deniedEverywhere(t, start, credSQL, r1, r2)
	deniedEverywhere(t, start, credCLI, r1, r2)
	proxy.Restore()

	r3 := startReplica(t, c.cli) // knows of the revocations only from the store's history
	for _, cred := range []string{credSQL, credCLI} {
		neverAllowed(t, "after Redis returned", cred, r1, r2, r3)
	}
	// A copy of the allows saved before the revocation, put back.
	restore()
	for _, cred := range []string{credSQL, credCLI} {
		neverAllowed(t, "replayed", cred, r1, r2, r3)
	}
}

// A half-open LISTEN connection (nothing closed, nothing delivered): a key
// revoked and another deleted in plain SQL are denied within the deadline
// all the same, from the heartbeat's detection and the catch-up.
func TestRevokedDuringListenFreeze(t *testing.T) {
	c := newCluster(t, true)
	revokedID, revoked := c.newKey("")
	deletedID, deleted := c.newKey("")
	proxy := testsvc.NewProxy(t, "127.0.0.1:5432")
	rc := withEnv(c.cli, "EXTAUTHZ_STORE", proxiedDSN(t, c.dsn, proxy.Addr()))
	r1, r2 := startReplica(t, rc), startReplica(t, rc)
	for _, cred := range []string{revoked, deleted} {
		for _, r := range []*replica{r1, r2, r1, r2} {
			if !r.allowed(cred) {
				t.Fatal("fresh key denied")
			}
		}
	}
	proxy.Freeze()
	start := time.Now()
	c.sql(`UPDATE extauthz.keys SET revoked_at = now() WHERE id = $1`, revokedID)
	c.sql(`DELETE FROM extauthz.keys WHERE id = $1`, deletedID)
	t.Logf("revoked: denied on both after %v", deniedEverywhere(t, start, revoked, r1, r2))
	t.Logf("deleted: denied on both after %v", deniedEverywhere(t, start, deleted, r1, r2))
	neverAllowed(t, "after the LISTEN connection was replaced", revoked, r1, r2)
	neverAllowed(t, "after the LISTEN connection was replaced", deleted, r1, r2)
}

// A key deleted in SQL while a replica's Postgres connections are cut: the
// replica serves its cached decisions meanwhile (SPEC §4's degraded mode),
// and once Postgres is back it catches up within the deadline, without
// dropping its other cached decisions or adopting the stale Redis entry.
func TestDeletedDuringListenOutage(t *testing.T) {
	c := newCluster(t, true)
	deletedID, deleted := c.newKey("")
	_, kept := c.newKey("")
	proxy := testsvc.NewProxy(t, "127.0.0.1:5432")
	rc := withEnv(c.cli, "EXTAUTHZ_STORE", proxiedDSN(t, c.dsn, proxy.Addr()), "EXTAUTHZ_NEGATIVE_TTL", "500ms")
	r := startReplica(t, rc)
	for _, cred := range []string{deleted, kept, deleted, kept} {
		if !r.allowed(cred) {
			t.Fatal("fresh key denied")
		}
	}
	proxy.Cut()
	c.sql(`DELETE FROM extauthz.keys WHERE id = $1`, deletedID)
	time.Sleep(1500 * time.Millisecond) // the heartbeat finds the connection dead; reconnects fail
	proxy.Restore()
	deniedEverywhere(t, time.Now(), deleted, r)
	neverAllowed(t, "after the catch-up", deleted, r)
	// The other key's cached decision survived the reconnect: it is
	// answered without the store.
	lookups := metricValue(t, r, storeLookups)
	if !r.allowed(kept) {
		t.Fatal("the other key denied")
	}
	if n := metricValue(t, r, storeLookups) - lookups; n != 0 {
		t.Fatalf("the other key needed %d store lookups after the reconnect: its cached decision was dropped", n)
	}
}

// TRUNCATE extauthz.keys: every key is gone, and no replica, running or
// started afterwards, adopts a shared entry written before it.
func TestTruncateIsNeverUndone(t *testing.T) {
	c := newCluster(t, true)
	c.env["EXTAUTHZ_NEGATIVE_TTL"] = "500ms"
	_, cred := c.newKey("")
	r1, r2 := startReplica(t, c.cli), startReplica(t, c.cli)
	for _, r := range []*replica{r1, r2, r1, r2} {
		if !r.allowed(cred) {
			t.Fatal("fresh key denied")
		}
	}
	time.Sleep(100 * time.Millisecond) // the shared write-backs land
	restore := saveShared(t, c)
	start := time.Now()
	c.sql(`TRUNCATE extauthz.keys`)
	deniedEverywhere(t, start, cred, r1, r2)
	// The replicas' lookups since have overwritten the allow in Redis with
	// a denial; a failover (or a Redis writer) brings the allow back.
	time.Sleep(100 * time.Millisecond) // the denials' write-backs land first
	restore()
	r3 := startReplica(t, c.cli)
	neverAllowed(t, "after TRUNCATE", cred, r1, r2, r3)
}

// Postgres down, then Redis down too, then Redis back first: the
// resubscription drops nothing, so every check of a cached key is still
// answered (issue 10 item 4: all of them failed for 2 s).
func TestRedisReturnsFirstWhilePostgresIsDown(t *testing.T) {
	c := newCluster(t, true)
	_, cred := c.newKey("")
	pg := testsvc.NewProxy(t, "127.0.0.1:5432")
	rp := testsvc.NewProxy(t, strings.TrimPrefix(strings.TrimSuffix(testsvc.RedisURL(), "/0"), "redis://"))
	r := startReplica(t, withEnv(c.cli, "EXTAUTHZ_STORE", proxiedDSN(t, c.dsn, pg.Addr()),
		"EXTAUTHZ_REDIS_URL", "redis://"+rp.Addr()+"/0"))
	check := checker(t, r.srv)
	if code, ok := check(cred); code != codes.OK || !ok {
		t.Fatal("fresh key denied")
	}
	pg.Cut()
	rp.Cut()
	rp.Restore()
	eventually3s(t, "resubscribed", func() bool { return strings.Contains(r.srv.log.String(), "invalidation channel resubscribed") })
	for range 200 {
		if code, ok := check(cred); code != codes.OK || !ok {
			t.Fatalf("cached key with Postgres down after Redis returned: %v, allowed %v", code, ok)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
