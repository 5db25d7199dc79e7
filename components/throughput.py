"""Samples per second of full training steps on a ladder of micro-batches, measured so that two
probes of the same model on the same machine agree, also while something else uses the CPU.

Each rung is timed for `time_s` seconds in PASSES passes over the ladder (interleaved: a slow
spell of the machine lands on every rung a little, not on a few rungs whole), in blocks as short
as the clock allows (one step, when a step takes over `min_block_s`), with torch.utils.benchmark's
timer (it synchronizes an accelerator before reading the clock). A rung keeps the median of its
blocks, the spread of that median (a ~95% interval from the blocks' median absolute deviation,
`median_spread`) and the blocks' quartiles. On a shared CPU most steps run at full speed and
some stall for milliseconds (the core one of torch's threads waits for was taken; measured on 2
cores with one kept busy: median 0.25 ms, 95th percentile 4 ms): short blocks leave most blocks
clean, so the median is the machine's pace, and stalls, which only ever slow a block down, move
the lower quartile of samples/s but not the spread. Not the fastest of a few repeats, which
assumes noise only slows a run down: a slow mode that lasts through every repeat passes straight
through, and a fast outlier wins.

Throughput grows with the micro-batch until the device is saturated; it may flatten, or dip
past a cache size. A ladder where a larger micro-batch is slower than a smaller one by more than
both their spreads is suspicious: the odd rung out (`suspects`) is measured twice more and the
middle of the three measurements stands; so is a rung whose median is uncertain by more than a quarter (most
of its blocks stalled). After `remeasure` rounds what remains is taken as real. A caller whose
decision hinges on two rungs can `Ladder.settle` them: measured over more passes, pooled.

Why not Timer.blocked_autorange / adaptive_autorange: their block size makes the timer's
overhead at most 1e-4 of a block, which on a 0.2 ms step means blocks of 100 steps: within a
20 ms budget (probe.throughput_time_s) that is 1 block, no spread to speak of, and on a shared
machine every block holds a stall; adaptive_autorange's four blocks took the digits ladder from
0.1 s to 1.4 s (measured).
Reading the clock costs ~0.1 us, under 0.2% of a 50 us block.
"""

import collections
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

# Blocks per timer call at least; a measurement has PASSES x that at least. One: a step slower
# than a pass's share of time_s (4096 rows of a small MLP on a CPU: ~8 ms against ~7 ms) is timed
# once a pass, not three times, which took the ladder's top rung to ~3x its time (and samples)
MIN_BLOCKS = 1
PASSES = 3  # interleaved passes over the rungs per measurement
Z95, MAD_TO_SIGMA = 1.96, 1.4826  # a normal's 97.5% quantile; sigma / MAD for a normal
STATS = ("samples_per_s", "spread", "samples_per_s_q1", "samples_per_s_q3", "blocks")
UNCERTAIN = 0.25  # a median known only to within 25% is measured again too (most blocks stalled)
MEASUREMENTS_PER_REMEASURE = 2  # a suspicious rung gets two more: the middle of three stands
SETTLE_ROUNDS = 4  # a rung the choice hinges on is measured over 4x the passes (Ladder.settle)


class Blocks(NamedTuple):
    """What a timer returns for one measurement of one rung."""

    steps: int  # every step the timer ran, timed or not
    seconds_per_step: List[float]  # one per block


StepTimer = Callable[[int, Callable[[], None]], Blocks]  # (micro_batch, step) -> Blocks


class BlockTimer:
    """The default StepTimer: blocks of `step` for `time_s` seconds in all, each block the fewest
    steps that take `min_block_s` (one, for all but tiny models), timed with torch.utils.benchmark's
    timer. Raise min_block_s on an accelerator, where a step per block would time the sync. The
    three steps that size a rung's blocks are its first blocks when a block is one step."""

    def __init__(self, time_s: float, min_block_s: float = 50e-6, min_blocks: int = MIN_BLOCKS):
        from torch.utils.benchmark.utils.timer import timer

        self.time_s, self.min_block_s, self.min_blocks, self.clock = time_s, min_block_s, min_blocks, timer
        self.block_steps: Dict[int, int] = {}  # sized once per micro-batch

    def __call__(self, micro_batch: int, step: Callable[[], None]) -> Blocks:
        sizing = []
        if micro_batch not in self.block_steps:
            for _ in range(3):  # the median of three: one stalled step does not size the blocks
                start = self.clock()
                step()
                sizing.append(self.clock() - start)
            self.block_steps[micro_batch] = max(1, math.ceil(self.min_block_s / max(sorted(sizing)[1], 1e-9)))
        number = self.block_steps[micro_batch]
        times: List[float] = list(sizing) if number == 1 else []  # timed single steps, the same as a block
        total, steps = sum(times), len(sizing)
        while total < self.time_s or len(times) < self.min_blocks:
            start = self.clock()
            for _ in range(number):
                step()
            elapsed = self.clock() - start
            times.append(elapsed / number)
            total += elapsed
            steps += number
        return Blocks(steps, times)


def quartiles(values: List[float]) -> Tuple[float, float, float]:
    """25th, 50th and 75th percentiles, linearly interpolated (as torch.utils.benchmark's Measurement)."""
    q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return tuple(q.tolist())


def median_spread(values: List[float], median: float) -> float:
    """Half-width of a ~95% interval for the median of `values`: 1.96 standard errors, the error
    sqrt(pi/2) sigma / sqrt(n) with sigma estimated from the median absolute deviation (x 1.4826).
    The MAD, unlike the interquartile range, ignores up to half the blocks stalling: stalls only
    ever slow blocks down, so they widen one quartile without making the median less certain."""
    mad = quartiles([abs(v - median) for v in values])[1]
    return Z95 * math.sqrt(math.pi / 2) * MAD_TO_SIGMA * mad / math.sqrt(len(values))


def measurement(micro_batch: int, blocks: Blocks) -> Dict:
    """One measurement of a rung: median samples/s of its blocks, its spread and the quartiles."""
    rates = [micro_batch / max(s, 1e-12) for s in blocks.seconds_per_step]
    q1, median, q3 = quartiles(rates)
    return {"samples_per_s": median, "spread": median_spread(rates, median), "samples_per_s_q1": q1,
            "samples_per_s_q3": q3, "blocks": len(rates), "steps": blocks.steps}


def rung(micro_batch: int, measurements: List[Dict]) -> Dict:
    """A rung from its measurements: the one with the median median stands (their count is odd)."""
    stands = sorted(measurements, key=lambda m: m["samples_per_s"])[(len(measurements) - 1) // 2]
    return {"micro_batch_size": micro_batch, **{k: stands[k] for k in STATS},
            "measurements": [m["samples_per_s"] for m in measurements],
            "steps": sum(m["steps"] for m in measurements)}


def non_monotone(ladder: List[Dict]) -> List[Tuple[int, int]]:
    """(smaller, larger) micro-batch pairs where the larger is slower beyond both spreads."""
    return [(small["micro_batch_size"], big["micro_batch_size"])
            for i, big in enumerate(ladder) for small in ladder[:i]
            if big["samples_per_s"] + big["spread"] < small["samples_per_s"] - small["spread"]]


def suspects(pairs: List[Tuple[int, int]]) -> List[int]:
    """The rungs to measure again for these non-monotone pairs: first, greedily, the rung in the
    most pairs (one rung slower than several smaller ones is the odd one out, not all of them);
    of a pair on its own, both."""
    left, chosen = list(pairs), set()
    while left:
        b, n = collections.Counter(r for pair in left for r in pair).most_common(1)[0]
        if n == 1:
            chosen.update(r for pair in left for r in pair)
            break
        chosen.add(b)
        left = [pair for pair in left if b not in pair]
    return sorted(chosen)


class Ladder:
    """A ladder's measurements so far, rung by rung, and the means to take more: measure_ladder
    drives it; the probe `settle`s the rungs its choice hinges on."""

    def __init__(self, sizes: List[int], make_step: Callable[[int], Callable[[], None]], timer: StepTimer,
                 passes: int = PASSES):
        self.sizes, self.make_step, self.timer, self.passes = sizes, make_step, timer, passes
        self.steps: Dict[int, Callable[[], None]] = {}
        self.measured: Dict[int, List[Dict]] = {b: [] for b in sizes}
        self.settled: Dict[int, Dict] = {}  # micro-batch -> the measurement that stands for it

    def measure(self, rungs: List[int], rounds: int = 1) -> None:
        """One more measurement of each of `rungs`: rounds x passes interleaved passes over them,
        each timer call 1/passes of the time, the blocks of all of a rung's calls pooled."""
        got: Dict[int, List[Blocks]] = {b: [] for b in rungs}
        for _ in range(self.passes * rounds):
            for b in rungs:
                if b not in self.steps:
                    self.steps[b] = self.make_step(b)
                    self.steps[b]()  # warm-up: allocation, kernel selection
                    got[b].append(Blocks(1, []))
                got[b].append(self.timer(b, self.steps[b]))
        for b in rungs:
            self.measured[b].append(measurement(b, Blocks(sum(g.steps for g in got[b]),
                                                          [s for g in got[b] for s in g.seconds_per_step])))

    def settle(self, rungs: List[int], rounds: int = SETTLE_ROUNDS) -> None:
        """Measure `rungs` once more, over `rounds` times the passes, and let that measurement
        stand for them: with `rounds` times the blocks its spread is about 1/sqrt(rounds) of one
        measurement's, and a slow spell covers a smaller share of its blocks."""
        self.measure(rungs, rounds)
        for b in rungs:
            self.settled[b] = self.measured[b][-1]

    def rungs(self) -> List[Dict]:
        out = []
        for b in self.sizes:
            r = rung(b, self.measured[b])
            if b in self.settled:
                r.update({k: self.settled[b][k] for k in STATS})
            out.append(r)
        return out


def measure_ladder(sizes: List[int], make_step: Callable[[int], Callable[[], None]], timer: StepTimer,
                   remeasure: int = 2, passes: int = PASSES, on_rung: Optional[Callable[[Dict], None]] = None,
                   on_remeasure: Optional[Callable[[int, List[Tuple[int, int]], List[int]], None]] = None) -> Dict:
    """The ladder at `sizes` (ascending). make_step(b) returns one training step at micro-batch b
    (its first call pays for allocation and is not timed). A measurement of some rungs is
    `passes` interleaved passes over them, each timer call 1/passes of the time: a slow spell of
    the machine then lands on every rung a little instead of on a few rungs whole.
    The suspects of non-monotone pairs, and rungs whose spread is over UNCERTAIN of their
    median, are measured again. Returns {"ladder": [...], "remeasured": [{round, pairs, uncertain,
    micro_batch_sizes}], "accepted": the non-monotone pairs left, "timing": the Ladder, to
    measure more}."""
    timing = Ladder(sizes, make_step, timer, passes)
    timing.measure(sizes)
    ladder = timing.rungs()
    for r in ladder if on_rung else []:
        on_rung(r)
    rounds = []
    for n in range(1, remeasure + 1):
        pairs = non_monotone(ladder)
        uncertain = [r["micro_batch_size"] for r in ladder if r["spread"] > UNCERTAIN * r["samples_per_s"]]
        if not pairs and not uncertain:
            break
        again = sorted(set(suspects(pairs)) | set(uncertain))
        if on_remeasure:
            on_remeasure(n, pairs, uncertain)
        for _ in range(MEASUREMENTS_PER_REMEASURE):
            timing.measure(again)
        ladder = timing.rungs()
        rounds.append({"round": n, "pairs": [list(p) for p in pairs], "uncertain": uncertain,
                       "micro_batch_sizes": again})
    return {"ladder": ladder, "remeasured": rounds, "accepted": [list(p) for p in non_monotone(ladder)],
            "timing": timing}


def rungs_behind(ladder: List[Dict], micro: int) -> List[int]:
    """The rungs `throughput_at(ladder, micro)` reads: micro's own, else the two around it (the
    first below the ladder, the last above it)."""
    sizes = [r["micro_batch_size"] for r in ladder]
    if micro in sizes or micro < sizes[0] or micro > sizes[-1]:
        return [min(sizes, key=lambda b: abs(math.log2(b) - math.log2(micro)))]
    return [max(b for b in sizes if b < micro), min(b for b in sizes if b > micro)]


def ladder_sizes(top: int) -> List[int]:
    """Micro-batches 8, 16, 32, ... below `top`, and `top`."""
    return sorted({min(top, 2 ** k) for k in range(3, max(4, math.ceil(math.log2(max(top, 8))) + 1))} | {top})


def throughput_at(ladder: List[Dict], micro: int, key: str = "samples_per_s") -> float:
    """`key` (samples/s, or its spread) at `micro`, interpolated in log2(batch) between ladder
    rungs; proportional below, flat above. A rung without the key counts 0 (no spread measured)."""
    points = [(r["micro_batch_size"], r.get(key, 0.0)) for r in ladder]
    if micro <= points[0][0]:
        return points[0][1] * micro / points[0][0]
    for (b0, t0), (b1, t1) in zip(points, points[1:]):
        if b0 <= micro <= b1:
            w = (math.log2(micro) - math.log2(b0)) / max(1e-12, math.log2(b1) - math.log2(b0))
            return t0 + w * (t1 - t0)
    return points[-1][1]
