package tokens

import (
	"encoding/hex"
	"strings"
	"testing"
)

// RFC 4231 test case 2: HMAC-SHA256(key "Jefe", "what do ya want for nothing?").
// The pepper minimum is enforced by ParsePeppers, not NewHasher.
func TestDigestKnownAnswer(t *testing.T) {
	t.Parallel()
	h, err := NewHasher([]Pepper{{ID: "rfc", Secret: []byte("Jefe")}})
	if err != nil {
		t.Fatal(err)
	}
	d := h.Digest("what do ya want for nothing?")
	const want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
	if got := hex.EncodeToString(d[:]); got != want {
		t.Fatalf("digest = %s, want %s", got, want)
	}
	if !h.Verify("rfc", "what do ya want for nothing?", d[:]) {
		t.Fatal("Verify rejects the right digest")
	}
	if h.Verify("other", "what do ya want for nothing?", d[:]) {
		t.Fatal("Verify accepts an unknown pepper id")
	}
	if h.Verify("rfc", "what do ya want for nothing!", d[:]) {
		t.Fatal("Verify accepts a wrong secret")
	}
}

func TestParsePeppers(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("s", 32)
	ps, err := ParsePeppers("new:" + long + ", old:" + long + "x")
	if err != nil || len(ps) != 2 || ps[0].ID != "new" || string(ps[1].Secret) != long+"x" {
		t.Fatalf("got %v, %v", ps, err)
	}
	for _, bad := range []string{"", "nocolon", ":" + long, "a:short", "a:" + long + ",a:" + long, "a b:" + long} {
		_, err := ParsePeppers(bad)
		if err == nil {
			t.Errorf("%q accepted", bad)
			continue
		}
		if strings.Contains(err.Error(), long[:10]) {
			t.Errorf("error echoes the secret: %v", err)
		}
	}
}
