"""Step 1: data_prep. Loads, checks, splits and normalizes the data; writes the dataset
artifact. Bad data stops here with one line, and nothing is written.

    python -m components.data_prep --config config.yaml --out dataset/ [--resolved source.json]

The data's version is resolved before this step (components/data_sources.py: the pipeline's
resolve_data step, or here when run alone); what is read is checked against it.
"""

import argparse
import tempfile
from pathlib import Path
from typing import Optional

import torch

from components import data_sources, datasets, models, storage
from components.config import AUTO, Config, for_dataset, load_config_file, parse_config
from components.errors import ConfigError, exit_on_user_error


def check_batch_fits(cfg: Config, n_train: int) -> None:
    """A batch larger than the training split can never make a step: refuse it now, before
    the probe or training start (and before a dataset is written)."""
    if cfg.pipeline == "study":
        largest = max(cfg.study.batch_sizes or [0])
        if largest > n_train:
            raise ConfigError(f"study.batch_sizes: batch {largest} is larger than the training split "
                              f"({n_train} examples); use sizes up to {n_train}")
    elif cfg.train.batch_size != AUTO and cfg.train.batch_size > n_train:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the training split "
                          f"({n_train} examples); use at most {n_train}, or train.batch_size=auto")


def run(config: dict, out: str, resolved: Optional[dict] = None) -> dict:
    """`resolved`: the data source and version from data_sources.resolve (resolved now when None)."""
    cfg = parse_config(config)
    resolved = resolved or data_sources.resolve(config)
    with tempfile.TemporaryDirectory(prefix="data_prep-") as scratch:  # this step's own copy of the data
        local_file = data_sources.fetch(config, resolved, Path(scratch))
        dataset = datasets.build(cfg.data, resolved, local_file)
    m = dataset.manifest
    # The task is known now: monitor and mode follow it, and an explicit one must fit it.
    cfg = parse_config(for_dataset(config, m))
    check_batch_fits(cfg, m["counts"]["train"])
    # A wrong shape for the chosen model fails now, not after the pipeline has moved on.
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, dataset.input_shape, dataset.output_dim)
    x_sample = torch.as_tensor(dataset.split("train")[0][:2])
    models.check_fits(model, cfg.model, x_sample, dataset.output_dim)
    datasets.save(dataset, Path(out))
    if m["task_inferred"]:
        print(f"data_prep: task {m['task']}, inferred from the target {m['target']!r} ({m['task_reason']}); "
              "set data.task to override", flush=True)
    if m["target_scale"]:
        scale = m["target_scale"]
        print(f"data_prep: target {m['target']!r} standardized on the train split (mean {scale['mean']:.4g}, "
              f"std {scale['std']:.4g}); val/test mse, mae and r2 are in its own units", flush=True)
    print(f"data_prep: {m['origin']}: {m['counts']} examples, input {tuple(m['input_shape'])}, "
          f"{m['task']}, monitor {cfg.eval.monitor} ({cfg.eval.mode}), data_version {m['data_version']}", flush=True)
    return m


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON)")
    parser.add_argument("--out", required=True, help="dataset artifact directory to write")
    parser.add_argument("--resolved", help="the resolved data source (JSON, from components.data_sources); "
                                           "default: resolved now")
    args = parser.parse_args(argv)
    run(load_config_file(args.config), args.out, storage.read_json(args.resolved) if args.resolved else None)


if __name__ == "__main__":
    main()
