package authz

import (
	"bytes"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// A request line Go's HTTP server cannot parse (GET /check/% HTTP/1.1: an
// invalid percent-encoding, or a control byte) never reaches a handler:
// net/http writes a plain-text 400 straight to the connection and closes
// it at once. A client still sending the rest of its request then gets a
// connection reset, which may also destroy the 400 before it is read, and
// Envoy reports a reset as an error instead of a denial.
//
// HTTPListener wraps the HTTP check listener to fix both: it replaces that
// reply with the deny body of a malformed path, and closes such a
// connection gracefully (RFC 9112 section 9.6): it sends FIN, then reads
// and discards what the client still sends, for a bounded time and
// amount, before closing.

// goBadRequest is net/http's reply to a request it cannot parse (server.go,
// conn.serve), written in one Write on the raw connection.
var goBadRequest = []byte("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request")

// Every 400 net/http writes by itself, including those that name a header
// problem ("400 Bad Request: missing required Host header"), starts with
// goBadRequestPrefix and has goErrorHeaders, and is followed by a close. A
// handler's 400 has a Date header between the two, and stays open.
var (
	goBadRequestPrefix = []byte("HTTP/1.1 400 Bad Request")
	goErrorHeaders     = []byte("\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n")
)

// malformedPathReply is the denial of a path that cannot be judged, as the
// handler would write it, closing the connection.
var malformedPathReply = []byte("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: " +
	strconv.Itoa(len(DenyBody(MalformedPath))) + "\r\nConnection: close\r\n\r\n" + DenyBody(MalformedPath))

// Bounds on a graceful close: it never holds a connection longer or reads
// more than this.
const (
	lingerTimeout = time.Second
	lingerBytes   = 256 << 10
)

// HTTPListener returns l with the replies and closes above. Connections
// net/http answers normally are untouched.
func HTTPListener(l net.Listener) net.Listener { return listener{l} }

type listener struct{ net.Listener }

func (l listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &lingerConn{Conn: c}, nil
}

type lingerConn struct {
	net.Conn
	// linger is set when net/http rejected a request; Close then drains.
	// Write runs on the connection's goroutine, Close also on others
	// (Server.Shutdown), hence atomic.
	linger atomic.Bool
	once   sync.Once
}

func (c *lingerConn) Write(p []byte) (int, error) {
	if !bytes.HasPrefix(p, goBadRequestPrefix) || !bytes.Contains(p, goErrorHeaders) {
		return c.Conn.Write(p)
	}
	c.linger.Store(true)
	if !bytes.Equal(p, goBadRequest) {
		return c.Conn.Write(p)
	}
	if _, err := c.Conn.Write(malformedPathReply); err != nil {
		return 0, err
	}
	return len(p), nil
}

// CloseWrite keeps net/http's own graceful close (for a 431) working.
func (c *lingerConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (c *lingerConn) Close() error {
	if !c.linger.Load() {
		return c.Conn.Close()
	}
	// In the background: Close must not block a caller such as
	// Server.Shutdown, which closes connections one after another.
	c.once.Do(func() {
		c.CloseWrite()
		go func() {
			c.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
			io.CopyN(io.Discard, c.Conn, lingerBytes)
			c.Conn.Close()
		}()
	})
	return nil
}
