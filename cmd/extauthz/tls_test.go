package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
)

// testCA is a certificate authority made in the test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func nextSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		panic(err)
	}
	return n
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns a leaf's certificate and key PEM: a server certificate
// for localhost and 127.0.0.1, or a client one.
func (ca *testCA) issue(t testing.TB, cn string, client bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	if client {
		tmpl.ExtKeyUsage, tmpl.DNSNames, tmpl.IPAddresses = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, nil, nil
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// clientTLS trusts ca and presents the given client pair, if any.
func clientTLS(t testing.TB, ca *testCA, certPEM, keyPEM []byte) *tls.Config {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.pem)
	c := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if certPEM != nil {
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c
}

// secretDir lays out TLS files as the kubelet mounts a Secret that
// cert-manager writes: tls.crt -> ..data/tls.crt, and ..data a symlink to
// a timestamped directory, swapped in one rename on every update.
type secretDir struct {
	t   testing.TB
	dir string
	n   int
}

func newSecretDir(t testing.TB, files map[string][]byte) *secretDir {
	s := &secretDir{t: t, dir: t.TempDir()}
	s.update(files)
	for name := range files {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(s.dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func (s *secretDir) path(name string) string { return filepath.Join(s.dir, name) }

// update writes a new version and swaps ..data to it atomically.
func (s *secretDir) update(files map[string][]byte) {
	s.t.Helper()
	s.n++
	ver := filepath.Join(s.dir, ".."+time.Now().Format("2006_01_02_15_04_05.")+itoa(int32(s.n)))
	if err := os.Mkdir(ver, 0o755); err != nil {
		s.t.Fatal(err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(ver, name), b, 0o600); err != nil {
			s.t.Fatal(err)
		}
	}
	tmp := filepath.Join(s.dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ver), tmp); err != nil {
		s.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(s.dir, "..data")); err != nil {
		s.t.Fatal(err)
	}
}

// tlsServer starts serve with TLS from a secretDir; with mtls, client
// certificates signed by clientCA are required.
func tlsServer(t *testing.T, ca *testCA, clientCA *testCA) (*server, *secretDir, string) {
	t.Helper()
	certPEM, keyPEM := ca.issue(t, "extauthz-1", false)
	files := map[string][]byte{"tls.crt": certPEM, "tls.key": keyPEM}
	if clientCA != nil {
		files["ca.crt"] = clientCA.pem
	}
	sd := newSecretDir(t, files)
	c := &cli{t: t, env: map[string]string{
		"EXTAUTHZ_DATA_DIR":      t.TempDir(),
		"EXTAUTHZ_TLS_CERT_FILE": sd.path("tls.crt"), "EXTAUTHZ_TLS_KEY_FILE": sd.path("tls.key"),
		"EXTAUTHZ_HEALTH_ADDR": "127.0.0.1:0",
	}}
	if clientCA != nil {
		c.env["EXTAUTHZ_TLS_CLIENT_CA_FILE"] = sd.path("ca.crt")
	}
	cred := c.ok("", "keys", "create", "--tenant", "acme")[0]["credential"].(string)
	return startServer(t, c), sd, cred
}

func grpcConn(t testing.TB, addr string, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// checkWith runs one Check and returns its error and the certificate the
// server presented on the connection it used.
func checkWith(conn *grpc.ClientConn, cred string) (*x509.Certificate, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var p peer.Peer
	r, err := authv3.NewAuthorizationClient(conn).Check(ctx, checkReq(map[string]string{"authorization": "Bearer " + cred}), grpc.Peer(&p), grpc.WaitForReady(false))
	if err != nil {
		return nil, err
	}
	if r.GetStatus().GetCode() != 0 {
		return nil, status.Errorf(codes.Internal, "denied: %v", r.GetStatus())
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 {
		return nil, nil
	}
	return ti.State.PeerCertificates[0], nil
}

func TestTLS(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "server CA")
	srv, _, cred := tlsServer(t, ca, nil)

	// gRPC over TLS: the check works and the server presents its certificate.
	leaf, err := checkWith(grpcConn(t, srv.addrs.GRPC, credentials.NewTLS(clientTLS(t, ca, nil, nil))), cred)
	if err != nil || leaf == nil || leaf.Subject.CommonName != "extauthz-1" {
		t.Fatalf("check over TLS: %v, server certificate %v", err, leaf)
	}
	// Plaintext is refused, and so is a client that does not trust the CA.
	if _, err := checkWith(grpcConn(t, srv.addrs.GRPC, insecure.NewCredentials()), cred); status.Code(err) != codes.Unavailable {
		t.Errorf("plaintext gRPC to a TLS port: %v, want Unavailable", err)
	}
	if _, err := checkWith(grpcConn(t, srv.addrs.GRPC, credentials.NewTLS(clientTLS(t, newTestCA(t, "other"), nil, nil))), cred); err == nil {
		t.Error("a client not trusting the server's CA connected")
	}
	// HTTP check mode over TLS.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS(t, ca, nil, nil)}}
	req, _ := http.NewRequest("GET", "https://"+srv.addrs.HTTP+"/check/v1/orders", nil)
	req.Header.Set("authorization", "Bearer "+cred)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil {
		t.Errorf("HTTP check over TLS: %d, tls %v", resp.StatusCode, resp.TLS != nil)
	}
	if resp, err := http.Get("http://" + srv.addrs.HTTP + "/readyz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Error("plaintext HTTP answered on the TLS port")
		}
	}
	// The admin port stays plaintext (metrics, probes).
	if code, _ := httpGet(t, "http://"+srv.addrs.Admin+"/healthz"); code != 200 {
		t.Errorf("admin /healthz: %d", code)
	}
}

func TestMTLS(t *testing.T) {
	t.Parallel()
	ca, clients, other := newTestCA(t, "server CA"), newTestCA(t, "client CA"), newTestCA(t, "other CA")
	srv, _, cred := tlsServer(t, ca, clients)
	goodCert, goodKey := clients.issue(t, "envoy", true)
	badCert, badKey := other.issue(t, "envoy", true)

	if _, err := checkWith(grpcConn(t, srv.addrs.GRPC, credentials.NewTLS(clientTLS(t, ca, goodCert, goodKey))), cred); err != nil {
		t.Fatalf("client certificate from the client CA: %v", err)
	}
	for name, c := range map[string]*tls.Config{
		"no client certificate":              clientTLS(t, ca, nil, nil),
		"client certificate from another CA": clientTLS(t, ca, badCert, badKey),
		"the server's own CA is not the client CA": func() *tls.Config {
			cp, kp := ca.issue(t, "envoy", true)
			return clientTLS(t, ca, cp, kp)
		}(),
	} {
		if _, err := checkWith(grpcConn(t, srv.addrs.GRPC, credentials.NewTLS(c)), cred); err == nil {
			t.Errorf("gRPC, %s: check answered", name)
		}
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: c}}
		if resp, err := hc.Get("https://" + srv.addrs.HTTP + "/readyz"); err == nil {
			resp.Body.Close()
			t.Errorf("HTTP, %s: answered %d", name, resp.StatusCode)
		}
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS(t, ca, goodCert, goodKey)}}
	resp, err := hc.Get("https://" + srv.addrs.HTTP + "/healthz")
	if err != nil {
		t.Fatalf("HTTP with a good client certificate: %v", err)
	}
	resp.Body.Close()

	// The probe port: plaintext gRPC health, and nothing else.
	conn := grpcConn(t, srv.addrs.Health, insecure.NewCredentials())
	ctx := context.Background()
	if hr, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("plaintext health: %v %v", hr, err)
	}
	if _, err := checkWith(conn, cred); status.Code(err) != codes.PermissionDenied {
		t.Errorf("Check on the health port: %v, want PermissionDenied", err)
	}
}

// Rotation as cert-manager does it: new files behind a symlink swap reach
// new connections within seconds; a connection made before keeps working
// on its session; a new pair that does not load is refused and the last
// good one kept.
func TestTLSReload(t *testing.T) {
	t.Parallel()
	ca, clients := newTestCA(t, "server CA"), newTestCA(t, "client CA")
	srv, sd, cred := tlsServer(t, ca, clients)
	cp, kp := clients.issue(t, "envoy", true)
	creds := credentials.NewTLS(clientTLS(t, ca, cp, kp))

	before := grpcConn(t, srv.addrs.GRPC, creds)
	if leaf, err := checkWith(before, cred); err != nil || leaf.Subject.CommonName != "extauthz-1" {
		t.Fatalf("before rotation: %v %v", leaf, err)
	}

	// Rotate the server certificate and the client CA together.
	clients2 := newTestCA(t, "client CA 2")
	cert2, key2 := ca.issue(t, "extauthz-2", false)
	sd.update(map[string][]byte{"tls.crt": cert2, "tls.key": key2, "ca.crt": clients2.pem})
	cp2, kp2 := clients2.issue(t, "envoy", true)
	creds2 := credentials.NewTLS(clientTLS(t, ca, cp2, kp2))
	newLeaf := func(c credentials.TransportCredentials) (string, error) {
		leaf, err := checkWith(grpcConn(t, srv.addrs.GRPC, c), cred)
		if err != nil {
			return "", err
		}
		return leaf.Subject.CommonName, nil
	}
	waitFor(t, "the new certificate on a new connection", func() bool { cn, _ := newLeaf(creds2); return cn == "extauthz-2" })
	if _, err := newLeaf(creds); err == nil {
		t.Error("a client certificate of the replaced client CA still connects")
	}
	// The connection made before the rotation was never dropped: it still
	// answers, on the session that presented the old certificate.
	for range 3 {
		if leaf, err := checkWith(before, cred); err != nil || leaf.Subject.CommonName != "extauthz-1" {
			t.Fatalf("connection from before the rotation: %v %v", leaf, err)
		}
	}
	if strings.Count(srv.log.String(), "TLS certificate reloaded") != 1 {
		t.Errorf("want one reload logged: %s", srv.log)
	}

	// A key that does not match its certificate: refused, logged once, and
	// the last good pair stays in service.
	cert3, _ := ca.issue(t, "extauthz-3", false)
	sd.update(map[string][]byte{"tls.crt": cert3, "tls.key": key2, "ca.crt": clients2.pem})
	waitFor(t, "the refusal logged", func() bool { return strings.Contains(srv.log.String(), "new TLS files refused") })
	time.Sleep(1500 * time.Millisecond) // another poll or two
	if cn, err := newLeaf(creds2); err != nil || cn != "extauthz-2" {
		t.Errorf("after a bad pair: %q %v, want the last good certificate", cn, err)
	}
	if n := strings.Count(srv.log.String(), "new TLS files refused"); n != 1 {
		t.Errorf("refusal logged %d times, want once", n)
	}
	_, metrics := httpGet(t, "http://"+srv.addrs.Admin+"/metrics")
	if !strings.Contains(metrics, "extauthz_tls_reload_failures_total 1\n") || !strings.Contains(metrics, "extauthz_tls_certificate_expiry_timestamp_seconds ") {
		t.Errorf("TLS metrics missing or wrong:\n%s", grepLines(metrics, "extauthz_tls_"))
	}
}

// waitFor polls cond for up to 10 s: reload polls every second.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for start := time.Now(); time.Since(start) < 10*time.Second; time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("%s: not within 10s", what)
}

// Half-configured TLS, and files that do not load, fail the start with
// one line naming the setting: no log line before it.
func TestServeRefusesBadTLS(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	certPEM, keyPEM := ca.issue(t, "s", false)
	_, otherKey := ca.issue(t, "s2", false)
	cert, key := write("tls.crt", certPEM), write("tls.key", keyPEM)
	unreadable := write("unreadable.key", keyPEM)
	if err := os.Chmod(unreadable, 0); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.crt")
	for _, tc := range []struct {
		name, want string
		env        map[string]string
	}{
		{"cert without key", "EXTAUTHZ_TLS_KEY_FILE: required", map[string]string{"EXTAUTHZ_TLS_CERT_FILE": cert}},
		{"key without cert", "EXTAUTHZ_TLS_CERT_FILE: required", map[string]string{"EXTAUTHZ_TLS_KEY_FILE": key}},
		{"client CA without cert", "EXTAUTHZ_TLS_CLIENT_CA_FILE: client certificates", map[string]string{"EXTAUTHZ_TLS_CLIENT_CA_FILE": write("ca.crt", ca.pem)}},
		{"missing cert", "EXTAUTHZ_TLS_CERT_FILE: open " + missing, map[string]string{"EXTAUTHZ_TLS_CERT_FILE": missing, "EXTAUTHZ_TLS_KEY_FILE": key}},
		{"missing client CA", "EXTAUTHZ_TLS_CLIENT_CA_FILE: open", map[string]string{"EXTAUTHZ_TLS_CERT_FILE": cert, "EXTAUTHZ_TLS_KEY_FILE": key, "EXTAUTHZ_TLS_CLIENT_CA_FILE": missing}},
		{"key of another certificate", "EXTAUTHZ_TLS_CERT_FILE, EXTAUTHZ_TLS_KEY_FILE", map[string]string{"EXTAUTHZ_TLS_CERT_FILE": cert, "EXTAUTHZ_TLS_KEY_FILE": write("other.key", otherKey)}},
		{"client CA not PEM", "EXTAUTHZ_TLS_CLIENT_CA_FILE: " + dir, map[string]string{"EXTAUTHZ_TLS_CERT_FILE": cert, "EXTAUTHZ_TLS_KEY_FILE": key, "EXTAUTHZ_TLS_CLIENT_CA_FILE": write("bad-ca.crt", []byte("not a certificate"))}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			loopbackCLI(t, tc.env).fails(1, tc.want, "", "serve")
		})
	}
	if os.Geteuid() != 0 { // root reads any file
		t.Run("unreadable key", func(t *testing.T) {
			env := map[string]string{"EXTAUTHZ_TLS_CERT_FILE": cert, "EXTAUTHZ_TLS_KEY_FILE": unreadable}
			loopbackCLI(t, env).fails(1, "EXTAUTHZ_TLS_KEY_FILE: open "+unreadable+": permission denied", "", "serve")
		})
	}
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A file missing for a while (deleted, or mid-replacement by a writer that
// is not atomic) keeps the set in service, is reported once, and its
// return is no change.
func TestCertReloaderMissingFile(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	certPEM, keyPEM := ca.issue(t, "s", false)
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	for p, b := range map[string][]byte{cert: certPEM, key: keyPEM} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r, err := newCertReloader(certFiles{cert: cert, key: key})
	if err != nil {
		t.Fatal(err)
	}
	before := r.cur.Load()
	if err := os.Remove(key); err != nil {
		t.Fatal(err)
	}
	for i, wantErr := range []bool{true, false, false} {
		changed, err := r.reload()
		if changed || (err != nil) != wantErr {
			t.Errorf("poll %d with the key missing: changed %v, err %v; want an error on the first only", i, changed, err)
		}
	}
	if err := os.WriteFile(key, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := r.reload(); changed || err != nil || r.cur.Load() != before {
		t.Errorf("the same key back: changed %v, err %v", changed, err)
	}
}
