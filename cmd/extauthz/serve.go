package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	"github.com/extauthz/extauthz/internal/authz"
	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/pgstore"
	"github.com/extauthz/extauthz/internal/tokens/rediscache"
)

type boundAddrs struct{ GRPC, HTTP, Admin, Health string }

// streamWorkers is the gRPC worker pool size: enough for the concurrency
// one Envoy connection typically carries; each idle worker holds a stack.
const streamWorkers = 64

// serve runs the server until ctx ends (SIGTERM), then drains.
func serve(ctx context.Context, cfg Config, e *env) error {
	// What the configuration names is read before the first log line, so
	// that a bad file fails the start with nothing but its error.
	hasher, err := newHasher(&cfg)
	if err != nil {
		return err
	}
	var routes *authz.Routes
	var routesFile []byte // as loaded, for watchRoutes to compare
	if cfg.RoutesFile != "" {
		if routesFile, err = os.ReadFile(cfg.RoutesFile); err == nil {
			routes, err = authz.ParseRoutes(routesFile, cfg.pathOptions())
		}
		if err != nil {
			return fmt.Errorf("EXTAUTHZ_ROUTES: %s: %w", cfg.RoutesFile, err)
		}
	}
	var certs *certReloader
	if cfg.TLS() {
		if certs, err = newCertReloader(certFiles{cfg.TLSCertFile, cfg.TLSKeyFile, cfg.TLSClientCAFile}); err != nil {
			return err
		}
	}

	// Bind everything first, so that a busy port (or a path that is not
	// a socket) fails the start with nothing but its error. Each listener
	// is closed by its server; this closes those that never served, and
	// removes their socket files.
	var bound []net.Listener
	defer func() {
		for _, l := range bound {
			l.Close()
		}
	}()
	bind := func(setting, addr string) (net.Listener, error) {
		l, err := listen(ctx, setting, addr)
		if err == nil {
			bound = append(bound, l)
		}
		return l, err
	}
	grpcLis, err := bind("EXTAUTHZ_GRPC_ADDR", cfg.GRPCAddr)
	if err != nil {
		return err
	}
	httpLis, err := bind("EXTAUTHZ_HTTP_ADDR", cfg.HTTPAddr)
	if err != nil {
		return err
	}
	adminLis, err := bind("EXTAUTHZ_ADMIN_ADDR", cfg.AdminAddr)
	if err != nil {
		return err
	}
	var healthLis net.Listener
	if cfg.HealthAddr != "" {
		if healthLis, err = bind("EXTAUTHZ_HEALTH_ADDR", cfg.HealthAddr); err != nil {
			return err
		}
	}

	log := newLogger(cfg.LogLevel, e.stderr)
	defer log.Sync()
	if cfg.Embedded() {
		log.Info("extauthz starting on the embedded default: file store "+cfg.FilePath()+
			", generated pepper in "+cfg.DataDir+", local cache only (set EXTAUTHZ_STORE and EXTAUTHZ_HMAC_SECRETS for production)",
			zap.String("version", version))
	} else {
		log.Info("extauthz starting", zap.String("version", version), zap.String("store", cfg.StoreDescription()), zap.String("redis", cfg.RedisDescription()))
	}
	if unknown := unknownSettings(e.environ); len(unknown) > 0 {
		log.Warn("ignoring unknown settings (misspelt?)", zap.Strings("names", unknown))
	}

	store, err := openStore(ctx, &cfg, log)
	if err != nil {
		return err
	}
	defer closeBounded(store, 2*time.Second, log)

	topts := tokens.Options{
		CacheSize: cfg.CacheSize, TTL: cfg.CacheTTL, NegativeTTL: cfg.NegativeTTL,
		MaxStale: cfg.MaxStale, StoreTimeout: cfg.StoreTimeout, MaxStoreLookups: cfg.StoreConcurrency, Logger: log.Named("tokens"),
	}
	var bus *rediscache.Bus
	uopts := tokens.UsageOptions{Interval: cfg.UsageInterval, MaxPending: cfg.UsageMaxPending, Logger: log.Named("usage")}
	if cfg.RedisURL != "" {
		rdb, err := rediscache.NewClient(cfg.RedisURL, cfg.RedisMode)
		if err != nil {
			return fmt.Errorf("EXTAUTHZ_REDIS_URL: %w", err)
		}
		defer rdb.Close()
		shared := rediscache.New(rdb, cfg.RedisPrefix).WithLogger(log.Named("redis"))
		// Entries and messages are sealed under the peppers, for this prefix.
		sealer := hasher.SharedSealer(cfg.RedisPrefix)
		topts.Shared, topts.SharedSealer, uopts.Gate = shared, sealer, shared
		bus = rediscache.NewBus(rdb, cfg.RedisPrefix, sealer, log.Named("redis"))
		if cfg.RedisMode == rediscache.ModeSentinel {
			if err := bus.FollowMaster(cfg.RedisURL); err != nil {
				return fmt.Errorf("EXTAUTHZ_REDIS_URL: %w", err)
			}
		}
	}
	usage := tokens.NewUsageRecorder(store, uopts)
	auth := tokens.NewAuthenticator(hasher, store, topts)
	var busRejected func() uint64
	if bus != nil {
		busRejected = bus.Rejected
	}
	reg, observer, lag := newMetrics(auth, usage, busRejected)
	registerUnknownPepper(reg, hasher)
	if certs != nil {
		reg.MustRegister(certs.collectors()...)
	}
	svc := authz.NewService(auth, authz.Options{
		Extractor:       tokens.NewExtractor(cfg.CredentialSources),
		Routes:          routes,
		Paths:           cfg.pathOptions(),
		Forwarded:       cfg.Forwarded,
		StripCredential: cfg.StripCredential,
		Realm:           cfg.Realm,
		Logger:          log.Named("authz"),
		Observer:        observer,
		Usage:           usage,
		ProtoCodec:      cfg.GRPCCodec == "proto",
		MaxHeaders:      cfg.MaxHeaders,
	})
	health := authz.NewHealth()

	grpcOpts := []grpc.ServerOption{
		// Long-lived workers instead of a goroutine per RPC: a fresh
		// goroutine outgrew its first stack on every check and the copy cost
		// 14% of the server's CPU under load (docs/BENCHMARKS.md). Streams
		// beyond the pool still get their own goroutine.
		grpc.NumStreamWorkers(streamWorkers),
		// A message over it is refused by gRPC (RESOURCE_EXHAUSTED) before
		// it is decoded: at most this much is held per check in flight.
		grpc.MaxRecvMsgSize(cfg.MaxRequestBytes),
		// Envoy may ping idle connections; don't punish it for that.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		// A connection has this long for its TLS handshake and HTTP/2
		// preface (grpc-go's default is 120 s of a held goroutine).
		grpc.ConnectionTimeout(handshakeTimeout),
	}
	var checkLis net.Listener = authz.HTTPListener(httpLis)
	if certs != nil {
		grpcOpts = append(grpcOpts, grpc.Creds(credentials.NewTLS(certs.serverConfig("h2"))))
		// TLS inside the wrapper: it must see the plaintext net/http writes.
		checkLis = authz.HTTPListener(tls.NewListener(httpLis, certs.serverConfig("http/1.1")))
	}
	grpcSrv := authz.NewGRPCServer(svc, health, grpcOpts...)
	if cfg.GRPCReflection {
		// For grpcurl and friends: it lists the services and their
		// messages, nothing a client of Check does not already know.
		reflection.Register(grpcSrv)
	}
	// The probe port: gRPC health and nothing else, in plaintext, for
	// callers that cannot present a certificate (the kubelet). Every other
	// method is refused before its request is read.
	var healthSrv *grpc.Server
	if healthLis != nil {
		healthSrv = authz.NewGRPCServer(svc, health, grpc.InTapHandle(healthOnly), grpc.ConnectionTimeout(handshakeTimeout))
	}
	httpSrv := boundedHTTPServer(health.HTTPHandler(svc.HTTPHandler(cfg.HTTPPrefix)), httpReadTimeout, 10*time.Second)
	adminMux := http.NewServeMux()
	adminMux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	if cfg.Pprof {
		// Off by default: profiles expose internals; the admin port should
		// not be reachable from outside the cluster anyway.
		adminMux.HandleFunc("/debug/pprof/", pprof.Index)
		adminMux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		adminMux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		adminMux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		adminMux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	adminMux.Handle("/", health.HTTPHandler(nil))
	// Long enough to write a 30 s CPU profile.
	adminSrv := boundedHTTPServer(adminMux, httpReadTimeout, time.Minute)

	bgCtx, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	var bg sync.WaitGroup
	errc := make(chan error, 4)
	for _, s := range []struct {
		srv *grpc.Server
		lis net.Listener
	}{{grpcSrv, grpcLis}, {healthSrv, healthLis}} {
		if s.srv == nil {
			continue
		}
		bg.Go(func() {
			if err := s.srv.Serve(s.lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				errc <- fmt.Errorf("grpc %s: %w", s.lis.Addr(), err)
			}
		})
	}
	for _, s := range []struct {
		srv *http.Server
		lis net.Listener
	}{{httpSrv, checkLis}, {adminSrv, adminLis}} {
		bg.Go(func() {
			if err := s.srv.Serve(s.lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("http %s: %w", s.lis.Addr(), err)
			}
		})
	}
	apply := func(c tokens.Change) {
		n := auth.Apply(bgCtx, c)
		if !c.SentAt.IsZero() {
			lag.Observe(c.Source, time.Since(c.SentAt))
		}
		if c.All {
			log.Warn("every key may have changed (a TRUNCATE, or changes missed that the change log no longer holds); dropped every cached decision",
				zap.String("source", c.Source), zap.Int("dropped", n))
			return
		}
		if c.Recovered {
			log.Info("caught up on key changes", zap.String("source", c.Source), zap.Int("changes", len(c.KeyIDs)), zap.Int("dropped", n))
			return
		}
		log.Debug("keys changed", zap.String("source", c.Source), zap.Strings("key_ids", c.KeyIDs), zap.Bool("added", c.Added), zap.Int("dropped", n))
	}
	if pg, ok := store.(*pgstore.Store); ok {
		pg.WatchHistory(auth.Remembers())
	}
	bg.Go(func() {
		if err := store.Watch(bgCtx, apply); err != nil && !errors.Is(err, context.Canceled) {
			log.Error("key store watch ended", zap.Error(err))
		}
	})
	if bus != nil {
		bg.Go(func() {
			if err := bus.Subscribe(bgCtx, apply); err != nil && !errors.Is(err, context.Canceled) {
				log.Error("redis invalidation subscription ended", zap.Error(err))
			}
		})
	}
	bg.Go(func() { watchReadiness(bgCtx, store, health, log) })
	if cfg.RoutesFile != "" {
		bg.Go(func() {
			watchRoutes(bgCtx, cfg.RoutesFile, routesFile, cfg.pathOptions(), svc, time.Second, log.Named("routes"))
		})
	}
	bg.Go(func() { watchUnknownPepper(bgCtx, hasher, 10*time.Second, log) })
	if certs != nil {
		bg.Go(func() { certs.watch(bgCtx, time.Second, log.Named("tls")) })
	}
	// Its final write happens when bgCtx ends: after the drain, so that
	// every check that finished is counted.
	bg.Go(func() { usage.Run(bgCtx, cfg.ShutdownTimeout) })
	if _, own := e.lookup("GOGC"); cfg.GCHeadroomMB > 0 && !own {
		bg.Go(func() { tuneGC(bgCtx, uint64(cfg.GCHeadroomMB)<<20, time.Second, log) })
	}

	addrs := boundAddrs{GRPC: grpcLis.Addr().String(), HTTP: httpLis.Addr().String(), Admin: adminLis.Addr().String()}
	if healthLis != nil {
		addrs.Health = healthLis.Addr().String()
	}
	transport := "plaintext"
	if certs != nil {
		transport = "tls"
		if cfg.TLSClientCAFile != "" {
			transport = "mtls"
		}
		log.Info("TLS certificate loaded", certs.fields()...)
	}
	log.Info("serving",
		zap.String("grpc", addrs.GRPC), zap.String("http", addrs.HTTP), zap.String("transport", transport),
		zap.String("admin", addrs.Admin), zap.String("health", addrs.Health), zap.String("http_check_prefix", cfg.HTTPPrefix),
		zap.Stringer("forwarded_headers", cfg.Forwarded), zap.Bool("keep_encoded_slashes", cfg.KeepEncodedSlashes),
		zap.Strings("credential_sources", cfg.CredentialSources))
	if e.ready != nil {
		e.ready(addrs)
	}

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down: health NOT_SERVING, draining in-flight checks")
	case runErr = <-errc:
		log.Error("server failed; shutting down", zap.Error(runErr))
	}

	// Health first, so that Envoy and Kubernetes stop sending before we
	// stop accepting.
	health.Shutdown()
	if cfg.ShutdownDelay > 0 {
		time.Sleep(cfg.ShutdownDelay)
	}
	health.CloseWatches()
	drained := make(chan struct{})
	go func() { grpcSrv.GracefulStop(); close(drained) }()
	shutCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	httpSrv.Shutdown(shutCtx)
	select {
	case <-drained:
	case <-shutCtx.Done():
		log.Warn("drain deadline passed; closing remaining connections", zap.Duration("timeout", cfg.ShutdownTimeout))
		grpcSrv.Stop()
	}
	adminSrv.Shutdown(shutCtx)
	if healthSrv != nil {
		healthSrv.Stop()
	}
	stopBG()
	bg.Wait()
	log.Info("stopped", zap.Uint64("usage_keys_written", usage.Written()), zap.Int("usage_keys_unwritten", usage.Pending()))
	return runErr
}

// healthOnly admits gRPC health calls alone (grpc.InTapHandle), before a
// stream's request is read.
func healthOnly(ctx context.Context, info *tap.Info) (context.Context, error) {
	if strings.HasPrefix(info.FullMethodName, "/grpc.health.v1.Health/") {
		return ctx, nil
	}
	return ctx, status.Error(codes.PermissionDenied, "this port serves grpc.health.v1.Health only")
}

// handshakeTimeout bounds a new gRPC connection's setup.
const handshakeTimeout = 10 * time.Second

// httpReadTimeout bounds the reading of a whole request, headers and body.
const httpReadTimeout = 10 * time.Second

// boundedHTTPServer is an HTTP server whose every connection is bounded:
// headers in 5 s (at most) and 64 KiB, the whole request (a body trickled
// in included: the handlers never read one, and net/http discards it
// after them) in read, the response in write, idle connections in 2
// minutes.
func boundedHTTPServer(h http.Handler, read, write time.Duration) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: min(5*time.Second, read),
		ReadTimeout:       read,
		WriteTimeout:      write,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
	}
}

// closeBounded closes the store but does not wait on it for long: after a
// store outage, pgx may hold closed connections for up to 15s while it
// tries to send cancel requests to an unresponsive server.
func closeBounded(store tokens.Store, bound time.Duration, log *zap.Logger) {
	done := make(chan struct{})
	go func() { store.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(bound):
		log.Warn("key store connections still closing; exiting without them", zap.Duration("waited", bound))
	}
}

// watchReadiness pings the store: not ready before the first success
// (and, for a store whose changes are notified, before its watch has
// caught up); after it, ready, saying whether the store is reachable and
// its change notifications alive, or checks are being served from cache.
func watchReadiness(ctx context.Context, store tokens.Store, h *authz.Health, log *zap.Logger) {
	listening := func() bool { return true }
	if l, ok := store.(interface{ Listening() bool }); ok {
		listening = l.Listening
	}
	contacted := false
	last := ""
	for {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := store.Ping(pctx)
		cancel()
		var state string
		switch {
		case err == nil && !listening() && contacted:
			state = "degraded: key change notifications interrupted; reconnecting, then catching up"
		case err == nil && !listening():
			state = "not ready: key change notifications not established yet"
		case err == nil:
			contacted = true
			state = "ok: key store reachable"
		case contacted:
			state = "degraded: key store unreachable; serving cached decisions"
		default:
			state = "not ready: no key store contact yet: " + storeProblem(err)
		}
		h.SetReady(contacted, state)
		// The log, for the operator, has the error itself.
		if now := state + fmt.Sprint(err); now != last {
			if err != nil {
				log.Warn("readiness changed", zap.String("state", state), zap.Error(err))
			} else {
				log.Info("readiness changed", zap.String("state", state))
			}
			last = now
		}
		wait := 2 * time.Second
		if !contacted {
			wait = 250 * time.Millisecond
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// storeProblem says what keeps the store from being used, for /readyz,
// which whoever reaches the HTTP port may read: never the error's text,
// which (pgx's) names the database user, database and host.
func storeProblem(err error) string {
	switch {
	case errors.Is(err, pgstore.ErrSchema):
		return "schema not migrated (run: extauthz migrate)"
	case errors.Is(err, context.DeadlineExceeded):
		return "the key store did not answer in time"
	}
	return "the key store is unreachable or unreadable (the log says why)"
}
