# One image for every pipeline step (data_prep, train, evaluate, ...). Kubeflow runs each
# step's function from pipelines/steps.py in this image; `platform.image` names it.
#
#   docker build -t convergence-pipeline:latest .
#
# On Linux x86_64, PyPI's torch==2.13.0 is the CUDA build, which is what GPU nodes need.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    WANDB_DIR=/tmp DVC_NO_ANALYTICS=1
WORKDIR /app

# Dependencies first (a layer that changes only with pyproject.toml or constraints.txt):
# torch pinned and first, then everything else at the exact versions CI tests.
COPY pyproject.toml constraints.txt ./
RUN pip install torch==2.13.0 \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt

COPY components components
COPY pipelines pipelines
COPY conf conf
RUN pip install --no-deps -e .
