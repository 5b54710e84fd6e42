package tokens

import (
	"context"
	"errors"
	"time"
)

// SharedCache is the optional decision tier shared by every replica
// (Redis). Entries are keyed by the credential digest, like the process
// cache, and never hold a secret.
type SharedCache interface {
	// Get returns the entry for k, or (nil, nil) on a miss.
	Get(ctx context.Context, k Digest) (*SharedEntry, error)
	// Set stores e for k until e.StaleUntil.
	Set(ctx context.Context, k Digest, e *SharedEntry) error
	// Forget deletes every entry of these keys.
	Forget(ctx context.Context, keyIDs []string) error
}

// SharedEntry is a cached decision as the shared tier stores it.
type SharedEntry struct {
	Outcome    Outcome
	KeyID      string
	TenantID   string
	Scopes     []string
	ExpiresAt  time.Time // key expiry; zero: never
	FreshUntil time.Time
	StaleUntil time.Time
}

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

func (d *decision) shared(fresh, stale int64) *SharedEntry {
	r := d.result()
	e := &SharedEntry{Outcome: d.outcome, KeyID: r.KeyID, TenantID: r.TenantID,
		FreshUntil: time.Unix(0, fresh), StaleUntil: time.Unix(0, stale)}
	if d.outcome == OutcomeAllow {
		e.Scopes, e.ExpiresAt = r.Scopes(), r.ExpiresAt()
	}
	return e
}

func (e *SharedEntry) decision() *decision {
	var p Principal
	if e.KeyID != "" {
		p = principalOf(&Key{ID: e.KeyID, TenantID: e.TenantID, Scopes: e.Scopes, ExpiresAt: e.ExpiresAt})
	}
	return newDecision(p, e.Outcome.err())
}
