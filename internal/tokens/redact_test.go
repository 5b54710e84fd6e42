package tokens

import (
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strings"
	"testing"
)

// percentEncode encodes every byte of s as %XX, levels times over.
func percentEncode(s string, levels int) string {
	for range levels {
		var b strings.Builder
		for i := 0; i < len(s); i++ {
			fmt.Fprintf(&b, "%%%02X", s[i])
		}
		s = b.String()
	}
	return s
}

func TestRedact(t *testing.T) {
	t.Parallel()
	pub, sec, err := GeneratePair()
	if err != nil {
		t.Fatal(err)
	}
	tok, err := GenerateToken()
	if err != nil {
		t.Fatal(err)
	}
	pair := pub + ":" + sec
	cases := []struct {
		name, in, want string
	}{
		{"plain path", "/v1/orders/42", "/v1/orders/42"},
		{"snake case is not a key", "/v1/task_list/disk_usage", "/v1/task_list/disk_usage"},
		{"pair in a path", "/v1/" + pair + "/orders", "/v1/" + Redacted + ":" + Redacted},
		{"token in a path", "/v1/" + tok + "/orders", "/v1/" + Redacted + "/orders"},
		{"token in a query", "/v1/orders?api_key=" + tok + "&x=1", "/v1/orders?api_key=" + Redacted + "&x=1"},
		{"secret alone", "/" + sec, "/" + Redacted},
		{"public key alone", "/" + pub + "/x", "/" + Redacted + "/x"},
		{"upper case prefix", "/" + strings.ToUpper(tok[:3]) + tok[3:], "/" + Redacted},
		{"glued to a word", "/abc" + tok, "/abc" + Redacted},
		{"first letter encoded", "/%" + fmt.Sprintf("%02x", tok[0]) + tok[1:], "/" + Redacted},
		{"underscore encoded", "/" + tok[:2] + "%5F" + tok[3:], "/" + Redacted},
		{"double encoded", "/" + percentEncode(tok, 2) + "/x", "/" + Redacted + "/x"},
		{"encoded colon before the secret", "/" + pub + "%3A" + sec + "/x", "/" + Redacted + "%3A" + Redacted},
		{"after :sk_, anything", "/pk_x:sk_not-base62/and/more", "/pk_x:" + Redacted},
		{"bearer value", "req Bearer legacy-token-1234", "req Bearer " + Redacted},
		{"bearer, encoded space", "/bearer%20legacy-token-1234", "/bearer%20" + Redacted},
		{"basic value", "Basic " + base64.StdEncoding.EncodeToString([]byte(pair)), "Basic " + Redacted},
		{"bearer alone", "/docs/bearer", "/docs/bearer"},
		{"host", tok + ".example.com", Redacted + ".example.com"},
		{"cut", "/" + strings.Repeat("a", 300), "/" + strings.Repeat("a", 99) + "...(cut from 301 bytes)"},
		{"cut after a redaction", "/" + tok + "/" + strings.Repeat("a", 300), "/" + Redacted + "/" + strings.Repeat("a", 88) + fmt.Sprintf("...(cut from %d bytes)", 302+len(tok))},
		{"redaction brings it within the bound", strings.Repeat("a", 90) + tok, strings.Repeat("a", 90) + Redacted},
		{"cut inside the placeholder", strings.Repeat("a", 95) + tok, strings.Repeat("a", 95) + Redacted[:5] + fmt.Sprintf("...(cut from %d bytes)", 95+len(tok))},
		{"cut at a rune boundary", strings.Repeat("a", 99) + "é", strings.Repeat("a", 99) + "...(cut from 101 bytes)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := Redact(tc.in, 100); got != tc.want {
				t.Errorf("Redact(%q)\n got %q\nwant %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestRedactDoesNotAllocateForPlainValues(t *testing.T) {
	s := "/v1/orders/42"
	if n := testing.AllocsPerRun(100, func() { _ = Redact(s, 256) }); n != 0 {
		t.Fatalf("%v allocations", n)
	}
}

// FuzzRedact: whatever surrounds a generated credential, however much of
// it is percent-encoded and in what case its prefix is written, no part of
// its secret survives Redact, not even after decoding the output.
func FuzzRedact(f *testing.F) {
	for _, s := range [][2]string{
		{"/v1/", "/orders"}, {"", ""}, {"x-request-id: ", ""}, {"/bearer ", "?a=b"}, {"%", "%"}, {"%7", "0"},
		{"abc", "def"}, {"pk_", ":sk_"}, {strings.Repeat("a", 300), ""}, {"", strings.Repeat("%41", 500)},
	} {
		f.Add(s[0], s[1], uint64(0), uint8(0), 256)
		f.Add(s[0], s[1], uint64(1), uint8(3), 20)
	}
	f.Fuzz(func(t *testing.T, before, after string, seed uint64, mode uint8, max int) {
		max = 1 + abs(max)%4096
		var cred, secret string
		if mode&1 == 0 {
			pub, sec, err := GeneratePair()
			if err != nil {
				t.Fatal(err)
			}
			cred, secret = pub+":"+sec, sec[3:]
		} else {
			tok, err := GenerateToken()
			if err != nil {
				t.Fatal(err)
			}
			cred, secret = tok, tok[3:]
		}
		if mode&2 != 0 {
			cred = strings.ToUpper(cred[:2]) + cred[2:]
		}
		// Encode some characters, some of them twice over.
		rnd := rand.New(rand.NewPCG(seed, seed>>1))
		var b strings.Builder
		for i := 0; i < len(cred); i++ {
			switch levels := int(mode>>2) % 3; {
			case levels > 0 && rnd.IntN(3) == 0:
				b.WriteString(percentEncode(cred[i:i+1], 1+rnd.IntN(levels)))
			default:
				b.WriteByte(cred[i])
			}
		}
		in := before + b.String() + after
		out := Redact(in, max)
		if len(out) > max+len("...(cut from  bytes)")+20 {
			t.Fatalf("output of %d bytes for a bound of %d", len(out), max)
		}
		decoded := out
		for range 4 {
			if d, err := url.PathUnescape(decoded); err == nil {
				decoded = d
			}
		}
		for _, o := range []string{out, decoded} {
			for i := 0; i+8 <= len(secret); i++ {
				if w := secret[i : i+8]; strings.Contains(o, w) && !strings.Contains(before+after, w) {
					t.Fatalf("secret piece %q survives in %q (input %q)", w, o, in)
				}
			}
		}
	})
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}

func BenchmarkRedact(b *testing.B) {
	for _, tc := range []struct{ name, in string }{
		{"plain", "/v1/orders/42"},
		{"snake_case", "/v1/order_items/42/line_items"},
		{"long", "/" + strings.Repeat("a/", 4096)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_ = Redact(tc.in, 256)
			}
		})
	}
}
