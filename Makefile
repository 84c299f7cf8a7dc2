# The two commands: `make run` (serve the demo model) and `make test` (the suite).
# Each creates .venv when it is missing and installs the project into it.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pdserve up --model demo --prefill 1 --decode 1 --port 8000

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -ra -n 2 --dist loadfile --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check pdserve tests bench

clean:
	rm -rf $(VENV) build *.egg-info
