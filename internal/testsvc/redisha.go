package testsvc

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// RedisProcess is a redis-server (or sentinel) started by a test, on a
// loopback port of its own, in a directory of its own, killed when the
// test ends.
type RedisProcess struct {
	Addr string
	cmd  *exec.Cmd
	done chan struct{}
}

// Kill SIGKILLs the process, as a crashed host would lose it, and waits
// for it to be gone.
func (p *RedisProcess) Kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// redisServer is the redis-server binary, or the test is Unavailable.
func redisServer(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		Unavailable(t, "redis-server (Debian: apt-get install redis-server)", err)
	}
	return bin
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startRedisProcess runs redis-server with args (a config file first, if
// any) on a free port, and waits until it answers PING.
func startRedisProcess(t testing.TB, conf string, args ...string) *RedisProcess {
	t.Helper()
	bin := redisServer(t)
	dir := t.TempDir()
	port := freePort(t)
	var argv []string
	if conf != "" {
		f := filepath.Join(dir, "redis.conf")
		if err := os.WriteFile(f, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
		argv = append(argv, f)
	}
	argv = append(argv, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", dir,
		"--save", "", "--appendonly", "no", "--logfile", filepath.Join(dir, "redis.log"),
		// A replica syncs at once, not after 5 s: a master killed before
		// its replica synced cannot be failed over.
		"--repl-diskless-sync-delay", "0")
	argv = append(argv, args...)
	cmd := exec.Command(bin, argv...)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	p := &RedisProcess{Addr: fmt.Sprintf("127.0.0.1:%d", port), cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(p.Kill)
	rdb := redis.NewClient(&redis.Options{Addr: p.Addr})
	defer rdb.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := rdb.Ping(ctx).Err()
		cancel()
		if err == nil {
			return p
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			t.Fatalf("redis-server on %s did not answer: %v\n%s", p.Addr, err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// RedisCluster is a Redis Cluster of 3 masters, each with one replica.
// Nodes declare a peer failed after a second, so a replica takes over a
// killed master's slots a second or two later, and keep serving the slots
// they hold meanwhile (cluster-require-full-coverage no: with Redis's
// default, every node refuses every command until the failover).
type RedisCluster struct {
	Nodes []*RedisProcess
}

// URL is a cluster-mode EXTAUTHZ_REDIS_URL naming every node.
func (c *RedisCluster) URL() string {
	u := "redis://" + c.Nodes[0].Addr + "?"
	for _, n := range c.Nodes[1:] {
		u += "addr=" + n.Addr + "&"
	}
	return strings.TrimSuffix(u, "&")
}

// Node is the process at addr.
func (c *RedisCluster) Node(addr string) *RedisProcess {
	for _, n := range c.Nodes {
		if n.Addr == addr {
			return n
		}
	}
	return nil
}

// NewRedisCluster starts six nodes and makes a cluster of them.
func NewRedisCluster(t testing.TB) *RedisCluster {
	t.Helper()
	c := &RedisCluster{}
	addrs := make([]string, 6)
	for i := range addrs {
		c.Nodes = append(c.Nodes, startRedisProcess(t, "", "--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
			"--cluster-require-full-coverage", "no"))
		addrs[i] = c.Nodes[i].Addr
	}
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		Unavailable(t, "redis-cli (Debian: apt-get install redis-tools)", err)
	}
	out, err := exec.Command(cli, append(append([]string{"--cluster", "create"}, addrs...), "--cluster-replicas", "1", "--cluster-yes")...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	// Every node must agree the cluster is up before clients use it.
	deadline := time.Now().Add(20 * time.Second)
	for _, n := range c.Nodes {
		rdb := redis.NewClient(&redis.Options{Addr: n.Addr})
		until(t, deadline, "cluster ok on "+n.Addr, func() (bool, any) {
			info, _ := rdb.ClusterInfo(context.Background()).Result()
			return strings.Contains(info, "cluster_state:ok"), info
		})
		rdb.Close()
	}
	for _, n := range c.Nodes {
		waitReplicaSynced(t, n.Addr, deadline)
	}
	return c
}

// waitReplicaSynced waits until the server at addr, if a replica, has
// synced with its master.
func waitReplicaSynced(t testing.TB, addr string, deadline time.Time) {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	until(t, deadline, "replica "+addr+" synced", func() (bool, any) {
		info, _ := rdb.Info(context.Background(), "replication").Result()
		return strings.Contains(info, "role:master") || strings.Contains(info, "master_link_status:up"), info
	})
}

// until polls cond until it holds, failing the test past deadline with
// the state cond last reported.
func until(t testing.TB, deadline time.Time, what string, cond func() (bool, any)) {
	t.Helper()
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not by the deadline: %v", what, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// RedisSentinel is a master, its replica and three sentinels watching it
// under the name "mymaster", declaring it down after a second.
type RedisSentinel struct {
	Master, Replica *RedisProcess
	Sentinels       []*RedisProcess
}

// URL is a sentinel-mode EXTAUTHZ_REDIS_URL naming every sentinel.
func (s *RedisSentinel) URL() string {
	u := "redis://" + s.Sentinels[0].Addr + "?master_name=mymaster"
	for _, n := range s.Sentinels[1:] {
		u += "&addr=" + n.Addr
	}
	return u
}

// NewRedisSentinel starts the master, the replica and the sentinels, and
// waits until every sentinel knows the replica and the other sentinels.
func NewRedisSentinel(t testing.TB) *RedisSentinel {
	t.Helper()
	s := &RedisSentinel{Master: startRedisProcess(t, "")}
	host, port, _ := net.SplitHostPort(s.Master.Addr)
	s.Replica = startRedisProcess(t, "", "--replicaof", host, port)
	conf := fmt.Sprintf("sentinel monitor mymaster %s %s 2\n"+
		"sentinel down-after-milliseconds mymaster 1000\n"+
		"sentinel failover-timeout mymaster 3000\n"+
		"sentinel parallel-syncs mymaster 1\n", host, port)
	for range 3 {
		s.Sentinels = append(s.Sentinels, startRedisProcess(t, conf, "--sentinel"))
	}
	deadline := time.Now().Add(20 * time.Second)
	waitReplicaSynced(t, s.Replica.Addr, deadline)
	for _, n := range s.Sentinels {
		sc := redis.NewSentinelClient(&redis.Options{Addr: n.Addr})
		until(t, deadline, "sentinel "+n.Addr+" knows the replica and the others", func() (bool, any) {
			m, _ := sc.Master(context.Background(), "mymaster").Result()
			return m["num-slaves"] == "1" && m["num-other-sentinels"] == "2", m
		})
		sc.Close()
	}
	return s
}
