# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench setup data clean image

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
	$(PY) bench/ddp_scaling.py
	# bench/probe_vs_lightning.py needs lightning in a separate venv (see its docstring);
	# bench/gpu_probe.sh and bench/gpu_train.sh need a GPU machine

# The one image for every pipeline step (Dockerfile), tagged $(IMAGE), with the commit baked in for
# lineage: GIT_DIRTY is true when a file the image copies (IMAGE_SOURCES, the Dockerfile's COPY
# sources) differs from HEAD or is untracked. Needs Docker; nothing else here does.
IMAGE ?= convergence-pipeline:latest
DOCKER_PLATFORM ?= linux/amd64
IMAGE_SOURCES := pyproject.toml constraints.txt components pipelines conf

image:
	$(if $(shell command -v docker),,$(error make image needs Docker: no `docker` on PATH (install Docker, or build the Dockerfile with another builder)))
	@commit=$$(git rev-parse --verify HEAD 2>/dev/null) || { echo "make image: not a git checkout with a commit; the image records its commit for lineage" >&2; exit 1; }; \
	if [ -n "$$(git status --porcelain --untracked-files=all -- $(IMAGE_SOURCES))" ]; then dirty=true; else dirty=false; fi; \
	set -x; docker build --platform $(DOCKER_PLATFORM) --build-arg GIT_COMMIT=$$commit --build-arg GIT_DIRTY=$$dirty -t $(IMAGE) .

clean:
	rm -rf $(VENV) runs
