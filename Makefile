# Every target works on a fresh clone with only python3, pip and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install demo test bench bench-quick lint docs soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install zkv with its test tools

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

bench: $(STAMP)  ## zkv side by side with Manager, Pipe, bare pyzmq and Redis
	$(BIN)/python -m pip install --quiet -e '.[dev,plot]'
	$(BIN)/python -m zkv bench --json bench-results.json --plot docs/benchmarks.png

bench-quick: $(STAMP)
	$(BIN)/python -m zkv bench --quick

lint: $(STAMP)
	$(BIN)/ruff check zkv tests examples
	$(BIN)/mypy

docs: $(STAMP)  ## regenerate docs/api.md from the docstrings
	$(BIN)/python docs/gen_api.py

soak: $(STAMP)  ## 10 minutes of mixed load; memory, fds and threads must stay flat
	$(BIN)/python examples/soak.py --minutes 10

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
