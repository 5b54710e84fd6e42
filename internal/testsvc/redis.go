package testsvc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultRedisURL is used when EXTAUTHZ_TEST_REDIS is unset.
const DefaultRedisURL = "redis://127.0.0.1:6379/0"

// RedisURL is the server tests use.
func RedisURL() string { return envOr("EXTAUTHZ_TEST_REDIS", DefaultRedisURL) }

// NewRedis returns a client and a key prefix of this test's own; every key
// under the prefix is deleted when the test ends.
func NewRedis(t testing.TB) (*redis.Client, string) {
	t.Helper()
	o, err := redis.ParseURL(RedisURL())
	if err != nil {
		t.Fatalf("EXTAUTHZ_TEST_REDIS: %v", err)
	}
	rdb := redis.NewClient(o)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		rdb.Close()
		Unavailable(t, "Redis", err)
	}
	var b [6]byte
	rand.Read(b[:])
	prefix := "extauthz-test:" + hex.EncodeToString(b[:]) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		iter := rdb.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			rdb.Del(ctx, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Errorf("redis cleanup: %v", err)
		}
		rdb.Close()
	})
	return rdb, prefix
}
