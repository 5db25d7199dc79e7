"""The pipeline graphs, built in one place: data_prep -> probe -> train -> evaluate."""

from kfp import dsl

from pipelines.steps import make_steps

TRAIN_PIPELINE = "convergence-train"


def train_pipeline(config: dict):
    """The training pipeline for a resolved config. Its parameters: the config as one JSON
    string, and the run directory every step writes its outputs to. The probe task exists
    when `probe.enabled`; otherwise the batch sizes come from the config as numbers."""
    steps = make_steps(config["platform"]["image"])
    gpu = config["platform"]["gpu"]
    probe_enabled = config["probe"]["enabled"]
    fixed = config["train"]

    def on_gpu(task):
        if gpu["count"]:  # carried into the compiled YAML; kfp's local runner ignores it
            task.set_accelerator_type(gpu["type"]).set_accelerator_limit(gpu["count"])
        return task

    @dsl.pipeline(name=TRAIN_PIPELINE, description="data_prep -> probe -> train -> evaluate: the batch that fits "
                  "and is worth it, gradient accumulation, early stopping")
    def pipeline(config_json: str, run_dir: str):
        prep = steps.data_prep(config_json=config_json)
        if probe_enabled:
            probe = on_gpu(steps.probe(config_json=config_json, run_dir=run_dir, dataset=prep.outputs["dataset"]))
            probe.set_caching_options(False)  # measures this hardware now
            batch, micro, decision = (probe.outputs[k] for k in ("batch_size", "micro_batch_size", "decision"))
        else:
            batch, micro, decision = fixed["batch_size"], fixed["micro_batch_size"], ""
        train = on_gpu(steps.train(config_json=config_json, run_dir=run_dir, batch_size=batch,
                                   micro_batch_size=micro, dataset=prep.outputs["dataset"]))
        evaluate = steps.evaluate(config_json=config_json, run_dir=run_dir, train_result=train.outputs["Output"],
                                  probe_decision=decision, dataset=prep.outputs["dataset"],
                                  model=train.outputs["model"])
        for task in (train, evaluate):
            task.set_caching_options(False)  # they write into run_dir; train resumes from it

    return pipeline
