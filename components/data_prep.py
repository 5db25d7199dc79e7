"""Step 1: data_prep. Loads, checks, splits and normalizes the data; writes the dataset
artifact. Bad data stops here with one line, and nothing is written.

    python -m components.data_prep --config config.yaml --out dataset/
"""

import argparse
from pathlib import Path

import torch

from components import datasets, models
from components.config import load_config_file, parse_config
from components.errors import exit_on_user_error


def run(config: dict, out: str) -> dict:
    cfg = parse_config(config)
    dataset = datasets.build(cfg.data)
    # A wrong shape for the chosen model fails now, not after the pipeline has moved on.
    torch.manual_seed(cfg.train.seed)
    model = models.build_model(cfg.model, dataset.input_shape, dataset.output_dim)
    x_sample = torch.as_tensor(dataset.split("train")[0][:2])
    models.check_fits(model, cfg.model, x_sample, dataset.output_dim)
    datasets.save(dataset, Path(out))
    m = dataset.manifest
    print(f"data_prep: {m['origin']}: {m['counts']} examples, input {tuple(m['input_shape'])}, "
          f"{m['task']}, data_version {m['data_version']}")
    return m


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config (YAML or JSON)")
    parser.add_argument("--out", required=True, help="dataset artifact directory to write")
    args = parser.parse_args(argv)
    run(load_config_file(args.config), args.out)


if __name__ == "__main__":
    main()
