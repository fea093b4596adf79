# Every target bootstraps .venv from requirements.lock (hash-pinned) when it is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-tools test lint demo bench soak image-test format clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# --ignore-requires-python: only for opa-golib-python-bindings (see requirements.lock);
	# every pin is exact and hash-checked, so nothing else can resolve differently.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes \
		--ignore-requires-python -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The system tools the tests start for real: redis-server, prometheus and promtool, node and
# npm, curl. Installed from Debian's packages when missing (as root or with password-less
# sudo); otherwise the script prints the exact apt-get line to run and fails.
system-tools:
	scripts/system-tools.sh

# Two pytest workers (pytest-xdist), each taking whole test files so that a module's shared
# PDP and sidecar start once: most of the suite waits on processes it starts. WORKERS=0
# runs everything in this one process.
WORKERS ?= 2

test: $(STAMP) system-tools
	$(BIN)/abcctl policy test policies
	$(BIN)/python -m pytest tests --ignore=tests/bench $(if $(filter-out 0,$(WORKERS)),-n $(WORKERS) --dist loadfile)

lint: $(STAMP)
	$(BIN)/ruff check pdp pep tests deploy
	$(BIN)/ruff format --check pdp pep tests deploy
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python deploy/demo/run.py $(if $(KEEP),--keep $(KEEP))

bench: $(STAMP)
	$(BIN)/python -m pytest tests/bench -s -p no:cacheprovider -o python_files="bench_*.py"

# abc-pdp's RSS over a million distinct decisions (fails above 1.2x its warm-up RSS).
soak: $(STAMP)
	ABC_DECISIONS=1000000 ABC_THREADS=16 $(BIN)/python -m pytest tests/bench/bench_engine.py -s -p no:cacheprovider \
		-o python_files="bench_*.py"

# deploy/Dockerfile built with podman and run as users run it (tests/image; minutes, needs root).
image-test: $(STAMP)
	scripts/image-tools.sh
	$(BIN)/python -m pytest tests/image -s -p no:cacheprovider -o python_files="check_*.py"

format: $(STAMP)
	$(BIN)/ruff format pdp pep tests deploy
	$(BIN)/ruff check --fix pdp pep tests deploy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
