// Package rediscache is the shared decision tier (tokens.SharedCache) and
// the invalidation bus on Redis, through go-redis's UniversalClient: a
// single server, Sentinel or Cluster. Keys are prefixed so that several
// deployments can share one Redis. Needs Redis 7.0 or later (PEXPIRE NX/GT).
//
// Layout, for prefix P:
//
//	P d:<base64url digest>  one cached decision, sealed (tokens.SharedSealer), expiring
//	                        when it is no longer usable
//	P k:<key id>            set of the d: keys holding that key's decisions, so a
//	                        revocation can find entries that are keyed by digest
//	P u:<key id>            usage-write claim for the current interval
//	P invalidate            pub/sub channel of key changes, sealed messages
//
// Nothing read from Redis is trusted: entries and messages are
// authenticated by the tokens package before use, reads are bounded in
// size, and deletes stay under the prefix.
package rediscache

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/extauthz/extauthz/internal/tokens"
)

// Modes of EXTAUTHZ_REDIS_MODE.
const (
	ModeSingle   = "single"
	ModeSentinel = "sentinel"
	ModeCluster  = "cluster"
)

// NewClient builds a client from a URL, parsed by go-redis. Its calls end
// at their context's deadline (ContextTimeoutEnabled): without it
// go-redis waits out its own 3 s read timeout on a black-holed server,
// which held checks past Envoy's deadline and the change watch past the
// one-second revocation bound. URLs:
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
		o.ContextTimeoutEnabled = true
		return redis.NewClient(o), nil
	case ModeSentinel:
		o, err := redis.ParseFailoverURL(rawURL)
		if err != nil {
			return nil, scrub(err, rawURL)
		}
		if o.MasterName == "" {
			return nil, errors.New("sentinel mode needs ?master_name=... in the URL")
		}
		o.TLSConfig = perHostTLS(o.TLSConfig)
		o.ContextTimeoutEnabled = true
		return redis.NewFailoverClient(o), nil
	case ModeCluster:
		o, err := redis.ParseClusterURL(rawURL)
		if err != nil {
			return nil, scrub(err, rawURL)
		}
		o.TLSConfig = perHostTLS(o.TLSConfig)
		o.ContextTimeoutEnabled = true
		return redis.NewClusterClient(o), nil
	}
	return nil, fmt.Errorf("mode %q: want single, sentinel or cluster", mode)
}

// perHostTLS fixes rediss:// for sentinel and cluster: go-redis sets the
// TLS server name to the URL's first host and uses it for every
// connection, so the master a sentinel names, or any other cluster node,
// would have to present the first host's certificate. Without a server
// name, crypto/tls checks each connection against the host it dials.
func perHostTLS(c *tls.Config) *tls.Config {
	if c == nil {
		return nil
	}
	c = c.Clone()
	c.ServerName = ""
	c.MinVersion = max(c.MinVersion, tls.VersionTLS12)
	return c
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
//
// On Redis Cluster a failing node takes only its own slots out of the
// tier: every error asks go-redis to reload the topology, so that the
// slots a replica took over are served again as soon as the cluster says
// so, and a single-key command that fails backs off the master holding
// that key for nodeRetry (its keys are tokens.ErrSharedSkipped meanwhile,
// a miss). A pipeline spans nodes and its error does not say which one
// failed: it backs nothing off (writes are off the checks' path anyway).
// Errors are tokens.ErrSharedPartial, so that the authenticator keeps the
// rest of the tier in use.
type Cache struct {
	rdb     redis.UniversalClient
	prefix  string
	cluster *redis.ClusterClient // nil outside cluster mode
	log     *zap.Logger

	mu    sync.Mutex
	down  map[string]int64 // cluster master address → unix nanoseconds until which its keys are skipped
	downs atomic.Int32     // len(down), read without the lock on every call
}

// nodeRetry is how long a failing Cluster node's keys skip the tier: an
// outage costs one timeout a node a period, not one per miss.
const nodeRetry = time.Second

var (
	_ tokens.SharedCache = (*Cache)(nil)
	_ tokens.UsageGate   = (*Cache)(nil)
)

// New uses rdb with the given key prefix.
func New(rdb redis.UniversalClient, prefix string) *Cache {
	c := &Cache{rdb: rdb, prefix: prefix, log: zap.NewNop(), down: map[string]int64{}}
	c.cluster, _ = rdb.(*redis.ClusterClient)
	return c
}

// WithLogger makes c log Cluster nodes failing and coming back.
func (c *Cache) WithLogger(log *zap.Logger) *Cache {
	c.log = log
	return c
}

// nodeOf is the address of the Cluster master holding key ("" outside
// cluster mode, or when the topology is not known): no I/O once the
// topology is loaded.
func (c *Cache) nodeOf(ctx context.Context, key string) string {
	if c.cluster == nil {
		return ""
	}
	m, err := c.cluster.MasterForKey(ctx, key)
	if err != nil {
		return ""
	}
	return m.Options().Addr
}

// skip returns tokens.ErrSharedSkipped when key's Cluster node failed
// less than nodeRetry ago. It costs an atomic load while no node is down.
func (c *Cache) skip(ctx context.Context, key string) error {
	if c.downs.Load() == 0 {
		return nil
	}
	addr := c.nodeOf(ctx, key)
	now := time.Now().UnixNano()
	c.mu.Lock()
	defer c.mu.Unlock()
	until, ok := c.down[addr]
	switch {
	case !ok:
		return nil
	case now < until:
		return fmt.Errorf("rediscache: node %s: %w", addr, tokens.ErrSharedSkipped)
	}
	// Its period is over: this call tries it again, and a failure backs
	// it off anew.
	delete(c.down, addr)
	c.downs.Store(int32(len(c.down)))
	return nil
}

// failed turns err, from a command on key, into the error to return. On
// Cluster it reloads the topology and backs off key's node alone.
func (c *Cache) failed(ctx context.Context, op, key string, err error) error {
	if c.cluster == nil {
		return fmt.Errorf("rediscache: %s: %w", op, err)
	}
	c.cluster.ReloadState(ctx) // asynchronous; go-redis runs one at a time
	if key == "" {
		return fmt.Errorf("rediscache: %s: %w: %w", op, tokens.ErrSharedPartial, err)
	}
	addr := c.nodeOf(ctx, key)
	now := time.Now()
	c.mu.Lock()
	_, was := c.down[addr]
	c.down[addr] = now.Add(nodeRetry).UnixNano()
	c.downs.Store(int32(len(c.down)))
	c.mu.Unlock()
	if !was {
		c.log.Warn("redis cluster node failing: its keys skip the shared tier, the other nodes' are served; topology reloading",
			zap.String("node", addr), zap.Error(err), zap.Duration("retry_in", nodeRetry))
	}
	return fmt.Errorf("rediscache: %s: %w: node %s: %w", op, tokens.ErrSharedPartial, addr, err)
}

func (c *Cache) entryKey(k tokens.Digest) string {
	return c.prefix + "d:" + base64.RawURLEncoding.EncodeToString(k[:])
}

func (c *Cache) indexKey(keyID string) string { return c.prefix + "k:" + keyID }

// maxEntry bounds what Get reads: a value longer than any entry is not
// one, and reading it whole would let whoever wrote it make every replica
// allocate it on every miss.
const maxEntry = 8 << 10

// Get implements tokens.SharedCache. GETRANGE reads at most maxEntry+1
// bytes; a longer value, or a key of another type, is invalid.
func (c *Cache) Get(ctx context.Context, k tokens.Digest) ([]byte, error) {
	ek := c.entryKey(k)
	if err := c.skip(ctx, ek); err != nil {
		return nil, err
	}
	b, err := c.rdb.GetRange(ctx, ek, 0, maxEntry).Bytes()
	switch {
	case err != nil && strings.HasPrefix(err.Error(), "WRONGTYPE"):
		return nil, fmt.Errorf("rediscache: get: %w: not a string", tokens.ErrSharedInvalid)
	case err != nil:
		return nil, c.failed(ctx, "get", ek, err)
	case len(b) == 0:
		return nil, nil // no such key (GETRANGE reads it as empty)
	case len(b) > maxEntry:
		return nil, fmt.Errorf("rediscache: get: %w: over %d bytes", tokens.ErrSharedInvalid, maxEntry)
	}
	return b, nil
}

// Set implements tokens.SharedCache: one pipelined round trip.
func (c *Cache) Set(ctx context.Context, k tokens.Digest, keyID string, v []byte, ttl time.Duration) error {
	if ttl < time.Millisecond {
		return nil
	}
	ek := c.entryKey(k)
	if err := c.skip(ctx, ek); err != nil {
		return err
	}
	_, err := c.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, ek, v, ttl)
		if keyID != "" {
			ik := c.indexKey(keyID)
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
		return c.failed(ctx, "set", "", err)
	}
	return nil
}

// Delete implements tokens.SharedCache.
func (c *Cache) Delete(ctx context.Context, k tokens.Digest) error {
	ek := c.entryKey(k)
	if err := c.skip(ctx, ek); err != nil {
		return err
	}
	if err := c.rdb.Del(ctx, ek).Err(); err != nil {
		return c.failed(ctx, "delete", ek, err)
	}
	return nil
}

// Forget implements tokens.SharedCache. It reads each index in pages, so
// that an index grown huge costs time, not memory, and deletes only the
// entry keys it names under this prefix. Deletes are single-key commands,
// so they work on Cluster whatever slots the keys hash to.
func (c *Cache) Forget(ctx context.Context, keyIDs []string) error {
	entries := c.prefix + "d:"
	for _, id := range keyIDs {
		ik := c.indexKey(id)
		var cursor uint64
		for {
			members, next, err := c.rdb.SScan(ctx, ik, cursor, "", 500).Result()
			if err != nil {
				return c.failed(ctx, "forget", ik, err)
			}
			_, err = c.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
				for _, m := range members {
					if strings.HasPrefix(m, entries) {
						p.Del(ctx, m)
					}
				}
				return nil
			})
			if err != nil {
				return c.failed(ctx, "forget", "", err)
			}
			if cursor = next; cursor == 0 {
				break
			}
		}
		if err := c.rdb.Del(ctx, ik).Err(); err != nil {
			return c.failed(ctx, "forget", ik, err)
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

// Bus carries key changes between replicas and from the CLI. Messages are
// sealed (tokens.SharedSealer) with the time they were sent; a subscriber
// drops, and counts, any message that is not sealed by a holder of a
// configured pepper, was sent more than MessageWindow from its clock, or
// is a copy of one it already applied. Such a message never flushes a
// cache.
type Bus struct {
	rdb      redis.UniversalClient
	channel  string
	seal     *tokens.SharedSealer
	log      *zap.Logger
	now      func() time.Time
	rejected atomic.Uint64
	// sentinels, in sentinel mode, are asked which server is the master
	// (see FollowMaster).
	sentinels *redis.FailoverOptions
}

// FollowMaster makes a sentinel-mode subscriber (rawURL as NewClient
// takes it) ask the sentinels every masterPoll which server is the
// master, and subscribe again when it changed. go-redis moves commands to
// a new master on +switch-master, but leaves a subscription on the
// demoted one, which is alive and hears nothing published on the new
// master.
func (b *Bus) FollowMaster(rawURL string) error {
	o, err := redis.ParseFailoverURL(rawURL)
	if err != nil {
		return scrub(err, rawURL)
	}
	o.TLSConfig = perHostTLS(o.TLSConfig)
	b.sentinels = o
	return nil
}

// subscribe subscribes to the channel: on master, the address the
// sentinels named, through a client of its own (go-redis's failover client
// asks a sentinel of its own, which may not have heard of the change yet);
// otherwise through the client. The function returned unsubscribes.
func (b *Bus) subscribe(ctx context.Context, master string) (*redis.PubSub, func()) {
	if master == "" {
		ps := b.rdb.Subscribe(ctx, b.channel)
		return ps, func() { ps.Close() }
	}
	o := b.sentinels
	c := redis.NewClient(&redis.Options{Addr: master, Username: o.Username, Password: o.Password, DB: o.DB,
		TLSConfig: o.TLSConfig, Protocol: o.Protocol, DialTimeout: o.DialTimeout, ReadTimeout: o.ReadTimeout, WriteTimeout: o.WriteTimeout})
	ps := c.Subscribe(ctx, b.channel)
	return ps, func() { ps.Close(); c.Close() }
}

// masterPoll is how often a sentinel-mode subscriber asks who the master is.
const masterPoll = 500 * time.Millisecond

// masterWatch returns a function that asks the sentinels, the first that
// answers, for the master's address, and a function that closes them.
func (b *Bus) masterWatch() (func(context.Context) string, func()) {
	o := b.sentinels
	if o == nil {
		return nil, func() {}
	}
	var scs []*redis.SentinelClient
	for _, addr := range o.SentinelAddrs {
		scs = append(scs, redis.NewSentinelClient(&redis.Options{
			Addr: addr, Username: o.SentinelUsername, Password: o.SentinelPassword, TLSConfig: o.TLSConfig,
			DialTimeout: masterPoll, ReadTimeout: masterPoll, WriteTimeout: masterPoll, MaxRetries: -1,
		}))
	}
	ask := func(ctx context.Context) string {
		for _, sc := range scs {
			if a, err := sc.GetMasterAddrByName(ctx, o.MasterName).Result(); err == nil && len(a) == 2 {
				return net.JoinHostPort(a[0], a[1])
			}
		}
		return ""
	}
	return ask, func() {
		for _, sc := range scs {
			sc.Close()
		}
	}
}

// topologyReload is how often a subscriber on Cluster reloads the
// topology.
const topologyReload = time.Second

// busBeat is how often each replica publishes an empty message on the
// invalidation channel, and silentAfter how long a subscription may hear
// nothing before it is replaced.
const (
	busBeat     = time.Second
	silentAfter = 3 * time.Second
)

// MessageWindow is how far a message's sending time may be from a
// subscriber's clock: replicas and the CLI must keep their clocks within it.
const MessageWindow = time.Minute

// NewBus uses rdb's pub/sub on channel prefix+"invalidate", sealing and
// opening messages with seal. log may be nil.
func NewBus(rdb redis.UniversalClient, prefix string, seal *tokens.SharedSealer, log *zap.Logger) *Bus {
	if log == nil {
		log = zap.NewNop()
	}
	return &Bus{rdb: rdb, channel: prefix + "invalidate", seal: seal, log: log, now: time.Now}
}

// Rejected counts messages dropped: unsealed, altered, too old or replayed.
func (b *Bus) Rejected() uint64 { return b.rejected.Load() }

type message struct {
	KeyIDs []string `json:"ids,omitempty"`
	// Seqs, when set, has one entry per KeyIDs: the change's sequence
	// (tokens.Change.Seqs), so that a replica cut off from the key store
	// still refuses shared entries older than the change.
	Seqs   []int64 `json:"seqs,omitempty"`
	Tenant string  `json:"tenant,omitempty"`
	Added  bool    `json:"added,omitempty"`
	All    bool    `json:"all,omitempty"`
}

// Publish announces a change to every subscribed replica.
func (b *Bus) Publish(ctx context.Context, c tokens.Change) error {
	body, err := json.Marshal(message{KeyIDs: c.KeyIDs, Seqs: c.Seqs, Tenant: c.Tenant, Added: c.Added, All: c.All})
	if err != nil {
		return err
	}
	if err := b.rdb.Publish(ctx, b.channel, b.seal.SealMessage(body, b.now())).Err(); err != nil {
		return fmt.Errorf("rediscache: publish: %w", err)
	}
	return nil
}

// Subscribe calls fn for every change published, until ctx ends. go-redis
// resubscribes after a lost connection. Changes published meanwhile are
// not reported again: the bus only makes changes arrive sooner; every
// change is in the key store, whose watch catches up on what it missed,
// and shared entries older than a change are refused by version. So a
// resubscription (a Redis blip, a failover) drops no cache.
func (b *Bus) Subscribe(ctx context.Context, fn func(tokens.Change)) error {
	master, closeSentinels := b.masterWatch()
	defer closeSentinels()
	var poll <-chan time.Time
	var lastMaster string
	if master != nil {
		t := time.NewTicker(masterPoll)
		defer t.Stop()
		poll = t.C
		lastMaster = master(ctx)
	}
	ps, unsub := b.subscribe(ctx, lastMaster)
	defer func() { unsub() }()
	ch := ps.ChannelWithSubscriptions(redis.WithChannelSize(1000))
	// On Cluster the subscription is on one node (the master of the
	// channel's slot), and go-redis reconnects it to the node its topology
	// names, which it reloads once a minute: reload it every second, so
	// that a subscription whose node died moves to the replica that took
	// over as soon as the cluster says so.
	var reload <-chan time.Time
	cluster, _ := b.rdb.(*redis.ClusterClient)
	if cluster != nil {
		t := time.NewTicker(topologyReload)
		defer t.Stop()
		reload = t.C
	}
	subscribed := false
	seen := replays{}
	var lastLog time.Time
	// Liveness: a subscription on a connection that went half-open (a
	// frozen proxy, a NAT that forgot it) receives nothing and go-redis
	// never notices (its PING write succeeds). Every replica publishes an
	// empty sealed message each beat; a subscription that hears nothing
	// for silentAfter is replaced.
	beat := time.NewTicker(busBeat)
	defer beat.Stop()
	lastHeard := b.now()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-beat.C:
			pctx, cancel := context.WithTimeout(ctx, busBeat/2)
			b.Publish(pctx, tokens.Change{}) // an error shows as silence
			cancel()
			if subscribed && b.now().Sub(lastHeard) > silentAfter {
				b.log.Warn("invalidation subscription silent; subscribing again (the key store's watch covers what was published meanwhile)",
					zap.Duration("silent_for", b.now().Sub(lastHeard)))
				unsub()
				ps, unsub = b.subscribe(ctx, lastMaster)
				ch = ps.ChannelWithSubscriptions(redis.WithChannelSize(1000))
				subscribed, lastHeard = false, b.now()
			}
		case <-reload:
			cluster.ReloadState(ctx)
		case <-poll:
			m := master(ctx)
			if m == "" || m == lastMaster {
				continue
			}
			b.log.Info("redis master changed; subscribing on the new one (the key store's watch covers what was published meanwhile)",
				zap.String("from", lastMaster), zap.String("to", m))
			unsub()
			ps, unsub = b.subscribe(ctx, m)
			ch = ps.ChannelWithSubscriptions(redis.WithChannelSize(1000))
			lastMaster = m
		case m, ok := <-ch:
			if !ok {
				return errors.New("rediscache: subscription closed")
			}
			switch m := m.(type) {
			case *redis.Subscription:
				lastHeard = b.now()
				if m.Kind == "subscribe" {
					if subscribed {
						b.log.Info("invalidation channel resubscribed; the key store's watch covers what was published meanwhile")
					}
					subscribed = true
				}
			case *redis.Message:
				now := b.now()
				lastHeard = now
				c, err := b.open(m.Payload, now, seen)
				if err != nil {
					b.rejected.Add(1)
					if now.Sub(lastLog) >= time.Second {
						lastLog = now
						b.log.Warn("invalidation message dropped: not from a replica of this deployment, or replayed (is anyone else publishing?)",
							zap.String("reason", err.Error()), zap.Int("bytes", len(m.Payload)), zap.Uint64("rejected_total", b.rejected.Load()))
					}
					continue
				}
				if c.KeyIDs == nil && c.Tenant == "" && !c.Added && !c.All {
					continue // a beat
				}
				fn(c)
			}
		}
	}
}

// replays holds the tags of messages applied within the window, each until
// it leaves the window: a message can only be replayed while it is in it.
// Only sealed messages enter, so its size follows the rate of real changes.
type replays map[[32]byte]int64

func (r replays) seen(tag [32]byte, sent, now time.Time) bool {
	if _, ok := r[tag]; ok {
		return true
	}
	if len(r) >= 1024 {
		for t, until := range r {
			if until < now.UnixNano() {
				delete(r, t)
			}
		}
	}
	r[tag] = sent.Add(MessageWindow).UnixNano()
	return false
}

// open authenticates and decodes one message received at now.
func (b *Bus) open(payload string, now time.Time, seen replays) (tokens.Change, error) {
	body, sent, tag, err := b.seal.OpenMessage([]byte(payload))
	if err != nil {
		return tokens.Change{}, err
	}
	if d := now.Sub(sent); d > MessageWindow || d < -MessageWindow {
		return tokens.Change{}, fmt.Errorf("sent %v from this replica's clock, beyond %v", d.Round(time.Millisecond), MessageWindow)
	}
	var m message
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return tokens.Change{}, fmt.Errorf("sealed, but unreadable: %w", err)
	}
	for _, id := range m.KeyIDs {
		if tokens.ValidateTenant(id) != nil { // key ids share the tenant alphabet
			return tokens.Change{}, errors.New("sealed, but names an invalid key id")
		}
	}
	if m.Tenant != "" && tokens.ValidateTenant(m.Tenant) != nil {
		return tokens.Change{}, errors.New("sealed, but names an invalid tenant")
	}
	if len(m.Seqs) != 0 && len(m.Seqs) != len(m.KeyIDs) {
		return tokens.Change{}, errors.New("sealed, but its sequences do not match its keys")
	}
	if seen.seen(tag, sent, now) {
		return tokens.Change{}, errors.New("a copy of a message already applied")
	}
	return tokens.Change{KeyIDs: m.KeyIDs, Seqs: m.Seqs, Tenant: m.Tenant, Added: m.Added, All: m.All, Source: "redis", SentAt: sent}, nil
}
