# Every target bootstraps .venv from requirements.lock (hash-pinned) when it is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The mcp 1.x clients the tests drive (LangGraph's among them): mcp 1.x cannot share .venv
# with the suite's mcp 2.x, so they get a second, small environment of their own.
VENV_MCP1 := .venv-mcp1
STAMP_MCP1 := $(VENV_MCP1)/.installed

.PHONY: install system-tools test lint demo bench soak image-test format clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml scripts/venv.sh
	scripts/venv.sh $(VENV) requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The system tools the tests start for real: redis-server, prometheus and promtool, node and
# npm, curl. Installed from Debian's packages when missing (as root or with password-less
# sudo); otherwise the script prints the exact apt-get line to run and fails.
system-tools:
	scripts/system-tools.sh

$(STAMP_MCP1): requirements-mcp1.lock $(STAMP)
	scripts/venv.sh $(VENV_MCP1) requirements-mcp1.lock
	touch $(STAMP_MCP1)

# Two pytest workers (pytest-xdist), each taking whole test files so that a module's shared
# PDP and sidecar start once: most of the suite waits on processes it starts. WORKERS=0
# runs everything in this one process.
WORKERS ?= 2

test: $(STAMP) $(STAMP_MCP1) system-tools
	$(BIN)/abcctl policy test policies
	$(BIN)/python -m pytest tests --ignore=tests/bench $(if $(filter-out 0,$(WORKERS)),-n $(WORKERS) --dist loadfile)

lint: $(STAMP)
	$(BIN)/ruff check pdp pep tests deploy
	$(BIN)/ruff format --check pdp pep tests deploy
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python deploy/demo/run.py $(if $(KEEP),--keep $(KEEP))

bench: $(STAMP)
	scripts/bench-tools.sh
	$(BIN)/python -m pytest tests/bench -s -p no:cacheprovider -o python_files="bench_*.py"

# abc-pdp's RSS over a million distinct decisions (fails above 1.2x its warm-up RSS).
soak: $(STAMP)
	ABC_DECISIONS=1000000 ABC_THREADS=16 $(BIN)/python -m pytest tests/bench/bench_engine.py -s -p no:cacheprovider \
		-o python_files="bench_*.py"

# deploy/Dockerfile built with podman and run as users run it (tests/image; as root, 2 to 3
# minutes on 2 cores). Not part of make test: .ci/run runs it after make test.
image-test: $(STAMP)
	scripts/image-tools.sh
	$(BIN)/python -m pytest tests/image -s -p no:cacheprovider -o python_files="check_*.py"

format: $(STAMP)
	$(BIN)/ruff format pdp pep tests deploy
	$(BIN)/ruff check --fix pdp pep tests deploy

clean:
	rm -rf $(VENV) $(VENV_MCP1) .pytest_cache .mypy_cache .ruff_cache
