package testsvc

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Proxy forwards TCP connections to a target and can cut them all and
// refuse new ones, to simulate an outage of the server behind it, or
// freeze the open ones, to simulate a half-open connection.
type Proxy struct {
	target  string
	lis     net.Listener
	mu      sync.Mutex
	down    bool
	stalled bool // accept, then hold connections without forwarding
	conns   map[net.Conn]struct{}
	links   map[*link]struct{}
}

// link is one forwarded connection.
type link struct {
	in, out net.Conn
	frozen  atomic.Bool
}

// NewProxy listens on a loopback port and forwards to target until the
// test ends.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{target: target, lis: lis, conns: map[net.Conn]struct{}{}, links: map[*link]struct{}{}}
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

// Freeze stops forwarding on every open connection without closing it:
// bytes sent either way vanish, as on a connection a NAT or a load
// balancer forgot, or across a failover without a reset. Neither end
// notices until it expects an answer. New connections are forwarded as
// usual.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for l := range p.links {
		l.frozen.Store(true)
		delete(p.links, l)
	}
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
		l := &link{in: in, out: out}
		p.mu.Lock()
		p.links[l] = struct{}{}
		p.mu.Unlock()
		go l.pipe(out, in)
		go l.pipe(in, out)
	}
}

// pipe copies src to dst until either ends, dropping what it reads once
// the link is frozen.
func (l *link) pipe(dst, src net.Conn) {
	defer func() { src.Close(); dst.Close() }()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !l.frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
