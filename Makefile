# rpcmesh: the targets a newcomer can guess. `make test` and `make demo` build
# the virtualenv themselves when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF := npx --yes @bufbuild/buf@1.75.0

.PHONY: setup protos lint test test-unit demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy rpcmesh
	$(BUF) lint

# Everything: unit, integration, backend and fault tests, on TEST_WORKERS processes. A file's tests stay
# on one worker (--dist loadfile): tests that share a fixture, a NATS subject or a restarted port run in order.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 -rs

# Pure logic only: seconds.
test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

demo: $(STAMP)
	$(PY) examples/demo.py

# Every bench against its peer (etcd, DBOS, NATS JetStream, ...): the table at the top of
# docs/benchmarks.md and docs/benchmarks.png. The etcd comparison needs Debian's etcd-server:
# installed with apt when missing and allowed (root or password-less sudo), else skipped with a reason.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@command -v etcd >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq etcd-server >/dev/null; \
		elif sudo -n true 2>/dev/null; then sudo -n apt-get install -y -qq etcd-server >/dev/null; fi; \
		command -v etcd >/dev/null 2>&1 || echo "make bench: etcd-server is not installed; the Registry vs etcd rows are skipped"; }
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .rpcmesh build *.egg-info .pytest_cache .mypy_cache .ruff_cache
