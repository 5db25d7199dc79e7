import os

import pytest

# Before anything imports wandb or dvc: no tracking and no analytics unless a test asks.
os.environ["WANDB_MODE"] = "disabled"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
# One torch thread here and in the pipeline's task processes: the tests' models are tiny, and on
# a 2-core machine shared with anything else, 2 threads wait on each other at every op (measured:
# a step went from ~0.7 ms to over 100 ms while another process kept one core busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# dvc binds its log handlers to sys.stdout and sys.stderr when first imported: import it here, under
# pytest's session-wide capture, not inside a test whose captured streams are closed after it.
import dvc  # noqa: E402,F401

from components import datasets  # noqa: E402
from components.config import Config, parse_config  # noqa: E402


def config(**sections) -> Config:
    """A validated Config from the schema defaults with nested overrides:
    config(train={"batch_size": 64}, eval={"patience": 2})."""
    raw = Config().to_dict()
    raw["train"].update(batch_size=32, micro_batch_size=32)  # numbers, not the probe's "auto"
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    raw["tracking"]["mode"] = raw["tracking"].get("mode", "disabled")
    return parse_config(raw)


@pytest.fixture(scope="session")
def digits():
    return datasets.build(Config().data)


@pytest.fixture(autouse=True)
def _tmp_cwd(tmp_path, monkeypatch):
    """Anything a test forgets to direct (runs/, wandb/, kfp's local_outputs, the local state of
    runs in S3) lands in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # a run in s3:// keeps its lock and kfp's files there


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto_server on 127.0.0.1: a real S3 HTTP endpoint. `stop()` and `start()` kill and restart
    it on the same port (what a test of an endpoint dying mid-publish needs); moto keeps its
    buckets in memory, so a restart starts empty."""

    def __init__(self, log_path):
        self.port, self.log_path, self.proc = free_port(), log_path, None
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        import shutil
        import subprocess
        import sys
        import time
        import urllib.request

        # the venv's own (the pinned moto), before any other on PATH
        beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
        exe = beside if os.path.exists(beside) else shutil.which("moto_server")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start; see {self.log_path}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto_server for the session, with fake credentials in the environment (boto3's
    standard chain); tests make their own buckets (`s3_bucket`)."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto_server.log").start()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test, named after it."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{free_port()}"
    s3_server.client().create_bucket(Bucket=name)
    return name
