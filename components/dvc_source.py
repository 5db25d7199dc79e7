"""Data tracked by DVC in a git repository: data=dvc, and the default example data
(conf/data/example.yaml).

`resolve` downloads nothing: it finds the commit that data.rev names and the md5 that the .dvc file
at that commit records for the output holding data.path (the data version). `fetch` copies the file
at that commit into a scratch directory through DVC (its cache first, then its remote) and checks
the bytes against DVC's own md5 of the file. Both use DVC's Python API (DVCFileSystem) with the
repo's own remotes; an S3 remote without an `endpointurl` gets storage.endpoint_url and
storage.region, so one setting reaches MinIO for outputs and data alike. Credentials stay in the
AWS chain or in the repo's git-ignored `.dvc/config.local`. Whatever DVC reports about the user's
input becomes one DataError line naming the key and what to do.
"""

import contextlib
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from components.errors import DataError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What DVC names a local repo's own cache when the repo has no default remote (dvc/repo/open_repo.py)
_OWN_CACHE = "auto-generated-upstream"
_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@host:org/repo.git


def is_url(repo: str) -> bool:
    return "://" in repo or bool(_SCP_LIKE.match(repo))


def absolute_repo(repo: Optional[str]) -> str:
    """data.repo as every step needs it: null is this project's checkout, a local path becomes
    absolute (relative to where submit runs), a git URL stays as given."""
    if repo is None:
        return str(PROJECT_ROOT)
    if is_url(repo):
        return repo
    path = Path(repo).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data.repo: no such directory: {path}")
    return str(path)


@dataclass
class _Remote:
    name: Optional[str] = None  # None: the repo has no remote, only its cache
    url: Optional[str] = None
    extra: Optional[dict] = None  # what storage.* adds to the remote's DVC config


def _remote(repo: str, rev: str, wanted: Optional[str], settings: dict) -> _Remote:
    """The DVC remote data.remote (or the repo's default) names, as the repo configures it."""
    from dvc.repo import Repo

    with Repo.open(repo, rev=rev, subrepos=False, uninitialized=True) as r:
        core, remotes = r.config["core"], dict(r.config["remote"])
    remotes.pop(_OWN_CACHE, None)
    if wanted is not None and wanted not in remotes:
        raise DataError(f"data.remote: {repo} has no DVC remote {wanted!r} (its remotes: "
                        f"{', '.join(sorted(remotes)) or 'none'}); use one of them or add it with `dvc remote add`")
    name = wanted or core.get("remote")
    if name not in remotes:
        return _Remote()
    conf = remotes[name]
    extra = {}
    if str(conf.get("url", "")).startswith("s3://"):
        for key, value in (("endpointurl", settings.get("endpoint_url")), ("region", settings.get("region"))):
            if value and key not in conf:
                extra[key] = value
    return _Remote(name, conf.get("url"), extra or None)


def _filesystem(repo: str, rev: str, remote: _Remote):
    from dvc.fs import DVCFileSystem

    return DVCFileSystem(repo=repo, rev=rev, subrepos=False, remote=remote.name, remote_config=remote.extra)


def _output_of(dvc_repo, path: str):
    """The DVC output (a file, or a directory holding the file) that tracks `path`."""
    parts = tuple(path.split("/"))
    return next((out for out in dvc_repo.index.outs if parts[:len(out.index_key[1])] == out.index_key[1]), None)


def _tracked(dvc_repo) -> str:
    names = sorted("/".join(out.index_key[1]) for out in dvc_repo.index.outs)
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"


def _describe_cause(exc: BaseException) -> Optional[str]:
    """Why a remote failed (connection, credentials): the first error in the chain that is not
    DVC's own "not found" (its storage backends raise their own types: botocore, aiohttp, ...)."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        ours = type(seen).__module__.split(".")[0] in ("dvc", "dvc_data", "dvc_objects")
        if not ours and not isinstance(seen, (FileNotFoundError, KeyError)) and str(seen):
            return " ".join(str(seen).split())
        seen = seen.__cause__ or seen.__context__
    return None


class _Lookup:
    """One repo at one revision through DVC, with its errors as DataError lines."""

    def __init__(self, repo: str, rev: str, path: str, remote: _Remote):
        self.repo, self.rev, self.path, self.remote = repo, rev, path, remote
        self.fs = _filesystem(repo, rev, remote)
        self.commit = self.fs.repo.get_rev()
        self.where = f"{repo} at {rev}" + ("" if rev == self.commit else f" ({self.commit[:7]})")
        if self.fs.repo.dvc_dir is None:
            raise DataError(f"data.rev: {self.where} is not a DVC repository (no .dvc/ there); `dvc init` and "
                            "commit it, or choose a later revision")

    def info(self) -> dict:
        from dvc_data.index import DataIndexDirError

        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise DataError(f"data.path: no {self.path!r} in {self.where}; DVC tracks: {_tracked(self.fs.repo)}"
                            + ("; for a local file use data=file" if self.repo == str(PROJECT_ROOT) else "")) from None
        except DataIndexDirError as exc:  # the listing of the directory holding it: in no cache, on no remote
            raise self.unavailable(exc) from None
        if info["type"] == "directory":
            raise DataError(f"data.path: {self.path!r} in {self.where} is a directory; name a file in it")
        out = _output_of(self.fs.repo, self.path) if info.get("dvc_info") else None
        if out is None:
            raise DataError(f"data.path: {self.path!r} in {self.where} is not tracked by DVC (git has it); "
                            f"`dvc add {self.path}` and commit its .dvc file, or read it with data=file")
        entry = info["dvc_info"]["entry"]
        dvc_file = "/".join(self.fs.repo.fs.relparts(out.stage.path, self.fs.repo.root_dir))
        return {"version": out.hash_info.value, "dvc_file": dvc_file, "file_md5": entry.hash_info.value,
                "hash": entry.hash_info.name}

    def copy_to(self, local: Path) -> None:
        from dvc.exceptions import DvcException

        try:
            with self.fs.open(self.path, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except DvcException:
            raise
        except Exception as exc:  # noqa: BLE001 - each storage backend (botocore, aiohttp, ...) raises its own
            raise self.unavailable(exc) from None

    def unavailable(self, exc: Exception) -> DataError:
        """The data is neither in the DVC cache nor on a remote we can reach."""
        cause = _describe_cause(exc)
        if self.remote.name is None:
            hint = (" (this project's example data: run `python -m components.example_data`, which `make run` does)"
                    if self.repo == str(PROJECT_ROOT) else "")
            return DataError(f"data.path: {self.path!r} at {self.commit[:7]} is not in the DVC cache of {self.repo} "
                             f"and the repo has no DVC remote configured; add one (`dvc remote add -d NAME URL`, "
                             f"then `dvc push`) or set data.remote{hint}")
        if cause:
            return DataError(f"data.remote: cannot read {self.path!r} from DVC remote {self.remote.name!r} "
                             f"({self.remote.url}): {cause}; check its endpointurl (or storage.endpoint_url) "
                             "and credentials")
        return DataError(f"data.path: {self.path!r} at {self.commit[:7]} is neither in the DVC cache of {self.repo} "
                         f"nor on DVC remote {self.remote.name!r} ({self.remote.url}); `dvc push -r "
                         f"{self.remote.name}` it where it was added")


@contextlib.contextmanager
def _dvc_errors(repo: str, rev: str):
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.scm import CloneError, RevError, SCMError

    try:
        yield
    except RevError:
        raise DataError(f"data.rev: no revision {rev!r} in {repo}; use a branch, tag or commit it has") from None
    except CloneError as exc:
        cause = " ".join(str(exc.__cause__ or exc).split())
        raise DataError(f"data.repo: cannot clone {repo} ({cause}); check the URL and your git access") from None
    except NotDvcRepoError:
        raise DataError(f"data.repo: {repo} at {rev} is not a DVC repository; `dvc init` there and commit it") from None
    except SCMError as exc:
        raise DataError(f"data.repo: {repo}: {' '.join(str(exc).split())}; data=dvc reads a git repository "
                        "(`git init`, `dvc init`)") from None
    except DvcException as exc:  # e.g. a .dvc or dvc.yaml file DVC cannot parse
        raise DataError(f"data.repo: DVC cannot read {repo} at {rev}: {' '.join(str(exc).split())}") from None
    finally:
        if is_url(repo):  # DVC clones a URL into a temporary directory; remove it
            from dvc.repo.open_repo import clean_repos

            clean_repos()


def resolve(data: dict, settings: dict) -> dict:
    """data.rev -> its commit, and the md5 of the output holding data.path in the .dvc file there.
    Cheap: reads git objects and .dvc files (and a directory's small .dir listing)."""
    repo, path = absolute_repo(data.get("repo")), posixpath.normpath(data["path"])
    rev = data.get("rev") or "HEAD"
    with _dvc_errors(repo, rev):
        remote = _remote(repo, rev, data.get("remote"), settings)
        lookup = _Lookup(repo, rev, path, remote)
        found = lookup.info()
    return {"kind": "dvc", "repo": repo, "rev": data.get("rev"), "commit": lookup.commit, "path": path,
            "remote": remote.name, **found}


def fetch(resolved: dict, settings: dict, scratch: Path) -> Path:
    """The file at the resolved commit, copied into `scratch` through DVC and checked against the
    md5 DVC records for it."""
    from dvc_data.hashfile.hash import file_md5

    repo, path, commit = resolved["repo"], resolved["path"], resolved["commit"]
    local = Path(scratch) / posixpath.basename(path)
    with _dvc_errors(repo, commit):
        lookup = _Lookup(repo, commit, path, _remote(repo, commit, resolved["remote"], settings))
        found = lookup.info()
        if found["version"] != resolved["version"]:
            raise DataError(f"data.version: {found['dvc_file']} at {commit[:7]} records {found['version']}, "
                            f"not the resolved {resolved['version']}")
        lookup.copy_to(local)
    got = file_md5(str(local), name=found["hash"])
    if got != found["file_md5"]:
        raise DataError(f"data.path: {path} read through DVC has md5 {got}, but DVC records {found['file_md5']} "
                        f"for it at {commit[:7]}: the cache or remote holds a damaged copy; remove it and pull again")
    return local
