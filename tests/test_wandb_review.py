"""W&B reviews across a schedule (issue 11): one W&B group per schedule (components/tracking.py,
pipelines/submit.py) and the group's W&B Report (components/wandb_review.py).

The report is built offline and asserted block by block. Saving it needs W&B's server, which
cannot run here: the contract tests give wandb-workspaces' own save and load a stand-in for the
SDK's API client (wandb.Api) that answers its GraphQL as W&B does and records every request, and
assert those requests (create, then update of the same report; no secret in any of them)."""

import base64
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from components import wandb_review
from components.config import parse_config, with_run_id
from components.registry import Registry
from components.tracking import Tracker, for_schedule
from conftest import config
from pipelines import submit
import wandb_files

CLUSTER = ["platform=kubeflow", "platform.host=http://127.0.0.1:9", "output_dir=s3://b/runs", "data=digits"]
SECRETS = {"WANDB_API_KEY": "wandb-key-" + "7" * 30, "AWS_SECRET_ACCESS_KEY": "aws-secret-0123456789",
           "KFP_TOKEN": "kfp-token-abcdef"}


def compiled_config(capsys, *overrides) -> dict:
    """config_json's default in the package `submit --compile-only` writes for the cluster."""
    assert submit.main([*CLUSTER, *overrides, "--compile-only"]) == 0
    path = re.search(r"pipeline to (\S+pipeline\.yaml)", capsys.readouterr().out).group(1)
    spec = yaml.safe_load_all(Path(path).read_text()).__next__()
    return json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])


# ---------------------------------------------------------------------------- one group per schedule

@pytest.mark.parametrize("overrides, group", [
    (["platform.schedule='0 0 3 * * *'"], "train-schedule"),  # kubeflow.schedule_name's default
    (["platform.schedule='0 0 3 * * *'", "platform.schedule_name=nightly"], "nightly"),
    (["platform.schedule='0 0 3 * * *'", "tracking.group=mine"], "mine"),  # the user's group wins
    ([], None),  # a one-off run: its steps group by its run id (tracking.group_of)
])
def test_a_schedule_compiles_its_name_in_as_the_w_and_b_group(capsys, overrides, group):
    compiled = compiled_config(capsys, *overrides)
    assert compiled["tracking"]["group"] == group and compiled["run_id"] is None


def test_a_dry_run_of_a_schedule_shows_the_group_in_the_recurring_runs_parameters(capsys):
    assert submit.main([*CLUSTER, "platform.schedule='0 0 3 * * *'", "platform.dry_run=true"]) == 0
    out = capsys.readouterr().out
    marker = "POST /apis/v2beta1/recurringruns "
    body, _ = json.JSONDecoder().raw_decode(out[out.index(marker) + len(marker):])
    sent = json.loads(body["runtime_config"]["parameters"]["config_json"])
    assert sent["tracking"]["group"] == "train-schedule"


def test_every_step_of_two_scheduled_runs_lands_in_the_schedules_group(tmp_path, monkeypatch):
    """Each run of the schedule gets its own run id at run time (with_run_id, as steps.py does);
    read back from the offline run files: one group, four job types, ids per run."""
    monkeypatch.delenv("WANDB_MODE")
    scheduled = for_schedule(config(tracking={"mode": "offline"}).to_dict(), "nightly")
    seen = []
    for run_id in ("run-a", "run-b"):
        cfg = parse_config(with_run_id(scheduled, run_id))
        for job_type in ("probe", "train", "evaluate", "promote"):
            Tracker(cfg.tracking, tmp_path / run_id, cfg.run_id, job_type, {}).finish()
            seen.append(wandb_files.run_settings(wandb_files.offline_file(tmp_path / run_id, run_id, job_type)))
    assert [(s["group"], s["job_type"], s["id"]) for s in seen] == [
        ("nightly", job, f"{run}-{job}") for run in ("run-a", "run-b") for job in ("probe", "train", "evaluate",
                                                                                    "promote")]
    one_off = parse_config(with_run_id(config(tracking={"mode": "offline"}).to_dict(), "run-c"))
    Tracker(one_off.tracking, tmp_path / "run-c", "run-c", "train", {}).finish()
    assert wandb_files.run_settings(wandb_files.offline_file(tmp_path / "run-c", "run-c", "train"))["group"] == "run-c"


# ---------------------------------------------------------------------------- the report, offline

# (run, its group, test/accuracy, time to target, promoted): x is a one-off run between scheduled ones
DECISIONS = [("a", "nightly", 0.9, 3.25, True), ("b", "nightly", 0.89, 2.5, False), ("x", "x", 0.93, None, True),
             ("c", "nightly", 0.95, None, True)]


def fill(registry: Registry, decisions=DECISIONS) -> None:
    """Decisions recorded as promote records them (components/promote.py: decide)."""
    for run_id, group, value, time_s, promoted in decisions:
        def decide(champion, run_id=run_id, group=group, value=value, time_s=time_s, promoted=promoted):
            verdict = "promoted" if promoted else f"not promoted: below champion {champion['run_id']}"
            return {"run_id": run_id, "metric": "test/accuracy", "value": value, "promoted": promoted,
                    "reason": f"run {run_id} {verdict}", "champion": champion and {"run_id": champion["run_id"]},
                    "improvement": None, "time_to_target_s": time_s, "wandb_group": group}

        registry.promote({"run_id": run_id, "value": value, "metric": "accuracy"}, decide)


def scheduled_cfg(**tracking):
    return config(tracking={"mode": "online", "group": "nightly", **tracking}, eval={"target": 0.9})


def test_the_report_shows_the_groups_runs_panels_over_its_promote_runs_and_every_champion_change(tmp_path):
    registry = Registry.open(str(tmp_path / "reg"))
    fill(registry)
    report = wandb_review.build_report(scheduled_cfg(), "nightly", registry.history(), "team", registry.uri)
    assert (report.title, report.entity, report.project) == ("Retraining history: nightly", "team",
                                                             "convergence-pipeline")
    kinds = [type(b).__name__ for b in report.blocks]
    assert kinds == ["MarkdownBlock", "H2", "MarkdownBlock", "H2", "PanelGrid", "MarkdownBlock"]
    intro, _, changes, _, grid, runs = report.blocks
    assert "W&B group `nightly`" in intro.text and "`test/accuracy` (max); target 0.9" in intro.text
    assert "Champion now: run c (test/accuracy 0.95, since decision 4). 3 run(s) in this group" in intro.text
    assert f"registry `{registry.uri}`" in intro.text

    (runset,) = grid.runsets
    assert (runset.entity, runset.project) == ("team", "convergence-pipeline")
    from wandb_workspaces import expr

    filters = expr.filters_tree_to_v2(expr.expr_to_filters(runset.filters))["filters"]
    assert [(f["key"], f["op"], f["value"]) for f in filters] == [
        ({"section": "run", "name": "group"}, "=", "nightly"), ({"section": "run", "name": "jobType"}, "=", "promote")]
    assert [(p.x, p.y) for p in grid.panels] == [("promotion/seq", "promotion/value"),
                                                 ("promotion/seq", "promotion/time_to_target_s"),
                                                 ("promotion/seq", "promotion/champion_value")]
    # the panels plot what the promote step puts in its W&B summary
    summary = wandb_review.promote_summary({**registry.history()[-1]["decision"], "seq": 4})
    assert {k for p in grid.panels for k in (p.x, p.y)} <= set(summary)
    assert summary["promotion/time_to_target_s"] is None and summary["promotion/seq"] == 4

    rows = changes.text.splitlines()
    assert rows[0] == "| decision | decided (UTC) | new champion | replaced | test/accuracy | group | why |"
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[2:]]
    assert [(c[0], c[2], c[3], c[4], c[5], c[6]) for c in cells] == [
        ("1", "**a**", "none", "0.9", "nightly", "run a promoted"), ("3", "**x**", "a", "0.93", "x", "run x promoted"),
        ("4", "**c**", "x", "0.95", "nightly", "run c promoted")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[0][1])
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in runs.text.splitlines()[2:]]
    assert [(c[0], c[2], c[3], c[4], c[5], c[6]) for c in cells] == [  # the group's runs only: not x
        ("1", "a", "0.9", "3.25", "**promoted** (champion change)", "a"), ("2", "b", "0.89", "2.5", "not promoted", "a"),
        ("4", "c", "0.95", "—", "**promoted** (champion change)", "c")]


def test_an_empty_history_and_a_long_group_name_still_make_a_valid_report(tmp_path):
    long = "n/" + "x" * 200
    report = wandb_review.build_report(scheduled_cfg(group=long), long, [], "team", "reg")
    assert len(report.title) == 128 and "/" not in report.title
    assert report.blocks[2].text == "No champion yet." and report.blocks[5].text == "No decision in this group yet."


# ---------------------------------------------------------------------------- when, and errors

@pytest.mark.parametrize("env, tracking, why", [
    ({}, {"report": False}, ""),
    ({"WANDB_MODE": "disabled"}, {}, ""),
    ({"WANDB_API_KEY": None}, {}, "no WANDB_API_KEY in the environment (a report is saved on W&B's server)"),
    ({}, {"mode": "offline"}, "tracking.mode is offline (a report shows the runs on W&B's server: tracking.mode=online)"),
    ({}, {"group": None}, "tracking.group is null: a one-off run (a schedule's runs share its name as their group; "
                          "set tracking.group to review runs together)"),
])
def test_without_a_key_online_mode_or_a_group_the_report_is_skipped_in_one_line(tmp_path, monkeypatch, env,
                                                                               tracking, why):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    for name, value in env.items():
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name)
    registry = Registry.open(str(tmp_path / "reg"))
    fill(registry)
    assert wandb_review.review(scheduled_cfg(**tracking), registry, wandb_files.Recorder()) == \
        (None, f"W&B report skipped: {why}" if why else None)
    assert registry.report_link("nightly") is None


def test_contract_the_first_review_creates_the_report_the_next_updates_the_same_one(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    registry, saver = Registry.open(str(tmp_path / "reg")), wandb_files.Recorder()
    fill(registry, DECISIONS[:2])
    url, line = wandb_review.review(scheduled_cfg(), registry, saver)
    assert line == f"W&B report created: {url}" and url.endswith("--Vmlldzo1")
    link = registry.report_link("nightly")
    assert {k: link[k] for k in ("group", "entity", "project", "id", "url")} == \
        {"group": "nightly", "entity": "team", "project": "convergence-pipeline", "id": "Vmlldzo1", "url": url}
    fill(registry, DECISIONS[2:])
    again, line = wandb_review.review(scheduled_cfg(), registry, saver)
    assert (again, line) == (url, f"W&B report updated: {url}")
    (first, none), (second, given) = saver.saved
    assert none is None and given["id"] == "Vmlldzo1" and given["url"] == url
    assert first.blocks[5].text.count("\n") == 3 and second.blocks[5].text.count("\n") == 4  # header, rule, rows
    # another project is another report: created, not the old one overwritten
    _, line = wandb_review.review(scheduled_cfg(project="elsewhere"), registry, saver)
    assert line.startswith("W&B report created: ") and saver.saved[-1][1] is None


def test_a_group_name_the_report_filter_cannot_hold_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    registry = Registry.open(str(tmp_path / "reg"))
    assert wandb_review.review(scheduled_cfg(group="bob's"), registry, wandb_files.Recorder()) == \
        (None, "W&B report not updated: ConfigError: tracking.group: \"bob's\": a W&B report's run filter cannot "
               "hold a quote; rename the group")


def test_a_w_and_b_error_is_one_line_without_the_key_and_nothing_is_stored(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["WANDB_API_KEY"])
    registry = Registry.open(str(tmp_path / "reg"))
    fill(registry)
    error = RuntimeError(f"401 for api_key={SECRETS['WANDB_API_KEY']}\nfull response ...")
    assert wandb_review.review(scheduled_cfg(), registry, wandb_files.Recorder(fail=error)) == \
        (None, "W&B report not updated: RuntimeError: 401 for api_key=<WANDB_API_KEY>")
    assert registry.report_link("nightly") is None


# ---------------------------------------------------------------------------- wandb-workspaces' save

class StandInApi:
    """Stands in for wandb.Api (the SDK's client of W&B's server) as wandb-workspaces uses it:
    GraphQL through `_service_api.execute_graphql`, the app URL, projects. Views are kept as W&B
    keeps them, so a saved report loads back."""

    app_url = "https://wandb.example/"
    views, requests, project_names, created = {}, [], [], 0  # reset per test (the fixture)
    default_entity = "team"

    def __init__(self, *args, **kwargs):
        self._service_api = self  # what wandb_workspaces._graphql looks for

    def projects(self, entity):
        self.requests.append(("projects", {"entity": entity}))
        return [SimpleNamespace(name=name) for name in StandInApi.project_names]

    def create_project(self, name, entity):
        self.requests.append(("create_project", {"name": name, "entity": entity}))
        StandInApi.project_names.append(name)

    def execute_graphql(self, query, variables=None, **_):
        name = re.search(r"\b(?:query|mutation)\s+(\w+)", query).group(1)
        self.requests.append((name, json.loads(json.dumps(variables))))
        if name == "ProjectInternalId":
            return {"project": {"id": "UHJvamVjdDox", "internalId": "project-1"}}
        if name == "SpecificReport":
            return {"view": self.views.get(variables["reportId"])}
        assert name == "upsertView", f"unexpected GraphQL operation {name}"
        if not variables["id"]:  # W&B numbers views; a deleted one's id is never given again
            StandInApi.created += 1
        view_id = variables["id"] or base64.b64encode(f"View:{StandInApi.created}".encode()).decode()
        view = {"id": view_id, "name": variables["name"], "displayName": variables["displayName"],
                "description": variables["description"], "type": variables["type"], "spec": variables["spec"],
                "project": {"id": "UHJvamVjdDox", "name": variables["projectName"],
                            "entityName": variables["entityName"]}, "updatedAt": "2026-12-01T00:00:00"}
        inserted = view_id not in self.views
        self.views[view_id] = view
        return {"upsertView": {"view": view, "inserted": inserted}}


@pytest.fixture
def wandb_server(monkeypatch):
    import wandb

    StandInApi.views, StandInApi.requests, StandInApi.project_names, StandInApi.created = {}, [], [], 0
    monkeypatch.setattr(wandb, "Api", StandInApi)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_MODE")
    return StandInApi


def test_contract_wandb_workspaces_creates_the_report_then_updates_it_by_its_id(tmp_path, wandb_server):
    registry = Registry.open(str(tmp_path / "reg"))
    fill(registry, DECISIONS[:2])
    url, line = wandb_review.review(scheduled_cfg(entity=None), registry)  # entity: the API key's default
    assert url == "https://wandb.example/team/convergence-pipeline/reports/Retraining-history:-nightly--Vmlldzox"
    assert line == f"W&B report created: {url}"
    assert [name for name, _ in wandb_server.requests] == ["ProjectInternalId", "projects", "create_project",
                                                           "upsertView"]
    create = wandb_server.requests[-1][1]
    assert create["id"] is None and (create["entityName"], create["projectName"], create["type"]) == \
        ("team", "convergence-pipeline", "runs")
    assert create["displayName"] == "Retraining history: nightly"
    spec = json.loads(create["spec"])
    grid = [b for b in spec["blocks"] if b["type"] == "panel-grid"][0]["metadata"]
    (runset,) = grid["runSets"]
    assert [(f["key"], f["op"], f["value"]) for f in runset["filters"]["filters"]] == \
        [({"section": "run", "name": "group"}, "=", "nightly"), ({"section": "run", "name": "jobType"}, "=", "promote")]
    assert runset["project"] == {"entityName": "team", "name": "convergence-pipeline", "id": "project-1"}

    fill(registry, DECISIONS[2:])
    del wandb_server.requests[:]
    again, line = wandb_review.review(scheduled_cfg(entity=None), registry)
    assert (again, line) == (url, f"W&B report updated: {url}")
    names = [name for name, _ in wandb_server.requests]
    assert names == ["SpecificReport", "SpecificReport", "ProjectInternalId", "projects", "upsertView"]
    update = wandb_server.requests[-1][1]
    assert update["id"] == "Vmlldzox" and list(wandb_server.views) == ["Vmlldzox"]  # one report, updated
    assert "| 4 | " in update["spec"] and "| 4 | " not in create["spec"]  # the new decision is in
    sent = json.dumps(wandb_server.requests) + json.dumps(create)
    assert not [name for name, value in SECRETS.items() if value in sent]


def test_contract_a_report_deleted_on_w_and_b_is_created_again(tmp_path, wandb_server):
    registry = Registry.open(str(tmp_path / "reg"))
    fill(registry)
    url, _ = wandb_review.review(scheduled_cfg(entity="team"), registry)
    wandb_server.views.clear()  # someone deleted it in the W&B UI
    again, line = wandb_review.review(scheduled_cfg(entity="team"), registry)
    assert line == f"W&B report created: {again}" and wandb_server.requests[-1][1]["id"] is None
    assert again.endswith("--Vmlldzoy") and registry.report_link("nightly")["url"] == again


def test_submit_prints_the_report_url_under_the_decision(capsys):
    from pipelines import outputs

    decision = {"promoted": False, "reason": "champion a kept", "wandb_report": "https://wandb.ai/e/p/reports/R--x"}
    outputs.print_summary({"run_id": "b", "status": "completed", "promotion": decision}, "/runs/b")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == ["promotion: kept: champion a kept", "W&B report: https://wandb.ai/e/p/reports/R--x"]
    outputs.print_summary({"run_id": "c", "status": "completed", "promotion": {**decision, "wandb_report": None}},
                          "/runs/c")
    assert "W&B report" not in capsys.readouterr().out
