package tokens

import (
	"encoding/binary"
	"sync"
	"sync/atomic"
)

// decision is what a credential digest resolves to: an allow (err nil), or
// a denial (ErrUnknown, ErrRevoked, ErrExpired). p's KeyID and TenantID are
// set whenever the key is known and its secret matched, so that revoking or
// changing that key can drop the decision. Decisions are immutable and
// shared; the principal lives inside, one object per cached decision.
type decision struct {
	p   Principal
	err error
}

// Lookup states of the cache.
const (
	cacheMiss  = iota
	cacheFresh // within its TTL
	cacheStale // past its TTL but within the allowed staleness
)

const cacheShards = 32

// Cache is a bounded in-process map from credential digest to decision,
// with per-entry freshness and staleness deadlines. It runs no goroutines.
// Eviction is SIEVE per shard: a hit only sets a bit under a read lock,
// and the eviction hand spares entries hit since it last passed.
type Cache struct {
	shards  [cacheShards]cacheShard
	evicted atomic.Uint64
}

type cacheShard struct {
	mu sync.RWMutex
	// m is indexed by 64 bits of the digest, not the whole 32 bytes, to keep
	// a map slot at 16 bytes instead of 40. The entry holds the full digest
	// and every lookup compares it: two credentials whose digests share
	// those 64 bits merely compete for one slot (a miss, or an eviction);
	// one can never be answered with the other's decision.
	m          map[uint64]*cacheEntry
	head, tail *cacheEntry // head is newest
	hand       *cacheEntry
	capacity   int
}

type cacheEntry struct {
	key        Digest
	val        *decision
	freshUntil int64 // unix nanoseconds
	staleUntil int64
	visited    atomic.Bool
	prev, next *cacheEntry // prev is toward head (newer)
}

// NewCache holds at most size entries (at least one per shard).
func NewCache(size int) *Cache {
	c := &Cache{}
	per := (size + cacheShards - 1) / cacheShards
	if per < 1 {
		per = 1
	}
	for i := range c.shards {
		c.shards[i].m = make(map[uint64]*cacheEntry, per)
		c.shards[i].capacity = per
	}
	return c
}

func (c *Cache) shard(k *Digest) *cacheShard { return &c.shards[k[0]%cacheShards] }

// slot is the map index of a digest: bytes 8..16, independent of the byte
// that picks the shard.
func slot(k *Digest) uint64 { return binary.LittleEndian.Uint64(k[8:16]) }

// get returns the decision for k at now (unix nanoseconds) and its state.
func (c *Cache) get(k Digest, now int64) (*decision, int) {
	s := c.shard(&k)
	s.mu.RLock()
	e := s.m[slot(&k)]
	if e == nil || e.key != k {
		s.mu.RUnlock()
		return nil, cacheMiss
	}
	val, fresh, stale := e.val, e.freshUntil, e.staleUntil
	e.visited.Store(true)
	s.mu.RUnlock()
	switch {
	case now < fresh:
		return val, cacheFresh
	case now < stale:
		return val, cacheStale
	}
	return nil, cacheMiss
}

// put stores d for k until freshUntil, and as a fallback until staleUntil.
func (c *Cache) put(k Digest, d *decision, freshUntil, staleUntil int64) {
	if staleUntil < freshUntil {
		staleUntil = freshUntil
	}
	s := c.shard(&k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.m[slot(&k)]; e != nil {
		if e.key == k {
			e.val, e.freshUntil, e.staleUntil = d, freshUntil, staleUntil
			return
		}
		s.remove(e) // another digest in the same slot: the newer one wins
	}
	for len(s.m) >= s.capacity {
		s.evict()
		c.evicted.Add(1)
	}
	e := &cacheEntry{key: k, val: d, freshUntil: freshUntil, staleUntil: staleUntil}
	e.next = s.head
	if s.head != nil {
		s.head.prev = e
	}
	s.head = e
	if s.tail == nil {
		s.tail = e
	}
	s.m[slot(&k)] = e
}

// evict removes one entry: the first from the hand toward the head that
// was not visited since the hand last passed it.
func (s *cacheShard) evict() {
	o := s.hand
	if o == nil {
		o = s.tail
	}
	for o.visited.Load() {
		o.visited.Store(false)
		if o = o.prev; o == nil {
			o = s.tail
		}
	}
	s.hand = o.prev
	s.remove(o)
}

func (s *cacheShard) remove(e *cacheEntry) {
	if s.hand == e {
		s.hand = e.prev
	}
	if e.prev != nil {
		e.prev.next = e.next
	} else {
		s.head = e.next
	}
	if e.next != nil {
		e.next.prev = e.prev
	} else {
		s.tail = e.prev
	}
	e.prev, e.next = nil, nil
	delete(s.m, slot(&e.key))
}

// drop removes the entry for k, if any.
func (c *Cache) drop(k Digest) {
	s := c.shard(&k)
	s.mu.Lock()
	if e := s.m[slot(&k)]; e != nil && e.key == k {
		s.remove(e)
	}
	s.mu.Unlock()
}

// dropWhere removes every entry whose decision matches, and returns how
// many it removed. It scans every shard: invalidations are rare and this
// keeps the per-entry memory free of secondary indexes.
func (c *Cache) dropWhere(match func(*decision) bool) int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		for e := s.head; e != nil; {
			next := e.next
			if match(e.val) {
				s.remove(e)
				n++
			}
			e = next
		}
		s.mu.Unlock()
	}
	return n
}

// Len is the number of entries.
func (c *Cache) Len() int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.RLock()
		n += len(s.m)
		s.mu.RUnlock()
	}
	return n
}

// Evictions counts entries removed to make room.
func (c *Cache) Evictions() uint64 { return c.evicted.Load() }
