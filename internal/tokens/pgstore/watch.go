package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"go.uber.org/zap"

	"github.com/extauthz/extauthz/internal/tokens"
)

// The LISTEN connection is proven alive continuously: every
// heartbeatInterval the store sends a notification through Postgres (from
// a pool connection, on a channel of its own that only its LISTEN
// connection listens to) and expects it back on the LISTEN connection
// within deadAfter. One that does not come back means the connection is
// dead, half-open ones included (a NAT or load balancer that forgot it, a
// failover without a reset): it is closed and replaced, and what changed
// meanwhile is read from extauthz.key_changes.
const (
	heartbeatInterval = 200 * time.Millisecond
	deadAfter         = 800 * time.Millisecond
	// reconnectMax bounds the wait between attempts to reconnect.
	reconnectMax = time.Second
	// catchUpMargin reaches back before the last heartbeat received: a
	// change committed after it was logged at the time of its statement,
	// which may be before (a transaction that stayed open that long).
	catchUpMargin = time.Minute
	// minRetention is how long the change log is kept at least.
	minRetention = 24 * time.Hour
	pruneEvery   = time.Hour
)

// WatchHistory sets how far back Watch reads the change log when it
// starts: long enough that a shared entry written before a change it
// reads is no longer usable (the cache TTL + max stale + a margin). The
// log is kept at least twice as long, and a day at least.
func (s *Store) WatchHistory(d time.Duration) { s.history.Store(int64(d)) }

// Listening reports whether the LISTEN connection is up, caught up, and
// proven alive within the last deadAfter.
func (s *Store) Listening() bool { return s.listening.Load() }

// watchState is what Watch knows between connections.
type watchState struct {
	started   bool
	since     time.Time // database time: every change committed before it was delivered
	truncated int64     // the last TRUNCATE applied
}

// Watch LISTENs on Channel over a dedicated connection, proven alive by
// heartbeats. At start it reads the recent history of changes; after a
// lost connection it reconnects and reads what changed while it was away,
// reporting it as Recovered. Only when the log no longer reaches back that
// far does it report All.
func (s *Store) Watch(ctx context.Context, fn func(tokens.Change)) error {
	var nonce [8]byte
	rand.Read(nonce[:])
	hb := Channel + "_hb_" + hex.EncodeToString(nonce[:])
	backoff := 100 * time.Millisecond
	st := &watchState{}
	for {
		err := s.listen(ctx, hb, st, fn, func() { backoff = 100 * time.Millisecond })
		s.listening.Store(false)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, errHeartbeatLost) {
			// Whatever left the LISTEN connection half-open (a NAT or load
			// balancer that forgot it, a failover without a reset) most
			// likely did the same to the pool's idle connections, and a
			// lookup on one would wait out its deadline: replace them all.
			s.pool.Reset()
		}
		s.log.Warn("key change notifications interrupted; reconnecting, then catching up", zap.Error(err), zap.Duration("backoff", backoff))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, reconnectMax)
	}
}

var errHeartbeatLost = errors.New("pgstore: no heartbeat came back on the LISTEN connection: declared dead")

func (s *Store) listen(ctx context.Context, hb string, st *watchState, fn func(tokens.Change), connected func()) error {
	cc := s.pool.Config().ConnConfig.Copy()
	// A wait past its deadline means the connection is dead: close it at
	// once (a socket deadline) rather than ask a server that may not
	// answer to cancel a query that is not running.
	cc.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.DeadlineContextWatcherHandler{Conn: c.Conn()}
	}
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		conn.Close(cctx)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+Channel+"; LISTEN "+hb); err != nil {
		return err
	}
	// Listening from here on: what committed before is in the log.
	if err := s.catchUp(ctx, conn, st, fn); err != nil {
		return fmt.Errorf("pgstore: catch up: %w", err)
	}
	connected()

	lctx, stop := context.WithCancel(ctx)
	defer stop()
	go s.heartbeat(lctx, hb)
	last := time.Now()
	s.listening.Store(true)
	for {
		wctx, cancel := context.WithDeadline(ctx, last.Add(deadAfter))
		n, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, context.DeadlineExceeded) || errors.Is(wctx.Err(), context.DeadlineExceeded):
			return errHeartbeatLost
		case err != nil:
			return err
		}
		if n.Channel == hb {
			if us, err := strconv.ParseInt(n.Payload, 10, 64); err == nil {
				last = time.Now()
				st.since = time.UnixMicro(us)
			}
			continue
		}
		c, err := parseNotification(n.Payload)
		if err != nil {
			// Not the trigger's: whatever it means, the log says what changed.
			return err
		}
		if c.All {
			st.truncated = max(st.truncated, c.Floor)
		}
		fn(c)
	}
}

// heartbeat sends a notification to hb every heartbeatInterval until ctx
// ends. Its payload is the database's clock: once it is received, every
// change committed before it was delivered.
func (s *Store) heartbeat(ctx context.Context, hb string) {
	t := time.NewTicker(heartbeatInterval)
	defer t.Stop()
	for {
		hctx, cancel := context.WithTimeout(ctx, deadAfter)
		_, err := s.pool.Exec(hctx, `SELECT pg_notify($1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text)`, hb)
		cancel()
		if err != nil && ctx.Err() == nil {
			s.log.Debug("heartbeat not sent", zap.Error(err))
		}
		s.maybePrune(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// catchUp reads the change log on conn, which is already listening: at
// start, the last history; after a lost connection, everything since the
// last heartbeat received (less a margin). It reports the keys changed as
// one Recovered change, a TRUNCATE missed as All with its floor, and, when
// the log was pruned past that point, All with the floor at the latest
// sequence.
func (s *Store) catchUp(ctx context.Context, conn *pgx.Conn, st *watchState, fn func(tokens.Change)) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var (
		truncated, latest int64
		prunedAt, now     time.Time
	)
	err := conn.QueryRow(ctx, `SELECT truncated, pruned_at, (SELECT last_value FROM extauthz.change_seq), clock_timestamp()
		FROM extauthz.change_state`).Scan(&truncated, &prunedAt, &latest, &now)
	if err != nil {
		return err
	}
	history := time.Duration(s.history.Load())
	since := st.since.Add(-catchUpMargin)
	if !st.started {
		since = now.Add(-history)
	}
	s.maybePrune(ctx)
	rows, err := conn.Query(ctx, `SELECT seq, key_id::text, op FROM extauthz.key_changes
		WHERE at > $1 AND key_id IS NOT NULL ORDER BY seq`, since)
	if err != nil {
		return err
	}
	c := tokens.Change{Source: "postgres", Recovered: true}
	for rows.Next() {
		var (
			seq int64
			id  string
			op  string
		)
		if err := rows.Scan(&seq, &id, &op); err != nil {
			return err
		}
		c.KeyIDs, c.Seqs = append(c.KeyIDs, id), append(c.Seqs, seq)
		c.Added = c.Added || op == "insert"
	}
	if err := rows.Err(); err != nil {
		return err
	}
	st.since = now
	switch {
	case prunedAt.After(since):
		// What changed in between is no longer all in the log.
		s.log.Warn("key change log pruned past what is needed; dropping every cached decision", zap.Time("since", since))
		fn(tokens.Change{All: true, Floor: latest, Source: "postgres", Recovered: true})
	case truncated > st.truncated:
		fn(tokens.Change{All: true, Floor: truncated, Source: "postgres", Recovered: true})
	}
	st.truncated = max(st.truncated, truncated)
	if len(c.KeyIDs) > 0 || c.Added {
		fn(c)
	}
	if st.started {
		s.log.Info("key change notifications resumed; caught up", zap.Int("changes", len(c.KeyIDs)))
	}
	st.started = true
	return nil
}

// maybePrune deletes the change log older than the retention (a day, or
// twice the history if longer), at most once every pruneEvery, and
// records how far it pruned.
func (s *Store) maybePrune(ctx context.Context) {
	last := s.lastPrune.Load()
	if time.Since(time.Unix(0, last)) < pruneEvery || !s.lastPrune.CompareAndSwap(last, time.Now().UnixNano()) {
		return
	}
	keep := max(minRetention, 2*time.Duration(s.history.Load()))
	_, err := s.pool.Exec(ctx, `WITH cutoff AS (SELECT clock_timestamp() - make_interval(secs => $1) AS t),
		gone AS (DELETE FROM extauthz.key_changes WHERE at < (SELECT t FROM cutoff) RETURNING 1)
		UPDATE extauthz.change_state SET pruned_at = GREATEST(pruned_at, (SELECT t FROM cutoff))`, keep.Seconds())
	if err != nil && ctx.Err() == nil {
		s.log.Warn("key change log not pruned", zap.Error(err))
	}
}

// parseNotification reads the trigger's payload.
func parseNotification(payload string) (tokens.Change, error) {
	var p struct {
		Op, ID, Tenant string
		Seq            int64
		SentUS         int64 `json:"sent_us"`
	}
	if err := json.Unmarshal([]byte(payload), &p); err != nil {
		return tokens.Change{}, fmt.Errorf("pgstore: notification unreadable: %w", err)
	}
	c := tokens.Change{Source: "postgres"}
	switch {
	case p.Op == "truncate":
		c.All, c.Floor = true, p.Seq
	case p.Op == "insert":
		c.Added = true
	case (p.Op == "update" || p.Op == "delete") && p.ID != "":
		c.KeyIDs = []string{p.ID}
		if p.Seq > 0 {
			c.Seqs = []int64{p.Seq}
		}
	default:
		return tokens.Change{}, fmt.Errorf("pgstore: notification of an unknown change %q", p.Op)
	}
	if p.SentUS > 0 {
		c.SentAt = time.UnixMicro(p.SentUS)
	}
	return c, nil
}
