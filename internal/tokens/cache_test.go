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
				switch {
				case i%3 == 0:
					c.put(k, newDecision(Principal{KeyID: "x"}, nil), 100, 100)
				case i%5 == 0: // the same digests turn into denials too
					c.put(k, newDecision(Principal{}, ErrUnknown), 100, 100)
				default:
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
		n := 0
		for l := range s.lists {
			prev := int32(none)
			for j := s.lists[l].head; j != none; j = s.at(j).next {
				e := s.at(j)
				if s.m[slot(&e.key)] != j || e.prev != prev || e.val == nil || int(e.list) != l || listOf(e.val) != l {
					t.Fatal("list entry not in map, in the wrong list, or links broken")
				}
				prev = j
				n++
			}
			if prev != s.lists[l].tail {
				t.Fatalf("shard %d list %d: tail %d, last %d", i, l, s.lists[l].tail, prev)
			}
		}
		if n != len(s.m) {
			t.Fatalf("shard %d: lists %d, map %d", i, n, len(s.m))
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

// A flood of denials (junk credentials) never evicts an allow: a denial
// makes room only among denials, or is not cached; an allow makes room
// among denials first.
func TestCacheDenialsNeverEvictAllows(t *testing.T) {
	t.Parallel()
	c := NewCache(1024) // 32 shards of 32
	allow := newDecision(Principal{KeyID: "k"}, nil)
	deny := newDecision(Principal{}, ErrUnknown)
	present := func(n int) int {
		kept := 0
		for i := range n {
			if d, st := c.get(digestOf(i), 0); st == cacheFresh && d == allow {
				kept++
			}
		}
		return kept
	}
	for i := range 200 {
		c.put(digestOf(i), allow, 100, 100)
	}
	if n := present(200); n != 200 {
		t.Fatalf("%d of 200 allows cached, before any denial", n)
	}
	for i := 100000; i < 150000; i++ {
		c.put(digestOf(i), deny, 100, 100)
	}
	if n := present(200); n != 200 || c.Len() > 1024 {
		t.Fatalf("after 50,000 denials: %d of 200 allows kept, %d entries (bound 1024)", n, c.Len())
	}
	// Allows still come in, pushing denials out first.
	for i := 200; i < 500; i++ {
		c.put(digestOf(i), allow, 100, 100)
	}
	if n := present(500); n != 500 {
		t.Fatalf("%d of 500 allows cached, with denials left to evict", n)
	}
	// A shard full of allows caches no denial at all.
	full := NewCache(1)
	full.put(digestOf(1), allow, 100, 100)
	for i := 1000; i < 2000; i++ {
		full.put(digestOf(i), deny, 100, 100)
	}
	if _, st := full.get(digestOf(1), 0); st != cacheFresh || full.Len() != 1 {
		t.Errorf("full of allows: the allow was evicted by a denial")
	}
	// A key that turns from allow to denial (revoked) moves lists.
	c.put(digestOf(0), deny, 100, 100)
	if d, _ := c.get(digestOf(0), 0); d != deny {
		t.Fatal("revoked key still answered with its allow")
	}
}
