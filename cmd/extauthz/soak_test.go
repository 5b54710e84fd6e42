package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/extauthz/extauthz/internal/testsvc"
)

// TestSoak is issue 10's soak: replicas under a steady load while the
// faults of the issue are cycled, with revocations (SQL and CLI) during
// each. It runs only when EXTAUTHZ_SOAK is set (`make soak`), for
// SOAK_DURATION (default 10m), and writes its report to SOAK_REPORT when
// set. It fails if a revoked key is allowed past its deadline.
//
// Settings (environment): SOAK_DURATION, SOAK_REPLICAS (2), SOAK_RATE
// (checks per second over all replicas, 300), SOAK_WORKERS (16),
// SOAK_KEYS (valid keys at the start, 120), SOAK_FAULTS (only the faults
// whose name contains this), SOAK_LOGS (a directory to write each
// replica's log to at the end).
func TestSoak(t *testing.T) {
	if os.Getenv("EXTAUTHZ_SOAK") == "" {
		t.Skip("the soak runs with `make soak` (EXTAUTHZ_SOAK=1)")
	}
	s := newSoak(t)
	s.run()
	s.report()
	s.saveLogs()
	if n := s.violations(); n > 0 {
		t.Fatalf("%d allows of revoked keys past their deadline", n)
	}
}

// soakGrace is how long a revocation may take to reach every replica
// before an allow counts against it: SPEC §4's second.
const soakGrace = time.Second

// envoyBudget is the ext_authz timeout of envoy/envoy.yaml: a check
// answered later than this fails at Envoy all the same.
const envoyBudget = 200 * time.Millisecond

func soakEnv[T any](t *testing.T, name string, def T, parse func(string) (T, error)) T {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	x, err := parse(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return x
}

func atoi(s string) (int, error) {
	var n int
	_, err := fmt.Sscan(s, &n)
	return n, err
}

type soakKey struct{ id, cred string }

// soakReplica is a replica with its own proxies to Postgres and Redis.
type soakReplica struct {
	srv   *server
	authz authv3.AuthorizationClient
	pg    *testsvc.Proxy
	redis *testsvc.Proxy
}

// revoked is a revoked key: allows of it started after deadline are
// violations; allows started after committed are late.
type revoked struct {
	cred, how, fault string
	committed        time.Time
	deadline         atomic.Int64 // unix nanos; moved out while the replicas cannot learn of it
	lastAllow        atomic.Int64 // latest allowed check's start, unix nanos
}

// phaseStats counts what happened during one fault (or steady run).
type phaseStats struct {
	kind                       string
	start, end                 time.Time
	valid, validOK, validDeny  atomic.Int64
	validFail, validSlow       atomic.Int64
	revokedChecks, lateAllows  atomic.Int64
	strictLate                 atomic.Int64 // allowed more than soakGrace after the commit, exceptions included
	worstLate                  atomic.Int64 // the latest allow's start after its revoke committed, nanoseconds
	violations                 atomic.Int64
	junk, junkAllow, junkFail  atomic.Int64
	otherFail                  atomic.Int64 // failed checks of revoked or junk keys
	lookups, storeErr, revokes int
	failCodes                  sync.Map // codes.Code → *atomic.Int64
}

func (p *phaseStats) fail(code codes.Code) {
	v, _ := p.failCodes.LoadOrStore(code, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

type soak struct {
	t        *testing.T
	c        *cluster
	rs       []*soakReplica
	duration time.Duration
	rate     int
	workers  int

	mu      sync.Mutex
	valid   []soakKey
	revoked []*revoked
	gone    map[string]bool // credentials taken out of valid to be revoked
	// unlearnable are revocations made while the replicas could not hear
	// of them (Postgres cut off, and for the CLI Redis too); their
	// deadline is set when the fault ends.
	unlearnable []*revoked

	phase   atomic.Pointer[phaseStats]
	phases  []*phaseStats
	samples []string       // the first violations of each fault, for the report
	sampled map[string]int // samples per fault
	log     strings.Builder
}

func newSoak(t *testing.T) *soak {
	s := &soak{
		t:        t,
		duration: soakEnv(t, "SOAK_DURATION", 10*time.Minute, time.ParseDuration),
		rate:     soakEnv(t, "SOAK_RATE", 300, atoi),
		workers:  soakEnv(t, "SOAK_WORKERS", 16, atoi),
		gone:     map[string]bool{},
		sampled:  map[string]int{},
	}
	replicas := soakEnv(t, "SOAK_REPLICAS", 2, atoi)
	keys := soakEnv(t, "SOAK_KEYS", 120, atoi)
	s.c = newCluster(t, true)
	// The product's store timeout, not the test suite's lenient 1s.
	delete(s.c.env, "EXTAUTHZ_STORE_TIMEOUT")
	for range keys {
		s.valid = append(s.valid, s.createKey())
	}
	redisAddr := strings.TrimPrefix(strings.TrimSuffix(testsvc.RedisURL(), "/0"), "redis://")
	for range replicas {
		r := &soakReplica{pg: testsvc.NewProxy(t, "127.0.0.1:5432"), redis: testsvc.NewProxy(t, redisAddr)}
		rc := withEnv(s.c.cli, "EXTAUTHZ_STORE", proxiedDSN(t, s.c.dsn, r.pg.Addr()),
			"EXTAUTHZ_REDIS_URL", "redis://"+r.redis.Addr()+"/0", "EXTAUTHZ_LOG_LEVEL", "info")
		r.srv = startReplica(t, rc).srv
		r.authz, _ = r.srv.client(t)
		s.rs = append(s.rs, r)
	}
	s.logf("soak: %v, %d replicas (each through its own Postgres and Redis proxies), %d checks/s by %d workers, %d valid keys at start",
		s.duration, replicas, s.rate, s.workers, keys)
	return s
}

func (s *soak) logf(format string, args ...any) {
	line := time.Now().UTC().Format("15:04:05.000") + " " + fmt.Sprintf(format, args...)
	s.t.Log(line)
	s.mu.Lock()
	s.log.WriteString(line + "\n")
	s.mu.Unlock()
}

func (s *soak) createKey() soakKey {
	k := s.c.ok("", "keys", "create", "--tenant", "soak")[0]
	return soakKey{k["id"].(string), k["credential"].(string)}
}

// run drives the load and the fault cycle until the duration ends.
func (s *soak) run() {
	// An interrupt ends the soak early, with its report and cleanup
	// (databases, Redis prefixes, replicas), rather than killing it.
	sig, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(sig, s.duration)
	defer cancel()
	s.begin("steady")
	var wg sync.WaitGroup
	jobs := make(chan struct{}, s.workers)
	wg.Go(func() {
		defer close(jobs)
		tick := time.NewTicker(time.Second / time.Duration(s.rate))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				select {
				case jobs <- struct{}{}:
				default: // the workers are behind: drop, the rate is a ceiling
				}
			}
		}
	})
	for w := range s.workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			for range jobs {
				s.checkOne(rng)
			}
		})
	}
	s.cycle(ctx)
	wg.Wait()
	s.end()
	if sig.Err() != nil {
		s.logf("interrupted: the soak ended early")
	}
}

// checkOne checks a valid key (70 %), a revoked one (20 %) or junk (10 %)
// on a random replica and records the outcome in the current phase.
func (s *soak) checkOne(rng *rand.Rand) {
	p := s.phase.Load()
	r := s.rs[rng.IntN(len(s.rs))]
	var cred string
	var rv *revoked
	s.mu.Lock()
	switch n := rng.IntN(10); {
	case n < 7 && len(s.valid) > 0:
		cred = s.valid[rng.IntN(len(s.valid))].cred
	case n < 9 && len(s.revoked) > 0:
		rv = s.revoked[rng.IntN(len(s.revoked))]
		cred = rv.cred
	default:
		cred = fmt.Sprintf("junk!%016x", rng.Uint64())
	}
	valid := rv == nil && !strings.HasPrefix(cred, "junk!")
	s.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	start := time.Now()
	resp, err := r.authz.Check(ctx, checkReq(map[string]string{"x-api-key": cred}))
	elapsed := time.Since(start)
	cancel()
	allowed := err == nil && resp.GetStatus().GetCode() == 0
	switch {
	case valid:
		p.valid.Add(1)
		switch {
		case err != nil:
			p.validFail.Add(1)
			p.fail(status.Code(err))
		case allowed:
			p.validOK.Add(1)
		default:
			s.mu.Lock()
			revoking := s.gone[cred] // revoked while the check was on its way
			s.mu.Unlock()
			if !revoking {
				p.validDeny.Add(1)
			}
		}
		if err == nil && elapsed > envoyBudget {
			p.validSlow.Add(1)
		}
	case rv != nil:
		p.revokedChecks.Add(1)
		if err != nil {
			p.otherFail.Add(1)
			p.fail(status.Code(err))
		}
		if !allowed {
			return
		}
		if start.After(rv.committed) {
			p.lateAllows.Add(1)
			for late := int64(start.Sub(rv.committed)); ; {
				w := p.worstLate.Load()
				if w >= late || p.worstLate.CompareAndSwap(w, late) {
					break
				}
			}
			for {
				last := rv.lastAllow.Load()
				if last >= start.UnixNano() || rv.lastAllow.CompareAndSwap(last, start.UnixNano()) {
					break
				}
			}
		}
		if start.Sub(rv.committed) > soakGrace {
			p.strictLate.Add(1)
		}
		if start.UnixNano() > rv.deadline.Load() {
			p.violations.Add(1)
			s.mu.Lock()
			if s.sampled[rv.fault] < 5 {
				s.sampled[rv.fault]++
				s.samples = append(s.samples, fmt.Sprintf("%s: key revoked by %s during %s, allowed on %s by a check started %v after the revoke committed (phase %s)",
					start.UTC().Format("15:04:05.000"), rv.how, rv.fault, r.srv.addrs.GRPC, start.Sub(rv.committed).Round(time.Millisecond), p.kind))
			}
			s.mu.Unlock()
		}
	default:
		p.junk.Add(1)
		switch {
		case err != nil:
			p.junkFail.Add(1)
			p.otherFail.Add(1)
			p.fail(status.Code(err))
		case allowed:
			p.junkAllow.Add(1)
		}
	}
}

var storeErrors = regexp.MustCompile(`(?m)^extauthz_store_errors_total (\d+)`)

// metricSum is a counter summed over the replicas.
func (s *soak) metricSum(re *regexp.Regexp) int {
	n := 0
	for _, r := range s.rs {
		n += metricValue(s.t, &replica{srv: r.srv}, re)
	}
	return n
}

// begin ends the current phase and starts one of kind.
func (s *soak) begin(kind string) *phaseStats {
	s.end()
	p := &phaseStats{kind: kind, start: time.Now()}
	p.lookups, p.storeErr = -s.metricSum(storeLookups), -s.metricSum(storeErrors)
	s.phase.Store(p)
	return p
}

func (s *soak) end() {
	p := s.phase.Load()
	if p == nil || !p.end.IsZero() {
		return
	}
	p.end = time.Now()
	p.lookups += s.metricSum(storeLookups)
	p.storeErr += s.metricSum(storeErrors)
	s.phases = append(s.phases, p)
	if p.kind != "steady" {
		s.logf("%-32s %6.1fs: valid %d (failed %d, denied %d, >200ms %d), revoked checks %d (allowed after commit %d, past deadline %d), junk %d (allowed %d), store lookups %d, store errors %d, revocations %d",
			p.kind, p.end.Sub(p.start).Seconds(), p.valid.Load(), p.validFail.Load(), p.validDeny.Load(), p.validSlow.Load(),
			p.revokedChecks.Load(), p.lateAllows.Load(), p.violations.Load(), p.junk.Load(), p.junkAllow.Load(), p.lookups, p.storeErr, p.revokes)
	}
}

// fault is one kind of fault: start breaks something, stop repairs it.
// During it the cycle revokes keys; learnSQL and learnCLI say whether a
// replica can hear of a revocation made that way while it lasts.
type fault struct {
	name               string
	hold               time.Duration
	start, stop        func()
	learnSQL, learnCLI bool
}

// saveLogs writes each replica's log to SOAK_LOGS.
func (s *soak) saveLogs() {
	dir := os.Getenv("SOAK_LOGS")
	if dir == "" {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		s.t.Errorf("logs: %v", err)
		return
	}
	for i, r := range s.rs {
		path := fmt.Sprintf("%s/replica-%d-%s.log", dir, i+1, strings.ReplaceAll(r.srv.addrs.GRPC, ":", "_"))
		if err := os.WriteFile(path, []byte(r.srv.log.String()), 0o644); err != nil {
			s.t.Errorf("logs: %v", err)
		}
	}
	s.t.Logf("replica logs in %s", dir)
}

func (s *soak) faults() []fault {
	all := s.allFaults()
	only := os.Getenv("SOAK_FAULTS")
	if only == "" {
		return all
	}
	var fs []fault
	for _, f := range all {
		if strings.Contains(f.name, only) {
			fs = append(fs, f)
		}
	}
	if len(fs) == 0 {
		s.t.Fatalf("SOAK_FAULTS=%q names no fault", only)
	}
	return fs
}

func (s *soak) allFaults() []fault {
	each := func(f func(r *soakReplica)) func() {
		return func() {
			for _, r := range s.rs {
				f(r)
			}
		}
	}
	nothing := func() {}
	return []fault{
		{"redis cut (3s)", 3 * time.Second, each(func(r *soakReplica) { r.redis.Cut() }), each(func(r *soakReplica) { r.redis.Restore() }), true, true},
		{"redis black hole (3s)", 3 * time.Second, each(func(r *soakReplica) { r.redis.Stall() }), each(func(r *soakReplica) { r.redis.Restore() }), true, true},
		{"redis frozen (half-open, 5s)", 5 * time.Second, each(func(r *soakReplica) { r.redis.Freeze() }), nothing, true, true},
		{"postgres frozen incl. LISTEN (5s)", 5 * time.Second, each(func(r *soakReplica) { r.pg.Freeze() }), nothing, true, true},
		{"postgres cut (store down, 5s)", 5 * time.Second, each(func(r *soakReplica) { r.pg.Cut() }), each(func(r *soakReplica) { r.pg.Restore() }), false, true},
		{"postgres+redis cut, redis back first", 6 * time.Second, func() {
			for _, r := range s.rs {
				r.pg.Cut()
				r.redis.Cut()
			}
			go func() {
				time.Sleep(2 * time.Second)
				for _, r := range s.rs {
					r.redis.Restore()
				}
			}()
		}, each(func(r *soakReplica) { r.pg.Restore() }), false, false},
	}
}

// Per cycle step: a fault, then this long to recover (counted in the
// fault), then a steady run that creates keys and lets them be cached.
const (
	soakRecovery = 3 * time.Second
	soakSteady   = 8 * time.Second
	soakNewKeys  = 5
)

func (s *soak) cycle(ctx context.Context) {
	faults := s.faults()
	sleep := func(d time.Duration) bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(d):
			return true
		}
	}
	if !sleep(soakSteady) {
		return
	}
	for i := 0; ; i++ {
		f := faults[i%len(faults)]
		left, _ := ctx.Deadline()
		if time.Until(left) < f.hold+soakRecovery {
			s.begin("steady")
			<-ctx.Done()
			return
		}
		p := s.begin(f.name)
		f.start()
		// Five revocations spread over the fault: SQL UPDATE, SQL DELETE, CLI, SQL UPDATE, CLI.
		hows := []string{"sql update", "sql delete", "cli revoke", "sql update", "cli revoke"}
		step := f.hold / time.Duration(len(hows)+1)
		for _, how := range hows {
			time.Sleep(step)
			learn := f.learnSQL
			if how == "cli revoke" {
				learn = f.learnCLI
			}
			s.revoke(how, f.name, learn)
			p.revokes++
		}
		time.Sleep(step)
		f.stop()
		restored := time.Now()
		s.mu.Lock()
		for _, rv := range s.unlearnable {
			rv.deadline.Store(restored.Add(soakGrace).UnixNano())
		}
		s.unlearnable = nil
		s.mu.Unlock()
		time.Sleep(soakRecovery)
		s.begin("steady")
		for range soakNewKeys {
			k := s.createKey()
			s.mu.Lock()
			s.valid = append(s.valid, k)
			s.mu.Unlock()
		}
		if !sleep(soakSteady) {
			return
		}
	}
}

// revoke takes a valid key out of the valid set and revokes it by how.
func (s *soak) revoke(how, fault string, learnable bool) {
	s.mu.Lock()
	if len(s.valid) == 0 {
		s.mu.Unlock()
		return
	}
	i := rand.IntN(len(s.valid))
	k := s.valid[i]
	s.valid = append(s.valid[:i], s.valid[i+1:]...)
	s.gone[k.cred] = true
	s.mu.Unlock()
	cred, id := k.cred, k.id
	switch how {
	case "sql update":
		s.c.sql(`UPDATE extauthz.keys SET revoked_at = now() WHERE id = $1`, id)
	case "sql delete":
		s.c.sql(`DELETE FROM extauthz.keys WHERE id = $1`, id)
	default:
		s.c.ok("", "keys", "revoke", id)
	}
	rv := &revoked{cred: cred, how: how, fault: fault, committed: time.Now()}
	rv.deadline.Store(rv.committed.Add(soakGrace).UnixNano())
	s.mu.Lock()
	if !learnable {
		rv.deadline.Store(time.Now().Add(24 * time.Hour).UnixNano())
		s.unlearnable = append(s.unlearnable, rv)
	}
	s.revoked = append(s.revoked, rv)
	s.mu.Unlock()
}

func (s *soak) violations() int64 {
	var n int64
	for _, p := range s.phases {
		n += p.violations.Load()
	}
	return n
}

// report prints a table per fault kind and totals, and writes it with the
// timeline to SOAK_REPORT.
func (s *soak) report() {
	type row struct {
		kind                                                                      string
		n                                                                         int
		secs                                                                      float64
		valid, ok, deny, fail, slow, rev, late, strict, viol, junk, jallow, other int64
		lookups, storeErr, revokes                                                int
		worst                                                                     time.Duration
		codes                                                                     map[codes.Code]int64
	}
	var order []string
	rows := map[string]*row{}
	total := &row{kind: "total", codes: map[codes.Code]int64{}}
	for _, p := range s.phases {
		r := rows[p.kind]
		if r == nil {
			r = &row{kind: p.kind, codes: map[codes.Code]int64{}}
			rows[p.kind] = r
			order = append(order, p.kind)
		}
		for _, x := range []*row{r, total} {
			x.n++
			x.secs += p.end.Sub(p.start).Seconds()
			x.valid += p.valid.Load()
			x.ok += p.validOK.Load()
			x.deny += p.validDeny.Load()
			x.fail += p.validFail.Load()
			x.slow += p.validSlow.Load()
			x.rev += p.revokedChecks.Load()
			x.late += p.lateAllows.Load()
			x.strict += p.strictLate.Load()
			x.worst = max(x.worst, time.Duration(p.worstLate.Load()))
			x.viol += p.violations.Load()
			x.junk += p.junk.Load()
			x.jallow += p.junkAllow.Load()
			x.other += p.otherFail.Load()
			x.lookups += p.lookups
			x.storeErr += p.storeErr
			x.revokes += p.revokes
			p.failCodes.Range(func(k, v any) bool { x.codes[k.(codes.Code)] += v.(*atomic.Int64).Load(); return true })
		}
	}
	var b strings.Builder
	b.WriteString(s.log.String())
	b.WriteString("\nPer fault kind (each fault counted from its start to " + soakRecovery.String() + " after its repair; steady is the rest):\n\n")
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "phase\tn\tseconds\tvalid checks\tfailed\tdenied\t>200ms\trevoked checks\tallowed after commit\tallowed >1s after commit\tlatest allow after commit\tallowed past deadline\tjunk\tjunk allowed\tother failed\tstore lookups\tlookups/s\tstore errors\trevocations\tfailure codes\t")
	for _, r := range append(func() []*row {
		var rs []*row
		for _, k := range order {
			rs = append(rs, rows[k])
		}
		return rs
	}(), total) {
		var cs []string
		for c, n := range r.codes {
			cs = append(cs, fmt.Sprintf("%v:%d", c, n))
		}
		fmt.Fprintf(w, "%s\t%d\t%.0f\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%v\t%d\t%d\t%d\t%d\t%d\t%.1f\t%d\t%d\t%s\t\n",
			r.kind, r.n, r.secs, r.valid, r.fail, r.deny, r.slow, r.rev, r.late, r.strict, r.worst.Round(time.Millisecond), r.viol, r.junk, r.jallow, r.other,
			r.lookups, float64(r.lookups)/max(r.secs, 1), r.storeErr, r.revokes, strings.Join(cs, " "))
	}
	w.Flush()
	b.WriteString("\nallowed >1s after commit includes the documented exception (README, Degraded modes): a replica cut off\n" +
		"from Postgres cannot learn of a revocation made in SQL (nor of one by the CLI with Redis cut too) until it is\n" +
		"back; for those keys the deadline is a second after the fault's repair. Allowed past deadline has no exception.\n")
	b.WriteString("\nRevoked keys: ")
	var worst time.Duration
	var worstKey *revoked
	for _, rv := range s.revoked {
		if l := rv.lastAllow.Load(); l != 0 {
			if d := time.Unix(0, l).Sub(rv.committed); d > worst {
				worst, worstKey = d, rv
			}
		}
	}
	fmt.Fprintf(&b, "%d revoked in all; allows past the deadline (%v after the revoke committed, or after the fault ended when the replicas could not hear of it): %d\n",
		len(s.revoked), soakGrace, total.viol)
	if worstKey != nil {
		fmt.Fprintf(&b, "latest allow of a revoked key: started %v after its revoke committed (%s during %s)\n", worst.Round(time.Millisecond), worstKey.how, worstKey.fault)
	} else {
		b.WriteString("no revoked key was allowed after its revoke committed\n")
	}
	for _, l := range s.samples {
		b.WriteString("  " + l + "\n")
	}
	out := b.String()
	fmt.Print("\n" + out)
	if path := os.Getenv("SOAK_REPORT"); path != "" {
		if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
			s.t.Errorf("report: %v", err)
		}
	}
}
