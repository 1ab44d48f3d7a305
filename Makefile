# Every target creates or reuses the virtual environment in .venv first, so `make run` and
# `make test` work on a fresh clone with nothing but python3 installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LOCK := requirements/runtime.lock
PROTOS := $(wildcard protos/shop/v1/*.proto)

.PHONY: install generate check-generated run migrate test lint bench clean

install: $(STAMP)

# setup.py and the C source: the compiled batch encoder is rebuilt when they change.
# The runtime dependencies come from the lock, hashes checked; the project and its dev extra
# after them find those already satisfied (pip upgrades none of them), so the service runs on
# the versions the image has.
$(STAMP): pyproject.toml setup.py service/api/_user_batch.c $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The runtime dependencies of pyproject.toml, pinned with the hash of every file of each pinned
# version (so one lock serves Linux x86_64 and aarch64 alike), for Python 3.11 and later,
# markers kept (uvloop's sys_platform). `make lock` resolves from scratch, as of now (the moment
# goes into the lock's header as --exclude-newer): each pin is the newest release its range in
# pyproject.toml allows. To hold a package back, narrow its range there.
LOCK_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --upgrade --quiet
.PHONY: lock check-lock
lock: $(STAMP)
	$(LOCK_COMPILE) --exclude-newer "$$(date -u +%Y-%m-%dT%H:%M:%SZ)" -o $(LOCK)

# Fails when the lock is not what `make lock` made of pyproject.toml: the same resolution again,
# as of the lock's own moment, so releases (or files) published since change nothing; a change
# to pyproject.toml's dependencies or a hand edit of the lock (a pin, a hash) does.
check-lock: $(STAMP)
	@at=$$(sed -n 's/.*--exclude-newer \([^ ]*\).*/\1/p' $(LOCK)); \
	test -n "$$at" || { echo "$(LOCK): no --exclude-newer in its header: run make lock" >&2; exit 1; }; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(LOCK_COMPILE) --exclude-newer "$$at" -o "$$tmp/again" || exit 1; \
	grep -v '^#' $(LOCK) > "$$tmp/locked"; grep -v '^#' "$$tmp/again" > "$$tmp/made"; \
	diff -u "$$tmp/locked" "$$tmp/made" || { echo "$(LOCK) is stale: run make lock" >&2; exit 1; }

# Regenerate generated/ from protos/ (messages, services and typed stubs), and the descriptor
# set of the three services with every import and the comments, which Envoy's
# grpc_json_transcoder loads (deploy/) to map the google.api.http routes onto the RPCs. The set
# also holds google/rpc/error_details.proto (no Python made from it: googleapis-common-protos
# has it): the transcoder writes an error's ErrorInfo and BadRequest into the JSON answer only
# when it knows their types, and answers an empty body otherwise.
DESCRIPTORS := generated/descriptors/shop_v1.binpb
generate: $(STAMP)
	rm -rf generated/shop generated/descriptors
	mkdir -p generated/descriptors
	$(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=generated --grpc_python_out=generated \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=generated \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=generated \
		$(PROTOS)
	$(PY) -m grpc_tools.protoc -Iprotos \
		--descriptor_set_out=$(DESCRIPTORS) --include_imports --include_source_info \
		$(PROTOS) protos/google/rpc/error_details.proto
	touch generated/shop/__init__.py generated/shop/v1/__init__.py

# Fails when generated/ differs from what `make generate` produces.
check-generated: generate
	git diff --exit-code --stat -- generated/
	test -z "$$(git status --porcelain -- generated/)"

# Lint the .proto contract with buf's STANDARD rules (config and exemptions: protos/buf.yaml).
.PHONY: buf-lint
buf-lint: $(STAMP)
	cd protos && ../$(VENV)/bin/buf lint

# Fails when protos/ breaks the contract of the previous commit (history needed: CI's full clone).
# `make buf-breaking AGAINST=origin/main` compares with another ref. See .ci/buf-breaking.
.PHONY: buf-breaking
buf-breaking: $(STAMP)
	BUF=$(VENV)/bin/buf bash .ci/buf-breaking $(AGAINST)

# Schema gates (docs/migrations.md): `alembic check` on a fresh scratch database, then squawk
# over the SQL of the migrations (`alembic upgrade 0002:head --sql`, rules in .squawk.toml).
# The scratch database comes from where the tests get theirs (SHOP_TEST_DATABASE_URL, ...).
.PHONY: migrations-check
migrations-check: $(STAMP)
	$(PY) -m tests.migrations.ci_gate

run: $(STAMP)
	$(PY) -m service migrate
	$(PY) -m service serve

migrate: $(STAMP)
	$(PY) -m service migrate

# REPLICAS service replicas and Envoy in front of them on 127.0.0.1:8080 (SHOP_ENVOY_PORT):
# gRPC, gRPC-Web and JSON/HTTP. Migrates once; one embedded PostgreSQL for all of them unless
# SHOP_DATABASE_URL is set. Ctrl-C or SIGTERM stops everything (deploy/cluster.py, README).
REPLICAS ?= 3
.PHONY: run-cluster
run-cluster: $(STAMP)
	$(PY) -m deploy.cluster --replicas $(REPLICAS)

# A Patroni cluster on this machine (etcd, a primary and a synchronous standby in a temporary
# directory; Debian's patroni, etcd-server and postgresql-15), migrated, and the service on its
# multi-host URL (target_session_attrs=read-write). Ctrl-C or SIGTERM stops everything
# (deploy/patroni/cluster.py, README "High availability").
.PHONY: run-ha
run-ha: $(STAMP)
	$(PY) -m deploy.patroni.cluster --serve

# The Dockerfile built with podman on a Debian base made here by debootstrap, for machines with
# no Docker engine or registry (root; Debian's podman, runc and debootstrap): deploy/image/.
# image-smoke builds it, then migrates, serves, calls and stops it against a database of its
# own on the PostgreSQL at 127.0.0.1:5432 (dropped after).
.PHONY: image image-smoke
image: $(STAMP)
	$(PY) -m deploy.image.build

image-smoke: $(STAMP)
	$(PY) -m deploy.image.smoke

# The Node client test (tests/test_examples.py) needs examples/node's packages, and the browser
# test (tests/cluster/test_browser.py) the page of examples/browser built into its dist/: `make test`
# installs and builds them when node and npm are here, so a newcomer runs what CI runs. Without
# node those tests skip (and fail under CI=true: tests/tools.py).
NODE_MODULES := examples/node/node_modules/.package-lock.json
BROWSER_MODULES := examples/browser/node_modules/.package-lock.json
BROWSER_PAGE := examples/browser/dist/app.js
TEST_NEEDS := $(STAMP)
ifneq ($(shell command -v node && command -v npm),)
TEST_NEEDS += $(NODE_MODULES) $(BROWSER_PAGE)
endif

$(NODE_MODULES): examples/node/package-lock.json
	npm ci --prefix examples/node --no-audit --no-fund
	touch $@

$(BROWSER_MODULES): examples/browser/package-lock.json
	npm ci --prefix examples/browser --no-audit --no-fund
	touch $@

# The page (index.html + one esbuild bundle of Connect-Web and the descriptor set) in
# examples/browser/dist/: serve that folder and open index.html?envoy=...&user=... (README).
.PHONY: browser-example
browser-example: $(BROWSER_PAGE)

$(BROWSER_PAGE): $(BROWSER_MODULES) $(DESCRIPTORS) examples/browser/build.mjs \
		examples/browser/index.html examples/browser/src/app.js
	node examples/browser/build.mjs

test: $(TEST_NEEDS)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check service tests alembic bench deploy
	$(PY) -m ruff format --check service tests alembic bench deploy
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
