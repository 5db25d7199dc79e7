"""The pipeline graphs, built in one place: data_prep -> train -> evaluate."""

from kfp import dsl

from pipelines.steps import make_steps

TRAIN_PIPELINE = "convergence-train"


def train_pipeline(image: str):
    """The training pipeline for components running in `image`. Parameters: the resolved
    config as one JSON string, and the run directory every step writes its outputs to."""
    steps = make_steps(image)

    @dsl.pipeline(name=TRAIN_PIPELINE, description="data_prep -> train -> evaluate, with gradient "
                  "accumulation and early stopping")
    def pipeline(config_json: str, run_dir: str):
        prep = steps.data_prep(config_json=config_json)
        train = steps.train(config_json=config_json, run_dir=run_dir, dataset=prep.outputs["dataset"])
        evaluate = steps.evaluate(config_json=config_json, run_dir=run_dir, train_result=train.outputs["Output"],
                                  dataset=prep.outputs["dataset"], model=train.outputs["model"])
        for task in (train, evaluate):
            task.set_caching_options(False)  # they write into run_dir; train resumes from it

    return pipeline
