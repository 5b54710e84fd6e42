package pgstore

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"go.uber.org/zap/zaptest"

	"github.com/extauthz/extauthz/internal/testsvc"
	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/storetest"
)

// newStore opens a store on a fresh, migrated database.
func newStore(t *testing.T) (*Store, string) {
	t.Helper()
	dsn := testsvc.NewDatabase(t)
	s, err := Open(context.Background(), dsn, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if _, err := Migrate(context.Background(), s.Pool()); err != nil {
		t.Fatal(err)
	}
	return s, dsn
}

func TestStoreSuite(t *testing.T) {
	storetest.Run(t, func(t *testing.T) (tokens.Store, func() tokens.Store) {
		s, dsn := newStore(t)
		return s, func() tokens.Store {
			o, err := Open(context.Background(), dsn, zaptest.NewLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			return o
		}
	})
}

func TestMigrateIdempotentAndSchemaCheck(t *testing.T) {
	dsn := testsvc.NewDatabase(t)
	ctx := context.Background()
	s, err := Open(ctx, dsn, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Ping(ctx); !errors.Is(err, ErrSchema) {
		t.Fatalf("unmigrated ping: err = %v, want ErrSchema", err)
	}
	applied, err := Migrate(ctx, s.Pool())
	if err != nil || len(applied) != LatestVersion() {
		t.Fatalf("first migrate: %v, %v", applied, err)
	}
	applied, err = Migrate(ctx, s.Pool())
	if err != nil || len(applied) != 0 {
		t.Fatalf("second migrate applied %v, %v; want nothing", applied, err)
	}
	if err := s.Ping(ctx); err != nil {
		t.Fatalf("ping after migrate: %v", err)
	}
}

// An application that owns the keys may change them in plain SQL: the
// trigger must announce it.
func TestWatchSeesDirectSQL(t *testing.T) {
	s, _ := newStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	k := storetest.NewKey(t, "acme", tokens.KindPair)
	if err := s.Create(ctx, k); err != nil {
		t.Fatal(err)
	}
	changes := make(chan tokens.Change, 10)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	go s.Watch(wctx, func(c tokens.Change) {
		if !c.Recovered {
			changes <- c
		}
	})
	waitListening(t, s)

	for _, stmt := range []string{
		`UPDATE extauthz.keys SET expires_at = now() WHERE id = $1`,
		`UPDATE extauthz.keys SET scopes = '{admin}' WHERE id = $1`,
		`DELETE FROM extauthz.keys WHERE id = $1`,
	} {
		if _, err := s.Pool().Exec(ctx, stmt, k.ID); err != nil {
			t.Fatal(err)
		}
		select {
		case c := <-changes:
			if len(c.KeyIDs) != 1 || c.KeyIDs[0] != k.ID || len(c.Seqs) != 1 || c.Seqs[0] <= k.Version {
				t.Fatalf("%s: change %+v, want key %s at a version above %d", stmt, c, k.ID, k.Version)
			}
			k.Version = c.Seqs[0]
		case <-time.After(time.Second):
			t.Fatalf("%s: no notification within a second", stmt)
		}
	}
	if _, err := s.Pool().Exec(ctx, `TRUNCATE extauthz.keys`); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-changes:
		if !c.All || c.Floor <= k.Version {
			t.Fatalf("truncate: change %+v, want All with a floor above %d", c, k.Version)
		}
	case <-time.After(time.Second):
		t.Fatal("truncate: no notification")
	}
}

func TestRejectsBadRows(t *testing.T) {
	s, _ := newStore(t)
	ctx := context.Background()
	k := storetest.NewKey(t, "bad tenant!", tokens.KindToken)
	if err := s.Create(ctx, k); err == nil {
		t.Error("tenant id outside the allowed alphabet stored")
	}
	if err := s.Revoke(ctx, "not-a-uuid", time.Now()); !errors.Is(err, tokens.ErrNotFound) {
		t.Errorf("revoke of a non-uuid: %v, want ErrNotFound", err)
	}
}

func TestParseNotification(t *testing.T) {
	for payload, want := range map[string]tokens.Change{
		`{"op":"insert","id":"a","tenant":"t","seq":3}`: {Added: true},
		`{"op":"delete","id":"a","tenant":"t","seq":4}`: {KeyIDs: []string{"a"}, Seqs: []int64{4}},
		`{"op":"truncate","seq":5}`:                     {All: true, Floor: 5},
	} {
		got, err := parseNotification(payload)
		if err != nil || got.Added != want.Added || got.All != want.All || got.Floor != want.Floor ||
			len(got.KeyIDs) != len(want.KeyIDs) || len(got.Seqs) != len(want.Seqs) {
			t.Errorf("%s: %+v %v, want %+v", payload, got, err, want)
		}
	}
	// Anything else makes Watch reconnect and catch up from the log.
	for _, payload := range []string{`garbage`, `{"op":"drop"}`, `{"op":"update"}`} {
		if c, err := parseNotification(payload); err == nil {
			t.Errorf("%s: %+v, want an error", payload, c)
		}
	}
}

func waitListening(t *testing.T, s *Store) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !s.Listening() {
		if time.Now().After(deadline) {
			t.Fatal("not listening after 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A LISTEN connection that goes silent (half-open: nothing is closed, no
// byte arrives) is found dead by its heartbeat and replaced, and what
// changed meanwhile, a revocation and a delete in plain SQL, is caught up
// from the change log.
func TestWatchCatchesUpAfterAFrozenConnection(t *testing.T) {
	direct, dsn := newStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	revoked, deleted := storetest.NewKey(t, "acme", tokens.KindPair), storetest.NewKey(t, "acme", tokens.KindPair)
	for _, k := range []*tokens.Key{revoked, deleted} {
		if err := direct.Create(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	proxy := testsvc.NewProxy(t, "127.0.0.1:5432")
	u, _ := url.Parse(dsn)
	u.Host = proxy.Addr()
	s, err := Open(ctx, u.String(), zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var mu sync.Mutex
	seen := map[string]int64{}
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	go s.Watch(wctx, func(c tokens.Change) {
		mu.Lock()
		defer mu.Unlock()
		for i, id := range c.KeyIDs {
			if i < len(c.Seqs) {
				seen[id] = max(seen[id], c.Seqs[i])
			}
		}
	})
	waitListening(t, s)
	proxy.Freeze()
	if _, err := direct.Pool().Exec(ctx, `UPDATE extauthz.keys SET revoked_at = now() WHERE id = $1`, revoked.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Pool().Exec(ctx, `DELETE FROM extauthz.keys WHERE id = $1`, deleted.ID); err != nil {
		t.Fatal(err)
	}
	for {
		mu.Lock()
		done := seen[revoked.ID] > 0 && seen[deleted.ID] > 0
		mu.Unlock()
		if done {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("changes made while the LISTEN connection was frozen never reported")
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitListening(t, s)
}

// migrate upgrades a database of an earlier release: its keys get
// versions, and changes from then on are logged.
func TestMigrateUpgradesVersion2(t *testing.T) {
	dsn := testsvc.NewDatabase(t)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	ms, err := migrations()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `CREATE SCHEMA extauthz; CREATE TABLE extauthz.schema_migrations (
		version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		t.Fatal(err)
	}
	for _, m := range ms[:2] {
		if _, err := conn.Exec(ctx, m.sql); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Exec(ctx, `INSERT INTO extauthz.schema_migrations (version, name) VALUES ($1, $2)`, m.version, m.name); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := conn.Exec(ctx, `INSERT INTO extauthz.keys (id, tenant_id, kind, digest, pepper_id)
		VALUES ('00000000-0000-4000-8000-000000000001', 'acme', 'token', decode(repeat('ab', 32), 'hex'), 'k1')`); err != nil {
		t.Fatal(err)
	}
	s, err := Open(ctx, dsn, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if applied, err := Migrate(ctx, s.Pool()); err != nil || len(applied) != LatestVersion()-2 {
		t.Fatalf("upgrade applied %v, %v", applied, err)
	}
	var v1, v2, logged int64
	if err := conn.QueryRow(ctx, `SELECT version FROM extauthz.keys`).Scan(&v1); err != nil || v1 <= 0 {
		t.Fatalf("existing key's version %d, %v; want one from the sequence", v1, err)
	}
	if err := s.Revoke(ctx, "00000000-0000-4000-8000-000000000001", time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(ctx, `SELECT version, (SELECT count(*) FROM extauthz.key_changes WHERE seq = version) FROM extauthz.keys`).Scan(&v2, &logged); err != nil {
		t.Fatal(err)
	}
	if v2 <= v1 || logged != 1 {
		t.Fatalf("after a revoke: version %d (was %d), logged %d; want a higher version, logged once", v2, v1, logged)
	}
}

// The default bound of lookups in flight follows the pool's size (the
// authenticator scales it by the store timeout, and sheds past it).
func TestLookupConcurrencyFollowsThePool(t *testing.T) {
	t.Parallel()
	dsn := testsvc.NewDatabase(t)
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	s, err := Open(context.Background(), dsn+sep+"pool_max_conns=6", zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var _ tokens.ConcurrencyLimiter = s
	if n := s.LookupConcurrency(); n != 6 {
		t.Errorf("LookupConcurrency with pool_max_conns=6: %d, want 6", n)
	}
}

// TestDeadlineKeepsPoolConnections pins that a lookup past its deadline
// neither destroys its pool connection nor waits for the cancellation:
// with the table locked (a slow Postgres), every lookup fails at its
// deadline, and no new connection is opened for the ones that follow.
func TestDeadlineKeepsPoolConnections(t *testing.T) {
	s, dsn := newStore(t)
	ctx := context.Background()
	if err := s.Ping(ctx); err != nil { // warms the pool
		t.Fatal(err)
	}
	before := s.Pool().Stat().NewConnsCount()
	if min := s.Pool().Config().MinConns; int64(min) > before || min == 0 {
		t.Fatalf("warm pool: %d connections made, want MinConns (%d, above 0)", before, min)
	}

	locker, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer locker.Close(ctx)
	tx, err := locker.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE extauthz.keys IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	const timeout = 100 * time.Millisecond
	for i := range 10 {
		lctx, cancel := context.WithTimeout(ctx, timeout)
		start := time.Now()
		_, err := s.KeyByPublic(lctx, "nosuchkey")
		took := time.Since(start)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("lookup %d against a locked table: got %v, want a deadline error", i, err)
		}
		if took > timeout+50*time.Millisecond {
			t.Errorf("lookup %d returned after %v, want about its %v deadline", i, took, timeout)
		}
		time.Sleep(50 * time.Millisecond) // the cancellation's own round trip
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // the last cancellations settle
	for i := range 10 {
		if _, err := s.KeyByPublic(ctx, "nosuchkey"); !errors.Is(err, tokens.ErrNotFound) {
			t.Fatalf("lookup %d after the lock: got %v, want ErrNotFound", i, err)
		}
	}
	if after := s.Pool().Stat().NewConnsCount(); after != before {
		t.Errorf("new pool connections: %d before 10 lookups past their deadline, %d after; want none made", before, after)
	}
}
