package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/extauthz/extauthz/internal/testsvc"
)

// cli runs extauthz in process with the given environment.
type cli struct {
	t   *testing.T
	env map[string]string
}

func (c *cli) run(stdin string, args ...string) (code int, stdout, stderr string) {
	c.t.Helper()
	var out, errb bytes.Buffer
	var environ []string
	for k, v := range c.env {
		environ = append(environ, k+"="+v)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code = realMain(ctx, args, &env{stdin: strings.NewReader(stdin), stdout: &out, stderr: &errb, lookup: lookupMap(c.env), environ: environ})
	return code, out.String(), errb.String()
}

// ok runs a command that must succeed and returns its JSON lines.
func (c *cli) ok(stdin string, args ...string) []map[string]any {
	c.t.Helper()
	code, out, errOut := c.run(stdin, args...)
	if code != 0 {
		c.t.Fatalf("%v: exit %d: %s", args, code, errOut)
	}
	var lines []map[string]any
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			c.t.Fatalf("%v: stdout line is not JSON: %q", args, sc.Text())
		}
		lines = append(lines, m)
	}
	return lines
}

// fails runs a command that must fail with code and one line on stderr
// containing want, and nothing on stdout.
func (c *cli) fails(code int, want, stdin string, args ...string) {
	c.t.Helper()
	got, out, errOut := c.run(stdin, args...)
	if got != code {
		c.t.Fatalf("%v: exit %d, want %d (stderr %q)", args, got, code, errOut)
	}
	if out != "" {
		c.t.Errorf("%v: stdout %q on failure", args, out)
	}
	if strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, want) {
		c.t.Errorf("%v: stderr %q, want one line containing %q", args, errOut, want)
	}
}

// stores gives each test both configurations a user runs.
func stores(t *testing.T) map[string]func(t *testing.T) *cli {
	return map[string]func(t *testing.T) *cli{
		"embedded": func(t *testing.T) *cli {
			return &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir()}}
		},
		"postgres": func(t *testing.T) *cli {
			c := &cli{t: t, env: map[string]string{
				"EXTAUTHZ_STORE":        testsvc.NewDatabase(t),
				"EXTAUTHZ_HMAC_SECRETS": "k1:" + pepper32,
			}}
			out := c.ok("", "migrate")
			if out[0]["schema_version"].(float64) < 1 {
				t.Fatalf("migrate: %v", out)
			}
			if again := c.ok("", "migrate"); len(again[0]["applied"].([]any)) != 0 {
				t.Fatalf("second migrate applied %v", again)
			}
			return c
		},
	}
}

func TestKeysCLI(t *testing.T) {
	for name, open := range stores(t) {
		t.Run(name, func(t *testing.T) {
			c := open(t)
			created := c.ok("", "keys", "create", "--tenant", "acme", "--name", "ci", "--scopes", "read, write", "--ttl", "720h")
			k := created[0]
			for _, f := range []string{"id", "tenant_id", "name", "kind", "scopes", "expires_at", "credential", "public_key", "secret_key"} {
				if _, ok := k[f]; !ok {
					t.Errorf("create output lacks %s", f)
				}
			}
			if k["kind"] != "pair" || k["credential"] != k["public_key"].(string)+":"+k["secret_key"].(string) {
				t.Errorf("create output %v", k)
			}
			exp, err := time.Parse(time.RFC3339, k["expires_at"].(string))
			if err != nil || time.Until(exp) < 719*time.Hour {
				t.Errorf("expires_at %v", k["expires_at"])
			}
			tok := c.ok("", "keys", "create", "--tenant", "acme", "--kind", "token")[0]
			if _, ok := tok["public_key"]; ok || tok["expires_at"] != nil || !strings.HasPrefix(tok["credential"].(string), "tk_") {
				t.Errorf("token create output %v", tok)
			}
			c.ok("", "keys", "create", "--tenant", "other")

			list := c.ok("", "keys", "list", "--tenant", "acme")
			if len(list) != 2 {
				t.Fatalf("list acme: %d keys", len(list))
			}
			for _, l := range list {
				for _, f := range []string{"id", "tenant_id", "name", "kind", "scopes", "status", "created_at", "expires_at", "last_used_at", "request_count"} {
					if _, ok := l[f]; !ok {
						t.Errorf("list lacks %s", f)
					}
				}
				if l["status"] != "active" {
					t.Errorf("status %v", l["status"])
				}
			}
			_, out, _ := c.run("", "keys", "list")
			for _, secret := range []string{k["secret_key"].(string), tok["credential"].(string)} {
				if strings.Contains(out, secret[3:]) {
					t.Fatal("list printed a secret")
				}
			}
			if _, ok := list[1]["public_key"]; ok {
				t.Error("list shows public_key for a token")
			}

			c.ok("", "keys", "revoke", k["id"].(string))
			if got := c.ok("", "keys", "list", "--tenant", "acme"); got[0]["status"] != "revoked" || len(got) != 2 {
				t.Errorf("after revoke: %v", got)
			}
			c.fails(1, "no key with id", "", "keys", "revoke", "00000000-0000-4000-8000-000000000000")
			c.fails(1, "no key with id", "", "keys", "revoke", "not-a-uuid")
			// A credential pasted where the id belongs is not printed back.
			for _, args := range [][]string{
				{"keys", "revoke", k["credential"].(string)}, {"keys", "delete", k["credential"].(string)},
				{"keys", "revoke", "--tenant", k["credential"].(string)}, {"keys", "revoke", "x", k["credential"].(string)},
				{"keys", "create", "--tenant", "a", "--ttl", k["credential"].(string)},
			} {
				if _, _, errOut := c.run("", args...); errOut == "" || strings.Contains(errOut, k["secret_key"].(string)[3:]) {
					t.Errorf("%v: stderr %q", args[:2], errOut)
				}
			}
			c.ok("", "keys", "delete", tok["id"].(string))
			c.fails(1, "no key with id", "", "keys", "delete", tok["id"].(string))

			revoked := c.ok("", "keys", "revoke", "--tenant", "other")
			if len(revoked) != 1 || revoked[0]["status"] != "revoked" {
				t.Errorf("revoke --tenant: %v", revoked)
			}
			// A misspelt tenant revoked nothing and exited 0.
			c.fails(1, `no keys for tenant "othre"; nothing revoked`, "", "keys", "revoke", "--tenant", "othre")
			// Again: nothing left to revoke, which is what was asked.
			if code, out, errOut := c.run("", "keys", "revoke", "--tenant", "other"); code != 0 || out != "" || !strings.Contains(errOut, "already revoked") {
				t.Errorf("revoke --tenant twice: exit %d, stdout %q, stderr %q", code, out, errOut)
			}
		})
	}
}

func TestKeysImport(t *testing.T) {
	for name, open := range stores(t) {
		t.Run(name, func(t *testing.T) {
			c := open(t)
			good := `{"token":"legacy-token-0001","tenant_id":"acme","scopes":["read"],"name":"old app"}` + "\n\n" +
				`{"token":"legacy-token-0002","tenant_id":"beta"}` + "\n"
			// Bad lines name their line number, never the token, and import nothing.
			for _, tc := range []struct{ stdin, want string }{
				{good + `{"token":"short","tenant_id":"acme"}`, "line 4"},
				{good + `{"token":"legacy-token-0003","tenant_id":"bad tenant"}`, "line 4"},
				{good + `{"token":"legacy-token-0001","tenant_id":"acme"}`, "same token as line 1"},
				{good + `{"token":"legacy-token-0003","tenant_id":"acme","secret":"x"}`, "line 4"},
				{good + `not json`, "line 4"},
				{good + `{"token":"pk_abc:sk_def","tenant_id":"acme"}`, "line 4"},
				{good + `{"tenant_id":"acme"}`, "line 4"},
			} {
				c.fails(1, tc.want, tc.stdin, "keys", "import")
				_, _, errOut := c.run(tc.stdin, "keys", "import")
				if strings.Contains(errOut, "legacy-token") {
					t.Errorf("error echoes a token: %s", errOut)
				}
			}
			if n := len(c.ok("", "keys", "list")); n != 0 {
				t.Fatalf("failed imports left %d keys", n)
			}
			out := c.ok(good, "keys", "import")
			if len(out) != 2 || out[0]["tenant_id"] != "acme" || out[1]["tenant_id"] != "beta" {
				t.Fatalf("import output %v", out)
			}
			for _, o := range out {
				if len(o) != 2 {
					t.Errorf("import prints more than id and tenant_id: %v", o)
				}
			}
			// Already stored: the store's conflict names the line.
			c.fails(1, "line 3: this token is already stored", `{"token":"legacy-token-0009","tenant_id":"acme"}`+"\n\n"+`{"token":"legacy-token-0002","tenant_id":"beta"}`, "keys", "import")
			if n := len(c.ok("", "keys", "list")); n != 2 {
				t.Fatalf("after a conflicting import: %d keys, want 2", n)
			}
		})
	}
}

func TestCLIUsageErrors(t *testing.T) {
	t.Parallel()
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir()}}
	c.fails(2, "unknown command", "", "frobnicate")
	c.fails(2, "keys needs a subcommand", "", "keys")
	c.fails(2, "unknown keys subcommand", "", "keys", "rotate")
	c.fails(2, "--tenant is required", "", "keys", "create")
	c.fails(2, "flag provided but not defined", "", "keys", "create", "--tenant", "a", "--colour", "red")
	c.fails(2, "--kind", "", "keys", "create", "--tenant", "a", "--kind", "jwt")
	c.fails(2, "want a positive number of days (30d) or a duration", "", "keys", "create", "--tenant", "a", "--ttl", "1 week")
	c.fails(2, "want a positive number of days", "", "keys", "create", "--tenant", "a", "--ttl", "-5d")
	c.fails(2, "tenant", "", "keys", "create", "--tenant", "white space")
	c.fails(2, "scope", "", "keys", "create", "--tenant", "a", "--scopes", "a b")
	c.fails(2, "give a key ID or --tenant", "", "keys", "revoke")
	c.fails(2, "not both", "", "keys", "revoke", "--tenant", "a", "x")
	c.fails(2, "put flags first", "", "keys", "list", "x", "--tenant", "a")
	c.fails(2, "serve takes no arguments", "", "serve", "--port", "1")
	c.env["EXTAUTHZ_CACHE_TTL"] = "soon"
	c.fails(1, "EXTAUTHZ_CACHE_TTL", "", "serve")
	c.fails(1, "EXTAUTHZ_CACHE_TTL", "", "keys", "list")
	delete(c.env, "EXTAUTHZ_CACHE_TTL")
	if code, out, _ := c.run("", "help"); code != 0 || !strings.Contains(out, "keys create") {
		t.Errorf("help: %d %q", code, out)
	}
}

// An invalid EXTAUTHZ_ROUTES file (or pepper file) printed a start-up log
// line before the error: everything the configuration names is read
// before the first line, so the error is the only one.
func TestServeRefusesBadFilesBeforeLogging(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	badPepperDir := filepath.Join(dir, "data")
	if err := os.MkdirAll(badPepperDir, 0o700); err != nil {
		t.Fatal(err)
	}
	write("data/pepper", "not a pepper\n")
	for _, tc := range []struct {
		name, want string
		env        map[string]string
	}{
		{"routes not JSON", "EXTAUTHZ_ROUTES", map[string]string{"EXTAUTHZ_ROUTES": write("r1.json", "routes: []")}},
		{"routes unknown field", "EXTAUTHZ_ROUTES", map[string]string{"EXTAUTHZ_ROUTES": write("r2.json", `{"routes":[{"path_prefix":"/a","scope":["x"]}]}`)}},
		{"routes missing", "EXTAUTHZ_ROUTES", map[string]string{"EXTAUTHZ_ROUTES": filepath.Join(dir, "nope.json")}},
		{"pepper file", "pepper", map[string]string{"EXTAUTHZ_DATA_DIR": badPepperDir}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			loopbackCLI(t, tc.env).fails(1, tc.want, "", "serve") // one line on stderr: the error, no log line before it
		})
	}
}

// The CLI explains itself: keys help and every subcommand's --help print
// to stdout and exit 0, without opening a store; --ttl takes days; show
// and identify find a key, identify only from stdin.
func TestKeysHelpShowIdentify(t *testing.T) {
	t.Parallel()
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir()}}
	for _, args := range [][]string{{"keys", "help"}, {"keys", "--help"}, {"keys", "-h"}} {
		code, out, _ := c.run("", args...)
		if code != 0 || !strings.Contains(out, "identify") || !strings.Contains(out, "create --tenant") {
			t.Errorf("%v: exit %d, stdout %q", args, code, out)
		}
	}
	for sub, flagName := range map[string]string{"create": "-ttl", "list": "-tenant", "revoke": "-tenant", "show": "usage: extauthz keys show", "identify": "stdin", "delete": "keys delete", "import": "keys import"} {
		code, out, errOut := c.run("", "keys", sub, "--help")
		if code != 0 || !strings.Contains(out, flagName) || errOut != "" {
			t.Errorf("keys %s --help: exit %d, stdout %q, stderr %q", sub, code, out, errOut)
		}
	}
	k := c.ok("", "keys", "create", "--tenant", "acme", "--scopes", "read", "--ttl", "30d")[0]
	exp, _ := time.Parse(time.RFC3339, k["expires_at"].(string))
	if d := time.Until(exp); d < 29*24*time.Hour || d > 31*24*time.Hour {
		t.Errorf("--ttl 30d: expires in %v", d)
	}
	tok := c.ok("", "keys", "create", "--tenant", "beta", "--kind", "token")[0]

	shown := c.ok("", "keys", "show", k["id"].(string))
	if len(shown) != 1 || shown[0]["id"] != k["id"] || shown[0]["status"] != "active" || shown[0]["public_key"] != k["public_key"] {
		t.Errorf("show: %v", shown)
	}
	if _, ok := shown[0]["secret_key"]; ok {
		t.Error("show printed a secret")
	}
	c.fails(1, "no key", "", "keys", "show", "00000000-0000-4000-8000-000000000000")
	c.fails(2, "want one key id", "", "keys", "show")

	for _, tc := range []struct{ cred, id string }{{k["credential"].(string), k["id"].(string)}, {tok["credential"].(string), tok["id"].(string)}} {
		got := c.ok(tc.cred+"\n", "keys", "identify")
		if len(got) != 1 || got[0]["id"] != tc.id {
			t.Errorf("identify: %v, want key %s", got, tc.id)
		}
	}
	// A wrong secret for a known public key is no match, and says nothing more.
	other := c.ok("", "keys", "create", "--tenant", "acme")[0]
	c.fails(1, "no key matches", k["public_key"].(string)+":"+other["secret_key"].(string)+"\n", "keys", "identify")
	// Revoked keys are identified, with their status.
	c.ok("", "keys", "revoke", k["id"].(string))
	if got := c.ok(k["credential"].(string), "keys", "identify"); got[0]["status"] != "revoked" {
		t.Errorf("identify a revoked key: %v", got)
	}
	// Never from the command line, and never echoed.
	code, out, errOut := c.run("", "keys", "identify", k["credential"].(string))
	if code != 2 || out != "" || !strings.Contains(errOut, "stdin") || strings.Contains(errOut, "sk_") {
		t.Errorf("identify with an argument: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	c.fails(2, "no credential on stdin", "", "keys", "identify")
	c.fails(2, "not a credential", "not a credential at all\n", "keys", "identify")
}

// migrate touches no key, so it needs no pepper; serve and keys on the
// same store still refuse to run without one (a generated pepper would
// differ per replica).
func TestMigrateNeedsNoPepper(t *testing.T) {
	t.Parallel()
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_STORE": testsvc.NewDatabase(t)}}
	if out := c.ok("", "migrate"); out[0]["schema_version"].(float64) < 1 {
		t.Fatalf("migrate: %v", out)
	}
	c.fails(1, "EXTAUTHZ_HMAC_SECRETS", "", "keys", "list")
	c.fails(1, "EXTAUTHZ_HMAC_SECRETS", "", "serve")
}

// A key made with a pepper the server does not hold is denied like a
// wrong secret, and the mistake shows: counted in a metric and logged
// (at most once an interval) with the pepper's id.
func TestUnknownPepperIsVisible(t *testing.T) {
	t.Parallel()
	store := "file:" + t.TempDir() + "/keys.json"
	maker := &cli{t: t, env: map[string]string{"EXTAUTHZ_STORE": store, "EXTAUTHZ_HMAC_SECRETS": "old:" + pepper32}}
	cred := maker.ok("", "keys", "create", "--tenant", "acme")[0]["credential"].(string)
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_STORE": store, "EXTAUTHZ_HMAC_SECRETS": "new:" + strings.Repeat("n", 32)}}
	srv := startServer(t, c)
	client, _ := srv.client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := client.Check(ctx, checkReq(map[string]string{"authorization": "Bearer " + cred}))
	if err != nil || r.GetStatus().GetCode() != int32(codes.Unauthenticated) {
		t.Fatalf("key of an unknown pepper: %v %v, want a 401 deny", r.GetStatus(), err)
	}
	_, metrics := httpGet(t, "http://"+srv.addrs.Admin+"/metrics")
	if !strings.Contains(metrics, "extauthz_unknown_pepper_total 1") {
		t.Errorf("extauthz_unknown_pepper_total is not 1")
	}
}

// loopbackCLI is a cli on the embedded default in a fresh data directory,
// serving on loopback ports, with extra settings on top.
func loopbackCLI(t *testing.T, extra map[string]string) *cli {
	env := map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(),
		"EXTAUTHZ_GRPC_ADDR": "127.0.0.1:0", "EXTAUTHZ_HTTP_ADDR": "127.0.0.1:0", "EXTAUTHZ_ADMIN_ADDR": "127.0.0.1:0"}
	for k, v := range extra {
		env[k] = v
	}
	return &cli{t: t, env: env}
}
