// Package rediscache is the shared decision tier (tokens.SharedCache) and
// the invalidation bus on Redis, through go-redis's UniversalClient: a
// single server, Sentinel or Cluster. Keys are prefixed so that several
// deployments can share one Redis. Needs Redis 7.0 or later (PEXPIRE NX/GT).
//
// Layout, for prefix P:
//
//	P d:<base64url digest>  one cached decision (JSON), expiring when it is no longer usable
//	P k:<key id>            set of the d: keys holding that key's decisions, so a
//	                        revocation can find entries that are keyed by digest
//	P invalidate            pub/sub channel of key changes
package rediscache

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/extauthz/extauthz/internal/tokens"
)

// Modes of EXTAUTHZ_REDIS_MODE.
const (
	ModeSingle   = "single"
	ModeSentinel = "sentinel"
	ModeCluster  = "cluster"
)

// NewClient builds a client from a URL, parsed by go-redis:
//
//	single:   redis[s]://[user:pass@]host:port[/db][?dial_timeout=1s...]
//	sentinel: redis://[user:pass@]sentinel1:26379?master_name=mymaster&addr=sentinel2:26379
//	cluster:  redis://[user:pass@]node1:6379?addr=node2:6379&addr=node3:6379
func NewClient(rawURL, mode string) (redis.UniversalClient, error) {
	switch mode {
	case "", ModeSingle:
		o, err := redis.ParseURL(rawURL)
		if err != nil {
			return nil, scrub(err, rawURL)
		}
		return redis.NewClient(o), nil
	case ModeSentinel:
		o, err := redis.ParseFailoverURL(rawURL)
		if err != nil {
			return nil, scrub(err, rawURL)
		}
		if o.MasterName == "" {
			return nil, errors.New("sentinel mode needs ?master_name=... in the URL")
		}
		return redis.NewFailoverClient(o), nil
	case ModeCluster:
		o, err := redis.ParseClusterURL(rawURL)
		if err != nil {
			return nil, scrub(err, rawURL)
		}
		return redis.NewClusterClient(o), nil
	}
	return nil, fmt.Errorf("mode %q: want single, sentinel or cluster", mode)
}

// scrub keeps a password in the URL out of a parse error: net/url quotes
// the whole URL, go-redis's own messages name only the option.
func scrub(err error, rawURL string) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return fmt.Errorf("cannot parse the redis URL (%d characters): %v", len(rawURL), err)
}

// Cache is the shared decision tier, and the replicas' usage-write gate.
type Cache struct {
	rdb    redis.UniversalClient
	prefix string
}

var (
	_ tokens.SharedCache = (*Cache)(nil)
	_ tokens.UsageGate   = (*Cache)(nil)
)

// New uses rdb with the given key prefix.
func New(rdb redis.UniversalClient, prefix string) *Cache {
	return &Cache{rdb: rdb, prefix: prefix}
}

func (c *Cache) entryKey(k tokens.Digest) string {
	return c.prefix + "d:" + base64.RawURLEncoding.EncodeToString(k[:])
}

func (c *Cache) indexKey(keyID string) string { return c.prefix + "k:" + keyID }

// wire is the stored form. Times are unix milliseconds.
type wire struct {
	Outcome tokens.Outcome `json:"o"`
	KeyID   string         `json:"k,omitempty"`
	Tenant  string         `json:"t,omitempty"`
	Scopes  []string       `json:"s,omitempty"`
	Expires int64          `json:"e,omitempty"`
	Fresh   int64          `json:"f"`
	Stale   int64          `json:"x"`
}

func ms(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func fromMS(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.UnixMilli(v)
}

// Get implements tokens.SharedCache.
func (c *Cache) Get(ctx context.Context, k tokens.Digest) (*tokens.SharedEntry, error) {
	b, err := c.rdb.Get(ctx, c.entryKey(k)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("rediscache: get: %w", err)
	}
	var w wire
	if err := json.Unmarshal(b, &w); err != nil || w.Outcome < tokens.OutcomeAllow || w.Outcome > tokens.OutcomeExpired {
		// Unreadable (another version's format?): a miss, not an outage.
		return nil, nil
	}
	return &tokens.SharedEntry{
		Outcome: w.Outcome, KeyID: w.KeyID, TenantID: w.Tenant, Scopes: w.Scopes,
		ExpiresAt: fromMS(w.Expires), FreshUntil: fromMS(w.Fresh), StaleUntil: fromMS(w.Stale),
	}, nil
}

// Set implements tokens.SharedCache: one pipelined round trip.
func (c *Cache) Set(ctx context.Context, k tokens.Digest, e *tokens.SharedEntry) error {
	ttl := time.Until(e.StaleUntil)
	if ttl < time.Millisecond {
		return nil
	}
	b, err := json.Marshal(wire{
		Outcome: e.Outcome, KeyID: e.KeyID, Tenant: e.TenantID, Scopes: e.Scopes,
		Expires: ms(e.ExpiresAt), Fresh: ms(e.FreshUntil), Stale: ms(e.StaleUntil),
	})
	if err != nil {
		return err
	}
	ek := c.entryKey(k)
	_, err = c.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, ek, b, ttl)
		if e.KeyID != "" {
			ik := c.indexKey(e.KeyID)
			p.SAdd(ctx, ik, ek)
			// The index must outlive every entry it names: set a TTL on a
			// new index, and only ever extend it. EXPIRE takes whole
			// seconds and go-redis truncates, so round up, then add one:
			// the index expires at least a second after the entry.
			indexTTL := (ttl + time.Second - 1).Truncate(time.Second) + time.Second
			p.ExpireNX(ctx, ik, indexTTL)
			p.ExpireGT(ctx, ik, indexTTL)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("rediscache: set: %w", err)
	}
	return nil
}

// Forget implements tokens.SharedCache. Deletes are single-key commands,
// so they work on Cluster whatever slots the keys hash to.
func (c *Cache) Forget(ctx context.Context, keyIDs []string) error {
	for _, id := range keyIDs {
		ik := c.indexKey(id)
		members, err := c.rdb.SMembers(ctx, ik).Result()
		if err != nil {
			return fmt.Errorf("rediscache: forget: %w", err)
		}
		_, err = c.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, m := range members {
				p.Del(ctx, m)
			}
			p.Del(ctx, ik)
			return nil
		})
		if err != nil {
			return fmt.Errorf("rediscache: forget: %w", err)
		}
	}
	return nil
}

// Claim implements tokens.UsageGate: one replica a key writes its usage
// each interval, decided by one pipelined SET NX per key under P u:<key id>.
func (c *Cache) Claim(ctx context.Context, keyIDs []string, interval time.Duration) ([]bool, error) {
	cmds := make([]*redis.BoolCmd, len(keyIDs))
	_, err := c.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, id := range keyIDs {
			cmds[i] = p.SetNX(ctx, c.prefix+"u:"+id, 1, interval)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("rediscache: usage gate: %w", err)
	}
	won := make([]bool, len(keyIDs))
	for i, cmd := range cmds {
		won[i] = cmd.Val()
	}
	return won, nil
}

// Bus carries key changes between replicas and from the CLI.
type Bus struct {
	rdb     redis.UniversalClient
	channel string
}

// NewBus uses rdb's pub/sub on channel prefix+"invalidate".
func NewBus(rdb redis.UniversalClient, prefix string) *Bus {
	return &Bus{rdb: rdb, channel: prefix + "invalidate"}
}

type message struct {
	KeyIDs []string `json:"ids,omitempty"`
	Tenant string   `json:"tenant,omitempty"`
	Added  bool     `json:"added,omitempty"`
	All    bool     `json:"all,omitempty"`
	Sent   int64    `json:"sent"` // unix nanoseconds, for the propagation-lag metric
}

// Publish announces a change to every subscribed replica.
func (b *Bus) Publish(ctx context.Context, c tokens.Change) error {
	payload, err := json.Marshal(message{KeyIDs: c.KeyIDs, Tenant: c.Tenant, Added: c.Added, All: c.All, Sent: time.Now().UnixNano()})
	if err != nil {
		return err
	}
	if err := b.rdb.Publish(ctx, b.channel, payload).Err(); err != nil {
		return fmt.Errorf("rediscache: publish: %w", err)
	}
	return nil
}

// Subscribe calls fn for every change published, until ctx ends. go-redis
// resubscribes after a lost connection; since changes published meanwhile
// were missed, each resubscription is reported as All.
func (b *Bus) Subscribe(ctx context.Context, fn func(tokens.Change)) error {
	ps := b.rdb.Subscribe(ctx, b.channel)
	defer ps.Close()
	ch := ps.ChannelWithSubscriptions(redis.WithChannelSize(1000))
	subscribed := false
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case m, ok := <-ch:
			if !ok {
				return errors.New("rediscache: subscription closed")
			}
			switch m := m.(type) {
			case *redis.Subscription:
				if m.Kind == "subscribe" {
					if subscribed {
						fn(tokens.Change{All: true, Source: "redis"})
					}
					subscribed = true
				}
			case *redis.Message:
				fn(decodeMessage(m.Payload))
			}
		}
	}
}

func decodeMessage(payload string) tokens.Change {
	var m message
	if err := json.Unmarshal([]byte(payload), &m); err != nil {
		return tokens.Change{All: true, Source: "redis"}
	}
	c := tokens.Change{KeyIDs: m.KeyIDs, Tenant: m.Tenant, Added: m.Added, All: m.All, Source: "redis"}
	if m.Sent > 0 {
		c.SentAt = time.Unix(0, m.Sent)
	}
	return c
}
