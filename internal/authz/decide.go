// Package authz speaks Envoy: it turns an ext_authz CheckRequest (or an
// HTTP check) into a credential, asks the tokens authenticator, and answers
// with a CheckResponse whose status is always explicit. A denial is a
// response; only an outage is an RPC error, so that the operator's
// failure_mode_allow / status_on_error decide what an outage means.
package authz

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/extauthz/extauthz/internal/tokens"
)

// Authenticator resolves a credential at a time; *tokens.Authenticator is
// one.
type Authenticator interface {
	AuthenticateAt(ctx context.Context, c tokens.Credential, now time.Time) (tokens.Result, error)
}

// Reason is the outcome of a check.
type Reason uint8

// Outcomes. The strings are the "reason" of deny bodies and metrics.
const (
	Allowed Reason = iota
	AllowedPublic
	MissingCredential
	MalformedCredential
	AmbiguousCredential
	InvalidCredential
	Expired
	Revoked
	InsufficientScope
	MalformedPath // a path that cannot be judged safely: 400
	Unavailable   // an outage: the RPC fails, no decision
	numReasons
)

var reasonNames = [numReasons]string{
	"allowed", "public", "missing_credential", "malformed_credential", "ambiguous_credential",
	"invalid_credential", "expired", "revoked", "insufficient_scope", "malformed_path", "unavailable",
}

func (r Reason) String() string { return reasonNames[r] }

// Reasons lists every outcome, for metrics.
func Reasons() []Reason {
	out := make([]Reason, numReasons)
	for i := range out {
		out[i] = Reason(i)
	}
	return out
}

// Allow reports whether the outcome lets the request through.
func (r Reason) Allow() bool { return r == Allowed || r == AllowedPublic }

// Result is "allow", "deny" or "error", for metrics.
func (r Reason) Result() string {
	switch {
	case r.Allow():
		return "allow"
	case r == Unavailable:
		return "error"
	}
	return "deny"
}

// ErrorName is the "error" of a deny body: "forbidden" for a 403,
// "bad_request" for a 400, "unauthenticated" for every other denial.
func (r Reason) ErrorName() string {
	switch r.HTTPStatus() {
	case 403:
		return "forbidden"
	case 400:
		return "bad_request"
	}
	return "unauthenticated"
}

// identityHeaders are the headers extauthz sets for the upstream; on a
// public route, where no key is checked, they are removed instead.
var identityHeaders = []string{HeaderTenant, HeaderKeyID, HeaderScopes}

// identity lists the headers an allow sets for the upstream, n of them:
// the tenant, the key id, and the scopes only when the key has some
// (removals then drops the header instead).
func identity(p *tokens.Principal) (h [3][2]string, n int) {
	h = [3][2]string{{HeaderTenant, p.TenantID}, {HeaderKeyID, p.KeyID}, {HeaderScopes, p.ScopesHeader}}
	if p.ScopesHeader == "" {
		return h, 2
	}
	return h, 3
}

// allowMetadata is an allow's dynamic metadata, all strings: Envoy's
// rate-limit actions match only strings.
func allowMetadata(p *tokens.Principal) [3][2]string {
	return [3][2]string{{"tenant_id", p.TenantID}, {"key_id", p.KeyID}, {"scopes", p.ScopesHeader}}
}

// removals appends to dst the request headers an allow removes: the
// credential header (EXTAUTHZ_STRIP_CREDENTIAL), and the scopes header when
// the key has no scopes, so that it is never sent empty nor passed on from
// the client.
func (s *Service) removals(dst []string, d *Decision) []string {
	if d.Result.Principal.ScopesHeader == "" {
		dst = append(dst, HeaderScopes)
	}
	if s.opts.StripCredential && d.From != "" {
		dst = append(dst, d.From)
	}
	return dst
}

// HTTPStatus is the status a client sees for the outcome.
func (r Reason) HTTPStatus() int {
	switch r {
	case Allowed, AllowedPublic:
		return 200
	case InsufficientScope:
		return 403
	case MalformedPath:
		return 400
	case Unavailable:
		return 503
	}
	return 401
}

// Observer records each check's outcome and latency; cmd wires it to
// Prometheus.
type Observer interface {
	Observe(r Reason, elapsed time.Duration)
}

// Request is what a check needs from the request, whichever protocol
// carried it.
type Request struct {
	HasHTTP bool // false for Envoy's network (TCP) filter
	Header  tokens.Headers
	Method  string
	Host    string
	Path    string // as sent, query included; judged in canonical form
	Scopes  string // comma-separated scopes from the route's context_extensions
	// Source is the client's address as the caller reports it (Envoy's
	// attributes.source, the HTTP peer): for logs.
	Source string
	ID     string // request id, for logs; "": the x-request-id header
}

// Decision is the outcome of a check.
type Decision struct {
	Reason Reason
	// From is the header the credential came from, "" if none.
	From string
	// Result is set when the key is known: the principal on allow, the key
	// and tenant ids on revoked, expired and insufficient scope.
	Result tokens.Result
}

// Options configure a Service.
type Options struct {
	Extractor *tokens.Extractor
	Routes    *Routes // nil: no route rules; Service.SetRoutes replaces them
	Paths     PathOptions
	// Forwarded is the header family a forward-auth proxy's original
	// request is read from (EXTAUTHZ_FORWARDED_HEADERS); the other family
	// is never read. Default ForwardedXForwarded.
	Forwarded       ForwardedHeaders
	StripCredential bool
	Realm           string // of www-authenticate; default "extauthz"
	Logger          *zap.Logger
	Observer        Observer // nil: none
	Usage           Usage    // nil: usage is not recorded
	// ProtoCodec serves gRPC with the stock protobuf codec instead of the
	// lean decoder and encoder: slower, kept to compare and as a fallback.
	ProtoCodec bool
	// MaxHeaders bounds the header lines of one check
	// (EXTAUTHZ_MAX_HEADERS); past it the check is refused before any
	// work. 0: DefaultMaxHeaders.
	MaxHeaders int
}

// Usage records that a key was used at a time; *tokens.UsageRecorder is
// one. It must not block.
type Usage interface {
	RecordAt(keyID string, at time.Time)
}

// Service decides checks. It is safe for concurrent use.
type Service struct {
	auth Authenticator
	opts Options
	log  *zap.Logger
	// routes are the route rules in force: Options.Routes, then whatever
	// SetRoutes installs (a reloaded file).
	routes atomic.Pointer[Routes]
	// public and denies are prebuilt, read-only responses.
	public prebuilt
	denies [numReasons]prebuilt
}

// DefaultMaxHeaders is well above what Envoy forwards by default (100
// request headers, plus its own).
const DefaultMaxHeaders = 256

// NewService builds a Service.
func NewService(a Authenticator, o Options) *Service {
	if o.MaxHeaders <= 0 {
		o.MaxHeaders = DefaultMaxHeaders
	}
	if o.Extractor == nil {
		o.Extractor = tokens.NewExtractor(tokens.DefaultSources)
	}
	if o.Realm == "" {
		o.Realm = "extauthz"
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	s := &Service{auth: a, opts: o, log: o.Logger}
	s.routes.Store(o.Routes)
	s.buildResponses()
	return s
}

// SetRoutes puts new route rules in force for the checks that start after
// it (nil: none). Checks in flight finish under the rules they started with.
func (s *Service) SetRoutes(r *Routes) { s.routes.Store(r) }

// Decide runs one check, and records its outcome and latency (observer,
// log) whichever protocol carried it. The error is non-nil only when no
// decision could be reached (key store down and nothing usable cached, or
// the caller gave up); Decision.Reason is then Unavailable.
func (s *Service) Decide(ctx context.Context, req *Request) (Decision, error) {
	start := time.Now()
	d, err := s.decide(ctx, req, start)
	elapsed := time.Since(start)
	if s.opts.Observer != nil {
		s.opts.Observer.Observe(d.Reason, elapsed)
	}
	s.logDecision(req, &d, err, elapsed)
	return d, err
}

func (s *Service) decide(ctx context.Context, req *Request, now time.Time) (Decision, error) {
	if !req.HasHTTP {
		return Decision{Reason: MissingCredential}, nil
	}
	path, err := CanonicalPath(req.Path, s.opts.Paths)
	if err != nil || !isToken(req.Method) {
		return Decision{Reason: MalformedPath}, nil
	}
	rules, n := s.rulesFor(req, path)
	// Every source's requirement holds: a public rule waives the key only
	// when every reading of the path is public and the route's
	// context_extensions require no scope either.
	public := !anyScope(req.Scopes)
	for _, r := range rules[:n] {
		public = public && r != nil && r.Public
	}
	if public {
		return Decision{Reason: AllowedPublic}, nil
	}
	cred, from, err := s.opts.Extractor.Extract(req.Header)
	switch {
	case errors.Is(err, tokens.ErrMissing):
		return Decision{Reason: MissingCredential}, nil
	case errors.Is(err, tokens.ErrAmbiguous):
		return Decision{Reason: AmbiguousCredential}, nil
	case err != nil:
		return Decision{Reason: MalformedCredential, From: from}, nil
	}
	res, err := s.auth.AuthenticateAt(ctx, cred, now)
	d := Decision{From: from, Result: res}
	switch {
	case err == nil:
	case errors.Is(err, tokens.ErrMalformed):
		d.Reason = MalformedCredential
		return d, nil
	case errors.Is(err, tokens.ErrUnknown):
		d.Reason = InvalidCredential
		return d, nil
	case errors.Is(err, tokens.ErrRevoked):
		d.Reason = Revoked
		return d, nil
	case errors.Is(err, tokens.ErrExpired):
		d.Reason = Expired
		return d, nil
	default:
		d.Reason = Unavailable
		return d, err
	}
	// The secret verified on an active key: that is a use, allowed or not.
	if s.opts.Usage != nil {
		s.opts.Usage.RecordAt(res.Principal.KeyID, now)
	}
	for _, r := range rules[:n] {
		if r != nil && !res.Principal.HasScopes(r.Scopes) {
			d.Reason = InsufficientScope
			return d, nil
		}
	}
	if !hasScopeList(&res.Principal, req.Scopes) {
		d.Reason = InsufficientScope
		return d, nil
	}
	d.Reason = Allowed
	return d, nil
}

// rulesFor returns the route rules that apply to a request, n of them: the
// rule of its canonical path, and with EXTAUTHZ_ENCODED_SLASHES=keep and a
// %2F in the path, also the rule of the path with %2F read as "/", which
// is what an upstream that decodes it acts on. Both must be satisfied.
func (s *Service) rulesFor(req *Request, path string) (rules [2]*Route, n int) {
	routes := s.routes.Load()
	rules[0] = routes.Match(req.Host, req.Method, path)
	if !s.opts.Paths.KeepEncodedSlashes || !strings.Contains(path, "%2F") {
		return rules, 1
	}
	rules[1] = routes.Match(req.Host, req.Method, strings.ReplaceAll(path, "%2F", "/"))
	return rules, 2
}

// isToken reports whether m is an HTTP method: an RFC 9110 token of at most
// 32 bytes. Anything else would match no rule's methods, silently.
func isToken(m string) bool {
	if m == "" || len(m) > 32 {
		return false
	}
	for i := 0; i < len(m); i++ {
		c := m[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// anyScope reports whether a comma-separated list names a scope.
func anyScope(list string) bool {
	for list != "" {
		var s string
		s, list, _ = strings.Cut(list, ",")
		if strings.TrimSpace(s) != "" {
			return true
		}
	}
	return false
}

// hasScopeList checks a comma-separated list without allocating.
func hasScopeList(p *tokens.Principal, list string) bool {
	for list != "" {
		var s string
		s, list, _ = strings.Cut(list, ",")
		if s = strings.TrimSpace(s); s != "" && !p.HasScope(s) {
			return false
		}
	}
	return true
}

// Bounds on what a decision's log line quotes from the request: a flood of
// long paths must not become a flood of log bytes.
const (
	maxLoggedMethod    = 32
	maxLoggedHost      = 256
	maxLoggedPath      = 256
	maxLoggedRequestID = 128
)

// logDecision logs allows at Debug and denials at Info, naming the reason
// and the key when known. It never logs a credential header's value or the
// query string; what it quotes from the request (method, host, path,
// request id) goes through tokens.Redact, so that a credential sent in any
// of them is replaced, and a long value is cut.
func (s *Service) logDecision(req *Request, d *Decision, err error, elapsed time.Duration) {
	lvl := zap.InfoLevel
	msg := "denied"
	switch {
	case d.Reason.Allow():
		lvl, msg = zap.DebugLevel, "allowed"
	case d.Reason == Unavailable:
		lvl, msg = zap.WarnLevel, "no decision"
	}
	ce := s.log.Check(lvl, msg)
	if ce == nil {
		return
	}
	path := req.Path
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	fields := []zap.Field{
		zap.String("reason", d.Reason.String()),
		zap.String("method", tokens.Redact(req.Method, maxLoggedMethod)),
		zap.String("host", tokens.Redact(req.Host, maxLoggedHost)),
		zap.String("path", tokens.Redact(path, maxLoggedPath)),
		zap.Duration("elapsed", elapsed),
	}
	if d.Result.KeyID != "" {
		fields = append(fields, zap.String("key_id", d.Result.KeyID), zap.String("tenant_id", d.Result.TenantID))
	}
	if d.From != "" {
		fields = append(fields, zap.String("credential_header", d.From))
	}
	id := req.ID
	if id == "" && req.Header != nil {
		id, _ = req.Header.Get("x-request-id")
	}
	if id != "" {
		fields = append(fields, zap.String("request_id", tokens.Redact(id, maxLoggedRequestID)))
	}
	if req.Source != "" {
		// An address is short, but the field is the caller's to fill.
		fields = append(fields, zap.String("client_address", tokens.Redact(req.Source, maxLoggedRequestID)))
	}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	ce.Write(fields...)
}
