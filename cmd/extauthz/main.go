// Command extauthz is an Envoy external-authorization server for API keys,
// and the CLI that manages them.
//
//	extauthz [serve]       run the server (the default)
//	extauthz migrate       create or upgrade the Postgres schema
//	extauthz keys ...      create, list, revoke, delete, import keys
//
// Configuration comes from EXTAUTHZ_* environment variables only; flags are
// subcommand arguments.
package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/extauthz/extauthz/internal/tokens"
	"github.com/extauthz/extauthz/internal/tokens/filestore"
	"github.com/extauthz/extauthz/internal/tokens/pgstore"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	code := realMain(ctx, os.Args[1:], &env{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, lookup: os.LookupEnv, environ: os.Environ()})
	stop()
	os.Exit(code)
}

// env is the process's outside world, injected for tests.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	lookup         func(string) (string, bool)
	environ        []string
	// ready, when set, is told the server's bound addresses (tests).
	ready func(addrs boundAddrs)
}

// usageError is a bad command line: exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

const usage = `usage: extauthz [command]

commands:
  serve                 run the authorization server (default)
  migrate               create or upgrade the Postgres schema (idempotent; needs no pepper)
  keys create --tenant T [--name N] [--scopes a,b] [--ttl 30d] [--kind pair|token]
  keys list [--tenant T]
  keys show ID
  keys identify         which key a credential (read from stdin) is
  keys revoke ID | keys revoke --tenant T
  keys delete ID
  keys import           JSON lines on stdin: {"token","tenant_id","scopes","name"}
  version

extauthz keys help, and extauthz keys <command> --help, list the flags.
Configuration is read from EXTAUTHZ_* environment variables; see README.md.
`

// realMain runs one command and returns the exit code. Errors are printed
// as one line on stderr.
func realMain(ctx context.Context, args []string, e *env) int {
	err := run(ctx, args, e)
	if err == nil {
		return 0
	}
	fmt.Fprintln(e.stderr, "extauthz: "+oneLine(err))
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

func run(ctx context.Context, args []string, e *env) error {
	cmd := "serve"
	if len(args) > 0 {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "help", "-h", "--help":
		fmt.Fprint(e.stdout, usage)
		return nil
	case "version", "--version":
		fmt.Fprintln(e.stdout, version)
		return nil
	}
	cfg, err := loadConfigWith(e.lookup, cmd != "migrate")
	if err != nil {
		return fmt.Errorf("invalid configuration: %w", err)
	}
	switch cmd {
	case "serve":
		if len(args) > 0 {
			return usagef("serve takes no arguments (configuration is EXTAUTHZ_* variables)")
		}
		return serve(ctx, cfg, e)
	case "migrate":
		if len(args) > 0 {
			return usagef("migrate takes no arguments")
		}
		return migrate(ctx, cfg, e)
	case "keys":
		return keys(ctx, cfg, args, e)
	}
	return usagef("unknown command %q (try: extauthz help)", cmd)
}

// newLogger is JSON on stderr. Sampling keeps a flood of denials from
// flooding the log: per message, the first 100 each second, then 1 in 100.
func newLogger(level zapcore.Level, w io.Writer) *zap.Logger {
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey, enc.EncodeTime = "ts", zapcore.ISO8601TimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(w), level)
	core = zapcore.NewSamplerWithOptions(core, 1e9, 100, 100)
	return zap.New(core).Named("extauthz")
}

// openStore opens the configured key store.
func openStore(ctx context.Context, cfg *Config, log *zap.Logger) (tokens.Store, error) {
	if cfg.StoreKind() == "postgres" {
		return pgstore.Open(ctx, cfg.Store, log.Named("pgstore"))
	}
	return filestore.Open(cfg.FilePath(), filestore.Options{Logger: log.Named("filestore")})
}

// peppers returns the configured peppers, or on the embedded default the
// one in DataDir/pepper, generated (mode 0600) on first use.
func peppers(cfg *Config) ([]tokens.Pepper, error) {
	if len(cfg.Peppers) > 0 {
		return cfg.Peppers, nil
	}
	if !cfg.Embedded() {
		// A generated pepper would differ per replica: only the embedded
		// default makes one (loadConfig refuses a store without peppers).
		return nil, errors.New("EXTAUTHZ_HMAC_SECRETS: required when EXTAUTHZ_STORE is set")
	}
	path := filepath.Join(cfg.DataDir, "pepper")
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		if err := createPepper(cfg.DataDir, path); err != nil {
			return nil, err
		}
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	ps, err := tokens.ParsePeppers(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ps, nil
}

// newHasher builds the hasher from the configured (or, on the embedded
// default, generated) peppers.
func newHasher(cfg *Config) (*tokens.Hasher, error) {
	ps, err := peppers(cfg)
	if err != nil {
		return nil, err
	}
	return tokens.NewHasher(ps)
}

// createPepper writes a new random pepper, unless one appears first: two
// first runs at once must agree on one pepper (O_EXCL).
func createPepper(dir, path string) error {
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("EXTAUTHZ_DATA_DIR: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	_, err = f.WriteString("local:" + base64.RawURLEncoding.EncodeToString(raw[:]) + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// migrate applies the Postgres schema.
func migrate(ctx context.Context, cfg Config, e *env) error {
	if cfg.StoreKind() != "postgres" {
		fmt.Fprintf(e.stderr, "extauthz: %s needs no migration\n", cfg.StoreDescription())
		return nil
	}
	log := newLogger(zapcore.WarnLevel, e.stderr)
	st, err := pgstore.Open(ctx, cfg.Store, log)
	if err != nil {
		return err
	}
	defer st.Close()
	applied, err := pgstore.Migrate(ctx, st.Pool())
	if err != nil {
		return err
	}
	if applied == nil {
		applied = []int{}
	}
	return writeJSON(e.stdout, map[string]any{"schema_version": pgstore.LatestVersion(), "applied": applied})
}
