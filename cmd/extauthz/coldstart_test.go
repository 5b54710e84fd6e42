package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
)

// TestReadyMeansReady pins that a replica on Postgres answers its first
// checks, from the moment it reports ready, without an outage: 200
// concurrent checks of distinct uncached keys, each a store lookup on a
// pool that was new a moment ago. The store deadline is newCluster's 1s,
// which only a defect exceeds on a loaded 2-core machine under -race
// (the 100ms default is exceeded there by queueing alone); that the pool
// was warm is pinned directly: when it says ready, the replica already
// holds its pool's connections open (MinConns, 4 here, plus LISTEN), where
// a cold pool held one or two and made the first checks wait for the rest.
func TestReadyMeansReady(t *testing.T) {
	c := newCluster(t, false)
	const n = 200
	creds := c.importTokens(n)

	srv := startServer(t, c.cli)
	check := checker(t, srv)
	check("not-a-key") // the client's connection, made before readiness as Envoy's is
	start := time.Now()
	for {
		if code, _ := httpGet(t, "http://"+srv.addrs.HTTP+"/readyz"); code == 200 {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("not ready within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("ready after %v", time.Since(start))
	var open int
	c.queryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
		AND application_name = 'extauthz' AND pid <> pg_backend_pid()`, &open)
	if open < 5 {
		t.Errorf("ready with %d connections open to the store, want a warm pool (4) and the LISTEN connection", open)
	}

	var wg sync.WaitGroup
	got := make([]codes.Code, n)
	allowed := make([]bool, n)
	took := make([]time.Duration, n)
	for i := range creds {
		wg.Go(func() {
			s := time.Now()
			got[i], allowed[i] = check(creds[i])
			took[i] = time.Since(s)
		})
	}
	wg.Wait()
	var failed, denied int
	var slowest time.Duration
	for i := range creds {
		slowest = max(slowest, took[i])
		switch {
		case got[i] != codes.OK:
			failed++
		case !allowed[i]:
			denied++
		}
	}
	t.Logf("%d concurrent first checks: %d failed, %d denied, slowest %v", n, failed, denied, slowest)
	if failed > 0 || denied > 0 {
		t.Errorf("first %d checks after ready: %d failed (UNAVAILABLE), %d denied; want all allowed", n, failed, denied)
	}
}

// importTokens imports n random legacy tokens of tenant acme and returns them.
func (c *cluster) importTokens(n int) []string {
	c.t.Helper()
	var imp strings.Builder
	creds := make([]string, n)
	for i := range creds {
		var b [16]byte
		rand.Read(b[:])
		creds[i] = "legacy-" + hex.EncodeToString(b[:])
		fmt.Fprintf(&imp, `{"token":%q,"tenant_id":"acme"}`+"\n", creds[i])
	}
	c.ok(imp.String(), "keys", "import")
	return creds
}
