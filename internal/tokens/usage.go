package tokens

import (
	"context"
	"hash/maphash"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// UsageWriter stores usage batches; every Store is one.
type UsageWriter interface {
	RecordUsage(ctx context.Context, usage []Usage) error
}

// UsageGate decides, across replicas, which of them writes a key's usage
// this interval: Claim returns, per key, whether this replica won it.
//
// A gate only spreads writes out; it is never trusted with counts. A key
// this replica did not win waits one interval, and is written at the next
// flush whatever the gate says then, and at shutdown the gate is not asked.
// So whoever can write to the gate's store (Redis) can delay a key's usage
// by one interval at most, never drop it.
type UsageGate interface {
	Claim(ctx context.Context, keyIDs []string, interval time.Duration) ([]bool, error)
}

// UsageOptions tune a UsageRecorder.
type UsageOptions struct {
	Interval   time.Duration // how often pending usage is written; default 1m
	MaxPending int           // keys held between writes; more are dropped and counted. Default 100000
	BatchSize  int           // keys per write; default 1000, or what the writer asks (UsageBatchSizer)
	Gate       UsageGate     // optional: at most one replica writes a key per interval
	Now        func() time.Time
	Logger     *zap.Logger
}

const usageShards = 16

// UsageRecorder counts requests per key in memory and writes them in
// batches, off the check's path. A check only increments a counter.
type UsageRecorder struct {
	w       UsageWriter
	opts    UsageOptions
	log     *zap.Logger
	seed    maphash.Seed
	shards  [usageShards]usageShard
	pending atomic.Int64 // keys held, across shards
	dropped atomic.Uint64
	written atomic.Uint64
	failed  atomic.Uint64
	flushMu sync.Mutex // one flush at a time
	// deferred are the keys a gate kept from the last flush: the next one
	// writes them without asking. Guarded by flushMu.
	deferred map[string]struct{}
}

// Pending usage holds no pointers: a key id of up to 36 bytes (a generated
// id is a UUID) is a map key by value, so the collector has nothing to scan
// in 100,000 pending keys. Keyed by string, each id pointed into its cached
// decision, and the map took half the mark work of the whole heap. Longer
// ids go to a map of strings.
type usageShard struct {
	mu   sync.Mutex
	m    map[usageID]usageCount
	long map[string]usageCount
}

type usageID struct {
	n uint8
	b [36]byte
}

// add counts n requests of id, the last at last (unix nanoseconds). A key
// not yet pending is added only if room; isNew reports that it was added,
// dropped that it was not.
func (s *usageShard) add(id string, n, last int64, room bool) (isNew, dropped bool) {
	if len(id) > len(usageID{}.b) {
		return addUsage(s.long, id, n, last, room)
	}
	k := usageID{n: uint8(len(id))}
	copy(k.b[:], id)
	return addUsage(s.m, k, n, last, room)
}

func addUsage[K comparable](m map[K]usageCount, k K, n, last int64, room bool) (isNew, dropped bool) {
	c, ok := m[k]
	if !ok && !room {
		return false, true
	}
	m[k] = usageCount{n: c.n + n, last: max(c.last, last)}
	return !ok, false
}

func (s *usageShard) reset(hint int) {
	s.m = make(map[usageID]usageCount, hint)
	s.long = map[string]usageCount{}
}

type usageCount struct {
	n    int64
	last int64 // unix nanoseconds
}

// UsageBatchSizer is implemented by a usage writer whose writes cost the
// same whatever their size, such as the file store, which rewrites its
// whole file each time: it asks for another batch size than the default.
type UsageBatchSizer interface {
	UsageBatchSize() int // 0: everything pending in one write
}

// NewUsageRecorder writes to w.
func NewUsageRecorder(w UsageWriter, o UsageOptions) *UsageRecorder {
	if o.Interval <= 0 {
		o.Interval = time.Minute
	}
	if o.MaxPending <= 0 {
		o.MaxPending = 100000
	}
	if o.BatchSize <= 0 {
		o.BatchSize = 1000
		if bs, ok := w.(UsageBatchSizer); ok {
			if o.BatchSize = bs.UsageBatchSize(); o.BatchSize <= 0 {
				o.BatchSize = o.MaxPending
			}
		}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	r := &UsageRecorder{w: w, opts: o, log: o.Logger, seed: maphash.MakeSeed()}
	for i := range r.shards {
		r.shards[i].reset(0)
	}
	return r
}

// Record counts one request of a key. It never blocks on I/O; over
// MaxPending keys, a new key's request is dropped and counted.
func (r *UsageRecorder) Record(keyID string) { r.RecordAt(keyID, r.opts.Now()) }

// RecordAt is Record for a caller that has just read the clock.
func (r *UsageRecorder) RecordAt(keyID string, at time.Time) {
	r.add(keyID, 1, at.UnixNano(), r.pending.Load() < int64(r.opts.MaxPending))
}

// add counts n requests of keyID in its shard, and keeps the pending and
// dropped counts; a new key is dropped unless room.
func (r *UsageRecorder) add(keyID string, n, last int64, room bool) {
	s := &r.shards[maphash.String(r.seed, keyID)%usageShards]
	s.mu.Lock()
	isNew, dropped := s.add(keyID, n, last, room)
	s.mu.Unlock()
	switch {
	case isNew:
		r.pending.Add(1)
	case dropped:
		r.dropped.Add(1)
	}
}

// Dropped counts requests not recorded because MaxPending was reached.
func (r *UsageRecorder) Dropped() uint64 { return r.dropped.Load() }

// Written counts keys written.
func (r *UsageRecorder) Written() uint64 { return r.written.Load() }

// Failed counts failed writes (their usage is kept for the next one).
func (r *UsageRecorder) Failed() uint64 { return r.failed.Load() }

// Pending is the number of keys held.
func (r *UsageRecorder) Pending() int { return int(r.pending.Load()) }

// Run writes pending usage every Interval until ctx ends, then writes what
// is left, with the gate bypassed, retrying failed writes until
// finalTimeout has passed.
func (r *UsageRecorder) Run(ctx context.Context, finalTimeout time.Duration) {
	t := time.NewTicker(r.opts.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.Background(), finalTimeout)
			defer cancel()
			r.finalFlush(fctx)
			return
		case <-t.C:
			// Stopping must not cut a write short: a write cancelled
			// during its commit may have been stored all the same, and
			// writing it again at shutdown would count it twice.
			wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.opts.Interval)
			if err := r.Flush(wctx, false); err != nil {
				r.log.Warn("usage write failed; kept for the next one", zap.Error(err), zap.Int("keys", r.Pending()))
			}
			cancel()
		}
	}
}

// finalFlush writes everything pending, trying again after a failure (the
// store restarting, a lock timeout) until ctx ends.
func (r *UsageRecorder) finalFlush(ctx context.Context) {
	backoff := 50 * time.Millisecond
	for {
		err := r.Flush(ctx, true)
		if err == nil {
			return
		}
		r.log.Warn("usage write at shutdown failed; retrying", zap.Error(err), zap.Int("keys", r.Pending()))
		select {
		case <-ctx.Done():
			r.log.Error("usage not written at shutdown", zap.Error(err), zap.Int("keys", r.Pending()))
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// take removes and returns everything pending.
func (r *UsageRecorder) take() []Usage {
	var out []Usage
	for i := range r.shards {
		s := &r.shards[i]
		s.mu.Lock()
		for k, c := range s.m {
			out = append(out, Usage{KeyID: string(k.b[:k.n]), LastUsed: time.Unix(0, c.last), Requests: c.n})
		}
		for id, c := range s.long {
			out = append(out, Usage{KeyID: id, LastUsed: time.Unix(0, c.last), Requests: c.n})
		}
		r.pending.Add(-int64(len(s.m) + len(s.long)))
		s.reset(len(s.m))
		s.mu.Unlock()
	}
	return out
}

// putBack merges usage that was not written back into pending.
func (r *UsageRecorder) putBack(us []Usage) {
	for _, u := range us {
		r.add(u.KeyID, u.Requests, u.LastUsed.UnixNano(), true)
	}
}

// Flush writes pending usage in batches, in key id order. Without final,
// keys another replica claimed this interval wait for the next flush
// (once: they are written then, claimed or not). What cannot be written
// is kept.
func (r *UsageRecorder) Flush(ctx context.Context, final bool) error {
	r.flushMu.Lock()
	defer r.flushMu.Unlock()
	all := r.take()
	if len(all) == 0 {
		return nil
	}
	// Every replica cuts its batches alike: the store locks rows in order
	// within a batch, and equal batches contend less.
	slices.SortFunc(all, func(a, b Usage) int { return strings.Compare(a.KeyID, b.KeyID) })
	if !final && r.opts.Gate != nil {
		all = r.gate(ctx, all)
	} else {
		r.deferred = nil
	}
	for start := 0; start < len(all); start += r.opts.BatchSize {
		batch := all[start:min(start+r.opts.BatchSize, len(all))]
		if err := r.w.RecordUsage(ctx, batch); err != nil {
			r.failed.Add(1)
			r.putBack(all[start:])
			return err
		}
		r.written.Add(uint64(len(batch)))
	}
	return nil
}

// gate returns the usage to write now: the keys this replica claimed, and
// those deferred by the last flush. The others are put back and deferred.
func (r *UsageRecorder) gate(ctx context.Context, all []Usage) []Usage {
	ask := make([]string, 0, len(all))
	for _, u := range all {
		if _, ok := r.deferred[u.KeyID]; !ok {
			ask = append(ask, u.KeyID)
		}
	}
	var won []bool
	if len(ask) > 0 {
		var err error
		if won, err = r.opts.Gate.Claim(ctx, ask, r.opts.Interval); err != nil || len(won) != len(ask) {
			// Without the gate, write: a duplicate write is cheaper than lost usage.
			r.log.Warn("usage gate unavailable; writing without it", zap.Error(err))
			r.deferred = nil
			return all
		}
	}
	var mine, later []Usage
	deferred := map[string]struct{}{}
	i := 0
	for _, u := range all {
		if _, ok := r.deferred[u.KeyID]; ok {
			mine = append(mine, u)
			continue
		}
		if won[i] {
			mine = append(mine, u)
		} else {
			later = append(later, u)
			deferred[u.KeyID] = struct{}{}
		}
		i++
	}
	r.putBack(later)
	r.deferred = deferred
	return mine
}
