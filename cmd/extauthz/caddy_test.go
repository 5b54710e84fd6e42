package main

import (
	"os"
	"os/exec"
	"path/filepath"
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

// TestCaddyForwardAuth runs the forward-auth test against Caddy, built
// from the Go module proxy by `make e2e-caddy` (EXTAUTHZ_TEST_CADDY), or a
// caddy on PATH.
func TestCaddyForwardAuth(t *testing.T) {
	bin := os.Getenv("EXTAUTHZ_TEST_CADDY")
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("caddy"); err != nil {
			t.Skip("SKIPPED: caddy not found; `make e2e-caddy` builds it from the Go module proxy and runs this test")
		}
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
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitListening(t, addr, 10*time.Second, func() string { return "caddy: " + out.String() })
	return addr
}
