package tokens

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// Finder is what the authenticator needs from a key store: two indexed
// lookups. Both return ErrNotFound for a key they do not hold, and any other
// error for a store that could not answer.
type Finder interface {
	KeyByPublic(ctx context.Context, publicKey string) (*Key, error)
	// KeyByDigest finds the token whose digest is any of digests (one per
	// configured pepper).
	KeyByDigest(ctx context.Context, digests []Digest) (*Key, error)
}

// Options tune the authenticator. Zero values take the documented defaults.
type Options struct {
	CacheSize    int           // entries; default 100000
	TTL          time.Duration // positive decisions; default 5m
	NegativeTTL  time.Duration // denials; default 30s
	MaxStale     time.Duration // serve past TTL while the store is down; 0 disables
	StoreTimeout time.Duration // per store lookup; default 100ms
	// Shared is the optional tier shared by replicas (Redis); nil: none.
	Shared SharedCache
	// SharedSealer authenticates shared entries; default: the hasher's
	// peppers with an empty domain. Give every replica the same one.
	SharedSealer  *SharedSealer
	SharedTimeout time.Duration // per shared-tier call; default 25ms
	// SharedRetry is how long the shared tier is skipped after an error,
	// so an outage costs one timeout a period, not one per miss. Default 1s.
	SharedRetry time.Duration
	// MaxStoreLookups bounds the store lookups in flight; a miss past it
	// is shed at once (ErrUnavailable) instead of queueing for a
	// connection until its deadline. 0: the store's own bound (see
	// ConcurrencyLimiter), unbounded if it has none.
	MaxStoreLookups int
	Now             func() time.Time
	Logger          *zap.Logger
}

// ConcurrencyLimiter is a store that can serve only so many lookups at
// once (a connection pool's size); the default bound of store lookups in
// flight is that many per millisecond of the store timeout.
type ConcurrencyLimiter interface {
	LookupConcurrency() int
}

// Stats are cumulative counters, safe to read at any time.
type Stats struct {
	CacheHits, CacheNegativeHits, CacheMisses atomic.Uint64
	StaleServed                               atomic.Uint64
	StoreLookups, StoreErrors                 atomic.Uint64
	StoreShed                                 atomic.Uint64 // misses not looked up: MaxStoreLookups in flight
	SharedLookups                             atomic.Uint64 // misses answered by another caller's lookup
	Invalidated                               atomic.Uint64 // cache entries dropped by invalidation
	SharedHits, SharedMisses, SharedErrors    atomic.Uint64
	SharedSkipped                             atomic.Uint64 // shared tier not asked: recently failed
	SharedRejected                            atomic.Uint64 // shared entries forged, altered or invalid: deleted
	SharedOutdated                            atomic.Uint64 // shared entries older than a change this replica knows of: deleted
	Uncached                                  atomic.Uint64 // lookups not cached: an invalidation overlapped them
}

// Authenticator resolves credentials to principals: one HMAC, then the
// in-process cache, and on a miss one store lookup shared by every
// concurrent request for the same credential.
type Authenticator struct {
	hasher *Hasher
	store  Finder
	cache  *Cache
	// lookupSlots bounds the store lookups in flight; nil: unbounded.
	lookupSlots chan struct{}
	flights     singleflight.Group
	opts        Options
	log         *zap.Logger
	stats       Stats
	// invalidations counts invalidations. A lookup that overlapped one
	// must not leave its result cached: invalidators bump it before they
	// delete, lookups re-check it after they write.
	invalidations atomic.Uint64
	sharedDown    atomic.Int64 // unix nanoseconds until which the shared tier is skipped
	seal          *SharedSealer
	rejectLogged  atomic.Int64 // unix nanoseconds of the last rejection logged

	// What this replica knows of recent changes, to judge shared entries
	// by (see changes.go): an entry stamped with a key version older than a
	// change of that key this replica has heard of, or older than the
	// floor, is never adopted.
	memMu      sync.Mutex
	mem        map[string]keyChange
	memFor     time.Duration
	floor      atomic.Int64 // no shared entry of a key read before this change sequence is adopted
	tombAll    atomic.Int64 // unix nanoseconds until which no shared entry is adopted
	tombWindow time.Duration
}

// NewAuthenticator wires the lookup chain.
func NewAuthenticator(h *Hasher, store Finder, o Options) *Authenticator {
	if o.CacheSize <= 0 {
		o.CacheSize = 100000
	}
	if o.TTL <= 0 {
		o.TTL = 5 * time.Minute
	}
	if o.NegativeTTL <= 0 {
		o.NegativeTTL = 30 * time.Second
	}
	if o.StoreTimeout <= 0 {
		o.StoreTimeout = 100 * time.Millisecond
	}
	if o.SharedTimeout <= 0 {
		o.SharedTimeout = 25 * time.Millisecond
	}
	if o.SharedRetry <= 0 {
		o.SharedRetry = time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	// A stale shared write can only be made within one store lookup and
	// one shared write of the change; the window covers that generously.
	window := max(2*time.Second, 4*(o.StoreTimeout+o.SharedTimeout))
	if o.SharedSealer == nil {
		o.SharedSealer = h.SharedSealer("")
	}
	if o.MaxStoreLookups <= 0 {
		if l, ok := store.(ConcurrencyLimiter); ok {
			// What the connections drain within the deadline at about a
			// millisecond a lookup: a burst of first checks (a cold start)
			// is served, a flood that would only wait out its deadline is
			// shed.
			o.MaxStoreLookups = l.LookupConcurrency() * max(1, int(o.StoreTimeout/time.Millisecond))
		}
	}
	a := &Authenticator{hasher: h, store: store, cache: NewCache(o.CacheSize), opts: o, log: o.Logger,
		mem: map[string]keyChange{}, memFor: o.TTL + o.MaxStale + rememberMargin, tombWindow: window, seal: o.SharedSealer}
	if o.MaxStoreLookups > 0 {
		a.lookupSlots = make(chan struct{}, o.MaxStoreLookups)
	}
	return a
}

// ErrOverloaded is a miss shed because MaxStoreLookups were in flight; it
// wraps ErrUnavailable, so the check fails as an outage (or is answered
// from a stale cached decision).
var ErrOverloaded = fmt.Errorf("%w: store lookups at their bound; shed", ErrUnavailable)

// Remembers is how long a change must be remembered for a shared entry
// written before it to be refused: the key store's watch reads that much
// history at start.
func (a *Authenticator) Remembers() time.Duration { return a.memFor }

// Stats exposes the counters.
func (a *Authenticator) Stats() *Stats { return &a.stats }

// Cache exposes the cache for size and eviction metrics.
func (a *Authenticator) Cache() *Cache { return a.cache }

// Result is the outcome of Authenticate for a credential that reached a
// decision: the principal when allowed. KeyID and TenantID are also set
// when the key is known and its secret matched but the answer is ErrRevoked
// or ErrExpired, for logs and metadata; ScopesHeader then stays empty.
type Result struct {
	Principal
}

// Authenticate resolves c. It returns a Result with a nil error for an
// allowed credential; ErrMalformed (a checksum that does not match, found
// before any lookup), ErrUnknown, ErrRevoked or ErrExpired for a denial;
// or an error wrapping ErrUnavailable (or the context's error) when no
// decision could be reached.
func (a *Authenticator) Authenticate(ctx context.Context, c Credential) (Result, error) {
	return a.AuthenticateAt(ctx, c, a.opts.Now())
}

// AuthenticateAt is Authenticate for a caller that has just read the
// clock: now judges the freshness of cached decisions (reading the clock
// costs as much as a cache lookup here).
func (a *Authenticator) AuthenticateAt(ctx context.Context, c Credential, now time.Time) (Result, error) {
	k := a.hasher.Digest(c.raw)
	d, state := a.cache.get(k, now.UnixNano())
	if state == cacheFresh {
		if d.err() != nil {
			a.stats.CacheNegativeHits.Add(1)
		} else {
			a.stats.CacheHits.Add(1)
		}
		return d.result(), d.err()
	}
	// Only a credential whose checksums match was ever cached: they are
	// verified here, before anything is looked up, rather than on each hit.
	if !c.checksumsValid() {
		return Result{}, ErrMalformed
	}
	a.stats.CacheMisses.Add(1)
	return a.miss(ctx, k, c, d, state)
}

// miss resolves a credential the cache could not answer freshly. It is a
// separate function so that the closure below, which moves its arguments to
// the heap, costs nothing on the hit path.
func (a *Authenticator) miss(ctx context.Context, k Digest, c Credential, d *decision, state int) (Result, error) {
	led := false // set only when this caller's function runs the lookup
	ch := a.flights.DoChan(string(k[:]), func() (any, error) {
		// A caller that missed the cache just as a flight for k ended
		// starts a new one: the decision that flight cached answers it,
		// so it shares that lookup instead of repeating it.
		if d, state := a.cache.get(k, a.opts.Now().UnixNano()); state == cacheFresh {
			return d, nil
		}
		led = true
		// The lookup outlives any one caller: it is shared, and its result
		// is cached for the others.
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.opts.StoreTimeout)
		defer cancel()
		return a.resolve(lctx, k, c)
	})
	var res singleflight.Result
	select {
	case res = <-ch:
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
	if !led {
		a.stats.SharedLookups.Add(1)
	}
	if res.Err != nil {
		if state == cacheStale {
			a.stats.StaleServed.Add(1)
			return d.result(), d.err()
		}
		return Result{}, res.Err
	}
	nd := res.Val.(*decision)
	return nd.result(), nd.err()
}

// resolve asks the shared tier, then the store, and caches what it learns.
// A store failure is returned as an error wrapping ErrUnavailable, unless a
// stale shared entry can stand in for it.
func (a *Authenticator) resolve(ctx context.Context, k Digest, c Credential) (*decision, error) {
	seq := a.invalidations.Load()
	now := a.opts.Now()
	var staleShared *sharedEntry
	if e, ok := a.sharedGet(ctx, k); ok && a.adoptable(k, &e, now.UnixNano()) {
		n := now.UnixNano()
		a.clampShared(&e, n)
		if n < e.fresh {
			d := e.decision()
			a.keep(k, d, 0, e.fresh, e.stale, seq, false)
			return d, nil
		}
		if n < e.stale {
			staleShared = &e
		}
	}
	d, version, err := a.lookup(ctx, c, now)
	if err != nil {
		if staleShared != nil {
			a.stats.StaleServed.Add(1)
			return staleShared.decision(), nil
		}
		return nil, err
	}
	fresh, stale := a.deadlines(d, now)
	a.keep(k, d, version, fresh, stale, seq, true)
	return d, nil
}

// lookup asks the store and judges the key it returns. version is the
// key's (Key.Version), 0 for an unknown credential.
func (a *Authenticator) lookup(ctx context.Context, c Credential, now time.Time) (*decision, int64, error) {
	if a.lookupSlots != nil {
		select {
		case a.lookupSlots <- struct{}{}:
			defer func() { <-a.lookupSlots }()
		default:
			// Queued, it would wait for a connection until its deadline,
			// and under a flood every lookup would.
			a.stats.StoreShed.Add(1)
			return nil, 0, ErrOverloaded
		}
	}
	a.stats.StoreLookups.Add(1)
	var key *Key
	var err error
	switch c.kind {
	case KindPair:
		key, err = a.store.KeyByPublic(ctx, c.public)
	default:
		key, err = a.store.KeyByDigest(ctx, a.hasher.DigestAll(c.raw))
	}
	switch {
	case errors.Is(err, ErrNotFound):
		if c.kind == KindPair {
			// Same work as a wrong secret, so timing does not tell an
			// unknown public key from a known one.
			a.hasher.Verify("", c.secret, nil)
		}
		return newDecision(Principal{}, ErrUnknown), 0, nil
	case err != nil:
		a.stats.StoreErrors.Add(1)
		return nil, 0, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	d := a.judge(key, c, now)
	if d.keyID() == "" {
		return d, 0, nil
	}
	return d, key.Version, nil
}

// keep caches d in process and, when it came from the store (the key at
// version), in the shared tier, then undoes both if an invalidation
// overlapped the lookup.
func (a *Authenticator) keep(k Digest, d *decision, version, fresh, stale int64, seq uint64, toShared bool) {
	a.cache.put(k, d, fresh, stale)
	if a.invalidations.Load() != seq {
		a.cache.drop(k)
		a.stats.Uncached.Add(1)
		return
	}
	if !toShared || a.opts.Shared == nil {
		return
	}
	// Off the check's path (sealing too); bounded by SharedTimeout.
	go func() {
		k, e := k, d.shared(version, fresh, stale) // the goroutine's own k: keep's stays off the heap
		v, ok := a.seal.sealEntry(&k, &e)
		ttl := time.Duration(stale - a.opts.Now().UnixNano())
		if !ok || ttl < time.Millisecond {
			return // not shareable (see sharedEntry.valid), or no longer usable
		}
		ctx, cancel := context.WithTimeout(context.Background(), a.opts.SharedTimeout)
		defer cancel()
		if !a.sharedUp() {
			return
		}
		if err := a.opts.Shared.Set(ctx, k, e.keyID, v, ttl); err != nil {
			a.sharedFailed(err)
			return
		}
		if a.invalidations.Load() != seq && d.keyID() != "" {
			// An invalidation ran while we wrote: its delete may have
			// come first. Delete again, now that ours has landed.
			a.stats.Uncached.Add(1)
			if err := a.opts.Shared.Forget(ctx, []string{d.keyID()}); err != nil {
				a.sharedFailed(err)
			}
		}
	}()
}

func (a *Authenticator) sharedUp() bool {
	if a.opts.Now().UnixNano() < a.sharedDown.Load() {
		a.stats.SharedSkipped.Add(1)
		return false
	}
	return true
}

func (a *Authenticator) sharedFailed(err error) {
	if errors.Is(err, ErrSharedSkipped) {
		a.stats.SharedSkipped.Add(1)
		return
	}
	a.stats.SharedErrors.Add(1)
	if errors.Is(err, ErrSharedPartial) {
		return // one Cluster node's keys: the tier backs that node off, not all of itself
	}
	now := a.opts.Now()
	if a.sharedDown.Swap(now.Add(a.opts.SharedRetry).UnixNano()) < now.UnixNano() {
		a.log.Warn("shared cache unavailable; using the process cache and the store", zap.Error(err), zap.Duration("retry_in", a.opts.SharedRetry))
	}
}

// sharedGet asks the shared tier under its own short deadline, and opens
// what it returns. Errors are counted and make the tier skipped for a
// while; they never fail a check. An entry that was not sealed by a
// replica of this deployment, or holds invalid fields, is a miss: it is
// counted, logged and deleted.
func (a *Authenticator) sharedGet(ctx context.Context, k Digest) (sharedEntry, bool) {
	if a.opts.Shared == nil || !a.sharedUp() {
		return sharedEntry{}, false
	}
	sctx, cancel := context.WithTimeout(ctx, a.opts.SharedTimeout)
	defer cancel()
	v, err := a.opts.Shared.Get(sctx, k)
	switch {
	case errors.Is(err, ErrSharedInvalid):
		a.rejectShared(k, err)
		return sharedEntry{}, false
	case err != nil:
		a.sharedFailed(err)
		return sharedEntry{}, false
	case v == nil:
		a.stats.SharedMisses.Add(1)
		return sharedEntry{}, false
	}
	e, err := a.seal.openEntry(&k, v)
	switch {
	case errors.Is(err, errSealVersion):
		// A newer replica's format, during a rolling upgrade: not ours to
		// judge or delete.
		a.stats.SharedMisses.Add(1)
		return sharedEntry{}, false
	case err != nil:
		a.rejectShared(k, err)
		return sharedEntry{}, false
	}
	a.stats.SharedHits.Add(1)
	return e, true
}

// clampShared bounds an authenticated entry's deadlines by this replica's
// own rules, as if it had made the decision now: never fresher than its
// TTL, never usable past its TTL plus MaxStale, an allow never past the
// key's expiry. Replicas configured differently, or clocks apart, cannot
// make a decision live longer here than this replica's settings say.
func (a *Authenticator) clampShared(e *sharedEntry, now int64) {
	ttl := a.opts.NegativeTTL
	if e.outcome == OutcomeAllow {
		ttl = a.opts.TTL
	}
	e.fresh = min(e.fresh, now+int64(ttl))
	e.stale = min(e.stale, now+int64(ttl+a.opts.MaxStale))
	if e.outcome == OutcomeAllow && e.expires != 0 {
		e.fresh, e.stale = min(e.fresh, e.expires), min(e.stale, e.expires)
	}
}

// rejectShared counts a shared entry that cannot be used, deletes it (off
// the check's path), and logs it at most once a second: the reason, never
// the value or the digest.
func (a *Authenticator) rejectShared(k Digest, why error) {
	a.stats.SharedRejected.Add(1)
	now := a.opts.Now().UnixNano()
	if last := a.rejectLogged.Load(); now-last >= int64(time.Second) && a.rejectLogged.CompareAndSwap(last, now) {
		a.log.Warn("shared cache entry rejected and deleted: Redis holds a value no replica wrote (is anyone else writing to it?)",
			zap.String("reason", why.Error()), zap.Uint64("rejected_total", a.stats.SharedRejected.Load()))
	}
	a.deleteShared(k)
}

// deleteShared deletes the shared entry of k, off the check's path.
func (a *Authenticator) deleteShared(k Digest) {
	if a.opts.Shared == nil {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), a.opts.SharedTimeout)
		defer cancel()
		if err := a.opts.Shared.Delete(ctx, k); err != nil {
			a.sharedFailed(err)
		}
	}()
}

// judge verifies the secret, then reports status: revoked and expired are
// told only to a caller who proved the secret.
func (a *Authenticator) judge(key *Key, c Credential, now time.Time) *decision {
	secret := c.raw
	if c.kind == KindPair {
		secret = c.secret
	}
	if key.Kind != c.kind || !a.hasher.Verify(key.PepperID, secret, key.Digest) {
		return newDecision(Principal{}, ErrUnknown)
	}
	var err error
	switch key.Status(now) {
	case "revoked":
		err = ErrRevoked
	case "expired":
		err = ErrExpired
	}
	return newDecision(principalOf(key), err)
}

// deadlines are when d stops being fresh and stops being usable at all:
// positives live for TTL, denials for NegativeTTL, and a positive never
// past the key's expiry, stale or not.
func (a *Authenticator) deadlines(d *decision, now time.Time) (fresh, stale int64) {
	ttl := a.opts.NegativeTTL
	if d.err() == nil {
		ttl = a.opts.TTL
	}
	fresh = now.Add(ttl).UnixNano()
	stale = now.Add(ttl + a.opts.MaxStale).UnixNano()
	if exp := d.expires; d.err() == nil && exp != 0 {
		fresh, stale = min(fresh, exp), min(stale, exp)
	}
	return fresh, stale
}

// InvalidateKeys drops every cached decision of these key ids.
func (a *Authenticator) InvalidateKeys(ids ...string) int {
	if len(ids) == 0 {
		return 0
	}
	a.invalidations.Add(1)
	set := make(map[string]struct{}, len(ids))
	for _, id := range ids {
		set[id] = struct{}{}
	}
	n := a.cache.dropWhere(func(d *decision) bool {
		id := d.keyID()
		_, ok := set[id]
		return ok && id != ""
	})
	a.stats.Invalidated.Add(uint64(n))
	return n
}

// InvalidateTenant drops every cached decision of a tenant's keys.
func (a *Authenticator) InvalidateTenant(tenant string) int {
	a.invalidations.Add(1)
	n := a.cache.dropWhere(func(d *decision) bool { return d.tenantID() == tenant && d.keyID() != "" })
	a.stats.Invalidated.Add(uint64(n))
	return n
}

// InvalidateAll empties the cache: for a store that can no longer tell
// what changed.
func (a *Authenticator) InvalidateAll() int {
	a.invalidations.Add(1)
	n := a.cache.dropWhere(func(*decision) bool { return true })
	a.stats.Invalidated.Add(uint64(n))
	return n
}

// ForgetUnknown drops cached "unknown credential" denials, so that a key
// imported or created a moment after a failed attempt works at once.
func (a *Authenticator) ForgetUnknown() int {
	a.invalidations.Add(1)
	return a.cache.dropWhere(func(d *decision) bool { return d.keyID() == "" })
}
