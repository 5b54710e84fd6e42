package tokens

import (
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"
)

// Digest is an HMAC-SHA256 output: cache key, token lookup key and stored
// secret verifier.
type Digest [sha256.Size]byte

// Pepper is one server-side HMAC key.
type Pepper struct {
	ID     string
	Secret []byte
}

// MinPepperLen is the shortest pepper accepted: HMAC-SHA256 keys shorter
// than the hash output weaken it.
const MinPepperLen = 32

// ParsePeppers reads "id:secret[,id:secret...]"; the first is current.
// Errors name the pepper by id and never echo a secret.
func ParsePeppers(s string) ([]Pepper, error) {
	var out []Pepper
	seen := map[string]bool{}
	for i, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		id, secret, ok := strings.Cut(item, ":")
		switch {
		case !ok || id == "":
			return nil, fmt.Errorf("entry %d: want id:secret", i+1)
		case strings.ContainsAny(id, " \t"):
			return nil, fmt.Errorf("entry %d: id contains spaces", i+1)
		case seen[id]:
			return nil, fmt.Errorf("pepper %q: listed twice", id)
		case len(secret) < MinPepperLen:
			return nil, fmt.Errorf("pepper %q: secret shorter than %d bytes", id, MinPepperLen)
		}
		seen[id] = true
		out = append(out, Pepper{ID: id, Secret: []byte(secret)})
	}
	return out, nil
}

// Hasher computes HMAC-SHA256 digests under a list of peppers, the first of
// which is current. HMAC states are pooled so that the hot path allocates
// nothing.
type Hasher struct {
	peppers []Pepper
	pools   []sync.Pool
	// unknownUses counts verifications of stored keys made with a pepper
	// this hasher does not hold; lastUnknown is that pepper's id. Such a
	// key is denied like a wrong secret, so without these the mistake
	// (a pepper missing from EXTAUTHZ_HMAC_SECRETS) would be invisible.
	unknownUses atomic.Uint64
	lastUnknown atomic.Pointer[string]
}

type hmacState struct {
	h   hash.Hash
	sum [sha256.Size]byte
}

// NewHasher takes the peppers; the first signs new keys, all verify.
func NewHasher(peppers []Pepper) (*Hasher, error) {
	if len(peppers) == 0 {
		return nil, errors.New("tokens: no pepper configured")
	}
	h := &Hasher{peppers: peppers, pools: make([]sync.Pool, len(peppers))}
	for i := range peppers {
		key := append([]byte(nil), peppers[i].Secret...)
		h.pools[i].New = func() any { return &hmacState{h: hmac.New(sha256.New, key)} }
	}
	return h, nil
}

// CurrentID is the id of the pepper that signs new keys.
func (h *Hasher) CurrentID() string { return h.peppers[0].ID }

// Digest is HMAC-SHA256 under the current pepper.
func (h *Hasher) Digest(s string) Digest { return h.digestWith(0, s) }

// DigestAll returns s's digest under every pepper, current first.
func (h *Hasher) DigestAll(s string) []Digest {
	out := make([]Digest, len(h.peppers))
	for i := range h.peppers {
		out[i] = h.digestWith(i, s)
	}
	return out
}

func (h *Hasher) digestWith(i int, s string) Digest {
	st := h.pools[i].Get().(*hmacState)
	st.h.Reset()
	// The hash only reads the bytes, so the string need not be copied.
	st.h.Write(unsafe.Slice(unsafe.StringData(s), len(s)))
	st.h.Sum(st.sum[:0])
	d := Digest(st.sum)
	h.pools[i].Put(st)
	return d
}

// index returns the position of the pepper with this id, or -1.
func (h *Hasher) index(id string) int {
	for i := range h.peppers {
		if h.peppers[i].ID == id {
			return i
		}
	}
	return -1
}

// Verify reports, in constant time, whether want is the digest of s under
// the pepper named id. An unknown pepper id verifies nothing, but costs the
// same HMAC so that timing does not tell it apart.
func (h *Hasher) Verify(id, s string, want []byte) bool {
	i := h.index(id)
	known := i >= 0
	if !known {
		i = 0
		if id != "" { // "" is the dummy verification of an unknown key
			h.unknownUses.Add(1)
			h.lastUnknown.Store(&id)
		}
	}
	d := h.digestWith(i, s)
	return hmac.Equal(d[:], want) && known
}

// UnknownPepper reports how many stored keys were presented that were made
// with a pepper this hasher does not hold, and the id of the last such
// pepper (from the key store, never from a request).
func (h *Hasher) UnknownPepper() (uses uint64, lastID string) {
	if p := h.lastUnknown.Load(); p != nil {
		lastID = *p
	}
	return h.unknownUses.Load(), lastID
}
