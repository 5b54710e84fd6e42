package authz

import (
	"strings"
	"testing"
)

// FuzzParseRoutes: any file is a clean error or rules in the form
// requests are compared in (canonical whole-segment prefixes, lower-case
// hosts, upper-case methods), and matching with them never panics.
func FuzzParseRoutes(f *testing.F) {
	for _, s := range []string{
		`{"routes":[{"path_prefix":"/public","public":true},{"path_prefix":"/admin","scopes":["admin"]}]}`,
		`{"routes":[{"host":"*.Example.com.:443","path_prefix":"/v1/%6Frders/","methods":["post","GET"],"scopes":["w"]}]}`,
		`{"routes":[{"path_prefix":"/a","scopes":["x"],"scopes":[]}]}`,
		`{"routes":[{"host":"[::1]","path_prefix":"/caf\u00e9 x"}]} `,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		rs, err := ParseRoutes([]byte(body), PathOptions{})
		if err != nil {
			return
		}
		for _, r := range rs.rules {
			if p, err := CanonicalPath(r.PathPrefix, PathOptions{}); err != nil || p != r.PathPrefix && p != r.PathPrefix+"/" {
				t.Fatalf("prefix %q not canonical (%q, %v)", r.PathPrefix, p, err)
			}
			if r.Host != strings.ToLower(r.Host) || strings.HasSuffix(r.Host, ".") {
				t.Fatalf("host %q not canonical", r.Host)
			}
			for _, m := range r.Methods {
				if m != strings.ToUpper(m) || !isToken(m) {
					t.Fatalf("method %q", m)
				}
			}
		}
		rs.Match("Api.Example.com:80", "GET", "/v1/orders/7")
	})
}
