package tokens

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeShared is an in-memory SharedCache that can fail.
type fakeShared struct {
	mu      sync.Mutex
	m       map[Digest]fakeEntry
	fail    atomic.Bool
	calls   atomic.Int64
	sets    chan struct{} // signalled after each Set
	forgets atomic.Int64
	deletes chan Digest // receives each Delete
}

type fakeEntry struct {
	keyID string
	v     []byte
}

func newFakeShared() *fakeShared {
	return &fakeShared{m: map[Digest]fakeEntry{}, sets: make(chan struct{}, 100), deletes: make(chan Digest, 100)}
}

func (f *fakeShared) Get(_ context.Context, k Digest) ([]byte, error) {
	f.calls.Add(1)
	if f.fail.Load() {
		return nil, errors.New("redis down")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.m[k].v, nil
}

func (f *fakeShared) Set(_ context.Context, k Digest, keyID string, v []byte, _ time.Duration) error {
	f.calls.Add(1)
	defer func() { f.sets <- struct{}{} }()
	if f.fail.Load() {
		return errors.New("redis down")
	}
	f.put(k, keyID, v)
	return nil
}

// put writes v as whoever can write to Redis would.
func (f *fakeShared) put(k Digest, keyID string, v []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.m[k] = fakeEntry{keyID, v}
}

func (f *fakeShared) Delete(_ context.Context, k Digest) error {
	f.mu.Lock()
	delete(f.m, k)
	f.mu.Unlock()
	f.deletes <- k
	return nil
}

func (f *fakeShared) Forget(_ context.Context, ids []string) error {
	f.forgets.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	for k, e := range f.m {
		for _, id := range ids {
			if e.keyID == id {
				delete(f.m, k)
			}
		}
	}
	return nil
}

func (f *fakeShared) len() int { f.mu.Lock(); defer f.mu.Unlock(); return len(f.m) }

func waitSet(t *testing.T, f *fakeShared) {
	t.Helper()
	select {
	case <-f.sets:
	case <-time.After(5 * time.Second):
		t.Fatal("no shared Set")
	}
}

// Two replicas share one tier: the second answers from it without the store.
func TestSharedTierBetweenReplicas(t *testing.T) {
	t.Parallel()
	shared := newFakeShared()
	f1 := newFixture(t, Options{Shared: shared, TTL: time.Minute})
	f1.addPair("k1", "acme", "read")
	cred := mustParse(t, testPair)
	if _, err := f1.a.Authenticate(context.Background(), cred); err != nil {
		t.Fatal(err)
	}
	waitSet(t, shared)
	// Replica 2: same store contents would answer too, but it must not be asked.
	a2 := NewAuthenticator(f1.h, failingStore{}, Options{Shared: shared, Now: f1.clock.Now})
	res, err := a2.Authenticate(context.Background(), cred)
	if err != nil || res.Principal == (Principal{}) || res.Principal.ScopesHeader != "read" {
		t.Fatalf("replica 2: %+v %v, want an allow from the shared tier", res, err)
	}
	if a2.Stats().SharedHits.Load() != 1 || a2.Stats().StoreLookups.Load() != 0 {
		t.Fatalf("shared hits %d, store lookups %d", a2.Stats().SharedHits.Load(), a2.Stats().StoreLookups.Load())
	}
}

// failingStore is a key store that is down.
type failingStore struct{}

func (failingStore) KeyByPublic(context.Context, string) (*Key, error) {
	return nil, errors.New("connection refused")
}

func (failingStore) KeyByDigest(context.Context, []Digest) (*Key, error) {
	return nil, errors.New("connection refused")
}

func TestSharedDownNeverFailsACheck(t *testing.T) {
	t.Parallel()
	shared := newFakeShared()
	shared.fail.Store(true)
	f := newFixture(t, Options{Shared: shared, SharedRetry: time.Second, NegativeTTL: time.Second, TTL: time.Second})
	f.addPair("k1", "acme")
	if _, err := f.a.Authenticate(context.Background(), mustParse(t, testPair)); err != nil {
		t.Fatalf("redis down: %v, want an answer from the store", err)
	}
	calls := shared.calls.Load()
	// Within the retry window the tier is not asked again.
	f.clock.Add(1500 * time.Millisecond / 2)
	if _, err := f.a.Authenticate(context.Background(), mustParse(t, testToken)); !errors.Is(err, ErrUnknown) {
		t.Fatal(err)
	}
	if shared.calls.Load() != calls {
		t.Fatalf("shared tier asked %d more times within the retry window", shared.calls.Load()-calls)
	}
	if f.a.Stats().SharedSkipped.Load() == 0 || f.a.Stats().SharedErrors.Load() == 0 {
		t.Fatal("errors and skips not counted")
	}
	// After it, it is tried again (and, back up, used).
	shared.fail.Store(false)
	f.clock.Add(time.Second)
	if _, err := f.a.Authenticate(context.Background(), mustParse(t, testPair)); err != nil {
		t.Fatal(err)
	}
	if shared.calls.Load() == calls {
		t.Fatal("shared tier not retried after the window")
	}
}

func TestStaleSharedEntryServesWhenStoreDown(t *testing.T) {
	t.Parallel()
	shared := newFakeShared()
	f := newFixture(t, Options{Shared: shared, TTL: time.Minute, MaxStale: 10 * time.Minute})
	f.addPair("k1", "acme")
	cred := mustParse(t, testPair)
	if _, err := f.a.Authenticate(context.Background(), cred); err != nil {
		t.Fatal(err)
	}
	waitSet(t, shared)
	// A fresh replica, store down, entry past TTL but within MaxStale.
	f.clock.Add(5 * time.Minute)
	a2 := NewAuthenticator(f.h, failingStore{}, Options{Shared: shared, Now: f.clock.Now, TTL: time.Minute, MaxStale: 10 * time.Minute})
	if res, err := a2.Authenticate(context.Background(), cred); err != nil || res.Principal == (Principal{}) {
		t.Fatalf("stale shared entry: %+v %v, want allow", res, err)
	}
	f.clock.Add(10 * time.Minute)
	if _, err := a2.Authenticate(context.Background(), cred); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("past max stale: %v, want ErrUnavailable", err)
	}
}

// A lookup that overlaps an invalidation of its key must not leave its
// (possibly pre-revocation) answer cached anywhere.
func TestInvalidationDuringLookupIsNotCached(t *testing.T) {
	t.Parallel()
	shared := newFakeShared()
	f := newFixture(t, Options{Shared: shared, TTL: time.Hour})
	f.addPair("k1", "acme")
	f.store.gate = make(chan struct{})
	cred := mustParse(t, testPair)
	done := make(chan error)
	go func() {
		_, err := f.a.Authenticate(context.Background(), cred)
		done <- err
	}()
	for f.store.lookups.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	// The store has read the key (still active); now it is revoked and the
	// invalidation arrives before the lookup finishes.
	f.store.update(func() { f.store.byPublic[testPublic].RevokedAt = f.clock.Now() })
	f.a.Apply(context.Background(), Change{KeyIDs: []string{"k1"}})
	close(f.store.gate)
	// The in-flight answer is the one read before the revocation ...
	if err := <-done; err != nil {
		t.Fatalf("in-flight answer: %v, want the allow read before the revocation", err)
	}
	// ... but it is cached nowhere.
	if f.a.Cache().Len() != 0 || shared.len() != 0 {
		t.Fatalf("overlapping lookup cached: process %d, shared %d", f.a.Cache().Len(), shared.len())
	}
	if _, err := f.a.Authenticate(context.Background(), cred); !errors.Is(err, ErrRevoked) {
		t.Fatalf("next check: %v, want ErrRevoked", err)
	}
}

// Replica B read the store just before a revocation and writes the old
// allow to the shared tier after replica A applied the change. A must not
// pick it up: it asks the store, which says revoked.
func TestLateSharedWriteFromAnotherReplicaIsIgnored(t *testing.T) {
	t.Parallel()
	shared := newFakeShared()
	f := newFixture(t, Options{Shared: shared, TTL: time.Hour})
	f.addPair("k1", "acme")
	cred := mustParse(t, testPair)
	f.store.update(func() { f.store.byPublic[testPublic].RevokedAt = f.clock.Now() })
	f.a.Apply(context.Background(), Change{KeyIDs: []string{"k1"}})

	now := f.clock.Now()
	k := f.h.Digest(testPair)
	stale := sharedEntry{outcome: OutcomeAllow, keyID: "k1", tenant: "acme", fresh: now.Add(time.Hour).UnixNano(), stale: now.Add(time.Hour).UnixNano()}
	v, _ := f.a.seal.sealEntry(&k, &stale)
	shared.put(k, "k1", v)
	if _, err := f.a.Authenticate(context.Background(), cred); !errors.Is(err, ErrRevoked) {
		t.Fatalf("err = %v, want ErrRevoked from the store, not the late shared allow", err)
	}
}

// Shared entries carry the key's version. An entry made of a key state
// older than a change the replica heard of is never adopted, however long
// after the change it is read and whoever put it back: a Redis that
// missed the delete (down during the revocation), or a Redis writer
// replaying a copy it saved. Entries made after the change are adopted.
func TestSharedEntryOlderThanAKnownChangeIsNeverAdopted(t *testing.T) {
	t.Parallel()
	shared := newFakeShared()
	o := Options{Shared: shared, TTL: time.Hour, MaxStale: time.Hour}
	f := newFixture(t, o)
	f.addPair("k1", "acme")
	cred := mustParse(t, testPair)
	k := f.h.Digest(testPair)
	entry := func(version int64, outcome Outcome) []byte {
		now := f.clock.Now()
		e := sharedEntry{outcome: outcome, keyID: "k1", tenant: "acme", version: version,
			fresh: now.Add(time.Hour).UnixNano(), stale: now.Add(2 * time.Hour).UnixNano()}
		v, _ := f.a.seal.sealEntry(&k, &e)
		return v
	}
	saved := entry(10, OutcomeAllow) // an honest allow of the key at version 10
	f.store.update(func() {
		f.store.byPublic[testPublic].RevokedAt = f.clock.Now()
		f.store.byPublic[testPublic].Version = 11
	})
	f.a.Apply(context.Background(), Change{KeyIDs: []string{"k1"}, Seqs: []int64{11}})
	for _, after := range []time.Duration{0, 3 * time.Second, 30 * time.Minute, 2 * time.Hour} {
		f.clock.Add(after)
		f.a.Cache().dropWhere(func(*decision) bool { return true })
		shared.put(k, "k1", saved)
		if _, err := f.a.Authenticate(context.Background(), cred); !errors.Is(err, ErrRevoked) {
			t.Fatalf("%v after the change: %v, want ErrRevoked from the store, not the saved allow", after, err)
		}
	}
	if f.a.Stats().SharedOutdated.Load() == 0 {
		t.Fatal("outdated entries not counted")
	}
	// An entry made at or after the change is adopted.
	f.a.Cache().dropWhere(func(*decision) bool { return true })
	shared.put(k, "k1", entry(11, OutcomeRevoked))
	lookups := f.store.lookups.Load()
	if _, err := f.a.Authenticate(context.Background(), cred); !errors.Is(err, ErrRevoked) || f.store.lookups.Load() != lookups {
		t.Fatalf("entry of the current version: %v, %d lookups; want ErrRevoked from the shared tier", err, f.store.lookups.Load()-lookups)
	}

	// A TRUNCATE (or changes missed for good) raises the floor: entries
	// read before it are refused, whatever their key.
	f2 := newFixture(t, o)
	f2.addPair("k1", "acme")
	shared.put(k, "k1", entry(10, OutcomeAllow))
	f2.a.Apply(context.Background(), Change{All: true, Floor: 12})
	if _, err := f2.a.Authenticate(context.Background(), cred); err != nil || f2.a.Stats().StoreLookups.Load() != 1 {
		t.Fatalf("below the floor: %v with %d store lookups; want the store asked", err, f2.a.Stats().StoreLookups.Load())
	}
}

// The memory of changes is bounded: past maxRemembered keys it folds into
// the floor, which still refuses every entry it forgot.
func TestRememberedChangesAreBounded(t *testing.T) {
	t.Parallel()
	f := newFixture(t, Options{})
	ids := make([]string, maxRemembered+1)
	seqs := make([]int64, len(ids))
	for i := range ids {
		ids[i], seqs[i] = fmt.Sprint("k", i), int64(i+1)
	}
	f.a.remember(Change{KeyIDs: ids, Seqs: seqs})
	if n := len(f.a.mem); n > maxRemembered {
		t.Fatalf("%d remembered, want at most %d", n, maxRemembered)
	}
	e := sharedEntry{outcome: OutcomeAllow, keyID: "k7", tenant: "acme", version: 7, fresh: 1, stale: 1}
	if f.a.adoptable(Digest{}, &e, 0) {
		t.Fatal("an entry older than a forgotten change was adopted")
	}
}

// partialShared fails every Get as a Redis Cluster tier does for the keys
// of a dead master: ErrSharedPartial.
type partialShared struct {
	*fakeShared
	gets atomic.Int64
}

func (p *partialShared) Get(context.Context, Digest) ([]byte, error) {
	p.gets.Add(1)
	return nil, fmt.Errorf("node 10.0.0.1:6379 down: %w", ErrSharedPartial)
}

// A failure of one part of the tier (one Cluster node's keys) is counted
// but does not make the authenticator skip the whole tier: the tier backs
// that part off by itself.
func TestSharedPartialFailureKeepsTheTier(t *testing.T) {
	t.Parallel()
	shared := &partialShared{fakeShared: newFakeShared()}
	f := newFixture(t, Options{Shared: shared, SharedRetry: time.Second})
	f.addPair("k1", "acme")
	if _, err := f.a.Authenticate(context.Background(), mustParse(t, testPair)); err != nil {
		t.Fatalf("one node down: %v, want an answer from the store", err)
	}
	if _, err := f.a.Authenticate(context.Background(), mustParse(t, testToken)); !errors.Is(err, ErrUnknown) {
		t.Fatal(err)
	}
	if got := shared.gets.Load(); got != 2 {
		t.Errorf("shared tier asked %d times for 2 misses right after a partial failure, want 2", got)
	}
	if s := f.a.Stats(); s.SharedErrors.Load() != 2 || s.SharedSkipped.Load() != 0 {
		t.Errorf("errors %d, skipped %d; want 2 and 0", s.SharedErrors.Load(), s.SharedSkipped.Load())
	}
}
