package authz

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/extauthz/extauthz/internal/tokens"
)

// Routes maps host, path prefix and method to the scopes a request needs,
// or marks it public. Paths are compared in canonical form (CanonicalPath)
// by whole segments, hosts lower-cased without port or trailing dot. The
// most specific rule wins: longest path prefix, then a rule naming a host
// over one that does not, then one naming methods, then file order.
type Routes struct {
	rules []Route
}

// Route is one rule of the EXTAUTHZ_ROUTES file.
type Route struct {
	Host       string   `json:"host"`        // exact, or "*.example.com"; empty: any. Port ignored.
	PathPrefix string   `json:"path_prefix"` // whole segments of the canonical path
	Methods    []string `json:"methods"`     // empty: any
	Scopes     []string `json:"scopes"`      // all required
	Public     bool     `json:"public"`      // no credential needed
}

// LoadRoutes reads a routes file: {"routes": [Route...]}. Unknown fields
// are errors, so a typo cannot silently open a path.
func LoadRoutes(path string, o PathOptions) (*Routes, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseRoutes(b, o)
}

// ParseRoutes parses the routes file format. Prefixes and hosts are
// stored in the form requests are compared in.
func ParseRoutes(b []byte, o PathOptions) (*Routes, error) {
	var f struct {
		Routes []Route `json:"routes"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, err
	}
	for i := range f.Routes {
		r := &f.Routes[i]
		switch {
		case !strings.HasPrefix(r.PathPrefix, "/"):
			return nil, fmt.Errorf("route %d: path_prefix must start with /", i+1)
		case strings.ContainsAny(r.PathPrefix, ";?#"):
			return nil, fmt.Errorf("route %d: path_prefix %q: a prefix is a path, without ';', '?' or '#'", i+1, r.PathPrefix)
		case r.Public && len(r.Scopes) > 0:
			return nil, fmt.Errorf("route %d: a public route cannot require scopes", i+1)
		case strings.Contains(r.Host, "*") && !strings.HasPrefix(r.Host, "*.") || strings.Count(r.Host, "*") > 1:
			return nil, fmt.Errorf("route %d: host wildcard must be a leading \"*.\" label", i+1)
		}
		if err := tokens.ValidateScopes(r.Scopes); err != nil {
			return nil, fmt.Errorf("route %d: %w", i+1, err)
		}
		// Written by a person: a space is a space, not a malformed request.
		p, err := CanonicalPath(strings.ReplaceAll(r.PathPrefix, " ", "%20"), o)
		if err != nil {
			return nil, fmt.Errorf("route %d: path_prefix %q: %w", i+1, r.PathPrefix, err)
		}
		if p != "/" {
			p = strings.TrimSuffix(p, "/")
		}
		r.PathPrefix = p
		r.Host = canonicalHost(r.Host)
		for j, m := range r.Methods {
			r.Methods[j] = strings.ToUpper(m)
		}
	}
	return &Routes{rules: f.Routes}, nil
}

// Match returns the most specific rule for a request, or nil. path is a
// canonical path (CanonicalPath); host an authority as sent.
func (rs *Routes) Match(host, method, path string) *Route {
	if rs == nil || len(rs.rules) == 0 {
		return nil
	}
	host = canonicalHost(host)
	var best *Route
	bestScore := -1
	for i := range rs.rules {
		r := &rs.rules[i]
		if !underPrefix(path, r.PathPrefix) || !r.matchHost(host) || !r.matchMethod(method) {
			continue
		}
		score := len(r.PathPrefix) * 4
		if r.Host != "" {
			score += 2
		}
		if len(r.Methods) > 0 {
			score++
		}
		if score > bestScore {
			best, bestScore = r, score
		}
	}
	return best
}

func (r *Route) matchHost(host string) bool {
	switch {
	case r.Host == "":
		return true
	case strings.HasPrefix(r.Host, "*."):
		return len(host) > len(r.Host)-1 && host[len(host)-len(r.Host)+1:] == r.Host[1:]
	}
	return host == r.Host
}

// matchMethod: a rule naming GET also holds HEAD, which servers answer
// by running the GET handler.
func (r *Route) matchMethod(m string) bool {
	if len(r.Methods) == 0 {
		return true
	}
	head := strings.EqualFold(m, "HEAD")
	for _, x := range r.Methods {
		if strings.EqualFold(x, m) || head && x == "GET" {
			return true
		}
	}
	return false
}

// hostOnly strips a port from an authority, keeping IPv6 brackets out.
func hostOnly(authority string) string {
	if h, _, err := net.SplitHostPort(authority); err == nil {
		return h
	}
	return strings.TrimSuffix(strings.TrimPrefix(authority, "["), "]")
}
