package authz

import (
	"fmt"
	"net/http"
	"strings"

	"github.com/extauthz/extauthz/internal/tokens"
)

// HeaderRemove is Envoy's http_service header naming request headers to
// remove on allow (honoured only with a 200).
const HeaderRemove = "x-envoy-auth-headers-to-remove"

// ForwardedHeaders is the family of headers a forward-auth proxy names the
// original request in. Exactly one family is read: were both, a client
// could send the one the proxy does not set and choose the route judged.
type ForwardedHeaders uint8

// Header families.
const (
	// ForwardedXForwarded is X-Forwarded-Method, -Uri and -Host, as
	// Traefik and Caddy set them (the default).
	ForwardedXForwarded ForwardedHeaders = iota
	// ForwardedXOriginal is X-Original-Method, -URI and -Host, nginx's
	// convention.
	ForwardedXOriginal
)

// ParseForwardedHeaders reads EXTAUTHZ_FORWARDED_HEADERS.
func ParseForwardedHeaders(s string) (ForwardedHeaders, error) {
	switch strings.ToLower(s) {
	case "x-forwarded":
		return ForwardedXForwarded, nil
	case "x-original":
		return ForwardedXOriginal, nil
	}
	return 0, fmt.Errorf("%q: want x-forwarded or x-original", s)
}

func (f ForwardedHeaders) String() string {
	if f == ForwardedXOriginal {
		return "x-original"
	}
	return "x-forwarded"
}

// names returns the family's method, URI and host header names.
func (f ForwardedHeaders) names() (method, uri, host string) {
	if f == ForwardedXOriginal {
		return "X-Original-Method", "X-Original-Uri", "X-Original-Host"
	}
	return "X-Forwarded-Method", "X-Forwarded-Uri", "X-Forwarded-Host"
}

// HTTPHandler serves the same decisions over HTTP, for Envoy's
// http_service mode and for nginx auth_request, Traefik ForwardAuth and
// Caddy forward_auth. It answers any method on any path under prefix; it
// never reads the body, never redirects, never cleans a path.
//
// Where the original request is read from:
//   - prefix + path (Envoy's http_service sends path_prefix + original
//     :path): the request line itself, unless the request carries an
//     original method or URI header of either family: then it is a
//     forward-auth proxy whose address has a trailing slash, and the
//     request cannot be judged;
//   - exactly prefix (a forward-auth proxy calling a fixed address): the
//     method, URI and host headers of the configured family
//     (Options.Forwarded), each required exactly once. The proxy must set
//     them itself, overwriting the client's; a request lacking one cannot
//     be judged and is denied as malformed_path.
//
// Allow is exactly 200 with the tenant headers; a denial is 400, 401 or 403
// with the JSON body; an outage is 503, which Envoy treats as an error
// (status_on_error, failure_mode_allow).
func (s *Service) HTTPHandler(prefix string) http.Handler {
	mName, uName, hName := s.opts.Forwarded.names()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		path := r.URL.EscapedPath()
		if r.URL.RawQuery != "" {
			path += "?" + r.URL.RawQuery
		}
		// r.RequestURI is the request line as sent: never decoded or cleaned.
		raw := r.RequestURI
		if !strings.HasPrefix(raw, "/") {
			raw = path // absolute-form request line
		}
		rest, under := strings.CutPrefix(raw, prefix)
		if !under || (rest != "" && rest[0] != '/' && rest[0] != '?') {
			http.NotFound(w, r)
			return
		}
		if headerLines(r.Header) > s.opts.MaxHeaders {
			// As net/http answers headers over their size limit.
			http.Error(w, "too many headers (EXTAUTHZ_MAX_HEADERS)", http.StatusRequestHeaderFieldsTooLarge)
			return
		}
		req := Request{
			HasHTTP: true,
			Header: tokens.HeaderFunc(func(name string) (string, bool) {
				vs := r.Header.Values(name)
				if len(vs) == 0 {
					return "", false
				}
				// Repeated lines joined as Envoy joins them, so they are
				// rejected the same way.
				return strings.Join(vs, ","), true
			}),
			ID: r.Header.Get("x-request-id"),
			// The calling proxy's address: forwarded-for headers are the
			// client's to forge unless the proxy sets them.
			Source: hostOnly(r.RemoteAddr),
		}
		if rest == "" || rest[0] == '?' {
			m, okM := single(r.Header, mName)
			u, okU := single(r.Header, uName)
			h, okH := single(r.Header, hName)
			if okM && okU && okH {
				req.Method, req.Path, req.Host = m, u, h
			}
			// Otherwise the path stays empty, which is malformed: a
			// request whose route is unknown is never judged as some other.
		} else if !forwardedOriginal(r.Header) {
			req.Method, req.Path, req.Host = r.Method, rest, r.Host
		}
		// Otherwise a forward-auth proxy calls prefix + "/" (an address
		// written with a trailing slash): judging its request line would
		// judge "GET /", not the client's request. Left empty: malformed.
		s.serveHTTP(w, r, &req)
	})
}

// forwardedOriginal reports whether a request names an original method or
// URI in either family: a forward-auth proxy's call. Envoy's http_service
// sends none of these (only its allowed_headers, which never need them).
func forwardedOriginal(h http.Header) bool {
	for _, name := range []string{"X-Forwarded-Uri", "X-Forwarded-Method", "X-Original-Uri", "X-Original-Method"} {
		if _, ok := h[name]; ok {
			return true
		}
	}
	return false
}

// headerLines counts the header lines of a request.
func headerLines(h http.Header) int {
	n := 0
	for _, vs := range h {
		n += len(vs)
	}
	return n
}

// single returns a header sent exactly once, not empty.
func single(h http.Header, name string) (string, bool) {
	vs := h.Values(name)
	if len(vs) != 1 || vs[0] == "" {
		return "", false
	}
	return vs[0], true
}

func (s *Service) serveHTTP(w http.ResponseWriter, r *http.Request, req *Request) {
	d, err := s.Decide(r.Context(), req)
	h := w.Header()
	switch {
	case err != nil:
		h.Set("content-type", "application/json")
		h.Set("retry-after", "1")
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte(`{"error":"unavailable","reason":"unavailable"}`))
	case d.Reason == Allowed:
		hdrs, n := identity(&d.Result.Principal)
		for _, kv := range hdrs[:n] {
			h.Set(kv[0], kv[1])
		}
		if remove := s.removals(nil, &d); len(remove) > 0 {
			h.Set(HeaderRemove, strings.Join(remove, ", "))
		}
		w.WriteHeader(http.StatusOK)
	case d.Reason == AllowedPublic:
		// No key was checked: tell Envoy to drop any identity the client sent.
		h.Set(HeaderRemove, strings.Join(identityHeaders, ", "))
		w.WriteHeader(http.StatusOK)
	default:
		h.Set("content-type", "application/json")
		if wa := WWWAuthenticate(s.opts.Realm, d.Reason); wa != "" {
			h.Set("www-authenticate", wa)
		}
		w.WriteHeader(d.Reason.HTTPStatus())
		w.Write([]byte(DenyBody(d.Reason)))
	}
}
