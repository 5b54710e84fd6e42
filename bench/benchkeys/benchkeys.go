// Package benchkeys is the deterministic key set every server under load
// test is given: the same tokens, tenants and request shape.
package benchkeys

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// DefaultCount is how many keys a load run warms.
const DefaultCount = 100000

// Pepper is the baseline servers' HMAC key (not a secret: benchmarks only).
const Pepper = "bench-pepper-not-a-secret-0123456789"

// Token is bench key i: an opaque legacy-style token, as imported with
// `extauthz keys import`.
func Token(i int) string {
	s := sha256.Sum256(fmt.Appendf(nil, "extauthz-bench-key-%d", i))
	return "ak_live_" + hex.EncodeToString(s[:16])
}

// Tenant is bench key i's tenant: 1,000 tenants.
func Tenant(i int) string { return fmt.Sprintf("tenant-%05d", i%1000) }
