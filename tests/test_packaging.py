"""The set-up files agree with each other: what CI installs is what the image installs."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_torch_is_pinned_everywhere():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    assert pins()["torch"] == "2.13.0"
    assert "pip install --quiet torch==2.13.0" in (ROOT / "Makefile").read_text()
    assert "pip install torch==2.13.0" in (ROOT / "Dockerfile").read_text()


def test_every_dependency_is_pinned_in_the_constraints():
    pinned = {name.lower().replace("_", "-") for name in pins()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.split(r"[=<>\[ ]", dep)[0].lower().replace("_", "-") for dep in deps}
    assert names <= pinned, names - pinned


def dockerfile_copies() -> list:
    """(source, destination) of every COPY in the Dockerfile, relative to WORKDIR."""
    copies = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--") for w in words):
            *sources, dest = words[1:]
            copies += [(src, dest) for src in sources]
    return copies


def test_the_image_holds_every_module_and_config_the_steps_need(tmp_path):
    """Lay out WORKDIR as the Dockerfile's COPY lines would, then, from that copy alone, import
    every module, compose the default config and compile both pipelines: a module or config the
    Dockerfile forgets fails here, not in a pod."""
    import shutil
    import subprocess
    import sys

    app = tmp_path / "app"
    app.mkdir()
    for src, dest in dockerfile_copies():
        target = app / (Path(src).name if dest in ("./", ".") else dest)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / src, target)
    modules = sorted(f"{p.parent.name}.{p.stem}" for folder in ("components", "pipelines")
                     for p in (ROOT / folder).glob("*.py") if p.stem != "__init__")
    script = (
        "import importlib, components, pathlib, sys\n"
        f"assert pathlib.Path(components.__file__).is_relative_to({str(app)!r}), components.__file__\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from pipelines.config import compose_config\n"
        "from pipelines.graph import build_pipeline\n"
        "from kfp import compiler\n"
        "for p in ('train', 'study'):\n"
        "    cfg = compose_config([f'pipeline={p}'])\n"
        "    compiler.Compiler().compile(build_pipeline(cfg), f'{p}.yaml')\n"
        "print('ok', len(sys.modules))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(app)}
    done = subprocess.run([sys.executable, "-c", script], cwd=app, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok") and (app / "train.yaml").exists() and (app / "study.yaml").exists()


def test_the_image_installs_the_project_dependencies_at_the_constrained_versions():
    """The requirements the Dockerfile generates are pyproject's, installed with -c constraints.txt."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    run = dockerfile[dockerfile.index("RUN pip install torch"):].split("\n\n")[0]
    assert "pip install -c constraints.txt -r /tmp/requirements.txt" in run
    command = run.split('python -c "', 1)[1].split('"', 1)[0]
    import subprocess
    import sys

    listed = subprocess.run([sys.executable, "-c", command], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert listed == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make run") < readme.index("make test") < readme.index("##")
