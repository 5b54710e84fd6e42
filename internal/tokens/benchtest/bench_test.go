// Package benchtest holds benchmarks of the lookup chain against the real
// stores, which the tokens package cannot import in its own tests.
package benchtest

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/extauthz/extauthz/internal/testsvc"
	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/pgstore"
	"github.com/extauthz/extauthz/internal/tokens/rediscache"
)

var pepper = []tokens.Pepper{{ID: "b1", Secret: []byte(strings.Repeat("b", 32))}}

const (
	nKeys     = 4000 // more than the cache holds: every check below is a miss
	cacheSize = 64
)

// seedPostgres stores nKeys pairs in a fresh database and returns the store
// and the credentials.
func seedPostgres(b *testing.B, h *tokens.Hasher) (*pgstore.Store, []tokens.Credential) {
	b.Helper()
	dsn := testsvc.NewDatabase(b)
	ctx := context.Background()
	st, err := pgstore.Open(ctx, dsn, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { st.Close() })
	if _, err := pgstore.Migrate(ctx, st.Pool()); err != nil {
		b.Fatal(err)
	}
	keys := make([]*tokens.Key, nKeys)
	creds := make([]tokens.Credential, nKeys)
	for i := range keys {
		is, err := h.Issue(tokens.IssueParams{Tenant: fmt.Sprintf("t%d", i%100), Scopes: []string{"read"}})
		if err != nil {
			b.Fatal(err)
		}
		keys[i] = is.Key
		if creds[i], err = tokens.ParseCredential(is.Credential); err != nil {
			b.Fatal(err)
		}
	}
	if err := st.Import(ctx, keys); err != nil {
		b.Fatal(err)
	}
	return st, creds
}

// BenchmarkMissPostgres: a check whose credential is in neither cache, so
// the store answers (one indexed SELECT by public key over loopback).
func BenchmarkMissPostgres(b *testing.B) {
	h, _ := tokens.NewHasher(pepper)
	st, creds := seedPostgres(b, h)
	a := tokens.NewAuthenticator(h, st, tokens.Options{CacheSize: cacheSize, StoreTimeout: time.Second})
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := a.Authenticate(ctx, creds[i%nKeys]); err != nil {
			b.Fatal(err)
		}
		i++
	}
	b.ReportMetric(float64(a.Stats().StoreLookups.Load())/float64(i), "lookups/op")
}

// BenchmarkMissRedis: a check whose credential is not in the process cache
// but in the shared tier, filled by another replica: one GET over loopback.
func BenchmarkMissRedis(b *testing.B) {
	h, _ := tokens.NewHasher(pepper)
	st, creds := seedPostgres(b, h)
	rdb, prefix := testsvc.NewRedis(b)
	shared := rediscache.New(rdb, prefix)
	ctx := context.Background()
	// Replica 1 fills the shared tier.
	a1 := tokens.NewAuthenticator(h, st, tokens.Options{Shared: shared, StoreTimeout: time.Second})
	for _, c := range creds {
		if _, err := a1.Authenticate(ctx, c); err != nil {
			b.Fatal(err)
		}
	}
	time.Sleep(200 * time.Millisecond) // the write-backs are asynchronous
	a2 := tokens.NewAuthenticator(h, st, tokens.Options{Shared: shared, CacheSize: cacheSize, SharedTimeout: time.Second})
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, err := a2.Authenticate(ctx, creds[i%nKeys]); err != nil {
			b.Fatal(err)
		}
		i++
	}
	s := a2.Stats()
	b.ReportMetric(float64(s.SharedHits.Load())/float64(i), "shared-hits/op")
	b.ReportMetric(float64(s.StoreLookups.Load())/float64(i), "lookups/op")
}

// BenchmarkRedisGetRaw is one go-redis GET over loopback: the floor for
// BenchmarkMissRedis.
func BenchmarkRedisGetRaw(b *testing.B) {
	rdb, prefix := testsvc.NewRedis(b)
	ctx := context.Background()
	rdb.Set(ctx, prefix+"x", strings.Repeat("v", 150), time.Minute)
	b.ReportAllocs()
	for b.Loop() {
		if err := rdb.Get(ctx, prefix+"x").Err(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnknownVsWrongSecret: what a caller can time to learn whether a
// public key exists. Each iteration checks, against the real Postgres and
// with empty caches for both, a credential whose public key is unknown and
// one whose public key is known but whose secret is wrong, timing each;
// the metrics are their costs and the ratio (wrong/unknown) in one run.
// extauthz verifies a dummy digest for an unknown key, so the HMAC work is
// the same; what differs is the store finding a row.
func BenchmarkUnknownVsWrongSecret(b *testing.B) {
	h, _ := tokens.NewHasher(pepper)
	st, creds := seedPostgres(b, h)
	a := tokens.NewAuthenticator(h, st, tokens.Options{CacheSize: cacheSize, StoreTimeout: time.Second})
	ctx := context.Background()
	fresh := func(public string) tokens.Credential {
		pk, sk, err := tokens.GeneratePair()
		if err != nil {
			b.Fatal(err)
		}
		if public != "" {
			pk = public
		}
		c, err := tokens.ParseCredential(pk + ":" + sk)
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	var unknown, wrong time.Duration
	i := 0
	for b.Loop() {
		u, w := fresh(""), fresh(creds[i%nKeys].PublicKey())
		start := time.Now()
		_, errU := a.Authenticate(ctx, u)
		mid := time.Now()
		_, errW := a.Authenticate(ctx, w)
		wrong += time.Since(mid)
		unknown += mid.Sub(start)
		if !errors.Is(errU, tokens.ErrUnknown) || !errors.Is(errW, tokens.ErrUnknown) {
			b.Fatalf("want both denied as unknown: %v, %v", errU, errW)
		}
		i++
	}
	b.ReportMetric(float64(unknown.Nanoseconds())/float64(i), "unknown-ns/op")
	b.ReportMetric(float64(wrong.Nanoseconds())/float64(i), "wrong-secret-ns/op")
	b.ReportMetric(float64(wrong)/float64(unknown), "wrong/unknown")
}
