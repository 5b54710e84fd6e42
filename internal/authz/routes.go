package authz

import (
	"net"
	"strings"
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

// Len is the number of rules.
func (rs *Routes) Len() int {
	if rs == nil {
		return 0
	}
	return len(rs.rules)
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
