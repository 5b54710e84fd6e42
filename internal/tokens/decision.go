package tokens

import (
	"encoding/binary"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"
)

// decision is what a credential digest resolves to: an allow, or a denial
// (unknown, revoked, expired). Its key id and tenant are set whenever the
// key is known and its secret matched, so that revoking or changing that
// key can drop the decision. Decisions are immutable and shared.
//
// A decision holds no pointers, so the garbage collector never scans the
// hundreds of thousands a cache may hold: with 100,000 cached keys, mark
// phases came every 1.5 s under load and made the latency tail. Tenant ids
// and scope lists are indexes into a table of interned strings, and the key
// id is held inline.
type decision struct {
	expires int64  // unix nanoseconds; 0: never
	tenant  uint32 // interned tenant id
	scopes  uint32 // interned ScopesHeader
	outcome Outcome
	idLen   uint8 // longID: the id is interned, its index in id[:4]
	id      [inlineID]byte
}

const (
	// inlineID fills the decision's 64-byte size class; a generated key id
	// is a 36-byte UUID.
	inlineID = 46
	longID   = 0xff
)

func newDecision(p Principal, err error) *decision {
	d := &decision{expires: p.expires, tenant: strs.index(p.TenantID), scopes: strs.index(p.ScopesHeader),
		outcome: outcomeOf(err)}
	if n := len(p.KeyID); n <= inlineID {
		d.idLen = uint8(n)
		copy(d.id[:], p.KeyID)
	} else {
		d.idLen = longID
		binary.LittleEndian.PutUint32(d.id[:], strs.index(p.KeyID))
	}
	return d
}

func (d *decision) err() error { return d.outcome.err() }

func (d *decision) keyID() string { return d.keyIDIn(*strs.all.Load()) }

// keyIDIn reads the key id, interned ones from the table snapshot all. An
// inline id points into d: d is immutable, and the string keeps it alive.
func (d *decision) keyIDIn(all []string) string {
	if d.idLen > inlineID {
		return all[binary.LittleEndian.Uint32(d.id[:])]
	}
	return unsafe.String(&d.id[0], d.idLen)
}

func (d *decision) tenantID() string { return strs.str(d.tenant) }

// result is on every check's path: one read of the string table, and the
// strings are shared, never copied.
func (d *decision) result() Result {
	all := *strs.all.Load()
	r := Result{Principal{KeyID: d.keyIDIn(all), TenantID: all[d.tenant]}}
	if d.outcome == OutcomeAllow {
		r.ScopesHeader, r.expires = all[d.scopes], d.expires
	}
	return r
}

// strs holds the tenant ids, scope lists and over-long key ids that
// decisions refer to by index, each once, for the life of the process.
// They number one per tenant and per distinct scope list, not per key.
var strs = newInterned()

type interned struct {
	mu  sync.Mutex
	idx map[string]uint32
	// all only grows: a reader's snapshot stays valid, and an index it
	// was given is within it (the decision holding the index was published
	// after the snapshot that contains it).
	all atomic.Pointer[[]string]
}

func newInterned() *interned {
	t := &interned{idx: map[string]uint32{"": 0}}
	all := []string{""}
	t.all.Store(&all)
	return t
}

func (t *interned) index(s string) uint32 {
	if s == "" {
		return 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.idx[s]; ok {
		return i
	}
	s = strings.Clone(s) // never a view into a request or a store row
	all := append(*t.all.Load(), s)
	i := uint32(len(all) - 1)
	t.idx[s] = i
	t.all.Store(&all)
	return i
}

func (t *interned) str(i uint32) string { return (*t.all.Load())[i] }
