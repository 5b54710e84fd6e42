package main

import (
	"context"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/extauthz/extauthz/internal/testsvc"
)

// A key revoked by the CLI while the replicas are cut off from Postgres
// reaches them over the Redis bus: from a second after the revoke, no
// replica allows it (it may fail the check: the store is down and the
// cached allow is gone).
func TestCLIRevokeDuringPostgresCut(t *testing.T) {
	c := newCluster(t, true)
	id, cred := c.newKey("")
	pg := testsvc.NewProxy(t, "127.0.0.1:5432")
	rc := withEnv(c.cli, "EXTAUTHZ_STORE", proxiedDSN(t, c.dsn, pg.Addr()))
	r1, r2 := startReplica(t, rc), startReplica(t, rc)
	var clients []authv3.AuthorizationClient
	for _, r := range []*replica{r1, r2} {
		a, _ := r.srv.client(t)
		clients = append(clients, a)
		for range 3 {
			if !r.allowed(cred) {
				t.Fatal("fresh key denied")
			}
		}
	}
	time.Sleep(200 * time.Millisecond) // the shared write-backs land
	pg.Cut()
	c.ok("", "keys", "revoke", id)
	committed := time.Now()
	deadline := committed.Add(propagationDeadline())
	for time.Now().Before(committed.Add(3 * time.Second)) {
		for i, a := range clients {
			r, err := a.Check(context.Background(), checkReq(map[string]string{"x-api-key": cred}))
			if err == nil && r.GetStatus().GetCode() == 0 && time.Now().After(deadline) {
				t.Fatalf("replica %d allowed the key %v after the CLI revoked it", i+1, time.Since(committed))
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	pg.Restore()
}
