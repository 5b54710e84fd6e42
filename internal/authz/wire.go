package authz

import (
	"errors"
	"unicode/utf8"
	"unsafe"

	"google.golang.org/protobuf/encoding/protowire"
)

// The lean decoder reads a CheckRequest straight from the wire, keeping
// only what a check uses. The stock decoder builds the whole message tree:
// about 114 allocations and a quarter to a third of a grpc-go ext_authz
// server's CPU per request, for fields nobody reads. FuzzWireRequest
// proves it equal to the stock decoder on what it reads.
//
// Field numbers, from envoy/service/auth/v3 and envoy/config/core/v3.
const (
	fieldCheckAttributes = 1 // CheckRequest.attributes

	fieldAttrSource     = 1  // AttributeContext.source (Peer)
	fieldAttrRequest    = 4  // AttributeContext.request
	fieldAttrExtensions = 10 // AttributeContext.context_extensions (map)

	fieldRequestHTTP = 2 // AttributeContext.Request.http

	fieldPeerAddress          = 1 // Peer.address (core.Address)
	fieldAddressSocket        = 1 // Address.socket_address (a oneof with the next two)
	fieldAddressPipe          = 2 // Address.pipe
	fieldAddressInternal      = 3 // Address.envoy_internal_address
	fieldSocketAddressAddress = 2 // SocketAddress.address

	fieldHTTPMethod    = 2  // HttpRequest.method
	fieldHTTPHeaders   = 3  // HttpRequest.headers (map)
	fieldHTTPPath      = 4  // HttpRequest.path
	fieldHTTPHost      = 5  // HttpRequest.host
	fieldHTTPHeaderMap = 13 // HttpRequest.header_map

	fieldHeaderMapHeaders = 1 // HeaderMap.headers

	fieldHeaderKey      = 1 // HeaderValue.key, and a map entry's key
	fieldHeaderValue    = 2 // HeaderValue.value, and a map entry's value
	fieldHeaderRawValue = 3 // HeaderValue.raw_value
)

var (
	errWireMalformed = errors.New("malformed CheckRequest")
	errWireUTF8      = errors.New("CheckRequest string field is not valid UTF-8")
	// errWireTooManyHeaders stops decoding; unmarshal turns it into tooMany.
	errWireTooManyHeaders = errors.New("CheckRequest has too many headers")
)

// wireHeader is one header line, as read-only views into wireRequest.buf.
type wireHeader struct{ key, value string }

func (h wireHeader) kv() (string, string) { return h.key, h.value }

// wireRequest is a CheckRequest as the lean decoder reads it. Every string
// is a view into buf, a private copy of the message that is never written
// after decoding, so the strings stay valid for as long as anything holds
// them.
type wireRequest struct {
	buf     []byte
	hasHTTP bool
	method  string
	host    string
	path    string
	scopes  string // context_extensions["scopes"]
	source  string // attributes.source.address.socket_address.address
	// sourceSocket: the last member of source's Address oneof was a socket
	// address (merge rules, see sourceAddress).
	sourceSocket bool
	headers      []wireHeader // the headers map, in wire order; the last of a name wins
	lines        []wireHeader // header_map, in order
	// maxHeaders bounds headers + lines; decoding stops past it and
	// tooMany is set (the check is then refused).
	maxHeaders int
	tooMany    bool
}

// reset empties w for reuse. The old views are cleared too, so that a
// pooled request does not keep the last one's buffer, credential
// included, reachable.
// Slices grown past maxPooledHeaders by one large request are dropped,
// not kept in the pool at that size.
func (w *wireRequest) reset() {
	clear(w.headers)
	clear(w.lines)
	headers, lines := w.headers[:0], w.lines[:0]
	if cap(headers) > maxPooledHeaders {
		headers = nil
	}
	if cap(lines) > maxPooledHeaders {
		lines = nil
	}
	*w = wireRequest{headers: headers, lines: lines, maxHeaders: w.maxHeaders}
}

// maxPooledHeaders is the most header slots a pooled request keeps:
// more than Envoy's default limit of 100 request headers.
const maxPooledHeaders = 256

// unmarshal decodes b, which w keeps. It follows protobuf's merge rules as
// the stock decoder does: a repeated singular field's last value wins,
// repeated occurrences of a message merge, map entries replace by key. A
// field with an unexpected wire type is skipped, as the stock decoder keeps
// it as an unknown field. Skipped fields are checked for wire structure
// only; the strings read are checked for UTF-8, as proto3 requires.
//
// Past maxHeaders header lines it stops at once, with tooMany set and no
// error: the work done is bounded by the limit, not by the message.
func (w *wireRequest) unmarshal(b []byte) error {
	w.buf = b
	err := eachField(b, func(num protowire.Number, v []byte) error {
		if num == fieldCheckAttributes {
			return w.attributes(v)
		}
		return nil
	})
	if errors.Is(err, errWireTooManyHeaders) {
		w.tooMany = true
		return nil
	}
	return err
}

// addHeader appends a header line to dst, or fails past maxHeaders.
func (w *wireRequest) addHeader(dst *[]wireHeader, h wireHeader) error {
	if w.maxHeaders > 0 && len(w.headers)+len(w.lines) >= w.maxHeaders {
		return errWireTooManyHeaders
	}
	*dst = append(*dst, h)
	return nil
}

func (w *wireRequest) attributes(b []byte) error {
	return eachField(b, func(num protowire.Number, v []byte) error {
		switch num {
		case fieldAttrRequest:
			return eachField(v, func(num protowire.Number, v []byte) error {
				if num == fieldRequestHTTP {
					w.hasHTTP = true
					return w.http(v)
				}
				return nil
			})
		case fieldAttrExtensions:
			k, val, err := mapEntry(v)
			if err == nil && k == "scopes" {
				w.scopes = val
			}
			return err
		case fieldAttrSource:
			return w.sourceAddress(v)
		}
		return nil
	})
}

// sourceAddress reads Peer.address.socket_address.address with the stock
// decoder's merge rules: repeated messages merge and the last address wins,
// but another member of Address's oneof (pipe, envoy_internal_address)
// replaces the socket address, and a socket address after it starts anew.
func (w *wireRequest) sourceAddress(peer []byte) error {
	return eachField(peer, func(num protowire.Number, v []byte) error {
		if num != fieldPeerAddress {
			return nil
		}
		return eachField(v, func(num protowire.Number, v []byte) error {
			switch num {
			case fieldAddressSocket:
			case fieldAddressPipe, fieldAddressInternal:
				w.source, w.sourceSocket = "", false
				return nil
			default:
				return nil
			}
			if !w.sourceSocket {
				w.source, w.sourceSocket = "", true
			}
			return eachField(v, func(num protowire.Number, v []byte) error {
				var err error
				if num == fieldSocketAddressAddress {
					w.source, err = str(v)
				}
				return err
			})
		})
	})
}

func (w *wireRequest) http(b []byte) error {
	return eachField(b, func(num protowire.Number, v []byte) error {
		var err error
		switch num {
		case fieldHTTPMethod:
			w.method, err = str(v)
		case fieldHTTPPath:
			w.path, err = str(v)
		case fieldHTTPHost:
			w.host, err = str(v)
		case fieldHTTPHeaders:
			var h wireHeader
			if h.key, h.value, err = mapEntry(v); err == nil {
				err = w.addHeader(&w.headers, h)
			}
		case fieldHTTPHeaderMap:
			err = eachField(v, func(num protowire.Number, v []byte) error {
				if num != fieldHeaderMapHeaders {
					return nil
				}
				h, err := headerValue(v)
				if err == nil {
					err = w.addHeader(&w.lines, h)
				}
				return err
			})
		}
		return err
	})
}

// headerValue reads a HeaderValue: raw_value, when not empty, wins over
// value, as checkRequest reads it.
func headerValue(b []byte) (wireHeader, error) {
	var h wireHeader
	var raw []byte
	err := eachField(b, func(num protowire.Number, v []byte) error {
		var err error
		switch num {
		case fieldHeaderKey:
			h.key, err = str(v)
		case fieldHeaderValue:
			h.value, err = str(v)
		case fieldHeaderRawValue:
			raw = v // bytes: no UTF-8 rule
		}
		return err
	})
	if len(raw) > 0 {
		h.value = view(raw)
	}
	return h, err
}

// mapEntry reads a map<string, string> entry; absent fields are "".
func mapEntry(b []byte) (key, value string, err error) {
	err = eachField(b, func(num protowire.Number, v []byte) error {
		var err error
		switch num {
		case fieldHeaderKey:
			key, err = str(v)
		case fieldHeaderValue:
			value, err = str(v)
		}
		return err
	})
	return key, value, err
}

// eachField calls fn with every length-delimited field of a message, and
// checks the wire structure of every other field.
func eachField(b []byte, fn func(num protowire.Number, v []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errWireMalformed
		}
		b = b[n:]
		if typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return errWireMalformed
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return errWireMalformed
		}
		b = b[n:]
		if err := fn(num, v); err != nil {
			return err
		}
	}
	return nil
}

func str(b []byte) (string, error) {
	if !utf8.Valid(b) {
		return "", errWireUTF8
	}
	return view(b), nil
}

// view is a string over b without a copy: b is part of wireRequest.buf,
// which nothing writes after decoding.
func view(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(unsafe.SliceData(b), len(b))
}

// Get returns a request header as checkRequest does: from header_map when
// it has lines (repeated lines joined with ","), else from the headers map.
func (w *wireRequest) Get(name string) (string, bool) {
	if len(w.lines) > 0 {
		return joinLines(w.lines, wireHeader.kv, name)
	}
	for i := len(w.headers) - 1; i >= 0; i-- {
		if w.headers[i].key == name {
			return w.headers[i].value, true
		}
	}
	return "", false
}

// request is what a check needs, as checkRequest extracts it from a
// decoded CheckRequest.
func (w *wireRequest) request() Request {
	if !w.hasHTTP {
		return Request{}
	}
	req := Request{
		HasHTTP: true,
		Method:  w.method,
		Host:    w.host,
		Path:    w.path,
		Scopes:  w.scopes,
		Source:  w.source,
		Header:  w,
	}
	req.fillFromHeaders()
	return req
}
