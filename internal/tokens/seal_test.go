package tokens

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// sealRaw seals any body as an entry of k: what a replica with a bug, or
// an older or newer format, could write. An attacker cannot.
func sealRaw(s *SharedSealer, k *Digest, body []byte) []byte {
	t := s.tag(0, s.entryHdr, k, body)
	return append(append([]byte(nil), body...), t[:]...)
}

// rawEntry encodes e's fields in format 1 without checking them.
func rawEntry(e sharedEntry) []byte { return appendEntry(nil, &e) }

// Entries sealed with a valid tag but fields no replica writes (a bug, a
// store row written around the CLI's checks) are rejected like forgeries:
// none of it reaches a header or the table of interned strings.
func TestSharedEntryFieldsValidated(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	fresh, stale := now+int64(time.Minute), now+int64(2*time.Minute)
	ok := sharedEntry{outcome: OutcomeAllow, keyID: "k1", tenant: "acme", scopesHeader: "read,write:all", fresh: fresh, stale: stale}
	for _, tc := range []struct {
		name string
		edit func(e *sharedEntry)
	}{
		{"CR/LF in the tenant", func(e *sharedEntry) { e.tenant = "acme\r\nx-injected: 1" }},
		{"a tenant of 129 bytes", func(e *sharedEntry) { e.tenant = strings.Repeat("t", 129) }},
		{"an empty tenant on an allow", func(e *sharedEntry) { e.tenant = "" }},
		{"a key id with a space", func(e *sharedEntry) { e.keyID = "k 1" }},
		{"an empty key id on an allow", func(e *sharedEntry) { e.keyID = "" }},
		{"a scope with a space", func(e *sharedEntry) { e.scopesHeader = "read, write" }},
		{"an empty scope", func(e *sharedEntry) { e.scopesHeader = "read,,write" }},
		{"a trailing comma", func(e *sharedEntry) { e.scopesHeader = "read," }},
		{"a scope of 65 bytes", func(e *sharedEntry) { e.scopesHeader = strings.Repeat("s", 65) }},
		{"scopes over 4 KiB", func(e *sharedEntry) { e.scopesHeader = strings.Repeat("scope,", 700) + "s" }},
		{"outcome 0", func(e *sharedEntry) { e.outcome = 0 }},
		{"outcome 9", func(e *sharedEntry) { e.outcome = 9 }},
		{"an unknown credential naming a key", func(e *sharedEntry) { e.outcome = OutcomeUnknown }},
		{"a revoked key with scopes", func(e *sharedEntry) { e.outcome = OutcomeRevoked }},
		{"stale before fresh", func(e *sharedEntry) { e.stale = e.fresh - 1 }},
		{"no freshness", func(e *sharedEntry) { e.fresh = 0 }},
		{"a negative expiry", func(e *sharedEntry) { e.expires = -1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, Options{Shared: newFakeShared()})
			e := ok
			tc.edit(&e)
			k := Digest{1}
			if _, ok := f.a.seal.sealEntry(&k, &e); ok {
				t.Fatal("sealed: a replica would write it")
			}
			if _, err := f.a.seal.openEntry(&k, sealRaw(f.a.seal, &k, rawEntry(e))); !errors.Is(err, errSealFields) && !errors.Is(err, errSealForged) {
				t.Fatalf("opened: err = %v", err)
			}
		})
	}
	f := newFixture(t, Options{})
	k := Digest{1}
	v, sealed := f.a.seal.sealEntry(&k, &ok)
	if !sealed {
		t.Fatal("a valid entry was not sealed")
	}
	if got, err := f.a.seal.openEntry(&k, v); err != nil || got != ok {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	// Trailing bytes behind valid fields, under a valid tag.
	if _, err := f.a.seal.openEntry(&k, sealRaw(f.a.seal, &k, append(rawEntry(ok), 0))); !errors.Is(err, errSealFields) {
		t.Fatalf("trailing byte: %v", err)
	}
}

// A replica adopts an authenticated entry on its own terms: never fresher
// than its TTL, never usable past TTL+MaxStale, an allow never past the
// key's expiry. An entry written fresh until 2100 (by a replica with a
// long TTL, or a clock far ahead) ends here after this replica's TTL.
func TestSharedEntryClamped(t *testing.T) {
	t.Parallel()
	far := time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	for _, tc := range []struct {
		name         string
		e            sharedEntry
		fresh, stale time.Duration // from now; 0: not adopted
	}{
		{"allow until 2100", sharedEntry{outcome: OutcomeAllow, keyID: "k1", tenant: "acme", fresh: far, stale: far}, time.Minute, 3 * time.Minute},
		{"denial until 2100", sharedEntry{outcome: OutcomeUnknown, fresh: far, stale: far}, 10 * time.Second, 2*time.Minute + 10*time.Second},
		{"allow of a key expiring in 30s", sharedEntry{outcome: OutcomeAllow, keyID: "k1", tenant: "acme", expires: 30, fresh: far, stale: far}, 30 * time.Second, 30 * time.Second},
		{"allow of a key that expired", sharedEntry{outcome: OutcomeAllow, keyID: "k1", tenant: "acme", expires: -1, fresh: far, stale: far}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			shared := newFakeShared()
			f := newFixture(t, Options{Shared: shared, TTL: time.Minute, NegativeTTL: 10 * time.Second, MaxStale: 2 * time.Minute})
			now := f.clock.Now().UnixNano()
			e := tc.e
			if e.expires != 0 {
				e.expires = now + e.expires*int64(time.Second)
			}
			k := f.h.Digest(testPair)
			v, ok := f.a.seal.sealEntry(&k, &e)
			if !ok {
				t.Fatal("not sealed")
			}
			shared.put(k, e.keyID, v)
			f.a.Authenticate(context.Background(), mustParse(t, testPair))
			if tc.fresh == 0 {
				if f.a.Stats().StoreLookups.Load() != 1 {
					t.Fatal("an allow past its key's expiry was adopted")
				}
				return
			}
			if f.a.Stats().StoreLookups.Load() != 0 {
				t.Fatal("the entry was not adopted")
			}
			type probe struct {
				d    time.Duration
				want int
			}
			probes := []probe{{tc.fresh - 1, cacheFresh}, {tc.stale, cacheMiss}}
			if tc.stale > tc.fresh {
				probes = append(probes, probe{tc.fresh, cacheStale}, probe{tc.stale - 1, cacheStale})
			}
			for _, at := range probes {
				if _, state := f.a.cache.get(k, now+int64(at.d)); state != at.want {
					t.Errorf("at +%v: cache state %d, want %d", at.d, state, at.want)
				}
			}
		})
	}
}

// A rejected entry is a miss that is counted and deleted; an entry of a
// format this replica does not know (a newer one's, mid-upgrade) is a
// plain miss, left for the replicas that read it.
func TestSharedEntryRejectedOrSkipped(t *testing.T) {
	t.Parallel()
	shared := newFakeShared()
	f := newFixture(t, Options{Shared: shared})
	f.addPair("k1", "acme")
	k := f.h.Digest(testPair)
	newer := sealRaw(f.a.seal, &k, []byte{entryV2 + 1, 1, 2, 3})
	shared.put(k, "", newer)
	if _, err := f.a.Authenticate(context.Background(), mustParse(t, testPair)); err != nil {
		t.Fatal(err)
	}
	waitSet(t, shared) // its own write-back, before the forgery below
	if f.a.Stats().SharedRejected.Load() != 0 || f.a.Stats().SharedMisses.Load() != 1 || len(shared.deletes) != 0 {
		t.Fatalf("newer format: rejected %d, misses %d, deletes %d; want 0, 1, 0",
			f.a.Stats().SharedRejected.Load(), f.a.Stats().SharedMisses.Load(), len(shared.deletes))
	}
	f2 := newFixture(t, Options{Shared: shared})
	f2.addPair("k1", "acme")
	shared.put(k, "", []byte(`{"o":1,"k":"k1","t":"victim","s":["admin"],"f":4102444800000,"x":4102444800000}`))
	res, err := f2.a.Authenticate(context.Background(), mustParse(t, testPair))
	if err != nil || res.TenantID != "acme" {
		t.Fatalf("forged: %+v %v; want the store's answer", res, err)
	}
	select {
	case d := <-shared.deletes:
		if d != k {
			t.Fatal("another entry deleted")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("rejected entry not deleted")
	}
	if f2.a.Stats().SharedRejected.Load() != 1 {
		t.Fatalf("rejected %d, want 1", f2.a.Stats().SharedRejected.Load())
	}
}

// Sealed with the current pepper, opened with any configured one; never
// with one that is not configured.
func TestSealAcrossPepperRotation(t *testing.T) {
	t.Parallel()
	p1, p2 := testPeppers[0], Pepper{ID: "p2", Secret: []byte(strings.Repeat("n", 32))}
	hOld, _ := NewHasher([]Pepper{p1})
	hNew, _ := NewHasher([]Pepper{p2, p1})
	hOther, _ := NewHasher([]Pepper{p2})
	old, rotated, other := hOld.SharedSealer("x:"), hNew.SharedSealer("x:"), hOther.SharedSealer("x:")
	k := Digest{7}
	e := sharedEntry{outcome: OutcomeUnknown, fresh: 1, stale: 2}
	v, _ := old.sealEntry(&k, &e)
	if _, err := rotated.openEntry(&k, v); err != nil {
		t.Errorf("entry of the previous pepper: %v", err)
	}
	if _, err := other.openEntry(&k, v); !errors.Is(err, errSealForged) {
		t.Errorf("entry of a pepper not configured: %v", err)
	}
	m := old.SealMessage([]byte("{}"), time.Now())
	if _, _, _, err := rotated.OpenMessage(m); err != nil {
		t.Errorf("message of the previous pepper: %v", err)
	}
	if _, _, _, err := other.OpenMessage(m); !errors.Is(err, errSealForged) {
		t.Errorf("message of a pepper not configured: %v", err)
	}
	// An entry is not a message, nor the reverse, though both are sealed.
	if _, _, _, err := old.OpenMessage(v); err == nil {
		t.Error("an entry opened as a message")
	}
	if _, err := old.openEntry(&k, m); err == nil {
		t.Error("a message opened as an entry")
	}
}

// FuzzSharedEntry: whatever Redis holds, opening it never panics, and
// anything accepted is an entry with a valid tag and valid fields, which
// seals back to the same bytes. With seal set the input is given a valid
// tag first, so the fuzzer explores the decoder behind the MAC.
func FuzzSharedEntry(f *testing.F) {
	h, _ := NewHasher(testPeppers)
	s := h.SharedSealer("extauthz:")
	k := Digest{1, 2, 3}
	for _, e := range []sharedEntry{
		{outcome: OutcomeAllow, keyID: "3f6c1a52-9b1e-4d7a-8f0e-2c4b6d8e0a1b", tenant: "acme", scopesHeader: "read,write", expires: 5, fresh: 10, stale: 20},
		{outcome: OutcomeUnknown, fresh: 1, stale: 1},
		{outcome: OutcomeRevoked, keyID: "k", tenant: "t", fresh: 1, stale: 2},
	} {
		v, _ := s.sealEntry(&k, &e)
		f.Add(v, false)
		f.Add(rawEntry(e), true)
	}
	f.Add([]byte(`{"o":1,"t":"victim","s":["admin"]}`), false)
	f.Add([]byte{entryV2}, true)
	f.Fuzz(func(t *testing.T, v []byte, seal bool) {
		if seal {
			v = sealRaw(s, &k, v)
		}
		e, err := s.openEntry(&k, v)
		if err != nil {
			return
		}
		if !e.valid() {
			t.Fatalf("accepted invalid fields: %+v", e)
		}
		again, ok := s.sealEntry(&k, &e)
		if !ok || !bytes.Equal(again, v) {
			t.Fatalf("accepted %x, which seals back to %x", v, again)
		}
	})
}

// BenchmarkSharedEntryOpen is what a shared-tier hit adds to a miss, beside
// the Redis round trip: one HMAC and the decode.
func BenchmarkSharedEntryOpen(b *testing.B) {
	h, _ := NewHasher(testPeppers)
	s := h.SharedSealer("extauthz:")
	k := Digest{1}
	e := sharedEntry{outcome: OutcomeAllow, keyID: "3f6c1a52-9b1e-4d7a-8f0e-2c4b6d8e0a1b", tenant: "acme", scopesHeader: "read,write", fresh: 10, stale: 20}
	v, _ := s.sealEntry(&k, &e)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.openEntry(&k, v); err != nil {
			b.Fatal(err)
		}
	}
}
