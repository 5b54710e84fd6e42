package main

import (
	"bytes"
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/extauthz/extauthz/internal/authz"
)

// watchRoutes reloads the routes file when its content changes (checked
// every interval, which also sees a ConfigMap's symlink swap) or on
// SIGHUP. A file that no longer parses keeps the rules in force and is
// logged as an error; the next good version is put in force.
//
// loaded is the file as serve put it in force at start.
func watchRoutes(ctx context.Context, path string, loaded []byte, opts authz.PathOptions, svc *authz.Service, interval time.Duration, log *zap.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	last := loaded
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		forced := false
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-hup:
			forced = true
		}
		b, err := os.ReadFile(path)
		if err != nil {
			log.Error("routes file unreadable; the rules in force stay", zap.String("path", path), zap.Error(err))
			continue
		}
		if bytes.Equal(b, last) && !forced {
			continue
		}
		last = b
		routes, err := authz.ParseRoutes(b, opts)
		if err != nil {
			log.Error("routes file invalid; the rules in force stay", zap.String("path", path), zap.Error(err))
			continue
		}
		svc.SetRoutes(routes)
		log.Info("routes reloaded", zap.String("path", path), zap.Int("rules", routes.Len()))
	}
}
