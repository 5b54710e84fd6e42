package main

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Two replicas counting the same keys, on Postgres and Redis, are stopped
// at the same moment: both final usage writes touch every key at once, and
// neither may lose a count. The stored request counts add up to the checks
// that were allowed.
func TestUsageSurvivesSimultaneousShutdown(t *testing.T) {
	c := newCluster(t, true)
	// Periodic writes and their Redis claims are running too when the
	// replicas stop.
	c.env["EXTAUTHZ_USAGE_INTERVAL"] = "200ms"
	const nKeys = 500
	tokens := c.importTokens(nKeys)
	r1, r2 := startReplica(t, c.cli), startReplica(t, c.cli)

	var allowed atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(1500 * time.Millisecond)
	for g := range 8 {
		r := []*replica{r1, r2}[g%2]
		wg.Go(func() {
			for i := g; time.Now().Before(deadline); i += 8 {
				if r.allowed(tokens[i%nKeys]) {
					allowed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	start := make(chan struct{})
	codes := make([]int, 2)
	var stops sync.WaitGroup
	for i, r := range []*replica{r1, r2} {
		stops.Go(func() { <-start; codes[i] = r.srv.stop() })
	}
	close(start)
	stops.Wait()
	if codes[0] != 0 || codes[1] != 0 {
		t.Fatalf("exit codes %v", codes)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var stored int64
	if err := conn.QueryRow(ctx, `SELECT coalesce(sum(request_count), 0) FROM extauthz.keys`).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d checks allowed over %d keys and two replicas; %d requests stored", allowed.Load(), nKeys, stored)
	if stored != allowed.Load() {
		t.Fatalf("stored %d requests, want %d (every allowed check)", stored, allowed.Load())
	}
}
