# brics -- setup and checks. `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml $(PLUGINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -e '.[dev]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# Until `brics demo` lands (the full pipeline), the demo inspects the CPU demo recipe and the paper's.
demo: install
	$(VENV)/bin/brics info recipes/demo.yaml --memory
	$(VENV)/bin/brics info recipes/church.yaml

bench: install
	$(PY) benchmarks/retrieval.py --out benchmarks/out/retrieval.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
