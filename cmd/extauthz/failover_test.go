package main

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"

	"github.com/extauthz/extauthz/internal/testsvc"
)

var redisLag = regexp.MustCompile(`(?m)^extauthz_invalidation_lag_seconds_count\{source="redis"\} (\d+)`)

// A Redis Cluster master is SIGKILLed: the one holding the invalidation
// channel's slot, so the subscription is on it too. What must hold: every
// check is answered; the shared tier keeps serving the other masters'
// keys at once (only the dead master's keys go to the store) and the dead
// master's keys once its replica has taken over; revocations made during
// and after the failover reach the replica, and so do bus messages after
// it.
func TestRedisClusterMasterKilled(t *testing.T) {
	rc := testsvc.NewRedisCluster(t)
	c := newCluster(t, false)
	c.env["EXTAUTHZ_REDIS_URL"], c.env["EXTAUTHZ_REDIS_MODE"], c.env["EXTAUTHZ_REDIS_PREFIX"] = rc.URL(), "cluster", "extauthz:"
	const n = 60
	creds := c.importTokens(n)
	// A process cache of one entry: every check of these keys asks the
	// shared tier, so what it serves shows in the store lookups.
	r := startReplica(t, withEnv(c.cli, "EXTAUTHZ_CACHE_SIZE", "1"))
	check := checker(t, r.srv)
	round := func() (lookups int) {
		t.Helper()
		before := metricValue(t, r, storeLookups)
		for _, cred := range creds {
			if code, ok := check(cred); code != codes.OK || !ok {
				t.Fatalf("check: %v, allowed %v; want every key allowed", code, ok)
			}
		}
		return metricValue(t, r, storeLookups) - before
	}
	round()
	time.Sleep(200 * time.Millisecond) // the write-backs land
	if l := round(); l != 0 {
		t.Fatalf("with every entry in Redis, %d store lookups, want 0", l)
	}

	ctx := context.Background()
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{rc.Nodes[0].Addr}})
	defer cc.Close()
	m, err := cc.MasterForKey(ctx, "extauthz:invalidate")
	if err != nil {
		t.Fatal(err)
	}
	dead := m.Options().Addr
	onDead := 0
	iter := m.Scan(ctx, 0, "extauthz:d:*", 1000).Iterator()
	for iter.Next(ctx) {
		onDead++
	}
	t.Logf("killing master %s, holding %d of %d entries and the channel's slot", dead, onDead, n)

	kill := time.Now()
	rc.Node(dead).Kill()
	revokedID, revoked := c.newKey("")
	if !r.allowed(revoked) {
		t.Fatal("fresh key denied")
	}
	var first, served time.Duration
	for i := 0; ; i++ {
		l := round()
		if i == 0 {
			first = time.Since(kill)
			t.Logf("first round after the kill (%v): %d store lookups for %d keys", first.Round(time.Millisecond), l, n)
			if l > onDead+n/10 {
				t.Errorf("first round after the kill: %d store lookups, want about the dead master's %d: the other masters' keys were not served from Redis", l, onDead)
			}
			// Revoked while the master is dead, before the failover.
			c.ok("", "keys", "revoke", revokedID)
			deniedEverywhere(t, time.Now(), revoked, r)
		}
		if l == 0 {
			served = time.Since(kill)
			break
		}
		if time.Since(kill) > 20*time.Second {
			nodes, _ := cc.ClusterNodes(ctx).Result()
			t.Fatalf("the dead master's keys not served from Redis 20s after the kill (%d store lookups a round)\n%s", l, nodes)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("every key served from Redis again %v after the kill", served.Round(time.Millisecond))

	// After the failover: a revocation reaches the replica, over the bus
	// too (the subscription moved off the dead node).
	id, cred := c.newKey("")
	if !r.allowed(cred) {
		t.Fatal("fresh key denied")
	}
	viaRedis := busMessages(t, r)
	c.ok("", "keys", "revoke", id)
	deniedEverywhere(t, time.Now(), cred, r)
	eventually3s(t, "a bus message after the failover", func() bool { return busMessages(t, r) > viaRedis })
	neverAllowed(t, "after the failover", revoked, r)
}

// busMessages is how many key changes r applied from the Redis bus.
func busMessages(t *testing.T, r *replica) int {
	t.Helper()
	_, body := httpGet(t, "http://"+r.srv.addrs.Admin+"/metrics")
	m := redisLag.FindStringSubmatch(body)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// Redis Sentinel: a failover that leaves the old master alive (SENTINEL
// FAILOVER: it is demoted) and then one that kills the master (SIGKILL).
// What must hold: every check is answered; bus messages published after
// the demotion reach the replica within a couple of seconds (the
// subscription follows the master; it stayed on the demoted one before);
// revocations made while the master is dead are applied (through the key
// store's watch at least).
func TestRedisSentinelFailover(t *testing.T) {
	rs := testsvc.NewRedisSentinel(t)
	c := newCluster(t, false)
	c.env["EXTAUTHZ_REDIS_URL"], c.env["EXTAUTHZ_REDIS_MODE"], c.env["EXTAUTHZ_REDIS_PREFIX"] = rs.URL(), "sentinel", "extauthz:"
	r := startReplica(t, c.cli)
	ctx := context.Background()
	var scs []*redis.SentinelClient
	for _, s := range rs.Sentinels {
		sc := redis.NewSentinelClient(&redis.Options{Addr: s.Addr})
		defer sc.Close()
		scs = append(scs, sc)
	}
	sc := scs[0]
	// Every sentinel names want as the master: the CLI asks any of them
	// where to publish.
	masterIs := func(want string) func() bool {
		return func() bool {
			for _, sc := range scs {
				a, err := sc.GetMasterAddrByName(ctx, "mymaster").Result()
				if err != nil || len(a) != 2 || a[0]+":"+a[1] != want {
					return false
				}
			}
			return true
		}
	}
	revokeOverBus := func(when string) {
		t.Helper()
		id, cred := c.newKey("")
		if !r.allowed(cred) {
			t.Fatal("fresh key denied")
		}
		before := busMessages(t, r)
		start := time.Now()
		c.ok("", "keys", "revoke", id)
		deniedEverywhere(t, start, cred, r)
		eventually3s(t, "a bus message "+when, func() bool { return busMessages(t, r) > before })
	}
	revokeOverBus("before any failover")

	if err := sc.Failover(ctx, "mymaster").Err(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	within(t, 10*time.Second, "the replica promoted", masterIs(rs.Replica.Addr))
	t.Logf("SENTINEL FAILOVER: replica promoted after %v", time.Since(start).Round(time.Millisecond))
	time.Sleep(time.Second) // the subscriber's next look at the sentinels
	revokeOverBus("after the demotion")

	// Now kill the new master: the old one is its replica by now.
	within(t, 10*time.Second, "the old master a replica", func() bool {
		rdb := redis.NewClient(&redis.Options{Addr: rs.Master.Addr})
		defer rdb.Close()
		info, _ := rdb.Info(ctx, "replication").Result()
		return strings.Contains(info, "master_link_status:up")
	})
	id, cred := c.newKey("")
	if !r.allowed(cred) {
		t.Fatal("fresh key denied")
	}
	rs.Replica.Kill()
	start = time.Now()
	c.ok("", "keys", "revoke", id) // Redis is down for the CLI too: it goes through Postgres
	deniedEverywhere(t, start, cred, r)
	within(t, 15*time.Second, "the old master promoted again", masterIs(rs.Master.Addr))
	t.Logf("SIGKILL: old master promoted again after %v", time.Since(start).Round(time.Millisecond))
	neverAllowed(t, "after the failover", cred, r)
	time.Sleep(time.Second)
	revokeOverBus("after the kill")
}
