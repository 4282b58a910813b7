# Every target creates and uses .venv itself, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench fuzz lint fmt clean system-deps browser-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Binaries the benchmarks run: PgBouncer (the reference proxy), HAProxy (one TCP relay hop)
# and sysbench (the MySQL load).
system-deps:
	@command -v pgbouncer >/dev/null 2>&1 || command -v /usr/sbin/pgbouncer >/dev/null 2>&1 || \
		(apt-get install -y -q --no-install-recommends pgbouncer >/dev/null || \
		 (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends pgbouncer >/dev/null))
	@command -v haproxy >/dev/null 2>&1 || command -v /usr/sbin/haproxy >/dev/null 2>&1 || \
		(apt-get install -y -q --no-install-recommends haproxy >/dev/null || \
		 (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends haproxy >/dev/null))
	@command -v sysbench >/dev/null 2>&1 || \
		(apt-get install -y -q --no-install-recommends sysbench >/dev/null || \
		 (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends sysbench >/dev/null))

# Headless Chromium, its WebDriver and a font from Debian, for the dashboard's browser test.
BROWSER_PACKAGES := chromium chromium-driver fonts-liberation
browser-deps:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
		(apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null || \
		 (apt-get update -q >/dev/null && \
		  apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null))

demo: $(STAMP)
	$(BIN)/dbmux demo

test: $(STAMP) browser-deps
	$(BIN)/pytest

bench: $(STAMP) system-deps
	$(BIN)/python -m bench

# Both engines' parsers under atheris, FUZZ_RUNS inputs each; the corpus lands in bench/fuzz.
FUZZ_RUNS ?= 1000000
fuzz: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,fuzz]'
	$(BIN)/python -m bench.fuzz --runs $(FUZZ_RUNS)

# mypy reads its files and strictness from [tool.mypy] in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
