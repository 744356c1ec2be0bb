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

# Until `brics demo` lands (the full pipeline): shard the demo photos, check them, inspect the models.
demo: install
	$(VENV)/bin/brics shard demo --out shards/demo --workers 2
	$(VENV)/bin/brics shard verify shards/demo
	$(VENV)/bin/brics info recipes/demo.yaml --memory
	$(VENV)/bin/brics info recipes/church.yaml

bench: install
	$(PY) benchmarks/retrieval.py --out benchmarks/out/retrieval.json
	$(PY) benchmarks/shard.py --out benchmarks/out/shard.json
	$(PY) benchmarks/nn_search.py --out benchmarks/out/nn_search.json
	$(PIP) install --quiet -e '.[bench]'
	$(PY) benchmarks/decoders.py --out benchmarks/out/decoders.json
	$(PY) benchmarks/diffusion.py --out benchmarks/out/diffusion.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
