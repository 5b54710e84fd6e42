// Command loadgen drives an Envoy ext_authz v3 gRPC server closed-loop:
// -c workers over one HTTP/2 connection, each sending its next Check as
// soon as the previous answer arrives. Requests are marshalled once, one
// per bench key, and sent as raw bytes (a pass-through codec), so the
// client costs little and the server, not the client, sets the pace.
// Workers cycle through all keys, so a server's cache sees them all.
//
// It prints one line: rps, p50/p90/p99 latency in ms, errors (RPCs that
// failed), denied (answers that were not OK), count.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/extauthz/extauthz/bench/benchkeys"
)

// rawCodec sends and receives pre-encoded bytes.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// request is the Check an Envoy HTTP filter sends for an API call.
func request(i int) []byte {
	h := map[string]string{
		":authority": "api.example.com", ":method": "GET", ":path": "/v1/orders?id=7", ":scheme": "https",
		"authorization": "Bearer " + benchkeys.Token(i), "accept": "application/json",
		"content-type": "application/json", "user-agent": "loadgen/1", "x-request-id": fmt.Sprintf("req-%d", i),
		"x-forwarded-for": "10.0.0.1", "x-forwarded-proto": "https", "x-envoy-expected-rq-timeout-ms": "200",
	}
	r := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		ContextExtensions: map[string]string{"virtual_host": "api"},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: fmt.Sprint(i), Method: "GET", Path: "/v1/orders?id=7", Host: "api.example.com",
			Scheme: "https", Protocol: "HTTP/1.1", Headers: h,
		}},
	}}
	b, err := proto.Marshal(r)
	if err != nil {
		panic(err)
	}
	return b
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9001", "server")
	c := flag.Int("c", 16, "concurrent requests in flight")
	d := flag.Duration("d", 10*time.Second, "duration of the measured run")
	n := flag.Int("keys", benchkeys.DefaultCount, "bench keys to cycle through")
	warm := flag.Bool("warm", false, "send every key once (c at a time) and exit, to fill caches")
	label := flag.String("label", "", "label printed first")
	export := flag.Bool("export-keys", false, "print the bench keys as `extauthz keys import` lines and exit")
	summarize := flag.Bool("summarize", false, "read result lines on stdin, print medians and ratios to noop and ideal")
	flag.Parse()
	if *export {
		for i := range *n {
			fmt.Printf("{\"token\":%q,\"tenant_id\":%q,\"name\":\"bench-%d\"}\n", benchkeys.Token(i), benchkeys.Tenant(i), i)
		}
		return
	}
	if *summarize {
		summary(os.Stdin, os.Stdout)
		return
	}

	reqs := make([][]byte, *n)
	for i := range reqs {
		reqs[i] = request(i)
	}
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	defer conn.Close()
	const method = "/envoy.service.auth.v3.Authorization/Check"

	var next atomic.Int64
	var errs, denied atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	stop := time.Now().Add(*d)
	var wg sync.WaitGroup
	for range *c {
		wg.Go(func() {
			local := make([]time.Duration, 0, 1<<16)
			var resp authv3.CheckResponse
			var out []byte
			for {
				i := next.Add(1) - 1
				if *warm && i >= int64(*n) || !*warm && time.Now().After(stop) {
					break
				}
				in := reqs[i%int64(*n)]
				t0 := time.Now()
				if err := conn.Invoke(context.Background(), method, &in, &out); err != nil {
					errs.Add(1)
					continue
				}
				local = append(local, time.Since(t0))
				resp.Reset()
				if proto.Unmarshal(out, &resp) != nil || resp.GetStatus() == nil || resp.GetStatus().GetCode() != 0 {
					denied.Add(1)
				}
			}
			mu.Lock()
			lat = append(lat, local...)
			mu.Unlock()
		})
	}
	start := time.Now()
	wg.Wait()
	elapsed := time.Since(start)
	if *warm {
		fmt.Printf("warmed %d keys in %v, errors=%d denied=%d\n", *n, elapsed.Round(time.Millisecond), errs.Load(), denied.Load())
		return
	}
	slices.Sort(lat)
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
	}
	fmt.Printf("label=%s c=%d rps=%.0f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f errors=%d denied=%d count=%d\n",
		*label, *c, float64(len(lat))/elapsed.Seconds(), pct(0.50), pct(0.90), pct(0.99), errs.Load(), denied.Load(), len(lat))
}
