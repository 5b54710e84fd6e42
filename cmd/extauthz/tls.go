package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// TLS for the check listeners (gRPC, HTTP, and any later one such as a
// management API): one certReloader holds the current certificate, key
// and client CA pool, and every listener's tls.Config asks it for them at
// each handshake (GetConfigForClient), so a rotation reaches new
// connections at once while established ones keep the session they
// negotiated: nothing restarts and nothing is dropped.
//
// The files are read again every second and compared by content, not by
// modification time: cert-manager and the kubelet update a mounted
// Secret by swapping a symlink (..data) to a new directory, which leaves
// the mtimes a stat of the old path saw meaningless. A new set that does
// not load (a key that does not match, a half-written file) is refused
// and logged once; the last good one stays in service.

// certFiles names the PEM files of the server identity and, for mTLS, the
// CA that signs client certificates.
type certFiles struct{ cert, key, clientCA string }

// certSet is one loaded, consistent set of the files.
type certSet struct {
	cert      tls.Certificate
	leaf      *x509.Certificate
	clientCAs *x509.CertPool // nil: no client certificate asked for
	sum       [sha256.Size]byte
}

// certReloader serves the current certSet and replaces it when the files
// change.
type certReloader struct {
	files certFiles
	cur   atomic.Pointer[certSet]
	// What was last refused, so that it is logged once; only watch's
	// goroutine touches these.
	badSum     [sha256.Size]byte
	unreadable bool
	refused    atomic.Uint64 // changed sets that did not load
}

// newCertReloader loads the files; an error names the setting at fault.
func newCertReloader(files certFiles) (*certReloader, error) {
	r := &certReloader{files: files}
	s, err := files.load()
	if err != nil {
		return nil, err
	}
	r.cur.Store(s)
	return r, nil
}

// load reads and checks the files.
func (f certFiles) load() (*certSet, error) {
	read := func(setting, path string) ([]byte, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", setting, err)
		}
		return b, nil
	}
	certPEM, err := read("EXTAUTHZ_TLS_CERT_FILE", f.cert)
	if err != nil {
		return nil, err
	}
	keyPEM, err := read("EXTAUTHZ_TLS_KEY_FILE", f.key)
	if err != nil {
		return nil, err
	}
	var caPEM []byte
	if f.clientCA != "" {
		if caPEM, err = read("EXTAUTHZ_TLS_CLIENT_CA_FILE", f.clientCA); err != nil {
			return nil, err
		}
	}
	s := &certSet{sum: sha256.Sum256(bytes.Join([][]byte{certPEM, keyPEM, caPEM}, []byte{0}))}
	// The error of X509KeyPair never quotes the key.
	if s.cert, err = tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return nil, fmt.Errorf("EXTAUTHZ_TLS_CERT_FILE, EXTAUTHZ_TLS_KEY_FILE: %s, %s: %w", f.cert, f.key, err)
	}
	s.leaf = s.cert.Leaf
	if f.clientCA != "" {
		s.clientCAs = x509.NewCertPool()
		if !s.clientCAs.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("EXTAUTHZ_TLS_CLIENT_CA_FILE: %s: no PEM certificate in it", f.clientCA)
		}
	}
	return s, nil
}

// sumNow hashes the files as they are now, without parsing them; an
// unreadable file gives ok false.
func (f certFiles) sumNow() (sum [sha256.Size]byte, ok bool) {
	parts := make([][]byte, 3)
	for i, p := range []string{f.cert, f.key, f.clientCA} {
		if p == "" {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return sum, false
		}
		parts[i] = b
	}
	return sha256.Sum256(bytes.Join(parts, []byte{0})), true
}

// reload replaces the current set when the files hold a different, valid
// one. It reports whether it did, and why a changed set was refused; a
// refusal is reported once, not every second.
func (r *certReloader) reload() (bool, error) {
	sum, ok := r.files.sumNow()
	if !ok {
		// Missing or unreadable: retried every second, reported once.
		if r.unreadable {
			return false, nil
		}
		r.unreadable = true
		_, err := r.files.load()
		return false, err
	}
	r.unreadable = false
	if sum == r.cur.Load().sum || sum == r.badSum {
		return false, nil
	}
	s, err := r.files.load()
	if err != nil {
		r.badSum = sum
		return false, err
	}
	r.cur.Store(s)
	return true, nil
}

// watch reloads every interval until ctx ends.
func (r *certReloader) watch(ctx context.Context, interval time.Duration, log *zap.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		changed, err := r.reload()
		switch {
		case err != nil:
			r.refused.Add(1)
			log.Error("new TLS files refused; still serving the previous certificate", zap.Error(err))
		case changed:
			log.Info("TLS certificate reloaded", r.fields()...)
		}
	}
}

// collectors are the metrics an operator alerts on: a certificate near its
// expiry (rotation stopped working) and refused reloads.
func (r *certReloader) collectors() []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "extauthz_tls_certificate_expiry_timestamp_seconds",
			Help: "NotAfter of the certificate in service, as a Unix time.",
		}, func() float64 { return float64(r.cur.Load().leaf.NotAfter.Unix()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "extauthz_tls_reload_failures_total",
			Help: "Changed TLS files that did not load; the previous certificate stayed in service.",
		}, func() float64 { return float64(r.refused.Load()) }),
	}
}

// fields describe the current certificate for logs.
func (r *certReloader) fields() []zap.Field {
	s := r.cur.Load()
	return []zap.Field{
		zap.String("subject", s.leaf.Subject.String()), zap.Strings("dns_names", s.leaf.DNSNames),
		zap.Time("not_after", s.leaf.NotAfter), zap.Bool("client_certificates_required", s.clientCAs != nil),
	}
}

// serverConfig is a listener's TLS configuration, offering nextProtos by
// ALPN (h2 for gRPC, http/1.1 for the HTTP check mode). With a client CA,
// a client must present a certificate it signed; session tickets are off
// then, so that every connection is verified against the CA in force.
func (r *certReloader) serverConfig(nextProtos ...string) *tls.Config {
	base := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: nextProtos}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		s := r.cur.Load()
		c := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: nextProtos, Certificates: []tls.Certificate{s.cert}}
		if s.clientCAs != nil {
			c.ClientCAs, c.ClientAuth, c.SessionTicketsDisabled = s.clientCAs, tls.RequireAndVerifyClientCert, true
		}
		return c, nil
	}
	return base
}
