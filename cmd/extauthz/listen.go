package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// socketMode is the mode of a Unix socket: the server's user and group
// (Envoy in the same pod, sharing a group or fsGroup) may connect, nobody
// else.
const socketMode = 0o660

// listen binds addr: host:port, or unix:<path> for a sidecar next to
// Envoy. An error names setting.
func listen(ctx context.Context, setting, addr string) (net.Listener, error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		var lc net.ListenConfig
		l, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", setting, err)
		}
		return l, nil
	}
	l, err := listenUnix(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", setting, err)
	}
	return l, nil
}

// listenUnix creates the socket at path with socketMode, and removes it
// when the listener closes.
//
// The socket is bound under a temporary name in the same directory,
// given its mode, then renamed into place: no client can connect while it
// still has the umask's mode, and a stale socket left by a crashed run is
// replaced in one step. What is at path must be a socket nobody answers
// on: a live one belongs to another server, and anything else (a file a
// typo named) is never removed.
func listenUnix(ctx context.Context, path string) (net.Listener, error) {
	if err := checkStaleSocket(ctx, path); err != nil {
		return nil, err
	}
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+"."+strconv.Itoa(os.Getpid())+".tmp")
	os.Remove(tmp) // ours, from a run with the same pid (a container restart)
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "unix", tmp)
	if err != nil {
		// Named by the path configured, not the temporary one.
		var se *os.SyscallError
		if errors.As(err, &se) {
			err = se.Err
		}
		return nil, fmt.Errorf("%s: bind: %w", path, err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false) // the file's name changes below; Close removes it
	fail := func(err error) (net.Listener, error) {
		ul.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := os.Chmod(tmp, socketMode); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &unixListener{UnixListener: ul, path: path, fi: fi}, nil
}

// checkStaleSocket returns nil when path is free or holds a socket no
// server answers on.
func checkStaleSocket(ctx context.Context, path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket (%s); refusing to replace it", path, fi.Mode().Type())
	}
	d := net.Dialer{Timeout: time.Second}
	c, err := d.DialContext(ctx, "unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: another server is listening on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: cannot tell whether it is in use: %w", path, err)
	}
	return nil // stale: the rename replaces it
}

// unixListener removes its socket file when closed, unless another
// process has since put its own there.
type unixListener struct {
	*net.UnixListener
	path string
	fi   os.FileInfo
	once sync.Once
}

// Addr is the socket's path, not the temporary name it was bound under.
func (l *unixListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	l.once.Do(func() {
		if fi, serr := os.Lstat(l.path); serr == nil && os.SameFile(fi, l.fi) {
			os.Remove(l.path)
		}
	})
	return err
}
