package authz

import (
	"net/http"
	"strings"

	"github.com/extauthz/extauthz/internal/tokens"
)

// HeaderRemove is Envoy's http_service header naming request headers to
// remove on allow (honoured only with a 200).
const HeaderRemove = "x-envoy-auth-headers-to-remove"

// HTTPHandler serves the same decisions over HTTP, for Envoy's
// http_service mode and for nginx auth_request, Traefik ForwardAuth and
// Caddy forward_auth. It answers any method on any path under prefix; it
// never reads the body, never redirects, never cleans a path.
//
// Where the original request is read from:
//   - prefix + path (Envoy's http_service sends path_prefix + original
//     :path): the request line itself; forwarded headers are ignored, since
//     Envoy may pass a client's own copies through;
//   - exactly prefix (a forward-auth proxy calling a fixed address):
//     X-Forwarded-Method / X-Forwarded-Uri / X-Forwarded-Host (Traefik,
//     Caddy), or X-Original-Method / X-Original-URI (nginx, as configured).
//
// Allow is exactly 200 with the tenant headers; a denial is 401 or 403 with
// the JSON body; an outage is 503, which Envoy treats as an error
// (status_on_error, failure_mode_allow).
func (s *Service) HTTPHandler(prefix string) http.Handler {
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
		}
		if rest == "" || rest[0] == '?' {
			req.Method = firstOf(r.Header, "x-forwarded-method", "x-original-method")
			if req.Method == "" {
				req.Method = r.Method
			}
			req.Path = firstOf(r.Header, "x-forwarded-uri", "x-original-uri")
			req.Host = firstOf(r.Header, "x-forwarded-host")
			if req.Host == "" {
				req.Host = r.Host
			}
		} else {
			req.Method, req.Path, req.Host = r.Method, rest, r.Host
		}
		s.serveHTTP(w, r, &req)
	})
}

func firstOf(h http.Header, names ...string) string {
	for _, n := range names {
		if v := h.Get(n); v != "" {
			return v
		}
	}
	return ""
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
