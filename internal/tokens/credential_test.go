package tokens

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/extauthz/extauthz/internal/racecheck"
	"strings"
	"testing"
)

// fixed, valid generated credentials (checksums computed, not random).
var (
	testPublic = withChecksum("pk_" + strings.Repeat("A", publicRandLen))
	testSecret = withChecksum("sk_" + strings.Repeat("b", secretRandLen))
	testPair   = testPublic + ":" + testSecret
	testToken  = withChecksum("tk_" + strings.Repeat("7", tokenRandLen))
)

func withChecksum(body string) string { return body + checksum(body) }

// headers is a HeaderFunc over a map, as Envoy's merged headers map.
func headers(m map[string]string) HeaderFunc {
	return func(name string) (string, bool) { v, ok := m[name]; return v, ok }
}

func TestExtract(t *testing.T) {
	t.Parallel()
	basic := func(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(s)) }
	badSum := testPublic[:len(testPublic)-1] + "x" + ":" + testSecret
	typo := strings.Replace(testPair, "A", "B", 1)
	cases := []struct {
		name    string
		h       map[string]string
		kind    Kind
		from    string
		wantErr error
	}{
		{"bearer pair", map[string]string{"authorization": "Bearer " + testPair}, KindPair, "authorization", nil},
		{"bearer lowercase scheme", map[string]string{"authorization": "bearer " + testPair}, KindPair, "authorization", nil},
		{"bearer mixed case, many spaces", map[string]string{"authorization": "BeArEr    " + testPair}, KindPair, "authorization", nil},
		{"bearer token", map[string]string{"authorization": "Bearer " + testToken}, KindToken, "authorization", nil},
		{"bearer legacy token", map[string]string{"authorization": "Bearer app-1234567890abcdef"}, KindToken, "authorization", nil},
		{"x-api-key pair", map[string]string{"x-api-key": testPair}, KindPair, "x-api-key", nil},
		{"x-api-key legacy", map[string]string{"x-api-key": "legacy_token.v1~abc"}, KindToken, "x-api-key", nil},
		{"basic pair", map[string]string{"authorization": basic(testPair)}, KindPair, "authorization", nil},
		{"surrounding spaces", map[string]string{"x-api-key": "  " + testPair + " "}, KindPair, "x-api-key", nil},

		{"nothing", map[string]string{"accept": "*/*"}, 0, "", ErrMissing},
		{"both places", map[string]string{"authorization": "Bearer " + testPair, "x-api-key": testPair}, 0, "", ErrAmbiguous},
		{"both places, one garbage", map[string]string{"authorization": "Bearer x", "x-api-key": testPair}, 0, "", ErrAmbiguous},
		{"empty value", map[string]string{"x-api-key": ""}, 0, "x-api-key", ErrMalformed},
		{"spaces only", map[string]string{"x-api-key": "   "}, 0, "x-api-key", ErrMalformed},
		{"scheme only", map[string]string{"authorization": "Bearer"}, 0, "authorization", ErrMalformed},
		{"scheme and spaces", map[string]string{"authorization": "Bearer   "}, 0, "authorization", ErrMalformed},
		{"bare credential in authorization", map[string]string{"authorization": testPair}, 0, "authorization", ErrMalformed},
		{"unknown scheme", map[string]string{"authorization": "Token " + testPair}, 0, "authorization", ErrMalformed},
		{"digest scheme", map[string]string{"authorization": `Digest username="a"`}, 0, "authorization", ErrMalformed},
		{"tab separator", map[string]string{"authorization": "Bearer\t" + testPair}, 0, "authorization", ErrMalformed},
		{"merged duplicate (envoy joins with comma)", map[string]string{"authorization": "Bearer " + testPair + ",Bearer " + testPair}, 0, "authorization", ErrMalformed},
		{"merged duplicate x-api-key", map[string]string{"x-api-key": testPair + "," + testPair}, 0, "x-api-key", ErrMalformed},
		{"over 4 KiB", map[string]string{"x-api-key": strings.Repeat("a", MaxHeaderLen+1)}, 0, "x-api-key", ErrMalformed},
		{"long legacy token", map[string]string{"x-api-key": strings.Repeat("a", maxLegacyLen+1)}, 0, "x-api-key", ErrMalformed},
		{"short legacy token", map[string]string{"x-api-key": "abc"}, 0, "x-api-key", ErrMalformed},
		{"nul byte", map[string]string{"x-api-key": testPair[:10] + "\x00" + testPair[10:]}, 0, "x-api-key", ErrMalformed},
		{"non-ascii", map[string]string{"x-api-key": "tökentokentoken"}, 0, "x-api-key", ErrMalformed},
		{"del byte", map[string]string{"x-api-key": "token\x7ftoken"}, 0, "x-api-key", ErrMalformed},
		{"empty secret half", map[string]string{"x-api-key": testPublic + ":"}, 0, "x-api-key", ErrMalformed},
		{"empty public half", map[string]string{"x-api-key": ":" + testSecret}, 0, "x-api-key", ErrMalformed},
		{"public alone", map[string]string{"x-api-key": testPublic}, 0, "x-api-key", ErrMalformed},
		{"secret alone", map[string]string{"x-api-key": testSecret}, 0, "x-api-key", ErrMalformed},
		{"halves swapped", map[string]string{"x-api-key": testSecret + ":" + testPublic}, 0, "x-api-key", ErrMalformed},
		{"bad checksum", map[string]string{"x-api-key": badSum}, 0, "x-api-key", ErrMalformed},
		{"typo", map[string]string{"x-api-key": typo}, 0, "x-api-key", ErrMalformed},
		{"token bad checksum", map[string]string{"x-api-key": testToken[:len(testToken)-1] + "0"}, 0, "x-api-key", ErrMalformed},
		{"token too short", map[string]string{"x-api-key": withChecksum("tk_abc")}, 0, "x-api-key", ErrMalformed},
		{"three parts", map[string]string{"x-api-key": testPair + ":" + testSecret}, 0, "x-api-key", ErrMalformed},
		{"query-ish", map[string]string{"x-api-key": "key=abc&x=1"}, 0, "x-api-key", ErrMalformed},
		{"basic not base64", map[string]string{"authorization": "Basic !!!"}, 0, "authorization", ErrMalformed},
		{"basic token", map[string]string{"authorization": basic(testToken)}, 0, "authorization", ErrMalformed},
		{"basic empty password", map[string]string{"authorization": basic(testPublic + ":")}, 0, "authorization", ErrMalformed},
		{"basic user:pass", map[string]string{"authorization": basic("user:pass")}, 0, "authorization", ErrMalformed},
		{"basic with nul", map[string]string{"authorization": basic(testPair + "\x00")}, 0, "authorization", ErrMalformed},
	}
	e := NewExtractor(DefaultSources)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, from, err := e.Extract(headers(tc.h))
			if err == nil && !c.checksumsValid() {
				// What Authenticate answers before any lookup.
				err = ErrMalformed
			}
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if from != tc.from {
				t.Errorf("from = %q, want %q", from, tc.from)
			}
			if err == nil && c.Kind() != tc.kind {
				t.Errorf("kind = %v, want %v", c.Kind(), tc.kind)
			}
		})
	}
}

func TestExtractConfiguredSources(t *testing.T) {
	t.Parallel()
	// An API whose authorization header carries a JWT reads x-api-key only.
	e := NewExtractor([]string{"X-API-Key"})
	h := headers(map[string]string{"authorization": "Bearer eyJhbGciOi.x.y", "x-api-key": testPair})
	c, from, err := e.Extract(h)
	if err != nil || from != "x-api-key" || c.Kind() != KindPair {
		t.Fatalf("got %v %q %v, want pair from x-api-key", c, from, err)
	}
	if _, _, err := e.Extract(headers(map[string]string{"authorization": "Bearer " + testPair})); !errors.Is(err, ErrMissing) {
		t.Fatalf("authorization not configured: err = %v, want ErrMissing", err)
	}
}

func TestCredentialNeverPrintsSecret(t *testing.T) {
	t.Parallel()
	c, err := ParseCredential(testPair)
	if err != nil {
		t.Fatal(err)
	}
	j, _ := json.Marshal(c)
	for _, s := range []string{fmt.Sprint(c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", c), string(j)} {
		if strings.Contains(s, "sk_") || strings.Contains(s, testSecret[3:12]) {
			t.Errorf("secret in %q", s)
		}
	}
}

func TestGeneratedCredentialsParse(t *testing.T) {
	t.Parallel()
	for range 200 {
		pub, sec, err := GeneratePair()
		if err != nil {
			t.Fatal(err)
		}
		if len(pub) != 3+publicRandLen+checksumLen || len(sec) != 3+secretRandLen+checksumLen {
			t.Fatalf("lengths %d, %d", len(pub), len(sec))
		}
		c, err := ParseCredential(pub + ":" + sec)
		if err != nil || c.Kind() != KindPair || c.PublicKey() != pub {
			t.Fatalf("generated pair did not parse: %v", err)
		}
		tok, err := GenerateToken()
		if err != nil {
			t.Fatal(err)
		}
		if c, err := ParseCredential(tok); err != nil || c.Kind() != KindToken {
			t.Fatalf("generated token did not parse: %v", err)
		}
	}
}

// Every single-character substitution of a generated key is caught by the
// checksum (CRC-32 detects all single-symbol errors in this length).
func TestChecksumCatchesEverySubstitution(t *testing.T) {
	t.Parallel()
	for i := 3; i < len(testSecret); i++ {
		for _, r := range []byte("09AZaz") {
			if testSecret[i] == r {
				continue
			}
			mutated := testSecret[:i] + string(r) + testSecret[i+1:]
			if _, err := ParseCredential(testPublic + ":" + mutated); !errors.Is(err, ErrMalformed) {
				t.Fatalf("substitution at %d accepted", i)
			}
		}
	}
}

func TestChecksumKnownAnswer(t *testing.T) {
	t.Parallel()
	// CRC-32/IEEE("123456789") = 0xCBF43926 = 3421780262 = "3jZRME" in base62 (computed with Python zlib).
	if got := checksum("123456789"); got != "3jZRME" {
		t.Fatalf("checksum = %q, want 3jZRME", got)
	}
}

func TestNewID(t *testing.T) {
	t.Parallel()
	id, err := NewID()
	if err != nil {
		t.Fatal(err)
	}
	if len(id) != 36 || id[14] != '4' || strings.Count(id, "-") != 4 {
		t.Fatalf("not a v4 uuid: %q", id)
	}
}

func TestExtractDoesNotAllocate(t *testing.T) {
	if racecheck.Enabled {
		t.Skip("the race detector allocates; run without -race (make bench does)")
	}
	e := NewExtractor(DefaultSources)
	m := map[string]string{"authorization": "Bearer " + testPair}
	h := headers(m)
	allocs := testing.AllocsPerRun(100, func() {
		if _, _, err := e.Extract(h); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("Extract allocates %v times", allocs)
	}
}

// printableASCII agrees with a byte-by-byte check for every byte value at
// every position of a word, and in the tail.
func TestPrintableASCII(t *testing.T) {
	t.Parallel()
	naive := func(s string) bool {
		for i := 0; i < len(s); i++ {
			if s[i] < 0x20 || s[i] > 0x7e {
				return false
			}
		}
		return true
	}
	base := []byte("Bearer tk_abcdefghijklmnopq")
	for pos := range base {
		for c := 0; c < 256; c++ {
			b := append([]byte(nil), base...)
			b[pos] = byte(c)
			for _, s := range []string{string(b), string(b[:pos+1]), string(b[pos:])} {
				if got, want := printableASCII(s), naive(s); got != want {
					t.Fatalf("printableASCII(%q) = %v, want %v", s, got, want)
				}
			}
		}
	}
}

// BenchmarkExtract is credential parsing alone: finding the header,
// the scheme, and the shape of a pair, a token or a Basic pair.
func BenchmarkExtract(b *testing.B) {
	basic := "Basic " + base64.StdEncoding.EncodeToString([]byte(testPair))
	for name, h := range map[string]map[string]string{
		"bearer pair":     {"authorization": "Bearer " + testPair},
		"x-api-key token": {"x-api-key": testToken},
		"basic pair":      {"authorization": basic},
	} {
		hdr := headers(h)
		e := NewExtractor(DefaultSources)
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := e.Extract(hdr); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
