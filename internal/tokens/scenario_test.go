package tokens

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// synthStore answers every token lookup with a key made from the digest,
// holding nothing itself, so that heap growth is the cache's alone.
type synthStore struct{ lookups atomic.Int64 }

func (s *synthStore) KeyByPublic(context.Context, string) (*Key, error) {
	s.lookups.Add(1)
	return nil, ErrNotFound
}

func (s *synthStore) KeyByDigest(_ context.Context, ds []Digest) (*Key, error) {
	s.lookups.Add(1)
	d := ds[0]
	return &Key{
		ID: fmt.Sprintf("%x-%x-%x-%x-%x", d[0:4], d[4:6], d[6:8], d[8:10], d[10:16]),
		// 1,000 tenants, as in the shared bench key set: tenants are far
		// fewer than keys, and interned.
		TenantID: fmt.Sprintf("tenant-%04d", (int(d[0])<<8|int(d[1]))%1000),
		Kind:     KindToken, Digest: d[:], PepperID: "p1", Scopes: []string{"read", "write"},
	}, nil
}

// BenchmarkHeapPerCachedDecision fills the process cache with 1,000,000
// allowed decisions and reports the heap they hold, per decision. Run with
// -benchtime 1x (make bench does).
func BenchmarkHeapPerCachedDecision(b *testing.B) {
	const n = 1_000_000
	for b.Loop() {
		h, _ := NewHasher(testPeppers)
		creds := make([]Credential, n)
		for i := range creds {
			creds[i] = Credential{kind: KindToken, raw: fmt.Sprintf("legacy-token-%08d", i)}
		}
		st := &synthStore{}
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		a := NewAuthenticator(h, st, Options{CacheSize: n})
		ctx := context.Background()
		for _, c := range creds {
			if _, err := a.Authenticate(ctx, c); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		runtime.KeepAlive(creds) // counted in before: alive until after
		if a.Cache().Len() < n*99/100 {
			b.Fatalf("cache holds %d of %d", a.Cache().Len(), n)
		}
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(a.Cache().Len()), "heap-B/decision")
		// The collector's work on that heap: the fastest of five forced
		// collections, with nothing else of size alive.
		creds = nil
		runtime.GC()
		fastest := time.Hour
		for range 5 {
			t := time.Now()
			runtime.GC()
			fastest = min(fastest, time.Since(t))
		}
		b.ReportMetric(float64(fastest.Microseconds())/1000, "gc-ms")
		runtime.KeepAlive(a)
	}
}

// Invalid keys never reach the store when they are malformed, and reach it
// once per distinct key when they are well formed but unknown.
func TestInvalidKeysStoreLookups(t *testing.T) {
	t.Parallel()
	h, _ := NewHasher(testPeppers)
	st := &countingStore{}
	a := NewAuthenticator(h, st, Options{})
	e := NewExtractor(DefaultSources)
	ctx := context.Background()
	check := func(v string) error {
		c, _, err := e.Extract(headers(map[string]string{"x-api-key": v}))
		if err != nil {
			return err
		}
		_, err = a.Authenticate(ctx, c)
		return err
	}
	const n = 10000
	for i := range n {
		// Garbage, typos (bad checksum) and halves of pairs.
		garbage := []string{
			fmt.Sprintf("pk_%024d:sk_%038d", i, i),
			strings.Replace(testPair, "A", string(rune('B'+i%20)), 1),
			fmt.Sprintf("sk_%038d", i),
			fmt.Sprintf("bad key %d", i),
		}
		for _, g := range garbage {
			if err := check(g); !errors.Is(err, ErrMalformed) {
				t.Fatalf("%q: err = %v, want ErrMalformed", g, err)
			}
		}
	}
	if got := st.lookups.Load(); got != 0 {
		t.Fatalf("%d store lookups for %d malformed keys, want 0", got, 4*n)
	}
	// Well-formed unknown keys: one lookup each, then the negative cache.
	for range 2 {
		for i := range n {
			tok := fmt.Sprintf("legacy-unknown-%08d", i)
			if err := check(tok); err == nil {
				t.Fatal("unknown key accepted")
			}
		}
	}
	if got := st.lookups.Load(); got != n {
		t.Fatalf("%d store lookups for %d distinct unknown keys checked twice, want %d", got, n, n)
	}
	t.Logf("%d malformed keys: 0 store lookups; %d distinct well-formed unknown keys checked twice: %d lookups", 4*n, n, n)
}

type countingStore struct{ lookups atomic.Int64 }

func (s *countingStore) KeyByPublic(context.Context, string) (*Key, error) {
	s.lookups.Add(1)
	return nil, ErrNotFound
}

func (s *countingStore) KeyByDigest(context.Context, []Digest) (*Key, error) {
	s.lookups.Add(1)
	return nil, ErrNotFound
}
