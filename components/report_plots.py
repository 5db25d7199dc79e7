"""The convergence study's figures: how batch size drove steps, samples and time to the target.

Plain functions over study dicts (components.report.load_study) that return matplotlib Figures,
drawn on the Agg backend without pyplot's global state. `figures(studies)` gives the PNG bytes
of the five figures named in FIGURES; components.report embeds them in report.html. Two or more
studies are overlaid with one colour and marker per study.

The small study accessors (study_id, target, fit_of, style, fmt, plus_minus, num) live here
because the figures need them first; the HTML and W&B reports use the same ones.
"""

import io
import math
from statistics import median
from typing import Iterable, Optional

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

FIGURES = {  # file name -> caption; the file names are part of the contract
    "steps_to_target.png": "Optimizer steps to the target against batch size (log-log).",
    "samples_to_target.png": "Samples and epochs to the target against batch size.",
    "metric_vs_samples.png": "Monitored validation metric against samples seen.",
    "metric_vs_time.png": "Monitored validation metric against wall-clock time.",
    "noise_scale.png": "Gradient noise scale B_simple measured during training.",
}
STUDY_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
STUDY_MARKERS = ("o", "s", "^", "D", "v", "P")
STUDY_LINES = ("-", ":", "-.", (0, (1, 3)))  # dashed stays free for targets and the probe
B_CRIT_LINE = (0, (6, 2, 1, 2, 1, 2))
BATCH_CMAP = "viridis"
DIVERGED_COLOR = "#b00020"


# ---------------------------------------------------------------- study accessors and formatting

def num(value) -> Optional[float]:
    """A finite float, or None for None / NaN / inf / anything not a number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def fmt(value, digits: int = 4) -> str:
    """A table/legend cell: thousands separators for integers, `digits` significant digits else, – for missing."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    x = num(value)
    if x is None:
        return "–" if value is None or isinstance(value, (int, float)) else str(value)
    if x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def plus_minus(value, err) -> str:
    """The value, with " ± err" when the error is known."""
    return fmt(value) + (f" ± {fmt(err, 2)}" if num(err) is not None else "")


def target(study: dict) -> dict:
    """The study's target as {"metric", "value", "mode"}, with defaults for missing keys."""
    target = study.get("target") or {}
    return {"metric": target.get("metric") or "val/loss", "value": num(target.get("value")),
            "mode": target.get("mode") or "max"}


def study_id(study: dict, i: int = 0) -> str:
    """The study's id, or "study <i+1>" for a study.json without one."""
    return str(study.get("study_id") or f"study {i + 1}")


def fit_of(study: dict) -> Optional[dict]:
    """The fit's numbers when it succeeded, else None."""
    fit = study.get("fit") or {}
    s_min, b_crit = num(fit.get("s_min")), num(fit.get("b_crit"))
    return None if fit.get("error") or not (s_min and s_min > 0 and b_crit and b_crit > 0) else fit


def style(i: int) -> dict:
    """Colour, marker and line style of the i-th study in an overlay."""
    return {"color": STUDY_COLORS[i % len(STUDY_COLORS)], "marker": STUDY_MARKERS[i % len(STUDY_MARKERS)],
            "linestyle": STUDY_LINES[i % len(STUDY_LINES)]}


# ---------------------------------------------------------------- plot helpers

def _selected(study: dict) -> list:
    return [r for r in study.get("runs") or [] if r.get("selected", True)]


def _diverged(study: dict) -> list:
    return [r for r in study.get("runs") or [] if r.get("status") == "diverged"]


def _series(rows: Iterable[dict], x_key: str, y_key: str) -> tuple:
    pts = [(num(r.get(x_key)), num(r.get(y_key))) for r in rows]
    pts = sorted((x, y) for x, y in pts if x is not None and y is not None)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _medians(study: dict, key: str) -> tuple:
    """Per-batch medians of `key` from study["batches"], or from the selected runs if absent."""
    points = {}
    for b in study.get("batches") or []:
        m = num((b.get(key) or {}).get("median"))
        if num(b.get("batch_size")) and m is not None:
            points[num(b["batch_size"])] = m
    if not points:
        by_batch = {}
        for r in _selected(study):
            if r.get("reached_target") and num(r.get("batch_size")) and num(r.get(key)) is not None:
                by_batch.setdefault(num(r["batch_size"]), []).append(num(r[key]))
        points = {b: median(v) for b, v in by_batch.items()}
    xs = sorted(points)
    return np.array(xs), np.array([points[x] for x in xs])


def _run_points(runs: list, key: str) -> tuple:
    pts = [(num(r.get("batch_size")), num(r.get(key))) for r in runs if r.get("reached_target")]
    pts = [(b, v) for b, v in pts if b and v is not None]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _batch_norm(studies: list) -> LogNorm:
    sizes = [num(r.get("batch_size")) for s in studies for r in _selected(s)]
    sizes = [b for b in sizes if b and b > 0] or [1.0]
    lo, hi = min(sizes), max(sizes)
    return LogNorm(vmin=lo / 1.5 if lo == hi else lo, vmax=hi * 1.5 if lo == hi else hi)


def _empty(ax, text: str, title: str = "") -> None:
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)


def _plain_ticks(axis) -> None:
    """Plain tick labels on a log axis (32, 64, 128 rather than 2^5; mathtext is also slow)."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _log_axes(ax, x: bool = True, y: bool = False) -> None:
    if x:
        ax.set_xscale("log", base=2)
        _plain_ticks(ax.xaxis)
    if y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        _plain_ticks(ax.yaxis)


def _new_figure(width: float = 8.0, height: float = 5.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    return fig


# ---------------------------------------------------------------- figures

def plot_steps(studies: list) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    metric = target(studies[0])
    drawn, single = False, len(studies) == 1
    all_b = [b for s in studies for b in _run_points(s.get("runs") or [], "steps_to_target")[0]]
    for i, study in enumerate(studies):
        st, sid = style(i), study_id(study, i)
        others = [r for r in study.get("runs") or [] if not r.get("selected", True)]
        bx, by = _run_points(others, "steps_to_target")
        if len(bx):
            ax.scatter(bx, by, marker=st["marker"], facecolors="none", edgecolors=st["color"], alpha=0.3,
                       label=f"{sid}: other LRs (not selected)")
        bx, by = _run_points(_selected(study), "steps_to_target")
        if len(bx):
            ax.scatter(bx, by, marker=st["marker"], color=st["color"], alpha=0.45, label=f"{sid}: runs")
        gone = [b for r in _diverged(study) if (b := num(r.get("batch_size")))]
        if gone:  # no steps to target: marked along the bottom edge at their batch size
            ax.scatter(gone, [0.03 + 0.04 * i] * len(gone), marker="x", color=DIVERGED_COLOR, s=60, zorder=5,
                       transform=ax.get_xaxis_transform(), label=f"{sid}: diverged runs ({len(gone)}, not fitted)")
        fit = fit_of(study)
        if not fit and (study.get("fit") or {}).get("error"):
            ax.text(0.02, 0.02 + 0.06 * i, f"{sid}: fit failed: {study['fit']['error']}", transform=ax.transAxes,
                    fontsize=8, color=st["color"], va="bottom")
        mx, my = _medians(study, "steps_to_target")
        if not len(mx):
            continue
        drawn = True
        ax.plot(mx, my, marker=st["marker"], color=st["color"], linestyle="-", lw=2, ms=8, label=f"{sid}: median")
        if single:
            regimes = {num(b.get("batch_size")): b.get("regime") for b in study.get("batches") or []}
            for x, y in zip(mx, my):
                if regimes.get(x):
                    ax.annotate(str(regimes[x]), (x, y), textcoords="offset points", xytext=(6, 8),
                                fontsize=8, color="0.3")
        ax.plot(mx, my[0] * mx[0] / mx, color="0.45" if single else st["color"], alpha=0.7, linestyle=":", lw=1.5,
                label="perfect scaling S ∝ 1/B" + ("" if single else f" ({sid})"))
        if fit:
            s_min, b_crit = num(fit["s_min"]), num(fit["b_crit"])
            grid = np.geomspace(min(all_b + [b_crit]) / 1.5, max(all_b + [b_crit]) * 1.5, 200)
            ax.plot(grid, s_min * (1 + b_crit / grid), color=st["color"], linestyle="--", lw=1.5,
                    label=f"{sid}: fit S_min(1 + B_crit/B), S_min = {fmt(s_min, 3)}")
            ax.axvline(b_crit, color=st["color"], linestyle=B_CRIT_LINE, lw=1.2,
                       label=f"{sid}: B_crit = {plus_minus(b_crit, fit.get('b_crit_err'))}")
            err = num(fit.get("b_crit_err"))
            if err:
                ax.axvspan(max(b_crit - err, b_crit / 10), b_crit + err, color=st["color"], alpha=0.12)
    if not drawn:
        _empty(ax, f"No selected run reached {metric['metric']} {fmt(metric['value'])}:\nno steps-to-target to plot.")
        return fig
    _log_axes(ax, x=True, y=True)
    ax.margins(x=0.08)
    ax.set_xlabel("effective batch size B (samples per optimizer step)")
    ax.set_ylabel("optimizer steps to target")
    ax.set_title(f"Steps to reach {metric['metric']} {fmt(metric['value'])}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _plot_samples(studies: list) -> Figure:
    fig = _new_figure(12, 5)
    axes = fig.subplots(1, 2)
    metric = target(studies[0])
    for ax, key, label in ((axes[0], "samples_to_target", "samples to target"),
                           (axes[1], "epochs_to_target", "epochs to target")):
        drawn = False
        for i, study in enumerate(studies):
            st, sid = style(i), study_id(study, i)
            bx, by = _run_points(_selected(study), key)
            if len(bx):
                ax.scatter(bx, by, marker=st["marker"], color=st["color"], alpha=0.45, label=f"{sid}: runs")
            mx, my = _medians(study, key)
            if len(mx):
                drawn = True
                ax.plot(mx, my, marker=st["marker"], color=st["color"], lw=2, ms=8, label=f"{sid}: median")
            fit = fit_of(study)
            if key == "samples_to_target" and fit and num(fit.get("e_min")) and len(mx):
                e_min, b_crit = num(fit["e_min"]), num(fit["b_crit"])
                grid = np.geomspace(mx.min() / 1.5, mx.max() * 1.5, 200)
                ax.plot(grid, e_min * (1 + grid / b_crit), color=st["color"], linestyle="--", lw=1.5,
                        label=f"{sid}: fit E_min(1 + B/B_crit), E_min = {fmt(e_min, 3)}")
        if not drawn:
            _empty(ax, f"No selected run reached the target:\nno {label} to plot.")
            continue
        _log_axes(ax, x=True)
        ax.set_xlabel("effective batch size B")
        ax.set_ylabel(label)
        ax.set_title(f"{label.capitalize()} ({metric['metric']} {fmt(metric['value'])})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _batch_curves(fig: Figure, ax, studies: list, x_key: str, y_of, norm: LogNorm) -> bool:
    """One line per selected run, coloured by batch size, line style per study; returns whether any was drawn."""
    colors = matplotlib.colormaps[BATCH_CMAP]
    drawn = False
    for i, study in enumerate(studies):
        linestyle = style(i)["linestyle"]
        for run in _selected(study):
            x, y = _series(run.get("metrics") or [], x_key, y_of(study))
            b = num(run.get("batch_size"))
            if len(x) and b:
                drawn = True
                ax.plot(x, y, color=colors(norm(b)), linestyle=linestyle, lw=1.6, marker=".", ms=4, alpha=0.9)
    if drawn:
        mappable = ScalarMappable(norm=norm, cmap=colors)
        bar = fig.colorbar(mappable, ax=ax, label="effective batch size B")
        bar.set_ticks(sorted({b for s in studies for r in _selected(s) if (b := num(r.get("batch_size"))) and b > 0}))
        _plain_ticks(bar.ax.yaxis)
    return drawn


def _study_legend(ax, studies: list, extra: list = ()) -> None:
    handles = list(extra)
    if len(studies) > 1:
        handles += [Line2D([], [], color="0.2", linestyle=style(i)["linestyle"], label=study_id(s, i))
                    for i, s in enumerate(studies)]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")


def _diverged_curves(ax, studies: list, x_key: str) -> list:
    """Diverged runs as thin red dashed lines, a cross where each stopped; the legend handle."""
    drawn = 0
    for study in studies:
        for run in _diverged(study):
            x, y = _series(run.get("metrics") or [], x_key, target(study)["metric"])
            if len(x):
                drawn += 1
                ax.plot(x, y, color=DIVERGED_COLOR, linestyle="--", lw=0.9, alpha=0.7)
                ax.plot(x[-1:], y[-1:], marker="x", color=DIVERGED_COLOR, ms=8)
    return [Line2D([], [], color=DIVERGED_COLOR, linestyle="--", marker="x",
                   label=f"diverged ({drawn} run{'s' if drawn != 1 else ''}, not fitted)")] if drawn else []


def plot_metric(studies: list, x_key: str, x_label: str) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    metric = target(studies[0])
    if not _batch_curves(fig, ax, studies, x_key, lambda s: target(s)["metric"], _batch_norm(studies)):
        _empty(ax, f"No run logged {metric['metric']} (no metrics files were found).")
        return fig
    extra = _diverged_curves(ax, studies, x_key)
    for value in sorted({target(s)["value"] for s in studies if target(s)["value"] is not None}):
        ax.axhline(value, color="black", linestyle="--", lw=1.2)
        extra.append(Line2D([], [], color="black", linestyle="--", label=f"target {metric['metric']} = {fmt(value)}"))
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric["metric"])
    ax.set_title(f"{metric['metric']} against {x_label.split(' (')[0]}, one line per selected run")
    ax.grid(True, alpha=0.3)
    _study_legend(ax, studies, extra)
    return fig


def plot_noise(studies: list) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    probes = [(i, s, s.get("probe") or {}) for i, s in enumerate(studies)]
    probe_text = "; ".join(f"{study_id(s, i)}: probe B_simple = {plus_minus(p.get('b_simple'), p.get('b_simple_spread'))}"
                           for i, s, p in probes if num(p.get("b_simple")) is not None)
    if not _batch_curves(fig, ax, studies, "samples_seen", lambda s: "gns/b_simple", _batch_norm(studies)):
        _empty(ax, "No measurements: no selected run recorded the gradient noise scale (gns/b_simple)\n"
                   "in its metrics.jsonl (train.track_noise_scale=false, or batches too small to split)."
                   + (f"\n\n{probe_text}" if probe_text else ""), "Gradient noise scale during training")
        return fig
    extra = []
    for i, study, probe in probes:
        st, b_simple = style(i), num(probe.get("b_simple"))
        if b_simple and b_simple > 0:
            ax.axhline(b_simple, color=st["color"], linestyle="--", lw=1.5)
            spread = num(probe.get("b_simple_spread"))
            if spread:
                ax.axhspan(max(b_simple - spread, b_simple / 10), b_simple + spread, color=st["color"], alpha=0.1)
            extra.append(Line2D([], [], color=st["color"], linestyle="--",
                                label=f"{study_id(study, i)}: probe B_simple = {plus_minus(b_simple, spread)}"))
        fit = fit_of(study)
        if fit:
            ax.axhline(num(fit["b_crit"]), color=st["color"], linestyle=B_CRIT_LINE, lw=1.5)
            extra.append(Line2D([], [], color=st["color"], linestyle=B_CRIT_LINE,
                                label=f"{study_id(study, i)}: fitted B_crit = {fmt(fit['b_crit'])}"))
    _log_axes(ax, x=False, y=True)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("B_simple = tr(Σ) / |G|²  (samples)")
    ax.set_title("Gradient noise scale during training")
    ax.grid(True, which="both", alpha=0.3)
    _study_legend(ax, studies, extra)
    return fig


def figures(studies: list) -> dict:
    """PNG bytes per file name of FIGURES, in that order; two or more studies are overlaid."""
    makers = {
        "steps_to_target.png": lambda: plot_steps(studies),
        "samples_to_target.png": lambda: _plot_samples(studies),
        "metric_vs_samples.png": lambda: plot_metric(studies, "samples_seen", "samples seen"),
        "metric_vs_time.png": lambda: plot_metric(studies, "wall_time_s", "wall-clock time (s)"),
        "noise_scale.png": lambda: plot_noise(studies),
    }
    return {name: _png_bytes(makers[name]()) for name in FIGURES}


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
