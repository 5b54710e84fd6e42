package tokens

import (
	"encoding/base64"
	"encoding/binary"
	"strings"
)

// Credential grammar.
//
//	pair:   pk_<base62 random><checksum>:sk_<base62 random><checksum>
//	token:  tk_<base62 random><checksum>            (generated)
//	        any other 8..512 characters of A-Z a-z 0-9 - . _ ~ + / =   (imported legacy)
//
// The prefixes pk_, sk_ and tk_ followed by base62 only are reserved for
// generated credentials: such a value must carry a valid checksum, so typos
// and garbage are rejected before any store access. On a request, the
// Extractor checks the shape, and the Authenticator the checksums once the
// cache has no answer: a cached decision proves its credential's checksums,
// so a cache hit skips them (CRC-32 is a tenth of a hit's cost).
const (
	PublicPrefix = "pk_"
	SecretPrefix = "sk_"
	TokenPrefix  = "tk_"

	// MaxHeaderLen bounds a credential header value. Longer values are
	// malformed without further inspection.
	MaxHeaderLen = 4096

	publicRandLen = 24 // 142 bits
	secretRandLen = 32 // 190 bits
	tokenRandLen  = 40 // 238 bits
	checksumLen   = 6

	minLegacyLen = 8
	maxLegacyLen = 512
	maxPartLen   = 128 // bound on either half of a pair
)

// Credential is a parsed, well-formed credential. It holds the plaintext
// secret for the duration of one check; its String and JSON forms are
// redacted so that it cannot leak through a log line by accident.
type Credential struct {
	kind   Kind
	raw    string // the whole credential as presented
	public string // pk_..., pairs only
	secret string // sk_..., pairs only
	// unsummed: the checksums of a generated credential are not verified
	// yet (see checksumsValid).
	unsummed bool
}

// Kind is KindPair or KindToken.
func (c Credential) Kind() Kind { return c.kind }

// PublicKey is the pk_ part of a pair, which is not secret.
func (c Credential) PublicKey() string { return c.public }

func (c Credential) String() string   { return "Credential{" + c.kind.String() + ", redacted}" }
func (c Credential) GoString() string { return c.String() }

// MarshalJSON keeps the secret out of reflective loggers.
func (c Credential) MarshalJSON() ([]byte, error) {
	return []byte(`{"kind":"` + c.kind.String() + `","credential":"redacted"}`), nil
}

// ParseCredential parses the credential itself (no scheme): a pair or a
// token. It returns ErrMalformed for anything else.
func ParseCredential(s string) (Credential, error) { return parseCredential(s, true) }

// checksumsValid verifies the checksums parseCredential left unverified.
func (c Credential) checksumsValid() bool {
	switch {
	case !c.unsummed:
		return true
	case c.kind == KindPair:
		return checksumOK(c.public) && checksumOK(c.secret)
	}
	return checksumOK(c.raw)
}

func checksumOK(s string) bool {
	return checksumMatches(s[:len(s)-checksumLen], s[len(s)-checksumLen:])
}

// parseCredential is ParseCredential; without sums, a generated
// credential's checksums are left to checksumsValid.
func parseCredential(s string, sums bool) (Credential, error) {
	if len(s) == 0 || len(s) > MaxHeaderLen {
		return Credential{}, ErrMalformed
	}
	if i := strings.IndexByte(s, ':'); i >= 0 {
		pub, sec := s[:i], s[i+1:]
		if len(pub) > maxPartLen || len(sec) > maxPartLen ||
			!validGenerated(pub, PublicPrefix, publicRandLen, sums) ||
			!validGenerated(sec, SecretPrefix, secretRandLen, sums) {
			return Credential{}, ErrMalformed
		}
		return Credential{kind: KindPair, raw: s, public: pub, secret: sec, unsummed: !sums}, nil
	}
	if reservedShape(s) {
		// Half a pair is not a credential; a generated token must check out.
		if strings.HasPrefix(s, TokenPrefix) && len(s) <= maxPartLen &&
			validGenerated(s, TokenPrefix, tokenRandLen, sums) {
			return Credential{kind: KindToken, raw: s, unsummed: !sums}, nil
		}
		return Credential{}, ErrMalformed
	}
	if len(s) < minLegacyLen || len(s) > maxLegacyLen {
		return Credential{}, ErrMalformed
	}
	for i := 0; i < len(s); i++ {
		if !isTokenChar(s[i]) {
			return Credential{}, ErrMalformed
		}
	}
	return Credential{kind: KindToken, raw: s}, nil
}

// reservedShape reports whether s is one of the generated prefixes followed
// only by base62 characters.
func reservedShape(s string) bool {
	if len(s) < 3 || s[2] != '_' {
		return false
	}
	switch s[:3] {
	case PublicPrefix, SecretPrefix, TokenPrefix:
	default:
		return false
	}
	for i := 3; i < len(s); i++ {
		if !isBase62(s[i]) {
			return false
		}
	}
	return true
}

// validGenerated checks prefix, length, alphabet and (with sum) checksum of
// one generated part.
func validGenerated(s, prefix string, minRand int, sum bool) bool {
	if !strings.HasPrefix(s, prefix) || len(s) < len(prefix)+minRand+checksumLen {
		return false
	}
	for i := len(prefix); i < len(s); i++ {
		if !isBase62(s[i]) {
			return false
		}
	}
	return !sum || checksumOK(s)
}

// Character classes, as a table: every credential byte is checked on the
// hot path.
const (
	classBase62 = 1 << iota
	classToken  // RFC 6750 b64token
	classHeader // printable ASCII, what a credential header may hold
)

var charClass = func() (t [256]uint8) {
	for c := 0x20; c <= 0x7e; c++ {
		t[c] |= classHeader
	}
	for _, r := range "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" {
		t[r] |= classBase62 | classToken
	}
	for _, r := range "-._~+/=" {
		t[r] |= classToken
	}
	return t
}()

// printableASCII reports whether every byte of s is in 0x20..0x7e, eight
// bytes at a time: a byte below 0x20 borrows into its high bit when 0x20
// is subtracted, a byte above 0x7e carries into (or has) it when 1 is
// added. A borrow or carry crossing into the next byte only happens when
// the byte it came from already failed.
func printableASCII(s string) bool {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	i := 0
	for ; i+8 <= len(s); i += 8 {
		x := binary.LittleEndian.Uint64([]byte(s[i : i+8]))
		if ((x-0x20*ones)&^x|(x+ones)|x)&highs != 0 {
			return false
		}
	}
	for ; i < len(s); i++ {
		if charClass[s[i]]&classHeader == 0 {
			return false
		}
	}
	return true
}

func isBase62(c byte) bool { return charClass[c]&classBase62 != 0 }

// isTokenChar is the RFC 6750 b64token alphabet.
func isTokenChar(c byte) bool { return charClass[c]&classToken != 0 }

// Headers are a request's headers. Get returns the value of a header
// (lowercase name) and whether it is present. Repeated headers must be
// joined with "," as Envoy does, so that they are rejected like Envoy's
// merged form.
type Headers interface {
	Get(name string) (string, bool)
}

// HeaderFunc adapts a function to Headers.
type HeaderFunc func(name string) (string, bool)

// Get implements Headers.
func (f HeaderFunc) Get(name string) (string, bool) { return f(name) }

// Extractor finds the credential of a request in the configured headers.
type Extractor struct {
	sources []string
}

// DefaultSources is where credentials are read unless configured otherwise.
var DefaultSources = []string{"authorization", "x-api-key"}

// NewExtractor reads credentials from the named headers (case-insensitive).
// "authorization" carries a scheme (Bearer or Basic); any other header
// carries the bare credential.
func NewExtractor(sources []string) *Extractor {
	s := make([]string, len(sources))
	for i, h := range sources {
		s[i] = strings.ToLower(h)
	}
	return &Extractor{sources: s}
}

// Extract returns the credential and the header it came from, or one of
// ErrMissing, ErrAmbiguous, ErrMalformed. It never hashes or looks anything
// up, and never allocates on the success path. A generated credential's
// checksums are verified by Authenticate, before any lookup.
func (e *Extractor) Extract(h Headers) (Credential, string, error) {
	var value, from string
	found := 0
	for _, name := range e.sources {
		v, ok := h.Get(name)
		if !ok {
			continue
		}
		found++
		value, from = v, name
	}
	switch {
	case found == 0:
		return Credential{}, "", ErrMissing
	case found > 1:
		// Never pick one, even if the copies are equal.
		return Credential{}, "", ErrAmbiguous
	}
	c, err := parseHeader(from, value)
	if err != nil {
		return Credential{}, from, err
	}
	return c, from, nil
}

// parseHeader checks size and characters of the whole value before
// reading any structure out of it.
func parseHeader(name, v string) (Credential, error) {
	if len(v) > MaxHeaderLen {
		return Credential{}, ErrMalformed
	}
	if !printableASCII(v) {
		return Credential{}, ErrMalformed
	}
	v = strings.Trim(v, " ")
	if v == "" {
		return Credential{}, ErrMalformed
	}
	if name != "authorization" {
		return parseCredential(v, false)
	}
	sp := strings.IndexByte(v, ' ')
	if sp < 0 {
		// A bare credential with no scheme.
		return Credential{}, ErrMalformed
	}
	scheme, rest := v[:sp], strings.TrimLeft(v[sp:], " ")
	switch {
	case strings.EqualFold(scheme, "bearer"):
		return parseCredential(rest, false)
	case strings.EqualFold(scheme, "basic"):
		return parseBasic(rest)
	}
	return Credential{}, ErrMalformed
}

// parseBasic reads base64(pk_...:sk_...), the form Stripe-style clients
// send. Only pairs are accepted this way.
func parseBasic(s string) (Credential, error) {
	if len(s) > MaxHeaderLen {
		return Credential{}, ErrMalformed
	}
	dec, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return Credential{}, ErrMalformed
	}
	c, err := ParseCredential(string(dec))
	if err != nil || c.kind != KindPair {
		return Credential{}, ErrMalformed
	}
	return c, nil
}
