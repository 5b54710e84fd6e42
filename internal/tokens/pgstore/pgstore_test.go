package pgstore

import (
	"context"
	"errors"
	"testing"
	"time"

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
	go s.Watch(wctx, func(c tokens.Change) { changes <- c })
	time.Sleep(300 * time.Millisecond)

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
			if len(c.KeyIDs) != 1 || c.KeyIDs[0] != k.ID {
				t.Fatalf("%s: change %+v", stmt, c)
			}
		case <-time.After(time.Second):
			t.Fatalf("%s: no notification within a second", stmt)
		}
	}
	if _, err := s.Pool().Exec(ctx, `TRUNCATE extauthz.keys`); err != nil {
		t.Fatal(err)
	}
	select {
	case c := <-changes:
		if !c.All {
			t.Fatalf("truncate: change %+v, want All", c)
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
		`{"op":"insert","id":"a","tenant":"t"}`: {Added: true},
		`{"op":"delete","id":"a","tenant":"t"}`: {KeyIDs: []string{"a"}},
		`{"op":"truncate"}`:                     {All: true},
		`garbage`:                               {All: true},
	} {
		got := parseNotification(payload)
		if got.Added != want.Added || got.All != want.All || len(got.KeyIDs) != len(want.KeyIDs) {
			t.Errorf("%s: %+v, want %+v", payload, got, want)
		}
	}
}
