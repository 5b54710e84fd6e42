package authz

import (
	"context"
	"fmt"
	"sync"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/proto" // registers the stock codec we delegate to
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/extauthz/extauthz/internal/tokens"
)

// leanCodec is the server's gRPC codec: Check's request and response
// travel in their lean forms (*wireRequest in, an encoded mem.Buffer
// out); every other message (health) goes through the stock codec.
type leanCodec struct{ stock encoding.CodecV2 }

func newLeanCodec() leanCodec {
	return leanCodec{stock: encoding.GetCodecV2("proto")}
}

func (leanCodec) Name() string { return "proto" }

func (c leanCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(mem.Buffer); ok {
		return mem.BufferSlice{b}, nil
	}
	return c.stock.Marshal(v)
}

func (c leanCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if w, ok := v.(*wireRequest); ok {
		// A private copy: the views into it must outlive gRPC's buffers.
		return w.unmarshal(data.Materialize())
	}
	return c.stock.Unmarshal(data, v)
}

// leanAuthorizationDesc is envoy.service.auth.v3.Authorization with a
// Check handler that speaks the lean forms.
var leanAuthorizationDesc = grpc.ServiceDesc{
	ServiceName: authv3.Authorization_ServiceDesc.ServiceName,
	HandlerType: authv3.Authorization_ServiceDesc.HandlerType,
	Methods:     []grpc.MethodDesc{{MethodName: "Check", Handler: leanCheckHandler}},
	Metadata:    authv3.Authorization_ServiceDesc.Metadata,
}

// wireRequests recycles decoded requests' header slices. A request goes
// back only after its check answered; nothing keeps the slices (the
// strings in them point into the request's own buffer, which is not
// recycled, so a lookup still running for a caller that left stays valid).
var wireRequests = sync.Pool{New: func() any { return new(wireRequest) }}

func leanCheckHandler(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
	s := srv.(*GRPC).svc
	w := wireRequests.Get().(*wireRequest)
	defer func() {
		w.reset()
		wireRequests.Put(w)
	}()
	w.maxHeaders = s.opts.MaxHeaders
	if err := dec(w); err != nil {
		return nil, err
	}
	if w.tooMany {
		return nil, tooManyHeaders(s.opts.MaxHeaders)
	}
	if interceptor == nil {
		return s.checkWire(ctx, w)
	}
	info := &grpc.UnaryServerInfo{Server: srv, FullMethod: authv3.Authorization_Check_FullMethodName}
	return interceptor(ctx, w, info, func(ctx context.Context, req any) (any, error) {
		return s.checkWire(ctx, req.(*wireRequest))
	})
}

// checkWire is Check on the lean forms: the same decision, the same
// response, encoded without building the message tree.
func (s *Service) checkWire(ctx context.Context, w *wireRequest) (mem.Buffer, error) {
	req := w.request()
	d, err := s.decideRPC(ctx, &req)
	if err != nil {
		return nil, err
	}
	switch d.Reason {
	case Allowed:
		var rm [2]string
		return encodeAllow(&d.Result.Principal, s.removals(rm[:0], &d)), nil
	case AllowedPublic:
		return s.public.wire, nil
	}
	deny := s.denial(&d)
	if deny.wire != nil {
		return deny.wire, nil
	}
	b, err := proto.Marshal(deny.resp)
	if err != nil {
		return nil, fmt.Errorf("encode denial: %w", err)
	}
	return mem.SliceBuffer(b), nil
}

// allowBufSize is the capacity of an allow's buffer: above gRPC's pooling
// threshold (1 KiB), so that gRPC hands the buffer back once written
// instead of leaving it to the garbage collector, and large enough for
// any principal within the limits of ids and scopes.
const allowBufSize = 2048

// allowBuffers pools allow buffers. Unlike gRPC's default pool it does not
// clear them: every byte handed out is written first, by appendAllow.
type allowBufferPool struct{ p sync.Pool }

func (a *allowBufferPool) Get(int) *[]byte {
	if bp, ok := a.p.Get().(*[]byte); ok {
		return bp
	}
	b := make([]byte, 0, allowBufSize)
	return &b
}

func (a *allowBufferPool) Put(bp *[]byte) {
	if cap(*bp) != allowBufSize {
		return // grown past the usual size by one large principal: not kept
	}
	*bp = (*bp)[:0]
	a.p.Put(bp)
}

var allowBuffers = &allowBufferPool{}

// encodeAllow encodes an allow into a pooled buffer, which gRPC frees once
// it has written it.
func encodeAllow(p *tokens.Principal, remove []string) mem.Buffer {
	bp := allowBuffers.Get(allowBufSize)
	b := appendAllow((*bp)[:0], p, remove)
	if cap(b) != cap(*bp) {
		// Outgrew the buffer (ids and scopes far beyond their limits):
		// append allocated a new one.
		allowBuffers.Put(bp)
		return mem.SliceBuffer(b)
	}
	*bp = b
	return mem.NewBuffer(bp, allowBuffers)
}

// Field numbers of the allow response.
const (
	fieldRespStatus   = 1 // CheckResponse.status
	fieldRespOK       = 3 // CheckResponse.ok_response
	fieldRespMetadata = 4 // CheckResponse.dynamic_metadata

	fieldOKHeaders  = 2 // OkHttpResponse.headers
	fieldOKToRemove = 5 // OkHttpResponse.headers_to_remove

	fieldOptionHeader = 1 // HeaderValueOption.header
	fieldOptionAppend = 3 // HeaderValueOption.append_action

	fieldStructFields = 1 // Struct.fields (map<string, Value>)
	fieldValueString  = 3 // Value.string_value
)

// appendAllow appends the encoding of allowResponse's message: the status
// OK, the identity headers set with overwrite, the removals, and the
// metadata. FuzzAllowEncoding proves the two equal. Every size is computed
// once, bottom up, before anything is written.
func appendAllow(b []byte, p *tokens.Principal, remove []string) []byte {
	hdrs, n := identity(p)
	md := allowMetadata(p)

	var hvSize, optSize, valSize, entrySize [3]int
	okSize, mdSize := 0, 0
	for i, h := range hdrs[:n] {
		hvSize[i] = sizeString(h[0]) + sizeString(h[1])
		optSize[i] = sizeField(hvSize[i]) + 2 // + append_action: tag and one-byte varint
		okSize += sizeField(optSize[i])
	}
	for _, r := range remove {
		okSize += sizeField(len(r))
	}
	for i, e := range md {
		valSize[i] = sizeField(len(e[1])) // a oneof member is written even when empty
		entrySize[i] = sizeString(e[0]) + sizeField(valSize[i])
		mdSize += sizeField(entrySize[i])
	}
	if b == nil {
		b = make([]byte, 0, sizeField(0)+sizeField(okSize)+sizeField(mdSize))
	}

	b = appendLen(b, fieldRespStatus, 0) // Status{}: code 0, OK
	b = appendLen(b, fieldRespOK, okSize)
	for i, h := range hdrs[:n] {
		b = appendLen(b, fieldOKHeaders, optSize[i])
		b = appendLen(b, fieldOptionHeader, hvSize[i])
		b = appendString(b, fieldHeaderKey, h[0])
		b = appendString(b, fieldHeaderValue, h[1])
		b = append(b, fieldOptionAppend<<3|byte(protowire.VarintType), byte(overwrite)) // overwrite < 0x80
	}
	for _, r := range remove {
		b = appendLen(b, fieldOKToRemove, len(r))
		b = append(b, r...)
	}
	b = appendLen(b, fieldRespMetadata, mdSize)
	for i, e := range md {
		b = appendLen(b, fieldStructFields, entrySize[i])
		b = appendString(b, fieldHeaderKey, e[0])
		b = appendLen(b, fieldHeaderValue, valSize[i])
		b = appendLen(b, fieldValueString, len(e[1]))
		b = append(b, e[1]...)
	}
	return b
}

// The field numbers written here are all below 16, so every tag is one
// byte; lengths take a varint.

// sizeString is the size of a proto3 string field, omitted when empty.
func sizeString(s string) int {
	if s == "" {
		return 0
	}
	return sizeField(len(s))
}

// sizeField is the size of a length-delimited field of n bytes.
func sizeField(n int) int {
	if n < 0x80 {
		return 2 + n
	}
	return 1 + protowire.SizeVarint(uint64(n)) + n
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	return append(appendLen(b, num, len(s)), s...)
}

// appendLen starts a length-delimited field of n bytes.
func appendLen(b []byte, num protowire.Number, n int) []byte {
	tag := byte(num)<<3 | byte(protowire.BytesType)
	if n < 0x80 {
		return append(b, tag, byte(n))
	}
	return protowire.AppendVarint(append(b, tag), uint64(n))
}
