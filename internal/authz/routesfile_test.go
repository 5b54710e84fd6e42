package authz

import (
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"slices"
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

// The shipped JSON Schema (docs/routes.schema.json, for editors and CI)
// names exactly the fields ParseRoutes reads, refuses others, and its
// patterns agree with ParseRoutes on hosts, methods and prefixes.
func TestRoutesSchemaAgrees(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../../docs/routes.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	var schema struct {
		AdditionalProperties bool `json:"additionalProperties"`
		Defs                 struct {
			Route struct {
				AdditionalProperties bool `json:"additionalProperties"`
				Properties           map[string]struct {
					Pattern string `json:"pattern"`
					Items   struct {
						Pattern string `json:"pattern"`
					} `json:"items"`
				} `json:"properties"`
			} `json:"route"`
		} `json:"$defs"`
	}
	if err := json.Unmarshal(b, &schema); err != nil {
		t.Fatal(err)
	}
	route := schema.Defs.Route
	if schema.AdditionalProperties || route.AdditionalProperties {
		t.Error("the schema allows fields ParseRoutes refuses")
	}
	var fields []string
	for i := range reflect.TypeFor[Route]().NumField() {
		fields = append(fields, strings.Split(reflect.TypeFor[Route]().Field(i).Tag.Get("json"), ",")[0])
	}
	var named []string
	for k := range route.Properties {
		named = append(named, k)
	}
	slices.Sort(fields)
	slices.Sort(named)
	if !slices.Equal(fields, named) {
		t.Errorf("schema fields %v, Route fields %v", named, fields)
	}
	agree := func(field, pattern string, body func(string) string, values ...string) {
		re := regexp.MustCompile(pattern)
		for _, v := range values {
			_, err := ParseRoutes([]byte(body(v)), PathOptions{})
			if re.MatchString(v) != (err == nil) {
				t.Errorf("%s %q: schema says %v, ParseRoutes says %v", field, v, re.MatchString(v), err)
			}
		}
	}
	q := func(v string) string { b, _ := json.Marshal(v); return string(b) }
	agree("host", route.Properties["host"].Pattern, func(v string) string { return `{"routes":[{"host":` + q(v) + `,"path_prefix":"/a"}]}` },
		"", "api.example.com", "*.example.com", "API.example.com.:443", "10.0.0.1", "[::1]:80",
		"https://api.example.com", "api.example.com/", "api.example.com ", "a.*.com", "api.example.com:https")
	agree("method", route.Properties["methods"].Items.Pattern, func(v string) string { return `{"routes":[{"methods":[` + q(v) + `],"path_prefix":"/a"}]}` },
		"GET", "post", "PROPFIND", "GET ", "", "*", "GET,POST")
	agree("path_prefix", route.Properties["path_prefix"].Pattern, func(v string) string { return `{"routes":[{"path_prefix":` + q(v) + `}]}` },
		"/", "/admin", "/v1/orders/", "/caf\u00e9", "admin", "/admin/*", "/a;b", "/a?b", "/a#b")
}
