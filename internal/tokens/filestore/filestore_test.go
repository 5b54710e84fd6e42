package filestore

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/storetest"
)

func open(t *testing.T, path string) *Store {
	t.Helper()
	s, err := Open(path, Options{PollInterval: 20 * time.Millisecond, Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestStoreSuite(t *testing.T) {
	storetest.Run(t, func(t *testing.T) (tokens.Store, func() tokens.Store) {
		path := filepath.Join(t.TempDir(), "sub", "keys.json")
		return open(t, path), func() tokens.Store { return open(t, path) }
	})
}

// withKey opens a store in a new file holding one key.
func withKey(t *testing.T) (s *Store, path string, k *tokens.Key) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "keys.json")
	s = open(t, path)
	k = storetest.NewKey(t, "acme", tokens.KindPair)
	if err := s.Create(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	return s, path, k
}

func TestFileHoldsNoSecretAndIsPrivate(t *testing.T) {
	t.Parallel()
	_, path, _ := withKey(t)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	b, _ := os.ReadFile(path)
	if strings.Contains(string(b), "sk_") {
		t.Error("file contains a secret key")
	}
}

func TestCorruptFileKeepsLastGoodCopy(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "keys.json")
	s := open(t, path)
	ctx := context.Background()
	k := storetest.NewKey(t, "acme", tokens.KindPair)
	if err := s.Create(ctx, k); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(`{"version":1,"keys":[{"id":`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Ping(ctx); err == nil {
		t.Error("ping healthy on a corrupt file")
	}
	if _, err := s.KeyByPublic(ctx, k.PublicKey); err != nil {
		t.Errorf("lookup after corruption: %v, want the last good copy", err)
	}
	// Writers refuse to overwrite what they cannot read: no lost data.
	if err := s.Create(ctx, storetest.NewKey(t, "acme", tokens.KindToken)); err == nil {
		t.Error("write over a corrupt file succeeded")
	}
	if _, err := Open(path, Options{}); err == nil {
		t.Error("open of a corrupt file succeeded")
	}
}

func TestRejectsUnknownVersionAndFields(t *testing.T) {
	t.Parallel()
	for name, body := range map[string]string{
		"version": `{"version":2,"keys":[]}`,
		"field":   `{"version":1,"keys":[],"secret":"x"}`,
		"digest":  `{"version":1,"keys":[{"id":"a","kind":"token","digest":"zz"}]}`,
		"kind":    `{"version":1,"keys":[{"id":"a","kind":"jwt","digest":""}]}`,
	} {
		path := filepath.Join(t.TempDir(), name+".json")
		os.WriteFile(path, []byte(body), 0o600)
		if _, err := Open(path, Options{}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing.json"), Options{}); err != nil {
		t.Errorf("missing file: %v, want an empty store", err)
	}
}

// A lookup that reloads the file before the watcher's tick must not
// swallow the change: the watcher still reports it.
func TestLookupReloadDoesNotSwallowChange(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "keys.json")
	server := open(t, path)
	cli := open(t, path)
	ctx := context.Background()
	k := storetest.NewKey(t, "acme", tokens.KindPair)
	if err := cli.Create(ctx, k); err != nil {
		t.Fatal(err)
	}
	server.opts.PollInterval = 300 * time.Millisecond
	changes := make(chan tokens.Change, 10)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go server.Watch(wctx, func(c tokens.Change) { changes <- c })
	time.Sleep(50 * time.Millisecond)
	if err := cli.Revoke(ctx, k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	// The server's next lookup reloads the file before the watcher ticks.
	got, err := server.KeyByPublic(ctx, k.PublicKey)
	if err != nil || got.RevokedAt.IsZero() {
		t.Fatalf("lookup: %v %v", got, err)
	}
	for {
		select {
		case c := <-changes:
			for _, id := range c.KeyIDs {
				if id == k.ID {
					return
				}
			}
		case <-time.After(2 * time.Second):
			t.Fatal("the revocation was never reported")
		}
	}
}

// The file keeps no history: Watch starts by reporting the file's version
// as a floor, so shared entries read from an older file are refused.
func TestWatchStartsWithAFloor(t *testing.T) {
	t.Parallel()
	s, _, k := withKey(t)
	got, _ := s.KeyByPublic(context.Background(), k.PublicKey)
	changes := make(chan tokens.Change, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.Watch(ctx, func(c tokens.Change) {
		select {
		case changes <- c:
		default:
		}
	})
	if c := <-changes; c.Floor != got.Version || c.Floor == 0 || c.All {
		t.Fatalf("first report %+v, want a floor at the file's version %d without All", c, got.Version)
	}
}
