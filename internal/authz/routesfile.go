package authz

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"

	"github.com/extauthz/extauthz/internal/tokens"
)

// LoadRoutes reads a routes file: {"routes": [Route...]}.
func LoadRoutes(path string, o PathOptions) (*Routes, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseRoutes(b, o)
}

// ParseRoutes parses the routes file format. Prefixes and hosts are
// stored in the form requests are compared in. A rule that would match
// nothing it seems to name is an error, never silently skipped: unknown
// or repeated fields, data after the object, a method, host or prefix
// that no request can have, two rules for the same host, prefix and
// methods.
func ParseRoutes(b []byte, o PathOptions) (*Routes, error) {
	if err := noDuplicateKeys(b); err != nil {
		return nil, err
	}
	var f struct {
		Routes []Route `json:"routes"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the routes object")
	}
	seen := map[string]int{}
	for i := range f.Routes {
		r := &f.Routes[i]
		if err := r.normalise(o); err != nil {
			return nil, fmt.Errorf("route %d: %w", i+1, err)
		}
		id := r.Host + " " + r.PathPrefix + " " + strings.Join(r.Methods, ",")
		if j, dup := seen[id]; dup {
			return nil, fmt.Errorf("route %d: same host, path_prefix and methods as route %d", i+1, j)
		}
		seen[id] = i + 1
	}
	return &Routes{rules: f.Routes}, nil
}

// normalise validates a rule and puts it in the form requests are
// compared in.
func (r *Route) normalise(o PathOptions) error {
	switch {
	case !strings.HasPrefix(r.PathPrefix, "/"):
		return errors.New("path_prefix must start with /")
	case strings.ContainsAny(r.PathPrefix, ";?#*"):
		return fmt.Errorf("path_prefix %q: a prefix is a literal path (no ';', '?', '#' or '*'): /a holds /a/b", r.PathPrefix)
	case r.Public && len(r.Scopes) > 0:
		return errors.New("a public route cannot require scopes")
	}
	if err := tokens.ValidateScopes(r.Scopes); err != nil {
		return err
	}
	// Written by a person: a space is a space, not a malformed request.
	p, err := CanonicalPath(strings.ReplaceAll(r.PathPrefix, " ", "%20"), o)
	if err != nil {
		return fmt.Errorf("path_prefix %q: %w", r.PathPrefix, err)
	}
	if p != "/" {
		p = strings.TrimSuffix(p, "/")
	}
	r.PathPrefix = p
	if r.Host != "" {
		if !validRuleHost(r.Host) {
			return fmt.Errorf("host %q: want a host name, an IP address or *.domain, optionally with a port", r.Host)
		}
		r.Host = canonicalHost(r.Host)
	}
	for j, m := range r.Methods {
		if !isToken(m) || m == "*" {
			return fmt.Errorf("method %q is not an HTTP method (omit methods for any)", m)
		}
		r.Methods[j] = strings.ToUpper(m)
	}
	slices.Sort(r.Methods)
	r.Methods = slices.Compact(r.Methods)
	return nil
}

// validRuleHost accepts a host name (letters, digits, '-', dots; one
// leading "*." label allowed), an IPv4 address or a bracketed IPv6
// address, each with an optional port.
func validRuleHost(h string) bool {
	if host, port, err := net.SplitHostPort(h); err == nil {
		if port == "" || strings.Trim(port, "0123456789") != "" {
			return false
		}
		h = host
	} else if strings.HasPrefix(h, "[") && strings.HasSuffix(h, "]") {
		h = h[1 : len(h)-1]
	}
	if ip := net.ParseIP(h); ip != nil {
		return true
	}
	h = strings.TrimPrefix(strings.TrimSuffix(h, "."), "*.")
	if h == "" || len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || strings.Trim(strings.ToLower(label), "abcdefghijklmnopqrstuvwxyz0123456789-") != "" {
			return false
		}
	}
	return true
}

// noDuplicateKeys rejects a JSON document with a repeated key in any
// object: encoding/json keeps the last, so `"scopes":["admin"],"scopes":[]`
// would silently drop a requirement.
func noDuplicateKeys(b []byte) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	var walk func() error
	walk = func() error {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		switch t {
		case json.Delim('{'):
			keys := map[string]bool{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return err
				}
				if keys[k.(string)] {
					return fmt.Errorf("key %q appears twice in one object", k)
				}
				keys[k.(string)] = true
				if err := walk(); err != nil {
					return err
				}
			}
			_, err = dec.Token()
			return err
		case json.Delim('['):
			for dec.More() {
				if err := walk(); err != nil {
					return err
				}
			}
			_, err = dec.Token()
			return err
		}
		return nil
	}
	return walk()
}
