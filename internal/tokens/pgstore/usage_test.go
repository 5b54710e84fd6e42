package pgstore

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/storetest"
)

// Two replicas flush usage of the same keys at once (every replica's
// final write at a rolling restart, or two periodic writes that coincide).
// Each hands the keys in its own order: the rows must still be locked in
// one order, so that neither write deadlocks and every count is stored.
func TestRecordUsageConcurrentWritersNeverDeadlock(t *testing.T) {
	s, _ := newStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const nKeys, rounds = 1000, 20
	keys := make([]*tokens.Key, nKeys)
	for i := range keys {
		keys[i] = storetest.NewKey(t, "acme", tokens.KindToken)
	}
	if err := s.Import(ctx, keys); err != nil {
		t.Fatal(err)
	}
	at := time.Now().Truncate(time.Microsecond)
	forward := make([]tokens.Usage, nKeys)
	for i, k := range keys {
		forward[i] = tokens.Usage{KeyID: k.ID, LastUsed: at, Requests: 1}
	}
	backward := slices.Clone(forward)
	slices.Reverse(backward)
	// A second store: its own pool, as another replica has.
	other, err := Open(ctx, s.Pool().Config().ConnString(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()

	var deadlocks int
	for round := range rounds {
		var wg sync.WaitGroup
		errs := make([]error, 2)
		start := make(chan struct{})
		for i, w := range []struct {
			st *Store
			us []tokens.Usage
		}{{s, forward}, {other, backward}} {
			wg.Go(func() {
				<-start
				errs[i] = w.st.RecordUsage(ctx, w.us)
			})
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("round %d, writer %d: %v", round, i, err)
			}
		}
		deadlocks = int(s.usageRetries.Load() + other.usageRetries.Load())
	}
	if deadlocks != 0 {
		t.Errorf("%d writes were retried after a deadlock or serialization failure, want 0: rows must be locked in one order", deadlocks)
	}
	var sum, n int64
	if err := s.Pool().QueryRow(ctx, `SELECT sum(request_count), count(*) FILTER (WHERE request_count = $1 AND last_used_at = $2) FROM extauthz.keys`,
		2*rounds, at).Scan(&sum, &n); err != nil {
		t.Fatal(err)
	}
	if sum != 2*rounds*nKeys || n != nKeys {
		t.Fatalf("stored %d requests, %d keys with exactly %d; want %d and %d", sum, n, 2*rounds, 2*rounds*nKeys, nKeys)
	}
}

// The same key under two spellings and twice in a batch is counted in
// full; ids that are no UUID are skipped; deadlocks and serialization
// failures are what a write is retried for.
func TestRecordUsageAggregates(t *testing.T) {
	s, _ := newStore(t)
	ctx := context.Background()
	k := storetest.NewKey(t, "acme", tokens.KindToken)
	if err := s.Create(ctx, k); err != nil {
		t.Fatal(err)
	}
	at := time.Now().Truncate(time.Microsecond)
	err := s.RecordUsage(ctx, []tokens.Usage{
		{KeyID: k.ID, LastUsed: at.Add(-time.Minute), Requests: 2},
		{KeyID: strings.ToUpper(k.ID), LastUsed: at, Requests: 3},
		{KeyID: "k1", LastUsed: at, Requests: 100},
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.KeyByDigest(ctx, []tokens.Digest{tokens.Digest(k.Digest)})
	if err != nil {
		t.Fatal(err)
	}
	if got.RequestCount != 5 || !got.LastUsedAt.Equal(at) {
		t.Fatalf("request_count %d, last_used_at %v; want 5 and %v", got.RequestCount, got.LastUsedAt, at)
	}
	for code, want := range map[string]bool{"40P01": true, "40001": true, "23505": false} {
		if got := retryable(fmt.Errorf("pgstore: %w", &pgconn.PgError{Code: code})); got != want {
			t.Errorf("retryable(%s) = %v, want %v", code, got, want)
		}
	}
}
