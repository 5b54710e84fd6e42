package main

import (
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

// newMetrics builds a registry (no global state) with the check metrics,
// the lookup chain's counters, and the Go runtime and process collectors.
func newMetrics(a *tokens.Authenticator) (*prometheus.Registry, *checkObserver) {
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
	counter("extauthz_singleflight_shared_total", "Cache misses that joined a store lookup already in flight.", st.SharedLookups.Load)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "extauthz_cache_entries", Help: "Decisions held in the in-process cache.",
	}, func() float64 { return float64(a.Cache().Len()) }))
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg, o
}
