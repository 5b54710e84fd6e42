package authz

import (
	"net/url"
	"path"
	"strings"
	"testing"
)

func TestCanonicalPath(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		raw, want string
		keep      bool // EXTAUTHZ_ENCODED_SLASHES=keep
	}{
		{raw: "/", want: "/"},
		{raw: "/v1/orders?id=7", want: "/v1/orders"},
		{raw: "/v1/orders/", want: "/v1/orders/"},
		{raw: "/%61dmin/users", want: "/admin/users"},
		{raw: "/%41%42%7e", want: "/AB~"},
		{raw: "//admin//users", want: "/admin/users"},
		{raw: "/x/../admin/users", want: "/admin/users"},
		{raw: "/public/../admin/report.txt", want: "/admin/report.txt"},
		{raw: "/public/%2e%2e/admin", want: "/admin"},
		{raw: "/public/.%2E/admin", want: "/admin"},
		{raw: "/../../admin", want: "/admin"},
		{raw: "/a/./b/.", want: "/a/b/"},
		{raw: "/a/b/..", want: "/a/"},
		{raw: "/..", want: "/"},
		{raw: "/caf%c3%a9", want: "/caf%C3%A9"},
		{raw: "/caf\xc3\xa9", want: "/caf%C3%A9"},
		{raw: "/a%20b", want: "/a%20b"},
		{raw: "/a%25b", want: "/a%25b"},
		{raw: "/a%3Fb%23c%3bd", want: "/a%3Fb%23c%3Bd"},
		{raw: "/a%24b%3A", want: "/a$b:"},
		{raw: "/files/a%2Fb", want: "/files/a%2Fb", keep: true},
		{raw: "/files/a%2fb/c/../d", want: "/files/a%2Fb/d", keep: true},
		{raw: "/files/a%2Fb%2Fc.txt", want: "/files/a%2Fb%2Fc.txt", keep: true},
	} {
		got, err := CanonicalPath(tc.raw, PathOptions{KeepEncodedSlashes: tc.keep})
		if err != nil || got != tc.want {
			t.Errorf("CanonicalPath(%q, keep=%v) = %q, %v; want %q", tc.raw, tc.keep, got, err, tc.want)
		}
	}
	for _, raw := range []string{
		"", "admin", "*", "http://x/admin", "?/public",
		"/public%2F..%2Fadmin", "/public%2f..", "/a%5Cb", "/a%5c..%5cadmin",
		"/a\\b", "/public/..\\admin", "/a%00", "/a%0a", "/a%7F", "/a\x00", "/a\tb", "/a b", "/a\x7f",
		"/a%", "/a%2", "/a%zz", "/a%g0", "/a#frag", "/public/..;/admin", "/admin;x/users", "/a;b",
		"/%C0%AE%C0%AE/admin", "/a%FF", "/a\xff", "/caf%C3",
	} {
		if got, err := CanonicalPath(raw, PathOptions{}); err == nil {
			t.Errorf("CanonicalPath(%q) = %q, want malformed", raw, got)
		}
	}
	// keep makes only %2F data, and only between names: an upstream that
	// decodes it must not find a dot segment or an empty one there.
	for _, raw := range []string{"/a%5Cb", "/x%2F..%2Fadmin", "/public/..%2Fadmin", "/%2Fadmin", "/admin%2F", "/a%2F%2Fb", "/a%2F.%2Fb", "/x/%2E%2E%2Fadmin", "/admin%2Fx/..", "/files/a%2fb/../c"} {
		if got, err := CanonicalPath(raw, PathOptions{KeepEncodedSlashes: true}); err == nil {
			t.Errorf("CanonicalPath(%q, keep) = %q, want malformed", raw, got)
		}
	}
}

func TestCanonicalPathAllocs(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() { CanonicalPath("/v1/orders/7?x=1", PathOptions{}) }); n != 0 {
		t.Errorf("canonical path: %v allocations, want 0", n)
	}
}

func TestUnderPrefix(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		path, prefix string
		want         bool
	}{
		{"/public", "/public", true},
		{"/public/", "/public", true},
		{"/public/x", "/public", true},
		{"/publications", "/public", false},
		{"/public-internal/admin", "/public", false},
		{"/anything", "/", true},
		{"/", "/", true},
		{"/pub", "/public", false},
	} {
		if got := underPrefix(tc.path, tc.prefix); got != tc.want {
			t.Errorf("underPrefix(%q, %q) = %v", tc.path, tc.prefix, got)
		}
	}
}

// fuzzRules are route rules whose prefixes exercise decoding; ruleOf names
// the one that applies to a canonical path.
var fuzzRules = []string{"/", "/public", "/admin", "/admin/public", "/caf\u00e9", "/p%25q", "/a b", "/x%2Fy"}

func ruleOf(t *testing.T, p string, o PathOptions) string {
	var rules []string
	for _, r := range fuzzRules {
		if strings.Contains(r, "%2F") && !o.KeepEncodedSlashes {
			continue
		}
		rules = append(rules, `{"path_prefix":"`+r+`","scopes":["s`+string(rune('a'+len(rules)))+`"]}`)
	}
	rs, err := ParseRoutes([]byte(`{"routes":[`+strings.Join(rules, ",")+`]}`), o)
	if err != nil {
		t.Fatal(err)
	}
	if m := rs.Match("h", "GET", p); m != nil {
		return m.PathPrefix
	}
	return ""
}

// upstreamPath is what an upstream that decodes its path acts on (Go's
// net/http with path.Clean, Python's http.server, nginx's $uri): every
// escape decoded, dot segments resolved, slashes merged. With
// KeepEncodedSlashes the upstream keeps %2F inside a segment (Envoy's
// KEEP_UNCHANGED and a router that matches the escaped path). It returns
// the result in canonical spelling, to compare with CanonicalPath's.
func upstreamPath(raw string, o PathOptions) (string, bool) {
	raw, _, _ = strings.Cut(raw, "?")
	var segs []string
	for _, s := range strings.Split(raw, "/")[1:] {
		var parts []string
		if o.KeepEncodedSlashes {
			parts = splitFold(s, "%2F")
		} else {
			parts = []string{s}
		}
		for i, p := range parts {
			d, err := url.PathUnescape(p)
			if err != nil {
				return "", false
			}
			var b strings.Builder
			for j := 0; j < len(d); j++ {
				if d[j] == '/' {
					b.WriteByte('/')
				} else {
					writeCanonical(&b, d[j])
				}
			}
			parts[i] = b.String()
		}
		segs = append(segs, strings.Join(parts, "%2F"))
	}
	return path.Clean("/" + strings.Join(segs, "/")), true
}

// splitFold splits s at sep, ASCII case-insensitively.
func splitFold(s, sep string) []string {
	var out []string
	start := 0
	for i := 0; i+len(sep) <= len(s); i++ {
		if strings.EqualFold(s[i:i+len(sep)], sep) {
			out = append(out, s[start:i])
			start = i + len(sep)
			i += len(sep) - 1
		}
	}
	return append(out, s[start:])
}

// FuzzCanonicalPath holds path matching to what an upstream serves: for
// any path extauthz accepts, the rule that applies to its canonical form
// is the rule that applies to the path the upstream acts on, and the two
// are the same path (a trailing slash aside). Canonical forms are fixed
// points, and start with one slash.
func FuzzCanonicalPath(f *testing.F) {
	for _, s := range []string{
		"/public/../admin", "/%61dmin", "//admin", "/public%2F..%2Fadmin", "/x/%2e%2e/admin/", "/caf%C3%A9/x",
		"/p%2525q", "/a%20b/c", "/public/./x?y=/../admin", "/x%2fy/..", "/admin/public/..", "/%2E%2E",
	} {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, raw string, keep bool) {
		o := PathOptions{KeepEncodedSlashes: keep}
		got, err := CanonicalPath(raw, o)
		if err != nil {
			return
		}
		if !strings.HasPrefix(got, "/") || strings.Contains(got, "//") || strings.Contains(got, "/./") || strings.Contains(got, "/../") {
			t.Fatalf("CanonicalPath(%q) = %q: not canonical", raw, got)
		}
		if again, err := CanonicalPath(got, o); err != nil || again != got {
			t.Fatalf("CanonicalPath(%q) = %q, but again %q, %v", raw, got, again, err)
		}
		up, ok := upstreamPath(raw, o)
		if !ok {
			t.Fatalf("accepted %q, which the upstream cannot decode", raw)
		}
		if trimSlash(up) != trimSlash(got) {
			t.Fatalf("CanonicalPath(%q) = %q, upstream acts on %q", raw, got, up)
		}
		if a, b := ruleOf(t, got, o), ruleOf(t, up, o); a != b {
			t.Fatalf("%q: rule %q for extauthz, %q for the upstream's %q", raw, a, b, up)
		}
		if keep {
			// An upstream that decodes %2F after all acts on the second
			// reading extauthz also judges (Service.rulesFor).
			dec, _ := upstreamPath(raw, PathOptions{})
			if second := strings.ReplaceAll(got, "%2F", "/"); trimSlash(dec) != trimSlash(second) {
				t.Fatalf("keep: CanonicalPath(%q) = %q, read with slashes %q, but a decoding upstream acts on %q", raw, got, second, dec)
			}
		}
	})
}

func trimSlash(p string) string {
	if p == "/" {
		return p
	}
	return strings.TrimSuffix(p, "/")
}

func BenchmarkCanonicalPath(b *testing.B) {
	for _, p := range []string{"/v1/orders/7f3a9c2e-1b4d-4e8a-9c6f-2d8e7a1b3c5d?expand=items", "/v1/%6Frders//7/../8"} {
		b.Run(p[:10], func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				CanonicalPath(p, PathOptions{})
			}
		})
	}
}
