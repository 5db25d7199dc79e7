"""The convergence study's report: how batch size drove steps, samples and time to the target.

Input is a study directory (study.json plus runs/<name>/metrics.jsonl, the runs' own files are
the source of truth). Output is a directory of PNGs (drawn by components.report_plots) and one
self-contained report.html (images embedded as data: URIs, inline CSS, opens from disk), and
optionally a W&B report object built from the same study. One study is the normal case; two or
more are overlaid (before/after a model change) with one colour and marker per study.

The study step (components.study) calls load_study/render after its runs; to rebuild a report
from saved results use `python -m pipelines.report STUDY [STUDY ...]`, which reads a study
(local or s3://) through its manifest (fetch_study).

Only runs with "selected": true stand for their batch size in the plots; the others (the LR
search's alternatives, and runs repeated with finer evaluations) appear faded in the steps plot
and in the run table. Diverged runs are labelled as such in the run table and in the plots.
"""

import base64
import html
import json
from pathlib import Path
from typing import Iterable, Optional

from components import storage
from components.errors import DataError
from components.report_plots import FIGURES, figures, fit_of, fmt, num, plus_minus, study_id, style, target
from components.run_store import MANIFEST, is_remote
from components.study import STUDY_FILE


# ---------------------------------------------------------------- loading

def load_study(study_dir) -> dict:
    """study.json with each run's metrics rows attached as run["metrics"] (a list of dicts).

    A run without a metrics file (a failed run) gets [] and a line in study["notes"]."""
    study_dir = Path(study_dir)
    path = study_dir / STUDY_FILE
    if not path.is_file():
        raise DataError(f"report: {path} does not exist (is {study_dir} a study directory?)")
    try:
        study = storage.read_json(path)
    except json.JSONDecodeError as exc:
        raise DataError(f"report: {path} is not valid JSON ({exc})") from None
    study["study_dir"] = str(study_dir)
    study["notes"] = list(study.get("notes") or [])
    for run in study.get("runs") or []:
        metrics_path = study_dir / (run.get("run_dir") or f"runs/{run.get('name')}") / "metrics.jsonl"
        run["metrics"], bad = _read_rows(metrics_path)
        if not metrics_path.is_file():
            study["notes"].append(f"run {run.get('name')}: no metrics file (status: {run.get('status') or 'unknown'}); "
                                  "left out of the curves")
        elif bad:
            study["notes"].append(f"run {run.get('name')}: skipped {bad} unreadable line(s) in metrics.jsonl")
    return study


def fetch_study(store, local_dir: Path) -> Path:
    """A published study's study.json and its runs' metrics.jsonl, through the study's manifest
    (each file verified), into local_dir, for load_study. `store`: the study's RunStore."""
    manifest = store.read_manifest()
    if manifest is None:
        if not is_remote(store.uri) and not Path(store.uri).exists():
            raise DataError(f"report: {store.uri} does not exist (is it a study directory?)")
        raise DataError(f"report: {store.uri} is not a published study (no {MANIFEST}: it is still running, "
                        "failed, or is not a study's directory)")
    if STUDY_FILE not in manifest["files"]:
        raise DataError(f"report: {store.uri} is a run, not a study (its manifest lists no {STUDY_FILE})")
    metrics = [k for k in manifest["files"] if k.startswith("runs/") and k.endswith("/metrics.jsonl")]
    store.fetch(local_dir, [STUDY_FILE, *metrics])
    return Path(local_dir)


def _read_rows(path: Path) -> tuple:
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # e.g. a half-written last line of a killed run
                bad += 1
    return rows, bad


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em} .answer{background:#f3f8ff;border-left:4px solid #1f77b4;padding:.6em 1em;margin:1em 0}
.answer ul{margin:.3em 0} .note{color:#8a5a00;font-size:.9em} .error{color:#b00020}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0 1.2em} th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} tr.faded td{color:#999} tr.diverged td{color:#b00020}
figure{margin:1.2em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.9em}
"""

BATCH_COLUMNS = ("batch", "lr", "reached / seeds", "steps to target", "samples to target",
                 "epochs to target", "time to target (s)", "test metric", "regime", "LR search: tried (chosen)",
                 "bracketed")
RUN_COLUMNS = ("run", "selected", "batch", "micro-batch", "accum.", "lr", "lr x", "seed", "search", "eval every",
               "status", "reached", "steps to target", "samples to target", "epochs to target", "time to target (s)",
               "best metric", "test metric", "stop reason", "optimizer steps", "samples seen", "wall time (s)",
               "s / step (warm)", "B_simple", "rows")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(columns: Iterable[str], rows: Iterable[tuple], left: int = 1) -> str:
    """rows: (cells, css class); the first `left` columns are left-aligned text."""
    head = "".join(f'<th class="l">{_e(c)}</th>' if j < left else f"<th>{_e(c)}</th>" for j, c in enumerate(columns))
    body = []
    for cells, cls in rows:
        tds = "".join(f'<td class="l">{_e(c)}</td>' if j < left else f"<td>{_e(c)}</td>" for j, c in enumerate(cells))
        body.append(f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _med(stats) -> str:
    stats = stats or {}
    lo, hi = num(stats.get("min")), num(stats.get("max"))
    rng = f" [{fmt(lo)}–{fmt(hi)}]" if lo is not None and hi is not None and lo != hi else ""
    return fmt(stats.get("median")) + rng


def _fit_html(study: dict) -> str:
    fit = study.get("fit")
    if not fit:
        return "<p>No fit in this study.</p>"
    if fit.get("error") or not fit_of(study):
        return f'<p class="error">Fit failed: {_e(fit.get("error") or "no S_min / B_crit in the fit")}</p>'
    return ("<p>" + " &nbsp;·&nbsp; ".join(_e(t) for t in (
        f"S_min = {plus_minus(fit.get('s_min'), fit.get('s_min_err'))} steps",
        f"E_min = {plus_minus(fit.get('e_min'), fit.get('e_min_err'))} samples",
        f"B_crit = E_min / S_min = {plus_minus(fit.get('b_crit'), fit.get('b_crit_err'))}",
        f"from {fmt(fit.get('n_points'))} points")) +
        "<br><span class=\"meta\">Model S = S_min (1 + B_crit / B), E = E_min (1 + B / B_crit) "
        "(McCandlish et al. 2018).</span></p>")


def _probe_html(study: dict) -> str:
    probe = study.get("probe")
    if not probe:
        return ""
    return "<p>" + _e(f"Probe: B_simple = {plus_minus(probe.get('b_simple'), probe.get('b_simple_spread'))}, "
                      f"recommended batch {fmt(probe.get('recommended_batch'))}, "
                      f"largest micro-batch that fits {fmt(probe.get('max_micro_batch_size'))}.") + "</p>"


def _search_cells(b: dict) -> tuple:
    """(multipliers tried with the chosen one in brackets, marked d where a run diverged; bracketed)."""
    search = b.get("lr_search") or {}
    if not search:
        return "–", "–"
    runs_diverged = set(search.get("diverged") or [])
    tried = []
    for m in search.get("tried") or []:
        text = f"x{m:g}" + (" d" if any(f"-lr{m:g}x-" in n for n in runs_diverged) else "")
        tried.append(f"[{text}]" if m == search.get("chosen") else text)
    bracketed = search.get("bracketed")
    edge = f"no: best at the {search['edge']} tried" if bracketed is False and search.get("edge") else fmt(bracketed)
    return " ".join(tried) or "–", ("– (one LR)" if bracketed is None else edge)


def _batch_rows(study: dict) -> list:
    rows = []
    for b in study.get("batches") or []:
        test = b.get("test_metric") or {}
        rows.append(((fmt(b.get("batch_size")), fmt(b.get("lr")),
                      f"{fmt(b.get('reached'))} / {fmt(b.get('seeds'))}", _med(b.get("steps_to_target")),
                      _med(b.get("samples_to_target")), _med(b.get("epochs_to_target")),
                      _med(b.get("time_to_target_s")), plus_minus(test.get("mean"), test.get("std")),
                      b.get("regime") or "–") + _search_cells(b), ""))
    return rows


def _run_rows(study: dict) -> list:
    keys = ("batch_size", "micro_batch_size", "accumulation_steps", "lr", "lr_multiplier", "seed", "search",
            "eval_every_steps", "status", "reached_target", "steps_to_target", "samples_to_target",
            "epochs_to_target", "time_to_target_s", "best_metric", "test_metric", "stop_reason", "optimizer_steps",
            "samples_seen", "wall_time_s", "seconds_per_step", "gns_b_simple")
    rows = []
    for r in study.get("runs") or []:
        selected = r.get("selected", True)
        cells = (r.get("name"), "superseded" if r.get("superseded") else fmt(bool(selected))) + tuple(
            fmt(r.get(k)) if r.get(k) is not None else "–" for k in keys) + (len(r.get("metrics") or []),)
        rows.append((cells, "diverged" if r.get("status") == "diverged" else "" if selected else "faded"))
    return rows


def _study_header(study: dict, i: int) -> str:
    t = target(study)
    meta = " · ".join(f"{k}: {study[k]}" for k in ("model", "data", "data_version", "device", "created")
                      if study.get(k) is not None)
    answers = "".join(f"<li>{_e(a)}</li>" for a in study.get("answer") or []) or "<li>(no answer in study.json)</li>"
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in study.get("notes") or [])
    return (f'<div class="answer" style="border-left-color:{style(i)["color"]}"><strong>{_e(study_id(study, i))}</strong> '
            f'<span class="meta">target {_e(t["metric"])} {_e("≥" if t["mode"] == "max" else "≤")} '
            f'{_e(fmt(t["value"]))}{" · " + _e(meta) if meta else ""}</span><ul>{answers}</ul>{notes}</div>')


def render(studies, out_dir, title: Optional[str] = None) -> Path:
    """Write the five PNGs and report.html into out_dir; return the html path.

    `studies`: one study dict (from load_study) or a list of them; two or more are overlaid."""
    studies = [studies] if isinstance(studies, dict) else list(studies)
    if not studies:
        raise DataError("report: no study to render")
    out_dir = Path(out_dir)
    ids = [study_id(s, i) for i, s in enumerate(studies)]
    title = title or ("Convergence study " + ids[0] if len(ids) == 1 else "Convergence studies " + " vs ".join(ids))
    images = figures(studies)
    for name, data in images.items():
        with storage.atomic_file(out_dir / name, "wb") as f:
            f.write(data)

    many = len(studies) > 1
    parts = [f"<h1>{_e(title)}</h1>", "".join(_study_header(s, i) for i, s in enumerate(studies)),
             "<h2>Fit: critical batch size</h2>"]
    for i, s in enumerate(studies):
        parts.append((f"<h3>{_e(ids[i])}</h3>" if many else "") + _fit_html(s) + _probe_html(s))
    parts.append("<h2>Per batch size (selected learning rate)</h2><p class=\"meta\">LR search: multipliers of the "
                 "scaled LR tried at each batch, the chosen one in brackets, d where a run diverged. A diverged run "
                 "is never chosen; when every LR tried diverged the batch is retried at half the lowest, at most "
                 "study.divergence_retries times. A choice at the edge of those tried is not bracketed.</p>")
    for i, s in enumerate(studies):
        parts.append((f"<h3>{_e(ids[i])}</h3>" if many else "") + _table(BATCH_COLUMNS, _batch_rows(s), left=0))
    parts.append("<h2>Figures</h2>")
    for name, caption in FIGURES.items():
        data = base64.b64encode(images[name]).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_e(name)}">'
                     f"<figcaption>{_e(name)}: {_e(caption)}</figcaption></figure>")
    parts.append("<h2>All runs</h2><p class=\"meta\">Faded rows: learning-rate alternatives not selected for their "
                 "batch size, and runs repeated with finer evaluations (superseded). Red rows: diverged, left out "
                 "of the fit. Medians in the per-batch table are over the selected runs' seeds.</p>")
    for i, s in enumerate(studies):
        parts.append((f"<h3>{_e(ids[i])}</h3>" if many else "") + _table(RUN_COLUMNS, _run_rows(s)))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = out_dir / "report.html"
    storage.write_text(path, page)
    return path


# ---------------------------------------------------------------- W&B

def wandb_report(study: dict, project: str, entity: Optional[str] = None):
    """A wandb_workspaces Report (built, not saved) with the study's answer and its curves.

    The runset selects the W&B runs of the study's group (study["wandb_group"], else the study
    id). Building needs no network or API key; `report.save()` does, and needs `entity` (an
    empty entity is kept when None so that nothing asks the server for the default one)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    sid, t = study_id(study), target(study)
    metric = t["metric"]

    def runset() -> "wr.Runset":
        return wr.Runset(entity=entity or "", project=project, name=f"study {sid}",
                         filters=expr.And(expr.Metric("Group") == (study.get("wandb_group") or sid)))

    def plot(x: str, y: str, title: str, col: int, row: int, **kw) -> "wr.LinePlot":
        return wr.LinePlot(x=x, y=[y], title=title, title_x=x, title_y=y,
                           layout=wr.Layout(x=12 * col, y=8 * row, w=12, h=8), **kw)

    fit = study.get("fit") or {}
    if not fit:
        fit_line = "No fit in this study."
    elif not fit_of(study):
        fit_line = f"Fit failed: {fit.get('error') or 'no S_min / B_crit in the fit'}"
    else:
        fit_line = (f"S_min = {plus_minus(fit.get('s_min'), fit.get('s_min_err'))} steps, "
                    f"E_min = {plus_minus(fit.get('e_min'), fit.get('e_min_err'))} samples, "
                    f"B_crit = {plus_minus(fit.get('b_crit'), fit.get('b_crit_err'))}")
    table = ["| batch | lr | reached / seeds | steps | samples | time (s) | regime |", "|---|---|---|---|---|---|---|"]
    for cells, _ in _batch_rows(study):
        table.append("| " + " | ".join(str(c) for c in (cells[0], cells[1], cells[2], cells[3], cells[4],
                                                          cells[6], cells[8])) + " |")
    answer = "\n".join(f"- {a}" for a in study.get("answer") or []) or "- (no answer in study.json)"
    goal = f"{metric} {'>=' if t['mode'] == 'max' else '<='} {fmt(t['value'])}"
    return wr.Report(
        project=project, entity=entity or "", title=f"Convergence study {sid}"[:128],
        description=f"How batch size drives convergence to {goal} ({study.get('model')} on {study.get('data')}).",
        blocks=[
            wr.H2(text="Answer"),
            wr.MarkdownBlock(text=answer),
            wr.H2(text="Fit and per-batch results"),
            wr.MarkdownBlock(text=fit_line + "\n\n" + "\n".join(table)),
            wr.H2(text="Convergence"),
            wr.PanelGrid(runsets=[runset()], panels=[
                plot("samples_seen", metric, f"{metric} vs samples seen", 0, 0),
                plot("wall_time_s", metric, f"{metric} vs wall time", 1, 0),
            ]),
            wr.H2(text="Noise scale and training loss"),
            wr.PanelGrid(runsets=[runset()], panels=[
                plot("samples_seen", "gns/b_simple", "gradient noise scale B_simple", 0, 0, log_y=True),
                plot("samples_seen", "train/loss", "train/loss vs samples seen", 1, 0, log_y=True),
            ]),
        ],
    )
