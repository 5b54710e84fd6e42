package rediscache

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/extauthz/extauthz/internal/testsvc"
	"github.com/extauthz/extauthz/internal/tokens"
)

// These tests play whoever can write to Redis (a shared instance, a leaked
// password, another application under the same ACL): they write and
// publish with plain commands, and real replicas must not be moved by it.

// keyStore serves one key, as the key store would.
type keyStore struct{ key *tokens.Key }

func (s keyStore) KeyByPublic(_ context.Context, pk string) (*tokens.Key, error) {
	if s.key != nil && s.key.PublicKey == pk {
		return s.key, nil
	}
	return nil, tokens.ErrNotFound
}

func (keyStore) KeyByDigest(context.Context, []tokens.Digest) (*tokens.Key, error) {
	return nil, tokens.ErrNotFound
}

func replica(t *testing.T, rdb redis.UniversalClient, prefix string, st tokens.Finder) *tokens.Authenticator {
	return tokens.NewAuthenticator(hasher(), st, tokens.Options{
		Shared: New(rdb, prefix), SharedSealer: sealer(prefix), SharedTimeout: time.Second,
		// Not the test's logger: shared-tier writes and deletes finish in
		// the background, and may log after a subtest has ended.
		TTL: time.Minute, Logger: zap.NewNop(),
	})
}

// waitValue polls key until cond holds for its value ("" when absent).
func waitValue(t *testing.T, rdb redis.UniversalClient, key string, what string, cond func(v string) bool) {
	t.Helper()
	for start := time.Now(); ; time.Sleep(5 * time.Millisecond) {
		v, err := rdb.Get(context.Background(), key).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			t.Fatal(err)
		}
		if cond(v) {
			return
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%s: not within 5s", what)
		}
	}
}

func TestForgedSharedEntriesAreRejected(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	ctx := ctx(t)
	h := hasher()
	victim, err := h.Issue(tokens.IssueParams{Tenant: "victim", Scopes: []string{"admin"}, Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	victimCred, _ := tokens.ParseCredential(victim.Credential)
	c := New(rdb, prefix)
	victimKey := c.entryKey(h.Digest(victim.Credential))

	// Replica 1 caches an honest allow of the victim's key in Redis.
	r1 := replica(t, rdb, prefix, keyStore{victim.Key})
	if _, err := r1.Authenticate(ctx, victimCred); err != nil {
		t.Fatal(err)
	}
	waitValue(t, rdb, victimKey, "replica 1's write-back", func(v string) bool { return v != "" })
	allow, _ := rdb.Get(ctx, victimKey).Result()
	// The same allow, as another deployment sharing this Redis (another
	// prefix, same pepper) caches it.
	otherPrefix := prefix + "other:"
	r3 := replica(t, rdb, otherPrefix, keyStore{victim.Key})
	if _, err := r3.Authenticate(ctx, victimCred); err != nil {
		t.Fatal(err)
	}
	otherKey := New(rdb, otherPrefix).entryKey(h.Digest(victim.Credential))
	waitValue(t, rdb, otherKey, "the other deployment's write-back", func(v string) bool { return v != "" })
	otherAllow, _ := rdb.Get(ctx, otherKey).Result()

	forged := func(w map[string]any) string { b, _ := json.Marshal(w); return string(b) }
	far := time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli()
	for _, tc := range []struct {
		name  string
		value func(deny string) string // deny: the honest denial of the token
	}{
		{"the old format's allow, until 2100", func(string) string {
			return forged(map[string]any{"o": 1, "k": victim.Key.ID, "t": "victim", "s": []string{"admin"}, "f": far, "x": far})
		}},
		{"CR/LF in the tenant", func(string) string {
			return forged(map[string]any{"o": 1, "k": victim.Key.ID, "t": "victim\r\nx-injected: 1", "f": far, "x": far})
		}},
		{"a 2 MB tenant", func(string) string {
			return forged(map[string]any{"o": 1, "k": victim.Key.ID, "t": strings.Repeat("t", 2<<20), "f": far, "x": far})
		}},
		{"the honest denial with its outcome flipped to allow", func(deny string) string {
			b := []byte(deny)
			b[1] = byte(tokens.OutcomeAllow)
			return string(b)
		}},
		{"the victim's honest allow copied to this digest", func(string) string { return allow }},
		{"the same credential's allow from another deployment's prefix", func(string) string { return otherAllow }},
		{"the honest denial cut short", func(deny string) string { return deny[:len(deny)-1] }},
		{"the honest denial with a byte appended", func(deny string) string { return deny + "x" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A token of this case's own: well formed, in no store. Replica
			// 1 caches its honest denial.
			invented, _ := tokens.GenerateToken()
			cred, _ := tokens.ParseCredential(invented)
			key := c.entryKey(h.Digest(invented))
			if _, err := r1.Authenticate(ctx, cred); !errors.Is(err, tokens.ErrUnknown) {
				t.Fatal(err)
			}
			waitValue(t, rdb, key, "replica 1's denial", func(v string) bool { return v != "" })
			deny, _ := rdb.Get(ctx, key).Result()
			value := tc.value(deny)
			if err := rdb.Set(ctx, key, value, time.Hour).Err(); err != nil {
				t.Fatal(err)
			}
			// Replica 2, with nothing cached, meets the forged entry.
			r2 := replica(t, rdb, prefix, keyStore{victim.Key})
			res, err := r2.Authenticate(ctx, cred)
			if !errors.Is(err, tokens.ErrUnknown) {
				t.Fatalf("forged entry: %+v, %v; want ErrUnknown from the store", res, err)
			}
			st := r2.Stats()
			if st.SharedRejected.Load() != 1 || st.StoreLookups.Load() != 1 || st.SharedErrors.Load() != 0 {
				t.Fatalf("rejected %d, store lookups %d, shared errors %d; want 1, 1, 0",
					st.SharedRejected.Load(), st.StoreLookups.Load(), st.SharedErrors.Load())
			}
			// It is gone: deleted (and replaced by replica 2's own denial).
			waitValue(t, rdb, key, "forged entry deleted", func(v string) bool { return v != value })
			// The victim's own key is untouched by all this.
			if res, err := r2.Authenticate(ctx, victimCred); err != nil || res.TenantID != "victim" {
				t.Fatalf("victim: %+v %v", res, err)
			}
		})
	}
}

func TestBusIgnoresForgedAndReplayedMessages(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	ctx := ctx(t)
	bus := NewBus(rdb, prefix, sealer(prefix), zaptest.NewLogger(t))
	got := make(chan tokens.Change, 100)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go bus.Subscribe(sctx, func(c tokens.Change) { got <- c })
	channel := prefix + "invalidate"
	for rdb.PubSubNumSub(ctx, channel).Val()[channel] == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	body := func(m message) []byte { b, _ := json.Marshal(m); return b }
	now := time.Now()
	real := sealer(prefix).SealMessage(body(message{KeyIDs: []string{"k1"}}), now)
	altered := []byte(string(real))
	altered[len(altered)-40] ^= 1
	for _, payload := range []any{
		"garbage",
		`{"all":true}`,
		`{"ids":["k1"],"sent":1}`,
		sealer(prefix+"other:").SealMessage(body(message{All: true}), now),              // another deployment's
		sealer(prefix).SealMessage(body(message{All: true}), now.Add(-2*MessageWindow)), // too old
		sealer(prefix).SealMessage(body(message{All: true}), now.Add(2*MessageWindow)),  // from the future
		sealer(prefix).SealMessage([]byte(`{"ids":["k1\r\nx"]}`), now),                  // sealed, invalid id
		altered,
		real,
		real, // replayed
		real, // and again
	} {
		if err := rdb.Publish(ctx, channel, payload).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := bus.Publish(ctx, tokens.Change{KeyIDs: []string{"fence"}}); err != nil {
		t.Fatal(err)
	}
	var applied []tokens.Change
	for len(applied) == 0 || applied[len(applied)-1].KeyIDs[0] != "fence" {
		select {
		case c := <-got:
			if c.All {
				t.Fatalf("applied %+v: a forged or replayed message flushed the caches", c)
			}
			applied = append(applied, c)
		case <-time.After(5 * time.Second):
			t.Fatalf("fence not received; applied %+v", applied)
		}
	}
	if len(applied) != 2 || applied[0].KeyIDs[0] != "k1" {
		t.Fatalf("applied %+v, want the real message once, then the fence", applied)
	}
	if n := bus.Rejected(); n != 10 {
		t.Fatalf("%d messages counted as rejected, want 10", n)
	}
}

// Whoever can write to Redis can set usage claims: that delays usage
// writes by an interval at most (tokens.UsageGate), and is all it can do.
func TestClaimsHeldByOthers(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	ctx := ctx(t)
	g := New(rdb, prefix)
	rdb.Set(ctx, prefix+"u:a", "forever", 0)
	rdb.LPush(ctx, prefix+"u:b", "not a string")
	won, err := g.Claim(ctx, []string{"a", "b", "c"}, time.Minute)
	if err != nil || won[0] || won[1] || !won[2] {
		t.Fatalf("claims: %v %v; want a and b lost, c won, no error", won, err)
	}
	var writes atomic.Int64
	r := tokens.NewUsageRecorder(usageFunc(func(us []tokens.Usage) { writes.Add(int64(len(us))) }), tokens.UsageOptions{Gate: g, Interval: time.Minute})
	r.Record("a")
	for range 2 {
		if err := r.Flush(ctx, false); err != nil {
			t.Fatal(err)
		}
	}
	if writes.Load() != 1 {
		t.Fatalf("a's usage written %d times after two flushes, want once (at the second)", writes.Load())
	}
}

type usageFunc func([]tokens.Usage)

func (f usageFunc) RecordUsage(_ context.Context, us []tokens.Usage) error { f(us); return nil }
