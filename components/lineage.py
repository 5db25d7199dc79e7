"""What every run records about where it came from: in summary.json (`lineage`), in model.pt
(`lineage`) and in the train step's W&B run config.

  data         the source as resolved before data_prep (components/data_sources.py: a DVC repo,
               rev, resolved commit and path; a file; an S3 URI with its VersionId/ETag) and the
               data version
  code         this project's git commit, and `dirty`: tracked files differ from it. Inside the
               image there is no .git: the commit comes from CONVERGENCE_GIT_COMMIT (and
               CONVERGENCE_GIT_DIRTY, "true"/"false"), baked in when the image is built
  image        inside the image: platform.image and its digest when the submitter passes it in
               CONVERGENCE_IMAGE_DIGEST (an image cannot know its own digest); null locally, where
               the steps run in this Python environment (see versions)
  config_hash  components.config.config_hash: no paths, no run id, the data by its version
  versions     python, torch, kfp, dvc

The Dockerfile bakes the commit in with
    ARG GIT_COMMIT GIT_DIRTY
    ENV CONVERGENCE_GIT_COMMIT=$GIT_COMMIT CONVERGENCE_GIT_DIRTY=$GIT_DIRTY
    docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
        --build-arg GIT_DIRTY=$(git status --porcelain -uno | grep -q . && echo true || echo false) .
"""

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

from components.config import Config, PlatformConfig, config_hash

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COMMIT_ENV = "CONVERGENCE_GIT_COMMIT"
DIRTY_ENV = "CONVERGENCE_GIT_DIRTY"
IMAGE_DIGEST_ENV = "CONVERGENCE_IMAGE_DIGEST"
PACKAGES = ("torch", "kfp", "dvc")


def collect(cfg: Config, manifest: dict) -> dict:
    """The lineage of a run on the dataset with this manifest. `cfg` is the step's config after
    for_dataset, so data.version is set and config_hash is the run's."""
    return {"data": {"source": manifest.get("source"), "version": manifest["data_version"]},
            "code": code_version(), "image": image(cfg.platform), "config_hash": config_hash(cfg),
            "versions": library_versions()}


def _git(root: Path, *args: str) -> Optional[str]:
    try:  # --no-optional-locks: `git status` must not take the index lock from someone committing
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git here (the image)
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(root: Path = PROJECT_ROOT) -> dict:
    """{commit, dirty, from}: from this checkout's git when the package sits in one, else from
    the environment the image was built with; nulls when neither says."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == Path(root).resolve():  # not some repository around an installed copy
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        return {"commit": _git(root, "rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
                "from": "git"}
    commit = os.environ.get(COMMIT_ENV) or None
    dirty = {"true": True, "false": False}.get(os.environ.get(DIRTY_ENV, "").strip().lower())
    return {"commit": commit, "dirty": dirty, "from": COMMIT_ENV if commit else None}


def image(platform_cfg: PlatformConfig) -> Optional[dict]:
    """The image this step runs in; only the image itself has CONVERGENCE_GIT_COMMIT set."""
    if not os.environ.get(COMMIT_ENV):
        return None
    return {"name": platform_cfg.image, "digest": os.environ.get(IMAGE_DIGEST_ENV) or None}


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
