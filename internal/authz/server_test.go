package authz

import (
	"context"
	"net"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/extauthz/extauthz/internal/tokens"
)

// serve starts the real gRPC server on an in-memory listener.
func serve(t *testing.T, svc *Service, h *Health) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := NewGRPCServer(svc, h)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestGRPCRoundTrip(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{StripCredential: true})
	is := e.issue(t, tokens.IssueParams{Tenant: "acme"})
	h := NewHealth()
	conn := serve(t, e.svc, h)
	client := authv3.NewAuthorizationClient(conn)

	r, err := client.Check(ctx(t), httpReq(map[string]string{"authorization": "Bearer " + is.Credential}))
	if err != nil || r.GetStatus() == nil || r.GetStatus().GetCode() != 0 {
		t.Fatalf("allow: %v, %v", r, err)
	}
	if got := r.GetOkResponse().GetHeaders()[0].GetHeader().GetValue(); got != "acme" {
		t.Errorf("tenant = %q", got)
	}
	r, err = client.Check(ctx(t), httpReq(nil))
	if err != nil {
		t.Fatal(err)
	}
	checkDeny(t, r, denyWant{codes.Unauthenticated, 401, "missing_credential"})
}

func TestGRPCOutage(t *testing.T) {
	t.Parallel()
	h, _ := tokens.NewHasher(testPepper)
	svc := NewService(tokens.NewAuthenticator(h, failingFinder{}, tokens.Options{}), Options{})
	client := authv3.NewAuthorizationClient(serve(t, svc, NewHealth()))
	_, err := client.Check(ctx(t), httpReq(map[string]string{"authorization": "Bearer legacy-token-abcdef"}))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("err = %v, want UNAVAILABLE so that failure_mode_allow / status_on_error decide", err)
	}
}

func TestGRPCHealth(t *testing.T) {
	t.Parallel()
	e := newEnv(t, Options{})
	h := NewHealth()
	hc := healthpb.NewHealthClient(serve(t, e.svc, h))
	st := func(service string) healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		r, err := hc.Check(ctx(t), &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			t.Fatalf("health %q: %v", service, err)
		}
		return r.GetStatus()
	}
	if st("") != healthpb.HealthCheckResponse_SERVING || st(AuthorizationService) != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatal("before the first store contact: want alive, not ready")
	}
	h.SetReady(true, "ok")
	if st(AuthorizationService) != healthpb.HealthCheckResponse_SERVING {
		t.Fatal("ready: want SERVING")
	}
	if _, err := hc.Check(ctx(t), &healthpb.HealthCheckRequest{Service: "nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown service: %v, want NOT_FOUND", err)
	}
	h.Shutdown()
	h.SetReady(true, "late") // ignored once shutting down
	if st("") != healthpb.HealthCheckResponse_NOT_SERVING || st(AuthorizationService) != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatal("after Shutdown: want NOT_SERVING everywhere")
	}
}
