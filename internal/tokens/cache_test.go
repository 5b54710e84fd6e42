package tokens

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"unsafe"
)

func digestOf(i int) Digest {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(i))
	return sha256.Sum256(b[:])
}

// The bound is exact for every size: EXTAUTHZ_CACHE_SIZE=2 once held 64
// entries (one per shard at least).
func TestCacheBounded(t *testing.T) {
	t.Parallel()
	for _, size := range []int{0, 1, 2, 3, 5, 16, 31, 32, 33, 100, 1000, 4097} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			t.Parallel()
			c := NewCache(size)
			want, total := max(size, 1), 0
			for i := range c.shards {
				total += c.shards[i].capacity
			}
			if total != want {
				t.Fatalf("shard capacities add up to %d, want %d", total, want)
			}
			for i := range 20 * want {
				c.put(digestOf(i), &decision{}, 100, 100)
				if n := c.Len(); n > want {
					t.Fatalf("after %d puts: len = %d, want <= %d", i+1, n, want)
				}
			}
			if c.Evictions() == 0 {
				t.Fatal("no evictions counted")
			}
			hits := 0
			for i := range 20 * want {
				if _, st := c.get(digestOf(i), 0); st != cacheMiss {
					hits++
				}
			}
			if hits > want {
				t.Fatalf("%d distinct digests answered from a cache of %d", hits, want)
			}
		})
	}
}

func TestCacheSieveKeepsHotEntries(t *testing.T) {
	t.Parallel()
	c := NewCache(cacheShards * 4)
	hot := digestOf(-1)
	c.put(hot, newDecision(Principal{KeyID: "hot"}, nil), 100, 100)
	for i := range 5000 {
		// The hot entry is read between every insertion.
		if d, st := c.get(hot, 0); st != cacheFresh || d.keyID() != "hot" {
			t.Fatalf("hot entry evicted after %d insertions", i)
		}
		c.put(digestOf(i), &decision{}, 100, 100)
	}
}

func TestCacheFreshStaleExpired(t *testing.T) {
	t.Parallel()
	c := NewCache(100)
	k := digestOf(1)
	c.put(k, newDecision(Principal{KeyID: "a"}, nil), 10, 20)
	for _, tc := range []struct {
		now  int64
		want int
	}{{0, cacheFresh}, {9, cacheFresh}, {10, cacheStale}, {19, cacheStale}, {20, cacheMiss}} {
		if _, st := c.get(k, tc.now); st != tc.want {
			t.Errorf("at %d: state %d, want %d", tc.now, st, tc.want)
		}
	}
	// Overwrite in place.
	c.put(k, newDecision(Principal{KeyID: "b"}, nil), 30, 30)
	if d, st := c.get(k, 25); st != cacheFresh || d.keyID() != "b" || c.Len() != 1 {
		t.Fatalf("overwrite: %v %d len %d", d, st, c.Len())
	}
	c.drop(k)
	if _, st := c.get(k, 0); st != cacheMiss {
		t.Fatal("drop left the entry")
	}
}

func TestCacheConcurrent(t *testing.T) {
	t.Parallel()
	c := NewCache(500)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 5000 {
				k := digestOf(i % 2000)
				if i%3 == 0 {
					c.put(k, newDecision(Principal{KeyID: "x"}, nil), 100, 100)
				} else {
					c.get(k, int64(g))
				}
				if i%1000 == 0 {
					c.dropWhere(func(d *decision) bool { return d.keyID() == "x" && i%2 == 0 })
				}
			}
		})
	}
	wg.Wait()
	if c.Len() > 500 {
		t.Fatalf("len %d over bound", c.Len())
	}
	// The linked lists, the maps and the free lists agree.
	for i := range c.shards {
		s := &c.shards[i]
		n, prev := 0, int32(none)
		for j := s.head; j != none; j = s.at(j).next {
			e := s.at(j)
			if s.m[slot(&e.key)] != j || e.prev != prev || e.val == nil {
				t.Fatal("list entry not in map, or links broken")
			}
			prev = j
			n++
		}
		if n != len(s.m) || prev != s.tail {
			t.Fatalf("shard %d: list %d, map %d", i, n, len(s.m))
		}
		free := 0
		for j := s.free; j != none; j = s.at(j).next {
			if s.at(j).val != nil {
				t.Fatal("free entry holds a decision")
			}
			free++
		}
		if n+free != int(s.used) {
			t.Fatalf("shard %d: %d listed + %d free != %d allocated", i, n, free, s.used)
		}
	}
}

// Two digests that share the 64 bits the map is indexed by: each must only
// ever be answered with its own decision.
func TestCacheSlotCollision(t *testing.T) {
	t.Parallel()
	c := NewCache(100)
	a, b := digestOf(1), digestOf(1)
	b[31] ^= 0xff // same shard byte, same slot bytes, different digest
	if slot(&a) != slot(&b) || c.shard(&a) != c.shard(&b) || a == b {
		t.Fatal("not a slot collision")
	}
	c.put(a, newDecision(Principal{KeyID: "a"}, nil), 100, 100)
	if d, st := c.get(b, 0); st != cacheMiss || d != nil {
		t.Fatalf("b answered with a's decision: %v", d)
	}
	c.put(b, newDecision(Principal{KeyID: "b"}, nil), 100, 100)
	if d, st := c.get(b, 0); st != cacheFresh || d.keyID() != "b" {
		t.Fatalf("b: %v %d", d, st)
	}
	if d, st := c.get(a, 0); st != cacheMiss || d != nil {
		t.Fatalf("a after b took the slot: %v, want a miss", d)
	}
	c.drop(a) // must not remove b
	if _, st := c.get(b, 0); st != cacheFresh || c.Len() != 1 {
		t.Fatal("dropping a removed b")
	}
}

// A decision gives back what it was made of, whatever the key id's length,
// holds an id inline when it fits, and holds no pointers (see decision).
func TestDecisionRoundTrip(t *testing.T) {
	t.Parallel()
	if hasPointers(reflect.TypeFor[decision]()) {
		t.Fatal("decision holds pointers")
	}
	if s := unsafe.Sizeof(decision{}); s != 64 {
		t.Errorf("decision is %d bytes, want 64 (a size class; see inlineID)", s)
	}
	ids := []string{"", "k", strings.Repeat("x", 36), strings.Repeat("y", inlineID), strings.Repeat("z", inlineID+1), strings.Repeat("w", 300)}
	for _, id := range ids {
		for _, err := range []error{nil, ErrUnknown, ErrRevoked, ErrExpired} {
			p := Principal{KeyID: id, TenantID: "tenant-" + id, ScopesHeader: "read," + id, expires: int64(len(id))}
			d := newDecision(p, err)
			if d.err() != err || d.keyID() != id || d.tenantID() != p.TenantID {
				t.Fatalf("id of %d bytes, %v: got %q, %q, %v", len(id), err, d.keyID(), d.tenantID(), d.err())
			}
			r := d.result()
			want := p
			if err != nil { // the key's identity only
				want = Principal{KeyID: id, TenantID: p.TenantID}
			}
			if r.Principal != want {
				t.Fatalf("id of %d bytes, %v: result %+v", len(id), err, r)
			}
			inline := len(id) > 0 && unsafe.StringData(d.keyID()) == &d.id[0]
			if inline != (len(id) > 0 && len(id) <= inlineID) {
				t.Fatalf("id of %d bytes: inline = %v", len(id), inline)
			}
		}
	}
}

// Decisions made while other goroutines intern new strings read back what
// they were made of: the table only grows, and a reader's snapshot always
// holds the indexes of the decisions it can see (run with -race).
func TestDecisionsWhileInterning(t *testing.T) {
	t.Parallel()
	const writers, each = 4, 500
	var wg sync.WaitGroup
	made := make(chan *decision, writers*each)
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				tenant := fmt.Sprintf("interning-%d-%d", w, i)
				made <- newDecision(Principal{KeyID: tenant, TenantID: tenant, ScopesHeader: tenant + ",x"}, nil)
			}
		})
	}
	go func() { wg.Wait(); close(made) }()
	n := 0
	for d := range made {
		r := d.result()
		if r.TenantID != r.KeyID || r.ScopesHeader != r.KeyID+",x" {
			t.Fatalf("decision reads back %+v", r.Principal)
		}
		n++
	}
	if n != writers*each {
		t.Fatalf("%d decisions, want %d", n, writers*each)
	}
}
