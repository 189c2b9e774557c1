# polyhead: `make run` starts the server on the demo models; `make test` runs the whole suite.
# Both install what they need first (Debian packages, the Python venv, the generated models).

CARGO ?= cargo
JOBS ?= 2
PRESET ?= tiny
export POLYHEAD_MODELS ?= models/generated/$(PRESET)

.PHONY: all setup models build run test lint fmt clean

all: build

setup:
	PRESETS="$(PRESET)" scripts/setup.sh all

models:
	PRESETS="$(PRESET)" scripts/setup.sh venv models

# All targets at once: the tests' dependencies unify features with the binaries', so `make run`
# and `make test` share one build (and the tests that start the server binary find it).
build: setup
	$(CARGO) build --release -j$(JOBS) --workspace --all-targets

## Start the server on the demo model set (POLYHEAD_LISTEN, POLYHEAD_DEVICE, ... are honoured).
run: build
	./target/release/polyhead-server

## The whole test suite: unit tests, ONNX Runtime equivalence and end-to-end tests in Rust,
## then the server binary through real third-party gRPC peers (grpcurl, grpcio, tritonclient).
test: build
	scripts/setup.sh testtools
	$(CARGO) test --release -j$(JOBS) --workspace
	.venv/bin/python -m pytest -q tests/python

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release -j$(JOBS) --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf models/generated .cache
