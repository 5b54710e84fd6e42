package tokens

import (
	"encoding/base64"
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
// and garbage are rejected before any hashing, cache or store access.
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
func ParseCredential(s string) (Credential, error) {
	if len(s) == 0 || len(s) > MaxHeaderLen {
		return Credential{}, ErrMalformed
	}
	if i := strings.IndexByte(s, ':'); i >= 0 {
		pub, sec := s[:i], s[i+1:]
		if len(pub) > maxPartLen || len(sec) > maxPartLen ||
			!validGenerated(pub, PublicPrefix, publicRandLen) ||
			!validGenerated(sec, SecretPrefix, secretRandLen) {
			return Credential{}, ErrMalformed
		}
		return Credential{kind: KindPair, raw: s, public: pub, secret: sec}, nil
	}
	if reservedShape(s) {
		// Half a pair is not a credential; a generated token must check out.
		if strings.HasPrefix(s, TokenPrefix) && len(s) <= maxPartLen &&
			validGenerated(s, TokenPrefix, tokenRandLen) {
			return Credential{kind: KindToken, raw: s}, nil
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

// validGenerated checks prefix, length, alphabet and checksum of one
// generated part.
func validGenerated(s, prefix string, minRand int) bool {
	if !strings.HasPrefix(s, prefix) || len(s) < len(prefix)+minRand+checksumLen {
		return false
	}
	for i := len(prefix); i < len(s); i++ {
		if !isBase62(s[i]) {
			return false
		}
	}
	body := s[:len(s)-checksumLen]
	return checksumMatches(body, s[len(s)-checksumLen:])
}

func isBase62(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z'
}

// isTokenChar is the RFC 6750 b64token alphabet.
func isTokenChar(c byte) bool {
	return isBase62(c) || c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/' || c == '='
}

// HeaderFunc returns the value of a request header (lowercase name) and
// whether it is present. Repeated headers must be joined with "," as Envoy
// does, so that they are rejected like Envoy's merged form.
type HeaderFunc func(name string) (string, bool)

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
// up, and never allocates on the success path.
func (e *Extractor) Extract(get HeaderFunc) (Credential, string, error) {
	var value, from string
	found := 0
	for _, name := range e.sources {
		v, ok := get(name)
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
	for i := 0; i < len(v); i++ {
		if v[i] < 0x20 || v[i] > 0x7e {
			return Credential{}, ErrMalformed
		}
	}
	v = strings.Trim(v, " ")
	if v == "" {
		return Credential{}, ErrMalformed
	}
	if name != "authorization" {
		return ParseCredential(v)
	}
	sp := strings.IndexByte(v, ' ')
	if sp < 0 {
		// A bare credential with no scheme.
		return Credential{}, ErrMalformed
	}
	scheme, rest := v[:sp], strings.TrimLeft(v[sp:], " ")
	switch {
	case strings.EqualFold(scheme, "bearer"):
		return ParseCredential(rest)
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
