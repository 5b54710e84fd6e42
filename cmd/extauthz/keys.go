package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/rediscache"
)

// keys dispatches the keys subcommands.
func keys(ctx context.Context, cfg Config, args []string, e *env) error {
	if len(args) == 0 {
		return usagef("keys needs a subcommand: create, list, show, identify, revoke, delete or import (extauthz keys help)")
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "help", "-h", "--help":
		fmt.Fprint(e.stdout, keysUsage)
		return nil
	}
	run, ok := map[string]func(context.Context, *keysCmd, []string) error{
		"create": keysCreate, "list": keysList, "show": keysShow, "identify": keysIdentify,
		"revoke": keysRevoke, "delete": keysDelete, "import": keysImport,
	}[sub]
	if !ok {
		return usagef("unknown keys subcommand %s (want create, list, show, identify, revoke, delete or import)", quoted(sub))
	}
	// Help needs no store: answered before one is opened.
	if slices.Contains(args, "-h") || slices.Contains(args, "-help") || slices.Contains(args, "--help") {
		err := run(ctx, &keysCmd{env: e}, args)
		var help helpRequest
		if errors.As(err, &help) {
			fmt.Fprint(e.stdout, help.text)
			return nil
		}
		return err
	}
	log := newLogger(zapcore.WarnLevel, e.stderr)
	h, err := newHasher(&cfg)
	if err != nil {
		return err
	}
	st, err := openStore(ctx, &cfg, log)
	if err != nil {
		return err
	}
	defer st.Close()
	kc := &keysCmd{store: st, hasher: h, env: e, now: time.Now}
	if cfg.RedisURL != "" {
		rdb, err := rediscache.NewClient(cfg.RedisURL, cfg.RedisMode)
		if err != nil {
			return fmt.Errorf("EXTAUTHZ_REDIS_URL: %w", err)
		}
		defer rdb.Close()
		kc.shared, kc.bus = rediscache.New(rdb, cfg.RedisPrefix), rediscache.NewBus(rdb, cfg.RedisPrefix, h.SharedSealer(cfg.RedisPrefix), nil)
	}
	err = run(ctx, kc, args)
	if err != nil {
		var ue usageError
		if !errors.As(err, &ue) {
			err = fmt.Errorf("keys %s: %w", sub, err)
		}
	}
	return err
}

type keysCmd struct {
	store  tokens.Store
	hasher *tokens.Hasher
	env    *env
	now    func() time.Time
	shared *rediscache.Cache // nil without Redis
	bus    *rediscache.Bus
}

// notify tells every replica, through Redis, that these keys changed, and
// deletes their shared entries. With Postgres the trigger's NOTIFY does
// the same, so this is a second path, not the only one; a failure is a
// warning, since the change itself is stored.
//
// seqs, when known, are the changes' versions (one per id, 0: unknown):
// a replica cut off from the key store then still refuses shared entries
// written before the change, which a write-back racing this Forget can
// put back; without them it relies on a two-second tombstone.
func (c *keysCmd) notify(ctx context.Context, ids []string, seqs []int64) {
	if c.bus == nil || len(ids) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := c.shared.Forget(ctx, ids)
	if err == nil {
		err = c.bus.Publish(ctx, tokens.Change{KeyIDs: ids, Seqs: seqs})
	}
	if err != nil {
		fmt.Fprintf(c.env.stderr, "extauthz: warning: stored, but Redis could not be told (%v); replicas still learn through the key store\n", err)
	}
}

// versions reads the keys' versions plus add, for notify; nil when Redis
// is not configured or any is unknown (notify then sends none).
func (c *keysCmd) versions(ctx context.Context, ids []string, add int64) []int64 {
	if c.bus == nil {
		return nil
	}
	out := make([]int64, len(ids))
	for i, id := range ids {
		k, err := c.store.KeyByID(ctx, id)
		if err != nil || k.Version <= 0 {
			return nil
		}
		out[i] = k.Version + add
	}
	return out
}

// keysUsage is `extauthz keys help`.
const keysUsage = `usage: extauthz keys <command> [flags]

commands:
  create --tenant T [--name N] [--scopes a,b] [--ttl 30d] [--kind pair|token]
                        make a key; prints it once, with its secret, as JSON
  list [--tenant T]     every key (revoked ones too), one JSON object a line; never a secret
  show ID               one key, as list prints it
  identify              which key a credential is: reads the credential from stdin, never
                        from the command line (shell history), and verifies its secret
  revoke ID | revoke --tenant T
                        revoke a key, or every key of a tenant, on every replica within a second
  delete ID             delete a key
  import                JSON lines {"token","tenant_id","scopes","name"[,"expires_at"]} on stdin;
                        all or nothing

extauthz keys <command> --help lists a command's flags.
`

// keysSynopsis is the first line of a subcommand's help.
var keysSynopsis = map[string]string{
	"create": "extauthz keys create --tenant T [flags]", "list": "extauthz keys list [--tenant T]",
	"show": "extauthz keys show ID", "identify": "extauthz keys identify < file (the credential on stdin, never as an argument)",
	"revoke": "extauthz keys revoke ID | extauthz keys revoke --tenant T", "delete": "extauthz keys delete ID",
	"import": "extauthz keys import < tokens.jsonl",
}

// helpRequest is a subcommand's --help: its text, printed on stdout.
type helpRequest struct{ text string }

func (h helpRequest) Error() string { return "help requested" }

// parseFlags parses a subcommand's flags quietly: errors become one line,
// and positional arguments may only come after flags. --help returns a
// helpRequest with the flags' descriptions.
func parseFlags(fs *flag.FlagSet, args []string, maxPositional int) ([]string, error) {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		var b strings.Builder
		b.WriteString("usage: " + keysSynopsis[fs.Name()] + "\n")
		fs.SetOutput(&b)
		fs.PrintDefaults()
		return nil, helpRequest{b.String()}
	} else if err != nil {
		return nil, usagef("keys %s: %s", fs.Name(), tokens.Redact(err.Error(), 200))
	}
	rest := fs.Args()
	for _, a := range rest {
		if strings.HasPrefix(a, "-") {
			return nil, usagef("keys %s: flag %s after an argument; put flags first", fs.Name(), a)
		}
	}
	if len(rest) > maxPositional {
		return nil, usagef("keys %s: unexpected argument %s", fs.Name(), quoted(rest[maxPositional]))
	}
	return rest, nil
}

// quoted shows an argument in an error: a credential pasted where an id or
// a tenant belongs is not printed back (only keys create prints a secret),
// and a long one is cut.
func quoted(arg string) string { return strconv.Quote(tokens.Redact(arg, 80)) }

func writeJSON(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

func rfc3339OrNil(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UTC().Format(time.RFC3339)
}

func scopesOrEmpty(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func keysCreate(ctx context.Context, c *keysCmd, args []string) error {
	fs := flag.NewFlagSet("create", flag.ContinueOnError)
	tenant := fs.String("tenant", "", "tenant id (required)")
	name := fs.String("name", "", "a name for people")
	scopes := fs.String("scopes", "", "comma-separated scopes")
	var ttl lifetime
	fs.Var(&ttl, "ttl", "lifetime: a number of days (30d) or a duration (720h, 90m); default: never expires")
	kind := fs.String("kind", "pair", "pair or token")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *tenant == "" {
		return usagef("keys create: --tenant is required")
	}
	k, err := tokens.ParseKind(*kind)
	if err != nil {
		return usagef("keys create: --kind: %v", err)
	}

	is, err := c.hasher.Issue(tokens.IssueParams{
		Tenant: *tenant, Name: *name, Kind: k, Scopes: tokens.SplitList(*scopes), TTL: time.Duration(ttl), Now: c.now(),
	})
	if err != nil {
		return usagef("keys create: %v", err)
	}
	if err := c.store.Create(ctx, is.Key); err != nil {
		return err
	}
	out := map[string]any{
		"id": is.Key.ID, "tenant_id": is.Key.TenantID, "name": is.Key.Name, "kind": k.String(),
		"scopes": scopesOrEmpty(is.Key.Scopes), "expires_at": rfc3339OrNil(is.Key.ExpiresAt),
		"credential": is.Credential,
	}
	if k == tokens.KindPair {
		out["public_key"], out["secret_key"] = is.PublicKey, is.SecretKey
	}
	return writeJSON(c.env.stdout, out)
}

func keysList(ctx context.Context, c *keysCmd, args []string) error {
	fs := flag.NewFlagSet("list", flag.ContinueOnError)
	tenant := fs.String("tenant", "", "only this tenant's keys")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	ks, err := c.store.List(ctx, *tenant)
	if err != nil {
		return err
	}
	now := c.now()
	for _, k := range ks {
		if err := writeJSON(c.env.stdout, keyJSON(k, now)); err != nil {
			return err
		}
	}
	return nil
}

// lifetime is --ttl: a Go duration, or whole days ("30d"), which
// time.ParseDuration does not take.
type lifetime time.Duration

func (l *lifetime) String() string { return time.Duration(*l).String() }

func (l *lifetime) Set(s string) error {
	var d time.Duration
	var err error
	if days, ok := strings.CutSuffix(s, "d"); ok {
		var n int
		if n, err = strconv.Atoi(days); err == nil && n <= 100*365 {
			d = time.Duration(n) * 24 * time.Hour
		}
	} else {
		d, err = time.ParseDuration(s)
	}
	if err != nil || d <= 0 || d > 100*365*24*time.Hour {
		return fmt.Errorf("%q: want a positive number of days (30d) or a duration (720h, 90m)", s)
	}
	*l = lifetime(d)
	return nil
}

// keyJSON is a key as list, show and identify print it: never a secret or
// a digest.
func keyJSON(k *tokens.Key, now time.Time) map[string]any {
	out := map[string]any{
		"id": k.ID, "tenant_id": k.TenantID, "name": k.Name, "kind": k.Kind.String(),
		"scopes": scopesOrEmpty(k.Scopes), "status": k.Status(now),
		"created_at": rfc3339OrNil(k.CreatedAt), "expires_at": rfc3339OrNil(k.ExpiresAt),
		"last_used_at": rfc3339OrNil(k.LastUsedAt), "request_count": k.RequestCount,
	}
	if k.Kind == tokens.KindPair {
		out["public_key"] = k.PublicKey
	}
	return out
}

func keysRevoke(ctx context.Context, c *keysCmd, args []string) error {
	fs := flag.NewFlagSet("revoke", flag.ContinueOnError)
	tenant := fs.String("tenant", "", "revoke every key of this tenant")
	rest, err := parseFlags(fs, args, 1)
	if err != nil {
		return err
	}
	switch {
	case *tenant != "" && len(rest) > 0:
		return usagef("keys revoke: give an ID or --tenant, not both")
	case *tenant != "":
		ids, err := c.store.RevokeTenant(ctx, *tenant, c.now())
		if err != nil {
			return err
		}
		if len(ids) == 0 {
			// Nothing revoked: a misspelt tenant must not pass for success.
			ks, err := c.store.List(ctx, *tenant)
			if err != nil {
				return err
			}
			if len(ks) == 0 {
				return fmt.Errorf("no keys for tenant %s; nothing revoked", quoted(*tenant))
			}
			fmt.Fprintf(c.env.stderr, "extauthz: every key of tenant %s was already revoked\n", quoted(*tenant))
			return nil
		}
		c.notify(ctx, ids, c.versions(ctx, ids, 0))
		for _, id := range ids {
			if err := writeJSON(c.env.stdout, map[string]any{"id": id, "tenant_id": *tenant, "status": "revoked"}); err != nil {
				return err
			}
		}
		return nil
	case len(rest) == 0:
		return usagef("keys revoke: give a key ID or --tenant T")
	}
	if err := c.store.Revoke(ctx, rest[0], c.now()); err != nil {
		if errors.Is(err, tokens.ErrNotFound) {
			return fmt.Errorf("no key with id %s", quoted(rest[0]))
		}
		return err
	}
	c.notify(ctx, rest[:1], c.versions(ctx, rest[:1], 0))
	return writeJSON(c.env.stdout, map[string]any{"id": rest[0], "status": "revoked"})
}

func keysDelete(ctx context.Context, c *keysCmd, args []string) error {
	fs := flag.NewFlagSet("delete", flag.ContinueOnError)
	rest, err := parseFlags(fs, args, 1)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return usagef("keys delete: give a key ID")
	}
	// Read before: once deleted, the key has no version. Every shared entry
	// of it was read at that version or before.
	seqs := c.versions(ctx, rest[:1], 1)
	if err := c.store.Delete(ctx, rest[0]); err != nil {
		if errors.Is(err, tokens.ErrNotFound) {
			return fmt.Errorf("no key with id %s", quoted(rest[0]))
		}
		return err
	}
	c.notify(ctx, rest[:1], seqs)
	return writeJSON(c.env.stdout, map[string]any{"id": rest[0], "status": "deleted"})
}

// importLine is one line of keys import. expires_at is optional.
type importLine struct {
	Token     string     `json:"token"`
	TenantID  string     `json:"tenant_id"`
	Scopes    []string   `json:"scopes"`
	Name      string     `json:"name"`
	ExpiresAt *time.Time `json:"expires_at"`
}

// maxImportLine bounds one line: a token is at most 512 bytes.
const maxImportLine = 64 << 10

func keysImport(ctx context.Context, c *keysCmd, args []string) error {
	fs := flag.NewFlagSet("import", flag.ContinueOnError)
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	now := c.now()
	var (
		batch   []*tokens.Key
		lineNos []int
		seen    = map[tokens.Digest]int{}
	)
	sc := bufio.NewScanner(c.env.stdin)
	sc.Buffer(make([]byte, 0, 4096), maxImportLine)
	for n := 1; sc.Scan(); n++ {
		raw := bytes.TrimSpace(sc.Bytes())
		if len(raw) == 0 {
			continue
		}
		// Errors name the line, never its token.
		var l importLine
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&l); err != nil {
			return fmt.Errorf("line %d: not a JSON object of token, tenant_id, scopes, name, expires_at (%s); nothing imported", n, jsonProblem(err))
		}
		if dec.More() {
			return fmt.Errorf("line %d: more than one JSON value; nothing imported", n)
		}
		if l.TenantID == "" {
			return fmt.Errorf("line %d: tenant_id is required; nothing imported", n)
		}
		var expires time.Time
		if l.ExpiresAt != nil {
			expires = l.ExpiresAt.UTC()
		}
		k, err := c.hasher.ImportToken(l.Token, l.TenantID, l.Name, l.Scopes, expires, now)
		if err != nil {
			return fmt.Errorf("line %d: %v; nothing imported", n, err)
		}
		d := c.hasher.Digest(l.Token)
		if first, dup := seen[d]; dup {
			return fmt.Errorf("line %d: same token as line %d; nothing imported", n, first)
		}
		seen[d] = n
		batch, lineNos = append(batch, k), append(lineNos, n)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return fmt.Errorf("a line is longer than %d bytes; nothing imported", maxImportLine)
		}
		return fmt.Errorf("reading stdin: %w; nothing imported", err)
	}
	if len(batch) == 0 {
		return nil
	}
	if err := c.store.Import(ctx, batch); err != nil {
		var ie *tokens.ImportError
		if errors.As(err, &ie) && ie.Index < len(lineNos) {
			if errors.Is(ie.Err, tokens.ErrConflict) {
				return fmt.Errorf("line %d: this token is already stored; nothing imported", lineNos[ie.Index])
			}
			return fmt.Errorf("line %d: %v; nothing imported", lineNos[ie.Index], ie.Err)
		}
		return fmt.Errorf("%w; nothing imported", err)
	}
	for _, k := range batch {
		if err := writeJSON(c.env.stdout, map[string]any{"id": k.ID, "tenant_id": k.TenantID}); err != nil {
			return err
		}
	}
	return nil
}

// jsonProblem describes a decode error without quoting input.
func jsonProblem(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("syntax error at byte %d", se.Offset)
	case errors.As(err, &te):
		return fmt.Sprintf("field %s has the wrong type", te.Field)
	case strings.HasPrefix(err.Error(), "json: unknown field"):
		return strings.TrimPrefix(err.Error(), "json: ")
	}
	return "invalid JSON"
}
