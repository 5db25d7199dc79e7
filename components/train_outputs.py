"""What a train step hands KFP besides the model file, from its outcome (components/train.py: run):
the same for the train step and for train_job (several nodes, components/trainjob_launch.py), so
that evaluate and promote cannot tell them apart."""

from components import storage

# In the run's store, written by the train step's rank 0 (components/train.py) and collected by
# train_job's launcher (components/trainjob_launch.py): here, so that the light launcher pod needs no torch.
MODEL_FILE = "model.pt"  # the best weights with their metadata
RESULT_FILE = "train_result.json"  # the train step's outcome

METRIC_KEYS = ("optimizer_steps", "samples_seen", "epochs", "wall_time_s", "effective_batch_size",
               "accumulation_steps", "lr", "steps_to_target")


def metrics(outcome: dict) -> dict:
    """The Metrics artifact's values: the keys above that have one."""
    return {key: outcome[key] for key in METRIC_KEYS if outcome[key] is not None}


def model_metadata(outcome: dict) -> dict:
    """The Model artifact's metadata. It is serialized as protobuf JSON, which refuses NaN: only
    finite values, the status beside them; has_weights false is an empty artifact (diverged with no
    finite evaluation)."""
    return {"data_version": outcome["data_version"], "config_hash": outcome["config_hash"],
            "status": outcome["status"], "has_weights": outcome["model_file"] is not None}


def hand_on(outcome: dict, model, metrics_artifact) -> str:
    """Fill the step's Model and Metrics artifacts (kfp's Output[Model], Output[Metrics]) from the
    outcome and return it as the step's string output. model.pt is already at model.path, or, with
    no finite evaluation, the artifact is an empty file (has_weights false says why)."""
    for key, value in metrics(outcome).items():
        metrics_artifact.log_metric(key, value)
    model.metadata.update(model_metadata(outcome))
    if outcome["model_file"] is None:
        open(model.path, "wb").close()
    return storage.dumps(outcome)
