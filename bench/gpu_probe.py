"""GPU check of the probe on a real CUDA device (run by bench/gpu_probe.sh, well under 5 minutes).

A wide, deep MLP on synthetic inputs is large enough per sample to reach the card's memory
(kept to tensors under 2^31 elements, which some kernels refuse):
1. the memory-fit search (components/memory.py) with peak memory measured by CUDA: trials,
   predicted largest micro-batch, and the true largest (bisection on measured peaks, and the
   true out-of-memory boundary);
2. samples/s on the probe's throughput ladder;
3. B_simple on the device;
4. an out-of-memory caught and recovered from by the trainer (micro-batch halved, same update).

    python bench/gpu_probe.py [--out results.json]        # on CPU: --dry-run, tiny sizes
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from components import memory, noise_scale, probe, training  # noqa: E402
from components.config import Config, parse_config  # noqa: E402
from components.datasets import Dataset  # noqa: E402


def wide_mlp(features: int, width: int, depth: int) -> nn.Module:
    layers = [nn.Linear(features, width), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_probe.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, to check the script")
    args = parser.parse_args()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    features, width, depth, n = (64, 64, 4, 256) if dry else (1024, 4096, 16, 4096)
    torch.backends.cuda.matmul.allow_tf32 = True  # trials near the memory limit stay quick
    torch.manual_seed(0)
    x = torch.randn(n, features, device=device)
    y = (x @ torch.randn(features, 10, device=device)).argmax(1)  # learnable labels: a real gradient signal
    model = wide_mlp(features, width, depth).to(device)
    loss_fn = nn.functional.cross_entropy
    report = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(device), "torch": torch.__version__}

    # 1. memory fit
    def step(b: int) -> None:
        rows = torch.arange(b, device=device) % n
        loss_fn(model(x[rows]), y[rows]).backward()
        model.zero_grad(set_to_none=True)

    if dry:
        trial, budget = memory.cpu_trial(model, loss_fn, x, y), 64 * 2**20
    else:
        trial, budget = memory.cuda_trial(step, device), torch.cuda.mem_get_info(device)[1]
    margin, cap = 0.1, 1 << 21
    start = time.perf_counter()
    start_at = memory.first_probe_batch(model, loss_fn, x, y, cap) if not dry else 8
    fit = memory.find_max_micro_batch(trial, budget, margin, cap=cap, probe=start_at)
    report["first_probe"] = start_at
    report["search"] = {"micro_batch": fit.micro_batch, "trials": fit.trials, "seconds": time.perf_counter() - start,
                        "reasoning": fit.reasoning, "budget_bytes": budget}

    def fits(b: int, usable: float) -> bool:
        try:
            return trial(b) <= usable
        except Exception as exc:  # noqa: BLE001
            if memory.is_oom(exc):
                return False
            raise

    def largest(usable: float, low: int, high: int) -> tuple:
        """Bisection on measured peaks: the largest b in [low, high) with peak <= usable."""
        count = 0
        while high - low > 1:
            mid = (low + high) // 2
            count += 1
            low, high = (mid, high) if fits(mid, usable) else (low, mid)
        return low, count

    usable = (1 - margin) * budget
    upper = fit.micro_batch * 2
    while fits(upper, usable):
        upper *= 2
    true_max, count = largest(usable, 1, upper)
    report["true_max_within_margin"] = {"micro_batch": true_max, "bisection_trials": count,
                                        "error": fit.micro_batch / true_max - 1}
    if not dry:  # where the allocator really fails, no margin
        upper = true_max * 2
        while fits(upper, float("inf")):
            upper *= 2
        report["true_oom_boundary"] = largest(float("inf"), true_max, upper)[0]

    # 2. throughput ladder
    ladder = probe.throughput_ladder(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                                     loss_fn, x, y, min(fit.micro_batch, 4096 if not dry else 64), device)["ladder"]
    report["throughput"] = ladder

    # 3. noise scale on the device
    start = time.perf_counter()
    gns = noise_scale.measure(model, loss_fn, x, y, 32, 4, 16, torch.Generator().manual_seed(0))
    report["noise_scale"] = {**gns.to_dict(), "seconds": time.perf_counter() - start}

    # 4. an out-of-memory in training, recovered: micro-batch above what fits, same update
    too_big = 1 << (true_max * 2).bit_length()  # a power of two above the fitting micro-batch
    raw = Config().to_dict()
    raw["train"].update(batch_size=too_big, micro_batch_size=too_big, max_steps=3, device=device.type,
                        lr_scaling="none", checkpoint_every_steps=None, track_noise_scale=False)
    raw["eval"].update(every_steps=3)
    raw["tracking"].update(mode="disabled")
    arrays = {}
    for split, size in (("train", too_big), ("val", 64), ("test", 64)):  # one step per epoch
        arrays[f"x_{split}"] = torch.randn(size, features).numpy()
        arrays[f"y_{split}"] = np.random.default_rng(0).integers(0, 10, size=size)
    data = Dataset(arrays, {"task": "classification", "n_classes": 10, "input_shape": [features],
                            "data_version": "synthetic", "counts": {"train": too_big}})
    torch.manual_seed(0)
    net = wide_mlp(features, width, depth)
    if dry:  # no real allocator: inject the limit
        net = OomAbove(net, true_max)
    start = time.perf_counter()
    try:
        result = training.fit(net, data, parse_config(raw), progress=False)
        report["oom_recovery"] = {"requested_micro_batch": too_big, "events": result.oom_events,
                                  "final_micro_batch": result.micro_batch_size,
                                  "accumulation": result.accumulation_steps, "steps": result.optimizer_steps,
                                  "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - the report says what happened
        report["oom_recovery"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


class OomAbove(nn.Module):
    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x):
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("injected")
        return self.inner(x)


if __name__ == "__main__":
    main()
