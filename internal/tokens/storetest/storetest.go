// Package storetest is the behaviour suite every tokens.Store passes.
package storetest

import (
	"context"
	"crypto/rand"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/extauthz/extauthz/internal/tokens"
)

// Opener returns a fresh, empty store for one test, and a function that
// opens a second handle on the same data, as another process would.
type Opener func(t *testing.T) (s tokens.Store, reopen func() tokens.Store)

// base is a fixed, microsecond-precise time (Postgres keeps microseconds).
var base = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// NewKey returns a valid key of the given kind with random digest and
// public key, not yet stored.
func NewKey(t testing.TB, tenant string, kind tokens.Kind) *tokens.Key {
	t.Helper()
	id, err := tokens.NewID()
	if err != nil {
		t.Fatal(err)
	}
	d := make([]byte, 32)
	rand.Read(d)
	k := &tokens.Key{
		ID: id, TenantID: tenant, Name: "key " + id[:8], Kind: kind, Digest: d, PepperID: "p1",
		Scopes: []string{"read", "write"}, CreatedAt: base,
	}
	if kind == tokens.KindPair {
		pub, _, err := tokens.GeneratePair()
		if err != nil {
			t.Fatal(err)
		}
		k.PublicKey = pub
	}
	return k
}

// cmpKey compares keys as stored; their versions are the store's own.
var cmpKey = cmp.Options{cmpopts.EquateApproxTime(time.Microsecond), cmpopts.IgnoreFields(tokens.Key{}, "Version")}

func diffKey(want, got *tokens.Key) string {
	return cmp.Diff(want, got, cmpKey, cmpopts.EquateEmpty())
}

// Run runs the suite.
func Run(t *testing.T, open Opener) {
	t.Run("CreateAndFind", func(t *testing.T) { testCreateAndFind(t, open) })
	t.Run("Conflicts", func(t *testing.T) { testConflicts(t, open) })
	t.Run("ListRevokeDelete", func(t *testing.T) { testListRevokeDelete(t, open) })
	t.Run("RevokeTenant", func(t *testing.T) { testRevokeTenant(t, open) })
	t.Run("ImportAllOrNothing", func(t *testing.T) { testImport(t, open) })
	t.Run("Usage", func(t *testing.T) { testUsage(t, open) })
	t.Run("ConcurrentWriters", func(t *testing.T) { testConcurrentWriters(t, open) })
	t.Run("WatchSeesOtherHandles", func(t *testing.T) { testWatch(t, open) })
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func testCreateAndFind(t *testing.T, open Opener) {
	s, reopen := open(t)
	ctx := ctxT(t)
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	pair := NewKey(t, "acme", tokens.KindPair)
	pair.ExpiresAt = base.Add(720 * time.Hour)
	tok := NewKey(t, "acme", tokens.KindToken)
	tok.Scopes = nil
	for _, k := range []*tokens.Key{pair, tok} {
		if err := s.Create(ctx, k); err != nil {
			t.Fatalf("create %s: %v", k.Kind, err)
		}
	}
	// Visible through another handle, as the server sees what the CLI wrote.
	other := reopen()
	defer other.Close()
	got, err := other.KeyByPublic(ctx, pair.PublicKey)
	if err != nil {
		t.Fatalf("KeyByPublic: %v", err)
	}
	if d := diffKey(pair, got); d != "" {
		t.Errorf("pair (-want +got):\n%s", d)
	}
	var other1 tokens.Digest
	copy(other1[:], []byte("no such digest, not at all......"))
	var td tokens.Digest
	copy(td[:], tok.Digest)
	got, err = other.KeyByDigest(ctx, []tokens.Digest{other1, td})
	if err != nil {
		t.Fatalf("KeyByDigest: %v", err)
	}
	if d := diffKey(tok, got); d != "" {
		t.Errorf("token (-want +got):\n%s", d)
	}
	// A pair's secret digest is not a token lookup key.
	var pd tokens.Digest
	copy(pd[:], pair.Digest)
	if _, err := other.KeyByDigest(ctx, []tokens.Digest{pd}); !errors.Is(err, tokens.ErrNotFound) {
		t.Errorf("pair digest found as a token: %v", err)
	}
	if _, err := other.KeyByPublic(ctx, "pk_nope"); !errors.Is(err, tokens.ErrNotFound) {
		t.Errorf("unknown public key: err = %v, want ErrNotFound", err)
	}
	if _, err := other.KeyByDigest(ctx, []tokens.Digest{other1}); !errors.Is(err, tokens.ErrNotFound) {
		t.Errorf("unknown digest: err = %v, want ErrNotFound", err)
	}
}

func testConflicts(t *testing.T, open Opener) {
	s, _ := open(t)
	ctx := ctxT(t)
	pair := NewKey(t, "acme", tokens.KindPair)
	tok := NewKey(t, "acme", tokens.KindToken)
	for _, k := range []*tokens.Key{pair, tok} {
		if err := s.Create(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	samePublic := NewKey(t, "other", tokens.KindPair)
	samePublic.PublicKey = pair.PublicKey
	sameDigest := NewKey(t, "other", tokens.KindToken)
	sameDigest.Digest = tok.Digest
	sameID := NewKey(t, "other", tokens.KindToken)
	sameID.ID = pair.ID
	for name, k := range map[string]*tokens.Key{"public key": samePublic, "token digest": sameDigest, "id": sameID} {
		if err := s.Create(ctx, k); !errors.Is(err, tokens.ErrConflict) {
			t.Errorf("duplicate %s: err = %v, want ErrConflict", name, err)
		}
	}
	keys, err := s.List(ctx, "")
	if err != nil || len(keys) != 2 {
		t.Fatalf("after conflicts: %d keys, %v; want 2", len(keys), err)
	}
}

func testListRevokeDelete(t *testing.T, open Opener) {
	s, _ := open(t)
	ctx := ctxT(t)
	var made []*tokens.Key
	for i, tenant := range []string{"a", "b", "a"} {
		k := NewKey(t, tenant, tokens.KindPair)
		k.CreatedAt = base.Add(time.Duration(i) * time.Minute)
		if err := s.Create(ctx, k); err != nil {
			t.Fatal(err)
		}
		made = append(made, k)
	}
	all, err := s.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(made, all, cmpKey, cmpopts.EquateEmpty()); d != "" {
		t.Errorf("List all, oldest first (-want +got):\n%s", d)
	}
	as, _ := s.List(ctx, "a")
	if len(as) != 2 || as[0].ID != made[0].ID || as[1].ID != made[2].ID {
		t.Errorf("List a = %v", as)
	}
	if none, _ := s.List(ctx, "zzz"); len(none) != 0 {
		t.Errorf("List of an unknown tenant = %v", none)
	}

	before, _ := s.KeyByPublic(ctx, made[0].PublicKey)
	at := base.Add(time.Hour)
	if err := s.Revoke(ctx, made[0].ID, at); err != nil {
		t.Fatal(err)
	}
	// A change gives the key a higher version: shared entries of the old
	// one are told apart by it.
	if after, _ := s.KeyByPublic(ctx, made[0].PublicKey); before == nil || after == nil || after.Version <= before.Version {
		t.Errorf("version across a revocation: %v then %v, want it to grow", before, after)
	}
	if err := s.Revoke(ctx, made[0].ID, at.Add(time.Hour)); err != nil {
		t.Fatalf("revoke twice: %v", err)
	}
	got, _ := s.KeyByPublic(ctx, made[0].PublicKey)
	if !got.RevokedAt.Equal(at) {
		t.Errorf("revoked_at = %v, want the first revocation %v", got.RevokedAt, at)
	}
	if err := s.Revoke(ctx, "00000000-0000-4000-8000-000000000000", at); !errors.Is(err, tokens.ErrNotFound) {
		t.Errorf("revoke unknown: err = %v, want ErrNotFound", err)
	}
	// KeyByID finds revoked keys too; an unknown or malformed id is ErrNotFound.
	if got, err := s.KeyByID(ctx, made[0].ID); err != nil || got.ID != made[0].ID || !got.RevokedAt.Equal(at) || got.TenantID != "a" {
		t.Errorf("KeyByID = %+v, %v", got, err)
	}
	for _, id := range []string{"00000000-0000-4000-8000-000000000000", "not-a-uuid", ""} {
		if _, err := s.KeyByID(ctx, id); !errors.Is(err, tokens.ErrNotFound) {
			t.Errorf("KeyByID(%q): err = %v, want ErrNotFound", id, err)
		}
	}
	if err := s.Delete(ctx, made[1].ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.KeyByPublic(ctx, made[1].PublicKey); !errors.Is(err, tokens.ErrNotFound) {
		t.Errorf("deleted key found: %v", err)
	}
	if err := s.Delete(ctx, made[1].ID); !errors.Is(err, tokens.ErrNotFound) {
		t.Errorf("delete twice: err = %v, want ErrNotFound", err)
	}
	if all, _ := s.List(ctx, ""); len(all) != 2 {
		t.Errorf("after delete: %d keys, want 2 (revoked included)", len(all))
	}
}

func testRevokeTenant(t *testing.T, open Opener) {
	s, _ := open(t)
	ctx := ctxT(t)
	var want []string
	for i := range 3 {
		k := NewKey(t, "acme", tokens.KindToken)
		k.CreatedAt = base.Add(time.Duration(i) * time.Second)
		if err := s.Create(ctx, k); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			if err := s.Revoke(ctx, k.ID, base); err != nil {
				t.Fatal(err)
			}
		} else {
			want = append(want, k.ID)
		}
	}
	other := NewKey(t, "other", tokens.KindToken)
	if err := s.Create(ctx, other); err != nil {
		t.Fatal(err)
	}
	ids, err := s.RevokeTenant(ctx, "acme", base.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, ids, cmpopts.SortSlices(func(a, b string) bool { return a < b })); d != "" {
		t.Errorf("revoked ids (-want +got):\n%s", d)
	}
	keys, _ := s.List(ctx, "")
	for _, k := range keys {
		if (k.TenantID == "acme") != (k.Status(base.Add(2*time.Hour)) == "revoked") {
			t.Errorf("key of %s: status %s", k.TenantID, k.Status(base.Add(2*time.Hour)))
		}
	}
}

func testImport(t *testing.T, open Opener) {
	s, _ := open(t)
	ctx := ctxT(t)
	existing := NewKey(t, "acme", tokens.KindToken)
	if err := s.Create(ctx, existing); err != nil {
		t.Fatal(err)
	}
	clash := NewKey(t, "acme", tokens.KindToken)
	clash.Digest = existing.Digest
	batch := []*tokens.Key{NewKey(t, "acme", tokens.KindToken), clash, NewKey(t, "acme", tokens.KindToken)}
	err := s.Import(ctx, batch)
	var ie *tokens.ImportError
	if !errors.As(err, &ie) || ie.Index != 1 || !errors.Is(err, tokens.ErrConflict) {
		t.Fatalf("import with a clash at 1: err = %v", err)
	}
	if keys, _ := s.List(ctx, ""); len(keys) != 1 {
		t.Fatalf("failed import left %d keys, want 1", len(keys))
	}
	batch[1] = NewKey(t, "acme", tokens.KindToken)
	if err := s.Import(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if keys, _ := s.List(ctx, ""); len(keys) != 4 {
		t.Fatalf("after import: %d keys, want 4", len(keys))
	}
}

func testUsage(t *testing.T, open Opener) {
	s, _ := open(t)
	ctx := ctxT(t)
	k := NewKey(t, "acme", tokens.KindPair)
	if err := s.Create(ctx, k); err != nil {
		t.Fatal(err)
	}
	t1, t2 := base.Add(time.Minute), base.Add(2*time.Minute)
	if err := s.RecordUsage(ctx, []tokens.Usage{{KeyID: k.ID, LastUsed: t2, Requests: 5}}); err != nil {
		t.Fatal(err)
	}
	// An older time never moves last-used back; unknown ids are ignored.
	err := s.RecordUsage(ctx, []tokens.Usage{
		{KeyID: k.ID, LastUsed: t1, Requests: 3},
		{KeyID: "00000000-0000-4000-8000-000000000000", LastUsed: t1, Requests: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.KeyByPublic(ctx, k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if got.RequestCount != 8 || !got.LastUsedAt.Equal(t2) {
		t.Fatalf("usage = %d at %v, want 8 at %v", got.RequestCount, got.LastUsedAt, t2)
	}
}

func testConcurrentWriters(t *testing.T, open Opener) {
	s, reopen := open(t)
	other := reopen()
	defer other.Close()
	ctx := ctxT(t)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for _, st := range []tokens.Store{s, other} {
		for range 10 {
			wg.Go(func() {
				errs <- st.Create(ctx, NewKey(t, "acme", tokens.KindToken))
				errs <- st.RecordUsage(ctx, nil)
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	keys, err := s.List(ctx, "")
	if err != nil || len(keys) != 20 {
		t.Fatalf("%d keys after 20 concurrent creates from two handles (%v)", len(keys), err)
	}
}

func testWatch(t *testing.T, open Opener) {
	s, reopen := open(t)
	ctx := ctxT(t)
	k := NewKey(t, "acme", tokens.KindPair)
	gone := NewKey(t, "acme", tokens.KindToken)
	for _, x := range []*tokens.Key{k, gone} {
		if err := s.Create(ctx, x); err != nil {
			t.Fatal(err)
		}
	}
	changes := make(chan tokens.Change, 100)
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Watch(wctx, func(c tokens.Change) { changes <- c }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("watch: %v", err)
		}
	}()
	time.Sleep(300 * time.Millisecond) // let the watcher settle on the current state
	drain(changes)

	cli := reopen()
	defer cli.Close()
	expect := func(what string, do func() error, match func(tokens.Change) bool) {
		t.Helper()
		start := time.Now()
		if err := do(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		deadline := time.After(time.Second)
		for {
			select {
			case c := <-changes:
				if match(c) {
					t.Logf("%s seen after %v", what, time.Since(start).Round(time.Millisecond))
					return
				}
			case <-deadline:
				t.Fatalf("%s by another handle not seen within a second", what)
			}
		}
	}
	has := func(id string) func(tokens.Change) bool {
		return func(c tokens.Change) bool {
			if c.All {
				return true
			}
			for _, x := range c.KeyIDs {
				if x == id {
					return true
				}
			}
			return false
		}
	}
	expect("revoke", func() error { return cli.Revoke(ctx, k.ID, base) }, has(k.ID))
	expect("delete", func() error { return cli.Delete(ctx, gone.ID) }, has(gone.ID))
	added := NewKey(t, "acme", tokens.KindToken)
	expect("create", func() error { return cli.Create(ctx, added) }, func(c tokens.Change) bool { return c.Added || c.All })
	// Usage writes are not changes that invalidate anything.
	if err := cli.RecordUsage(ctx, []tokens.Usage{{KeyID: added.ID, LastUsed: base, Requests: 1}}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	for _, c := range drain(changes) {
		if c.All || c.Tenant != "" || len(c.KeyIDs) > 0 {
			t.Errorf("usage write reported as change %+v", c)
		}
	}
}

func drain(ch chan tokens.Change) []tokens.Change {
	var out []tokens.Change
	for {
		select {
		case c := <-ch:
			out = append(out, c)
		default:
			return out
		}
	}
}
