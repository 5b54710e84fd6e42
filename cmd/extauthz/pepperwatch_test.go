package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/extauthz/extauthz/internal/tokens"
)

func TestWatchUnknownPepperLogsOncePerInterval(t *testing.T) {
	t.Parallel()
	h, err := tokens.NewHasher([]tokens.Pepper{{ID: "new", Secret: []byte(strings.Repeat("n", 32))}})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.WarnLevel)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { watchUnknownPepper(ctx, h, 20*time.Millisecond, zap.New(core)); close(done) }()
	h.Verify("", "dummy", nil) // an unknown key's dummy check: not a pepper mistake
	for range 5 {
		h.Verify("old", "secret", []byte("digest"))
	}
	deadline := time.Now().Add(10 * time.Second)
	for logs.Len() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // a few more intervals: no new uses, no new line
	cancel()
	<-done
	entries := logs.All()
	if len(entries) != 1 {
		t.Fatalf("%d log lines, want 1", len(entries))
	}
	f := entries[0].ContextMap()
	if f["pepper_id"] != "old" || f["checks"] != uint64(5) || !strings.Contains(entries[0].Message, "EXTAUTHZ_HMAC_SECRETS") {
		t.Errorf("log: %q %v", entries[0].Message, f)
	}
	if n, id := h.UnknownPepper(); n != 5 || id != "old" {
		t.Errorf("UnknownPepper = %d, %q", n, id)
	}
}
