"""W&B in tests. What an offline W&B run wrote, read back from its run-*.wandb file: a LevelDB-style
log (32 KiB blocks of 7-byte-headed chunks) of protobuf Records (wandb 0.31 has no public reader;
the protobuf types are wandb's own, wandb.proto). And `Recorder`, where reports are saved when
no W&B server can answer (components/wandb_review.py: WandbReports is the real one)."""

import json
import struct
from pathlib import Path
from typing import Iterator, List, Set, Tuple

BLOCK, HEADER = 32768, 7


def offline_file(run_dir: Path, run_id: str, job_type: str) -> Path:
    """The .wandb file of the W&B run <run_id>-<job_type> under run_dir/wandb (components/tracking.py)."""
    (path,) = Path(run_dir).glob(f"wandb/offline-run-*-{run_id}-{job_type}/run-*.wandb")
    return path


def records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks = Path(path).read_bytes(), HEADER, b""  # the file starts with a 7-byte header
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):  # a whole record, or its last chunk
            record = pb.Record()
            record.ParseFromString(chunks)
            yield record


def run_settings(path: Path) -> dict:
    """The run record: what wandb.init got (id, project, group, job type, name)."""
    (run,) = [r.run for r in records(path) if r.WhichOneof("record_type") == "run"]
    return {"id": run.run_id, "project": run.project, "group": run.run_group, "job_type": run.job_type,
            "name": run.display_name}


def summary(path: Path) -> dict:
    """The run's summary: every summary.update, later values over earlier ones (W&B's own keys left out)."""
    values = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                if item.key and not item.key.startswith("_"):
                    values[item.key] = json.loads(item.value_json)
    return values


def artifacts(path: Path) -> List[Tuple[str, Set[str]]]:
    """(name, aliases) of every artifact the run logged."""
    return [(r.artifact.name, set(r.artifact.aliases)) for r in records(path)
            if r.WhichOneof("record_type") == "artifact"]


class Recorder:
    """Where review saves reports in tests: records each save, answers as W&B would (the id of
    the report it updated, or a new one)."""

    def __init__(self, fail=None):
        self.saved, self.fail = [], fail

    def default_entity(self) -> str:
        return "team"

    def save(self, report, link):
        if self.fail:
            raise self.fail
        self.saved.append((report, link))
        report_id = link["id"] if link else f"Vmlldzo{len(self.saved)}"
        return {"id": report_id, "url": f"https://wandb.example/team/convergence-pipeline/reports/r--{report_id}"}
