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


def test_image_holds_every_package_the_steps_import():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for folder in ("components", "pipelines", "conf"):
        assert f"COPY {folder} {folder}" in dockerfile
    assert "-c constraints.txt" in dockerfile


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make run") < readme.index("make test") < readme.index("##")
