"""Step: finalize, the pipelines' exit handler (pipelines/graph.py wraps each graph in a
dsl.ExitHandler). On a cluster nobody waits for a run: when one does not succeed, this step writes
its summary.json into the run's store, `<output_dir>/<run_id>/`, with the status, the step that
failed and why, as submit does for a local run (pipelines/submit.py: _failed).

Which step and why comes from the notes steps leave beside the run, in `<output_dir>/.steps/<run_id>/`
(hidden, and outside the run's store, which holds only what its manifest lists): each step that
knows the run id notes that it started, then that it is done, or that it failed with its one-line
error (`recorded`). KFP's final status names only the exit handler's group and carries no message
(its v2 driver leaves the error empty). data_prep knows no run id (its cache key is its data's and
config's), so it notes a failure in `<output_dir>/.steps/` keyed by its inputs, and resolve_data's
note says where (`recorded_by_inputs`).

    python -m components.finalize --config config.json --state FAILED --steps resolve_data,data_prep,train
"""

import argparse
import hashlib
import json
import time
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

from components import run_parameters, run_store
from components.config import with_run_id
from components.errors import StorageError, UserInputError, brief, exit_on_user_error
from components.run_record import SUMMARY_FILE

NOTES = ".steps"
CANCELLED = ("CANCELLED", "CANCELED")  # the SDK's docs spell it one way, KFP's API the other


def run_config(config_json: str, run_id: str, job_id: str) -> dict:
    """What locates a run before its config is checked: config_json with the run_id parameter over it
    ("" : KFP's job id, as components/run_parameters.py merges it); {} when config_json is not JSON."""
    try:
        raw = json.loads(config_json)
    except ValueError:
        return {}
    return with_run_id({**raw, "run_id": run_parameters.text(run_id or "")}, job_id) if isinstance(raw, dict) else {}


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, UserInputError):
        return str(exc)
    text = brief(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def notes_store(config: dict) -> "run_store.RunStore":
    """`<output_dir>`, where the notes are kept (under NOTES)."""
    return run_store.RunStore.open(config["output_dir"], run_store.settings_of(config))


def _note(config: dict, key: str, note: dict) -> None:
    """Best effort: a note must never be why a step fails (a store that refuses fails the step itself)."""
    try:
        notes_store(config).put_json(key, {**note, "at": time.time()})
    except (StorageError, OSError, ValueError, KeyError, TypeError):
        pass


def note_key(run_id: str, name: str) -> str:
    return f"{NOTES}/{run_id}/{name}.json"


@contextmanager
def recorded(config: dict, step: str, name: Optional[str] = None):
    """Note the step (as `name`: a study_run per batch) started, then done (with what the caller
    adds to the yielded dict) or failed with its one-line error, in the run's store (config names
    it: output_dir and run_id). A resumed run's notes from before its resolve_data are ignored."""
    name = name or step
    key, extra, started = note_key(config.get("run_id"), name), {}, time.time()
    _note(config, key, {"step": step, "name": name, "state": "started", "started_at": started})
    try:
        yield extra
    except BaseException as exc:  # noqa: BLE001 - noted, then raised as it was
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        _note(config, key, {"step": step, "name": name, "state": state, "started_at": started,
                            "error": _one_line(exc)})
        raise
    _note(config, key, {"step": step, "name": name, "state": "done", "started_at": started, **extra})


def input_note_key(step: str, *inputs: str) -> str:
    return f"{NOTES}/{step}-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]}.json"


@contextmanager
def recorded_by_inputs(config: dict, step: str, *inputs: str):
    """A failure of a step that knows no run id, noted in <output_dir>/.steps/ under its inputs."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001
        _note(config, input_note_key(step, *inputs), {"step": step, "name": step, "state": "failed",
                                                      "error": _one_line(exc)})
        raise


def diagnose(notes: List[dict], order: List[str], input_notes: Dict[str, dict]) -> Tuple[Optional[str], str]:
    """(the step that failed, why) from the steps' notes, in the graph's step order; input_notes:
    the notes of steps that know no run id, by step."""
    by_time = sorted(notes, key=lambda n: n.get("at", 0))
    failed = [n for n in by_time if n["state"] in ("failed", "interrupted")]
    if failed:
        return failed[0]["step"], failed[0]["error"]
    running = [n for n in by_time if n["state"] == "started"]
    if running:
        return running[-1]["step"], (f"{running[-1]['name']} started and never finished: its pod was stopped (out of "
                                     "its memory limit, past its timeout, evicted or preempted); its log in the KFP "
                                     "UI says which")
    noted = {n["step"] for n in notes}
    for i, step in enumerate(order):
        if step in noted:
            continue
        if step in input_notes:
            return step, input_notes[step]["error"]
        if noted & set(order[i + 1:]):  # a step after it ran: it was done (or cached)
            continue
        if step == "data_prep":  # it notes only a failure it lived to see
            return step, "data_prep failed and left no note (its pod stopped first); its log in the KFP UI says why"
        return step, (f"{step} never started: its pod could not be scheduled or start (no node with the GPUs, "
                      "node_selector or tolerations it asks for, the image not pulled, a Secret missing)")
    return None, "every step finished; the exit handler's own inputs failed: see the KFP UI"


def _read_notes(store, config: dict, order: List[str]) -> List[dict]:
    """This attempt's notes, by name: each step's, and the study runs study_plan listed (a local
    store lists no hidden keys, so they are read by name, not listed)."""
    names, notes = [s for s in order if s != "study_run"], []
    while names:
        key = note_key(config["run_id"], names.pop(0))
        if store.exists(key):
            notes.append(store.get_json(key))
            names += notes[-1].get("runs") or []
    first = next((n for n in notes if n["name"] == order[0]), None)
    since = first["started_at"] if first else 0.0
    return [n for n in notes if n.get("started_at", 0) >= since]  # not an earlier attempt's


def run(config: dict, state: str, order: List[str], store=None) -> Optional[dict]:
    """For a run that did not succeed, its summary.json, written into its store and returned;
    None for one that did (or a diverged run, whose summary evaluate has published)."""
    if state == "SUCCEEDED":
        return None
    store, outputs = run_store.open_run(config, store), notes_store(config)
    notes, input_notes = _read_notes(outputs, config, order), {}
    for note in notes:  # resolve_data says where data_prep would have noted a failure
        for step, key in (note.get("input_notes") or {}).items():
            found = outputs.get_json(key) if outputs.exists(key) else None
            if found is not None and found.get("at", 0) >= note.get("at", 0):
                input_notes[step] = found
    step, error = diagnose(notes, order, input_notes)
    summary = {"run_id": config["run_id"], "status": "interrupted" if state in CANCELLED else "failed",
               "step": step, "error": error, "kfp_state": state}
    manifest = store.read_manifest()
    if manifest is not None:
        if manifest.get("status") == "diverged":  # reported as such, never as failed
            return None
        summary = {**store.get_json(SUMMARY_FILE), **summary} if store.exists(SUMMARY_FILE) else summary
        store.unpublish()  # what the manifest sealed is not the run's outcome
    store.put_json(SUMMARY_FILE, summary)
    return summary


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m components.finalize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config as JSON (its run_id set)")
    parser.add_argument("--state", required=True, help="the run's final state: SUCCEEDED, FAILED or CANCELLED")
    parser.add_argument("--steps", required=True, help="the graph's steps in order, comma-separated")
    args = parser.parse_args(argv)
    from components.config import load_config_file

    summary = run(load_config_file(args.config), args.state, args.steps.split(","))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
