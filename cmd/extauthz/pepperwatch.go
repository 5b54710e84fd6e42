package main

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/extauthz/extauthz/internal/tokens"
)

// registerUnknownPepper counts keys presented that were made with a
// pepper this server does not hold.
func registerUnknownPepper(reg *prometheus.Registry, h *tokens.Hasher) {
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "extauthz_unknown_pepper_total",
		Help: "Checks of stored keys made with a pepper missing from EXTAUTHZ_HMAC_SECRETS (denied as invalid_credential).",
	}, func() float64 { n, _ := h.UnknownPepper(); return float64(n) }))
}

// watchUnknownPepper logs, at most once per interval, that keys made with
// a pepper this server does not hold were presented: they are denied as a
// wrong secret would be, and the log names the pepper to add.
func watchUnknownPepper(ctx context.Context, h *tokens.Hasher, interval time.Duration, log *zap.Logger) {
	var seen uint64
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, id := h.UnknownPepper()
		if n == seen {
			continue
		}
		log.Warn("keys made with a pepper this server does not hold were denied: add it to EXTAUTHZ_HMAC_SECRETS (after the current one) on every replica",
			zap.String("pepper_id", id), zap.Uint64("checks", n-seen))
		seen = n
	}
}
