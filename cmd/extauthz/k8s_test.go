package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	securityv1beta1 "istio.io/api/security/v1beta1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/extauthz/extauthz/internal/authz"
)

// kustomization is the part of kustomize's format the overlays use.
type kustomization struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Namespace  string `json:"namespace"`
	Labels     []struct {
		Pairs map[string]string `json:"pairs"`
	} `json:"labels"`
	Resources []string `json:"resources"`
	Patches   []struct {
		Path string `json:"path"`
	} `json:"patches"`
	Images []struct {
		Name    string `json:"name"`
		NewName string `json:"newName"`
		NewTag  string `json:"newTag"`
	} `json:"images"`
}

// istioObject is a custom resource: Kubernetes metadata, and a spec that
// is an Istio proto, decoded with protojson (unknown fields are errors).
type istioObject struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              json.RawMessage `json:"spec"`
}

// certificate is the part of cert-manager's Certificate the TLS overlay
// uses, decoded strictly.
type certificate struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SecretName  string   `json:"secretName"`
		DNSNames    []string `json:"dnsNames"`
		Duration    string   `json:"duration"`
		RenewBefore string   `json:"renewBefore"`
		PrivateKey  struct {
			Algorithm      string `json:"algorithm"`
			Size           int    `json:"size"`
			RotationPolicy string `json:"rotationPolicy"`
		} `json:"privateKey"`
		Usages    []string `json:"usages"`
		IssuerRef struct {
			Name  string `json:"name"`
			Kind  string `json:"kind"`
			Group string `json:"group"`
		} `json:"issuerRef"`
	} `json:"spec"`
}

// manifests holds every object of the shipped manifests, decoded.
type manifests struct {
	deployments []*appsv1.Deployment
	services    []*corev1.Service
	configMaps  []*corev1.ConfigMap
	secrets     []*corev1.Secret
	pdbs        []*policyv1.PodDisruptionBudget
	hpas        []*autoscalingv2.HorizontalPodAutoscaler
	netpols     []*networkingv1.NetworkPolicy
	jobs        []*batchv1.Job
	policies    []*securityv1beta1.AuthorizationPolicy
	filters     []*networkingv1alpha3.EnvoyFilter
	certs       []*certificate
	kinds       []string
}

// decodeFile decodes every document of a YAML file strictly into its type.
func (m *manifests) decodeFile(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i, doc := range bytes.Split(b, []byte("\n---")) {
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			t.Fatalf("%s #%d: %v", path, i, err)
		}
		where := path + " " + tm.APIVersion + "/" + tm.Kind
		strict := func(into any) {
			t.Helper()
			if err := decodeStrict(doc, into); err != nil {
				t.Fatalf("%s: %v", where, err)
			}
		}
		istio := func(into proto.Message) {
			t.Helper()
			var o istioObject
			strict(&o)
			if err := protojson.Unmarshal(o.Spec, into); err != nil {
				t.Fatalf("%s spec: %v", where, err)
			}
		}
		m.kinds = append(m.kinds, tm.Kind)
		switch tm.APIVersion + "/" + tm.Kind {
		case "v1/Namespace":
			strict(&corev1.Namespace{})
		case "v1/ServiceAccount":
			strict(&corev1.ServiceAccount{})
		case "v1/ConfigMap":
			o := &corev1.ConfigMap{}
			strict(o)
			m.configMaps = append(m.configMaps, o)
		case "v1/Secret":
			o := &corev1.Secret{}
			strict(o)
			m.secrets = append(m.secrets, o)
		case "v1/Service":
			o := &corev1.Service{}
			strict(o)
			m.services = append(m.services, o)
		case "apps/v1/Deployment":
			o := &appsv1.Deployment{}
			strict(o)
			m.deployments = append(m.deployments, o)
		case "policy/v1/PodDisruptionBudget":
			o := &policyv1.PodDisruptionBudget{}
			strict(o)
			m.pdbs = append(m.pdbs, o)
		case "autoscaling/v2/HorizontalPodAutoscaler":
			o := &autoscalingv2.HorizontalPodAutoscaler{}
			strict(o)
			m.hpas = append(m.hpas, o)
		case "networking.k8s.io/v1/NetworkPolicy":
			o := &networkingv1.NetworkPolicy{}
			strict(o)
			m.netpols = append(m.netpols, o)
		case "batch/v1/Job":
			o := &batchv1.Job{}
			strict(o)
			m.jobs = append(m.jobs, o)
		case "security.istio.io/v1/AuthorizationPolicy":
			o := &securityv1beta1.AuthorizationPolicy{}
			istio(o)
			m.policies = append(m.policies, o)
		case "networking.istio.io/v1alpha3/EnvoyFilter":
			o := &networkingv1alpha3.EnvoyFilter{}
			istio(o)
			m.filters = append(m.filters, o)
		case "cert-manager.io/v1/Certificate":
			o := &certificate{}
			strict(o)
			m.certs = append(m.certs, o)
		default:
			t.Fatalf("%s: no decoder for this kind", where)
		}
	}
}

// loadKustomization decodes dir/kustomization.yaml and, recursively, every
// resource it lists.
func (m *manifests) loadKustomization(t *testing.T, dir string) *kustomization {
	t.Helper()
	var k kustomization
	b, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := decodeStrict(b, &k); err != nil {
		t.Fatalf("%s/kustomization.yaml: %v", dir, err)
	}
	for _, r := range k.Resources {
		p := filepath.Join(dir, r)
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("%s: resource %s: %v", dir, r, err)
		}
		if fi.IsDir() {
			m.loadKustomization(t, p)
			continue
		}
		m.decodeFile(t, p)
	}
	return &k
}

func matches(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return len(selector) > 0
}

func TestKubernetesBase(t *testing.T) {
	t.Parallel()
	var m manifests
	k := m.loadKustomization(t, "../../k8s/base")
	for _, want := range []string{"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "Job"} {
		if !slices.Contains(m.kinds, want) {
			t.Errorf("base has no %s", want)
		}
	}
	m.decodeFile(t, "../../k8s/base/secret.example.yaml")

	if len(m.deployments) != 1 || len(m.services) != 1 || len(m.configMaps) != 1 {
		t.Fatal("want one Deployment, Service and ConfigMap")
	}
	d, svc, cm := m.deployments[0], m.services[0], m.configMaps[0]
	pod := d.Spec.Template
	c := pod.Spec.Containers[0]

	// The ConfigMap and the example Secret together are a valid configuration.
	env := map[string]string{}
	for k, v := range cm.Data {
		if !known[strings.TrimPrefix(k, "EXTAUTHZ_")] {
			t.Errorf("ConfigMap: %s is not a setting", k)
		}
		env[k] = v
	}
	for k, v := range m.secrets[0].StringData {
		env[k] = v
	}
	env["EXTAUTHZ_HMAC_SECRETS"] = "k1:" + pepper32 // the example's placeholder is deliberately not a secret
	cfg, err := loadConfig(lookupMap(env))
	if err != nil {
		t.Fatalf("ConfigMap + Secret: %v", err)
	}
	// The example shows verified TLS to both backends.
	if !strings.Contains(cfg.Store, "sslmode=verify-full") || !strings.HasPrefix(cfg.RedisURL, "rediss://") {
		t.Errorf("secret.example.yaml: want Postgres with sslmode=verify-full and a rediss:// Redis URL")
	}
	// envFrom names them.
	if len(c.EnvFrom) != 2 || c.EnvFrom[0].ConfigMapRef.Name != cm.Name || c.EnvFrom[1].SecretRef.Name != m.secrets[0].Name {
		t.Errorf("envFrom %v", c.EnvFrom)
	}

	// Ports and probes agree with the binary.
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	for name, addr := range map[string]string{"grpc": cfg.GRPCAddr, "http": cfg.HTTPAddr, "metrics": cfg.AdminAddr} {
		if got := ports[name]; portOf(t, addr) != itoa(got) {
			t.Errorf("container port %s = %d, want %s", name, got, portOf(t, addr))
		}
	}
	if p := c.ReadinessProbe; p == nil || p.GRPC == nil || p.GRPC.Port != ports["grpc"] || p.GRPC.Service == nil || *p.GRPC.Service != authz.AuthorizationService {
		t.Errorf("readiness probe must be gRPC health on %s", authz.AuthorizationService)
	}
	if p := c.LivenessProbe; p == nil || p.GRPC == nil || p.GRPC.Service == nil || *p.GRPC.Service != "" {
		t.Errorf("liveness probe must be gRPC health on \"\"")
	}
	// Hardened.
	psc, sc := pod.Spec.SecurityContext, c.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.SeccompProfile == nil ||
		sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Error("pod and container security contexts are not hardened")
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Error("no cpu request or memory limit")
	}
	if len(pod.Spec.TopologySpreadConstraints) == 0 {
		t.Error("no topology spread")
	}
	if grace := time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second; grace <= cfg.ShutdownDelay+cfg.ShutdownTimeout {
		t.Errorf("terminationGracePeriodSeconds %v does not cover shutdown delay %v + timeout %v", grace, cfg.ShutdownDelay, cfg.ShutdownTimeout)
	}
	// Selectors find the pods.
	labels := pod.Labels
	if !matches(d.Spec.Selector.MatchLabels, labels) || !matches(svc.Spec.Selector, labels) ||
		!matches(m.pdbs[0].Spec.Selector.MatchLabels, labels) || !matches(m.netpols[0].Spec.PodSelector.MatchLabels, labels) {
		t.Error("a selector does not match the Deployment's pods")
	}
	if m.hpas[0].Spec.ScaleTargetRef.Name != d.Name || *m.hpas[0].Spec.MinReplicas < 2 {
		t.Errorf("HPA targets %s, min %d", m.hpas[0].Spec.ScaleTargetRef.Name, *m.hpas[0].Spec.MinReplicas)
	}
	// gRPC service port is declared as gRPC.
	for _, p := range svc.Spec.Ports {
		if p.Name == "grpc" && (p.AppProtocol == nil || *p.AppProtocol != "grpc" || itoa(p.Port) != portOf(t, cfg.GRPCAddr)) {
			t.Errorf("service port grpc: %+v", p)
		}
	}
	// The migration Job runs `migrate` with the same secret, as hardened.
	job := m.jobs[0].Spec.Template.Spec
	if !slices.Equal(job.Containers[0].Args, []string{"migrate"}) || job.Containers[0].EnvFrom[0].SecretRef.Name != m.secrets[0].Name ||
		job.Containers[0].SecurityContext == nil || !*job.Containers[0].SecurityContext.ReadOnlyRootFilesystem {
		t.Error("migration Job")
	}
	if k.Namespace == "" {
		t.Error("base sets no namespace")
	}
	checkNetworkPolicy(t, m.netpols[0], ports)
}

// checkNetworkPolicy: the check ports admit only the gateway and mesh
// namespaces (labelled extauthz.io/client=true, or Istio's own), never
// every namespace or every pod; the file says how to widen it.
func checkNetworkPolicy(t *testing.T, np *networkingv1.NetworkPolicy, ports map[string]int32) {
	t.Helper()
	allowedNS := map[string]bool{"istio-system": true, "istio-ingress": true}
	reached := map[int32]bool{}
	for i, rule := range np.Spec.Ingress {
		if len(rule.From) == 0 {
			t.Errorf("ingress rule %d admits every source", i)
		}
		if len(rule.Ports) == 0 {
			t.Errorf("ingress rule %d admits every port", i)
		}
		check := false
		for _, p := range rule.Ports {
			port := p.Port.IntVal
			reached[port] = true
			check = check || port == ports["grpc"] || port == ports["http"]
		}
		for _, peer := range rule.From {
			ns := peer.NamespaceSelector
			switch {
			case peer.IPBlock != nil:
				t.Errorf("ingress rule %d admits an IP block", i)
			case ns == nil || len(ns.MatchLabels)+len(ns.MatchExpressions) == 0:
				t.Errorf("ingress rule %d admits pods of every namespace", i)
			case !check:
			case ns.MatchLabels["extauthz.io/client"] == "true" && len(ns.MatchLabels) == 1:
			case allowedNS[ns.MatchLabels["kubernetes.io/metadata.name"]] && len(ns.MatchLabels) == 1:
			default:
				t.Errorf("ingress rule %d admits namespaces %v to the check ports; want extauthz.io/client=true or an Istio namespace", i, ns)
			}
		}
	}
	for _, name := range []string{"grpc", "http"} {
		if !reached[ports[name]] {
			t.Errorf("no caller may reach the %s port %d", name, ports[name])
		}
	}
	if !strings.Contains(string(repoFile(t, "k8s/base/networkpolicy.yaml")), "kubectl label namespace") {
		t.Error("networkpolicy.yaml does not say how to admit another namespace")
	}
}

func itoa(n int32) string { return strconv.Itoa(int(n)) }

// The TLS overlay: the Deployment patch gives a valid TLS + mTLS
// configuration whose files come from the Secret cert-manager writes,
// mounted whole (so rotations reach the pod), and moves every probe to the
// plaintext health port.
func TestKubernetesTLSOverlay(t *testing.T) {
	t.Parallel()
	var m manifests
	k := m.loadKustomization(t, "../../k8s/tls")
	if len(m.certs) != 1 || len(k.Patches) != 1 || len(m.deployments) != 1 {
		t.Fatalf("want one Certificate, one patch and the base Deployment; got %v, %d patches", m.kinds, len(k.Patches))
	}
	crt, base := m.certs[0], m.deployments[0]
	var patch appsv1.Deployment
	if err := decodeStrict(repoFile(t, "k8s/tls/"+k.Patches[0].Path), &patch); err != nil {
		t.Fatalf("patch: %v", err)
	}
	if patch.Name != base.Name || len(patch.Spec.Template.Spec.Containers) != 1 || patch.Spec.Template.Spec.Containers[0].Name != base.Spec.Template.Spec.Containers[0].Name {
		t.Fatal("the patch does not name the base Deployment and its container")
	}
	c, pod := patch.Spec.Template.Spec.Containers[0], patch.Spec.Template.Spec

	env := map[string]string{"EXTAUTHZ_HMAC_SECRETS": "k1:" + pepper32}
	for k, v := range m.configMaps[0].Data {
		env[k] = v
	}
	for _, e := range c.Env {
		if !known[strings.TrimPrefix(e.Name, "EXTAUTHZ_")] {
			t.Errorf("patch: %s is not a setting", e.Name)
		}
		env[e.Name] = e.Value
	}
	cfg, err := loadConfig(lookupMap(env))
	if err != nil {
		t.Fatalf("ConfigMap + patch: %v", err)
	}
	if !cfg.TLS() || cfg.TLSClientCAFile == "" || cfg.HealthAddr == "" {
		t.Fatalf("want TLS, client certificates and a health port: %v", cfg)
	}
	// Each file is in the Secret cert-manager writes, mounted whole.
	secretOf := map[string]string{}
	for _, v := range pod.Volumes {
		if v.Secret != nil {
			secretOf[v.Name] = v.Secret.SecretName
		}
	}
	for _, f := range []string{cfg.TLSCertFile, cfg.TLSKeyFile, cfg.TLSClientCAFile} {
		found := false
		for _, vm := range c.VolumeMounts {
			if filepath.Dir(f) == vm.MountPath && vm.SubPath == "" && vm.ReadOnly && secretOf[vm.Name] == crt.Spec.SecretName &&
				slices.Contains([]string{"tls.crt", "tls.key", "ca.crt"}, filepath.Base(f)) {
				found = true
			}
		}
		if !found {
			t.Errorf("%s is not a key of Secret %s mounted read-only without subPath", f, crt.Spec.SecretName)
		}
	}
	// Probes on the plaintext health port, which the container declares.
	hp := portOf(t, cfg.HealthAddr)
	declared := false
	for _, p := range c.Ports {
		declared = declared || itoa(p.ContainerPort) == hp
	}
	if !declared {
		t.Errorf("health port %s not declared", hp)
	}
	for name, p := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe} {
		if p == nil || p.GRPC == nil || itoa(p.GRPC.Port) != hp {
			t.Errorf("%s probe is not gRPC on the health port %s", name, hp)
		}
	}
	// The certificate names the Service envoy-mtls.yaml dials, for serving.
	sni := ""
	for _, cl := range loadBootstrap(t, "envoy/envoy-mtls.yaml").GetStaticResources().GetClusters() {
		if cl.GetName() == "extauthz" {
			sni = mustJSON(t, cl.GetTransportSocket())
		}
	}
	if len(crt.Spec.DNSNames) == 0 || !strings.Contains(sni, `"sni":"`+crt.Spec.DNSNames[0]+`"`) {
		t.Errorf("Certificate dnsNames %v do not hold envoy-mtls.yaml's SNI", crt.Spec.DNSNames)
	}
	if !slices.Contains(crt.Spec.Usages, "server auth") || crt.Spec.PrivateKey.RotationPolicy != "Always" {
		t.Errorf("Certificate: usages %v, key rotation %q", crt.Spec.Usages, crt.Spec.PrivateKey.RotationPolicy)
	}
}

func TestIstioOverlay(t *testing.T) {
	t.Parallel()
	var m manifests
	m.loadKustomization(t, "../../k8s/istio")
	var base kustomization
	if err := decodeStrict(repoFile(t, "k8s/base/kustomization.yaml"), &base); err != nil {
		t.Fatal(err)
	}
	if len(m.policies) != 1 || len(m.filters) != 1 || len(m.services) != 1 {
		t.Fatalf("want one AuthorizationPolicy, EnvoyFilter and the base Service; got %v", m.kinds)
	}

	// The mesh config: decoded strictly into Istio's MeshConfig.
	var values struct {
		MeshConfig json.RawMessage `json:"meshConfig"`
	}
	if err := decodeStrict(repoFile(t, "k8s/istio/mesh-config.yaml"), &values); err != nil {
		t.Fatal(err)
	}
	var mesh meshv1alpha1.MeshConfig
	if err := protojson.Unmarshal(values.MeshConfig, &mesh); err != nil {
		t.Fatalf("mesh-config.yaml: %v", err)
	}
	svc := m.services[0]
	host := svc.Name + "." + base.Namespace + ".svc.cluster.local"
	svcPort := map[string]uint32{}
	for _, p := range svc.Spec.Ports {
		svcPort[p.Name] = uint32(p.Port)
	}
	providers := map[string]bool{}
	for _, p := range mesh.GetExtensionProviders() {
		providers[p.GetName()] = true
		if g := p.GetEnvoyExtAuthzGrpc(); g != nil {
			if g.GetService() != host || g.GetPort() != svcPort["grpc"] || g.GetFailOpen() || g.GetStatusOnError() != "503" || g.GetTimeout().AsDuration() > 500*time.Millisecond {
				t.Errorf("gRPC provider %s: %v", p.GetName(), g)
			}
		}
		if h := p.GetEnvoyExtAuthzHttp(); h != nil {
			if h.GetService() != host || h.GetPort() != svcPort["http"] || h.GetPathPrefix() != defaultConfig().HTTPPrefix || h.GetFailOpen() || h.GetStatusOnError() != "503" ||
				!slices.Contains(h.GetHeadersToUpstreamOnAllow(), authz.HeaderTenant) || !slices.Contains(h.GetIncludeRequestHeadersInCheck(), "x-api-key") {
				t.Errorf("HTTP provider %s: %v", p.GetName(), h)
			}
		}
	}
	if len(providers) != 2 {
		t.Errorf("want a gRPC and an HTTP provider, got %v", providers)
	}
	// The policy uses one of them, as CUSTOM.
	pol := m.policies[0]
	if pol.GetAction() != securityv1beta1.AuthorizationPolicy_CUSTOM || !providers[pol.GetProvider().GetName()] {
		t.Errorf("policy: action %v provider %q", pol.GetAction(), pol.GetProvider().GetName())
	}
	if n := mesh.GetPathNormalization().GetNormalization(); n != meshv1alpha1.MeshConfig_ProxyPathNormalization_MERGE_SLASHES &&
		n != meshv1alpha1.MeshConfig_ProxyPathNormalization_DECODE_AND_MERGE_SLASHES {
		t.Errorf("mesh pathNormalization %v: want slashes merged after normalisation", n)
	}
	// The EnvoyFilter's patches: a valid Envoy HTTP filter, first, that
	// strips the identity headers, and headers with underscores rejected.
	underscores := false
	for _, cp := range m.filters[0].GetConfigPatches() {
		raw, err := protojson.Marshal(cp.GetPatch().GetValue())
		if err != nil {
			t.Fatal(err)
		}
		if cp.GetApplyTo() == networkingv1alpha3.EnvoyFilter_NETWORK_FILTER {
			var f listenerv3.Filter
			var hcm hcmv3.HttpConnectionManager
			if err := protojson.Unmarshal(raw, &f); err != nil || f.GetTypedConfig().UnmarshalTo(&hcm) != nil {
				t.Fatalf("EnvoyFilter network patch is not an http_connection_manager: %v", err)
			}
			underscores = hcm.GetCommonHttpProtocolOptions().GetHeadersWithUnderscoresAction() == corev3.HttpProtocolOptions_REJECT_REQUEST &&
				cp.GetPatch().GetOperation() == networkingv1alpha3.EnvoyFilter_Patch_MERGE
			continue
		}
		var hf hcmv3.HttpFilter
		if err := protojson.Unmarshal(raw, &hf); err != nil {
			t.Fatalf("EnvoyFilter patch is not an Envoy HttpFilter: %v", err)
		}
		validateDeep(t, "EnvoyFilter patch", &hf)
		s := mustJSON(t, &hf)
		for _, h := range []string{authz.HeaderTenant, authz.HeaderKeyID, authz.HeaderScopes} {
			if !strings.Contains(s, `"remove":"`+h+`"`) {
				t.Errorf("EnvoyFilter does not remove %s", h)
			}
		}
		if cp.GetPatch().GetOperation() != networkingv1alpha3.EnvoyFilter_Patch_INSERT_FIRST {
			t.Error("the header strip must come first, before ext_authz")
		}
	}
	if !underscores {
		t.Error("the EnvoyFilter does not reject headers with underscores")
	}
}
