package authz

import (
	"context"
	"net/http"
	"strings"
	"sync"

	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Health is the process's health and readiness, served over gRPC health
// ("" = alive, AuthorizationService = ready to decide) and over HTTP
// (/healthz, /readyz).
type Health struct {
	GRPC *health.Server

	// closing ends Watch streams at shutdown, which GracefulStop would
	// otherwise wait on forever.
	closing   chan struct{}
	closeOnce sync.Once

	mu       sync.Mutex
	ready    bool
	state    string
	stopping bool
}

// NewHealth starts alive, not ready.
func NewHealth() *Health {
	h := &Health{GRPC: health.NewServer(), closing: make(chan struct{}), state: "starting: no key store contact yet"}
	h.GRPC.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	h.GRPC.SetServingStatus(AuthorizationService, healthpb.HealthCheckResponse_NOT_SERVING)
	return h
}

// SetReady records whether checks can be decided, and why.
func (h *Health) SetReady(ready bool, state string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopping {
		return
	}
	h.ready, h.state = ready, state
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if ready {
		st = healthpb.HealthCheckResponse_SERVING
	}
	h.GRPC.SetServingStatus(AuthorizationService, st)
}

// Shutdown flips everything to NOT_SERVING for good, before the drain.
func (h *Health) Shutdown() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stopping, h.ready, h.state = true, false, "shutting down"
	h.GRPC.Shutdown()
}

// CloseWatches ends every health Watch stream with a final NOT_SERVING.
// Call it after Shutdown, right before the gRPC drain.
func (h *Health) CloseWatches() { h.closeOnce.Do(func() { close(h.closing) }) }

// healthService is the standard health server, with Watch streams that end
// at CloseWatches.
type healthService struct {
	*health.Server
	closing <-chan struct{}
}

// service returns what to register as grpc.health.v1.Health.
func (h *Health) service() healthpb.HealthServer {
	return &healthService{Server: h.GRPC, closing: h.closing}
}

func (s *healthService) Watch(req *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	go func() {
		select {
		case <-s.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	err := s.Server.Watch(req, &watchStream{Health_WatchServer: stream, ctx: ctx})
	select {
	case <-s.closing:
		// The inner loop may have seen the cancel before the last update.
		return stream.Send(&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_NOT_SERVING})
	default:
		return err
	}
}

type watchStream struct {
	healthpb.Health_WatchServer
	ctx context.Context
}

func (w *watchStream) Context() context.Context { return w.ctx }

// Ready reports readiness and its description.
func (h *Health) Ready() (bool, string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ready, h.state
}

// ServeHealthz answers liveness: 200 while the process runs.
func (h *Health) ServeHealthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("content-type", "text/plain; charset=utf-8")
	w.Write([]byte("ok\n"))
}

// ServeReadyz answers 200 while checks can be decided, 503 otherwise; the
// body says which state the server is in.
func (h *Health) ServeReadyz(w http.ResponseWriter, _ *http.Request) {
	ready, state := h.Ready()
	w.Header().Set("content-type", "text/plain; charset=utf-8")
	if !ready {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	w.Write([]byte(state + "\n"))
}

// HTTPHandler serves /healthz and /readyz, and hands every other path to
// next (nil: 404). It matches exact paths itself: http.ServeMux would
// redirect paths with "//" or "..", and Envoy would pass that 301 on to
// the client. The check prefix never holds a health path (the
// configuration refuses one that would), so a client path is never
// answered by health.
func (h *Health) HTTPHandler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The path as sent, not decoded: /%68ealthz is not a health path.
		p, _, _ := strings.Cut(r.RequestURI, "?")
		switch p {
		case "/healthz":
			h.ServeHealthz(w, r)
		case "/readyz":
			h.ServeReadyz(w, r)
		default:
			if next == nil {
				http.NotFound(w, r)
				return
			}
			next.ServeHTTP(w, r)
		}
	})
}
