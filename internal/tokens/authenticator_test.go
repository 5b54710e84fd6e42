package tokens

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/extauthz/extauthz/internal/racecheck"
)

var testPeppers = []Pepper{{ID: "p1", Secret: []byte(strings.Repeat("k", 32))}}

// fakeStore is an in-memory Finder that counts lookups and can fail or block.
type fakeStore struct {
	mu       sync.Mutex
	byPublic map[string]*Key
	byDigest map[Digest]*Key
	lookups  atomic.Int64
	fail     atomic.Bool
	gate     chan struct{} // when set, lookups wait for it
}

func newFakeStore() *fakeStore {
	return &fakeStore{byPublic: map[string]*Key{}, byDigest: map[Digest]*Key{}}
}

func (f *fakeStore) wait(ctx context.Context) error {
	f.lookups.Add(1)
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if f.fail.Load() {
		return errors.New("connection refused")
	}
	return nil
}

// Lookups read first and then wait at the gate, like a query whose row
// was read before a concurrent UPDATE committed.
func (f *fakeStore) KeyByPublic(ctx context.Context, pk string) (*Key, error) {
	f.mu.Lock()
	k := f.byPublic[pk]
	var c Key
	if k != nil {
		c = *k
	}
	f.mu.Unlock()
	if err := f.wait(ctx); err != nil {
		return nil, err
	}
	if k == nil {
		return nil, ErrNotFound
	}
	return &c, nil
}

func (f *fakeStore) KeyByDigest(ctx context.Context, ds []Digest) (*Key, error) {
	f.mu.Lock()
	var found *Key
	for _, d := range ds {
		if k := f.byDigest[d]; k != nil {
			c := *k
			found = &c
			break
		}
	}
	f.mu.Unlock()
	if err := f.wait(ctx); err != nil {
		return nil, err
	}
	if found == nil {
		return nil, ErrNotFound
	}
	return found, nil
}

func (f *fakeStore) update(fn func()) { f.mu.Lock(); fn(); f.mu.Unlock() }

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type fixture struct {
	a     *Authenticator
	store *fakeStore
	clock *fakeClock
	h     *Hasher
}

func newFixture(t *testing.T, o Options) *fixture {
	t.Helper()
	h, err := NewHasher(testPeppers)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{store: newFakeStore(), clock: &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}, h: h}
	o.Now = f.clock.Now
	f.a = NewAuthenticator(h, f.store, o)
	return f
}

// addPair stores a pair key for testPair and returns it.
func (f *fixture) addPair(id, tenant string, scopes ...string) *Key {
	d := f.h.Digest(testSecret)
	k := &Key{ID: id, TenantID: tenant, Kind: KindPair, PublicKey: testPublic, Digest: d[:], PepperID: "p1", Scopes: scopes}
	f.store.update(func() { f.store.byPublic[testPublic] = k })
	return k
}

func (f *fixture) addToken(id, tenant, token string) *Key {
	d := f.h.Digest(token)
	k := &Key{ID: id, TenantID: tenant, Kind: KindToken, Digest: d[:], PepperID: "p1"}
	f.store.update(func() { f.store.byDigest[d] = k })
	return k
}

func mustParse(t *testing.T, s string) Credential {
	t.Helper()
	c, err := ParseCredential(s)
	if err != nil {
		t.Fatalf("parse %q: %v", s[:6], err)
	}
	return c
}

func TestAuthenticatePair(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{})
	f.addPair("k1", "acme", "read", "write")
	res, err := f.a.Authenticate(context.Background(), mustParse(t, testPair))
	if err != nil {
		t.Fatalf("err = %v", err)
	}
	p := res.Principal
	if p.KeyID != "k1" || p.TenantID != "acme" || p.ScopesHeader != "read,write" {
		t.Fatalf("principal = %+v", p)
	}
	// Second check: cache hit, no store lookup.
	if _, err := f.a.Authenticate(context.Background(), mustParse(t, testPair)); err != nil {
		t.Fatal(err)
	}
	if n := f.store.lookups.Load(); n != 1 {
		t.Fatalf("store lookups = %d, want 1", n)
	}
	if f.a.Stats().CacheHits.Load() != 1 {
		t.Fatalf("cache hits = %d, want 1", f.a.Stats().CacheHits.Load())
	}
}

func TestAuthenticateDenials(t *testing.T) {
	t.Parallel()
	otherSecret := withChecksum("sk_" + strings.Repeat("c", secretRandLen))
	otherPublic := withChecksum("pk_" + strings.Repeat("Z", publicRandLen))
	cases := []struct {
		name    string
		setup   func(f *fixture)
		cred    string
		want    error
		wantKey string // key id reported with the denial
	}{
		{"unknown public key", func(f *fixture) {}, testPair, ErrUnknown, ""},
		{"wrong secret", func(f *fixture) { f.addPair("k1", "acme") }, testPublic + ":" + otherSecret, ErrUnknown, ""},
		{"halves of different keys", func(f *fixture) { f.addPair("k1", "acme") }, otherPublic + ":" + testSecret, ErrUnknown, ""},
		{"revoked", func(f *fixture) { f.addPair("k1", "acme").RevokedAt = f.clock.Now() }, testPair, ErrRevoked, "k1"},
		{"revoked, wrong secret says unknown", func(f *fixture) { f.addPair("k1", "acme").RevokedAt = f.clock.Now() }, testPublic + ":" + otherSecret, ErrUnknown, ""},
		{"expired", func(f *fixture) { f.addPair("k1", "acme").ExpiresAt = f.clock.Now() }, testPair, ErrExpired, "k1"},
		{"unknown token", func(f *fixture) {}, testToken, ErrUnknown, ""},
		{"token under unknown pepper", func(f *fixture) { f.addToken("t1", "acme", testToken).PepperID = "gone" }, testToken, ErrUnknown, ""},
		{"pair stored as token kind", func(f *fixture) { f.addPair("k1", "acme").Kind = KindToken }, testPair, ErrUnknown, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, Options{})
			tc.setup(f)
			res, err := f.a.Authenticate(context.Background(), mustParse(t, tc.cred))
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if res.ScopesHeader != "" || res.KeyID != tc.wantKey {
				t.Fatalf("result = %+v, want no principal and key %q", res, tc.wantKey)
			}
		})
	}
}

func TestAuthenticateToken(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{})
	f.addToken("t1", "acme", "legacy-token-123456")
	res, err := f.a.Authenticate(context.Background(), mustParse(t, "legacy-token-123456"))
	if err != nil || res.Principal.KeyID != "t1" {
		t.Fatalf("got %+v, %v", res, err)
	}
}

func TestPepperRotation(t *testing.T) {
	t.Parallel()
	old := Pepper{ID: "old", Secret: []byte(strings.Repeat("o", 32))}
	hOld, _ := NewHasher([]Pepper{old})
	// The key was created when "old" was current; now "new" is current.
	hNew, _ := NewHasher([]Pepper{{ID: "new", Secret: []byte(strings.Repeat("n", 32))}, old})
	store := newFakeStore()
	sd, td := hOld.Digest(testSecret), hOld.Digest(testToken)
	store.byPublic[testPublic] = &Key{ID: "k1", TenantID: "t", Kind: KindPair, PublicKey: testPublic, Digest: sd[:], PepperID: "old"}
	store.byDigest[td] = &Key{ID: "k2", TenantID: "t", Kind: KindToken, Digest: td[:], PepperID: "old"}
	a := NewAuthenticator(hNew, store, Options{})
	for _, cred := range []string{testPair, testToken} {
		if _, err := a.Authenticate(context.Background(), mustParse(t, cred)); err != nil {
			t.Errorf("%s: err = %v, want allow under the old pepper", cred[:3], err)
		}
	}
	// Once the old pepper is removed, its keys no longer verify.
	a2 := NewAuthenticator(mustHasher(t, Pepper{ID: "new", Secret: []byte(strings.Repeat("n", 32))}), store, Options{})
	if _, err := a2.Authenticate(context.Background(), mustParse(t, testPair)); !errors.Is(err, ErrUnknown) {
		t.Errorf("retired pepper: err = %v, want ErrUnknown", err)
	}
}

func mustHasher(t *testing.T, p ...Pepper) *Hasher {
	t.Helper()
	h, err := NewHasher(p)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestNegativeCacheAndTTLs(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{TTL: time.Minute, NegativeTTL: 10 * time.Second})
	ctx := context.Background()
	cred := mustParse(t, testPair)
	for range 5 {
		if _, err := f.a.Authenticate(ctx, cred); !errors.Is(err, ErrUnknown) {
			t.Fatalf("err = %v", err)
		}
	}
	if n := f.store.lookups.Load(); n != 1 {
		t.Fatalf("unknown key: %d store lookups, want 1 (negative cache)", n)
	}
	// The key appears; the denial is cached until the negative TTL ends.
	f.addPair("k1", "acme")
	if _, err := f.a.Authenticate(ctx, cred); !errors.Is(err, ErrUnknown) {
		t.Fatalf("within negative TTL: err = %v", err)
	}
	f.clock.Add(11 * time.Second)
	if _, err := f.a.Authenticate(ctx, cred); err != nil {
		t.Fatalf("after negative TTL: err = %v", err)
	}
	// Positive entries live for TTL.
	f.clock.Add(59 * time.Second)
	if _, err := f.a.Authenticate(ctx, cred); err != nil || f.store.lookups.Load() != 2 {
		t.Fatalf("within TTL: err = %v, lookups %d", err, f.store.lookups.Load())
	}
	f.clock.Add(2 * time.Second)
	if _, err := f.a.Authenticate(ctx, cred); err != nil || f.store.lookups.Load() != 3 {
		t.Fatalf("after TTL: err = %v, lookups %d, want 3", err, f.store.lookups.Load())
	}
}

// EXTAUTHZ_CACHE_SIZE=2 once served 5 distinct keys from the process
// cache: the size is a bound on what is held, not a per-shard hint.
func TestCacheSizeBoundsDistinctKeys(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{CacheSize: 2})
	ctx := context.Background()
	var creds []Credential
	for i := range 5 {
		tok, err := GenerateToken()
		if err != nil {
			t.Fatal(err)
		}
		f.addToken(fmt.Sprint("t", i), "acme", tok)
		creds = append(creds, mustParse(t, tok))
	}
	for range 3 {
		for _, c := range creds {
			if _, err := f.a.Authenticate(ctx, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := f.a.Cache().Len(); n > 2 {
		t.Fatalf("cache holds %d entries, want at most 2", n)
	}
	// Each round of 5 keys finds at most 2 of them cached.
	if hits := f.a.Stats().CacheHits.Load(); hits > 2*2 {
		t.Fatalf("%d cache hits over two rounds of 5 distinct keys, want at most 4", hits)
	}
}

func TestCachedAllowNeverOutlivesExpiry(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{TTL: time.Hour, MaxStale: time.Hour})
	k := f.addPair("k1", "acme")
	k.ExpiresAt = f.clock.Now().Add(30 * time.Second)
	cred := mustParse(t, testPair)
	if _, err := f.a.Authenticate(context.Background(), cred); err != nil {
		t.Fatal(err)
	}
	f.clock.Add(31 * time.Second)
	f.store.fail.Store(true) // not even stale serving may allow it now
	if _, err := f.a.Authenticate(context.Background(), cred); errors.Is(err, nil) || err == nil {
		t.Fatalf("expired key allowed from cache")
	}
	f.store.fail.Store(false)
	if _, err := f.a.Authenticate(context.Background(), cred); !errors.Is(err, ErrExpired) {
		t.Fatalf("err = %v, want ErrExpired", err)
	}
}

func TestSingleFlight(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{})
	f.addPair("k1", "acme")
	f.store.gate = make(chan struct{})
	cred := mustParse(t, testPair)
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			_, err := f.a.Authenticate(context.Background(), cred)
			errs <- err
		})
	}
	// Let every goroutine reach the flight before the store answers.
	for f.a.Stats().CacheMisses.Load() < n {
		time.Sleep(time.Millisecond)
	}
	close(f.store.gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := f.store.lookups.Load(); got != 1 {
		t.Fatalf("store lookups = %d, want 1", got)
	}
	if got := f.a.Stats().SharedLookups.Load(); got != n-1 {
		t.Fatalf("shared = %d, want %d", got, n-1)
	}
}

// A caller that missed the cache while another caller's flight was ending
// joins no flight: it starts its own, which must answer from what the
// first one cached instead of looking the key up again. Under load that
// window is real (TestSingleFlight hit it: 4 lookups for 200 callers).
func TestLateMissSharesFinishedLookup(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{})
	f.addPair("k1", "acme")
	cred := mustParse(t, testPair)
	if _, err := f.a.Authenticate(context.Background(), cred); err != nil {
		t.Fatal(err)
	}
	// The late caller's view: its cache read came before the first
	// flight stored its decision.
	res, err := f.a.miss(context.Background(), f.a.hasher.Digest(cred.raw), cred, nil, cacheMiss)
	if err != nil || res.Principal == (Principal{}) || res.TenantID != "acme" {
		t.Fatalf("late miss = %+v, %v; want acme allowed", res, err)
	}
	if got := f.store.lookups.Load(); got != 1 {
		t.Fatalf("store lookups = %d, want 1", got)
	}
	if got := f.a.Stats().SharedLookups.Load(); got != 1 {
		t.Fatalf("shared = %d, want 1", got)
	}
}

func TestCallerCancelDoesNotCancelSharedLookup(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{StoreTimeout: 5 * time.Second})
	f.addPair("k1", "acme")
	f.store.gate = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := f.a.Authenticate(ctx, mustParse(t, testPair))
		done <- err
	}()
	for f.store.lookups.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	close(f.store.gate)
	// The lookup finished for the cache: the next check is a hit.
	for f.a.Cache().Len() == 0 {
		time.Sleep(time.Millisecond)
	}
	if _, err := f.a.Authenticate(context.Background(), mustParse(t, testPair)); err != nil {
		t.Fatal(err)
	}
	if got := f.store.lookups.Load(); got != 1 {
		t.Fatalf("store lookups = %d, want 1", got)
	}
}

func TestStoreDown(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{TTL: time.Minute, MaxStale: 10 * time.Minute})
	f.addPair("k1", "acme")
	ctx := context.Background()
	cred := mustParse(t, testPair)
	if _, err := f.a.Authenticate(ctx, cred); err != nil {
		t.Fatal(err)
	}
	f.store.fail.Store(true)
	// Unknown credential, nothing cached: an outage, not a denial.
	_, err := f.a.Authenticate(ctx, mustParse(t, testToken))
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("uncached with store down: err = %v, want ErrUnavailable", err)
	}
	// Past TTL, within MaxStale: the cached allow is served.
	f.clock.Add(5 * time.Minute)
	if res, err := f.a.Authenticate(ctx, cred); err != nil || res.Principal == (Principal{}) {
		t.Fatalf("stale: %+v, %v, want allow", res, err)
	}
	if f.a.Stats().StaleServed.Load() != 1 {
		t.Fatal("stale serving not counted")
	}
	// Past MaxStale: outage.
	f.clock.Add(10 * time.Minute)
	if _, err := f.a.Authenticate(ctx, cred); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("past max stale: err = %v, want ErrUnavailable", err)
	}
	// Store back: decided again.
	f.store.fail.Store(false)
	if _, err := f.a.Authenticate(ctx, cred); err != nil {
		t.Fatal(err)
	}
}

func TestInvalidation(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{TTL: time.Hour})
	f.addPair("k1", "acme")
	f.addToken("t1", "other", testToken)
	ctx := context.Background()
	pair, tok := mustParse(t, testPair), mustParse(t, testToken)
	for _, c := range []Credential{pair, tok} {
		if _, err := f.a.Authenticate(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	// Revoke k1 in the store and invalidate it: the next check sees it.
	f.store.update(func() { f.store.byPublic[testPublic].RevokedAt = f.clock.Now() })
	if n := f.a.InvalidateKeys("k1"); n != 1 {
		t.Fatalf("invalidated %d entries, want 1", n)
	}
	if _, err := f.a.Authenticate(ctx, pair); !errors.Is(err, ErrRevoked) {
		t.Fatalf("after revoke: err = %v", err)
	}
	if _, err := f.a.Authenticate(ctx, tok); err != nil {
		t.Fatalf("other key affected: %v", err)
	}
	if n := f.a.InvalidateTenant("other"); n != 1 {
		t.Fatalf("tenant invalidation dropped %d, want 1", n)
	}
	if _, err := f.a.Authenticate(ctx, tok); err != nil {
		t.Fatal(err)
	}
	if n := f.a.InvalidateAll(); n != 2 {
		t.Fatalf("InvalidateAll dropped %d, want 2 (revoked k1 and t1)", n)
	}
}

func TestCacheHitDoesNotAllocate(t *testing.T) {
	if racecheck.Enabled {
		t.Skip("the race detector allocates; run without -race (make bench does)")
	}
	f := newFixture(t, Options{})
	f.addPair("k1", "acme")
	cred := mustParse(t, testPair)
	ctx := context.Background()
	if _, err := f.a.Authenticate(ctx, cred); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := f.a.Authenticate(ctx, cred); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("cache hit allocates %v times", allocs)
	}
}

func BenchmarkAuthenticateHit(b *testing.B) {
	h, _ := NewHasher(testPeppers)
	store := newFakeStore()
	d := h.Digest(testSecret)
	store.byPublic[testPublic] = &Key{ID: "k1", TenantID: "acme", Kind: KindPair, PublicKey: testPublic, Digest: d[:], PepperID: "p1"}
	a := NewAuthenticator(h, store, Options{})
	e := NewExtractor(DefaultSources)
	hdr := headers(map[string]string{"authorization": "Bearer " + testPair})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		c, _, err := e.Extract(hdr)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := a.Authenticate(ctx, c); err != nil {
			b.Fatal(err)
		}
	}
}

// Store lookups past MaxStoreLookups in flight are shed at once, as an
// outage (or a stale cached decision), never queued until their deadline;
// the bound frees as lookups finish.
func TestStoreLookupsBoundedAndShed(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{MaxStoreLookups: 2, StoreTimeout: time.Minute})
	gate := make(chan struct{})
	f.store.gate = gate
	junk := func(i int) Credential { return mustParse(t, fmt.Sprintf("legacy-token-%08d", i)) }
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() { f.a.Authenticate(context.Background(), junk(i)) })
	}
	for f.store.lookups.Load() < 2 {
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	_, err := f.a.Authenticate(context.Background(), junk(99))
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, ErrOverloaded) {
		t.Fatalf("third lookup with two in flight: %v, want shed (ErrOverloaded)", err)
	}
	// Shed at once: a real defect would wait for the gate (a minute).
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("shedding took %v", d)
	}
	if n := f.a.Stats().StoreShed.Load(); n != 1 {
		t.Errorf("StoreShed = %d, want 1", n)
	}
	close(gate)
	wg.Wait()
	if _, err := f.a.Authenticate(context.Background(), junk(100)); !errors.Is(err, ErrUnknown) {
		t.Errorf("after the lookups finished: %v, want a lookup (ErrUnknown)", err)
	}
}
