# One image for every pipeline step (resolve_data, data_prep, probe, train, evaluate, study_*).
# Kubeflow runs each step's function from pipelines/steps.py in it (install_kfp_package=False:
# kfp is already here); `platform.image` names it. Build it with `make image` (the Makefile), which
# passes the build args below:
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) --build-arg GIT_DIRTY=false \
#       -t convergence-pipeline:latest .
#
# What goes in is what `make` installs into .venv (tests/test_packaging.py compares the two): the
# same pip, torch==2.13.0 first and alone, then the project's runtime dependencies (pyproject.toml's
# `dependencies`; not the dev extra) with `-c constraints.txt`. On Linux x86_64, PyPI's
# torch==2.13.0 is the CUDA build (its CUDA libraries come as pinned nvidia-* wheels), which is what
# GPU nodes need; the node supplies the NVIDIA driver.
#
# Not in the image: .git, data/, runs/ and the DVC cache (.dockerignore keeps everything out but
# what the COPY lines name). So the default data (conf/data/example.yaml: this checkout's DVC repo
# at its HEAD) does not exist inside a pod; on a cluster the data comes from a git URL
# (data=dvc data.repo=https://...), from S3 (data=file data.path=s3://...), or is built in
# (data=digits: scikit-learn ships it).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    WANDB_DIR=/tmp DVC_NO_ANALYTICS=1 MPLBACKEND=Agg
WORKDIR /app

# Layers from the slowest-changing to the fastest, so a code change rebuilds only the last ones:
# pip and torch (several GB with CUDA) change only with their pins, the dependencies with
# pyproject.toml or constraints.txt, the sources with every commit, the commit args last of all.
RUN python -m pip install pip==25.3 \
 && pip install torch==2.13.0

COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Editable, so the code stays in /app next to conf/ (pipelines/config.py composes /app/conf).
# Owned by root: the steps cannot change their own code.
COPY components components
COPY pipelines pipelines
COPY conf conf
RUN pip install --no-deps -e .

# A non-root user with a numeric UID (Kubernetes' runAsNonRoot can only verify a number). KFP's
# launcher writes artifacts under /gcs, /minio and /s3; backends since KFP 2.2 mount emptyDirs
# there (kubeflow/pipelines#10857), older ones need them to exist and be writable.
RUN groupadd --gid 10001 app \
 && useradd --no-log-init --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
 && mkdir /gcs /minio /s3 \
 && chown app:app /gcs /minio /s3

# The commit the image was built from, for lineage (components/lineage.py reads these: inside the
# image there is no .git). GIT_DIRTY is "true" when the files copied above differ from that
# commit. Left empty (a plain `docker build .`), lineage records the commit as null.
# CONVERGENCE_IMAGE_DIGEST is not set here: an image cannot know its own digest (the digest is a
# hash of the image, this layer included). It is set at deploy time, on each task, from
# platform.image when that names the image by digest (name@sha256:...).
ARG GIT_COMMIT=""
ARG GIT_DIRTY=""
ENV CONVERGENCE_GIT_COMMIT=${GIT_COMMIT} CONVERGENCE_GIT_DIRTY=${GIT_DIRTY}

USER 10001:10001
