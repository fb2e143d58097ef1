# Moonlet: `make demo` and `make test` do all set-up on a fresh Debian machine with Swift.
SWIFT ?= swift
JOBS ?= $(shell nproc)
# Release builds turn off Swift's dynamic exclusivity checks in every module, SwiftNIO
# included (Moonlet's own hot modules already do so in Package.swift): on the proxy's
# hot path they cost about 8% of its user CPU (see docs/architecture.md). Debug and
# test builds keep them.
RELEASE_FLAGS ?= -Xswiftc -enforce-exclusivity=unchecked
# `make install` copies the release binary to $(DESTDIR)$(PREFIX)/bin/moonlet.
PREFIX ?= /usr/local

.PHONY: deps build release install demo test bench bench-quick clean image

deps:
	@scripts/install-deps

build: deps
	$(SWIFT) build -j $(JOBS)

release: deps
	$(SWIFT) build -c release $(RELEASE_FLAGS) -j $(JOBS)

install: release
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 755 .build/release/moonlet $(DESTDIR)$(PREFIX)/bin/moonlet

demo: release
	.build/release/moonlet demo

test: deps
	$(SWIFT) build --build-tests -j $(JOBS)
	$(SWIFT) test --skip-build --disable-swift-testing

bench: release
	bench/run

bench-quick: release
	bench/run --quick

# `make image`: the container image (deploy/Dockerfile) with docker, else podman.
IMAGE ?= moonlet:latest
CONTAINER_TOOL ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)

image:
	@if [ -z "$(CONTAINER_TOOL)" ]; then \
	  echo "make image: neither docker nor podman is installed; install one (or set CONTAINER_TOOL) to build $(IMAGE) from deploy/Dockerfile" >&2; exit 1; \
	fi
	@$(CONTAINER_TOOL) info >/dev/null 2>&1 || { \
	  echo "make image: $(CONTAINER_TOOL) is installed but cannot reach its daemon or runtime ($(CONTAINER_TOOL) info fails); start it and run make image again" >&2; exit 1; }
	$(CONTAINER_TOOL) build -f deploy/Dockerfile -t $(IMAGE) .

clean:
	rm -rf .build
