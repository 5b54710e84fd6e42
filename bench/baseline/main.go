// Command baseline is the yardstick extauthz is measured against: an Envoy
// ext_authz v3 gRPC server that does either nothing (-mode noop: OK with one
// header, the floor of the gRPC stack) or the honest minimum of an API-key
// check on a cache hit (-mode ideal: read authorization, parse Bearer,
// HMAC-SHA256 under a pepper, look the digest up in a map, answer OK with
// x-tenant-id set with overwrite semantics, or 401).
package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"flag"
	"fmt"
	"hash"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/extauthz/extauthz/bench/benchkeys"
)

type server struct {
	authv3.UnimplementedAuthorizationServer
	ideal  bool
	pepper []byte
	keys   map[[32]byte]string // digest -> tenant
	pool   sync.Pool
}

func ok(tenant string) *authv3.CheckResponse {
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(codes.OK)},
		HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
			Headers: []*corev3.HeaderValueOption{{
				Header:       &corev3.HeaderValue{Key: "x-tenant-id", Value: tenant},
				AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
			}},
		}},
	}
}

func deny() *authv3.CheckResponse {
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(codes.Unauthenticated)},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status: &typev3.HttpStatus{Code: typev3.StatusCode_Unauthorized},
		}},
	}
}

func (s *server) Check(_ context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	if !s.ideal {
		return ok("noop"), nil
	}
	v := req.GetAttributes().GetRequest().GetHttp().GetHeaders()["authorization"]
	if len(v) < 8 || !strings.EqualFold(v[:7], "bearer ") {
		return deny(), nil
	}
	h := s.pool.Get().(hash.Hash)
	h.Reset()
	h.Write([]byte(strings.TrimSpace(v[7:])))
	var d [32]byte
	h.Sum(d[:0])
	s.pool.Put(h)
	tenant, found := s.keys[d]
	if !found {
		return deny(), nil
	}
	return ok(tenant), nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9191", "listen address")
	mode := flag.String("mode", "noop", "noop or ideal")
	n := flag.Int("keys", benchkeys.DefaultCount, "bench keys (ideal mode)")
	flag.Parse()
	if *mode != "noop" && *mode != "ideal" {
		fmt.Fprintln(os.Stderr, "baseline: -mode must be noop or ideal")
		os.Exit(2)
	}
	s := &server{ideal: *mode == "ideal", pepper: []byte(benchkeys.Pepper), keys: map[[32]byte]string{}}
	s.pool.New = func() any { return hmac.New(sha256.New, s.pepper) }
	for i := range *n {
		m := hmac.New(sha256.New, s.pepper)
		m.Write([]byte(benchkeys.Token(i)))
		var d [32]byte
		m.Sum(d[:0])
		s.keys[d] = benchkeys.Tenant(i)
	}
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer()
	authv3.RegisterAuthorizationServer(srv, s)
	go func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM, os.Interrupt)
		<-ch
		srv.Stop()
	}()
	log.Printf("baseline: mode=%s keys=%d addr=%s", *mode, len(s.keys), lis.Addr())
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
