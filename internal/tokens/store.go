package tokens

import (
	"context"
	"fmt"
	"time"
)

// Store is a key store: the two lookups the authenticator needs, and the
// management operations of the keys CLI. Implementations live in leaf
// packages (filestore, pgstore) and pass the suite in storetest.
type Store interface {
	Finder
	// Ping reports whether the store can answer.
	Ping(ctx context.Context) error
	// Create adds a key; ErrConflict if its id, public key or token
	// digest exists.
	Create(ctx context.Context, k *Key) error
	// Import adds all keys or none. A conflict is an *ImportError naming
	// the offending key's index.
	Import(ctx context.Context, keys []*Key) error
	// List returns the keys of a tenant ("" for all), revoked ones
	// included, oldest first.
	List(ctx context.Context, tenant string) ([]*Key, error)
	// KeyByID returns a key, revoked or not; ErrNotFound for an unknown id.
	KeyByID(ctx context.Context, id string) (*Key, error)
	// Revoke marks a key revoked at at; ErrNotFound for an unknown id.
	// Revoking a revoked key keeps its first revocation time.
	Revoke(ctx context.Context, id string, at time.Time) error
	// RevokeTenant revokes every active key of a tenant and returns their ids.
	RevokeTenant(ctx context.Context, tenant string, at time.Time) ([]string, error)
	// Delete removes a key; ErrNotFound for an unknown id.
	Delete(ctx context.Context, id string) error
	// RecordUsage adds request counts and advances last-used times. Ids
	// that no longer exist are ignored.
	RecordUsage(ctx context.Context, usage []Usage) error
	// Watch calls fn for every change made to the store by anyone, until
	// ctx ends. A store that lost track of changes catches up on them
	// (Recovered) or, when it cannot, reports All.
	Watch(ctx context.Context, fn func(Change)) error
	Close() error
}

// Usage is the activity of one key since the last write.
type Usage struct {
	KeyID    string
	LastUsed time.Time
	Requests int64
}

// Change names what a store change may have made stale.
type Change struct {
	KeyIDs []string // keys revoked, deleted or modified
	// Seqs, when set, has one entry per KeyIDs: the store's change sequence
	// of that key's change (see Key.Version). Shared entries of the key
	// read before it are never adopted after it.
	Seqs   []int64
	Tenant string // every key of this tenant
	Added  bool   // keys were created: cached "unknown" denials are stale
	All    bool   // the store cannot say: drop everything
	// Floor: no shared entry read before this change sequence is adopted
	// from now on (with All: a TRUNCATE, or changes missed that could not
	// be caught up on; alone: a store with no history, at start).
	Floor int64
	// Recovered: learned by catching up after the notifications were
	// interrupted, or from the store's history at start, rather than as it
	// happened. The shared tier is not touched: its entries older than
	// the change are refused by version.
	Recovered bool

	Source string    // "postgres", "file" or "redis", for the lag metric
	SentAt time.Time // when the change was made or sent; zero if unknown
}

// Apply drops the cached decisions a change makes stale: in process, and
// for named keys in the shared tier too. Every replica applies every
// change it hears of, so a shared entry written by a replica that had not
// heard yet is deleted by that replica when it does.
func (a *Authenticator) Apply(ctx context.Context, c Change) int {
	a.remember(c)
	n := a.applyLocal(c)
	if len(c.KeyIDs) > 0 && a.opts.Shared != nil && !c.Recovered && a.sharedUp() {
		sctx, cancel := context.WithTimeout(ctx, 4*a.opts.SharedTimeout)
		defer cancel()
		if err := a.opts.Shared.Forget(sctx, c.KeyIDs); err != nil {
			a.sharedFailed(err)
		}
		// Again: a check that began after the first drop may have read the
		// shared entry before it was deleted, and cached it in process.
		n += a.applyLocal(c)
	}
	return n
}

func (a *Authenticator) applyLocal(c Change) int {
	if c.All {
		return a.InvalidateAll()
	}
	n := 0
	if c.Tenant != "" {
		n += a.InvalidateTenant(c.Tenant)
	}
	n += a.InvalidateKeys(c.KeyIDs...)
	if c.Added {
		n += a.ForgetUnknown()
	}
	return n
}

// ImportError names the key of an import batch that could not be stored.
type ImportError struct {
	Index int // 0-based position in the batch
	Err   error
}

func (e *ImportError) Error() string { return fmt.Sprintf("key %d: %v", e.Index, e.Err) }
func (e *ImportError) Unwrap() error { return e.Err }
