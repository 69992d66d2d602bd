# `make run` sets everything up and starts Keyless on the quickstart config;
# `make test` runs the whole test suite. Both find a Python >= 3.12 on their own.
PYTHON ?= $(shell scripts/find-python)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check demo clean bench bench-smoke lock

# First run: a minute or two. pip's own lines show the progress (one per package).
$(STAMP): requirements-dev.lock pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python >= 3.12 found (set KEYLESS_PYTHON)"; exit 1; }
	@echo "==> creating $(VENV) with $(PYTHON) (first run only)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> installing the pinned dependencies (requirements-dev.lock)"
	$(BIN)/pip install --disable-pip-version-check --progress-bar on --require-hashes -r requirements-dev.lock
	@echo "==> installing keyless itself (editable)"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)
	@echo "==> $(VENV) ready"

run: $(STAMP)
	@echo "==> starting Keyless on keyless.yaml (Ctrl-C stops it)"
	@test -s .keyless/demo-api-key || { mkdir -p .keyless && $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(24))" > .keyless/demo-api-key && chmod 600 .keyless/demo-api-key; }
	$(BIN)/keyless run -c keyless.yaml

# The Node peers of some tests (oidc-provider, the Compose schema, undici/axios): `npm ci` where
# node_modules is missing; without npm those tests skip and say why.
NPM_PEERS := tests/oauth tests/compose tests/node-clients

test: $(STAMP)
	@scripts/npm-peers $(NPM_PEERS)
	$(BIN)/keyless policy test policies
	$(BIN)/keyless policy test docs/policy-examples
	$(BIN)/ruff check proxy tests bench scripts
	$(BIN)/mypy
	$(BIN)/python bench/run.py --smoke --out .keyless/bench-smoke >/dev/null
	$(BIN)/pytest

# The benchmark (docs/benchmarks.md): a few minutes; `make test` runs its smoke mode only.
bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-smoke: $(STAMP)
	$(BIN)/python bench/run.py --smoke

demo: $(STAMP)
	$(BIN)/keyless demo

check: $(STAMP)
	$(BIN)/keyless check -c keyless.yaml

clean:
	rm -rf $(VENV) .keyless

# Regenerate both lock files after changing dependencies in pyproject.toml:
# requirements.lock is what the image installs, requirements-dev.lock adds the test tools.
lock:
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --generate-hashes --python-version 3.12 --python-platform x86_64-unknown-linux-gnu -q -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.12 --python-platform x86_64-unknown-linux-gnu -q -o requirements-dev.lock
