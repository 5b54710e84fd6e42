package authz

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"testing"
)

// A handler's own 400 (the one a malformed path will get) is the
// handler's: not rewritten, and the connection stays open for the next.
func TestHTTPListenerLeavesHandlerRepliesAlone(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("content-type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, "400 Bad Request")
	})}
	go srv.Serve(HTTPListener(l))
	t.Cleanup(func() { srv.Close() })
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	for i := range 2 {
		if _, err := io.WriteString(conn, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n"); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 400 || string(body) != "400 Bad Request" || resp.Close {
			t.Fatalf("response %d: %d %q close=%v", i, resp.StatusCode, body, resp.Close)
		}
	}
}
