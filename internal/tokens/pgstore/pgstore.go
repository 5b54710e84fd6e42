// Package pgstore is the PostgreSQL tokens.Store (pgx v5). Keys live in
// extauthz.keys, holding digests only. Lookups are single indexed SELECTs;
// changes are announced by a trigger on the channel extauthz_keys, which
// Watch LISTENs to, so changes made directly in SQL reach every replica.
package pgstore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/extauthz/extauthz/internal/tokens"
)

// Channel is the NOTIFY channel of key changes.
const Channel = "extauthz_keys"

// Store is a PostgreSQL key store.
type Store struct {
	pool *pgxpool.Pool
	log  *zap.Logger
	// usageRetries counts usage writes retried after a deadlock or a
	// serialization failure.
	usageRetries atomic.Uint64

	warmed    atomic.Bool  // the pool's MinConns connections were made and used once
	history   atomic.Int64 // nanoseconds of change log Watch reads at start
	listening atomic.Bool
	lastPrune atomic.Int64 // unix nanoseconds
}

var _ tokens.Store = (*Store)(nil)

// Open creates a connection pool for dsn. It does not connect: the first
// query, or Ping, does.
func Open(ctx context.Context, dsn string, log *zap.Logger) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgx's message may quote the DSN; keep the password out of it.
		return nil, errors.New("pgstore: cannot parse the postgres connection string")
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = "extauthz"
	// A query past its deadline is cancelled the way psql cancels one: a
	// CancelRequest on a connection of its own, after which the server
	// ends the query and the pooled connection stays usable. Dropping the
	// connection instead (pgx's socket-deadline handler) made every lookup
	// past EXTAUTHZ_STORE_TIMEOUT cost a new connection, and a slow
	// moment a storm of them. A server that does not answer the cancel
	// within cancelGrace loses the connection (a socket deadline). Lookups
	// do not wait for any of this (see findKey).
	cfg.ConnConfig.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: c, DeadlineDelay: cancelGrace}
	}
	if cfg.MinConns == 0 {
		// Connections kept open and warmed before readiness (see Ping), so
		// that a replica's first checks do not wait for connections to be
		// made (pool_min_conns in the DSN overrides this).
		cfg.MinConns = min(cfg.MaxConns, maxWarmConns)
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		// A handshake that never completes must not hold a pool slot forever
		// (connect_timeout in the DSN overrides this).
		cfg.ConnConfig.ConnectTimeout = 2 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Store{pool: pool, log: log}, nil
}

// Pool is the connection pool, for migrations and schema checks.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Close closes the pool.
func (s *Store) Close() error { s.pool.Close(); return nil }

// cancelGrace is how long a cancelled query's connection waits for the
// server to end the query before the connection is closed: a server that
// answers at all answers a cancel request within a round trip; a
// connection that is half-open is found so and closed that much after the
// deadline.
const cancelGrace = 250 * time.Millisecond

// maxWarmConns bounds the connections opened and warmed before readiness
// when the DSN does not say (pool_min_conns).
const maxWarmConns = 8

// Ping checks that the server answers and the schema is current. Until it
// has once succeeded, it also warms the pool: it opens MinConns
// connections at once and runs each lookup on each (preparing its
// statement), so that readiness, which waits for Ping, means that checks
// find connections ready.
func (s *Store) Ping(ctx context.Context) error {
	if err := CheckSchema(ctx, s.pool); err != nil {
		return err
	}
	if s.warmed.Load() {
		return nil
	}
	if err := s.warm(ctx, int(s.pool.Config().MinConns)); err != nil {
		return err
	}
	s.warmed.Store(true)
	return nil
}

// warm holds n pool connections at once and runs both lookups on each.
func (s *Store) warm(ctx context.Context, n int) error {
	conns := make([]*pgxpool.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Release()
		}
	}()
	for range n {
		c, err := s.pool.Acquire(ctx)
		if err != nil {
			return fmt.Errorf("pgstore: warm the pool: %w", err)
		}
		conns = append(conns, c)
	}
	for _, c := range conns {
		for _, q := range []struct {
			sql string
			arg any
		}{{byPublic, ""}, {byDigest, [][]byte{nil}}} {
			if _, err := scanKey(c.QueryRow(ctx, q.sql, q.arg)); err != nil && !errors.Is(err, tokens.ErrNotFound) {
				return fmt.Errorf("pgstore: warm the pool: %w", err)
			}
		}
	}
	return nil
}

const keyColumns = `id::text, tenant_id, name, kind, public_key, digest, pepper_id, scopes,
	created_at, expires_at, revoked_at, last_used_at, request_count, version`

func scanKey(row pgx.Row) (*tokens.Key, error) {
	var (
		k                        tokens.Key
		kind                     string
		public                   *string
		expires, revoked, usedAt *time.Time
	)
	err := row.Scan(&k.ID, &k.TenantID, &k.Name, &kind, &public, &k.Digest, &k.PepperID, &k.Scopes,
		&k.CreatedAt, &expires, &revoked, &usedAt, &k.RequestCount, &k.Version)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, tokens.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	if k.Kind, err = tokens.ParseKind(kind); err != nil {
		return nil, fmt.Errorf("pgstore: key %s: %w", k.ID, err)
	}
	if public != nil {
		k.PublicKey = *public
	}
	k.CreatedAt = k.CreatedAt.UTC()
	k.ExpiresAt, k.RevokedAt, k.LastUsedAt = utc(expires), utc(revoked), utc(usedAt)
	return &k, nil
}

func utc(t *time.Time) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.UTC()
}

func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

const (
	byPublic = `SELECT ` + keyColumns + ` FROM extauthz.keys WHERE public_key = $1`
	byDigest = `SELECT ` + keyColumns + ` FROM extauthz.keys WHERE kind = 'token' AND digest = ANY($1) LIMIT 1`
)

// KeyByPublic implements tokens.Finder.
func (s *Store) KeyByPublic(ctx context.Context, pk string) (*tokens.Key, error) {
	return s.findKey(ctx, byPublic, pk)
}

// findKey runs a lookup and returns when it ends or when ctx does,
// whichever comes first: a lookup past its deadline is cancelled on the
// server while its connection goes back to the pool, and the caller does
// not wait for that round trip (nor, against a server that no longer
// answers, for cancelGrace).
func (s *Store) findKey(ctx context.Context, query string, arg any) (*tokens.Key, error) {
	type result struct {
		k   *tokens.Key
		err error
	}
	ch := make(chan result, 1)
	go func() {
		k, err := scanKey(s.pool.QueryRow(ctx, query, arg))
		ch <- result{k, err}
	}()
	select {
	case r := <-ch:
		return r.k, r.err
	case <-ctx.Done():
		return nil, fmt.Errorf("pgstore: %w", ctx.Err())
	}
}

// LookupConcurrency implements tokens.ConcurrencyLimiter: the pool's
// connections (pool_max_conns).
func (s *Store) LookupConcurrency() int {
	return int(s.pool.Config().MaxConns)
}

// KeyByID implements tokens.Store.
func (s *Store) KeyByID(ctx context.Context, id string) (*tokens.Key, error) {
	k, err := scanKey(s.pool.QueryRow(ctx, `SELECT `+keyColumns+` FROM extauthz.keys WHERE id = $1`, id))
	if err != nil && !errors.Is(err, tokens.ErrNotFound) {
		return nil, mapErr(err)
	}
	return k, err
}

// KeyByDigest implements tokens.Finder.
func (s *Store) KeyByDigest(ctx context.Context, ds []tokens.Digest) (*tokens.Key, error) {
	arg := make([][]byte, len(ds))
	for i := range ds {
		arg[i] = ds[i][:]
	}
	return s.findKey(ctx, byDigest, arg)
}

const insertKey = `INSERT INTO extauthz.keys
	(id, tenant_id, name, kind, public_key, digest, pepper_id, scopes, created_at, expires_at, revoked_at)
	VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`

func insertArgs(k *tokens.Key) []any {
	var public *string
	if k.Kind == tokens.KindPair {
		public = &k.PublicKey
	}
	scopes := k.Scopes
	if scopes == nil {
		scopes = []string{}
	}
	return []any{k.ID, k.TenantID, k.Name, k.Kind.String(), public, k.Digest, k.PepperID, scopes,
		k.CreatedAt, nullTime(k.ExpiresAt), nullTime(k.RevokedAt)}
}

// Create implements tokens.Store.
func (s *Store) Create(ctx context.Context, k *tokens.Key) error {
	_, err := s.pool.Exec(ctx, insertKey, insertArgs(k)...)
	return mapErr(err)
}

// Import implements tokens.Store: one transaction, one batch.
func (s *Store) Import(ctx context.Context, keys []*tokens.Key) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		b := &pgx.Batch{}
		for _, k := range keys {
			b.Queue(insertKey, insertArgs(k)...)
		}
		br := tx.SendBatch(ctx, b)
		for i := range keys {
			if _, err := br.Exec(); err != nil {
				br.Close()
				return &tokens.ImportError{Index: i, Err: mapErr(err)}
			}
		}
		return br.Close()
	})
}

// List implements tokens.Store.
func (s *Store) List(ctx context.Context, tenant string) ([]*tokens.Key, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+keyColumns+` FROM extauthz.keys
		WHERE $1 = '' OR tenant_id = $1 ORDER BY created_at, id`, tenant)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	defer rows.Close()
	var out []*tokens.Key
	for rows.Next() {
		k, err := scanKey(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	return out, nil
}

// Revoke implements tokens.Store.
func (s *Store) Revoke(ctx context.Context, id string, at time.Time) error {
	// COALESCE keeps the first revocation time; touching revoked_at still
	// fires the change trigger, which is harmless.
	tag, err := s.pool.Exec(ctx, `UPDATE extauthz.keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1`, id, at)
	if err := mapErr(err); err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return tokens.ErrNotFound
	}
	return nil
}

// RevokeTenant implements tokens.Store.
func (s *Store) RevokeTenant(ctx context.Context, tenant string, at time.Time) ([]string, error) {
	rows, err := s.pool.Query(ctx, `UPDATE extauthz.keys SET revoked_at = $2
		WHERE tenant_id = $1 AND revoked_at IS NULL RETURNING id::text`, tenant, at)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	return ids, nil
}

// Delete implements tokens.Store.
func (s *Store) Delete(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM extauthz.keys WHERE id = $1`, id)
	if err := mapErr(err); err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return tokens.ErrNotFound
	}
	return nil
}

// RecordUsage implements tokens.Store: one transaction for the whole
// batch, which locks its rows in key id order before it updates them.
//
// Several replicas write usage of the same keys at once (every final
// write at a rolling restart does). Rows locked in whatever order each
// batch came in deadlocked two such writers in most rounds, and the loser's
// counts were lost at shutdown. Locked in one global order, two writers
// wait for each other but never deadlock; a deadlock with another writer
// (an application's own UPDATE) or a serialization failure is retried.
func (s *Store) RecordUsage(ctx context.Context, usage []tokens.Usage) error {
	ids, times, counts := usageArgs(usage)
	if len(ids) == 0 {
		return nil
	}
	const attempts = 5
	backoff := 10 * time.Millisecond
	for i := 1; ; i++ {
		err := mapErr(pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			// SELECT ... ORDER BY ... FOR NO KEY UPDATE locks in the sort
			// order (the lock is taken above the sort); the UPDATE then only
			// takes locks this transaction holds already.
			if _, err := tx.Exec(ctx, `SELECT 1 FROM extauthz.keys WHERE id = ANY($1::uuid[])
				ORDER BY id FOR NO KEY UPDATE`, ids); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `UPDATE extauthz.keys AS k
				SET request_count = k.request_count + u.n, last_used_at = GREATEST(k.last_used_at, u.t)
				FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[]) AS u(id, t, n)
				WHERE k.id = u.id`, ids, times, counts)
			return err
		}))
		if err == nil || !retryable(err) || i == attempts {
			return err
		}
		s.usageRetries.Add(1)
		s.log.Warn("usage write conflicted with another transaction; retrying", zap.Error(err), zap.Int("attempt", i))
		select {
		case <-ctx.Done():
			return fmt.Errorf("pgstore: %w", ctx.Err())
		case <-time.After(backoff + rand.N(backoff)):
		}
		backoff *= 2
	}
}

// usageArgs aggregates usage to one row per key (UPDATE ... FROM must see
// each key once), sorted by key id, as the arrays of RecordUsage's
// statement. Ids that are not UUIDs are no key of this store.
func usageArgs(usage []tokens.Usage) (ids []string, times []time.Time, counts []int64) {
	agg := make(map[string]tokens.Usage, len(usage))
	for _, u := range usage {
		if !validUUID(u.KeyID) {
			continue
		}
		// One spelling per key: two would be two rows of unnest for one
		// key row, and UPDATE ... FROM applies only one of them.
		u.KeyID = strings.ToLower(u.KeyID)
		if a, ok := agg[u.KeyID]; ok {
			u.Requests += a.Requests
			if a.LastUsed.After(u.LastUsed) {
				u.LastUsed = a.LastUsed
			}
		}
		agg[u.KeyID] = u
	}
	ids = make([]string, 0, len(agg))
	for id := range agg {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	times, counts = make([]time.Time, len(ids)), make([]int64, len(ids))
	for i, id := range ids {
		times[i], counts[i] = agg[id].LastUsed, agg[id].Requests
	}
	return ids, times, counts
}

// retryable reports a deadlock or a serialization failure: the
// transaction was rolled back and may simply run again.
func retryable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "40P01" || pe.Code == "40001")
}

func validUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
	}
	return true
}

// mapErr turns constraint violations into the tokens sentinels.
func mapErr(err error) error {
	if err == nil {
		return nil
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch pe.Code {
		case "23505": // unique_violation
			return tokens.ErrConflict
		case "22P02": // invalid_text_representation: not a uuid
			return tokens.ErrNotFound
		}
	}
	return fmt.Errorf("pgstore: %w", err)
}

func isUndefinedTable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "42P01" || pe.Code == "3F000")
}
