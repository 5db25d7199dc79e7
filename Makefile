# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench setup data clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. The rest comes
# exactly from constraints.txt, so pip never backtracks.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The example data (data/, tracked by data.dvc): pulled from the DVC remote when one is configured,
# else generated; verified against data.dvc's md5 either way. The default run reads it through DVC.
data: $(STAMP)
	$(PY) -m components.example_data

# Extra Hydra overrides: make run ARGS="train.batch_size=64 eval.target=0.95"
run: data
	$(PY) -m pipelines.submit $(ARGS)

test: data
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/train_loop_overhead.py
	@if command -v valgrind >/dev/null; then $(PY) bench/train_loop_instructions.py; \
	else echo "bench/train_loop_instructions.py skipped: it needs valgrind"; fi
	$(PY) bench/default_run.py
	$(PY) bench/probe_stability.py
	$(PY) bench/study_vs_sweep.py
	$(PY) bench/study_timing.py
	# bench/probe_vs_lightning.py needs lightning in a separate venv (see its docstring)

clean:
	rm -rf $(VENV) runs
