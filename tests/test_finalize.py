"""The exit handler's logic (components/finalize.py), alone: the steps' notes in a run's store and
the failure summary it writes from them."""

import json

import pytest

from components import errors, finalize, storage
from components.run_store import RunStore

TRAIN = ["resolve_data", "data_prep", "probe", "train", "evaluate", "promote"]


@pytest.fixture
def config(tmp_path):
    return {"output_dir": str(tmp_path), "run_id": "r1", "storage": {}}


def step(config, name, fail=None, **done):
    """Run a step under `recorded`: it fails with `fail` (an exception) or is done, adding `done`."""
    try:
        with finalize.recorded(config, name.split("-")[0], name) as note:
            if fail is not None:
                raise fail
            note.update(done)
    except (Exception, KeyboardInterrupt):
        pass


def summary(config, state="FAILED", order=TRAIN):
    return finalize.run(config, state, order)


def test_a_succeeded_run_gets_nothing_written(config, tmp_path):
    step(config, "resolve_data")
    assert summary(config, "SUCCEEDED") is None and not (tmp_path / "r1" / "summary.json").exists()


def test_the_first_step_that_failed_and_its_one_line_error(config, tmp_path):
    from components.errors import ConfigError

    for name in ("resolve_data", "probe"):
        step(config, name)
    step(config, "train", ConfigError("train.lr: must be > 0; got -1"))
    written = summary(config)
    assert written == {"run_id": "r1", "status": "failed", "step": "train", "error": "train.lr: must be > 0; got -1",
                       "kfp_state": "FAILED"}
    assert storage.read_json(tmp_path / "r1" / "summary.json") == written
    # beside the run, hidden: the run's store holds only what its manifest lists
    notes = sorted(p.name for p in (tmp_path / finalize.NOTES / "r1").iterdir())
    assert notes == ["probe.json", "resolve_data.json", "train.json"]
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["summary.json"]


def test_a_crash_is_named_by_its_exception_and_a_killed_pod_by_the_note_it_left(config):
    step(config, "resolve_data")
    step(config, "probe", RuntimeError("CUDA error: an illegal memory access\nmore lines"))
    assert summary(config)["error"] == "RuntimeError: CUDA error: an illegal memory access"
    step(config, "probe")
    key = finalize.note_key("r1", "train")  # started, then the pod was OOM-killed: no end note
    RunStore.open(config["output_dir"]).put_json(key, {"step": "train", "name": "train", "state": "started",
                                                      "started_at": 1e12, "at": 1e12})
    written = summary(config)
    assert (written["step"], written["error"].split(":")[0]) == ("train", "train started and never finished")


def test_an_error_of_thousands_of_characters_on_one_line_is_cut_to_its_first_sentence(config):
    backends = ", ".join(f"Backend{i}" for i in range(400))  # torch's NotImplementedError lists them all
    step(config, "resolve_data")
    step(config, "train", NotImplementedError(
        f"Could not run 'aten::linalg_vector_norm' with arguments from the 'SparseCPU' backend. This could be "
        f"because the operator doesn't exist for this backend. It is only available for these backends: [{backends}]."))
    assert summary(config)["error"] == ("NotImplementedError: Could not run 'aten::linalg_vector_norm' with "
                                        "arguments from the 'SparseCPU' backend.")
    assert errors.brief("no sentence " * 100) == ("no sentence " * 25).strip() + " ..."
    assert errors.brief(" short\nsecond line") == "short"


def test_a_step_that_never_started_is_named_after_the_last_one_done(config):
    for name in ("resolve_data", "probe"):
        step(config, name)
    written = summary(config)  # data_prep notes nothing when it succeeds (it knows no run id): probe ran after it
    assert written["step"] == "train" and written["error"].startswith("train never started: its pod could not be "
                                                                      "scheduled or start (no node with the GPUs")


def test_data_prep_which_knows_no_run_id_is_found_through_resolve_data(config):
    inputs = ("{config}", "{source}")
    step(config, "resolve_data", input_notes={"data_prep": finalize.input_note_key("data_prep", *inputs)})
    with pytest.raises(ValueError):
        with finalize.recorded_by_inputs(config, "data_prep", *inputs):
            raise ValueError("the table has no target column")
    assert (summary(config)["step"], summary(config)["error"]) == ("data_prep", "ValueError: the table has no "
                                                                                "target column")
    # another run's data_prep note, same inputs, from before this run's resolve_data: not this run's
    other = {**config, "run_id": "r2"}
    step(other, "resolve_data", input_notes={"data_prep": finalize.input_note_key("data_prep", *inputs)})
    assert summary(other)["error"].startswith("data_prep failed and left no note")


def test_a_resumed_runs_older_notes_are_not_its_own(config):
    step(config, "resolve_data")
    step(config, "train", RuntimeError("the first attempt's"))
    step(config, "resolve_data")  # the run again (a local run resumed with its run id)
    step(config, "probe")
    assert summary(config)["step"] == "train" and summary(config)["error"].startswith("train never started")


def test_the_study_runs_study_plan_listed(config):
    order = ["resolve_data", "data_prep", "study_plan", "study_run", "study_report"]
    step(config, "resolve_data")
    step(config, "study_plan", runs=["study_run-b16", "study_run-b64"])
    step(config, "study_run-b16")
    step(config, "study_run-b64", OSError("s3: connection reset"))
    assert (summary(config, order=order)["step"], summary(config, order=order)["error"]) == \
        ("study_run", "OSError: s3: connection reset")


@pytest.mark.parametrize("state, status", [("CANCELLED", "interrupted"), ("CANCELED", "interrupted"),
                                           ("FAILED", "failed")])
def test_a_cancelled_run_is_interrupted(config, state, status):
    step(config, "resolve_data", KeyboardInterrupt())
    assert summary(config, state)["status"] == status


def test_a_sealed_run_whose_last_step_failed_is_unpublished_with_its_summary_kept(config, tmp_path):
    store = RunStore.open(str(tmp_path / "r1"))
    store.put_json("summary.json", {"run_id": "r1", "status": "completed", "test": {"accuracy": 0.97}})
    store.seal({"status": "completed"})
    for name in ("resolve_data", "train", "evaluate"):
        step(config, name)
    step(config, "promote", OSError("registry: access denied"))
    written = summary(config)
    assert written == {"run_id": "r1", "status": "failed", "test": {"accuracy": 0.97}, "step": "promote",
                       "error": "OSError: registry: access denied", "kfp_state": "FAILED"}
    assert not store.is_published()


def test_a_diverged_run_stays_as_evaluate_published_it(config, tmp_path):
    store = RunStore.open(str(tmp_path / "r1"))
    store.put_json("summary.json", {"run_id": "r1", "status": "diverged"})
    store.seal({"status": "diverged"})
    step(config, "promote", OSError("later"))
    assert summary(config) is None and store.is_published()
    assert storage.read_json(tmp_path / "r1" / "summary.json")["status"] == "diverged"


def test_where_a_run_is_before_its_config_is_checked():
    config_json = json.dumps({"output_dir": "s3://b/runs", "run_id": "from-config"})
    assert finalize.run_config(config_json, "", "job-7")["run_id"] == "job-7"  # "" : KFP's id, as the merge says
    assert finalize.run_config(config_json, "mine", "job-7")["run_id"] == "mine"
    assert finalize.run_config(config_json, " mine ", "job-7")["run_id"] == "mine"  # as resolve_data's merge reads it
    assert finalize.run_config("{not json", "", "job-7") == {}


def test_a_note_never_fails_the_step(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the run's directory would be")
    config = {"output_dir": str(blocked), "run_id": "r1", "storage": {}}
    ran = []
    with finalize.recorded(config, "train") as note:  # the store refuses every note
        note["fine"] = True
        ran.append("the step's body")
    assert ran == ["the step's body"]  # the step went on and ended normally
    assert blocked.read_text() == "a file where the run's directory would be"  # no note landed anywhere
    # a step's own failure comes out as it was, not as the note's failure to be written
    with pytest.raises(ValueError, match="^the step's own error$"):
        with finalize.recorded(config, "train"):
            raise ValueError("the step's own error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
