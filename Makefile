# Small Makefile: every target creates the virtual environment it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080

.PHONY: install install-dev run lint format typecheck test test-only system-deps bench-deps bench soak lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.lock pyproject.toml
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.lock
	$(BIN)/pip install -q -r requirements-dev.lock
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# The Nchan module as Debian installs it; nginx itself is in /usr/sbin, which a user's PATH may lack.
NCHAN_MODULE := /usr/lib/nginx/modules/ngx_nchan_module.so
HAVE_NCHAN := { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null && test -f $(NCHAN_MODULE)

# The browser binary tests/browser launches (Debian's /usr/bin/chromium is a shell wrapper that execs it).
CHROMIUM := /usr/lib/chromium/chromium

# Debian packages the tests run for real (redis-server; nginx with Nchan; prometheus; chromium for tests/browser; iproute2 for `ss`, which counts a node's Redis connections);
# installed only when missing. Without recommends: prometheus would also bring node-exporter and hardware tools the
# tests do not use, chromium desktop services (upower, udev, a notification daemon, printer tools), GPU drivers and
# fonts-liberation; headless pages render text all the same, in DejaVu, which fontconfig depends on.
system-deps:
	@command -v redis-server >/dev/null && command -v prometheus >/dev/null && command -v ss >/dev/null && $(HAVE_NCHAN) && test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server nginx libnginx-mod-nchan prometheus chromium iproute2; }

# nginx with Nchan, the server `make bench` compares the hub with; installed only when missing.
bench-deps:
	@$(HAVE_NCHAN) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libnginx-mod-nchan; }

run: install
	@echo "Hub on http://localhost:$(PORT) (embedded memory backend and demo worker, anonymous mode: no authentication)."
	@echo "Open http://localhost:$(PORT)/ for the demo page. Or, in another shell:"
	@echo "  curl -N http://localhost:$(PORT)/v1/channels/demo/events"
	@echo "  curl -X POST -H 'Content-Type: application/json' -d '{\"event\":\"token\",\"data\":\"hello\"}' http://localhost:$(PORT)/v1/channels/demo/events"
	@echo "A generation, streamed as it is written (add -H 'Accept: text/event-stream' to get it in the same response):"
	@echo "  curl -X POST -H 'Content-Type: application/json' -d '{\"provider\":\"demo\",\"model\":\"demo\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}' http://localhost:$(PORT)/v1/generations"
	@echo "  curl -N 'http://localhost:$(PORT)/v1/channels/gen:<id>/events?last_event_id=0'"
	$(BIN)/python -m hub --port $(PORT) --anonymous

lint: install-dev
	$(BIN)/ruff check ssecore hub producer loadtest tests bench
	$(BIN)/ruff format --check ssecore hub producer loadtest tests bench
	$(BIN)/lint-imports --no-cache
	$(BIN)/vulture ssecore hub producer loadtest vulture_whitelist.py

format: install-dev
	$(BIN)/ruff check --fix ssecore hub producer loadtest tests bench
	$(BIN)/ruff format ssecore hub producer loadtest tests bench

typecheck: install-dev
	$(BIN)/mypy

# The JavaScript clients the tests run (the Vercel AI SDK), as tests/js/package-lock.json pins them.
tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --ignore-scripts
	touch $@

test-only: install-dev system-deps tests/js/node_modules/.installed
	$(BIN)/pytest

test: lint typecheck test-only

# Benchmarks report figures; they are never pass/fail and not part of `make test`.
bench: install-dev system-deps bench-deps
	$(BIN)/python bench/run.py --out bench/results.md
	$(BIN)/python bench/producer.py --out bench/results-producer.md
	$(BIN)/python bench/formats.py --out bench/results-formats.md
	$(BIN)/python bench/publish_path.py --out bench/results-publish-path.md
	$(BIN)/python bench/replicas.py --out bench/results-replicas.md

# The soak with random kill -9 of hub nodes and workers (`make test` runs 30 s of it without kills). It prints its
# report and fails when a generation was lost, duplicated or never finished. SOAK_S=60 make soak for a short one.
SOAK_S ?= 600
soak: install
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; }
	$(BIN)/python -m tests.soak --duration $(SOAK_S) --kills --logs

# Re-resolve the pins from pyproject.toml in throw-away environments.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install -q .
	{ echo "# Runtime dependencies, pinned. Regenerate with \`make lock\` after changing pyproject.toml."; \
	  .lock-venv/bin/pip freeze --exclude sse-hub; } > requirements.lock
	.lock-venv/bin/pip install -q ".[dev]"
	{ echo "# Development and test dependencies, pinned (on top of requirements.lock). Regenerate with \`make lock\`."; \
	  echo "-r requirements.lock"; .lock-venv/bin/pip freeze --exclude sse-hub | grep -vxF -f requirements.lock; } \
	  > requirements-dev.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
