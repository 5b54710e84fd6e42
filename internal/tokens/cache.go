package tokens

import (
	"encoding/binary"
	"sync"
	"sync/atomic"
)

// Lookup states of the cache.
const (
	cacheMiss  = iota
	cacheFresh // within its TTL
	cacheStale // past its TTL but within the allowed staleness
)

// cacheShards is the most shards a cache is split into: a power of two,
// so that a digest byte picks one with a mask.
const cacheShards = 32

// Cache is a bounded in-process map from credential digest to decision,
// with per-entry freshness and staleness deadlines. It runs no goroutines.
// Eviction is SIEVE per shard: a hit only sets a bit under a read lock,
// and the eviction hand spares entries hit since it last passed.
//
// Denials never evict allows: each shard keeps them in two lists, a
// denial makes room only among denials (or is not cached at all), and an
// allow makes room among denials first. A flood of junk credentials can
// fill the cache's free space with negatives, never push a key out.
//
// The bound is exact: the shards' capacities add up to the size given to
// NewCache, so the cache never holds more entries than that. A cache
// smaller than cacheShards uses fewer shards (a power of two, at most the
// size), so each shard holds at least one entry.
//
// Entries live in chunked arrays linked by index, and the map holds
// indexes: besides the decisions themselves, the cache gives the garbage
// collector no objects to chase and no map to scan. At 100,000 keys the
// collector's mark phase is what lengthens a check's tail latency.
type Cache struct {
	shards [cacheShards]cacheShard
	// mask picks a shard from a digest byte: the number of shards in use
	// minus one.
	mask    uint8
	evicted atomic.Uint64
}

// none is the null entry index.
const none = -1

// chunkBits sizes the chunks a shard's entries are allocated in: grown on
// demand, never moved, less than one chunk of slack per shard.
const chunkBits = 10

type cacheShard struct {
	mu sync.RWMutex
	// m is indexed by 64 bits of the digest, not the whole 32 bytes, to keep
	// a map slot small. The entry holds the full digest and every lookup
	// compares it: two credentials whose digests share those 64 bits merely
	// compete for one slot (a miss, or an eviction); one can never be
	// answered with the other's decision.
	m        map[uint64]int32
	chunks   [][]cacheEntry
	used     int32 // entries ever allocated
	free     int32 // removed entries, linked through next
	lists    [2]cacheList
	capacity int
}

// Entry lists of a shard: allows, and denials (negative entries).
const (
	allows  = 0
	denials = 1
)

// cacheList is one SIEVE list of a shard.
type cacheList struct {
	head, tail, hand int32 // head is newest
}

// listOf is the list a decision belongs in.
func listOf(d *decision) int {
	if d.outcome == OutcomeAllow {
		return allows
	}
	return denials
}

type cacheEntry struct {
	key        Digest
	val        *decision // nil when free
	freshUntil int64     // unix nanoseconds
	staleUntil int64
	prev, next int32 // prev is toward head (newer)
	visited    atomic.Bool
	list       uint8 // allows or denials
}

// NewCache holds at most size entries (at least one).
func NewCache(size int) *Cache {
	size = max(size, 1)
	n := cacheShards
	for n > size {
		n /= 2
	}
	c := &Cache{mask: uint8(n - 1)}
	for i := range c.shards {
		s := &c.shards[i]
		s.free = none
		s.lists[allows] = cacheList{none, none, none}
		s.lists[denials] = cacheList{none, none, none}
		if i >= n {
			continue // never picked: empty, with no capacity
		}
		// The remainder goes one entry each to the first shards, so that
		// the capacities add up to size exactly.
		s.capacity = size / n
		if i < size%n {
			s.capacity++
		}
		s.m = make(map[uint64]int32, s.capacity)
	}
	return c
}

// shard picks the shard of a digest. The second mask is a constant the
// compiler sees, so the index needs no bounds check.
func (c *Cache) shard(k *Digest) *cacheShard { return &c.shards[k[0]&c.mask&(cacheShards-1)] }

// slot is the map index of a digest: bytes 8..16, independent of the byte
// that picks the shard.
func slot(k *Digest) uint64 { return binary.LittleEndian.Uint64(k[8:16]) }

func (s *cacheShard) at(i int32) *cacheEntry {
	return &s.chunks[i>>chunkBits][i&(1<<chunkBits-1)]
}

// get returns the decision for k at now (unix nanoseconds) and its state.
func (c *Cache) get(k Digest, now int64) (*decision, int) {
	s := c.shard(&k)
	s.mu.RLock()
	i, ok := s.m[slot(&k)]
	if !ok {
		s.mu.RUnlock()
		return nil, cacheMiss
	}
	e := s.at(i)
	if e.key != k {
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
	l := listOf(d)
	s.mu.Lock()
	defer s.mu.Unlock()
	if i, ok := s.m[slot(&k)]; ok {
		if e := s.at(i); e.key == k && int(e.list) == l {
			e.val, e.freshUntil, e.staleUntil = d, freshUntil, staleUntil
			return
		}
		// Another digest in the same slot (the newer one wins), or this
		// key moving between allow and denial: taken out, put in anew.
		s.remove(i)
	}
	for len(s.m) >= s.capacity {
		victims := denials
		if s.lists[denials].tail == none {
			if l == denials {
				return // a denial never evicts an allow: not cached
			}
			victims = allows
		}
		s.evict(victims)
		c.evicted.Add(1)
	}
	i := s.alloc()
	e := s.at(i)
	e.key, e.val, e.freshUntil, e.staleUntil, e.list = k, d, freshUntil, staleUntil, uint8(l)
	e.visited.Store(false)
	ls := &s.lists[l]
	e.prev, e.next = none, ls.head
	if ls.head != none {
		s.at(ls.head).prev = i
	}
	ls.head = i
	if ls.tail == none {
		ls.tail = i
	}
	s.m[slot(&k)] = i
}

// alloc returns a free entry index, growing the shard by a chunk if needed.
func (s *cacheShard) alloc() int32 {
	if i := s.free; i != none {
		s.free = s.at(i).next
		return i
	}
	if int(s.used)>>chunkBits == len(s.chunks) {
		// used never exceeds capacity (live + free = used, and a new
		// index is taken only with no free one and room left), so the
		// last chunk is cut to what capacity can still use.
		s.chunks = append(s.chunks, make([]cacheEntry, min(1<<chunkBits, s.capacity-int(s.used))))
	}
	i := s.used
	s.used++
	return i
}

// evict removes one entry of list l (not empty): the first from the hand
// toward the head that was not visited since the hand last passed it.
func (s *cacheShard) evict(l int) {
	ls := &s.lists[l]
	i := ls.hand
	if i == none {
		i = ls.tail
	}
	for e := s.at(i); e.visited.Load(); e = s.at(i) {
		e.visited.Store(false)
		if i = e.prev; i == none {
			i = ls.tail
		}
	}
	ls.hand = s.at(i).prev
	s.remove(i)
}

func (s *cacheShard) remove(i int32) {
	e := s.at(i)
	ls := &s.lists[e.list]
	if ls.hand == i {
		ls.hand = e.prev
	}
	if e.prev != none {
		s.at(e.prev).next = e.next
	} else {
		ls.head = e.next
	}
	if e.next != none {
		s.at(e.next).prev = e.prev
	} else {
		ls.tail = e.prev
	}
	delete(s.m, slot(&e.key))
	// Free: the decision can be collected, and the index reused.
	e.val, e.prev, e.next = nil, none, s.free
	s.free = i
}

// drop removes the entry for k, if any.
func (c *Cache) drop(k Digest) {
	s := c.shard(&k)
	s.mu.Lock()
	if i, ok := s.m[slot(&k)]; ok && s.at(i).key == k {
		s.remove(i)
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
		for l := range s.lists {
			for j := s.lists[l].head; j != none; {
				e := s.at(j)
				next := e.next
				if match(e.val) {
					s.remove(j)
					n++
				}
				j = next
			}
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
