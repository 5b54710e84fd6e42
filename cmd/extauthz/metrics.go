package main

import (
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/extauthz/extauthz/internal/authz"
	"github.com/extauthz/extauthz/internal/tokens"
)

// checkObserver records decisions into pre-resolved Prometheus series, so
// the hot path does no label lookup.
type checkObserver struct {
	count [16]prometheus.Counter
	dur   [16]prometheus.Observer
}

func (o *checkObserver) Observe(r authz.Reason, d time.Duration) {
	o.count[r].Inc()
	o.dur[r].Observe(d.Seconds())
}

// lagObserver records how long key changes took to reach this replica.
type lagObserver struct{ h *prometheus.HistogramVec }

func (l lagObserver) Observe(source string, d time.Duration) {
	l.h.WithLabelValues(source).Observe(max(d, 0).Seconds())
}

// newMetrics builds a registry (no global state) with the check metrics,
// the lookup chain's counters, and the Go runtime and process collectors.
// busRejected counts dropped invalidation messages; nil without Redis.
func newMetrics(a *tokens.Authenticator, u *tokens.UsageRecorder, busRejected func() uint64) (*prometheus.Registry, *checkObserver, lagObserver) {
	reg := prometheus.NewRegistry()
	checks := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "extauthz_checks_total",
		Help: "Checks by result (allow, deny, error) and reason.",
	}, []string{"result", "reason"})
	latency := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "extauthz_check_duration_seconds",
		Help:    "Time to decide a check, by result.",
		Buckets: prometheus.ExponentialBuckets(10e-6, 2.5, 12), // 10µs .. ~600ms
	}, []string{"result"})
	reg.MustRegister(checks, latency)
	o := &checkObserver{}
	for _, r := range authz.Reasons() {
		o.count[r] = checks.WithLabelValues(r.Result(), r.String())
		o.dur[r] = latency.WithLabelValues(r.Result())
	}

	st := a.Stats()
	counter := func(name, help string, f func() uint64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help},
			func() float64 { return float64(f()) }))
	}
	cacheLookups := func(result string, f func() uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "extauthz_cache_lookups_total", Help: "In-process cache lookups by result.",
			ConstLabels: prometheus.Labels{"result": result},
		}, func() float64 { return float64(f()) })
	}
	reg.MustRegister(
		cacheLookups("hit", st.CacheHits.Load),
		cacheLookups("negative_hit", st.CacheNegativeHits.Load),
		cacheLookups("miss", st.CacheMisses.Load),
	)
	counter("extauthz_cache_stale_served_total", "Cached decisions served past their TTL because the key store was down.", st.StaleServed.Load)
	counter("extauthz_cache_evictions_total", "Entries evicted to keep the cache within EXTAUTHZ_CACHE_SIZE.", a.Cache().Evictions)
	counter("extauthz_cache_invalidations_total", "Cached decisions dropped because their key changed.", st.Invalidated.Load)
	counter("extauthz_store_lookups_total", "Key store lookups (cache misses that reached the store).", st.StoreLookups.Load)
	counter("extauthz_store_errors_total", "Key store lookups that failed.", st.StoreErrors.Load)
	counter("extauthz_store_lookups_shed_total", "Cache misses not looked up because EXTAUTHZ_STORE_CONCURRENCY lookups were in flight (answered as an outage, or from a stale decision).", st.StoreShed.Load)
	counter("extauthz_singleflight_shared_total", "Cache misses that joined a store lookup already in flight.", st.SharedLookups.Load)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "extauthz_cache_entries", Help: "Decisions held in the in-process cache.",
	}, func() float64 { return float64(a.Cache().Len()) }))
	counter("extauthz_shared_cache_hits_total", "Misses answered by the shared (Redis) tier.", st.SharedHits.Load)
	counter("extauthz_shared_cache_misses_total", "Misses the shared tier did not hold.", st.SharedMisses.Load)
	counter("extauthz_shared_cache_errors_total", "Shared-tier calls that failed (checks went on without it).", st.SharedErrors.Load)
	counter("extauthz_shared_cache_skipped_total", "Shared-tier calls skipped because it failed within the last second.", st.SharedSkipped.Load)
	counter("extauthz_shared_cache_outdated_total", "Shared-tier entries not used because they were made of a key state older than a change this replica knows of (a revocation Redis missed, or an entry put back); each was deleted.", st.SharedOutdated.Load)
	counter("extauthz_shared_cache_rejected_total", "Shared-tier entries not used because no replica of this deployment wrote them (forged, altered, copied to another key) or they hold invalid fields; each was deleted.", st.SharedRejected.Load)
	if busRejected == nil {
		busRejected = func() uint64 { return 0 }
	}
	counter("extauthz_invalidation_messages_rejected_total", "Redis invalidation messages dropped: not sealed by a replica of this deployment, altered, outside the time window, or replayed.", busRejected)
	counter("extauthz_lookups_uncached_total", "Lookups not cached because an invalidation overlapped them.", st.Uncached.Load)
	counter("extauthz_usage_keys_written_total", "Per-key usage rows written (last_used_at, request_count).", u.Written)
	counter("extauthz_usage_write_failures_total", "Usage batch writes that failed (kept for the next write).", u.Failed)
	counter("extauthz_usage_dropped_total", "Requests not counted because EXTAUTHZ_USAGE_MAX_PENDING keys were pending.", u.Dropped)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "extauthz_usage_pending_keys", Help: "Keys with usage not yet written.",
	}, func() float64 { return float64(u.Pending()) }))
	lag := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "extauthz_invalidation_lag_seconds",
		Help:    "Time from a key change (revoke, delete, update) to this replica applying it, by path (postgres, redis, file).",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14), // 0.5ms .. ~4s
	}, []string{"source"})
	reg.MustRegister(lag)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "extauthz_build_info", Help: "Always 1; the labels name the running build.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	}, func() float64 { return 1 }))
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg, o, lagObserver{lag}
}
