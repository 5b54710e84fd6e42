package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/extauthz/extauthz/internal/tokens"
)

// keysShow prints one key as keys list does.
func keysShow(ctx context.Context, c *keysCmd, args []string) error {
	fs := flag.NewFlagSet("show", flag.ContinueOnError)
	rest, err := parseFlags(fs, args, 1)
	if err != nil {
		return err
	}
	if len(rest) != 1 {
		return usagef("keys show: want one key id")
	}
	k, err := c.store.KeyByID(ctx, rest[0])
	if errors.Is(err, tokens.ErrNotFound) {
		return fmt.Errorf("no key %s", quoted(rest[0]))
	}
	if err != nil {
		return err
	}
	return writeJSON(c.env.stdout, keyJSON(k, c.now()))
}

// keysIdentify reads a credential from stdin and prints the key it is, if
// its secret verifies: the way to find which key a leaked or reported
// credential belongs to. Never from argv, which shell history and process
// lists keep.
func keysIdentify(ctx context.Context, c *keysCmd, args []string) error {
	fs := flag.NewFlagSet("identify", flag.ContinueOnError)
	if _, err := parseFlags(fs, args, 0); err != nil {
		if _, help := err.(helpRequest); help {
			return err
		}
		return usagef("keys identify reads the credential from stdin, never from arguments: extauthz keys identify < file")
	}
	// A credential is at most 4 KiB; read no more than twice that.
	line, err := bufio.NewReader(io.LimitReader(c.env.stdin, 8<<10)).ReadString('\n')
	if err != nil && line == "" {
		return usagef("keys identify: no credential on stdin")
	}
	cred, err := tokens.ParseCredential(strings.TrimSpace(line))
	if err != nil {
		return usagef("keys identify: not a credential: %v", err)
	}
	auth := tokens.NewAuthenticator(c.hasher, c.store, tokens.Options{CacheSize: 1, StoreTimeout: 10 * time.Second})
	res, err := auth.AuthenticateAt(ctx, cred, c.now())
	switch {
	case errors.Is(err, tokens.ErrUnknown):
		return errors.New("no key matches this credential (unknown, or a wrong secret)")
	case err != nil && res.KeyID == "":
		return err
	}
	k, err := c.store.KeyByID(ctx, res.KeyID)
	if err != nil {
		return fmt.Errorf("key %s: %w", strconv.Quote(res.KeyID), err)
	}
	return writeJSON(c.env.stdout, keyJSON(k, c.now()))
}
