package kustomizetest

import (
	"encoding/json"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// repo is the repository's root, seen from this package's directory.
const repo = "../.."

// The override the README's Kubernetes and Docker sections show, and the
// one testdata/overlay applies.
const (
	overrideName = "registry.example.com/platform/extauthz"
	overrideTag  = "v1.2.0"
	override     = overrideName + ":" + overrideTag
)

// object is the part of a rendered object these tests read.
type object struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name        string            `json:"name"`
		Namespace   string            `json:"namespace"`
		Labels      map[string]string `json:"labels"`
		Annotations map[string]string `json:"annotations"`
	} `json:"metadata"`
	Spec struct {
		Template struct {
			Spec podSpec `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

func (o object) String() string {
	return o.Kind + " " + o.Metadata.Namespace + "/" + o.Metadata.Name
}

type podSpec struct {
	InitContainers []container `json:"initContainers"`
	Containers     []container `json:"containers"`
	Volumes        []struct {
		Name   string `json:"name"`
		Secret *struct {
			SecretName string `json:"secretName"`
		} `json:"secret"`
	} `json:"volumes"`
}

type container struct {
	Name  string   `json:"name"`
	Image string   `json:"image"`
	Args  []string `json:"args"`
	Env   []struct {
		Name  string `json:"name"`
		Value string `json:"value"`
	} `json:"env"`
	Ports []struct {
		Name          string `json:"name"`
		ContainerPort int    `json:"containerPort"`
	} `json:"ports"`
	VolumeMounts []struct {
		Name      string `json:"name"`
		MountPath string `json:"mountPath"`
	} `json:"volumeMounts"`
	LivenessProbe  *probe `json:"livenessProbe"`
	ReadinessProbe *probe `json:"readinessProbe"`
	StartupProbe   *probe `json:"startupProbe"`
}

type probe struct {
	GRPC *struct {
		Port    int     `json:"port"`
		Service *string `json:"service"`
	} `json:"grpc"`
	PeriodSeconds int `json:"periodSeconds"`
}

// containers lists a workload's init and regular containers.
func (o object) containers() []container {
	s := o.Spec.Template.Spec
	return append(slices.Clone(s.InitContainers), s.Containers...)
}

// build renders the kustomization in dir, as `kubectl apply -k dir` would.
func build(t *testing.T, fSys filesys.FileSystem, dir string) []object {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(fSys, dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var objs []object
	for _, r := range m.Resources() {
		b, err := r.MarshalJSON()
		if err != nil {
			t.Fatalf("%s: %s: %v", dir, r.CurId(), err)
		}
		var o object
		if err := json.Unmarshal(b, &o); err != nil {
			t.Fatalf("%s: %s: %v", dir, r.CurId(), err)
		}
		objs = append(objs, o)
	}
	return objs
}

func buildOnDisk(t *testing.T, dir string) []object {
	t.Helper()
	return build(t, filesys.MakeFsOnDisk(), dir)
}

// only returns the one object of that kind and name.
func only(t *testing.T, objs []object, kind, name string) object {
	t.Helper()
	var found []object
	for _, o := range objs {
		if o.Kind == kind && o.Metadata.Name == name {
			found = append(found, o)
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one %s %s, got %d", kind, name, len(found))
	}
	return found[0]
}

// images maps each workload container ("Kind/name container") to its image.
func images(objs []object) map[string]string {
	out := map[string]string{}
	for _, o := range objs {
		for _, c := range o.containers() {
			out[o.Kind+"/"+o.Metadata.Name+" "+c.Name] = c.Image
		}
	}
	return out
}

// baseKustomization is k8s/base/kustomization.yaml, decoded strictly.
func baseKustomization(t *testing.T) types.Kustomization {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repo, "k8s/base/kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k types.Kustomization
	if err := yaml.UnmarshalStrict(b, &k); err != nil {
		t.Fatalf("k8s/base/kustomization.yaml: %v", err)
	}
	return k
}

// baseImage is the images: entry k8s/base has for the placeholder name
// extauthz the manifests use.
func baseImage(t *testing.T) types.Image {
	t.Helper()
	k := baseKustomization(t)
	for _, img := range k.Images {
		if img.Name != "extauthz" {
			continue
		}
		if img.NewName == "" || img.NewTag == "" || img.Digest != "" {
			t.Fatalf("k8s/base images: want newName and newTag for extauthz, got %+v", img)
		}
		return img
	}
	t.Fatal("k8s/base/kustomization.yaml has no images entry for extauthz")
	return types.Image{}
}

// ref is the image reference an images: entry with a new name and tag sets.
func ref(img types.Image) string { return img.NewName + ":" + img.NewTag }

// checkWorkloads holds what every rendering of the base must keep: the
// Deployment and the migrate Job both run wantImage (and no other
// container exists), the Job is still an Argo CD sync hook under the name
// the README's delete command uses, and every object carries the base's
// namespace and labels.
func checkWorkloads(t *testing.T, objs []object, wantImage string) {
	t.Helper()
	k := baseKustomization(t)

	want := map[string]string{
		"Deployment/extauthz extauthz": wantImage,
		"Job/extauthz-migrate migrate": wantImage,
	}
	if got := images(objs); !maps.Equal(got, want) {
		t.Errorf("container images:\n got %v\nwant %v", got, want)
	}

	job := only(t, objs, "Job", "extauthz-migrate")
	for key, value := range map[string]string{
		"argocd.argoproj.io/hook":               "Sync",
		"argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation",
	} {
		if got := job.Metadata.Annotations[key]; got != value {
			t.Errorf("%s: annotation %s = %q, want %q", job, key, got, value)
		}
	}
	if c := job.containers(); len(c) != 1 || !slices.Equal(c[0].Args, []string{"migrate"}) {
		t.Errorf("%s: want one container running migrate, got %+v", job, c)
	}

	for _, o := range objs {
		switch {
		case o.Kind == "Namespace":
			if o.Metadata.Name != k.Namespace || o.Metadata.Namespace != "" {
				t.Errorf("%s: want the Namespace %s", o, k.Namespace)
			}
		case o.Metadata.Namespace != k.Namespace:
			t.Errorf("%s: namespace %q, want %q", o, o.Metadata.Namespace, k.Namespace)
		}
		for _, l := range k.Labels {
			for key, value := range l.Pairs {
				if got := o.Metadata.Labels[key]; got != value {
					t.Errorf("%s: label %s = %q, want %q", o, key, got, value)
				}
			}
		}
	}
}

// The base as shipped: both workloads run the image its images: entry names.
func TestBaseRenders(t *testing.T) {
	t.Parallel()
	objs := buildOnDisk(t, filepath.Join(repo, "k8s/base"))
	checkWorkloads(t, objs, ref(baseImage(t)))
	var kinds []string
	for _, o := range objs {
		kinds = append(kinds, o.Kind)
	}
	for _, want := range []string{"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "Job"} {
		if !slices.Contains(kinds, want) {
			t.Errorf("rendered base has no %s (got %v)", want, kinds)
		}
	}
	if slices.Contains(kinds, "Secret") {
		t.Error("the base renders a Secret: secret.example.yaml must stay out of it")
	}
}

// An operator's overlay (testdata/overlay) with the README's images: entry.
// It names the image as the base renders it (ghcr.io/…): the base's own
// images: entry has already replaced the placeholder extauthz, so an
// overlay's `name: extauthz` would match nothing and change nothing.
func TestOverlayImageOverride(t *testing.T) {
	t.Parallel()
	objs := buildOnDisk(t, "testdata/overlay")
	checkWorkloads(t, objs, override)
}

// The README's other way: `cd k8s/base && kustomize edit set image
// extauthz=…`, which rewrites the base's images: entry. Rendered from an
// in-memory copy of k8s/ with that edit made.
func TestEditedBaseImageOverride(t *testing.T) {
	t.Parallel()
	mem := copyToMemory(t, filepath.Join(repo, "k8s"), "/k8s")
	k := baseKustomization(t)
	i := slices.IndexFunc(k.Images, func(img types.Image) bool { return img.Name == "extauthz" })
	if i < 0 {
		t.Fatal("k8s/base/kustomization.yaml has no images entry for extauthz")
	}
	k.Images[i] = types.Image{Name: "extauthz", NewName: overrideName, NewTag: overrideTag}
	b, err := yaml.Marshal(k)
	if err != nil {
		t.Fatal(err)
	}
	if err := mem.WriteFile("/k8s/base/kustomization.yaml", b); err != nil {
		t.Fatal(err)
	}
	checkWorkloads(t, build(t, mem, "/k8s/base"), override)
	// The TLS overlay on the edited base picks the edit up as well.
	checkWorkloads(t, build(t, mem, "/k8s/tls"), override)
}

// copyToMemory copies the directory tree src on disk to dst in memory.
func copyToMemory(t *testing.T, src, dst string) filesys.FileSystem {
	t.Helper()
	mem := filesys.MakeFsInMemory()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		to := filepath.Join(dst, rel)
		if d.IsDir() {
			return mem.MkdirAll(to)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return mem.WriteFile(to, b)
	})
	if err != nil {
		t.Fatal(err)
	}
	return mem
}

// The README documents the override that the tests above apply, in both
// forms, and the image the shipped base names.
func TestREADMEDocumentsOverride(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(filepath.Join(repo, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	readme := strings.Join(strings.Fields(string(b)), " ")
	for _, want := range []string{
		"kustomize edit set image extauthz=" + override,
		"- {name: " + baseImage(t).NewName + ", newName: " + overrideName + ", newTag: " + overrideTag + "}",
	} {
		if !strings.Contains(readme, want) {
			t.Errorf("README does not show %q", want)
		}
	}

	overlay, err := os.ReadFile("testdata/overlay/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k types.Kustomization
	if err := yaml.UnmarshalStrict(overlay, &k); err != nil {
		t.Fatal(err)
	}
	if want := []types.Image{{Name: baseImage(t).NewName, NewName: overrideName, NewTag: overrideTag}}; !slices.Equal(k.Images, want) {
		t.Errorf("testdata/overlay images = %+v, want %+v", k.Images, want)
	}

	// The README names the image the shipped base points at.
	if img := ref(baseImage(t)); !strings.Contains(readme, "`"+img+"`") {
		t.Errorf("README never names the base's image `%s`", img)
	}
}

// The TLS overlay's strategic-merge patch merges into the base container
// (by name) rather than replacing it: the image, args and base ports and
// env stay, the TLS settings, health port and mount are added, and the
// probes move to the health port keeping the base's periods.
func TestTLSOverlayRenders(t *testing.T) {
	t.Parallel()
	objs := buildOnDisk(t, filepath.Join(repo, "k8s/tls"))
	checkWorkloads(t, objs, ref(baseImage(t)))
	only(t, objs, "Certificate", "extauthz-tls")

	d := only(t, objs, "Deployment", "extauthz")
	cs := d.containers()
	if len(cs) != 1 {
		t.Fatalf("%s: want one container, got %d", d, len(cs))
	}
	c := cs[0]
	if !slices.Equal(c.Args, []string{"serve"}) {
		t.Errorf("args = %v, want [serve]", c.Args)
	}
	var env, ports []string
	for _, e := range c.Env {
		env = append(env, e.Name)
	}
	for _, p := range c.Ports {
		ports = append(ports, p.Name)
	}
	for _, want := range []string{"GOMEMLIMIT", "EXTAUTHZ_TLS_CERT_FILE", "EXTAUTHZ_TLS_KEY_FILE", "EXTAUTHZ_TLS_CLIENT_CA_FILE", "EXTAUTHZ_HEALTH_ADDR"} {
		if !slices.Contains(env, want) {
			t.Errorf("env has no %s: %v", want, env)
		}
	}
	for _, want := range []string{"grpc", "http", "metrics", "health"} {
		if !slices.Contains(ports, want) {
			t.Errorf("ports have no %s: %v", want, ports)
		}
	}
	for name, p := range map[string]*probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe} {
		if p == nil || p.GRPC == nil || p.GRPC.Port != 9002 || p.PeriodSeconds == 0 {
			t.Errorf("%s probe: want gRPC on 9002 with the base's period, got %+v", name, p)
		}
	}
	if len(c.VolumeMounts) != 1 || c.VolumeMounts[0].Name != "tls" {
		t.Errorf("volume mounts = %+v, want the tls Secret", c.VolumeMounts)
	}
	vols := d.Spec.Template.Spec.Volumes
	if len(vols) != 1 || vols[0].Secret == nil || vols[0].Secret.SecretName != "extauthz-tls" {
		t.Errorf("volumes = %+v, want Secret extauthz-tls", vols)
	}
}

// The Istio overlay: the base in its namespace, the policy and the filter
// left in the workload's namespace (the overlay sets none of its own).
func TestIstioOverlayRenders(t *testing.T) {
	t.Parallel()
	objs := buildOnDisk(t, filepath.Join(repo, "k8s/istio"))
	var base, mesh []object
	for _, o := range objs {
		if strings.HasSuffix(o.APIVersion, ".istio.io/v1") || strings.HasSuffix(o.APIVersion, ".istio.io/v1alpha3") {
			mesh = append(mesh, o)
			continue
		}
		base = append(base, o)
	}
	checkWorkloads(t, base, ref(baseImage(t)))
	if len(mesh) != 2 {
		t.Fatalf("want the AuthorizationPolicy and the EnvoyFilter, got %v", mesh)
	}
	for _, o := range mesh {
		if o.Metadata.Namespace != "shop" {
			t.Errorf("%s: want namespace shop", o)
		}
	}
	only(t, mesh, "AuthorizationPolicy", "api-keys")
	only(t, mesh, "EnvoyFilter", "strip-forged-identity")
}
