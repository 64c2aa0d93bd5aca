# Every target works on a fresh clone with only python3, pip and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install demo test fuzz compat bench bench-quick lint docs soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip  # dependency groups need pip >= 25.1
	$(BIN)/python -m pip install --quiet -e . --group dev
	touch $(STAMP)

install: $(STAMP)  ## create .venv: zkv (editable) with its test, lint and docs tools

demo: $(STAMP)  ## a worker pool sharing one store
	$(BIN)/python examples/pool_demo.py

# Every run of `make test` keeps its results, whatever the outcome, in .test-results/<time>-<pid>/
# (junit.xml, pytest.log with -rA and the slowest tests, exit-status); .test-results/latest
# points to the newest run and the 20 newest runs are kept. A failing run still fails `make test`.
# Extra pytest arguments: make test PYTEST_ARGS="-k lock -x".
RESULTS     := .test-results
PYTEST_ARGS ?=

test: $(STAMP)  ## the whole test suite (every test has a timeout); results kept in .test-results/
	@run=$(RESULTS)/$$(date +%Y%m%d-%H%M%S)-$$$$; mkdir -p $$run; \
	{ echo "# make test: $$(date '+%F %T') commit $$(git rev-parse --short HEAD 2>/dev/null)" \
	       "cores $$(nproc 2>/dev/null) load $$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"; \
	  $(BIN)/python -m pytest -rA --durations=25 --junitxml=$$run/junit.xml $(PYTEST_ARGS) 2>&1; \
	  echo $$? > $$run/exit-status; } | tee $$run/pytest.log; \
	ln -sfn $$(basename $$run) $(RESULTS)/latest; \
	ls -1d $(RESULTS)/2*/ | head -n -20 | xargs -r rm -rf; \
	status=$$(cat $$run/exit-status 2>/dev/null || echo 1); \
	echo "make test: exit status $$status; results in $$run/ (pytest.log, junit.xml)"; \
	exit $$status

# The oldest pyzmq and cloudpickle that pyproject.toml allows (the newest are in .venv).
OLDEST := .venv-oldest
compat:  ## the suite with the oldest pyzmq and cloudpickle that pyproject.toml allows
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet "pyzmq==25.0.0" "cloudpickle==2.2.0" \
		pytest pytest-timeout hypothesis
	$(OLDEST)/bin/python -m pip install --quiet --no-deps -e .
	$(OLDEST)/bin/python -c "import zmq, cloudpickle; print('pyzmq', zmq.__version__, 'cloudpickle', cloudpickle.__version__)"
	$(OLDEST)/bin/python -m pytest -p no:cacheprovider -q

FUZZ_SECONDS ?= 180
fuzz: $(STAMP)  ## hostile peers with random examples for FUZZ_SECONDS (default 180); prints what it tried
	ZKV_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -p no:cacheprovider -s -q \
		tests/test_hostile_peers.py -k data_is_untouched
	ZKV_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -p no:cacheprovider -q \
		--hypothesis-show-statistics --timeout=0 tests/test_garbage.py

# The chart goes to bench-results.png (ignored by git); `make bench CHART=docs/benchmarks.png`
# updates the one in the docs.
CHART ?= bench-results.png

bench: $(STAMP)  ## zkv side by side with Manager, Pipe, bare pyzmq and Redis
	$(BIN)/python -m pip install --quiet -e '.[bench]' --group dev
	$(BIN)/python -m zkv bench --json bench-results.json --plot $(CHART)

bench-quick: $(STAMP)
	$(BIN)/python -m zkv bench --quick

lint: $(STAMP)
	$(BIN)/ruff check zkv tests examples
	$(BIN)/mypy

# Not --quiet: it hides the warnings that --strict turns into errors (broken links, anchors).
docs: $(STAMP)  ## docs/api.md from the docstrings, then the site (MkDocs, strict) in site/
	$(BIN)/python docs/gen_api.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

soak: $(STAMP)  ## 10 minutes of mixed load; memory, fds and threads must stay flat
	$(BIN)/python examples/soak.py --minutes 10

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist site *.egg-info
