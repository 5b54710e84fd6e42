package tokens

import (
	"strconv"
	"strings"
	"unicode/utf8"
)

// Redacted replaces a credential-shaped run in a logged value.
const Redacted = "[redacted]"

// minRedactRun is how many base62 characters after pk_, sk_ or tk_ make a
// run credential-shaped: a generated part has at least 26 (random and
// checksum), while words such as task_list or disk_usage have fewer.
const minRedactRun = 16

// redactSlack is how far past the kept bytes a value is read to recognise
// a credential that starts within them: a prefix and minRedactRun
// characters, each percent-encoded several times over, fit easily.
const redactSlack = 1024

// maxDecodePasses bounds repeated percent-decoding (%2570 is %70 is p).
const maxDecodePasses = 8

// Redact returns s fit for a log line: every credential-shaped run in it
// replaced by Redacted, and the result cut to at most limit bytes, followed
// by a note of the original length when anything was cut.
//
// A value from a request may carry a credential anywhere (a key pasted
// into a path or a query, a request id, a host), spelt in any case and
// percent-encoded any number of times. Redact looks at the value decoded
// until nothing changes and, case-insensitively, replaces:
//   - pk_, sk_ or tk_ followed by at least 16 base62 characters: a
//     generated key or token (or half of a pair), up to the end of the
//     base62 run;
//   - sk_ right after ':': the secret of a pair, and everything after it;
//   - "bearer" or "basic" followed by white space: everything after it,
//     since an imported token has no recognisable shape.
//
// It fails safe: a run is replaced whole, in its raw form, however much of
// it the encoding spread out; what it cannot tell apart from a credential
// it replaces too. Values with none of '_', '%', ' ', '+' or a tab, within
// limit, are returned as they are, without allocating.
func Redact(s string, limit int) string {
	limit = max(limit, 0)
	if len(s) <= limit && !strings.ContainsAny(s, "_% +\t") {
		return s
	}
	w := s
	if len(w) > limit+redactSlack {
		w = w[:limit+redactSlack]
	}
	out := w
	if strings.ContainsAny(w, "_% +\t") {
		out = redactRuns(w)
	}
	if len(out) <= limit && len(w) == len(s) {
		return out
	}
	cut := min(limit, len(out))
	for cut > 0 && cut < len(out) && !utf8.RuneStart(out[cut]) {
		cut--
	}
	return out[:cut] + "...(cut from " + strconv.Itoa(len(s)) + " bytes)"
}

// unit is one character of a value after percent-decoding, and the raw
// bytes [start, end) it was decoded from.
type unit struct {
	c          byte
	start, end int32
}

// decodeUnits percent-decodes s until nothing changes (or
// maxDecodePasses), keeping where each character came from.
func decodeUnits(s string) []unit {
	us := make([]unit, len(s))
	for i := range len(s) {
		us[i] = unit{c: s[i], start: int32(i), end: int32(i + 1)}
	}
	for range maxDecodePasses {
		out, changed := us[:0], false
		for i := 0; i < len(us); i++ {
			if us[i].c == '%' && i+2 < len(us) && isHex(us[i+1].c) && isHex(us[i+2].c) {
				out = append(out, unit{c: unhex(us[i+1].c)<<4 | unhex(us[i+2].c), start: us[i].start, end: us[i+2].end})
				i += 2
				changed = true
				continue
			}
			out = append(out, us[i])
		}
		us = out
		if !changed {
			break
		}
	}
	return us
}

// redactRuns replaces the credential-shaped runs of s.
func redactRuns(s string) string {
	us := decodeUnits(s)
	// spans are the raw byte ranges to replace, in order, not overlapping.
	var spans [][2]int32
	add := func(from, to int) {
		start, end := us[from].start, us[to-1].end
		if n := len(spans); n > 0 && start <= spans[n-1][1] {
			spans[n-1][1] = max(spans[n-1][1], end)
			return
		}
		spans = append(spans, [2]int32{start, end})
	}
	for i := 0; i < len(us); i++ {
		switch {
		case i+3 <= len(us) && isKeyPrefix(us[i:i+3]):
			j := i + 3
			for j < len(us) && isBase62(us[j].c) {
				j++
			}
			if i > 0 && us[i-1].c == ':' && lower(us[i].c) == 's' {
				// The secret of a pair, however it goes on.
				add(i, len(us))
				i = len(us)
			} else if j-(i+3) >= minRedactRun {
				add(i, j)
				i = j - 1
			}
		case lower(us[i].c) == 'b':
			if j := afterScheme(us[i:]); j > 0 && i+j < len(us) {
				add(i+j, len(us))
				i = len(us)
			}
		}
	}
	if len(spans) == 0 {
		return s
	}
	var b strings.Builder
	prev := int32(0)
	for _, sp := range spans {
		b.WriteString(s[prev:sp[0]])
		b.WriteString(Redacted)
		prev = sp[1]
	}
	b.WriteString(s[prev:])
	return b.String()
}

// isKeyPrefix reports whether u reads pk_, sk_ or tk_, in any case.
func isKeyPrefix(u []unit) bool {
	switch lower(u[0].c) {
	case 'p', 's', 't':
		return lower(u[1].c) == 'k' && u[2].c == '_'
	}
	return false
}

// afterScheme returns how many units "bearer" or "basic" and the white
// space after it take at the start of u, or 0.
func afterScheme(u []unit) int {
	for _, scheme := range [...]string{"bearer", "basic"} {
		if len(u) <= len(scheme) {
			continue
		}
		n := 0
		for n < len(scheme) && lower(u[n].c) == scheme[n] {
			n++
		}
		if n < len(scheme) {
			continue
		}
		for n < len(u) && (u[n].c == ' ' || u[n].c == '\t' || u[n].c == '+') {
			n++
		}
		if n > len(scheme) {
			return n
		}
	}
	return 0
}

func lower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

func isHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

func unhex(c byte) byte {
	switch {
	case c >= 'a':
		return c - 'a' + 10
	case c >= 'A':
		return c - 'A' + 10
	}
	return c - '0'
}
