"""The storage layer: strict JSON, atomic writes with ordinary permissions."""

import json
import math
import os
import stat

import pytest

from components import storage


def test_non_finite_values_become_null_with_the_reason_beside_them(tmp_path):
    storage.write_json(tmp_path / "s.json", {"r2": math.nan, "loss": math.inf, "ok": 0.5, "rows": [1.0, -math.inf],
                                             "nested": {"mse": math.nan}})
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"r2": None, "r2_note": "non-finite (nan)", "loss": None, "loss_note": "non-finite (inf)",
                                "ok": 0.5, "rows": [1.0, None], "nested": {"mse": None, "mse_note": "non-finite (nan)"}}


def test_a_written_file_has_the_permissions_a_plain_open_gives(tmp_path):
    storage.write_json(tmp_path / "a.json", {})
    with open(tmp_path / "b.json", "w") as f:
        f.write("{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode)
    assert mode & stat.S_IRGRP  # readable by the group under the usual umask (mkstemp alone gives 0600)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    storage.write_json(tmp_path / "s.json", {"v": 1})
    with pytest.raises(TypeError):
        storage.write_json(tmp_path / "s.json", {"v": object()})
    assert storage.read_json(tmp_path / "s.json") == {"v": 1} and os.listdir(tmp_path) == ["s.json"]


def test_a_torch_file_is_written_whole_or_not_at_all_with_ordinary_permissions_and_the_same_bytes(tmp_path):
    import torch

    path = tmp_path / "c.pt"
    storage.save_torch({"w": torch.ones(3)}, path)
    first = path.read_bytes()
    storage.save_torch({"w": torch.ones(3)}, path)  # a finished run trained again writes its model.pt again
    assert path.read_bytes() == first  # the registry knows a promoted model.pt by its sha256
    with pytest.raises(Exception):
        storage.save_torch({"w": torch.zeros(3), "f": lambda: 0}, path)  # a lambda cannot be pickled
    assert torch.equal(storage.load_torch(path)["w"], torch.ones(3)) and os.listdir(tmp_path) == ["c.pt"]
    with open(tmp_path / "plain", "w"):
        pass
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_metrics_rows_keep_their_order_and_the_values_they_had_when_written(tmp_path):
    log = storage.JsonlWriter(tmp_path / "m.jsonl")
    row = {"step": 1, "val/loss": math.nan}
    log.write(row)
    row["step"] = 99  # changed after writing: the line written is the row as it was
    log.write_later('{"step": %d, "train/loss": %.17g}\n', (2, 0.5))
    offset = log.offset()
    log.write({"step": 3})
    log.truncate(offset)  # a resumed run drops the rows after its checkpoint
    log.write({"step": 4})
    log.close()
    assert storage.read_jsonl(tmp_path / "m.jsonl") == [
        {"step": 1, "val/loss": None, "val/loss_note": "non-finite (nan)"}, {"step": 2, "train/loss": 0.5}, {"step": 4}]
