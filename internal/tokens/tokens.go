// Package tokens owns the API-key domain: the credential grammar, key
// generation, HMAC digests under server-side peppers, the decision cache and
// the lookup chain from cache to key store.
//
// Nothing in this package stores, caches, logs or returns a plaintext secret:
// secrets exist only inside a Credential for the duration of a check, and
// every persisted or cached value is derived by HMAC-SHA256.
package tokens

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// Denials. A check that ends in one of these is a decision, not a failure.
var (
	// ErrMissing: no credential in any configured place.
	ErrMissing = errors.New("tokens: missing credential")
	// ErrMalformed: a credential is present but not well formed (bad scheme,
	// bad characters, too long, bad checksum, empty half of a pair).
	ErrMalformed = errors.New("tokens: malformed credential")
	// ErrAmbiguous: a credential was found in more than one configured place.
	ErrAmbiguous = errors.New("tokens: ambiguous credential")
	// ErrUnknown: no such key, or the secret does not match. The two are
	// deliberately indistinguishable.
	ErrUnknown = errors.New("tokens: invalid credential")
	// ErrRevoked: the key was revoked (reported only after the secret matched).
	ErrRevoked = errors.New("tokens: key revoked")
	// ErrExpired: the key is past its expiry (reported only after the secret matched).
	ErrExpired = errors.New("tokens: key expired")
)

// Failures.
var (
	// ErrNotFound is what a Store returns for an ID, public key or digest it
	// does not hold.
	ErrNotFound = errors.New("tokens: not found")
	// ErrUnavailable wraps a store failure for which no usable cached
	// decision existed: an outage, not a denial.
	ErrUnavailable = errors.New("tokens: key store unavailable")
	// ErrConflict is what a Store returns when a new key collides with an
	// existing public key, token digest or ID.
	ErrConflict = errors.New("tokens: key already exists")
)

// Kind is the shape of a credential and of the key that verifies it.
type Kind uint8

const (
	// KindPair is a pk_<public>:sk_<secret> pair, looked up by its public part.
	KindPair Kind = iota + 1
	// KindToken is an opaque token, looked up by its digest.
	KindToken
)

func (k Kind) String() string {
	switch k {
	case KindPair:
		return "pair"
	case KindToken:
		return "token"
	}
	return "unknown"
}

// ParseKind reads "pair" or "token".
func ParseKind(s string) (Kind, error) {
	switch s {
	case "pair":
		return KindPair, nil
	case "token":
		return KindToken, nil
	}
	return 0, fmt.Errorf("kind %q: want pair or token", s)
}

// Key is a stored API key. It never holds a secret: Digest is
// HMAC-SHA256(pepper PepperID, secret) for pairs, and of the whole token for
// tokens.
type Key struct {
	ID        string
	TenantID  string
	Name      string
	Kind      Kind
	PublicKey string // pk_..., pairs only
	Digest    []byte
	PepperID  string
	Scopes    []string
	CreatedAt time.Time
	ExpiresAt time.Time // zero: never
	RevokedAt time.Time // zero: active

	LastUsedAt   time.Time // zero: never used
	RequestCount int64

	// Version orders the key's states: the store's change sequence as of
	// the read (Postgres: the row's version, set from one sequence by every
	// change; file store: the key file's modification time). A shared
	// entry is stamped with it, and a replica that knows of a later change
	// of the key never adopts the entry. 0: the store does not say.
	Version int64
}

// Status is "active", "revoked" or "expired" at now.
func (k *Key) Status(now time.Time) string {
	switch {
	case !k.RevokedAt.IsZero():
		return "revoked"
	case !k.ExpiresAt.IsZero() && !now.Before(k.ExpiresAt):
		return "expired"
	}
	return "active"
}

// Principal is what an allowed credential resolves to, built for each check
// from the cached decision; its strings are shared and immutable.
type Principal struct {
	KeyID    string
	TenantID string
	// ScopesHeader is the key's scopes joined with commas (a scope never
	// contains one), as the x-api-key-scopes header carries them.
	ScopesHeader string
	expires      int64 // unix nanoseconds; 0: never
}

// principalOf derives the principal of a stored key. (A decision made of it
// interns the tenant id and scope list: they repeat across keys.)
func principalOf(k *Key) Principal {
	p := Principal{KeyID: k.ID, TenantID: k.TenantID, ScopesHeader: strings.Join(k.Scopes, ",")}
	if !k.ExpiresAt.IsZero() {
		p.expires = k.ExpiresAt.UnixNano()
	}
	return p
}

// ExpiresAt is the key's expiry; zero: never.
func (p *Principal) ExpiresAt() time.Time {
	if p.expires == 0 {
		return time.Time{}
	}
	return time.Unix(0, p.expires)
}

// Scopes returns the key's scopes (a new slice).
func (p *Principal) Scopes() []string { return SplitList(p.ScopesHeader) }

// HasScope reports whether p holds scope s. It does not allocate.
func (p *Principal) HasScope(s string) bool {
	for rest := p.ScopesHeader; rest != ""; {
		var have string
		have, rest, _ = strings.Cut(rest, ",")
		if have == s {
			return true
		}
	}
	return false
}

// HasScopes reports whether p holds every scope in required.
func (p *Principal) HasScopes(required []string) bool {
	for _, r := range required {
		if !p.HasScope(r) {
			return false
		}
	}
	return true
}

var (
	tenantPattern = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)
	scopePattern  = regexp.MustCompile(`^[A-Za-z0-9._:/-]{1,64}$`)
)

// ValidateTenant accepts tenant ids of [A-Za-z0-9._:-]{1,128}, so that a
// tenant id is always a valid header value.
func ValidateTenant(t string) error {
	if !tenantPattern.MatchString(t) {
		return fmt.Errorf("tenant %q: want 1 to 128 characters of A-Z a-z 0-9 . _ : -", t)
	}
	return nil
}

// ValidateScopes accepts scopes of [A-Za-z0-9._:/-]{1,64}: no commas (they
// are joined with commas in headers) and no spaces.
func ValidateScopes(scopes []string) error {
	for _, s := range scopes {
		if !scopePattern.MatchString(s) {
			return fmt.Errorf("scope %q: want 1 to 64 characters of A-Z a-z 0-9 . _ : / -", s)
		}
	}
	return nil
}

// ValidateName accepts printable names of at most 200 bytes.
func ValidateName(n string) error {
	if len(n) > 200 {
		return fmt.Errorf("name: longer than 200 bytes")
	}
	for i := 0; i < len(n); i++ {
		if n[i] < 0x20 || n[i] == 0x7f {
			return fmt.Errorf("name: contains a control character")
		}
	}
	return nil
}

// SplitList splits a comma-separated list, trimming spaces and dropping
// empty items.
func SplitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
