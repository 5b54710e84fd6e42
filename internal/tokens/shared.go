package tokens

import (
	"context"
	"errors"
	"time"
)

// SharedCache is the optional decision tier shared by every replica
// (Redis). Entries are keyed by the credential digest, like the process
// cache, and never hold a secret. The tier stores sealed bytes and is not
// trusted with them: the authenticator authenticates, validates and clamps
// every entry it reads (see SharedSealer).
type SharedCache interface {
	// Get returns the entry stored for k, or (nil, nil) on a miss. An entry
	// it cannot read as bytes at all (the wrong type, too long) is
	// ErrSharedInvalid.
	Get(ctx context.Context, k Digest) ([]byte, error)
	// Set stores v for k, an entry of key keyID ("" for an unknown
	// credential), for ttl.
	Set(ctx context.Context, k Digest, keyID string, v []byte, ttl time.Duration) error
	// Delete removes the entry for k: one that was rejected.
	Delete(ctx context.Context, k Digest) error
	// Forget deletes every entry of these keys.
	Forget(ctx context.Context, keyIDs []string) error
}

// ErrSharedInvalid is what a SharedCache returns for an entry that is not
// one: the authenticator counts it as rejected and deletes it.
var ErrSharedInvalid = errors.New("tokens: shared entry unreadable")

// ErrSharedPartial marks a shared-tier failure that concerns only the
// part of the tier holding the entry (a Redis Cluster node): the tier backs
// that part off by itself, and the authenticator keeps using the rest.
var ErrSharedPartial = errors.New("tokens: part of the shared tier unavailable")

// ErrSharedSkipped is what a SharedCache that backs off parts of itself
// returns for an entry whose part failed a moment ago: not asked, a miss.
var ErrSharedSkipped = errors.New("tokens: shared tier node skipped after a failure")

// Outcome is a decision's result, as stored in the shared tier.
type Outcome uint8

// Outcomes.
const (
	OutcomeAllow Outcome = iota + 1
	OutcomeUnknown
	OutcomeRevoked
	OutcomeExpired
)

func outcomeOf(err error) Outcome {
	switch {
	case err == nil:
		return OutcomeAllow
	case errors.Is(err, ErrRevoked):
		return OutcomeRevoked
	case errors.Is(err, ErrExpired):
		return OutcomeExpired
	}
	return OutcomeUnknown
}

func (o Outcome) err() error {
	switch o {
	case OutcomeAllow:
		return nil
	case OutcomeRevoked:
		return ErrRevoked
	case OutcomeExpired:
		return ErrExpired
	}
	return ErrUnknown
}

// sharedEntry is a cached decision as the shared tier holds it. Times are
// unix nanoseconds.
type sharedEntry struct {
	outcome      Outcome
	keyID        string
	tenant       string
	scopesHeader string
	expires      int64 // key expiry; 0: never
	fresh, stale int64
	// version is the key's version (Key.Version) the decision was made
	// of; 0 for an unknown credential.
	version int64
}

func (d *decision) shared(version, fresh, stale int64) sharedEntry {
	r := d.result()
	e := sharedEntry{outcome: d.outcome, keyID: r.KeyID, tenant: r.TenantID, fresh: fresh, stale: stale, version: version}
	if d.outcome == OutcomeAllow {
		e.scopesHeader, e.expires = r.ScopesHeader, r.expires
	}
	return e
}

func (e *sharedEntry) decision() *decision {
	p := Principal{KeyID: e.keyID, TenantID: e.tenant, ScopesHeader: e.scopesHeader, expires: e.expires}
	return newDecision(p, e.outcome.err())
}

// valid reports whether e is an entry a replica could have written: the
// same rules bound what is written and what is read, so that an honest
// entry is never rejected. Every string is checked against the alphabet of
// its kind (a tenant id and scopes reach response headers) and bounded in
// length (they are interned for the life of the process).
func (e *sharedEntry) valid() bool {
	if e.fresh <= 0 || e.stale < e.fresh || e.expires < 0 || e.version < 0 {
		return false
	}
	switch e.outcome {
	case OutcomeUnknown:
		return e.keyID == "" && e.tenant == "" && e.scopesHeader == "" && e.expires == 0 && e.version == 0
	case OutcomeRevoked, OutcomeExpired:
		if e.scopesHeader != "" || e.expires != 0 {
			return false
		}
	case OutcomeAllow:
		if !validScopesHeader(e.scopesHeader) {
			return false
		}
	default:
		return false
	}
	return validID(e.keyID) && validID(e.tenant)
}

// maxIDLen bounds key and tenant ids in the shared tier, as ValidateTenant
// bounds tenants. Generated key ids are 36-byte UUIDs.
const maxIDLen = 128

// maxScopesHeader bounds a key's joined scopes in the shared tier. A key
// with more is not shared (each replica asks the store for it).
const maxScopesHeader = 4096

// validID accepts [A-Za-z0-9._:-]{1,128}: the tenant alphabet, which every
// generated key id (a UUID) is within too.
func validID(s string) bool {
	if len(s) == 0 || len(s) > maxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !idByte(s[i]) {
			return false
		}
	}
	return true
}

func idByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-'
}

// validScopesHeader accepts "" or scopes of ValidateScopes joined by commas.
func validScopesHeader(h string) bool {
	if len(h) > maxScopesHeader {
		return false
	}
	n := 0 // length of the current scope
	for i := 0; i < len(h); i++ {
		switch c := h[i]; {
		case c == ',':
			if n == 0 {
				return false
			}
			n = 0
		case idByte(c) || c == '/':
			if n++; n > 64 {
				return false
			}
		default:
			return false
		}
	}
	return len(h) == 0 || n > 0
}
