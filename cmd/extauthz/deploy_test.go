package main

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	k8sjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	// Every typed_config the shipped configs use must resolve.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"

	"github.com/extauthz/extauthz/internal/authz"
)

// repoFile reads a file relative to the repository root.
func repoFile(t *testing.T, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type validator interface{ ValidateAll() error }

// validateDeep runs the protoc-gen-validate rules on m and, since those stop
// at an Any, on every message packed in an Any inside it.
// decodeStrict decodes YAML the way the Kubernetes API server does:
// case-sensitive field names, unknown and duplicate fields are errors.
// (encoding/json, and so yaml.UnmarshalStrict, match names regardless of
// case: "readOnlyRootFileSystem" would silently pass.)
func decodeStrict(doc []byte, into any) error {
	j, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return err
	}
	strictErrs, err := k8sjson.UnmarshalStrict(j, into)
	if err != nil {
		return err
	}
	return errors.Join(strictErrs...)
}

func validateDeep(t *testing.T, where string, m proto.Message) {
	t.Helper()
	if v, ok := m.(validator); ok {
		if err := v.ValidateAll(); err != nil {
			t.Errorf("%s: %v", where, err)
		}
	}
	var walk func(path string, msg protoreflect.Message)
	walk = func(path string, msg protoreflect.Message) {
		if a, ok := msg.Interface().(*anypb.Any); ok {
			inner, err := a.UnmarshalNew()
			if err != nil {
				t.Errorf("%s: %s: %v", where, path, err)
				return
			}
			validateDeep(t, where+": "+path+"("+a.TypeUrl+")", inner)
			return
		}
		msg.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			p := path + "." + string(fd.Name())
			switch {
			case fd.IsList() && fd.Message() != nil:
				for i := 0; i < v.List().Len(); i++ {
					walk(p, v.List().Get(i).Message())
				}
			case fd.IsMap() && fd.MapValue().Message() != nil:
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool { walk(p, mv.Message()); return true })
			case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
				walk(p, v.Message())
			}
			return true
		})
	}
	walk("", m.ProtoReflect())
}

// loadBootstrap parses an Envoy YAML config strictly: an unknown field or
// type fails.
func loadBootstrap(t *testing.T, rel string) *bootstrapv3.Bootstrap {
	t.Helper()
	j, err := yaml.YAMLToJSON(repoFile(t, rel))
	if err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(j, &b); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	validateDeep(t, rel, &b)
	return &b
}

func TestEnvoyConfigsValidate(t *testing.T) {
	t.Parallel()
	for _, f := range []string{"envoy/envoy.yaml", "envoy/envoy-http.yaml", "envoy/envoy-mtls.yaml"} {
		t.Run(f, func(t *testing.T) {
			b := loadBootstrap(t, f)
			j, _ := protojson.Marshal(b)
			s := string(j)
			// What the product needs from the config, whatever else changes.
			for _, want := range []string{
				`"code":"ServiceUnavailable"`, `"timeout":"0.250s"`,
				`"remove":"x-tenant-id"`, `"remove":"x-api-key-id"`, `"remove":"x-api-key-scopes"`,
				`"disabled":true`,
			} {
				if !strings.Contains(strings.ReplaceAll(s, " ", ""), want) {
					t.Errorf("%s lacks %s", f, want)
				}
			}
			// The path routed and judged is the one the upstream acts on;
			// headers with underscores cannot slip past the identity strip.
			hcm := hcmOf(t, b)
			if !hcm.GetNormalizePath().GetValue() || !hcm.GetMergeSlashes() ||
				hcm.GetPathWithEscapedSlashesAction() != hcmv3.HttpConnectionManager_REJECT_REQUEST ||
				hcm.GetCommonHttpProtocolOptions().GetHeadersWithUnderscoresAction() != corev3.HttpProtocolOptions_REJECT_REQUEST {
				t.Errorf("%s: want normalize_path, merge_slashes, escaped slashes and underscores rejected", f)
			}
			// A route that skips ext_authz matches one exact path: a prefix
			// would open every path that starts with it.
			for _, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
				for _, r := range vh.GetRoutes() {
					var per extauthzv3.ExtAuthzPerRoute
					if cfg := r.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"]; cfg != nil && cfg.UnmarshalTo(&per) == nil &&
						per.GetDisabled() && r.GetMatch().GetPath() == "" {
						t.Errorf("%s: route %v skips ext_authz for more than one exact path", f, r.GetMatch())
					}
					if p := r.GetMatch().GetPrefix(); p != "" && p != "/" {
						t.Errorf("%s: route prefix %q also matches %sx; use path_separated_prefix", f, p, p)
					}
				}
			}
			// Fail closed: an outage is a 503, never an allow.
			if ea := extAuthzOf(t, b); !ea.GetValidateMutations() || ea.GetFailureModeAllow() || ea.GetStatusOnError().GetCode() != 503 {
				t.Errorf("%s: validate_mutations %v, failure_mode_allow %v, status_on_error %v; want mutations validated, fail-closed with 503",
					f, ea.GetValidateMutations(), ea.GetFailureModeAllow(), ea.GetStatusOnError().GetCode())
			}
			// header_mutation must come before ext_authz, which must come before the router.
			order := []string{"envoy.filters.http.header_mutation", "envoy.filters.http.ext_authz", "envoy.filters.http.router"}
			last := -1
			for _, name := range order {
				i := strings.Index(s, `"name":"`+name+`"`)
				if i < 0 || i < last {
					t.Errorf("%s: filter %s missing or out of order", f, name)
				}
				last = i
			}
		})
	}
	// gRPC mode: HTTP/2 to extauthz on the binary's default gRPC port, health
	// checked on the readiness service; the admin route carries its scope.
	s := mustJSON(t, loadBootstrap(t, "envoy/envoy.yaml"))
	for _, want := range []string{
		`"http2ProtocolOptions":{}`, `"serviceName":"` + authz.AuthorizationService + `"`,
		`"portValue":` + portOf(t, defaultConfig().GRPCAddr), `"scopes":"admin"`, `"transportApiVersion":"V3"`,
	} {
		if !strings.Contains(s, want) {
			t.Errorf("envoy.yaml lacks %s", want)
		}
	}
	// mTLS: gRPC mode as above, over TLS to the binary's gRPC port.
	s = mustJSON(t, loadBootstrap(t, "envoy/envoy-mtls.yaml"))
	for _, want := range []string{
		`"http2ProtocolOptions":{}`, `"serviceName":"` + authz.AuthorizationService + `"`,
		`"portValue":` + portOf(t, defaultConfig().GRPCAddr), `"transportApiVersion":"V3"`,
	} {
		if !strings.Contains(s, want) {
			t.Errorf("envoy-mtls.yaml lacks %s", want)
		}
	}
	checkUpstreamMTLS(t, loadBootstrap(t, "envoy/envoy-mtls.yaml"), "extauthz")
	// HTTP mode: the binary's default HTTP port and prefix, tenant headers copied upstream.
	s = mustJSON(t, loadBootstrap(t, "envoy/envoy-http.yaml"))
	for _, want := range []string{
		`"pathPrefix":"` + defaultConfig().HTTPPrefix + `"`, `"portValue":` + portOf(t, defaultConfig().HTTPAddr),
		`"exact":"x-tenant-id"`, `"exact":"www-authenticate"`, `"path":"/readyz"`,
	} {
		if !strings.Contains(s, want) {
			t.Errorf("envoy-http.yaml lacks %s", want)
		}
	}
}

// checkUpstreamMTLS checks that cluster speaks mutual TLS: a client
// certificate, the server's verified against a CA and the SNI name, h2 by
// ALPN (gRPC servers require it), files watched for rotation.
func checkUpstreamMTLS(t *testing.T, b *bootstrapv3.Bootstrap, cluster string) {
	t.Helper()
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() != cluster {
			continue
		}
		var up tlsv3.UpstreamTlsContext
		if err := c.GetTransportSocket().GetTypedConfig().UnmarshalTo(&up); err != nil {
			t.Fatalf("cluster %s: no UpstreamTlsContext: %v", cluster, err)
		}
		ctx := up.GetCommonTlsContext()
		vc := ctx.GetValidationContext()
		sanOK := false
		for _, m := range vc.GetMatchTypedSubjectAltNames() {
			sanOK = sanOK || m.GetSanType() == tlsv3.SubjectAltNameMatcher_DNS && m.GetMatcher().GetExact() == up.GetSni()
		}
		switch {
		case up.GetSni() == "":
			t.Errorf("cluster %s: no SNI", cluster)
		case !sanOK:
			t.Errorf("cluster %s: the server certificate's DNS SAN is not checked against the SNI %q", cluster, up.GetSni())
		case vc.GetTrustedCa().GetFilename() == "" || vc.GetWatchedDirectory().GetPath() == "":
			t.Errorf("cluster %s: no trusted CA file, or not watched", cluster)
		case len(ctx.GetTlsCertificates()) != 1 || ctx.GetTlsCertificates()[0].GetPrivateKey().GetFilename() == "" ||
			ctx.GetTlsCertificates()[0].GetWatchedDirectory().GetPath() == "":
			t.Errorf("cluster %s: no client certificate from watched files", cluster)
		case !slices.Equal(ctx.GetAlpnProtocols(), []string{"h2"}):
			t.Errorf("cluster %s: ALPN %v, want h2", cluster, ctx.GetAlpnProtocols())
		case ctx.GetTlsParams().GetTlsMinimumProtocolVersion() < tlsv3.TlsParameters_TLSv1_2:
			t.Errorf("cluster %s: TLS below 1.2 allowed", cluster)
		}
		for _, e := range c.GetLoadAssignment().GetEndpoints() {
			for _, lb := range e.GetLbEndpoints() {
				if a := lb.GetEndpoint().GetAddress().GetSocketAddress().GetAddress(); a != up.GetSni() {
					t.Errorf("cluster %s: endpoint %s is not the SNI name %s", cluster, a, up.GetSni())
				}
			}
		}
		return
	}
	t.Fatalf("no cluster %s", cluster)
}

// hcmOf returns the HTTP connection manager of the first listener.
func hcmOf(t *testing.T, b *bootstrapv3.Bootstrap) *hcmv3.HttpConnectionManager {
	t.Helper()
	for _, l := range b.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				var hcm hcmv3.HttpConnectionManager
				if f.GetTypedConfig().UnmarshalTo(&hcm) == nil {
					return &hcm
				}
			}
		}
	}
	t.Fatal("no http_connection_manager")
	return nil
}

// extAuthzOf returns the ext_authz filter config of the first listener.
func extAuthzOf(t *testing.T, b *bootstrapv3.Bootstrap) *extauthzv3.ExtAuthz {
	t.Helper()
	for _, hf := range hcmOf(t, b).GetHttpFilters() {
		var ea extauthzv3.ExtAuthz
		if hf.GetTypedConfig().UnmarshalTo(&ea) == nil {
			return &ea
		}
	}
	t.Fatal("no ext_authz filter")
	return nil
}

func mustJSON(t *testing.T, m proto.Message) string {
	t.Helper()
	b, err := protojson.MarshalOptions{}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return strings.ReplaceAll(string(b), " ", "")
}

func portOf(t *testing.T, addr string) string {
	t.Helper()
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		t.Fatalf("no port in %q", addr)
	}
	return addr[i+1:]
}

// composeFile is the part of the Compose format envoy/compose.yaml uses;
// decoding is strict, so a misspelt key fails.
type composeFile struct {
	Name     string            `json:"name"`
	Env      map[string]string `json:"x-extauthz-env"`
	Services map[string]struct {
		Image string `json:"image"`
		Build *struct {
			Context    string `json:"context"`
			Dockerfile string `json:"dockerfile"`
		} `json:"build"`
		Command     []string          `json:"command"`
		Environment map[string]string `json:"environment"`
		Ports       []string          `json:"ports"`
		Volumes     []string          `json:"volumes"`
		DependsOn   any               `json:"depends_on"`
		Profiles    []string          `json:"profiles"`
		Healthcheck map[string]any    `json:"healthcheck"`
	} `json:"services"`
}

func TestComposeFile(t *testing.T) {
	t.Parallel()
	var cf composeFile
	if err := decodeStrict(repoFile(t, "envoy/compose.yaml"), &cf); err != nil {
		t.Fatal(err)
	}
	for name, svc := range cf.Services {
		if svc.Image == "" && svc.Build == nil {
			t.Errorf("service %s: no image", name)
		}
		if tag := svc.Image[strings.LastIndexByte(svc.Image, ':')+1:]; !strings.Contains(svc.Image, ":") || strings.Contains(tag, "latest") {
			t.Errorf("service %s: image %q is not pinned to a version", name, svc.Image)
		}
		if svc.Build != nil {
			if _, err := os.Stat(filepath.Join("..", "..", "envoy", svc.Build.Context, svc.Build.Dockerfile)); err != nil {
				t.Errorf("service %s: build: %v", name, err)
			}
		}
		for _, v := range svc.Volumes {
			src := strings.SplitN(v, ":", 2)[0]
			if _, err := os.Stat(filepath.Join("..", "..", "envoy", src)); err != nil {
				t.Errorf("service %s: volume %s: %v", name, v, err)
			}
		}
	}
	// extauthz's environment is a valid configuration of this binary.
	ext, ok := cf.Services["extauthz"]
	if !ok {
		t.Fatal("no extauthz service")
	}
	for k := range ext.Environment {
		if !known[strings.TrimPrefix(k, "EXTAUTHZ_")] {
			t.Errorf("extauthz: %s is not a setting of this binary", k)
		}
	}
	cfg, err := loadConfig(lookupMap(ext.Environment))
	if err != nil {
		t.Fatalf("extauthz environment: %v", err)
	}
	// The routes file it names is mounted from the repository, and loads.
	if cfg.RoutesFile != "" {
		mounted := false
		for _, v := range ext.Volumes {
			if src, dst, _ := strings.Cut(v, ":"); strings.TrimSuffix(dst, ":ro") == cfg.RoutesFile {
				mounted = true
				if _, err := authz.LoadRoutes(filepath.Join("..", "..", "envoy", src), cfg.pathOptions()); err != nil {
					t.Errorf("routes file %s: %v", src, err)
				}
			}
		}
		if !mounted {
			t.Errorf("EXTAUTHZ_ROUTES=%s is not mounted", cfg.RoutesFile)
		}
	}
	if cfg.StoreKind() != "postgres" || cfg.RedisURL == "" {
		t.Errorf("compose extauthz should use Postgres and Redis: %v", cfg)
	}
	for _, addr := range []string{cfg.GRPCAddr, cfg.HTTPAddr, cfg.AdminAddr} {
		p := portOf(t, addr)
		if !slices.Contains(ext.Ports, p+":"+p) && !slices.ContainsFunc(ext.Ports, func(s string) bool { return strings.HasPrefix(s, p+":"+p) }) {
			t.Errorf("extauthz port %s not published: %v", p, ext.Ports)
		}
	}
	if m := cf.Services["migrate"]; !slices.Equal(m.Command, []string{"migrate"}) || m.Image != ext.Image {
		t.Errorf("migrate service: %v", m)
	}
	// The Envoy configs' clusters point at these services.
	for _, f := range []string{"envoy/envoy.yaml", "envoy/envoy-http.yaml"} {
		s := mustJSON(t, loadBootstrap(t, f))
		for _, svc := range []string{"extauthz", "echo"} {
			if _, ok := cf.Services[svc]; !ok || !strings.Contains(s, `"address":"`+svc+`"`) {
				t.Errorf("%s: cluster address %s is not a compose service", f, svc)
			}
		}
		if !strings.Contains(s, `"portValue":`+cf.Services["echo"].Environment["HTTP_PORT"]) {
			t.Errorf("%s: upstream port is not echo's HTTP_PORT", f)
		}
	}
}

func TestDockerfile(t *testing.T) {
	t.Parallel()
	d := string(repoFile(t, "Dockerfile"))
	for _, want := range []string{
		"CGO_ENABLED=0", "-trimpath", "./cmd/extauthz", "gcr.io/distroless/static", ":nonroot",
		"USER 65532:65532", `ENTRYPOINT ["/extauthz"]`, "org.opencontainers.image.title",
	} {
		if !strings.Contains(d, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	if n := strings.Count(d, "\nFROM "); n != 2 {
		t.Errorf("%d stages, want 2 (build, then the binary alone)", n)
	}
	// The license the image's label names is the repository's.
	if !strings.Contains(d, `org.opencontainers.image.licenses="Apache-2.0"`) || !strings.Contains(string(repoFile(t, "LICENSE")), "Apache License\n                           Version 2.0") {
		t.Error("the image's licenses label and LICENSE disagree")
	}
	for _, p := range []string{defaultConfig().GRPCAddr, defaultConfig().HTTPAddr, defaultConfig().AdminAddr} {
		if !strings.Contains(d, "EXPOSE") || !strings.Contains(d, portOf(t, p)) {
			t.Errorf("Dockerfile does not expose %s", p)
		}
	}
}
