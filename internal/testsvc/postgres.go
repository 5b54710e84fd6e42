// Package testsvc gives each test its own PostgreSQL database (on the server
// named by EXTAUTHZ_TEST_POSTGRES, default the local one) or Redis key prefix
// (EXTAUTHZ_TEST_REDIS), and cleans up after it. When a server is
// unreachable the test fails under CI=true and is skipped, loudly, otherwise.
package testsvc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// DefaultDSN is the admin connection used when EXTAUTHZ_TEST_POSTGRES is unset.
const DefaultDSN = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

// AdminDSN is the connection string tests create databases through.
func AdminDSN() string { return envOr("EXTAUTHZ_TEST_POSTGRES", DefaultDSN) }

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// Unavailable fails the test in CI and skips it elsewhere.
func Unavailable(t testing.TB, what string, err error) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s unreachable in CI: %v", what, err)
	}
	t.Skipf("SKIPPED: %s unreachable (%v); these tests need it (set CI=true to make this a failure)", what, err)
}

// NewDatabase creates an empty database for this test, drops it when the
// test ends, and returns its connection string.
func NewDatabase(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, AdminDSN())
	if err != nil {
		Unavailable(t, "PostgreSQL", err)
	}
	defer admin.Close(context.Background())
	var b [6]byte
	rand.Read(b[:])
	name := "extauthz_test_" + hex.EncodeToString(b[:])
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, AdminDSN())
		if err != nil {
			t.Errorf("drop database %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	u, err := url.Parse(AdminDSN())
	if err != nil {
		t.Fatalf("EXTAUTHZ_TEST_POSTGRES: %v", err)
	}
	u.Path = "/" + name
	return fmt.Sprint(u)
}
