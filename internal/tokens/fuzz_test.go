package tokens

import (
	"encoding/base64"
	"errors"
	"testing"
)

// FuzzExtract feeds arbitrary header values through the extractor. It must
// never panic, must fail only with the three sentinel errors (which carry no
// input, so no secret can be echoed), and whatever it accepts must be a
// well-formed credential that parses again to the same thing.
func FuzzExtract(f *testing.F) {
	for _, s := range []string{
		"Bearer " + testPair, "bearer  " + testToken, "Basic " + base64.StdEncoding.EncodeToString([]byte(testPair)),
		"Bearer " + testPair + ",Bearer " + testPair, "Bearer", "Token x", testPair, "Bearer pk_:sk_",
		"Bearer legacy-token-123", "Basic Og==", "Bearer \x00", "",
	} {
		f.Add(s, "")
		f.Add("", s)
	}
	f.Add("Bearer "+testPair, testPair)
	e := NewExtractor(DefaultSources)
	f.Fuzz(func(t *testing.T, authz, apiKey string) {
		h := map[string]string{}
		if authz != "" {
			h["authorization"] = authz
		}
		if apiKey != "" {
			h["x-api-key"] = apiKey
		}
		c, from, err := e.Extract(headers(h))
		if err != nil {
			if !errors.Is(err, ErrMissing) && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrAmbiguous) {
				t.Fatalf("unexpected error %v", err)
			}
			if err != ErrMissing && err != ErrMalformed && err != ErrAmbiguous {
				t.Fatalf("error is not a bare sentinel: %v", err)
			}
			return
		}
		if authz != "" && apiKey != "" {
			t.Fatal("accepted a credential present in two places")
		}
		if from != "authorization" && from != "x-api-key" {
			t.Fatalf("from = %q", from)
		}
		if !c.checksumsValid() {
			if _, err := ParseCredential(c.raw); !errors.Is(err, ErrMalformed) {
				t.Fatal("the full parse accepts a checksum that checksumsValid rejects")
			}
			return // what Authenticate answers ErrMalformed to, before any lookup
		}
		c.unsummed = false
		again, err := ParseCredential(c.raw)
		if err != nil || again != c {
			t.Fatalf("accepted credential does not round-trip: %v", err)
		}
		for i := 0; i < len(c.raw); i++ {
			if c.raw[i] <= ' ' || c.raw[i] > '~' || c.raw[i] == ',' {
				t.Fatalf("accepted byte %q", c.raw[i])
			}
		}
	})
}
