"""DVC-versioned data for real: git repositories with `dvc init` in tmp_path, `dvc add`, `dvc push`
to a local-directory remote and to an S3 remote on moto (conftest.py), and data_prep reading them
through DVC's Python API; the bad inputs' one-line errors; the project's own data.dvc from a fresh
clone (components/example_data.py)."""

import hashlib
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from components import data_prep, data_sources, example_data
from components.errors import ERROR_MARKER, DataError
from conftest import config
from pipelines import submit

GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


@pytest.fixture(autouse=True)
def _dvc_dirs(tmp_path, monkeypatch):
    """DVC's site cache and its global and system config in tmp_path: nothing outside it is read
    or written (a developer's ~/.config/dvc could name a default remote)."""
    for var, name in (("DVC_SITE_CACHE_DIR", "site"), ("DVC_GLOBAL_CONFIG_DIR", "global"),
                      ("DVC_SYSTEM_CONFIG_DIR", "system")):
        monkeypatch.setenv(var, str(tmp_path / "dvc-dirs" / name))


def git(repo, *args) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


# DVC through its Python API, as the commands do it (the command line's own logging setup holds on
# to the first test's captured stdout).

def dvc_repo(path):
    from dvc.repo import Repo

    return Repo(str(path))


def add_remote(repo, name, url) -> None:
    """`dvc remote add -d name url`"""
    with dvc_repo(repo) as r, r.config.edit() as conf:
        conf["remote"][name] = {"url": url}
        conf["core"]["remote"] = name


def set_local_endpoint(repo, name, endpoint) -> None:
    """`dvc remote modify --local name endpointurl ...`: into the git-ignored .dvc/config.local"""
    with dvc_repo(repo) as r, r.config.edit("local") as conf:
        conf["remote"][name] = {"endpointurl": endpoint}


def push(repo, **kwargs) -> None:
    with dvc_repo(repo) as r:
        r.push(**kwargs)


def new_repo(path):
    from dvc.repo import Repo

    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    Repo.init(str(path)).close()  # `dvc init`
    git(path, "add", ".dvc", ".dvcignore")
    git(path, "commit", "-qm", "dvc init")
    return path


def table(rows: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)).round(4)
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["label"] = (x[:, 0] + x[:, 1] > 0).astype(int)
    return frame.to_csv(index=False)


def commit_version(repo, rows: int, seed: int, tag: str) -> str:
    """data.csv with `rows` rows, `dvc add`-ed and committed under `tag`; its md5 from data.csv.dvc."""
    (repo / "data.csv").write_text(table(rows, seed))
    with dvc_repo(repo) as r:
        r.add(str(repo / "data.csv"))  # `dvc add data.csv`
    git(repo, "add", "data.csv.dvc", ".gitignore")
    git(repo, "commit", "-qm", tag)
    git(repo, "tag", tag)
    return yaml.safe_load((repo / "data.csv.dvc").read_text())["outs"][0]["md5"]


def dvc_config(repo, **data) -> dict:
    return config(data={"name": "dvc", "repo": str(repo), "path": "data.csv", "target": "label", **data}).to_dict()


@pytest.fixture
def versioned(tmp_path):
    """A DVC repo with two versions of data.csv (tags v1: 60 rows, v2: 90 rows) and a local-directory
    remote `store` (the default, committed in .dvc/config) holding both."""
    repo = new_repo(tmp_path / "origin")
    add_remote(repo, "store", str(tmp_path / "remote"))
    git(repo, "commit", "-qam", "remote")
    md5s = {"v1": commit_version(repo, 60, 1, "v1"), "v2": commit_version(repo, 90, 2, "v2")}
    push(repo, all_tags=True)
    return repo, md5s


def test_data_prep_reads_each_revision_and_records_its_dvc_md5(versioned, tmp_path):
    repo, md5s = versioned
    assert md5s["v1"] != md5s["v2"]
    for rev, rows in (("v1", 60), ("v2", 90)):
        manifest = data_prep.run(dvc_config(repo, rev=rev), str(tmp_path / rev))
        assert manifest["data_version"] == md5s[rev]  # the md5 in data.csv.dvc at that revision
        assert sum(manifest["counts"].values()) == rows
        source = manifest["source"]
        assert source["commit"] == git(repo, "rev-parse", f"{rev}^{{commit}}") and source["rev"] == rev
        assert (source["kind"], source["path"], source["dvc_file"], source["remote"]) == \
            ("dvc", "data.csv", "data.csv.dvc", "store")
    # rev null: HEAD; a branch resolves to the commit it points at now
    head = data_sources.resolve(dvc_config(repo))
    assert (head["version"], head["commit"]) == (md5s["v2"], git(repo, "rev-parse", "HEAD"))
    assert data_sources.resolve(dvc_config(repo, rev="main"))["commit"] == head["commit"]


def test_a_clone_with_an_empty_cache_pulls_from_the_local_remote(versioned, tmp_path):
    repo, md5s = versioned
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "data.csv").exists()
    manifest = data_prep.run(dvc_config(clone, rev="v1"), str(tmp_path / "out"))
    assert manifest["data_version"] == md5s["v1"] and sum(manifest["counts"].values()) == 60
    assert not (clone / "data.csv").exists()  # read through DVC, not checked out


def test_an_s3_remote_on_moto_serves_a_clone(s3_server, s3_bucket, tmp_path):
    """Pushed to s3:// with the endpoint and nothing secret in .dvc/config.local (credentials: the
    AWS_* environment); a clone reads it with the endpoint from its own --local config, or from
    the storage settings (storage.endpoint_url) when it has none."""
    repo = new_repo(tmp_path / "origin")
    add_remote(repo, "s3", f"s3://{s3_bucket}/dvc")
    set_local_endpoint(repo, "s3", s3_server.endpoint_url)
    git(repo, "commit", "-qam", "remote")
    md5 = commit_version(repo, 60, 1, "v1")
    push(repo)
    assert s3_server.endpoint_url not in (repo / ".dvc" / "config").read_text()  # tracked: only the bucket
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"dvc/files/md5/{md5[:2]}/{md5[2:]}"]

    local = tmp_path / "clone-local"
    git(tmp_path, "clone", "-q", str(repo), str(local))
    set_local_endpoint(local, "s3", s3_server.endpoint_url)
    manifest = data_prep.run(dvc_config(local), str(tmp_path / "out"))
    assert manifest["data_version"] == md5 and manifest["source"]["remote"] == "s3"

    plain = tmp_path / "clone-plain"
    git(tmp_path, "clone", "-q", str(repo), str(plain))
    raw = config(data={"name": "dvc", "repo": str(plain), "path": "data.csv", "target": "label"},
                 storage={"endpoint_url": s3_server.endpoint_url, "region": "us-east-1"}).to_dict()
    assert data_prep.run(raw, str(tmp_path / "out-plain"))["data_version"] == md5


def test_data_prep_checks_the_bytes_it_read_against_dvcs_md5(versioned, tmp_path):
    repo, md5s = versioned
    cached = repo / ".dvc" / "cache" / "files" / "md5" / md5s["v2"][:2] / md5s["v2"][2:]
    cached.chmod(0o644)
    cached.write_text(table(90, 3))  # a damaged cache entry
    got = hashlib.md5(cached.read_bytes()).hexdigest()
    with pytest.raises(DataError) as err:
        data_prep.run(dvc_config(repo), str(tmp_path / "out"))
    assert str(err.value) == (f"data.path: data.csv read through DVC has md5 {got}, but DVC records {md5s['v2']} "
                              f"for it at {git(repo, 'rev-parse', '--short=7', 'HEAD')}: the cache or remote holds "
                              "a damaged copy; remove it and pull again")
    assert not (tmp_path / "out").exists()


def test_each_bad_input_is_one_line_naming_it(versioned, tmp_path, capsys):
    repo, md5s = versioned
    head = git(repo, "rev-parse", "--short=7", "HEAD")
    (repo / "notes.txt").write_text("in git, not in DVC\n")
    git(repo, "add", "notes.txt")
    git(repo, "commit", "-qm", "notes")
    notes_head = git(repo, "rev-parse", "--short=7", "HEAD")
    cases = [
        ({"rev": "v9"}, f"data.rev: no revision 'v9' in {repo}; use a branch, tag or commit it has"),
        ({"path": "nope.csv", "rev": "v2"},
         f"data.path: no 'nope.csv' in {repo} at v2 ({head}); DVC tracks: data.csv"),
        ({"path": "notes.txt"},
         f"data.path: 'notes.txt' in {repo} at HEAD ({notes_head}) is not tracked by DVC (git has it); "
         "`dvc add notes.txt` and commit its .dvc file, or read it with data=file"),
        ({"remote": "nosuch"}, f"data.remote: {repo} has no DVC remote 'nosuch' (its remotes: store); use one of "
                               "them or add it with `dvc remote add`"),
        ({"repo": str(tmp_path / "nowhere")}, f"data.repo: no such directory: {tmp_path / 'nowhere'}"),
        ({"version": "0" * 32}, f"data.version: the config says {'0' * 32} but data.csv at {notes_head} of {repo} "
                                f"(DVC) is at {md5s['v2']}; unset data.version to take it"),
    ]
    for data, message in cases:
        with pytest.raises(DataError) as err:
            data_prep.run(dvc_config(data.pop("repo", repo), **data), str(tmp_path / "out"))
        assert str(err.value) == message
    # a clone whose data is in no cache and whose repo names no remote
    bare = new_repo(tmp_path / "bare")
    commit_version(bare, 60, 1, "v1")
    clone = tmp_path / "bare-clone"
    git(tmp_path, "clone", "-q", str(bare), str(clone))
    with pytest.raises(DataError) as err:
        data_prep.run(dvc_config(clone), str(tmp_path / "out"))
    assert str(err.value) == (f"data.path: 'data.csv' at {git(clone, 'rev-parse', '--short=7', 'HEAD')} is not in "
                              f"the DVC cache of {clone} and the repo has no DVC remote configured; add one "
                              "(`dvc remote add -d NAME URL`, then `dvc push`) or set data.remote")
    assert not (tmp_path / "out").exists()
    # as a command: the marked line and exit status 2
    (tmp_path / "c.json").write_text(yaml.safe_dump(dvc_config(repo, rev="v9")))
    with pytest.raises(SystemExit) as exit_:
        data_prep.main(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{ERROR_MARKER} data.rev: no revision 'v9' in {repo}; use a branch, tag or commit it has"]


def test_submit_checks_a_local_repo_before_any_work(versioned, tmp_path, capsys):
    repo, _ = versioned
    out = tmp_path / "runs"
    assert submit.main(["data=dvc", f"data.repo={repo}", "data.path=data.csv", "data.rev=v9", f"output_dir={out}"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: data.rev: no revision 'v9' in {repo}; use a branch, tag or commit it has"]
    # the default data is this project's: a path that is not in it says where to look instead
    head = git(example_data.PROJECT_ROOT, "rev-parse", "--short=7", "HEAD")
    assert submit.main(["data.path=mine.csv", f"output_dir={out}"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: data.path: no 'mine.csv' in {example_data.PROJECT_ROOT} at HEAD ({head}); DVC tracks: data; "
        "for a local file use data=file"]
    assert not out.exists()


@pytest.fixture
def fresh_clone(tmp_path):
    """What a fresh clone of this project holds of its example data: data.dvc and DVC's config,
    no data/, no cache, no remote."""
    root = example_data.PROJECT_ROOT
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    for name in ("data.dvc", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        shutil.copyfile(root / name, project / name)
    git(project, "init", "-q", "-b", "main")
    git(project, "add", ".")
    git(project, "commit", "-qm", "clone")
    return project, yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]


def test_a_fresh_clone_regenerates_the_example_data_and_verifies_it(fresh_clone, tmp_path):
    from dvc.repo import Repo

    project, md5 = fresh_clone
    assert example_data.ensure(project) == (f"example data {project / 'data' / 'digits.csv'}: md5 {md5} (data.dvc), "
                                            "generated")
    with Repo(str(project)) as repo:
        assert repo.status() == {}  # `dvc status`: the workspace and the cache match data.dvc
    # the default data (conf/data/example.yaml) reads it through DVC at HEAD, from the cache
    raw = {"data": {"name": "dvc", "repo": str(project), "path": "data/digits.csv"}}
    resolved = data_sources.resolve(raw)
    assert resolved["version"] == md5 and resolved["dvc_file"] == "data.dvc"
    assert data_sources.fetch(raw, resolved, tmp_path).read_bytes() == example_data.digits_csv()
    assert example_data.ensure(project).endswith(", in place")

    with open(project / "data" / "digits.csv", "a") as f:
        f.write("0," * 64 + "0\n")
    with pytest.raises(DataError) as err:
        example_data.ensure(project)
    changed = str(err.value).split(" has md5 ")[1].split(" ")[0]
    assert changed != md5 and len(changed) == len(md5) and changed.endswith(".dir")
    assert str(err.value) == (f"data: {project / 'data'} has md5 {changed} but data.dvc records {md5}; the example "
                              f"data was changed or generated differently: delete {project / 'data'} and run "
                              "`python -m components.example_data` again (or `dvc pull`)")
    with Repo(str(project)) as repo:
        assert repo.status()  # DVC sees the same change


def test_with_a_remote_the_example_data_is_pulled(fresh_clone, tmp_path):
    project, md5 = fresh_clone
    example_data.ensure(project)
    add_remote(project, "store", str(tmp_path / "remote"))
    push(project)
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    assert example_data.ensure(project).endswith(f"md5 {md5} (data.dvc), pulled from DVC remote 'store'")
    assert (project / "data" / "digits.csv").read_bytes() == example_data.digits_csv()
