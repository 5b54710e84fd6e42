package main

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"

	"go.uber.org/zap"
)

// The garbage collector's pace is set by GOGC relative to the live heap:
// at the default 100, a server whose live heap is a few tens of MB (the
// cache of 100,000 keys) collects several times a second, and requests
// that arrive during a mark phase make up the latency tail (p99 at c=16
// 1.9x the no-op server's at GOGC=100, 1.2x at 400; with 128 MB of
// headroom 1.1-1.25x, with 512 MB 0.93-0.99x; see docs/BENCHMARKS.md). So
// the server keeps at least a fixed headroom of allocation between
// collections: GOGC is raised while the live heap is small, and is back at
// 100 from live = headroom upward. An operator's own GOGC is left alone,
// and GOMEMLIMIT still bounds the heap as usual.

// gcPercentFor is the GOGC that gives headroom bytes between the live heap
// and the next collection, never below 100 (the default) nor above 10,000.
func gcPercentFor(live, headroom uint64) int {
	if live == 0 {
		live = 1
	}
	p := headroom * 100 / live
	switch {
	case p < 100:
		return 100
	case p > 10000:
		return 10000
	}
	return int(p)
}

const liveHeapMetric = "/gc/heap/live:bytes"

// tuneGC adjusts GOGC every interval until ctx ends.
func tuneGC(ctx context.Context, headroom uint64, interval time.Duration, log *zap.Logger) {
	sample := []metrics.Sample{{Name: liveHeapMetric}}
	last := -1
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		metrics.Read(sample)
		if sample[0].Value.Kind() == metrics.KindUint64 {
			if p := gcPercentFor(sample[0].Value.Uint64(), headroom); p != last {
				debug.SetGCPercent(p)
				if last == -1 {
					log.Info("gc headroom", zap.Uint64("headroom_bytes", headroom), zap.Int("gogc", p))
				}
				last = p
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
