package main

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"

	"go.uber.org/zap"
)

func TestGCPercentFor(t *testing.T) {
	t.Parallel()
	const mb = 1 << 20
	for _, tc := range []struct {
		live, headroom uint64
		want           int
	}{
		{36 * mb, 128 * mb, 355}, // the 100,000-key cache
		{128 * mb, 128 * mb, 100},
		{400 * mb, 128 * mb, 100}, // never below the default
		{1 * mb, 128 * mb, 10000}, // nor above 10,000
		{0, 128 * mb, 10000},
	} {
		if got := gcPercentFor(tc.live, tc.headroom); got != tc.want {
			t.Errorf("gcPercentFor(%d MB, %d MB) = %d, want %d", tc.live/mb, tc.headroom/mb, got, tc.want)
		}
	}
}

// tuneGC raises GOGC for a live heap far below the headroom.
func TestTuneGC(t *testing.T) {
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tuneGC(ctx, 1<<40, time.Millisecond, zap.NewNop()); close(done) }()
	defer func() { cancel(); <-done }()
	sample := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		metrics.Read(sample)
		if sample[0].Value.Uint64() == 10000 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("GOGC = %d, want 10000 for a 1 TiB headroom", sample[0].Value.Uint64())
		}
	}
}
