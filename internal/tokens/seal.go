package tokens

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"sync"
	"time"
)

// SharedSealer authenticates what replicas share through Redis: cached
// decisions and invalidation messages. Whoever can write to Redis is not
// trusted with decisions (SPEC §8): every value carries an HMAC-SHA256 tag
// under a key derived from a pepper, so only a replica (or the keys CLI)
// holding one of the configured peppers can make one. Values are sealed
// with the current pepper's key and opened with any configured one, so a
// pepper rotation keeps the tier working.
//
// An entry's tag covers the deployment's domain (the Redis key prefix),
// the credential digest it is stored under (its Redis key), and the whole
// value, format version byte included: an entry copied to another key, to
// another deployment's prefix, or altered in any byte is rejected.
type SharedSealer struct {
	keys     []macPool // current first
	entryHdr []byte    // what each entry tag starts with: kind, domain
	msgHdr   []byte
}

// sealLabel derives a sealing key from a pepper: HMAC(pepper, sealLabel).
// It contains a space and a NUL, which no credential may, so it is never
// a credential whose digest under the pepper is known to anyone (digests
// are Redis key names and stored token verifiers).
const sealLabel = "extauthz shared-tier v1\x00"

type macPool struct{ p *sync.Pool }

// macState is a pooled HMAC with room for its input digest and output, so
// that neither escapes to the heap through the hash.Hash interface.
type macState struct {
	h    hash.Hash
	bind Digest
	sum  [tagLen]byte
}

// SharedSealer returns the sealer for a deployment: domain is its Redis key
// prefix.
func (h *Hasher) SharedSealer(domain string) *SharedSealer {
	s := &SharedSealer{}
	for _, p := range h.peppers {
		m := hmac.New(sha256.New, p.Secret)
		m.Write([]byte(sealLabel))
		key := m.Sum(nil)
		s.keys = append(s.keys, macPool{&sync.Pool{New: func() any { return &macState{h: hmac.New(sha256.New, key)} }}})
	}
	hdr := binary.AppendUvarint(nil, uint64(len(domain)))
	hdr = append(hdr, domain...)
	s.entryHdr = append([]byte{'d'}, hdr...)
	s.msgHdr = append([]byte{'m'}, hdr...)
	return s
}

const tagLen = sha256.Size

// tag is HMAC(key i, hdr | bind | body); bind is a digest, or nil.
func (s *SharedSealer) tag(i int, hdr []byte, bind *Digest, body []byte) [tagLen]byte {
	st := s.keys[i].p.Get().(*macState)
	st.h.Reset()
	st.h.Write(hdr)
	if bind != nil {
		st.bind = *bind
		st.h.Write(st.bind[:])
	}
	st.h.Write(body)
	st.h.Sum(st.sum[:0])
	t := st.sum
	s.keys[i].p.Put(st)
	return t
}

// open checks v's trailing tag against every key, in constant time each,
// and returns the body before it.
func (s *SharedSealer) open(hdr []byte, bind *Digest, v []byte) ([]byte, bool) {
	if len(v) < 1+tagLen {
		return nil, false
	}
	body, got := v[:len(v)-tagLen], v[len(v)-tagLen:]
	ok := false
	for i := range s.keys {
		t := s.tag(i, hdr, bind, body)
		if hmac.Equal(t[:], got) {
			ok = true
			break
		}
	}
	return body, ok
}

// Why a shared value was not used.
var (
	errSealForged  = errors.New("not sealed by a replica holding a configured pepper")
	errSealVersion = errors.New("sealed in a format this replica does not know")
	errSealFields  = errors.New("sealed, but invalid")
)

// Format versions: the first byte of every sealed value. A replica that
// meets a version it does not know treats the entry as a miss and leaves
// it alone. Entry format 1 (before entries carried the key's version) is
// such a miss: it cannot be judged against the changes this replica knows
// of, and expires on its own.
const (
	entryV2   = 2
	messageV1 = 1
)

// maxSharedEntry is the longest entry format 2 holds.
const maxSharedEntry = 1 + 1 + 4*8 + 1 + maxIDLen + 1 + maxIDLen + 2 + maxScopesHeader + tagLen

// sealEntry encodes e for digest k, format 2:
//
//	format(1) outcome(1) fresh(8) stale(8) expires(8)       unix ns, little endian
//	key version(8)                                          little endian
//	len(1) key id, len(1) tenant id, len(2) scopes header   joined with commas
//	tag(32)
//
// It reports false for an entry it must not share (see valid).
func (s *SharedSealer) sealEntry(k *Digest, e *sharedEntry) ([]byte, bool) {
	if !e.valid() {
		return nil, false
	}
	b := appendEntry(make([]byte, 0, 1+1+32+1+len(e.keyID)+1+len(e.tenant)+2+len(e.scopesHeader)+tagLen), e)
	t := s.tag(0, s.entryHdr, k, b)
	return append(b, t[:]...), true
}

// appendEntry encodes e's fields in format 2, unchecked.
func appendEntry(b []byte, e *sharedEntry) []byte {
	b = append(b, entryV2, byte(e.outcome))
	b = binary.LittleEndian.AppendUint64(b, uint64(e.fresh))
	b = binary.LittleEndian.AppendUint64(b, uint64(e.stale))
	b = binary.LittleEndian.AppendUint64(b, uint64(e.expires))
	b = binary.LittleEndian.AppendUint64(b, uint64(e.version))
	b = append(b, byte(len(e.keyID)))
	b = append(b, e.keyID...)
	b = append(b, byte(len(e.tenant)))
	b = append(b, e.tenant...)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(e.scopesHeader)))
	return append(b, e.scopesHeader...)
}

// openEntry authenticates v as the entry of digest k, then decodes and
// validates it. Errors: errSealForged (no valid tag, including anything
// too short or too long to be an entry), errSealVersion (a valid tag on a
// format this replica does not know), errSealFields.
func (s *SharedSealer) openEntry(k *Digest, v []byte) (sharedEntry, error) {
	if len(v) > maxSharedEntry {
		return sharedEntry{}, errSealForged
	}
	b, ok := s.open(s.entryHdr, k, v)
	if !ok {
		return sharedEntry{}, errSealForged
	}
	if b[0] != entryV2 {
		return sharedEntry{}, errSealVersion
	}
	r := reader{b: b[1:]}
	e := sharedEntry{outcome: Outcome(r.byte())}
	e.fresh, e.stale, e.expires = int64(r.uint64()), int64(r.uint64()), int64(r.uint64())
	e.version = int64(r.uint64())
	e.keyID = r.string(int(r.byte()))
	e.tenant = r.string(int(r.byte()))
	e.scopesHeader = r.string(int(r.uint16()))
	if r.bad || len(r.b) != 0 || !e.valid() {
		return sharedEntry{}, errSealFields
	}
	return e, nil
}

// reader decodes a sealed body; reading past its end sets bad.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) take(n int) []byte {
	if r.bad || n > len(r.b) {
		r.bad = true
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) byte() byte {
	if v := r.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) uint16() uint16 {
	if v := r.take(2); v != nil {
		return binary.LittleEndian.Uint16(v)
	}
	return 0
}

func (r *reader) uint64() uint64 {
	if v := r.take(8); v != nil {
		return binary.LittleEndian.Uint64(v)
	}
	return 0
}

func (r *reader) string(n int) string { return string(r.take(n)) }

// SealMessage seals an invalidation message body sent at sent:
//
//	version(1) sent(8, unix ns, little endian) body tag(32)
func (s *SharedSealer) SealMessage(body []byte, sent time.Time) []byte {
	b := make([]byte, 0, 1+8+len(body)+tagLen)
	b = append(b, messageV1)
	b = binary.LittleEndian.AppendUint64(b, uint64(sent.UnixNano()))
	b = append(b, body...)
	t := s.tag(0, s.msgHdr, nil, b)
	return append(b, t[:]...)
}

// OpenMessage authenticates a sealed message and returns its body, when it
// was sent, and its tag, which tells one message from another (a replayed
// copy carries the same tag).
func (s *SharedSealer) OpenMessage(v []byte) (body []byte, sent time.Time, tag [tagLen]byte, err error) {
	b, ok := s.open(s.msgHdr, nil, v)
	switch {
	case !ok:
		return nil, time.Time{}, tag, errSealForged
	case b[0] != messageV1:
		return nil, time.Time{}, tag, errSealVersion
	case len(b) < 1+8:
		return nil, time.Time{}, tag, fmt.Errorf("%w: too short", errSealFields)
	}
	copy(tag[:], v[len(v)-tagLen:])
	return b[9:], time.Unix(0, int64(binary.LittleEndian.Uint64(b[1:9]))), tag, nil
}
