# The two front-door commands: `make demo` and `make test`. Both set up .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# test processes: one per core (pytest-xdist; tests/conftest.py gives each one thread)
TEST_WORKERS ?= auto

.PHONY: setup demo test lint docs bench-data faults fuzz

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check --output-format concise src tests benchmarks scripts

test: setup lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# the documentation site, into site/; tests/test_docs.py builds it too, so `make test` covers it
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# the demo runs on what ships with the project: nothing is fetched from the Hub (docs/hub.md)
demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m prefalign demo -o runs/demo

bench-data: setup
	$(PY) benchmarks/data_scale.py

# every case of the fault-injection suite (tests/faults/); writes the README's reliability table
faults: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/faults.py

# coverage-guided fuzzing of the JSONL/JSON/CSV readers (atheris, one worker) for FUZZ_SECONDS; a crash's
# input lands in runs/fuzz/ (docs/reliability.md, "Fuzzed inputs")
FUZZ_SECONDS ?= 60
fuzz: setup
	mkdir -p runs/fuzz
	$(PY) scripts/fuzz_readers.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=runs/fuzz/ runs/fuzz/corpus
