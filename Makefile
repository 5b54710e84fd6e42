# extauthz: every developer and CI entry point. `make help` lists them.
GO          ?= go
BIN         := bin/extauthz
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X main.version=$(VERSION)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
FUZZTIME    ?= 30s
BENCHCOUNT  ?= 6
PKGS        := ./...

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## build a static binary into bin/extauthz
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/extauthz

IMAGE ?= extauthz:$(VERSION)

.PHONY: image
image: ## build the container image IMAGE (needs Docker; default extauthz:<git describe>)
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

.PHONY: image-push
image-push: image ## build and push IMAGE, e.g. make image-push IMAGE=registry.example.com/extauthz:v1.2.0
	docker push $(IMAGE)

.PHONY: run
run: build ## run the server on the embedded default (file store and pepper in ./.extauthz)
	./$(BIN) serve

.PHONY: test
test: test-deploy ## test-deploy (seconds), then vet and every test with the race detector (Postgres/Redis tests need the local servers)
	$(GO) vet $(PKGS)
	$(GO) test -race -shuffle=on -count=1 $(PKGS)

# A module of its own, so that kustomize stays out of the product's go.mod.
DEPLOYTEST := deploy/kustomizetest

.PHONY: test-deploy
test-deploy: ## render k8s/base, k8s/tls, k8s/istio and an image overlay with kustomize's Go API, and check them
	cd $(DEPLOYTEST) && $(GO) vet ./... && $(GO) test -count=1 ./...

.PHONY: test-short
test-short: ## tests without the race detector, quick
	$(GO) test -count=1 $(PKGS)

CADDY_VERSION ?= v2.10.2

.PHONY: e2e-caddy
e2e-caddy: ## build Caddy from the Go module proxy and run the forward_auth end-to-end test with it
	GOBIN=$(CURDIR)/bin $(GO) install github.com/caddyserver/caddy/v2/cmd/caddy@$(CADDY_VERSION)
	EXTAUTHZ_TEST_CADDY=$(CURDIR)/bin/caddy $(GO) test -count=1 -run '^(TestCaddyForwardAuth|TestForwardAuthAddressWithTrailingSlash)$$' -v ./cmd/extauthz

.PHONY: propagation
propagation: ## revocation propagation figures, failing any revocation slower than a second (run on a quiet machine)
	EXTAUTHZ_TEST_STRICT_PROPAGATION=1 $(GO) test -count=1 -run '^(TestPropagationLag|TestTwoReplicasRevocationByEveryPath)$$' -v ./cmd/extauthz | grep -E '^(=== RUN|--- |\s+replicas_test.go:.*(revocations|denied on both)|ok|FAIL|PASS)'

SOAK_DURATION ?= 10m
SOAK_REPORT   ?= $(CURDIR)/docs/soak-$(shell date -u +%F).txt

.PHONY: soak
soak: ## issue 10's soak: replicas under load while Redis and Postgres faults cycle, revocations during each (SOAK_DURATION, default 10m; report in SOAK_REPORT)
	EXTAUTHZ_SOAK=1 SOAK_DURATION=$(SOAK_DURATION) SOAK_REPORT=$(SOAK_REPORT) $(GO) test -count=1 -timeout 0 -run '^TestSoak$$' -v ./cmd/extauthz

.PHONY: fuzz
fuzz: ## run every fuzz target for FUZZTIME each (default 30s)
	$(GO) test -run '^$$' -fuzz '^FuzzExtract$$' -fuzztime $(FUZZTIME) ./internal/tokens
	$(GO) test -run '^$$' -fuzz '^FuzzRedact$$' -fuzztime $(FUZZTIME) ./internal/tokens
	$(GO) test -run '^$$' -fuzz '^FuzzSharedEntry$$' -fuzztime $(FUZZTIME) ./internal/tokens
	$(GO) test -run '^$$' -fuzz '^FuzzCheck$$' -fuzztime $(FUZZTIME) ./internal/authz
	$(GO) test -run '^$$' -fuzz '^FuzzWireRequest$$' -fuzztime $(FUZZTIME) ./internal/authz
	$(GO) test -run '^$$' -fuzz '^FuzzAllowEncoding$$' -fuzztime $(FUZZTIME) ./internal/authz
	$(GO) test -run '^$$' -fuzz '^FuzzCanonicalPath$$' -fuzztime $(FUZZTIME) ./internal/authz
	$(GO) test -run '^$$' -fuzz '^FuzzParseRoutes$$' -fuzztime $(FUZZTIME) ./internal/authz

.PHONY: bench
bench: ## Go benchmarks with allocations, BENCHCOUNT runs each (compare with benchstat)
	$(GO) test -run '^$$' -bench . -benchmem -count $(BENCHCOUNT) ./internal/...

.PHONY: bench-load
bench-load: ## load test: extauthz vs the baseline noop and ideal servers, 100k warmed keys (ROUNDS, DURATION, KEYS, CONCURRENCY)
	bench/run-load.sh

.PHONY: lint
lint: ## gofmt, go vet and staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) run $(STATICCHECK) $(PKGS)

.PHONY: tidy-check
tidy-check: ## fail if go.mod/go.sum (the product's and deploy/kustomizetest's) are not tidy
	$(GO) mod tidy
	cd $(DEPLOYTEST) && $(GO) mod tidy
	git diff --exit-code go.mod go.sum $(DEPLOYTEST)/go.mod $(DEPLOYTEST)/go.sum

.PHONY: clean
clean: ## remove build output
	rm -rf bin
