package main

import (
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// unixHTTP is an HTTP client that dials the socket at path.
func unixHTTP(path string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
}

// A sidecar next to Envoy: the gRPC and HTTP listeners on Unix sockets,
// mode 0660, a stale socket from a crashed run replaced, both removed at
// exit.
func TestUnixSockets(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	grpcSock, httpSock := filepath.Join(dir, "grpc.sock"), filepath.Join(dir, "http.sock")
	// A crashed run's socket: the file is there, nobody listens.
	stale, err := net.Listen("unix", grpcSock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(),
		"EXTAUTHZ_GRPC_ADDR": "unix:" + grpcSock, "EXTAUTHZ_HTTP_ADDR": "unix:" + httpSock}}
	cred := c.ok("", "keys", "create", "--tenant", "acme")[0]["credential"].(string)
	srv := startServer(t, c)
	if srv.addrs.GRPC != grpcSock || srv.addrs.HTTP != httpSock {
		t.Fatalf("bound %+v", srv.addrs)
	}
	for _, p := range []string{grpcSock, httpSock} {
		fi, err := os.Lstat(p)
		if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 {
			t.Errorf("%s: %v %v, want a socket with mode 0660", p, fi.Mode(), err)
		}
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, ".*.tmp"))
	if len(leftovers) > 0 {
		t.Errorf("temporary sockets left: %v", leftovers)
	}

	conn := grpcConn(t, "unix:"+grpcSock, insecure.NewCredentials())
	if _, err := checkWith(conn, cred); err != nil {
		t.Fatalf("check over the Unix socket: %v", err)
	}
	hr, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health over the Unix socket: %v %v", hr, err)
	}
	req, _ := http.NewRequest("GET", "http://extauthz/check/v1/orders", nil)
	req.Header.Set("authorization", "Bearer "+cred)
	resp, err := unixHTTP(httpSock).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("HTTP check over the Unix socket: %d", resp.StatusCode)
	}

	// A second server on the same socket is refused; the first keeps it.
	c2 := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(),
		"EXTAUTHZ_GRPC_ADDR": "unix:" + grpcSock, "EXTAUTHZ_HTTP_ADDR": "127.0.0.1:0", "EXTAUTHZ_ADMIN_ADDR": "127.0.0.1:0"}}
	c2.fails(1, "EXTAUTHZ_GRPC_ADDR: "+grpcSock+": another server is listening on it", "", "serve")
	if _, err := checkWith(conn, cred); err != nil {
		t.Fatalf("check after a second server was refused: %v", err)
	}

	if code := srv.stop(); code != 0 {
		t.Fatalf("exit %d: %s", code, srv.log)
	}
	for _, p := range []string{grpcSock, httpSock} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("%s not removed at exit: %v", p, err)
		}
	}
}

// What is at a socket's path and is not a socket (a typo naming a file)
// is never removed.
func TestUnixSocketRefusesNonSocket(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "keys.json")
	if err := os.WriteFile(file, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := &cli{t: t, env: map[string]string{"EXTAUTHZ_DATA_DIR": t.TempDir(),
		"EXTAUTHZ_GRPC_ADDR": "127.0.0.1:0", "EXTAUTHZ_HTTP_ADDR": "unix:" + file, "EXTAUTHZ_ADMIN_ADDR": "127.0.0.1:0"}}
	c.fails(1, "EXTAUTHZ_HTTP_ADDR: "+file+" exists and is not a socket", "", "serve")
	if b, err := os.ReadFile(file); err != nil || string(b) != "precious" {
		t.Errorf("the file was touched: %q %v", b, err)
	}
	// A directory that does not exist is named as configured.
	c.env["EXTAUTHZ_HTTP_ADDR"] = "unix:" + filepath.Join(dir, "nodir", "http.sock")
	c.fails(1, "EXTAUTHZ_HTTP_ADDR: "+filepath.Join(dir, "nodir", "http.sock")+": bind: no such file or directory", "", "serve")
	// And a relative path or two listeners on one socket are configuration errors.
	c.env["EXTAUTHZ_HTTP_ADDR"] = "unix:rel.sock"
	c.fails(1, "EXTAUTHZ_HTTP_ADDR: \"unix:rel.sock\": a Unix socket needs an absolute file path", "", "serve")
	c.env["EXTAUTHZ_HTTP_ADDR"], c.env["EXTAUTHZ_GRPC_ADDR"] = "unix:/run/x.sock", "unix:/run/x.sock"
	c.fails(1, "EXTAUTHZ_HTTP_ADDR: \"unix:/run/x.sock\" is also EXTAUTHZ_GRPC_ADDR", "", "serve")
}
