// Package kustomizetest renders the shipped manifests (k8s/base, k8s/tls,
// k8s/istio) with kustomize's Go API and checks what comes out: the image
// overrides a user applies, the migrate Job, namespaces and labels. It is a
// module of its own so that kustomize stays out of the product's go.mod;
// `make test` runs it (`make test-deploy` alone).
package kustomizetest
