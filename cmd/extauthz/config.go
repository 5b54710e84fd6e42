package main

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/extauthz/extauthz/internal/authz"
	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/rediscache"
)

// Config is every setting, read from EXTAUTHZ_* variables. Defaults are
// in defaultConfig and nowhere else.
type Config struct {
	Store   string // postgres://..., postgresql://..., file:<path>; "" = file in DataDir
	DataDir string // embedded default: keys file and generated pepper
	Peppers []tokens.Pepper

	RedisURL    string // optional shared tier and invalidation bus
	RedisMode   string // single, sentinel or cluster
	RedisPrefix string

	// Each address is host:port or unix:<path> (listen.go).
	GRPCAddr   string
	HTTPAddr   string
	AdminAddr  string
	HTTPPrefix string
	// HealthAddr, when set, serves gRPC health alone, in plaintext, for
	// probes that cannot speak (m)TLS (Kubernetes); "" = off.
	HealthAddr string

	// TLS on the gRPC and HTTP listeners (tls.go): a certificate and key,
	// and with a client CA, mTLS. All empty = plaintext.
	TLSCertFile     string
	TLSKeyFile      string
	TLSClientCAFile string

	CredentialSources []string
	StripCredential   bool
	Realm             string
	RoutesFile        string
	// Forwarded is the header family forward-auth proxies name the
	// original request in; the other is never read.
	Forwarded authz.ForwardedHeaders
	// KeepEncodedSlashes treats %2F in a path as data instead of a
	// malformed path.
	KeepEncodedSlashes bool
	// MaxRequestBytes bounds one gRPC message; MaxHeaders the header lines
	// of one check.
	MaxRequestBytes int
	MaxHeaders      int
	// StoreConcurrency bounds store lookups in flight; 0: the Postgres
	// pool's size times the store timeout in ms (unbounded for the file
	// store).
	StoreConcurrency int

	CacheSize       int
	CacheTTL        time.Duration
	NegativeTTL     time.Duration
	MaxStale        time.Duration
	StoreTimeout    time.Duration
	ShutdownDelay   time.Duration
	ShutdownTimeout time.Duration
	UsageInterval   time.Duration
	UsageMaxPending int

	LogLevel zapcore.Level
	Pprof    bool // /debug/pprof/ on the admin address
	// GRPCReflection serves gRPC server reflection (grpcurl) on the gRPC
	// address; off by default.
	GRPCReflection bool
	// GRPCCodec is "lean" (the default) or "proto", the stock decoder.
	GRPCCodec string
	// GCHeadroomMB is the allocation kept between garbage collections
	// (gc.go); 0 leaves GOGC alone.
	GCHeadroomMB int
}

func defaultConfig() Config {
	return Config{
		DataDir:           ".extauthz",
		RedisMode:         rediscache.ModeSingle,
		RedisPrefix:       "extauthz:",
		GRPCAddr:          ":9001",
		HTTPAddr:          ":8080",
		AdminAddr:         ":9090",
		HTTPPrefix:        "/check",
		MaxRequestBytes:   256 << 10,
		MaxHeaders:        authz.DefaultMaxHeaders,
		CredentialSources: tokens.DefaultSources,
		StripCredential:   true,
		GRPCCodec:         "lean",
		GCHeadroomMB:      256,
		Realm:             "extauthz",
		CacheSize:         100000,
		CacheTTL:          5 * time.Minute,
		NegativeTTL:       30 * time.Second,
		MaxStale:          10 * time.Minute,
		StoreTimeout:      100 * time.Millisecond,
		ShutdownDelay:     0,
		ShutdownTimeout:   20 * time.Second,
		UsageInterval:     time.Minute,
		UsageMaxPending:   100000,
		LogLevel:          zapcore.InfoLevel,
	}
}

// Embedded reports whether neither a store nor peppers were configured:
// the laptop default, with a generated pepper in DataDir.
func (c *Config) Embedded() bool { return c.Store == "" && len(c.Peppers) == 0 }

// pathOptions is how request paths are read.
func (c *Config) pathOptions() authz.PathOptions {
	return authz.PathOptions{KeepEncodedSlashes: c.KeepEncodedSlashes}
}

// TLS reports whether the check listeners serve TLS.
func (c *Config) TLS() bool { return c.TLSCertFile != "" }

// StoreKind is "postgres" or "file".
func (c *Config) StoreKind() string {
	if strings.HasPrefix(c.Store, "postgres://") || strings.HasPrefix(c.Store, "postgresql://") {
		return "postgres"
	}
	return "file"
}

// FilePath is the key file of a file store.
func (c *Config) FilePath() string {
	if p, ok := strings.CutPrefix(c.Store, "file:"); ok {
		return p
	}
	return filepath.Join(c.DataDir, "keys.json")
}

// StoreDescription names the store for logs, without credentials.
func (c *Config) StoreDescription() string {
	if c.StoreKind() == "file" {
		return "file:" + c.FilePath()
	}
	return maskURL(c.Store)
}

// RedisDescription names the Redis URL for logs, without credentials.
func (c *Config) RedisDescription() string {
	if c.RedisURL == "" {
		return "none"
	}
	return maskURL(c.RedisURL) + " (" + c.RedisMode + ")"
}

// String never prints a pepper or a DSN password.
func (c Config) String() string {
	ids := make([]string, len(c.Peppers))
	for i, p := range c.Peppers {
		ids[i] = p.ID
	}
	return fmt.Sprintf("Config{store=%s redis=%s peppers=%v grpc=%s http=%s admin=%s tls=%v}",
		c.StoreDescription(), c.RedisDescription(), ids, c.GRPCAddr, c.HTTPAddr, c.AdminAddr, c.TLS())
}

// GoString keeps %#v from dumping the peppers.
func (c Config) GoString() string { return c.String() }

// loadConfig reads the environment through lookup and reports every
// problem at once, each naming its setting.
func loadConfig(lookup func(string) (string, bool)) (Config, error) {
	return loadConfigWith(lookup, true)
}

// loadConfigWith is loadConfig for a command that may not need peppers
// (migrate touches no key).
func loadConfigWith(lookup func(string) (string, bool), peppersRequired bool) (Config, error) {
	c := defaultConfig()
	var errs []error
	get := func(name string) (string, bool) {
		v, ok := lookup("EXTAUTHZ_" + name)
		return strings.TrimSpace(v), ok && strings.TrimSpace(v) != ""
	}
	bad := func(name, format string, a ...any) {
		errs = append(errs, fmt.Errorf("EXTAUTHZ_%s: %s", name, fmt.Sprintf(format, a...)))
	}
	str := func(name string, dst *string) {
		if v, ok := get(name); ok {
			*dst = v
		}
	}
	// dur reads a duration of at least min; it reports false when the
	// value was set and invalid, so that checks across settings skip it.
	dur := func(name string, dst *time.Duration, min time.Duration) bool {
		v, ok := get(name)
		if !ok {
			return true
		}
		d, err := time.ParseDuration(v)
		switch {
		case err != nil:
			bad(name, "%q is not a duration (e.g. 30s, 5m, 1h)", v)
		case d < min:
			bad(name, "%s is below the minimum %s", d, min)
		default:
			*dst = d
			return true
		}
		return false
	}
	boolean := func(name string, dst *bool) {
		v, ok := get(name)
		if !ok {
			return
		}
		if b, err := strconv.ParseBool(v); err != nil {
			bad(name, "%q is not true or false", v)
		} else {
			*dst = b
		}
	}
	// count reads a whole number of at least min; want names it in errors.
	count := func(name string, dst *int, min int, want string) {
		v, ok := get(name)
		if !ok {
			return
		}
		if n, err := strconv.Atoi(v); err != nil || n < min {
			bad(name, "%q is not %s", v, want)
		} else {
			*dst = n
		}
	}
	addr := func(name string, dst *string) {
		v, ok := get(name)
		if !ok {
			return
		}
		if path, ok := strings.CutPrefix(v, "unix:"); ok {
			if !filepath.IsAbs(path) || strings.HasSuffix(path, "/") {
				bad(name, "%q: a Unix socket needs an absolute file path (unix:/run/extauthz/grpc.sock)", v)
				return
			}
		} else if _, port, err := net.SplitHostPort(v); err != nil || port == "" {
			bad(name, "%q is not host:port (e.g. :9001) or unix:/path.sock", v)
			return
		}
		*dst = v
	}

	str("STORE", &c.Store)
	if c.Store != "" {
		switch {
		case c.StoreKind() == "postgres":
			if err := checkPostgresURL(c.Store); err != nil {
				bad("STORE", "%v", err)
			}
		case strings.HasPrefix(c.Store, "file:") && len(c.Store) > len("file:"):
		default:
			bad("STORE", "want postgres://... or file:<path>")
		}
	}
	str("DATA_DIR", &c.DataDir)
	if v, ok := get("HMAC_SECRETS"); ok {
		ps, err := tokens.ParsePeppers(v)
		if err != nil {
			bad("HMAC_SECRETS", "%v", err)
		}
		c.Peppers = ps
	} else if c.Store != "" && peppersRequired {
		bad("HMAC_SECRETS", "required when EXTAUTHZ_STORE is set (id:secret[,id:secret...], secrets of 32+ bytes)")
	}

	str("REDIS_PREFIX", &c.RedisPrefix)
	if v, ok := get("REDIS_MODE"); ok {
		switch v {
		case rediscache.ModeSingle, rediscache.ModeSentinel, rediscache.ModeCluster:
			c.RedisMode = v
		default:
			bad("REDIS_MODE", "%q: want single, sentinel or cluster", v)
		}
	}
	if v, ok := get("REDIS_URL"); ok {
		// Parsed now (no connection is made) so a bad URL fails at start.
		if err := checkRedisURL(v, c.RedisMode); err != nil {
			bad("REDIS_URL", "%v", err)
		}
		c.RedisURL = v
	}

	addr("GRPC_ADDR", &c.GRPCAddr)
	addr("HTTP_ADDR", &c.HTTPAddr)
	addr("ADMIN_ADDR", &c.AdminAddr)
	addr("HEALTH_ADDR", &c.HealthAddr)
	// Two listeners on one address fail at start anyway; a Unix socket
	// would be silently replaced by the second, so say so now.
	seen := map[string]string{}
	for _, a := range []struct{ name, v string }{{"GRPC_ADDR", c.GRPCAddr}, {"HTTP_ADDR", c.HTTPAddr}, {"ADMIN_ADDR", c.AdminAddr}, {"HEALTH_ADDR", c.HealthAddr}} {
		if strings.HasPrefix(a.v, "unix:") {
			if other, dup := seen[a.v]; dup {
				bad(a.name, "%q is also EXTAUTHZ_%s", a.v, other)
			}
			seen[a.v] = a.name
		}
	}
	str("TLS_CERT_FILE", &c.TLSCertFile)
	str("TLS_KEY_FILE", &c.TLSKeyFile)
	str("TLS_CLIENT_CA_FILE", &c.TLSClientCAFile)
	switch {
	case c.TLSCertFile != "" && c.TLSKeyFile == "":
		bad("TLS_KEY_FILE", "required when EXTAUTHZ_TLS_CERT_FILE is set")
	case c.TLSKeyFile != "" && c.TLSCertFile == "":
		bad("TLS_CERT_FILE", "required when EXTAUTHZ_TLS_KEY_FILE is set")
	}
	if c.TLSClientCAFile != "" && (c.TLSCertFile == "" || c.TLSKeyFile == "") {
		bad("TLS_CLIENT_CA_FILE", "client certificates (mTLS) need TLS: set EXTAUTHZ_TLS_CERT_FILE and EXTAUTHZ_TLS_KEY_FILE too")
	}
	if v, ok := get("HTTP_PREFIX"); ok {
		if p, err := httpPrefix(v); err != nil {
			bad("HTTP_PREFIX", "%v", err)
		} else {
			c.HTTPPrefix = p
		}
	}
	count("MAX_REQUEST_BYTES", &c.MaxRequestBytes, 16<<10, "a number of bytes, at least 16384")
	count("MAX_HEADERS", &c.MaxHeaders, 16, "a number of header lines, at least 16")
	count("STORE_CONCURRENCY", &c.StoreConcurrency, 0, "a number of lookups (0: the pool's size)")
	if v, ok := get("FORWARDED_HEADERS"); ok {
		if f, err := authz.ParseForwardedHeaders(v); err != nil {
			bad("FORWARDED_HEADERS", "%v", err)
		} else {
			c.Forwarded = f
		}
	}
	if v, ok := get("ENCODED_SLASHES"); ok {
		switch v {
		case "reject":
			c.KeepEncodedSlashes = false
		case "keep":
			c.KeepEncodedSlashes = true
		default:
			bad("ENCODED_SLASHES", "%q: want reject or keep", v)
		}
	}

	if v, ok := get("CREDENTIAL_SOURCES"); ok {
		srcs := tokens.SplitList(strings.ToLower(v))
		seen := map[string]bool{}
		for _, s := range srcs {
			if !validHeaderName(s) || strings.HasPrefix(s, ":") {
				bad("CREDENTIAL_SOURCES", "%q is not a header name", s)
			}
			if seen[s] {
				bad("CREDENTIAL_SOURCES", "%q listed twice", s)
			}
			seen[s] = true
		}
		if len(srcs) == 0 {
			bad("CREDENTIAL_SOURCES", "no header named")
		}
		c.CredentialSources = srcs
	}
	boolean("PPROF", &c.Pprof)
	boolean("GRPC_REFLECTION", &c.GRPCReflection)
	count("GC_HEADROOM_MB", &c.GCHeadroomMB, 0, "a number of megabytes (0: off)")
	if v, ok := get("GRPC_CODEC"); ok {
		switch v {
		case "lean", "proto":
			c.GRPCCodec = v
		default:
			bad("GRPC_CODEC", "%q is not lean or proto", v)
		}
	}
	boolean("STRIP_CREDENTIAL", &c.StripCredential)
	if v, ok := get("REALM"); ok {
		if strings.ContainsAny(v, "\"\\") || !printable(v) {
			bad("REALM", "must be printable ASCII without quotes or backslashes")
		}
		c.Realm = v
	}
	str("ROUTES", &c.RoutesFile)

	count("CACHE_SIZE", &c.CacheSize, 1, "a positive number of entries")
	ttlOK := dur("CACHE_TTL", &c.CacheTTL, time.Second)
	// Sub-second negative caching is sensible (a new key is found sooner);
	// below 100ms it would no longer shield the store from a flood.
	negOK := dur("NEGATIVE_TTL", &c.NegativeTTL, 100*time.Millisecond)
	dur("MAX_STALE", &c.MaxStale, 0)
	dur("STORE_TIMEOUT", &c.StoreTimeout, time.Millisecond)
	dur("SHUTDOWN_DELAY", &c.ShutdownDelay, 0)
	dur("SHUTDOWN_TIMEOUT", &c.ShutdownTimeout, time.Second)
	dur("USAGE_INTERVAL", &c.UsageInterval, 100*time.Millisecond)
	count("USAGE_MAX_PENDING", &c.UsageMaxPending, 1, "a positive number of keys")
	// Only between two valid values: a problem is reported once. Unset, the
	// negative TTL follows a shorter TTL down rather than refuse it.
	if _, set := get("NEGATIVE_TTL"); !set {
		c.NegativeTTL = min(c.NegativeTTL, c.CacheTTL)
	} else if ttlOK && negOK && c.NegativeTTL > c.CacheTTL {
		bad("NEGATIVE_TTL", "%s is longer than EXTAUTHZ_CACHE_TTL %s", c.NegativeTTL, c.CacheTTL)
	}
	if v, ok := get("LOG_LEVEL"); ok {
		if err := c.LogLevel.UnmarshalText([]byte(v)); err != nil {
			bad("LOG_LEVEL", "%q: want debug, info, warn or error", v)
		}
	}
	if len(errs) > 0 {
		return Config{}, errors.Join(errs...)
	}
	return c, nil
}

// httpPrefix validates EXTAUTHZ_HTTP_PREFIX: an absolute path of plain
// segments that does not hold /healthz or /readyz, which would then answer
// client paths with 200, an allow.
func httpPrefix(v string) (string, error) {
	p := strings.TrimRight(v, "/")
	switch {
	case !strings.HasPrefix(v, "/"):
		return "", fmt.Errorf("%q must be a path starting with /", v)
	case p == "":
		return "", fmt.Errorf("%q would put /healthz and /readyz under the check prefix; use a path such as /check", v)
	}
	for _, seg := range strings.Split(p[1:], "/") {
		if seg == "" || seg == "." || seg == ".." {
			return "", fmt.Errorf("%q has an empty, . or .. segment", v)
		}
		for i := 0; i < len(seg); i++ {
			if c := seg[i]; !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '~') {
				return "", fmt.Errorf("%q: segments are letters, digits and -._~ only", v)
			}
		}
	}
	if p == "/healthz" || p == "/readyz" {
		return "", fmt.Errorf("%q is a health path", v)
	}
	return p, nil
}

// known lists every setting, so that a misspelt one is reported.
var known = map[string]bool{
	"STORE": true, "DATA_DIR": true, "HMAC_SECRETS": true, "GRPC_ADDR": true, "HTTP_ADDR": true,
	"ADMIN_ADDR": true, "HTTP_PREFIX": true, "CREDENTIAL_SOURCES": true, "STRIP_CREDENTIAL": true,
	"REALM": true, "ROUTES": true, "CACHE_SIZE": true, "CACHE_TTL": true, "NEGATIVE_TTL": true,
	"MAX_STALE": true, "STORE_TIMEOUT": true, "SHUTDOWN_DELAY": true, "SHUTDOWN_TIMEOUT": true,
	"LOG_LEVEL": true, "REDIS_URL": true, "REDIS_MODE": true, "REDIS_PREFIX": true,
	"USAGE_INTERVAL": true, "USAGE_MAX_PENDING": true, "PPROF": true, "GRPC_CODEC": true, "GC_HEADROOM_MB": true,
	"FORWARDED_HEADERS": true, "ENCODED_SLASHES": true, "MAX_REQUEST_BYTES": true, "MAX_HEADERS": true,
	"GRPC_REFLECTION": true,
	"HEALTH_ADDR":     true,
	"TLS_CERT_FILE":   true, "TLS_KEY_FILE": true, "TLS_CLIENT_CA_FILE": true,
}

// unknownSettings returns EXTAUTHZ_* names in environ that are not settings.
func unknownSettings(environ []string) []string {
	var out []string
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if rest, ok := strings.CutPrefix(name, "EXTAUTHZ_"); ok && !known[rest] && !strings.HasPrefix(rest, "TEST_") {
			out = append(out, name)
		}
	}
	return out
}

func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// oneLine renders a joined error on one line, for stderr.
func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", "; ")
}
