package authz

import (
	"context"
	"errors"
	"strings"
	"unsafe"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/extauthz/extauthz/internal/tokens"
)

// Header names injected for the upstream.
const (
	HeaderTenant = "x-tenant-id"
	HeaderKeyID  = "x-api-key-id"
	HeaderScopes = "x-api-key-scopes"
)

// MetadataNamespace is where Envoy stores our dynamic metadata.
const MetadataNamespace = "envoy.filters.http.ext_authz"

// AuthorizationService is the gRPC health service name of the check API.
const AuthorizationService = "envoy.service.auth.v3.Authorization"

// GRPC adapts a Service to envoy.service.auth.v3.Authorization.
type GRPC struct {
	authv3.UnimplementedAuthorizationServer
	svc *Service
}

// NewGRPCServer returns a gRPC server with the Authorization service and
// the standard health service registered. Check reads requests with the
// lean decoder and writes allows with the lean encoder (wire.go), unless
// Options.ProtoCodec asks for the stock protobuf codec.
func NewGRPCServer(svc *Service, h *Health, opts ...grpc.ServerOption) *grpc.Server {
	desc := &authv3.Authorization_ServiceDesc
	if !svc.opts.ProtoCodec {
		desc = &leanAuthorizationDesc
		opts = append([]grpc.ServerOption{grpc.ForceServerCodecV2(newLeanCodec())}, opts...)
	}
	srv := grpc.NewServer(opts...)
	srv.RegisterService(desc, &GRPC{svc: svc})
	healthpb.RegisterHealthServer(srv, h.service())
	return srv
}

// Check implements envoy.service.auth.v3.Authorization.
func (g *GRPC) Check(ctx context.Context, in *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	return g.svc.Check(ctx, in)
}

// Check answers a CheckRequest. Every response carries an explicit status
// (an unset one would be an allow to Envoy), and every denial a
// denied_response with its HTTP status (a bare code would be a 403).
func (s *Service) Check(ctx context.Context, in *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	h := in.GetAttributes().GetRequest().GetHttp()
	if len(h.GetHeaders())+len(h.GetHeaderMap().GetHeaders()) > s.opts.MaxHeaders {
		return nil, tooManyHeaders(s.opts.MaxHeaders)
	}
	req := checkRequest(in)
	d, err := s.decideRPC(ctx, &req)
	if err != nil {
		return nil, err
	}
	switch d.Reason {
	case Allowed:
		return s.allowResponse(&d), nil
	case AllowedPublic:
		return s.public.resp, nil
	}
	return s.denial(&d).resp, nil
}

// tooManyHeaders refuses a check over the header limit. It is an RPC
// error, as gRPC's own refusal of a message over its size limit is: Envoy
// then answers with status_on_error (503 in the shipped configs), or lets
// it through under failure_mode_allow.
func tooManyHeaders(limit int) error {
	return status.Errorf(codes.ResourceExhausted, "check request has more than %d headers (EXTAUTHZ_MAX_HEADERS)", limit)
}

// decideRPC decides a check; the error is the gRPC status of an outage.
func (s *Service) decideRPC(ctx context.Context, req *Request) (Decision, error) {
	d, err := s.Decide(ctx, req)
	if err == nil {
		return d, nil
	}
	// A store timeout wraps DeadlineExceeded too, but it is an outage, not
	// the caller's deadline: only an unwrapped context error is.
	if !errors.Is(err, tokens.ErrUnavailable) {
		switch {
		case errors.Is(err, context.Canceled):
			return d, status.Error(codes.Canceled, "check canceled")
		case errors.Is(err, context.DeadlineExceeded):
			return d, status.Error(codes.DeadlineExceeded, "check deadline exceeded")
		}
	}
	return d, status.Error(codes.Unavailable, "key store unavailable")
}

// checkRequest extracts what a check needs. Envoy's network filter sends
// no HTTP request at all.
func checkRequest(in *authv3.CheckRequest) Request {
	attrs := in.GetAttributes()
	h := attrs.GetRequest().GetHttp()
	if h == nil {
		return Request{}
	}
	req := Request{
		HasHTTP: true,
		Method:  h.GetMethod(),
		Host:    h.GetHost(),
		Path:    h.GetPath(),
		Scopes:  attrs.GetContextExtensions()["scopes"],
		Source:  attrs.GetSource().GetAddress().GetSocketAddress().GetAddress(),
	}
	// header_map (encode_raw_headers, proxyless gRPC) wins when present.
	if hm := h.GetHeaderMap(); hm != nil && len(hm.GetHeaders()) > 0 {
		list := hm.GetHeaders()
		req.Header = tokens.HeaderFunc(func(name string) (string, bool) { return joinLines(list, headerValueLine, name) })
	} else {
		m := h.GetHeaders()
		req.Header = tokens.HeaderFunc(func(name string) (string, bool) { v, ok := m[name]; return v, ok })
	}
	req.fillFromHeaders()
	return req
}

// fillFromHeaders reads the method, host and path from the pseudo-headers
// where the HTTP attributes left them empty. The request id is read only
// when a log line needs it.
func (req *Request) fillFromHeaders() {
	if req.Method == "" {
		req.Method, _ = req.Header.Get(":method")
	}
	if req.Host == "" {
		req.Host, _ = req.Header.Get(":authority")
	}
	if req.Path == "" {
		req.Path, _ = req.Header.Get(":path")
	}
}

// joinLines returns a header of a raw header list (header_map), joining
// repeated lines with "," as Envoy's headers map does, so that duplicates
// are judged the same way in both encodings. Both decoders use it. Its
// cost is linear in the list: the joined value is sized first, then built
// once (concatenating line by line was quadratic: 40,000 repeated lines
// took 38 s of CPU).
func joinLines[L any](lines []L, line func(L) (key, value string), name string) (string, bool) {
	first, count, size := "", 0, 0
	for _, l := range lines {
		if k, v := line(l); k == name {
			if count == 0 {
				first = v
			}
			count++
			size += len(v)
		}
	}
	if count <= 1 {
		return first, count == 1
	}
	var b strings.Builder
	b.Grow(size + count - 1)
	sep := false
	for _, l := range lines {
		if k, v := line(l); k == name {
			if sep {
				b.WriteByte(',')
			}
			b.WriteString(v)
			sep = true
		}
	}
	return b.String(), true
}

// headerValueLine reads a HeaderValue: raw_value, when not empty, wins.
func headerValueLine(hv *corev3.HeaderValue) (string, string) {
	v := hv.GetValue()
	if raw := hv.GetRawValue(); len(raw) > 0 {
		// A read-only view: the message outlives the check.
		v = unsafe.String(unsafe.SliceData(raw), len(raw))
	}
	return hv.GetKey(), v
}

// overwrite is the append mode of every header we set: portable across
// Envoy releases whose append defaults differ (see ENVOY.md 2.3).
const overwrite = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD

func setHeader(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, Value: v}, AppendAction: overwrite}
}

// allowBlock holds every message of an allow response, so that building
// one is a single allocation (plus the metadata map) instead of twenty.
// The messages are only ever used through pointers into the block.
type allowBlock struct {
	resp    authv3.CheckResponse
	status  rpcstatus.Status
	oneof   authv3.CheckResponse_OkResponse
	ok      authv3.OkHttpResponse
	opts    [3]corev3.HeaderValueOption
	hvs     [3]corev3.HeaderValue
	optPtrs [3]*corev3.HeaderValueOption
	remove  [2]string
	md      structpb.Struct
	vals    [3]structpb.Value
	strs    [3]structpb.Value_StringValue
}

func (s *Service) allowResponse(d *Decision) *authv3.CheckResponse {
	p := &d.Result.Principal
	b := &allowBlock{}
	hdrs, n := identity(p)
	for i, h := range hdrs[:n] {
		b.hvs[i].Key, b.hvs[i].Value = h[0], h[1]
		b.opts[i].Header, b.opts[i].AppendAction = &b.hvs[i], overwrite
		b.optPtrs[i] = &b.opts[i]
	}
	remove := s.removals(b.remove[:0], d)
	b.ok.Headers = b.optPtrs[:n]
	if len(remove) > 0 {
		b.ok.HeadersToRemove = remove
	}
	b.oneof.OkResponse = &b.ok
	b.resp.Status, b.resp.HttpResponse = &b.status, &b.oneof

	metadata := allowMetadata(p)
	b.md.Fields = make(map[string]*structpb.Value, len(metadata))
	for i, kv := range metadata {
		b.strs[i].StringValue = kv[1]
		b.vals[i].Kind = &b.strs[i]
		b.md.Fields[kv[0]] = &b.vals[i]
	}
	b.resp.DynamicMetadata = &b.md
	return &b.resp
}

// publicResponse allows a public route: no key was checked, so no identity
// is injected and any the client sent is removed.
func publicResponse() *authv3.CheckResponse {
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(codes.OK)},
		HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
			HeadersToRemove: identityHeaders,
		}},
		DynamicMetadata: &structpb.Struct{Fields: map[string]*structpb.Value{
			"reason": structpb.NewStringValue(AllowedPublic.String()),
		}},
	}
}

// prebuilt is a read-only response built once, with its encoding for the
// lean encoder; denial also returns responses built per check in it,
// without an encoding.
type prebuilt struct {
	resp *authv3.CheckResponse
	wire mem.Buffer
}

func newPrebuilt(r *authv3.CheckResponse) prebuilt {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
	if err != nil {
		panic(err) // a message built from constants
	}
	return prebuilt{resp: r, wire: mem.SliceBuffer(b)}
}

// buildResponses prebuilds the public allow and one response per deny
// reason: denials are the cheap path, since they are what a flood of bad
// keys costs.
func (s *Service) buildResponses() {
	s.public = newPrebuilt(publicResponse())
	for _, r := range Reasons() {
		if r.Allow() || r == Unavailable {
			continue
		}
		s.denies[r] = newPrebuilt(s.buildDeny(r, "", ""))
	}
}

func (s *Service) buildDeny(r Reason, keyID, tenantID string) *authv3.CheckResponse {
	code := codes.Unauthenticated
	switch r.HTTPStatus() {
	case 403:
		code = codes.PermissionDenied
	case 400:
		code = codes.InvalidArgument
	}
	hdrs := []*corev3.HeaderValueOption{setHeader("content-type", "application/json")}
	if wa := WWWAuthenticate(s.opts.Realm, r); wa != "" {
		hdrs = append(hdrs, setHeader("www-authenticate", wa))
	}
	md := map[string]*structpb.Value{"reason": structpb.NewStringValue(r.String())}
	if keyID != "" {
		md["key_id"] = structpb.NewStringValue(keyID)
		md["tenant_id"] = structpb.NewStringValue(tenantID)
	}
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(code), Message: r.String()},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(r.HTTPStatus())},
			Headers: hdrs,
			Body:    DenyBody(r),
		}},
		DynamicMetadata: &structpb.Struct{Fields: md},
	}
}

// denial is the response to a denied check: the prebuilt one, or, for a
// known key (revoked, expired, insufficient scope), one built to name it
// in the metadata for access logs and rate limits (wire nil: not encoded).
func (s *Service) denial(d *Decision) prebuilt {
	if d.Result.KeyID != "" {
		return prebuilt{resp: s.buildDeny(d.Reason, d.Result.KeyID, d.Result.TenantID)}
	}
	return s.denies[d.Reason]
}

// DenyBody is the JSON body of a denial: no internal detail.
func DenyBody(r Reason) string {
	return `{"error":"` + r.ErrorName() + `","reason":"` + r.String() + `"}`
}

// WWWAuthenticate is the challenge of a denial, per RFC 6750 section 3:
// no error code when no credential was sent, invalid_request for an
// ambiguous one, invalid_token for a bad, unknown, revoked or expired one,
// insufficient_scope on 403.
func WWWAuthenticate(realm string, r Reason) string {
	base := `Bearer realm="` + realm + `"`
	switch r {
	case MissingCredential:
		return base
	case AmbiguousCredential:
		return base + `, error="invalid_request"`
	case InsufficientScope:
		return base + `, error="insufficient_scope"`
	case Allowed, AllowedPublic, Unavailable, MalformedPath:
		return ""
	}
	return base + `, error="invalid_token"`
}
