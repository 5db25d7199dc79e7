"""How a study picks the LR of each batch size, and how finely it measures steps to target.

Pure rules over one batch size's rows (a row per training run: lr_multiplier, seed, status,
reached_target, steps_to_target, best_metric, search, eval_every_steps, capped, superseded).
The study_run task for a batch calls `decide` after every run and trains what it asks for next,
so the search is adaptive yet needs no task to wait on another (cluster-safe); the report calls
`decide` on the saved rows and gets the same choice.

The search, per batch size (multipliers scale the LR that train.lr_scaling gives):
1. Every multiplier of study.lr_grid, every seed, times the batch's centre (`lr_centre`: 1, or
   with SGD and the probe's noise scale, where that predicts the best LR); the middle first,
   then outward (the best run so far caps the others: `step_cap`). A multiplier above one that
   diverged is skipped (a higher LR at the same batch is no more stable).
2. A multiplier is eligible when none of its runs diverged or failed. The chosen one needs the
   fewest steps to target (median over seeds, a miss counting as infinitely many), ties going to
   the better validation metric, then to the lower LR.
3. No eligible multiplier and some run diverged: half the lowest multiplier tried ("retry"), at
   most study.divergence_retries times. So no batch is judged on an LR that diverged.
4. The chosen multiplier is the lowest or the highest tried: one grid step past that edge
   ("extension"), at most study.lr_extensions times. A choice still at an edge is "not
   bracketed": the best LR may lie further out, and the study's answer names the batch.
5. A run that the cap stopped before its target is run again ("longer") once the cap no longer
   proves it slower: without a cap when its multiplier is now the chosen one, else capped anew
   (a confirmed median can rise past the steps that capped it).
6. The chosen multiplier gets study.confirm_seeds more seeds ("confirm"), and the choice is made
   again on the medians (and may extend the grid again). With one seed per multiplier the fastest is
   partly the luckiest, above all near the edge of stability (seen at batch 16: 50 steps on one
   seed, 204 on the next, where the LR below took 76 and 88).

Cadence: a run evaluates every max(1, round(expected / study.evals_to_target)) steps, where
`expected` is half the fewest steps to target seen at its batch (a higher LR may need half), or
one epoch before any run reached it. A run reaching its target at step S was first at or above
it somewhere in (S - every, S]: when that leaves S known only to worse than study.step_precision,
the run is repeated with finer evaluations ("remeasure", once; the coarse row is superseded).
Re-running costs little because it happens only to runs that reached their target early.
"""

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

COMPLETED, DIVERGED, FAILED = "completed", "diverged", "failed"
GRID, EXTENSION, RETRY, REMEASURE, LONGER, CONFIRM = "grid", "extension", "retry", "remeasure", "longer", "confirm"


def canonical(value: float) -> float:
    """A multiplier rounded to 6 significant digits: x0.5 x 2 x 2 stays exactly x2 in names."""
    return float(f"{value:.6g}")


@dataclass(frozen=True)
class Rules:
    grid: Tuple[float, ...]  # sorted multipliers; (1.0,) when study.lr_grid is null
    seeds: Tuple[int, ...]  # every multiplier tried
    mode: str  # "max" or "min": which way the monitored metric is better
    searching: bool = True  # False: study.lr_grid=null, one LR per batch (retries still halve it)
    extensions: int = 3
    retries: int = 2
    cap: Optional[float] = 1.25
    evals_to_target: int = 40
    precision: float = 0.05
    confirm: Tuple[int, ...] = ()  # more seeds, at the chosen multiplier only

    @classmethod
    def of(cls, cfg, centre: float = 1.0) -> "Rules":
        """The rules for one batch size; `centre` (lr_centre) shifts the grid's multipliers."""
        s = cfg.study
        grid = tuple(sorted({canonical(m * centre) for m in s.lr_grid})) if s.lr_grid else (canonical(centre),)
        first, confirm = cfg.train.seed + s.seeds, s.confirm_seeds
        return cls(grid=grid, seeds=tuple(range(cfg.train.seed, first)), mode=cfg.eval.mode,
                   searching=len(grid) > 1, extensions=s.lr_extensions, retries=s.divergence_retries,
                   cap=s.search_step_cap, evals_to_target=s.evals_to_target, precision=s.step_precision,
                   confirm=tuple(range(first, first + confirm)))

    def run_order(self) -> List[float]:
        """The grid from its middle outward, the higher of a pair first: when it is stable it is
        the faster, and the cap it sets saves most on the slower one."""
        mid = math.sqrt(self.grid[0] * self.grid[-1])
        return sorted(self.grid, key=lambda m: (round(abs(math.log(m / mid)), 9), -m))


@dataclass
class Decision:
    chosen: Optional[float]  # the multiplier that stands for the batch; None: every one diverged or failed
    tried: List[float]
    eligible: List[float]
    bracketed: Optional[bool]  # None when the LR is not searched (one LR per batch)
    edge: Optional[str]  # "lowest" / "highest": where an unbracketed choice sits
    extensions: List[float]
    retries: List[float]
    diverged: List[str]  # run names
    skipped: List[float] = field(default_factory=list)  # grid multipliers above one that diverged: not run
    next_runs: List[Tuple[float, int, str]] = field(default_factory=list)  # (multiplier, seed, kind)

    def to_dict(self) -> Dict:
        out = asdict(self)
        out.pop("next_runs")
        return out


def lr_centre(batch: int, b_simple: Optional[float], base_batch: int, scaling: str) -> float:
    """Where the grid of a batch is centred, as a multiplier of train.lr_scaling's LR: the LR
    that the gradient noise scale predicts, relative to the rule's, snapped to a power of two.
    With SGD the best LR grows with the batch as 1 / (1 + B_noise / B) and saturates above
    B_noise (McCandlish et al. 2018); taking train.lr as the best at train.base_batch_size,
    the best at B is lr (1 + B_noise / B0) / (1 + B_noise / B), while the linear rule keeps
    growing as B / B0 (seen: x0.125 of the linear rule was best at batch 2048, where this gives
    x0.083). 1 when there is no noise scale."""
    if not b_simple or b_simple <= 0:
        return 1.0
    exponent = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[scaling]
    predicted = (1 + b_simple / base_batch) / (1 + b_simple / batch)
    return float(2.0 ** round(math.log2(predicted / (batch / base_batch) ** exponent)))


def effective(rows: List[Dict]) -> List[Dict]:
    """The rows that count: a remeasured or longer run replaces (supersedes) its first row."""
    return [r for r in rows if not r.get("superseded")]


def score(runs: List[Dict], mode: str) -> Tuple[float, float]:
    """(median steps to target, a miss counting as infinite; then the median best metric, better is lower)."""
    steps = [r["steps_to_target"] if r.get("reached_target") else math.inf for r in runs]
    best = [r["best_metric"] for r in runs if r.get("best_metric") is not None]
    sign = -1.0 if mode == "max" else 1.0
    return statistics.median(steps), (sign * statistics.median(best) if best else math.inf)


def resolution(every: Optional[int], steps: Optional[int]) -> Optional[float]:
    """Worst relative overestimate of steps to target measured at `steps` with an evaluation
    every `every` steps: the target was first met somewhere in (steps - every, steps]."""
    if not every or not steps:
        return None
    return (every - 1) / max(1, steps - every + 1)


def _by_multiplier(rows: List[Dict]) -> Dict[float, List[Dict]]:
    out: Dict[float, List[Dict]] = {}
    for r in effective(rows):
        out.setdefault(canonical(r["lr_multiplier"]), []).append(r)
    return dict(sorted(out.items()))


def decide(rows: List[Dict], rules: Rules) -> Decision:
    """What the rows of one batch size say: the chosen multiplier, and what to train next."""
    by_m = _by_multiplier(rows)
    tried = list(by_m)
    kinds = {}
    for r in rows:
        kinds.setdefault(r.get("search") or GRID, set()).add(canonical(r["lr_multiplier"]))
    extensions, retries = sorted(kinds.get(EXTENSION, ())), sorted(kinds.get(RETRY, ()))
    eligible = [m for m, runs in by_m.items() if all(r.get("status") == COMPLETED for r in runs)]
    chosen = min(eligible, key=lambda m: score(by_m[m], rules.mode)) if eligible else None
    diverged = [r["name"] for r in effective(rows) if r.get("status") == DIVERGED]
    edge = None
    if chosen is not None and rules.searching:
        edge = "highest" if chosen == tried[-1] else ("lowest" if chosen == tried[0] else None)
    decision = Decision(chosen=chosen, tried=tried, eligible=eligible,
                        bracketed=None if not rules.searching else (chosen is not None and edge is None),
                        edge=edge, extensions=extensions, retries=retries, diverged=diverged)

    # runs still owed: every seed of every multiplier asked for (one that diverged or failed is
    # out of the running already), then finer measurements where they could change the answer
    wanted = rules.run_order() + [m for m in extensions + retries if m not in rules.grid]
    done = {(canonical(r["lr_multiplier"]), r["seed"]) for r in rows}
    lowest_diverged = min((canonical(r["lr_multiplier"]) for r in effective(rows) if r.get("status") == DIVERGED),
                          default=math.inf)
    for m in wanted:
        if m in by_m and m not in eligible:
            continue
        if m > lowest_diverged and m not in by_m:  # a higher LR than one that diverged: not worth a run
            decision.skipped.append(m)
            continue
        kind = RETRY if m in retries else EXTENSION if m in extensions else GRID
        decision.next_runs += [(m, seed, kind) for seed in rules.seeds if (m, seed) not in done]
    if decision.next_runs or chosen is None:
        if not decision.next_runs and diverged and len(retries) < rules.retries:
            decision.next_runs = [(canonical(tried[0] / 2), seed, RETRY) for seed in rules.seeds]
        return decision

    best_steps = score(by_m[chosen], rules.mode)[0]
    remeasured = {(canonical(r["lr_multiplier"]), r["seed"]) for r in rows if r.get("search") == REMEASURE}
    for m in eligible:
        for r in by_m[m]:
            every, steps = r.get("eval_every_steps"), r.get("steps_to_target")
            res = resolution(every, steps) if r.get("reached_target") else None
            # the chosen multiplier's runs are fitted; another's matters if it could be faster
            contender = m == chosen or steps - every + 1 < best_steps if res is not None else False
            if contender and res > rules.precision and (m, r["seed"]) not in remeasured:
                decision.next_runs.append((m, r["seed"], REMEASURE))
    if decision.next_runs:
        return decision
    # a capped run only says it needs more steps than its cap: run it again (capped anew, or not
    # at all for the chosen multiplier) once that no longer says it loses
    capped = [(m, r) for m in eligible for r in by_m[m] if r.get("capped") and not r.get("reached_target")
              and (m == chosen or (r.get("step_cap") or 0) < best_steps)]
    unconfirmed = [seed for seed in rules.confirm if seed not in {r["seed"] for r in by_m[chosen]}]
    if capped:
        decision.next_runs = [(m, r["seed"], LONGER) for m, r in capped]
    elif edge and len(extensions) < rules.extensions:
        grid = rules.grid
        step = grid[-1] / grid[-2] if edge == "highest" else grid[0] / grid[1]
        decision.next_runs = [(canonical(chosen * step), seed, EXTENSION) for seed in rules.seeds]
    elif unconfirmed:  # last: confirming every winner on the way to an edge would cost a run each
        decision.next_runs = [(chosen, seed, CONFIRM) for seed in unconfirmed]
    return decision


def step_cap(rows: List[Dict], rules: Rules, multiplier: float) -> Optional[int]:
    """The most steps a new run at `multiplier` needs to show whether it can win: the cap times
    the chosen multiplier's median steps to target. None for the chosen multiplier itself, or
    before any multiplier reached the target."""
    if rules.cap is None:
        return None
    chosen = decide(rows, rules).chosen
    if chosen is None or canonical(multiplier) == chosen:
        return None
    steps = score(_by_multiplier(rows)[chosen], rules.mode)[0]
    return math.ceil(rules.cap * steps) if math.isfinite(steps) else None


def eval_every(rows: List[Dict], rules: Rules, steps_per_epoch: int, budget_steps: int,
               remeasure_of: Optional[Dict] = None) -> int:
    """Evaluation cadence of the next run at this batch (see the module docstring)."""
    if remeasure_of is not None:
        s, p = remeasure_of["steps_to_target"], rules.precision
        # the largest cadence whose resolution at s is within the precision, capped by evals_to_target
        return max(1, min(round(s / rules.evals_to_target), math.floor((p * s + p + 1) / (1 + p))))
    reached = [r["steps_to_target"] for r in effective(rows) if r.get("reached_target")]
    expected = min(reached) / 2 if reached else min(steps_per_epoch, budget_steps)
    return max(1, round(expected / rules.evals_to_target))
