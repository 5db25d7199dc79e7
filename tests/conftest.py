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
    """Anything a test forgets to direct (runs/, wandb/, kfp's local_outputs) lands in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
