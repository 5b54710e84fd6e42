package testsvc

import (
	"io"
	"net"
	"sync"
	"testing"
)

// Proxy forwards TCP connections to a target and can cut them all and
// refuse new ones, to simulate an outage of the server behind it.
type Proxy struct {
	target  string
	lis     net.Listener
	mu      sync.Mutex
	down    bool
	stalled bool // accept, then hold connections without forwarding
	conns   map[net.Conn]struct{}
}

// NewProxy listens on a loopback port and forwards to target until the
// test ends.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{target: target, lis: lis, conns: map[net.Conn]struct{}{}}
	go p.serve()
	t.Cleanup(func() { lis.Close(); p.Cut() })
	return p
}

// Addr is the proxy's host:port.
func (p *Proxy) Addr() string { return p.lis.Addr().String() }

// Cut closes every connection and refuses new ones until Restore.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
		delete(p.conns, c)
	}
}

// Stall closes every connection and then accepts new ones without ever
// forwarding a byte: a black hole, which only deadlines get out of.
func (p *Proxy) Stall() {
	p.Cut()
	p.mu.Lock()
	p.down, p.stalled = false, true
	p.mu.Unlock()
}

// Restore forwards connections again.
func (p *Proxy) Restore() {
	p.mu.Lock()
	p.down, p.stalled = false, false
	p.mu.Unlock()
}

func (p *Proxy) isStalled() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stalled
}

func (p *Proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.down {
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *Proxy) serve() {
	for {
		in, err := p.lis.Accept()
		if err != nil {
			return
		}
		if p.isStalled() {
			p.track(in)
			continue
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil || !p.track(in, out) {
			in.Close()
			if out != nil {
				out.Close()
			}
			continue
		}
		go func() { io.Copy(out, in); out.Close(); in.Close() }()
		go func() { io.Copy(in, out); in.Close(); out.Close() }()
	}
}
