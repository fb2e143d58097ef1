# Moonlet: `make demo` and `make test` do all set-up on a fresh Debian machine with Swift.
SWIFT ?= swift
JOBS ?= $(shell nproc)

.PHONY: deps build release demo test bench bench-quick clean

deps:
	@scripts/install-deps

build: deps
	$(SWIFT) build -j $(JOBS)

release: deps
	$(SWIFT) build -c release -j $(JOBS)

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
