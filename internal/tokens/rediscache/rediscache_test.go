package rediscache

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/extauthz/extauthz/internal/testsvc"
	"github.com/extauthz/extauthz/internal/tokens"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func digest(s string) tokens.Digest { return sha256.Sum256([]byte(s)) }

var testPeppers = []tokens.Pepper{{ID: "p1", Secret: []byte(strings.Repeat("s", 32))}}

func hasher() *tokens.Hasher {
	h, err := tokens.NewHasher(testPeppers)
	if err != nil {
		panic(err)
	}
	return h
}

func sealer(prefix string) *tokens.SharedSealer { return hasher().SharedSealer(prefix) }

func TestGetSetDeleteForget(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	c := New(rdb, prefix)
	ctx := ctx(t)
	if v, err := c.Get(ctx, digest("a")); v != nil || err != nil {
		t.Fatalf("miss: %q %v", v, err)
	}
	for k, id := range map[string]string{"a1": "key-a", "a2": "key-a", "b": "key-b", "c": "key-c"} {
		if err := c.Set(ctx, digest(k), id, []byte("value "+k), time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	got, err := c.Get(ctx, digest("a1"))
	if err != nil || string(got) != "value a1" {
		t.Fatalf("round trip: %q %v", got, err)
	}
	// Forget finds every entry of a key through the index, and only those.
	if err := c.Forget(ctx, []string{"key-a"}); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"a1", "a2"} {
		if v, _ := c.Get(ctx, digest(k)); v != nil {
			t.Errorf("%s survived Forget", k)
		}
	}
	if v, _ := c.Get(ctx, digest("b")); v == nil {
		t.Error("other key's entry forgotten")
	}
	if n, _ := rdb.Exists(ctx, prefix+"k:key-a").Result(); n != 0 {
		t.Error("index survived Forget")
	}
	if err := c.Delete(ctx, digest("b")); err != nil {
		t.Fatal(err)
	}
	if v, _ := c.Get(ctx, digest("b")); v != nil {
		t.Error("b survived Delete")
	}
	// An index that names keys outside the entries of this prefix (whoever
	// can write to Redis added them) does not make Forget delete them.
	rdb.Set(ctx, prefix+"bystander", "x", time.Minute)
	rdb.SAdd(ctx, c.indexKey("key-c"), prefix+"bystander")
	if err := c.Forget(ctx, []string{"key-c"}); err != nil {
		t.Fatal(err)
	}
	if n, _ := rdb.Exists(ctx, prefix+"bystander", c.entryKey(digest("c"))).Result(); n != 1 {
		t.Errorf("after Forget %d of the bystander and c's entry exist, want the bystander only", n)
	}
}

func TestIndexOutlivesEntries(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	c := New(rdb, prefix)
	ctx := ctx(t)
	if err := c.Set(ctx, digest("long"), "k", []byte("v"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := c.Set(ctx, digest("short"), "k", []byte("v"), 5*time.Second); err != nil {
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

// A value no entry can be, read whole, would cost every replica its size
// on every miss; a key of another type is no entry either. Both are
// invalid (the authenticator rejects and deletes them), not an outage.
func TestUnreadableIsInvalid(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	c := New(rdb, prefix)
	ctx := ctx(t)
	rdb.Set(ctx, c.entryKey(digest("big")), strings.Repeat("x", 2<<20), time.Minute)
	rdb.LPush(ctx, c.entryKey(digest("list")), "x")
	for _, k := range []string{"big", "list"} {
		if v, err := c.Get(ctx, digest(k)); v != nil || !errors.Is(err, tokens.ErrSharedInvalid) {
			t.Errorf("%s: %d bytes, %v; want ErrSharedInvalid", k, len(v), err)
		}
	}
	rdb.Set(ctx, c.entryKey(digest("max")), strings.Repeat("x", maxEntry), time.Minute)
	if v, err := c.Get(ctx, digest("max")); len(v) != maxEntry || err != nil {
		t.Errorf("longest value: %d bytes, %v", len(v), err)
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
	// The bus's own client, named, so that killing its connection below
	// leaves other tests' subscriptions alone.
	o := *rdb.Options()
	o.ClientName = strings.ReplaceAll(prefix, ":", "-") + "bus"
	busClient := redis.NewClient(&o)
	defer busClient.Close()
	bus := NewBus(busClient, prefix, sealer(prefix), zaptest.NewLogger(t))
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
	// The changes' versions travel with them, for replicas cut off from
	// the key store; a message whose versions do not match its keys is
	// dropped.
	if err := bus.Publish(ctx, tokens.Change{KeyIDs: []string{"k3"}, Seqs: []int64{42}}); err != nil {
		t.Fatal(err)
	}
	if c := <-got; !slices.Equal(c.KeyIDs, []string{"k3"}) || !slices.Equal(c.Seqs, []int64{42}) {
		t.Fatalf("received %+v, want k3 at 42", c)
	}
	before := bus.Rejected()
	if err := bus.Publish(ctx, tokens.Change{KeyIDs: []string{"k4", "k5"}, Seqs: []int64{7}}); err != nil {
		t.Fatal(err)
	}
	for bus.Rejected() == before {
		time.Sleep(5 * time.Millisecond)
	}
	// A dropped connection: go-redis resubscribes, changes arrive again,
	// and nothing is reported that would drop a cache.
	clients, err := rdb.ClientList(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	killed := 0
	for _, line := range strings.Split(clients, "\n") {
		if strings.Contains(line, " name="+o.ClientName+" ") && strings.Contains(line, " sub=1 ") {
			id, _, _ := strings.Cut(strings.TrimPrefix(line, "id="), " ")
			if err := rdb.Do(ctx, "CLIENT", "KILL", "ID", id).Err(); err != nil {
				t.Fatal(err)
			}
			killed++
		}
	}
	if killed != 1 {
		t.Fatalf("killed %d subscriptions, want the bus's one", killed)
	}
	time.Sleep(50 * time.Millisecond) // let the kill land before counting subscribers
	for rdb.PubSubNumSub(ctx, prefix+"invalidate").Val()[prefix+"invalidate"] == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	if err := bus.Publish(ctx, tokens.Change{KeyIDs: []string{"k3"}}); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-got:
		if c.All || len(c.KeyIDs) != 1 || c.KeyIDs[0] != "k3" {
			t.Fatalf("after reconnect: %+v, want the change published, and no All", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no change received after the subscription was killed")
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
	// rediss:// in every mode: TLS 1.2 or later, and for sentinel and
	// cluster each connection verified against the host it dials, not the
	// URL's first host (a sentinel's certificate is not the master's).
	for _, tc := range []struct{ url, mode, serverName string }{
		{"rediss://u:p@redis.example:6380/0", ModeSingle, "redis.example"},
		{"rediss://s1.example:26379?master_name=m&addr=s2.example:26379", ModeSentinel, ""},
		{"rediss://n1.example:6379?addr=n2.example:6379", ModeCluster, ""},
	} {
		c, err := NewClient(tc.url, tc.mode)
		if err != nil {
			t.Fatalf("%s: %v", tc.url, err)
		}
		var tc2 *tls.Config
		switch c := c.(type) {
		case *redis.Client:
			tc2 = c.Options().TLSConfig
		case *redis.ClusterClient:
			tc2 = c.Options().TLSConfig
		}
		if tc2 == nil || tc2.ServerName != tc.serverName || tc2.MinVersion < tls.VersionTLS12 {
			t.Errorf("%s (%s): TLS config %+v, want server name %q and TLS 1.2+", tc.url, tc.mode, tc2, tc.serverName)
		}
		c.Close()
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

// The README's ACL (a user restricted to the prefix's keys and channel,
// and to the commands extauthz sends) is enough for everything a replica
// and the CLI do, and keeps them off every other key.
func TestACLUserSuffices(t *testing.T) {
	t.Parallel()
	admin, prefix := testsvc.NewRedis(t)
	ctx := ctx(t)
	user := "extauthz-test-" + strings.Trim(strings.ReplaceAll(prefix, ":", "-"), "-")
	rules := append([]any{"ACL", "SETUSER", user, "reset", "on", ">pw", "~" + prefix + "*", "&" + prefix + "*"}, aclCommands()...)
	if err := admin.Do(ctx, rules...).Err(); err != nil {
		t.Fatalf("ACL SETUSER: %v", err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), "ACL", "DELUSER", user) })
	o := *admin.Options()
	o.Username, o.Password = user, "pw"
	rdb := redis.NewClient(&o)
	defer rdb.Close()

	c, bus := New(rdb, prefix), NewBus(rdb, prefix, sealer(prefix), zaptest.NewLogger(t))
	got := make(chan tokens.Change, 1)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	subErr := make(chan error, 1)
	go func() { subErr <- bus.Subscribe(sctx, func(ch tokens.Change) { got <- ch }) }()
	for admin.PubSubNumSub(ctx, prefix+"invalidate").Val()[prefix+"invalidate"] == 0 {
		select {
		case err := <-subErr:
			t.Fatalf("subscribe: %v", err)
		case <-time.After(5 * time.Millisecond):
		}
	}
	steps := []struct {
		name string
		run  func() error
	}{
		{"set", func() error { return c.Set(ctx, digest("a"), "key-a", []byte("v"), time.Minute) }},
		{"get", func() error { _, err := c.Get(ctx, digest("a")); return err }},
		{"delete", func() error { return c.Delete(ctx, digest("a")) }},
		{"forget", func() error { return c.Forget(ctx, []string{"key-a"}) }},
		{"claim", func() error { _, err := c.Claim(ctx, []string{"key-a"}, time.Minute); return err }},
		{"publish", func() error { return bus.Publish(ctx, tokens.Change{KeyIDs: []string{"key-a"}}) }},
	}
	for _, s := range steps {
		if err := s.run(); err != nil {
			t.Fatalf("%s as the ACL user: %v", s.name, err)
		}
	}
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("published change not received")
	}
	if err := rdb.Set(ctx, "outside-the-prefix", "x", time.Second).Err(); err == nil || !strings.Contains(err.Error(), "NOPERM") {
		t.Fatalf("write outside the prefix: %v, want NOPERM", err)
	}
}

// aclCommands are the README's command rules for the extauthz user.
func aclCommands() []any {
	return []any{"-@all", "+getrange", "+set", "+del", "+sadd", "+sscan", "+expire", "+publish", "+subscribe",
		"+ping", "+hello", "+auth", "+client|setname", "+select", "+readonly", "+cluster|slots", "+cluster|shards"}
}

// A black-holed Redis (connections accepted, nothing answered) costs a
// call its context's deadline, not go-redis's 3 s read timeout: checks
// stay within Envoy's deadline and the change watch within a second.
func TestBlackHoleEndsAtTheDeadline(t *testing.T) {
	t.Parallel()
	_, prefix := testsvc.NewRedis(t)
	u, err := url.Parse(testsvc.RedisURL())
	if err != nil {
		t.Fatal(err)
	}
	proxy := testsvc.NewProxy(t, u.Host)
	u.Host = proxy.Addr()
	for _, mode := range []string{ModeSingle, ModeCluster} {
		rdb, err := NewClient(u.String(), mode)
		if err != nil {
			t.Fatal(err)
		}
		defer rdb.Close()
		if mode == ModeCluster {
			continue // needs a cluster to answer CLUSTER SLOTS; the option is set alike
		}
		c := New(rdb, prefix)
		proxy.Stall()
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		start := time.Now()
		_, err = c.Get(ctx, tokens.Digest{1})
		cancel()
		proxy.Restore()
		if err == nil {
			t.Fatalf("%s: a black-holed Get answered", mode)
		}
		// 2 s: what only a call that waits for the 3 s read timeout exceeds.
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s: a black-holed Get took %v with a 50ms deadline", mode, d)
		}
	}
}

// A subscription whose connection went half-open (frozen: nothing
// forwarded, nothing closed) is noticed by its silence and replaced, so a
// change published afterwards arrives; go-redis alone never notices.
func TestBusReplacesASilentSubscription(t *testing.T) {
	t.Parallel()
	rdb, prefix := testsvc.NewRedis(t)
	u, err := url.Parse(testsvc.RedisURL())
	if err != nil {
		t.Fatal(err)
	}
	proxy := testsvc.NewProxy(t, u.Host)
	u.Host = proxy.Addr()
	sub, err := NewClient(u.String(), ModeSingle)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	bus := NewBus(sub, prefix, sealer(prefix), zaptest.NewLogger(t))
	got := make(chan tokens.Change, 10)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() { bus.Subscribe(ctx, func(c tokens.Change) { got <- c }); close(done) }()
	defer func() { cancel(); <-done }()
	for rdb.PubSubNumSub(ctx, prefix+"invalidate").Val()[prefix+"invalidate"] == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	proxy.Freeze() // the subscription's connection: half-open from now on
	time.Sleep(silentAfter + 2*busBeat)
	// Published directly to Redis, as another replica or the CLI would.
	direct := NewBus(rdb, prefix, sealer(prefix), nil)
	deadline := time.After(10 * time.Second)
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case c := <-got:
			if len(c.KeyIDs) == 1 && c.KeyIDs[0] == "after-freeze" {
				return
			}
		case <-tick.C:
			direct.Publish(ctx, tokens.Change{KeyIDs: []string{"after-freeze"}})
		case <-deadline:
			t.Fatal("a change published after the freeze never arrived: the silent subscription was not replaced")
		}
	}
}
