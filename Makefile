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

.PHONY: deps build release install demo test bench bench-quick clean

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

clean:
	rm -rf .build
