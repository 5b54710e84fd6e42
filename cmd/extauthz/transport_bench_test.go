package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// transport is one way to reach the gRPC port: the settings that serve it
// and the client credentials that dial it.
type transport struct {
	name   string
	env    func(b *testing.B) map[string]string
	client func(b *testing.B) credentials.TransportCredentials
	addr   func(s *server) string
}

// transports: plaintext over TCP loopback, a Unix socket, TLS and mTLS
// (ECDSA P-256 certificates, TLS 1.3) over TCP loopback.
func transports(b *testing.B) []transport {
	ca, clients := newTestCA(b, "server CA"), newTestCA(b, "client CA")
	dir := b.TempDir()
	certPEM, keyPEM := ca.issue(b, "extauthz", false)
	sd := newSecretDir(b, map[string][]byte{"tls.crt": certPEM, "tls.key": keyPEM, "ca.crt": clients.pem})
	cp, kp := clients.issue(b, "envoy", true)
	plain := func(*testing.B) credentials.TransportCredentials { return insecure.NewCredentials() }
	tcp := func(s *server) string { return s.addrs.GRPC }
	none := func(*testing.B) map[string]string { return nil }
	return []transport{
		{"tcp", none, plain, tcp},
		{"unix", func(*testing.B) map[string]string {
			return map[string]string{"EXTAUTHZ_GRPC_ADDR": "unix:" + filepath.Join(dir, "grpc.sock")}
		}, plain, func(s *server) string { return "unix:" + s.addrs.GRPC }},
		{"tls", func(*testing.B) map[string]string {
			return map[string]string{"EXTAUTHZ_TLS_CERT_FILE": sd.path("tls.crt"), "EXTAUTHZ_TLS_KEY_FILE": sd.path("tls.key")}
		}, func(b *testing.B) credentials.TransportCredentials {
			return credentials.NewTLS(clientTLS(b, ca, nil, nil))
		}, tcp},
		{"mtls", func(*testing.B) map[string]string {
			return map[string]string{"EXTAUTHZ_TLS_CERT_FILE": sd.path("tls.crt"), "EXTAUTHZ_TLS_KEY_FILE": sd.path("tls.key"),
				"EXTAUTHZ_TLS_CLIENT_CA_FILE": sd.path("ca.crt")}
		}, func(b *testing.B) credentials.TransportCredentials {
			return credentials.NewTLS(clientTLS(b, ca, cp, kp))
		}, tcp},
	}
}

// benchServer runs serve on the embedded default with extra settings and
// returns it with the credential of a key it holds.
func benchServer(b *testing.B, extra map[string]string) (*server, string) {
	b.Helper()
	envm := map[string]string{"EXTAUTHZ_DATA_DIR": b.TempDir(), "EXTAUTHZ_LOG_LEVEL": "error"}
	for k, v := range extra {
		envm[k] = v
	}
	var out bytes.Buffer
	if code := realMain(context.Background(), []string{"keys", "create", "--tenant", "bench"},
		&env{stdin: strings.NewReader(""), stdout: &out, stderr: io.Discard, lookup: lookupMap(envm)}); code != 0 {
		b.Fatalf("keys create: exit %d", code)
	}
	var k struct{ Credential string }
	if err := json.Unmarshal(out.Bytes(), &k); err != nil {
		b.Fatal(err)
	}
	return startServerEnv(b, envm), k.Credential
}

// BenchmarkCheckTransport is the per-request cost of each transport: Checks
// (cache hits) on one established connection, from 8 goroutines at once.
// Compare the sub-benchmarks of one run:
//
//	go test -run '^$' -bench 'CheckTransport|Handshake' -count 6 ./cmd/extauthz
func BenchmarkCheckTransport(b *testing.B) {
	for _, tr := range transports(b) {
		b.Run(tr.name, func(b *testing.B) {
			srv, cred := benchServer(b, tr.env(b))
			conn, err := grpc.NewClient(tr.addr(srv), grpc.WithTransportCredentials(tr.client(b)))
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			client := authv3.NewAuthorizationClient(conn)
			req := checkReq(map[string]string{"authorization": "Bearer " + cred})
			if r, err := client.Check(context.Background(), req); err != nil || r.GetStatus().GetCode() != 0 {
				b.Fatalf("warm-up check: %v %v", r.GetStatus(), err)
			}
			b.SetParallelism(4) // × GOMAXPROCS goroutines
			b.ReportAllocs()
			b.ResetTimer()
			cpu := cpuTime()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := client.Check(context.Background(), req); err != nil {
						b.Error(err)
						return
					}
				}
			})
			reportCPU(b, cpu)
		})
	}
}

// BenchmarkHandshake is the cost of a new connection: dial, the TLS
// handshake if any, HTTP/2 setup and a first Check, then close.
func BenchmarkHandshake(b *testing.B) {
	for _, tr := range transports(b) {
		b.Run(tr.name, func(b *testing.B) {
			srv, cred := benchServer(b, tr.env(b))
			creds := tr.client(b)
			req := checkReq(map[string]string{"authorization": "Bearer " + cred})
			b.ReportAllocs()
			cpu := cpuTime()
			for b.Loop() {
				conn, err := grpc.NewClient(tr.addr(srv), grpc.WithTransportCredentials(creds))
				if err != nil {
					b.Fatal(err)
				}
				if _, err := authv3.NewAuthorizationClient(conn).Check(context.Background(), req); err != nil {
					b.Fatal(err)
				}
				conn.Close()
			}
			reportCPU(b, cpu)
		})
	}
}

// cpuTime is the CPU the process (client and server together) has used.
// On a shared machine it varies far less than elapsed time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the CPU used since start per operation, as cpu-ns/op.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
}
