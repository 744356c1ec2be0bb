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

# The whole pipeline on the demo photos (about 10 minutes on 2 CPU cores): shards, autoencoder,
# reconstructions, diffusion, samples, metrics, nearest neighbours and runs/demo-pipeline/report.html.
demo: install
	$(VENV)/bin/brics demo --out runs/demo-pipeline

bench: install
	$(PY) benchmarks/retrieval.py --out benchmarks/out/retrieval.json
	$(PY) benchmarks/shard.py --out benchmarks/out/shard.json
	$(PY) benchmarks/nn_search.py --out benchmarks/out/nn_search.json
	$(PY) benchmarks/ae.py --repeats 1 --out benchmarks/out/ae.json
	$(PIP) install --quiet -e '.[bench]'
	$(PY) benchmarks/decoders.py --out benchmarks/out/decoders.json
	$(PY) benchmarks/diffusion.py --out benchmarks/out/diffusion.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
