package authz

import (
	"errors"
	"strings"
	"unicode/utf8"
)

// ErrMalformedPath is a request path whose meaning would depend on how the
// upstream decodes it (an encoded "/" or "\", a backslash, a control byte,
// invalid percent-encoding, bytes that are not UTF-8, a ";" that Tomcat and
// Jetty strip with what follows and other servers keep), or that is not an
// absolute path at all.
// Such a request is denied with 400.
var ErrMalformedPath = errors.New("authz: malformed path")

// PathOptions say how request paths are read.
type PathOptions struct {
	// KeepEncodedSlashes makes %2F an ordinary character inside a segment
	// (EXTAUTHZ_ENCODED_SLASHES=keep), for APIs that put it in ids;
	// otherwise a path holding one is malformed. Even kept, the pieces
	// between %2Fs may not be empty, "." or "..", and rules are matched on
	// both readings of the path (Service.decide), so that an upstream that
	// does decode %2F acts on no path the rules did not judge.
	KeepEncodedSlashes bool
}

// CanonicalPath returns the path a route rule is matched against: the path
// as an upstream acts on it, whatever way the client spelt it. raw is the
// request target as sent (query included); the result is
//   - the part before the first '?';
//   - percent-decoded, except '%', '/', '?', '#', ';' and bytes outside
//     printable ASCII, which stay encoded with upper-case hex (so %61 and
//     a, %c3%a9 and a raw é, are the same path);
//   - dot segments resolved and repeated slashes merged, as Envoy's
//     normalize_path and merge_slashes do (the root is never left).
//
// A trailing slash is kept. The common case (an already canonical path)
// allocates nothing.
func CanonicalPath(raw string, o PathOptions) (string, error) {
	if i := strings.IndexByte(raw, '?'); i >= 0 {
		raw = raw[:i]
	}
	if raw == "" || raw[0] != '/' {
		return "", ErrMalformedPath
	}
	if isCanonical(raw) {
		return raw, nil
	}
	return canonicalSlow(raw, o)
}

// isCanonical reports whether p needs no work: printable ASCII without
// '%', '\\', '#' or ';', and no empty, "." or ".." segment.
func isCanonical(p string) bool {
	for i := 0; i < len(p); i++ {
		c := p[i]
		if c != '/' {
			if !plainPathByte[c] {
				return false
			}
			continue
		}
		// The segment after this slash: empty (a "//"), "." or "..".
		if i+1 < len(p) && (p[i+1] == '/' || p[i+1] == '.' && isDotSegment(p[i+1:])) {
			return false
		}
	}
	return true
}

// plainPathByte marks the bytes a canonical path holds as themselves.
var plainPathByte = func() (t [256]bool) {
	for c := '!'; c < 0x7f; c++ {
		t[c] = true
	}
	for _, c := range "%\\#;?" {
		t[c] = false
	}
	return t
}()

// isDotSegment reports whether rest starts with a "." or ".." segment.
func isDotSegment(rest string) bool {
	seg, _, _ := strings.Cut(rest, "/")
	return seg == "." || seg == ".."
}

func canonicalSlow(raw string, o PathOptions) (string, error) {
	// Decode into segments split at the raw slashes only: a decoded one is
	// data (kept as %2F) or an error.
	var segs []string
	var seg strings.Builder
	decoded := make([]byte, 0, len(raw))
	climbsKept := false
	trailing := false
	flush := func() {
		s := seg.String()
		seg.Reset()
		switch s {
		case ".", "..":
			if s == ".." && len(segs) > 0 {
				// With %2F kept, ".." after "a%2Fb" climbs one segment
				// here and two in an upstream that decodes it.
				climbsKept = climbsKept || strings.Contains(segs[len(segs)-1], "%2F")
				segs = segs[:len(segs)-1]
			}
			trailing = true
		case "":
			// Merged ("//"); a last one keeps the trailing slash.
			trailing = true
		default:
			segs = append(segs, s)
			trailing = false
		}
	}
	for i := 1; i < len(raw); i++ {
		c := raw[i]
		switch {
		case c == '/':
			flush()
			trailing = true
			continue
		case c == '%':
			if i+2 >= len(raw) || unhex(raw[i+1]) < 0 || unhex(raw[i+2]) < 0 {
				return "", ErrMalformedPath
			}
			c = byte(unhex(raw[i+1])<<4 | unhex(raw[i+2]))
			i += 2
			switch {
			case c == '/' && o.KeepEncodedSlashes:
				seg.WriteString("%2F")
				continue
			case c == '/' || c == '\\' || c < ' ' || c == 0x7f:
				return "", ErrMalformedPath
			}
		case c == '\\' || c == '#' || c == ';' || c <= ' ' || c == 0x7f:
			// Raw: a separator to some servers, a fragment, path
			// parameters that only some servers strip, or not a request
			// target at all.
			return "", ErrMalformedPath
		}
		writeCanonical(&seg, c)
		decoded = append(decoded, c)
	}
	flush()
	if !utf8.Valid(decoded) {
		// Overlong forms (%C0%AE is "." to some old decoders) and other
		// bytes whose meaning is the upstream's to choose.
		return "", ErrMalformedPath
	}
	if climbsKept {
		return "", ErrMalformedPath
	}
	for _, seg := range segs {
		if o.KeepEncodedSlashes && !slashSafe(seg) {
			return "", ErrMalformedPath
		}
	}
	if len(segs) == 0 {
		return "/", nil
	}
	n := len(segs)
	for _, s := range segs {
		n += len(s)
	}
	var b strings.Builder
	b.Grow(n + 1)
	for _, s := range segs {
		b.WriteByte('/')
		b.WriteString(s)
	}
	if trailing {
		b.WriteByte('/')
	}
	return b.String(), nil
}

// slashSafe reports whether a segment reads the same to an upstream that
// decodes %2F into a separator: no empty, "." or ".." piece between its
// %2Fs, so that decoding them adds segments but never climbs or merges.
func slashSafe(seg string) bool {
	if !strings.Contains(seg, "%2F") {
		return true
	}
	for _, piece := range strings.Split(seg, "%2F") {
		if piece == "" || piece == "." || piece == ".." {
			return false
		}
	}
	return true
}

// writeCanonical writes one decoded byte: as itself when it is printable
// ASCII with no meaning in a request target, else percent-encoded.
func writeCanonical(b *strings.Builder, c byte) {
	if c > ' ' && c < 0x7f && c != '%' && c != '?' && c != '#' && c != ';' {
		b.WriteByte(c)
		return
	}
	const hex = "0123456789ABCDEF"
	b.WriteByte('%')
	b.WriteByte(hex[c>>4])
	b.WriteByte(hex[c&15])
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// underPrefix reports whether a canonical path is prefix or below it,
// by whole segments: /public holds /public and /public/x, never
// /publications. "/" holds every path.
func underPrefix(path, prefix string) bool {
	if prefix == "/" {
		return true
	}
	if !strings.HasPrefix(path, prefix) {
		return false
	}
	return len(path) == len(prefix) || path[len(prefix)] == '/'
}

// canonicalHost is an authority as route rules compare it: lower case,
// without port, IPv6 brackets or trailing dots.
func canonicalHost(authority string) string {
	h := hostOnly(authority)
	h = strings.TrimRight(h, ".")
	for i := 0; i < len(h); i++ {
		if c := h[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(h)
		}
	}
	return h
}
