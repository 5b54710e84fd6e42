package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"go.uber.org/zap/zapcore"

	"github.com/extauthz/extauthz/internal/authz"
	"github.com/extauthz/extauthz/internal/tokens"
)

func lookupMap(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

var pepper32 = strings.Repeat("s", 32)

func TestConfigDefaults(t *testing.T) {
	t.Parallel()
	c, err := loadConfig(lookupMap(nil))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(defaultConfig(), c); d != "" {
		t.Fatalf("(-want +got):\n%s", d)
	}
	if !c.Embedded() || c.StoreKind() != "file" || c.FilePath() != ".extauthz/keys.json" {
		t.Fatalf("embedded default: %v %s %s", c.Embedded(), c.StoreKind(), c.FilePath())
	}
}

func TestConfigAllSettings(t *testing.T) {
	t.Parallel()
	c, err := loadConfig(lookupMap(map[string]string{
		"EXTAUTHZ_STORE":              "postgres://u:pw@db:5432/keys",
		"EXTAUTHZ_HMAC_SECRETS":       "k2:" + pepper32 + ",k1:" + pepper32,
		"EXTAUTHZ_GRPC_ADDR":          "127.0.0.1:7000",
		"EXTAUTHZ_HTTP_ADDR":          ":7001",
		"EXTAUTHZ_ADMIN_ADDR":         ":7002",
		"EXTAUTHZ_HTTP_PREFIX":        "/authz/",
		"EXTAUTHZ_CREDENTIAL_SOURCES": "X-API-Key",
		"EXTAUTHZ_STRIP_CREDENTIAL":   "false",
		"EXTAUTHZ_REALM":              "shop",
		"EXTAUTHZ_ROUTES":             "/etc/routes.json",
		"EXTAUTHZ_CACHE_SIZE":         "500",
		"EXTAUTHZ_CACHE_TTL":          "1m",
		"EXTAUTHZ_NEGATIVE_TTL":       "5s",
		"EXTAUTHZ_MAX_STALE":          "0",
		"EXTAUTHZ_STORE_TIMEOUT":      "50ms",
		"EXTAUTHZ_SHUTDOWN_DELAY":     "3s",
		"EXTAUTHZ_SHUTDOWN_TIMEOUT":   "10s",
		"EXTAUTHZ_LOG_LEVEL":          "debug",
		"EXTAUTHZ_REDIS_URL":          "redis://n1:6379?addr=n2:6379",
		"EXTAUTHZ_REDIS_MODE":         "cluster",
		"EXTAUTHZ_REDIS_PREFIX":       "shop:",
		"EXTAUTHZ_USAGE_INTERVAL":     "30s",
		"EXTAUTHZ_USAGE_MAX_PENDING":  "10",
		"EXTAUTHZ_PPROF":              "true",
		"EXTAUTHZ_GRPC_CODEC":         "proto",
		"EXTAUTHZ_GC_HEADROOM_MB":     "0",
		"EXTAUTHZ_MAX_REQUEST_BYTES":  "65536",
		"EXTAUTHZ_MAX_HEADERS":        "120",
	}))
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Store: "postgres://u:pw@db:5432/keys", DataDir: ".extauthz",
		Peppers:  []tokens.Pepper{{ID: "k2", Secret: []byte(pepper32)}, {ID: "k1", Secret: []byte(pepper32)}},
		RedisURL: "redis://n1:6379?addr=n2:6379", RedisMode: "cluster", RedisPrefix: "shop:",
		GRPCAddr: "127.0.0.1:7000", HTTPAddr: ":7001", AdminAddr: ":7002", HTTPPrefix: "/authz",
		CredentialSources: []string{"x-api-key"}, StripCredential: false, Realm: "shop", RoutesFile: "/etc/routes.json",
		CacheSize: 500, CacheTTL: time.Minute, NegativeTTL: 5 * time.Second, MaxStale: 0,
		StoreTimeout: 50 * time.Millisecond, ShutdownDelay: 3 * time.Second, ShutdownTimeout: 10 * time.Second,
		LogLevel: zapcore.DebugLevel, UsageInterval: 30 * time.Second, UsageMaxPending: 10, Pprof: true,
		GRPCCodec: "proto", GCHeadroomMB: 0, MaxRequestBytes: 65536, MaxHeaders: 120,
	}
	if d := cmp.Diff(want, c); d != "" {
		t.Fatalf("(-want +got):\n%s", d)
	}
	if c.Embedded() || c.StoreKind() != "postgres" {
		t.Fatal("postgres store not recognised")
	}
}

func TestConfigInvalid(t *testing.T) {
	t.Parallel()
	cases := map[string]string{
		"EXTAUTHZ_STORE":              "mysql://x",
		"EXTAUTHZ_HMAC_SECRETS":       "k1:short",
		"EXTAUTHZ_GRPC_ADDR":          "9001",
		"EXTAUTHZ_HTTP_ADDR":          "localhost",
		"EXTAUTHZ_ADMIN_ADDR":         "::::",
		"EXTAUTHZ_HTTP_PREFIX":        "check",
		"EXTAUTHZ_CREDENTIAL_SOURCES": "x-api-key,bad header",
		"EXTAUTHZ_STRIP_CREDENTIAL":   "maybe",
		"EXTAUTHZ_REALM":              `a"b`,
		"EXTAUTHZ_CACHE_SIZE":         "-1",
		"EXTAUTHZ_CACHE_TTL":          "five minutes",
		"EXTAUTHZ_NEGATIVE_TTL":       "99ms",
		"EXTAUTHZ_MAX_STALE":          "-1s",
		"EXTAUTHZ_STORE_TIMEOUT":      "0s",
		"EXTAUTHZ_SHUTDOWN_DELAY":     "soon",
		"EXTAUTHZ_SHUTDOWN_TIMEOUT":   "1ms",
		"EXTAUTHZ_LOG_LEVEL":          "loud",
		"EXTAUTHZ_REDIS_MODE":         "ring",
		"EXTAUTHZ_USAGE_INTERVAL":     "1ms",
		"EXTAUTHZ_USAGE_MAX_PENDING":  "none",
		"EXTAUTHZ_PPROF":              "sometimes",
		"EXTAUTHZ_GRPC_CODEC":         "fast",
		"EXTAUTHZ_GC_HEADROOM_MB":     "-1",
		"EXTAUTHZ_MAX_REQUEST_BYTES":  "1k",
		"EXTAUTHZ_MAX_HEADERS":        "3",
		"EXTAUTHZ_REDIS_URL":          "redis://localhost:6379?nonsense=1",
		"EXTAUTHZ_HEALTH_ADDR":        "unix:run/health.sock",
		"EXTAUTHZ_TLS_CLIENT_CA_FILE": "/etc/extauthz/ca.crt", // without a certificate and key
	}
	// Each alone fails, naming its setting.
	for name, value := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			_, err := loadConfig(lookupMap(map[string]string{name: value}))
			if err == nil || !strings.Contains(err.Error(), name+":") {
				t.Fatalf("err = %v, want one naming %s", err, name)
			}
		})
	}
	// All at once: every problem is reported.
	_, err := loadConfig(lookupMap(cases))
	for name := range cases {
		if !strings.Contains(err.Error(), name+":") {
			t.Errorf("combined error misses %s", name)
		}
	}
	if strings.Contains(oneLine(err), "\n") {
		t.Error("oneLine left a newline")
	}
	// A store without peppers is refused: a generated one would differ per replica.
	_, err = loadConfig(lookupMap(map[string]string{"EXTAUTHZ_STORE": "file:/tmp/k.json"}))
	if err == nil || !strings.Contains(err.Error(), "EXTAUTHZ_HMAC_SECRETS") {
		t.Errorf("store without peppers: %v", err)
	}
}

func TestConfigNeverPrintsSecrets(t *testing.T) {
	t.Parallel()
	secret := "pepper-" + strings.Repeat("x", 30)
	c, err := loadConfig(lookupMap(map[string]string{
		"EXTAUTHZ_STORE":        "postgres://user:dbpassword@db/keys",
		"EXTAUTHZ_HMAC_SECRETS": "k1:" + secret,
		"EXTAUTHZ_REDIS_URL":    "redis://default:redispassword@cache:6379/0",
	}))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{c.String(), fmt.Sprintf("%v %+v %#v %s", c, c, c, c), c.StoreDescription(), c.RedisDescription()} {
		if strings.Contains(s, secret) || strings.Contains(s, "dbpassword") || strings.Contains(s, "redispassword") {
			t.Errorf("secret printed: %s", s)
		}
	}
	_, err = loadConfig(lookupMap(map[string]string{"EXTAUTHZ_HMAC_SECRETS": "k1:" + secret[:20]}))
	if err == nil || strings.Contains(err.Error(), secret[:20]) {
		t.Errorf("error echoes the pepper: %v", err)
	}
}

// Secrets in connection URLs, wherever the URL puts them, never reach a
// description (logged at start) or a configuration error.
func TestConfigURLSecretsMasked(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		env     map[string]string
		secrets []string
		wantErr string // "" = valid
	}{
		{"postgres query password", map[string]string{"EXTAUTHZ_STORE": "postgres://u@db:5432/keys?sslmode=disable&password=s3cr3tPW"}, []string{"s3cr3tPW"}, ""},
		{"postgres sslpassword and userinfo", map[string]string{"EXTAUTHZ_STORE": "postgres://u:Userinfo9@db/keys?sslpassword=SslPass9"}, []string{"Userinfo9", "SslPass9"}, ""},
		{"postgres password with slash", map[string]string{"EXTAUTHZ_STORE": "postgres://u:12345/Slashed9@db/keys"}, []string{"Slashed9"}, "EXTAUTHZ_STORE"},
		{"sentinel query password", map[string]string{"EXTAUTHZ_REDIS_MODE": "sentinel", "EXTAUTHZ_REDIS_URL": "redis://:Auth9pw@s1:26379/0?master_name=m&addr=s2:26379&password=Sentinel9"}, []string{"Auth9pw", "Sentinel9"}, ""},
		{"redis password with slash", map[string]string{"EXTAUTHZ_REDIS_URL": "redis://:Alpha1/Bravo2@cache:6379/0"}, []string{"Alpha1", "Bravo2"}, "EXTAUTHZ_REDIS_URL"},
		{"redis password with hash", map[string]string{"EXTAUTHZ_REDIS_URL": "redis://:Alpha1#Bravo2@cache:6379/0"}, []string{"Alpha1", "Bravo2"}, "EXTAUTHZ_REDIS_URL"},
		{"redis password with slash and hash", map[string]string{"EXTAUTHZ_REDIS_URL": "redis://user:Alpha1/Bravo2#Charlie3@cache:6379"}, []string{"Alpha1", "Bravo2", "Charlie3"}, "EXTAUTHZ_REDIS_URL"},
		{"redis password with question mark", map[string]string{"EXTAUTHZ_REDIS_URL": "redis://:Alpha1?Bravo2@cache:6379"}, []string{"Alpha1", "Bravo2"}, "EXTAUTHZ_REDIS_URL"},
		{"redis bad db beside a password", map[string]string{"EXTAUTHZ_REDIS_URL": "redis://:Alpha1@cache:6379/nine"}, []string{"Alpha1"}, "nine"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := map[string]string{"EXTAUTHZ_HMAC_SECRETS": "k1:" + pepper32}
			for k, v := range tc.env {
				env[k] = v
			}
			c, err := loadConfig(lookupMap(env))
			var shown string
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("err = %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("err = %v, want one naming %s", err, tc.wantErr)
			case err != nil:
				shown = err.Error()
			default:
				shown = c.String() + " " + c.StoreDescription() + " " + c.RedisDescription()
			}
			for _, s := range tc.secrets {
				if strings.Contains(shown, s) {
					t.Errorf("%q shown: %s", s, shown)
				}
			}
			t.Log(shown)
		})
	}
}

// EXTAUTHZ_NEGATIVE_TTL=500ms with EXTAUTHZ_CACHE_TTL=1s was refused, and
// reported twice.
func TestConfigNegativeTTL(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, ttl, neg string
		want           time.Duration // 0: an error
		wantErrs       int
	}{
		{"sub-second", "1s", "500ms", 500 * time.Millisecond, 0},
		{"minimum", "1s", "100ms", 100 * time.Millisecond, 0},
		{"below the minimum, once", "1s", "50ms", 0, 1},
		{"longer than the TTL", "1s", "2s", 0, 1},
		{"unset follows a short TTL", "10s", "", 10 * time.Second, 0},
		{"unset with the default TTL", "", "", 30 * time.Second, 0},
		{"invalid TTL is not also a comparison", "soon", "1s", 0, 1},
		{"both invalid", "soon", "later", 0, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := map[string]string{}
			if tc.ttl != "" {
				env["EXTAUTHZ_CACHE_TTL"] = tc.ttl
			}
			if tc.neg != "" {
				env["EXTAUTHZ_NEGATIVE_TTL"] = tc.neg
			}
			c, err := loadConfig(lookupMap(env))
			if tc.wantErrs == 0 {
				if err != nil || c.NegativeTTL != tc.want {
					t.Fatalf("negative TTL %v, err %v; want %v", c.NegativeTTL, err, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			if n := len(strings.Split(err.Error(), "\n")); n != tc.wantErrs {
				t.Fatalf("%d problems reported, want %d: %v", n, tc.wantErrs, err)
			}
		})
	}
}

func TestUnknownSettings(t *testing.T) {
	t.Parallel()
	got := unknownSettings([]string{"EXTAUTHZ_STORE=x", "EXTAUTHZ_CACHE_TTLL=1m", "PATH=/bin", "EXTAUTHZ_TEST_POSTGRES=x"})
	if d := cmp.Diff([]string{"EXTAUTHZ_CACHE_TTLL"}, got, cmpopts.EquateEmpty()); d != "" {
		t.Fatal(d)
	}
}

// A check prefix that holds a health path would answer client paths with
// /healthz's 200, an allow; the path settings name what they accept.
func TestConfigPathSettings(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"/", "//", "/healthz", "/readyz/", "/a//b", "/a/../b", "/a/./b", "/a%2Fb", "/a b", "check", "/a?b"} {
		if _, err := loadConfig(lookupMap(map[string]string{"EXTAUTHZ_HTTP_PREFIX": v})); err == nil || !strings.Contains(err.Error(), "EXTAUTHZ_HTTP_PREFIX:") {
			t.Errorf("EXTAUTHZ_HTTP_PREFIX=%q: %v, want refused", v, err)
		}
	}
	for v, want := range map[string]string{"/check": "/check", "/check/": "/check", "/ext-authz/v1": "/ext-authz/v1", "/healthz-check": "/healthz-check"} {
		c, err := loadConfig(lookupMap(map[string]string{"EXTAUTHZ_HTTP_PREFIX": v}))
		if err != nil || c.HTTPPrefix != want {
			t.Errorf("EXTAUTHZ_HTTP_PREFIX=%q: %q, %v; want %q", v, c.HTTPPrefix, err, want)
		}
	}
	c, err := loadConfig(lookupMap(map[string]string{"EXTAUTHZ_FORWARDED_HEADERS": "X-Original", "EXTAUTHZ_ENCODED_SLASHES": "keep"}))
	if err != nil || c.Forwarded != authz.ForwardedXOriginal || !c.KeepEncodedSlashes {
		t.Errorf("x-original + keep: %+v %v", c, err)
	}
	if c := defaultConfig(); c.Forwarded != authz.ForwardedXForwarded || c.KeepEncodedSlashes {
		t.Error("defaults: want x-forwarded and encoded slashes rejected")
	}
	for name, v := range map[string]string{"EXTAUTHZ_FORWARDED_HEADERS": "both", "EXTAUTHZ_ENCODED_SLASHES": "decode"} {
		if _, err := loadConfig(lookupMap(map[string]string{name: v})); err == nil || !strings.Contains(err.Error(), name+":") {
			t.Errorf("%s=%s: %v, want refused", name, v, err)
		}
	}
}

// Every setting has a row, with its default, in the README's table.
func TestREADMEListsEverySetting(t *testing.T) {
	t.Parallel()
	readme := string(repoFile(t, "README.md"))
	for name := range known {
		if !strings.Contains(readme, "\n| `EXTAUTHZ_"+name+"` | ") {
			t.Errorf("README settings table has no row for EXTAUTHZ_%s", name)
		}
	}
}
