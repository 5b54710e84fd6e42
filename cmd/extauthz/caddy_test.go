package main

import (
	"debug/buildinfo"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// caddyfile is the configuration users copy (README, "Caddy").
const caddyfile = `{
	admin off
	auto_https off
	persist_config off
}
http://{{listen}} {
	# In a route block directives run in the order written: the client's
	# identity headers go first, then forward_auth copies extauthz's.
	route {
		request_header -X-Tenant-Id
		request_header -X-Api-Key-Id
		request_header -X-Api-Key-Scopes
		# x_tenant_id would reach WSGI and CGI apps as X-Tenant-Id.
		request_header -*_*
		forward_auth {{extauthz}} {
			uri /check
			copy_headers X-Tenant-Id X-Api-Key-Id X-Api-Key-Scopes
		}
		request_header -Authorization
		request_header -X-Api-Key
		reverse_proxy {{upstream}}
	}
}
`

// TestCaddyForwardAuth runs the forward-auth test against the Caddy that
// `make e2e-caddy` builds from the Go module proxy (EXTAUTHZ_TEST_CADDY),
// pinned to the version the README's snippet needs; a caddy on PATH is
// used only if it is at least that version.
func TestCaddyForwardAuth(t *testing.T) {
	bin := os.Getenv("EXTAUTHZ_TEST_CADDY")
	if bin == "" {
		bin = caddyOnPath(t)
	}
	// Caddy sets X-Forwarded-Method, -Uri and -Host itself.
	testForwardAuthProxy(t, "X-Forwarded", func(t *testing.T, _, extauthzHTTP, upstream string) string {
		return runCaddy(t, bin, caddyfile, extauthzHTTP, upstream)
	})
}

// runCaddy runs Caddy with conf, its addresses filled in, and returns the
// address it listens on.
func runCaddy(t *testing.T, bin, conf, extauthzHTTP, upstream string) string {
	t.Helper()
	dir := t.TempDir()
	addr := freeLoopbackAddr(t)
	conf = strings.NewReplacer("{{listen}}", addr, "{{extauthz}}", extauthzHTTP, "{{upstream}}", upstream).Replace(conf)
	path := filepath.Join(dir, "Caddyfile")
	os.WriteFile(path, []byte(conf), 0o644)
	cmd := exec.Command(bin, "run", "--config", path, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir, "HOME="+dir)
	// The process writes from exec's copying goroutines while
	// waitListening may read: a locked buffer.
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitListening(t, addr, 10*time.Second, func() string { return "caddy: " + out.String() })
	return addr
}

// minCaddy is the oldest Caddy the README's snippet works with: before
// 2.10, copy_headers sent the literal placeholder
// {http.reverse_proxy.header.X-Tenant-Id} upstream when extauthz's answer
// lacked the header.
const minCaddy = "v2.10.0"

// caddyOnPath returns a caddy on PATH of at least minCaddy, or skips.
func caddyOnPath(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("caddy")
	if err != nil {
		t.Skip("SKIPPED: caddy not found; `make e2e-caddy` builds it from the Go module proxy and runs this test")
	}
	// A go-installed Caddy says "unknown" to `caddy version`; its build
	// info names the module version.
	v := ""
	if bi, err := buildinfo.ReadFile(bin); err == nil && strings.HasPrefix(bi.Main.Version, "v") {
		v = bi.Main.Version
	} else if out, err := exec.Command(bin, "version").Output(); err == nil {
		v, _, _ = strings.Cut(strings.TrimSpace(string(out)), " ")
	}
	if semverLess(v, minCaddy) {
		t.Skipf("SKIPPED: %s is caddy %q, older than %s; `make e2e-caddy` builds a pinned one", bin, v, minCaddy)
	}
	return bin
}

// semverLess compares vMAJOR.MINOR.PATCH versions numerically; anything
// unparsable counts as older.
func semverLess(a, b string) bool {
	parse := func(v string) (n [3]int, ok bool) {
		parts := strings.SplitN(strings.TrimPrefix(v, "v"), ".", 3)
		if len(parts) != 3 {
			return n, false
		}
		for i, p := range parts {
			p, _, _ = strings.Cut(p, "-")
			x, err := strconv.Atoi(p)
			if err != nil {
				return n, false
			}
			n[i] = x
		}
		return n, true
	}
	x, okA := parse(a)
	y, _ := parse(b)
	if !okA {
		return true
	}
	for i := range x {
		if x[i] != y[i] {
			return x[i] < y[i]
		}
	}
	return false
}
