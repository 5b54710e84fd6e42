package rediscache

import (
	"context"
	"crypto/sha256"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/redis/go-redis/v9"

	"github.com/extauthz/extauthz/internal/testsvc"
	"github.com/extauthz/extauthz/internal/tokens"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func digest(s string) tokens.Digest { return sha256.Sum256([]byte(s)) }

func entry(keyID string, ttl time.Duration) *tokens.SharedEntry {
	now := time.Now()
	return &tokens.SharedEntry{
		Outcome: tokens.OutcomeAllow, KeyID: keyID, TenantID: "acme", Scopes: []string{"read"},
		ExpiresAt: now.Add(time.Hour).Truncate(time.Millisecond), FreshUntil: now.Add(ttl / 2).Truncate(time.Millisecond),
		StaleUntil: now.Add(ttl).Truncate(time.Millisecond),
	}
}

func TestGetSetForget(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	c := New(rdb, prefix)
	ctx := ctx(t)
	if e, err := c.Get(ctx, digest("a")); e != nil || err != nil {
		t.Fatalf("miss: %v %v", e, err)
	}
	a1, a2, b := entry("key-a", time.Minute), entry("key-a", time.Minute), entry("key-b", time.Minute)
	a2.Outcome = tokens.OutcomeRevoked
	for k, e := range map[string]*tokens.SharedEntry{"a1": a1, "a2": a2, "b": b} {
		if err := c.Set(ctx, digest(k), e); err != nil {
			t.Fatal(err)
		}
	}
	got, err := c.Get(ctx, digest("a1"))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(a1, got, cmpopts.EquateApproxTime(time.Millisecond)); d != "" {
		t.Fatalf("round trip (-want +got):\n%s", d)
	}
	// Forget finds every entry of a key through the index, and only those.
	if err := c.Forget(ctx, []string{"key-a"}); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"a1", "a2"} {
		if e, _ := c.Get(ctx, digest(k)); e != nil {
			t.Errorf("%s survived Forget", k)
		}
	}
	if e, _ := c.Get(ctx, digest("b")); e == nil {
		t.Error("other key's entry forgotten")
	}
	if n, _ := rdb.Exists(ctx, prefix+"k:key-a").Result(); n != 0 {
		t.Error("index survived Forget")
	}
}

func TestIndexOutlivesEntries(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	c := New(rdb, prefix)
	ctx := ctx(t)
	if err := c.Set(ctx, digest("long"), entry("k", time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := c.Set(ctx, digest("short"), entry("k", 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	// Absolute expiry times, not PTTLs: two PTTL reads are taken at
	// different moments, and a slow second read looked like a short index.
	entryAt := rdb.PExpireTime(ctx, c.entryKey(digest("long"))).Val()
	indexAt := rdb.PExpireTime(ctx, c.indexKey("k")).Val()
	if indexAt < entryAt+time.Second {
		t.Fatalf("index expires %v after the entry, want at least 1s: a revocation could miss the entry", indexAt-entryAt)
	}
}

func TestUnreadableIsMiss(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	c := New(rdb, prefix)
	ctx := ctx(t)
	rdb.Set(ctx, c.entryKey(digest("x")), "not json", time.Minute)
	rdb.Set(ctx, c.entryKey(digest("y")), `{"o":99,"f":1,"x":1}`, time.Minute)
	for _, k := range []string{"x", "y"} {
		if e, err := c.Get(ctx, digest(k)); e != nil || err != nil {
			t.Errorf("%s: %v %v, want a miss", k, e, err)
		}
	}
}

func TestDownIsAnError(t *testing.T) {
	t.Parallel()
	c := New(redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1}), "x:")
	if _, err := c.Get(ctx(t), digest("a")); err == nil {
		t.Fatal("Get against a closed port succeeded")
	}
}

func TestBus(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	bus := NewBus(rdb, prefix)
	ctx := ctx(t)
	got := make(chan tokens.Change, 10)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go bus.Subscribe(sctx, func(c tokens.Change) { got <- c })
	// Wait for the subscription to exist.
	for rdb.PubSubNumSub(ctx, prefix+"invalidate").Val()[prefix+"invalidate"] == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	if err := bus.Publish(ctx, tokens.Change{KeyIDs: []string{"k1", "k2"}}); err != nil {
		t.Fatal(err)
	}
	c := <-got
	if d := cmp.Diff([]string{"k1", "k2"}, c.KeyIDs); d != "" || c.SentAt.IsZero() || c.Source != "redis" {
		t.Fatalf("received %+v", c)
	}
	// A dropped connection: after go-redis resubscribes, we hear "All".
	if err := rdb.Do(ctx, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-got:
		if !c.All {
			t.Fatalf("after reconnect: %+v, want All", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no All after the subscription was killed")
	}
}

func TestNewClientModes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		url, mode string
		ok        bool
	}{
		{"redis://localhost:6379/0", "", true},
		{"rediss://u:p@localhost:6380/1?dial_timeout=1s", ModeSingle, true},
		{"redis://localhost:26379?master_name=m&addr=localhost:26380", ModeSentinel, true},
		{"redis://localhost:26379", ModeSentinel, false},
		{"redis://n1:6379?addr=n2:6379&addr=n3:6379", ModeCluster, true},
		{"redis://localhost:6379?bogus=1", ModeSingle, false},
		{"redis://localhost:6379", "ring", false},
	} {
		c, err := NewClient(tc.url, tc.mode)
		if (err == nil) != tc.ok {
			t.Errorf("%s %s: err = %v", tc.url, tc.mode, err)
		}
		if c != nil {
			c.Close()
		}
	}
	_, err := NewClient("redis://user:hunter2@[bad", ModeSingle)
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("parse error %v must not echo the password", err)
	}
}

func TestUsageGateOneWinnerPerInterval(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	g := New(rdb, prefix)
	ctx := ctx(t)
	first, err := g.Claim(ctx, []string{"a", "b"}, time.Minute)
	if err != nil || !first[0] || !first[1] {
		t.Fatalf("first claim: %v %v", first, err)
	}
	second, err := g.Claim(ctx, []string{"a", "c"}, time.Minute)
	if err != nil || second[0] || !second[1] {
		t.Fatalf("second claim: %v %v, want a lost and c won", second, err)
	}
}
