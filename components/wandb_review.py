"""The W&B Report of a W&B group's history: what a schedule's runs measured and decided.

Every run of a schedule lands in one W&B group (tracking.group, which submit sets to the
schedule's name: components/tracking.py `for_schedule`). After each promotion the promote step
(components/promote.py) builds the group's report from the config and the registry's history
(components/registry.py), where each decision records its run's W&B group, test metric and time
to target, and saves it:
- a markdown table of the champion changes (every promotion in the registry, with its reason),
- panels over the group's promote runs (their W&B summaries, `promote_summary`): the monitored
  test metric, the time to target and the champion's value per decision,
- a markdown table of the group's runs: metric, time to target, decision.
The registry keeps the report's id and URL (`Registry.keep_report_link`), so the next run updates
the same report instead of adding one. `build_report` is a plain function and needs no server;
saving goes through `WandbReports`, the one place that talks to W&B's server (wandb-workspaces'
save needs one and an API key; a study's report, components/report.py `wandb_report`, is saved
through it too). Skipped, in one line, without tracking.mode=online and
WANDB_API_KEY or without a group; a W&B error is one line and never fails the promote step.
"""

import os
from datetime import datetime, timezone
from typing import List, Optional, Tuple

from components.config import Config, TrackingConfig
from components.errors import ConfigError, brief

# The promote run's W&B summary keys that the report's panels read (one row per decision)
SEQ, VALUE, TIME_TO_TARGET, CHAMPION_VALUE = ("promotion/seq", "promotion/value", "promotion/time_to_target_s",
                                              "promotion/champion_value")
PROMOTE_JOB = "promote"
TITLE_MAX = 128  # wandb-workspaces refuses longer titles


def promote_summary(result: dict) -> dict:
    """The promote run's W&B summary: the decision (result: components/promote.py `run`'s) and
    the numbers the report's panels plot across the group's runs."""
    champion = result["champion"] or {}
    return {"promotion/promoted": result["promoted"], "promotion/reason": result["reason"],
            VALUE: result["value"], "promotion/improvement": result["improvement"],
            TIME_TO_TARGET: result.get("time_to_target_s"), "promotion/champion_run_id": champion.get("run_id"),
            CHAMPION_VALUE: champion.get("value"), SEQ: result["seq"]}


def group_runs(history: List[dict], group: str) -> List[dict]:
    """The group's decisions, oldest first: one row per run (registry history entries)."""
    rows = []
    for entry in history:
        d = entry["decision"]
        if d.get("wandb_group") != group:
            continue
        champion = entry["champion"] or {}
        rows.append({"seq": entry["seq"], "decided_at": entry.get("decided_at"), "run_id": d["run_id"],
                     "value": d.get("value"), "time_to_target_s": d.get("time_to_target_s"),
                     "promoted": d["promoted"], "reason": d["reason"], "champion": champion.get("run_id")})
    return rows


def champion_changes(history: List[dict]) -> List[dict]:
    """Every decision that moved the champion (the registry's, whichever group the run was in)."""
    changes, before = [], None
    for entry in history:
        champion = entry["champion"]
        if champion is not None and champion.get("seq") == entry["seq"]:  # promoted by this decision
            changes.append({"seq": entry["seq"], "decided_at": entry.get("decided_at"), "run_id": champion["run_id"],
                            "replaced": before, "value": champion.get("value"),
                            "group": entry["decision"].get("wandb_group"), "reason": entry["decision"]["reason"]})
        if champion is not None:
            before = champion["run_id"]
    return changes


def build_report(cfg: Config, group: str, history: List[dict], entity: str, registry_uri: str):
    """The group's report (a wandb-workspaces Report, not saved), from the config and the registry
    history. Offline: nothing here talks to a server."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    if "'" in group or '"' in group:  # wandb-workspaces 0.4.13 writes the filter unescaped, then fails to parse it
        raise ConfigError(f"tracking.group: {group!r}: a W&B report's run filter cannot hold a quote; rename the group")
    metric, project = f"test/{cfg.eval.monitor.split('/', 1)[1]}", cfg.tracking.project
    rows, changes = group_runs(history, group), champion_changes(history)
    champion = history[-1]["champion"] if history else None
    now = (f"run {champion['run_id']} ({metric} {_num(champion.get('value'))}, since decision {champion['seq']})"
           if champion else "none yet")
    target = "none (eval.target is null)" if cfg.eval.target is None else f"{cfg.eval.target:g}"
    intro = (f"Every run of W&B group `{group}` in project `{project}` and its promotion decision, from the model "
             f"registry `{registry_uri}`. Monitored metric: `{metric}` ({cfg.eval.mode}); target {target}; a "
             f"challenger replaces the champion when better by at least {cfg.registry.min_improvement:g} on the same "
             f"test data. Champion now: {now}. {len(rows)} run(s) in this group; updated "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC.")
    runset = wr.Runset(entity=entity, project=project, name=f"{group}: promote runs",
                       filters=[expr.Metric("Group") == group, expr.Metric("JobType") == PROMOTE_JOB],
                       pinned_columns=["run:displayName", f"summary:{VALUE}", f"summary:{TIME_TO_TARGET}",
                                       "summary:promotion/promoted", "summary:promotion/reason"])
    panels = [wr.ScatterPlot(title=f"{metric} per decision", x=SEQ, y=VALUE),
              wr.ScatterPlot(title="time to target (s) per decision", x=SEQ, y=TIME_TO_TARGET),
              wr.ScatterPlot(title=f"champion's {metric} per decision", x=SEQ, y=CHAMPION_VALUE)]
    title = f"Retraining history: {group}".replace("/", "-")[:TITLE_MAX]  # a "/" would break the report's URL
    return wr.Report(
        entity=entity, project=project, title=title, width="fluid",
        description=f"{metric} and time to target per run of {group}, champion changes marked",
        blocks=[wr.MarkdownBlock(text=intro),
                wr.H2(text="Champion changes"), wr.MarkdownBlock(text=changes_table(changes, metric)),
                wr.H2(text="Runs"), wr.PanelGrid(runsets=[runset], panels=panels),
                wr.MarkdownBlock(text=runs_table(rows, metric))])


def changes_table(changes: List[dict], metric: str) -> str:
    if not changes:
        return "No champion yet."
    lines = [f"| decision | decided (UTC) | new champion | replaced | {metric} | group | why |", "|---" * 7 + "|"]
    lines += [_row(c["seq"], _when(c["decided_at"]), f"**{c['run_id']}**", c["replaced"] or "none", _num(c["value"]),
                   c["group"] or "unknown", c["reason"]) for c in changes]
    return "\n".join(lines)


def runs_table(rows: List[dict], metric: str) -> str:
    if not rows:
        return "No decision in this group yet."
    lines = [f"| decision | decided (UTC) | run | {metric} | time to target (s) | decision | champion after |",
             "|---" * 7 + "|"]
    lines += [_row(r["seq"], _when(r["decided_at"]), r["run_id"], _num(r["value"]), _num(r["time_to_target_s"]),
                   "**promoted** (champion change)" if r["promoted"] else "not promoted", r["champion"] or "none")
              for r in rows]
    return "\n".join(lines)


def _row(*cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _num(value) -> str:
    return "—" if not isinstance(value, (int, float)) else f"{value:.4g}"


def _when(iso: Optional[str]) -> str:
    return iso[:19].replace("T", " ") if iso else "—"


def skipped(tracking: TrackingConfig) -> Optional[str]:
    """Why this run makes no report ("" to say nothing: W&B is off), or None: make it."""
    if not tracking.report or tracking.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return ""
    if not os.environ.get("WANDB_API_KEY"):
        return "no WANDB_API_KEY in the environment (a report is saved on W&B's server)"
    if tracking.mode != "online":
        return f"tracking.mode is {tracking.mode} (a report shows the runs on W&B's server: tracking.mode=online)"
    if not tracking.group:
        return ("tracking.group is null: a one-off run (a schedule's runs share its name as their group; set "
                "tracking.group to review runs together)")
    return None


class WandbReports:
    """The one boundary to W&B's server for reports (wandb-workspaces' save and load need it)."""

    def default_entity(self) -> str:
        import wandb

        return wandb.Api().default_entity

    def save(self, report, link: Optional[dict]) -> dict:
        """Create the report, or update the one `link` names (its comments kept) if it still
        exists. Returns {"id", "url"} of the report saved."""
        import wandb
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces._graphql import execute_graphql

        if link is not None and execute_graphql(wandb.Api(), wr.gql.view_report,
                                                {"reportId": link["id"]}).get("view"):
            stored = wr.Report.from_url(link["url"])
            stored.title, stored.description, stored.width = report.title, report.description, report.width
            stored.blocks = report.blocks
            report = stored
        report.save()
        return {"id": report.id, "url": report.url}


def review(cfg: Config, registry, reports: Optional[WandbReports] = None) -> Tuple[Optional[str], Optional[str]]:
    """Create or update the W&B Report of cfg.tracking.group from `registry`'s history.
    Returns (its URL or None, the line to print or None). Never raises."""
    why = skipped(cfg.tracking)
    if why is not None:
        return None, (f"W&B report skipped: {why}" if why else None)
    reports, group, project = reports or WandbReports(), cfg.tracking.group, cfg.tracking.project
    try:
        entity = cfg.tracking.entity or os.environ.get("WANDB_ENTITY") or reports.default_entity()
        link = registry.report_link(group)
        if link is not None and (link.get("entity"), link.get("project")) != (entity, project):
            link = None  # the report of another entity or project: this one gets its own
        report = build_report(cfg, group, registry.history(), entity, registry.uri)
        saved = reports.save(report, link)
        registry.keep_report_link(group, {"entity": entity, "project": project, **saved})
    except Exception as exc:  # W&B or the network: the decision is recorded, the report can wait
        return None, f"W&B report not updated: {one_line(exc)}"
    verb = "updated" if link is not None and link.get("id") == saved["id"] else "created"
    return saved["url"], f"W&B report {verb}: {saved['url']}"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    key = os.environ.get("WANDB_API_KEY")
    if key:
        text = text.replace(key, "<WANDB_API_KEY>")  # a message that quotes a request must not leak it
    text = brief(text)  # after the replacement: a cut must not leave part of the key
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
