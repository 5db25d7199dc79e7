"""The study report: PNGs, a self-contained report.html, overlays, a failed fit, the W&B report object,
and `python -m pipelines.report` rebuilding reports from saved study directories."""

import base64
import html
import io
import json
import math
import re
import socket

import numpy as np
import pytest
from PIL import Image

from components import report, report_plots
from components.run_store import RunStore
from components.errors import DataError
from pipelines import report as report_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BATCHES = (32, 64, 128, 256)
S_MIN, B_CRIT, E_MIN = 40.0, 200.0, 8000.0
ANSWER = ["batch 128 reaches val/accuracy >= 0.95 in 0.6 s (fastest) & <b>cheapest</b>.",
          "batch 32 needs the fewest samples: 5,000."]


def _steps(batch: int) -> float:
    return S_MIN * (1 + B_CRIT / batch)


def _write_run(study_dir, name, batch, lr, seed, accumulation=1, with_metrics=True, scale=1.0):
    """A run whose accuracy rises with samples seen; reaches 0.95 near the fitted steps-to-target."""
    steps = int(round(_steps(batch) * scale * (1 + 0.05 * seed)))
    run = {"name": name, "run_dir": f"runs/{name}", "batch_size": batch, "micro_batch_size": batch // accumulation,
           "accumulation_steps": accumulation, "lr": lr, "lr_multiplier": lr / 0.1, "seed": seed,
           "status": "completed" if with_metrics else "failed", "reached_target": with_metrics,
           "steps_to_target": steps if with_metrics else None,
           "samples_to_target": steps * batch if with_metrics else None,
           "epochs_to_target": steps * batch / 1200 if with_metrics else None,
           "time_to_target_s": steps * 0.004 if with_metrics else None, "best_metric": 0.97, "test_metric": 0.96,
           "stop_reason": "target" if with_metrics else "error", "optimizer_steps": steps,
           "samples_seen": steps * batch, "wall_time_s": steps * 0.004,
           "gns_b_simple": 180.0 if accumulation > 1 else None, "selected": True}
    if not with_metrics:
        return run
    rows = []
    tau = steps * batch / math.log(0.9 / 0.05)  # accuracy 1 - 0.9 exp(-samples / tau) hits 0.95 at `steps`
    for step in range(0, steps + 1, max(1, steps // 20)):
        base = {"step": step, "samples_seen": step * batch, "epoch": step * batch / 1200,
                "wall_time_s": step * 0.004}
        train = {**base, "train/loss": 2.3 * math.exp(-step * batch / tau) + 0.05, "lr": lr}
        if accumulation > 1 and step % 2 == 0:
            train["gns/b_simple"] = float("nan") if step == 0 else 150.0 + step
        rows += [train, {**base, "val/accuracy": 1 - 0.9 * math.exp(-step * batch / tau),
                         "val/loss": None if step == 0 else 1.0 / (1 + step)}]
    path = study_dir / "runs" / name / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _stats(values):
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def make_study(root, study_id="s1", fit_error=None, gns=True, scale=1.0):
    study_dir = root / study_id
    runs = []
    for batch in BATCHES:
        for seed in (0, 1):
            runs.append(_write_run(study_dir, f"b{batch:04d}-lr1x-s{seed}", batch, 0.1 * batch / 64, seed,
                                   accumulation=2 if gns and batch == 256 and seed == 0 else 1,
                                   with_metrics=not (batch == 256 and seed == 1), scale=scale))
    alt = _write_run(study_dir, "b0064-lr2x-s0", 64, 0.2, 0, scale=scale * 1.3)
    runs.append({**alt, "selected": False})
    batches = []
    for batch in BATCHES:
        mine = [r for r in runs if r["batch_size"] == batch and r["selected"] and r["reached_target"]]
        batches.append({
            "batch_size": batch, "lr": 0.1 * batch / 64, "lr_multiplier": batch / 64, "seeds": 2, "reached": len(mine),
            **{k: _stats([r[k] for r in mine]) for k in
               ("steps_to_target", "samples_to_target", "epochs_to_target", "time_to_target_s")},
            "test_metric": {"mean": 0.96, "std": 0.004},
            "regime": "perfect scaling" if batch < B_CRIT else "diminishing returns"})
    fit = ({"s_min": None, "s_min_err": None, "e_min": None, "e_min_err": None, "b_crit": None,
            "b_crit_err": None, "n_points": 3, "error": fit_error} if fit_error else
           {"s_min": S_MIN * scale, "s_min_err": 4.0, "e_min": E_MIN * scale, "e_min_err": 900.0,
            "b_crit": B_CRIT, "b_crit_err": 30.0, "n_points": 7, "error": None})
    study = {"study_id": study_id, "created": "2026-11-27T15:00:00Z",
             "target": {"metric": "val/accuracy", "value": 0.95, "mode": "max"},
             "model": "mlp", "data": "digits", "data_version": "abc123", "device": "cpu (2 threads)",
             "runs": runs, "batches": batches, "fit": fit,
             "probe": {"b_simple": 180.0, "b_simple_spread": 40.0, "recommended_batch": 128,
                       "max_micro_batch_size": 1259},
             "best": {"time": {"batch_size": 128, "time_to_target_s": 0.6},
                      "samples": {"batch_size": 32, "samples_to_target": 5000}},
             "answer": [f"[{study_id}] {a}" for a in ANSWER]}
    (study_dir / "study.json").write_text(json.dumps(study))
    RunStore.open(str(study_dir)).seal({"kind": "study"})  # published, as the study's report step does
    return study_dir


def embedded_pngs(page: str) -> list:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_load_study_attaches_metrics_and_notes_the_missing_file(tmp_path):
    study = report.load_study(make_study(tmp_path))
    by_name = {r["name"]: r for r in study["runs"]}
    assert by_name["b0256-lr1x-s1"]["metrics"] == []
    assert any("b0256-lr1x-s1" in n and "no metrics file" in n for n in study["notes"])
    assert len(by_name["b0032-lr1x-s0"]["metrics"]) == 42  # 21 evaluations, a train and a val row each
    assert math.isnan(by_name["b0256-lr1x-s0"]["metrics"][0]["gns/b_simple"])
    with pytest.raises(DataError, match="study.json does not exist"):
        report.load_study(tmp_path / "nowhere")


def test_render_writes_a_self_contained_report(tmp_path):
    out = tmp_path / "out"
    path = report.render([report.load_study(make_study(tmp_path))], out)
    assert path == out / "report.html"
    page = path.read_text()
    for line in ("[s1] " + a for a in ANSWER):
        assert html.escape(line) in page
    assert "<b>cheapest</b>" not in page  # escaped, not markup
    assert "no metrics file" in page and "b0256-lr1x-s1" in page  # the failed run is named
    assert html.escape("B_crit = E_min / S_min = 200 ± 30") in page
    assert "perfect scaling" in page and "diminishing returns" in page  # per-batch regimes
    assert not re.findall(r'(?:src|href)="(?!data:)', page)  # no external assets

    images = embedded_pngs(page)
    assert len(images) == len(report_plots.FIGURES) == 5
    for name, data in zip(report_plots.FIGURES, images):
        assert data.startswith(PNG_SIGNATURE)
        assert (out / name).read_bytes() == data  # the page embeds exactly the written files
        with Image.open(io.BytesIO(data)) as img:
            assert img.size[0] >= 600 and img.size[1] >= 400


def _labels(fig):
    return [line.get_label() for ax in fig.axes for line in ax.get_lines()]


def test_steps_plot_draws_medians_fit_and_perfect_scaling(tmp_path):
    study = report.load_study(make_study(tmp_path))
    ax = report_plots.plot_steps([study]).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    median = lines["s1: median"]
    np.testing.assert_allclose(median.get_xdata(), BATCHES)
    expected = [b["steps_to_target"]["median"] for b in study["batches"]]
    np.testing.assert_allclose(median.get_ydata(), expected)
    fit = next(line for label, line in lines.items() if label.startswith("s1: fit S_min(1 + B_crit/B)"))
    x = np.asarray(fit.get_xdata())
    np.testing.assert_allclose(fit.get_ydata(), S_MIN * (1 + B_CRIT / x))
    perfect = lines["perfect scaling S ∝ 1/B"]
    np.testing.assert_allclose(np.asarray(perfect.get_ydata()) * BATCHES, expected[0] * BATCHES[0])
    assert "s1: B_crit = 200 ± 30" in lines
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_overlay_of_two_studies_names_both(tmp_path, capsys):
    dirs = [make_study(tmp_path / "old", "before"), make_study(tmp_path / "new", "after", scale=0.7)]
    assert report_cli.main([str(d) for d in dirs] + ["--title", "before & after"]) == 0
    path = tmp_path / "report-before-vs-after" / "report.html"  # the default; the conftest made tmp_path the cwd
    assert capsys.readouterr().out.strip() == str(path)
    assert not any((d / "report.html").exists() for d in dirs)  # neither study's own report is touched
    page = path.read_text()
    assert "<h1>before &amp; after</h1>" in page
    assert "<strong>before</strong>" in page and "<strong>after</strong>" in page
    assert html.escape("[before] " + ANSWER[0]) in page and html.escape("[after] " + ANSWER[0]) in page
    assert page.index("[before]") < page.index("<h2>")  # the answers lead the page
    assert len(embedded_pngs(page)) == 5

    before, after = (report.load_study(d) for d in dirs)
    steps = _labels(report_plots.plot_steps([before, after]))
    assert "before: median" in steps and "after: median" in steps
    legend = report_plots.plot_metric([before, after], "samples_seen", "samples seen").axes[0].get_legend()
    assert {"before", "after"} <= {t.get_text() for t in legend.get_texts()}


def test_failed_fit_still_renders_and_shows_the_error(tmp_path):
    study = report.load_study(make_study(tmp_path, fit_error="only 2 batch sizes reached the target"))
    page = report.render([study], tmp_path / "out").read_text()
    assert "Fit failed: only 2 batch sizes reached the target" in page
    assert not any("fit" in label for label in _labels(report_plots.plot_steps([study])))
    assert len(embedded_pngs(page)) == 5


def test_noise_plot_explains_when_no_run_measured_the_noise_scale(tmp_path):
    with_gns = report.load_study(make_study(tmp_path))
    ax = report_plots.plot_noise([with_gns]).axes[0]
    assert ax.get_yscale() == "log"
    assert any(line.get_ydata()[0] == 180.0 for line in ax.get_lines())  # the probe's B_simple line
    without = report.load_study(make_study(tmp_path, "nogns", gns=False))
    texts = [t.get_text() for t in report_plots.plot_noise([without]).axes[0].texts]
    assert any(t.startswith("No measurements") and "probe B_simple = 180 ± 40" in t for t in texts)
    # measurements in evaluation rows (where the trainer writes them) are drawn, one line per run
    study = report.load_study(make_study(tmp_path, "evalrows", gns=False))
    run = study["runs"][0]
    run["metrics"] = [{**r, "gns/b_simple": 100.0 + r["step"]} for r in run["metrics"] if "val/accuracy" in r]
    ax = report_plots.plot_noise([study]).axes[0]
    drawn = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]
    assert len(drawn) == 1 and not ax.texts
    np.testing.assert_allclose(drawn[0].get_ydata(), [100.0 + r["step"] for r in run["metrics"]])


def test_diverged_runs_are_labelled_in_the_tables_and_the_plots(tmp_path):
    study_dir = make_study(tmp_path)
    study = json.loads((study_dir / "study.json").read_text())
    gone = _write_run(study_dir, "b0128-lr4x-s0", 128, 0.8, 0, scale=2.0)
    gone.update(status="diverged", selected=False, reached_target=False, steps_to_target=None,
                divergence={"rule": "collapse", "step": 12, "lr": 0.8})
    study["runs"].append(gone)
    study["batches"][2]["lr_search"] = {"tried": [1.0, 2.0, 4.0], "chosen": 2.0, "bracketed": True, "edge": None,
                                        "diverged": ["b0128-lr4x-s0"]}
    study["batches"][0]["lr_search"] = {"tried": [0.5, 1.0], "chosen": 1.0, "bracketed": False,
                                        "edge": "highest", "diverged": []}
    (study_dir / "study.json").write_text(json.dumps(study))
    loaded = report.load_study(study_dir)
    page = report.render([loaded], tmp_path / "out").read_text()
    row = re.search(r'<tr class="diverged"><td class="l">b0128-lr4x-s0</td>.*?</tr>', page).group(0)
    assert "<td>diverged</td>" in row
    assert "<td>x1 [x2] x4 d</td><td>yes</td>" in page
    assert "<td>x0.5 [x1]</td><td>no: best at the highest tried</td>" in page
    steps = {line.get_label() for line in report_plots.plot_steps([loaded]).axes[0].collections}
    assert "s1: diverged runs (1, not fitted)" in steps
    legend = report_plots.plot_metric([loaded], "samples_seen", "samples seen").axes[0].get_legend()
    assert "diverged (1 run, not fitted)" in {t.get_text() for t in legend.get_texts()}


def test_wandb_report_builds_offline(tmp_path, monkeypatch):
    import wandb
    import wandb_workspaces.reports.v2 as wr

    def no_network(*args, **kwargs):
        raise AssertionError("wandb_report touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(wandb, "Api", no_network)
    study = report.load_study(make_study(tmp_path, "s7"))
    rep = report.wandb_report(study, project="convergence")
    assert isinstance(rep, wr.Report)
    assert rep.project == "convergence" and "s7" in rep.title and rep.id == ""  # built, never saved
    markdown = "\n".join(b.text for b in rep.blocks if isinstance(b, wr.MarkdownBlock))
    assert "[s7] " + ANSWER[0] in markdown and "B_crit = 200 ± 30" in markdown

    grids = [b for b in rep.blocks if isinstance(b, wr.PanelGrid)]
    plots = [(p.x, tuple(p.y)) for g in grids for p in g.panels if isinstance(p, wr.LinePlot)]
    assert set(plots) == {("samples_seen", ("val/accuracy",)), ("wall_time_s", ("val/accuracy",)),
                          ("samples_seen", ("gns/b_simple",)), ("samples_seen", ("train/loss",))}
    for grid in grids:
        (runset,) = grid.runsets
        assert "Group" in runset.filters and "s7" in runset.filters
        assert runset.project == "convergence"


def make_bare_study(root):
    """Every run failed, no fit, no probe, a half-written metrics line."""
    study_dir = root / "bare"
    (study_dir / "runs" / "r1").mkdir(parents=True)
    (study_dir / "runs" / "r1" / "metrics.jsonl").write_text('{"step": 0, "samples_seen": 0, "val/accuracy": NaN}\n{"st')
    (study_dir / "study.json").write_text(json.dumps({
        "study_id": "bare", "target": {"metric": "val/accuracy", "value": 0.9, "mode": "max"},
        "runs": [{"name": "r1", "run_dir": "runs/r1", "batch_size": None, "selected": True, "reached_target": False}],
        "batches": [], "fit": None, "probe": None, "answer": None}))
    RunStore.open(str(study_dir)).seal({"kind": "study"})
    return study_dir


def test_a_study_with_nothing_to_plot_still_renders(tmp_path):
    """Text in the figures instead of curves, no crash."""
    study = report.load_study(make_bare_study(tmp_path))
    assert any("1 unreadable line" in n for n in study["notes"])
    page = report.render(study, tmp_path / "out").read_text()  # a single dict is accepted too
    assert "No fit in this study." in page and len(embedded_pngs(page)) == 5


def test_command_line_rewrites_one_studys_report_in_place(tmp_path, capsys):
    study_dir = make_bare_study(tmp_path)  # the cheapest study to draw; the full one is rendered above
    (study_dir / "report.html").write_text("stale")
    assert report_cli.main([str(study_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(study_dir / "report.html")
    page = (study_dir / "report.html").read_text()
    assert "<h1>Convergence study bare</h1>" in page and len(embedded_pngs(page)) == 5
    assert all((study_dir / name).is_file() for name in report_plots.FIGURES)


def test_command_line_reports_bad_input_in_one_line(tmp_path, capsys):
    assert report_cli.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "does not exist" in err[0]
    assert captured.out == "" and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()  # a directory, but not a study's
    assert report_cli.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: report:")
