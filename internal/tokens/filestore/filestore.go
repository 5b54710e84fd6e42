// Package filestore is a tokens.Store in one JSON file, for a laptop or a
// single node. The file holds digests only, never a secret. Writers take an
// exclusive flock on a sibling lock file, re-read the file, and replace it
// atomically (write, fsync, rename, fsync the directory), so the CLI and a
// running server can share it. Readers poll the file's identity and reload
// on change.
package filestore

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/extauthz/extauthz/internal/tokens"
)

const fileVersion = 1

// Options tune a Store.
type Options struct {
	PollInterval time.Duration // how often Watch checks the file; default 200ms
	Logger       *zap.Logger
}

// Store is a file-backed key store.
type Store struct {
	path     string
	lockPath string
	opts     Options
	log      *zap.Logger
	mu       sync.Mutex // serialises reloads and writes within this process
	snap     atomic.Pointer[snapshot]
	loadErr  atomic.Pointer[error] // last reload failure, nil when healthy
}

var (
	_ tokens.Store           = (*Store)(nil)
	_ tokens.UsageBatchSizer = (*Store)(nil)
)

type stamp struct {
	exists bool
	size   int64
	mtime  time.Time
	ino    uint64
}

type snapshot struct {
	stamp    stamp
	keys     []*tokens.Key // file order (creation order)
	byID     map[string]*tokens.Key
	byPublic map[string]*tokens.Key
	byDigest map[string]*tokens.Key // tokens only, by string(digest)
}

// Open opens (without creating) the store at path. A missing file is an
// empty store; its directory is created on the first write.
func Open(path string, o Options) (*Store, error) {
	if o.PollInterval <= 0 {
		o.PollInterval = 200 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	s := &Store{path: path, lockPath: path + ".lock", opts: o, log: o.Logger}
	s.snap.Store(newSnapshot(stamp{}, nil))
	if err := s.refresh(); err != nil {
		return nil, err
	}
	return s, nil
}

// version is the file's modification time in unix nanoseconds; 0 when
// there is no file.
func (st stamp) version() int64 {
	if !st.exists {
		return 0
	}
	return st.mtime.UnixNano()
}

func statOf(path string) (stamp, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return stamp{}, nil
	}
	if err != nil {
		return stamp{}, err
	}
	st := stamp{exists: true, size: fi.Size(), mtime: fi.ModTime()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.ino = sys.Ino
	}
	return st, nil
}

// refresh reloads the file if it changed. On a read or parse failure the
// last good snapshot stays in use and the error is reported by Ping.
func (s *Store) refresh() error {
	st, err := statOf(s.path)
	if err == nil && st == s.snap.Load().stamp {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reloadLocked()
}

func (s *Store) reloadLocked() error {
	st, keys, err := readFile(s.path)
	if err != nil {
		s.loadErr.Store(&err)
		return err
	}
	s.loadErr.Store(nil)
	if st != s.snap.Load().stamp {
		s.snap.Store(newSnapshot(st, keys))
	}
	return nil
}

// newSnapshot indexes keys read from a file of stamp st. Every key's
// version is the file's modification time, which every write advances
// (see update): a key read from a later file is at least as recent as any
// change the watcher reported before.
func newSnapshot(st stamp, keys []*tokens.Key) *snapshot {
	sn := &snapshot{stamp: st, keys: keys, byID: map[string]*tokens.Key{},
		byPublic: map[string]*tokens.Key{}, byDigest: map[string]*tokens.Key{}}
	for _, k := range keys {
		k.Version = st.version()
		sn.byID[k.ID] = k
		if k.Kind == tokens.KindPair {
			sn.byPublic[k.PublicKey] = k
		} else {
			sn.byDigest[string(k.Digest)] = k
		}
	}
	return sn
}

// current returns an up-to-date snapshot: one stat per call, which keeps a
// short-lived CLI process and a miss in the server consistent with disk.
func (s *Store) current() *snapshot {
	if err := s.refresh(); err != nil {
		s.log.Warn("key file unreadable; serving the last good copy", zap.String("path", s.path), zap.Error(err))
	}
	return s.snap.Load()
}

func clone(k *tokens.Key) *tokens.Key {
	c := *k
	c.Digest = slices.Clone(k.Digest)
	c.Scopes = slices.Clone(k.Scopes)
	return &c
}

// KeyByPublic implements tokens.Finder.
func (s *Store) KeyByPublic(_ context.Context, pk string) (*tokens.Key, error) {
	if k := s.current().byPublic[pk]; k != nil {
		return clone(k), nil
	}
	return nil, tokens.ErrNotFound
}

// KeyByID implements tokens.Store.
func (s *Store) KeyByID(ctx context.Context, id string) (*tokens.Key, error) {
	if err := s.Ping(ctx); err != nil {
		return nil, err
	}
	for _, k := range s.snap.Load().keys {
		if k.ID == id {
			return clone(k), nil
		}
	}
	return nil, tokens.ErrNotFound
}

// KeyByDigest implements tokens.Finder.
func (s *Store) KeyByDigest(_ context.Context, ds []tokens.Digest) (*tokens.Key, error) {
	sn := s.current()
	for i := range ds {
		if k := sn.byDigest[string(ds[i][:])]; k != nil {
			return clone(k), nil
		}
	}
	return nil, tokens.ErrNotFound
}

// Ping reports the last reload failure, if the file is unreadable.
func (s *Store) Ping(context.Context) error {
	s.current()
	if p := s.loadErr.Load(); p != nil {
		return *p
	}
	return nil
}

// List implements tokens.Store.
func (s *Store) List(_ context.Context, tenant string) ([]*tokens.Key, error) {
	if err := s.Ping(context.Background()); err != nil {
		return nil, err
	}
	var out []*tokens.Key
	for _, k := range s.snap.Load().keys {
		if tenant == "" || k.TenantID == tenant {
			out = append(out, clone(k))
		}
	}
	slices.SortStableFunc(out, func(a, b *tokens.Key) int { return a.CreatedAt.Compare(b.CreatedAt) })
	return out, nil
}

// Create implements tokens.Store.
func (s *Store) Create(ctx context.Context, k *tokens.Key) error {
	return s.Import(ctx, []*tokens.Key{k})
}

// Import implements tokens.Store.
func (s *Store) Import(_ context.Context, keys []*tokens.Key) error {
	return s.update(func(ks []*tokens.Key) ([]*tokens.Key, error) {
		sn := newSnapshot(stamp{}, ks)
		for i, k := range keys {
			dup := sn.byID[k.ID] != nil ||
				(k.Kind == tokens.KindPair && sn.byPublic[k.PublicKey] != nil) ||
				(k.Kind == tokens.KindToken && sn.byDigest[string(k.Digest)] != nil)
			if dup {
				if len(keys) == 1 {
					return nil, tokens.ErrConflict
				}
				return nil, &tokens.ImportError{Index: i, Err: tokens.ErrConflict}
			}
			c := clone(k)
			sn.byID[c.ID], ks = c, append(ks, c)
			if c.Kind == tokens.KindPair {
				sn.byPublic[c.PublicKey] = c
			} else {
				sn.byDigest[string(c.Digest)] = c
			}
		}
		return ks, nil
	})
}

// Revoke implements tokens.Store.
func (s *Store) Revoke(_ context.Context, id string, at time.Time) error {
	return s.update(func(ks []*tokens.Key) ([]*tokens.Key, error) {
		for _, k := range ks {
			if k.ID == id {
				if k.RevokedAt.IsZero() {
					k.RevokedAt = at
				}
				return ks, nil
			}
		}
		return nil, tokens.ErrNotFound
	})
}

// RevokeTenant implements tokens.Store.
func (s *Store) RevokeTenant(_ context.Context, tenant string, at time.Time) ([]string, error) {
	var ids []string
	err := s.update(func(ks []*tokens.Key) ([]*tokens.Key, error) {
		ids = nil
		for _, k := range ks {
			if k.TenantID == tenant && k.RevokedAt.IsZero() {
				k.RevokedAt = at
				ids = append(ids, k.ID)
			}
		}
		return ks, nil
	})
	return ids, err
}

// Delete implements tokens.Store.
func (s *Store) Delete(_ context.Context, id string) error {
	return s.update(func(ks []*tokens.Key) ([]*tokens.Key, error) {
		for i, k := range ks {
			if k.ID == id {
				return slices.Delete(ks, i, i+1), nil
			}
		}
		return nil, tokens.ErrNotFound
	})
}

// UsageBatchSize implements tokens.UsageBatchSizer: every write rewrites
// (and every server re-reads) the whole key file, so pending usage is
// written at once, not in batches.
func (s *Store) UsageBatchSize() int { return 0 }

// RecordUsage implements tokens.Store.
func (s *Store) RecordUsage(_ context.Context, usage []tokens.Usage) error {
	if len(usage) == 0 {
		return nil
	}
	return s.update(func(ks []*tokens.Key) ([]*tokens.Key, error) {
		byID := make(map[string]*tokens.Key, len(ks))
		for _, k := range ks {
			byID[k.ID] = k
		}
		for _, u := range usage {
			if k := byID[u.KeyID]; k != nil {
				k.RequestCount += u.Requests
				if u.LastUsed.After(k.LastUsedAt) {
					k.LastUsedAt = u.LastUsed
				}
			}
		}
		return ks, nil
	})
}

// Watch polls the file and reports what changed, until ctx ends. It diffs
// against the snapshot it last reported, whoever reloaded the file since:
// lookups reload too, and must not swallow a change.
//
// The file keeps no history of changes: at start, Watch reports the
// current file's version as a floor, so that no shared entry read from an
// older file (before a change this process never saw) is adopted. Lookups
// in the file cost no network round trip, so refusing them costs little.
func (s *Store) Watch(ctx context.Context, fn func(tokens.Change)) error {
	t := time.NewTicker(s.opts.PollInterval)
	defer t.Stop()
	seen := s.snap.Load()
	fn(tokens.Change{Floor: seen.stamp.version(), Recovered: true, Source: "file"})
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		if err := s.refresh(); err != nil {
			s.log.Warn("key file unreadable; serving the last good copy", zap.String("path", s.path), zap.Error(err))
			continue
		}
		if cur := s.snap.Load(); cur != seen {
			if c, ok := diff(seen, cur); ok {
				fn(c)
			}
			seen = cur
		}
	}
}

// diff names the keys whose decisions may differ between two snapshots:
// changed, deleted and new ones. Usage fields are not compared: they change
// on every flush and decide nothing.
func diff(old, cur *snapshot) (tokens.Change, bool) {
	var c tokens.Change
	for id, o := range old.byID {
		n := cur.byID[id]
		if n == nil || !sameDecision(o, n) {
			c.KeyIDs = append(c.KeyIDs, id)
		}
	}
	for id := range cur.byID {
		if old.byID[id] == nil {
			// New since the last report, but a lookup may have cached it
			// from a snapshot in between, before a later change: name it.
			c.Added = true
			c.KeyIDs = append(c.KeyIDs, id)
		}
	}
	c.Source, c.SentAt = "file", cur.stamp.mtime
	c.Seqs = make([]int64, len(c.KeyIDs))
	for i := range c.Seqs {
		c.Seqs[i] = cur.stamp.version()
	}
	return c, c.Added || len(c.KeyIDs) > 0
}

func sameDecision(a, b *tokens.Key) bool {
	return a.TenantID == b.TenantID && a.Kind == b.Kind && a.PublicKey == b.PublicKey &&
		bytes.Equal(a.Digest, b.Digest) && a.PepperID == b.PepperID && slices.Equal(a.Scopes, b.Scopes) &&
		a.ExpiresAt.Equal(b.ExpiresAt) && a.RevokedAt.Equal(b.RevokedAt)
}

// Close implements tokens.Store.
func (s *Store) Close() error { return nil }

// update runs a read-modify-write under the cross-process lock. fn gets
// the keys as on disk now and returns the new list.
func (s *Store) update(fn func([]*tokens.Key) ([]*tokens.Key, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.MkdirAll(filepath.Dir(s.path), 0o700); err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	lf, err := os.OpenFile(s.lockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("filestore: lock: %w", err)
	}
	defer lf.Close()
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("filestore: lock: %w", err)
	}
	defer syscall.Flock(int(lf.Fd()), syscall.LOCK_UN)

	prev, keys, err := readFile(s.path)
	if err != nil {
		return err
	}
	keys, err = fn(keys)
	if err != nil {
		return err
	}
	if err := writeFile(s.path, keys, prev.mtime); err != nil {
		return err
	}
	return s.reloadLocked()
}

// On-disk form.
type fileData struct {
	Version int       `json:"version"`
	Keys    []fileKey `json:"keys"`
}

type fileKey struct {
	ID           string     `json:"id"`
	TenantID     string     `json:"tenant_id"`
	Name         string     `json:"name"`
	Kind         string     `json:"kind"`
	PublicKey    string     `json:"public_key,omitempty"`
	Digest       string     `json:"digest"`
	PepperID     string     `json:"pepper_id"`
	Scopes       []string   `json:"scopes"`
	CreatedAt    time.Time  `json:"created_at"`
	ExpiresAt    *time.Time `json:"expires_at"`
	RevokedAt    *time.Time `json:"revoked_at"`
	LastUsedAt   *time.Time `json:"last_used_at"`
	RequestCount int64      `json:"request_count"`
}

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}

func timeOf(p *time.Time) time.Time {
	if p == nil {
		return time.Time{}
	}
	return p.UTC()
}

func readFile(path string) (stamp, []*tokens.Key, error) {
	for {
		st, err := statOf(path)
		if err != nil {
			return stamp{}, nil, fmt.Errorf("filestore: %w", err)
		}
		if !st.exists {
			return st, nil, nil
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // replaced between stat and read
		}
		if err != nil {
			return stamp{}, nil, fmt.Errorf("filestore: %w", err)
		}
		if after, err := statOf(path); err != nil || after != st {
			continue // replaced while reading: read the new one
		}
		keys, err := decode(b)
		if err != nil {
			return stamp{}, nil, fmt.Errorf("filestore: %s: %w", path, err)
		}
		return st, keys, nil
	}
}

func decode(b []byte) ([]*tokens.Key, error) {
	var fd fileData
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fd); err != nil {
		return nil, err
	}
	if fd.Version != fileVersion {
		return nil, fmt.Errorf("version %d, want %d", fd.Version, fileVersion)
	}
	keys := make([]*tokens.Key, 0, len(fd.Keys))
	for i, f := range fd.Keys {
		kind, err := tokens.ParseKind(f.Kind)
		if err != nil {
			return nil, fmt.Errorf("key %d: %w", i, err)
		}
		d, err := hex.DecodeString(f.Digest)
		if err != nil || len(d) != len(tokens.Digest{}) {
			return nil, fmt.Errorf("key %d: digest is not 64 hex digits", i)
		}
		keys = append(keys, &tokens.Key{
			ID: f.ID, TenantID: f.TenantID, Name: f.Name, Kind: kind, PublicKey: f.PublicKey,
			Digest: d, PepperID: f.PepperID, Scopes: f.Scopes, CreatedAt: f.CreatedAt.UTC(),
			ExpiresAt: timeOf(f.ExpiresAt), RevokedAt: timeOf(f.RevokedAt),
			LastUsedAt: timeOf(f.LastUsedAt), RequestCount: f.RequestCount,
		})
	}
	return keys, nil
}

// writeFile replaces the key file with keys. Its modification time is
// later than after, the replaced file's: file timestamps are coarse (a
// clock tick), and two writes within one must still be told apart, since
// keys take their version from it.
func writeFile(path string, keys []*tokens.Key, after time.Time) error {
	fd := fileData{Version: fileVersion, Keys: make([]fileKey, 0, len(keys))}
	for _, k := range keys {
		scopes := k.Scopes
		if scopes == nil {
			scopes = []string{}
		}
		fd.Keys = append(fd.Keys, fileKey{
			ID: k.ID, TenantID: k.TenantID, Name: k.Name, Kind: k.Kind.String(), PublicKey: k.PublicKey,
			Digest: hex.EncodeToString(k.Digest), PepperID: k.PepperID, Scopes: scopes,
			CreatedAt: k.CreatedAt.UTC(), ExpiresAt: timePtr(k.ExpiresAt), RevokedAt: timePtr(k.RevokedAt),
			LastUsedAt: timePtr(k.LastUsedAt), RequestCount: k.RequestCount,
		})
	}
	b, err := json.MarshalIndent(fd, "", "  ")
	if err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	return writeAtomic(path, append(b, '\n'), 0o600, after)
}

// WriteAtomic replaces path with data: readers see the old file or the new
// one, never a part, and a crash leaves one of the two.
func WriteAtomic(path string, data []byte, mode os.FileMode) error {
	return writeAtomic(path, data, mode, time.Time{})
}

// writeAtomic is WriteAtomic giving the file a modification time later
// than after.
func writeAtomic(path string, data []byte, mode os.FileMode, after time.Time) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("filestore: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("filestore: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("filestore: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	if !after.IsZero() {
		if fi, err := os.Stat(tmp.Name()); err == nil && !fi.ModTime().After(after) {
			t := after.Add(time.Microsecond)
			if err := os.Chtimes(tmp.Name(), t, t); err != nil {
				return fmt.Errorf("filestore: %w", err)
			}
		}
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("filestore: %w", err)
	}
	return nil
}
