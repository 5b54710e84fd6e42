package main

import (
	"errors"
	"net/url"
	"strings"

	"github.com/extauthz/extauthz/internal/tokens/rediscache"
)

// masked replaces a secret in a URL shown to people.
const masked = "xxxxx"

// plainOptions are the query options of a Postgres or Redis URL whose
// values are never secret, so logs and errors may show them. Every other
// option's value is masked: a list of what to show fails safe, a list of
// what to hide (password, sslpassword, sentinel_password, ...) would not.
var plainOptions = map[string]bool{
	// pgx
	"sslmode": true, "sslrootcert": true, "sslcert": true, "connect_timeout": true, "application_name": true,
	"target_session_attrs": true, "host": true, "port": true, "dbname": true, "user": true, "search_path": true,
	"pool_max_conns": true, "pool_min_conns": true, "pool_max_conn_lifetime": true, "pool_max_conn_idle_time": true,
	"pool_health_check_period": true, "default_query_exec_mode": true, "statement_cache_capacity": true,
	// go-redis
	"addr": true, "db": true, "protocol": true, "master_name": true, "client_name": true, "username": true,
	"dial_timeout": true, "read_timeout": true, "write_timeout": true, "pool_size": true, "pool_timeout": true,
	"min_idle_conns": true, "max_idle_conns": true, "max_retries": true, "route_by_latency": true,
	"route_randomly": true, "read_only": true, "max_redirects": true,
}

// maskURL returns a connection URL fit for logs and error messages: the
// password, the value of every option not in plainOptions and the fragment
// are masked or dropped. It works on the text rather than on a parse: the
// URLs that most need masking are the ones that do not parse, such as a
// password with an unescaped '/', '#' or '?'. Everything up to the last '@'
// counts as user and password, so such a password is masked whole.
func maskURL(raw string) string {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return masked
	}
	var b strings.Builder
	b.WriteString(scheme + "://")
	if at := strings.LastIndexByte(rest, '@'); at >= 0 {
		user, _, hasPassword := strings.Cut(rest[:at], ":")
		switch {
		case !plainUser(user):
			b.WriteString(masked)
		case hasPassword:
			b.WriteString(user + ":" + masked)
		default:
			b.WriteString(user)
		}
		b.WriteByte('@')
		rest = rest[at+1:]
	}
	rest, _, _ = strings.Cut(rest, "#")
	rest, query, hasQuery := strings.Cut(rest, "?")
	b.WriteString(rest)
	if !hasQuery {
		return b.String()
	}
	b.WriteByte('?')
	for i, kv := range strings.Split(query, "&") {
		if i > 0 {
			b.WriteByte('&')
		}
		k, _, hasValue := strings.Cut(kv, "=")
		switch {
		case plainOptions[strings.ToLower(k)]:
			b.WriteString(kv)
		case hasValue:
			b.WriteString(k + "=" + masked) // the client names an unknown option
		default:
			b.WriteString(masked) // not an option: maybe a misplaced secret
		}
	}
	return b.String()
}

// plainUser reports whether a URL's user name is an ordinary one, shown in
// logs: anything else may be a misplaced password.
func plainUser(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~%", c) >= 0) {
			return false
		}
	}
	return true
}

// percentEncode is the advice for a URL whose secret parts do not parse.
const percentEncode = "percent-encode reserved characters in the user, password and option values (/ as %2F, # as %23, ? as %3F, @ as %40, % as %25)"

// checkPostgresURL reports a DSN that does not parse, or in which an '@'
// is not where the user and password end: a password with an unescaped
// '/', '?' or '#' may parse as host, port and path, and would then be sent
// to the wrong host. The error never quotes the URL.
func checkPostgresURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || strings.Contains(u.Path, "@") || strings.Contains(u.RawQuery, "@") || u.Fragment != "" {
		return errors.New("not a valid postgres URL: " + percentEncode)
	}
	return nil
}

// checkRedisURL parses a Redis URL as the client will, without connecting.
// Parse errors quote the URL (net/url) or parts of it (go-redis), so the
// masked URL is parsed first and only its problems are described; a
// problem the real URL alone has lies in what the mask hides.
func checkRedisURL(raw, mode string) error {
	rdb, err := rediscache.NewClient(maskURL(raw), mode)
	if err != nil {
		return err
	}
	rdb.Close()
	if rdb, err = rediscache.NewClient(raw, mode); err != nil {
		return errors.New("cannot parse the redis URL: " + percentEncode)
	}
	rdb.Close()
	return nil
}
