package tokens

import (
	"fmt"
	"time"
)

// IssueParams describe a new key.
type IssueParams struct {
	Tenant string
	Name   string
	Kind   Kind // default KindPair
	Scopes []string
	TTL    time.Duration // 0: never expires
	Now    time.Time
}

// Issued is a new key and the credential to hand out, once.
type Issued struct {
	Key        *Key
	Credential string // what a client sends
	PublicKey  string // pairs only
	SecretKey  string // pairs only
}

// Issue generates a key: random material, digest under the current pepper.
// Only the digest goes into the returned Key.
func (h *Hasher) Issue(p IssueParams) (*Issued, error) {
	if p.Kind == 0 {
		p.Kind = KindPair
	}
	if p.TTL < 0 {
		return nil, fmt.Errorf("ttl: must not be negative")
	}
	k, err := h.newKey(p.Tenant, p.Name, p.Kind, p.Scopes, p.Now)
	if err != nil {
		return nil, err
	}
	if p.TTL > 0 {
		k.ExpiresAt = k.CreatedAt.Add(p.TTL)
	}
	out := &Issued{Key: k}
	switch p.Kind {
	case KindPair:
		pub, sec, err := GeneratePair()
		if err != nil {
			return nil, err
		}
		d := h.Digest(sec)
		k.PublicKey, k.Digest = pub, d[:]
		out.PublicKey, out.SecretKey, out.Credential = pub, sec, pub+":"+sec
	case KindToken:
		tok, err := GenerateToken()
		if err != nil {
			return nil, err
		}
		d := h.Digest(tok)
		k.Digest = d[:]
		out.Credential = tok
	default:
		return nil, fmt.Errorf("kind: %v", p.Kind)
	}
	return out, nil
}

// ImportToken makes a key for an existing opaque token. The token must be
// one that Extract would accept as a token, or no client could present it.
func (h *Hasher) ImportToken(token, tenant, name string, scopes []string, expires, now time.Time) (*Key, error) {
	c, err := ParseCredential(token)
	if err != nil || c.kind != KindToken {
		return nil, fmt.Errorf("token: not a valid opaque token (8 to 512 characters of A-Z a-z 0-9 - . _ ~ + / =, no pk_/sk_ prefix)")
	}
	k, err := h.newKey(tenant, name, KindToken, scopes, now)
	if err != nil {
		return nil, err
	}
	d := h.Digest(token)
	k.Digest, k.ExpiresAt = d[:], expires
	return k, nil
}

func (h *Hasher) newKey(tenant, name string, kind Kind, scopes []string, now time.Time) (*Key, error) {
	if err := ValidateTenant(tenant); err != nil {
		return nil, err
	}
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	if err := ValidateScopes(scopes); err != nil {
		return nil, err
	}
	id, err := NewID()
	if err != nil {
		return nil, err
	}
	if now.IsZero() {
		now = time.Now()
	}
	if scopes == nil {
		scopes = []string{}
	}
	return &Key{
		ID: id, TenantID: tenant, Name: name, Kind: kind, PepperID: h.CurrentID(),
		Scopes: scopes, CreatedAt: now.UTC().Truncate(time.Microsecond),
	}, nil
}
