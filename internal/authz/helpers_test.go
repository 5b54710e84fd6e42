package authz

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/filestore"
)

var testPepper = []tokens.Pepper{{ID: "t1", Secret: []byte(strings.Repeat("p", 32))}}

// env is a real lookup chain (file store, authenticator) for one test.
type env struct {
	store  *filestore.Store
	hasher *tokens.Hasher
	auth   *tokens.Authenticator
	svc    *Service
}

func newEnv(t testing.TB, o Options) *env {
	t.Helper()
	st, err := filestore.Open(filepath.Join(t.TempDir(), "keys.json"), filestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h, err := tokens.NewHasher(testPepper)
	if err != nil {
		t.Fatal(err)
	}
	a := tokens.NewAuthenticator(h, st, tokens.Options{})
	if o.Logger == nil {
		o.Logger = zaptest.NewLogger(t)
	}
	return &env{store: st, hasher: h, auth: a, svc: NewService(a, o)}
}

// issue stores a new key and returns what a client would send.
func (e *env) issue(t testing.TB, p tokens.IssueParams) *tokens.Issued {
	t.Helper()
	if p.Tenant == "" {
		p.Tenant = "acme"
	}
	is, err := e.hasher.Issue(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.store.Create(context.Background(), is.Key); err != nil {
		t.Fatal(err)
	}
	return is
}

// failingFinder is a key store that is down.
type failingFinder struct{}

func (failingFinder) KeyByPublic(context.Context, string) (*tokens.Key, error) {
	return nil, context.DeadlineExceeded
}

func (failingFinder) KeyByDigest(context.Context, []tokens.Digest) (*tokens.Key, error) {
	return nil, context.DeadlineExceeded
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}
