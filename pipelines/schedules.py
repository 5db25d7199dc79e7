"""Scheduled retraining on Kubeflow Pipelines: the cron KFP's scheduler reads, and the recurring runs
that make up a schedule.

KFP parses a cron with robfig/cron v1.2.0's `cron.Parse`: 6 fields, seconds first (second, minute,
hour, day of month, month, day of week), or a descriptor such as @daily. A 5-field Unix cron is
accepted there and silently shifted ("0 2 * * *" is second 0, minute 2, every hour), so `check_cron`
refuses it before anything is sent and gives the 6-field form that means what the Unix cron means.

A schedule is the recurring runs with its name in the experiment. KFP has no update call and does
not keep names unique, so `replace` creates the new recurring run paused, deletes the old ones, then
enables the new one: one schedule is enabled at any moment, so a tick can never start two runs of
the same retraining (two runs racing to promote a model); a tick falling in the one request between
the delete and the enable is the only possible miss, and with no_catchup the scheduler still runs
the latest missed tick once. A failed create changes nothing; a failure later says what exists.
"""

import json
from typing import Callable, List, Optional

from components.errors import ConfigError

KEY = "platform.schedule"
DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = {name: n for n, name in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
_DAYS = {name: n for n, name in enumerate("sun mon tue wed thu fri sat".split())}
# (name, lowest, highest, names accepted) per field, in robfig's order; "?" reads as "*" in any field.
_FIELDS = (("second", 0, 59, {}), ("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
           ("month", 1, 12, _MONTHS), ("day of week", 0, 6, _DAYS))
_PAGE_SIZE = 100
# One retraining at a time; a schedule paused for a week runs once when resumed, not once per missed tick.
MAX_CONCURRENCY, NO_CATCHUP = 1, True


def check_cron(expression: str) -> str:
    """The cron as it will be sent (fields separated by one space), or a ConfigError naming the
    field, its value and its range."""
    fields = expression.split()
    text = " ".join(fields)
    if text in DESCRIPTORS:
        return text
    if text.startswith("@"):
        raise ConfigError(f"{KEY}: {expression!r}: use 6 fields, seconds first (e.g. '0 0 3 * * *', 03:00 every "
                          f"day), or one of {', '.join(DESCRIPTORS)}")
    if len(fields) == 5:
        read_as = " ".join(f"{name}={value}" for (name, *_), value in zip(_FIELDS, fields))
        raise ConfigError(f"{KEY}: {text!r} has 5 fields, but KFP's cron has 6 with seconds first and would read "
                          f"it as {read_as}; for what the Unix cron means use '0 {text}'")
    if len(fields) != 6:
        raise ConfigError(f"{KEY}: {expression!r} has {len(fields)} fields; KFP's cron has 6: second minute hour "
                          "day-of-month month day-of-week (e.g. '0 0 3 * * *')")
    for value, spec in zip(fields, _FIELDS):
        _check_field(text, value, *spec)
    return text


def _check_field(text: str, value: str, name: str, low: int, high: int, names: dict) -> None:
    def refuse(why: str):
        hint = " (Sunday is 0)" if name == "day of week" else ""
        raise ConfigError(f"{KEY}: {text!r}: the {name} field {value!r} {why}; {name} is {low}-{high}{hint}")

    def number(token: str) -> int:
        if token.lower() in names:
            return names[token.lower()]
        if not token.isdigit():
            refuse(f"has {token!r}, not a number" + (f" or a name ({', '.join(names)})" if names else ""))
        return int(token)

    for part in value.split(","):
        span, slash, step = part.partition("/")
        if slash and not (step.isdigit() and int(step) > 0):
            refuse(f"has the step {step!r}; a step is a positive number")
        if span in ("*", "?"):
            continue
        start, dash, end = span.partition("-")
        first = number(start)
        last = number(end) if dash else (high if slash else first)  # "5/15": from 5 to the end, every 15
        for n in (first, last):
            if not low <= n <= high:
                refuse(f"has {n}, outside {low}-{high}")
        if first > last:
            refuse(f"has the range {span!r}, which ends before it starts")


def name_filter(name: str) -> str:
    """The `filter=` kfp.Client itself sends for a lookup by name (client.py get_pipeline_id)."""
    return json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]})


def find(client, experiment_id: str, name: Optional[str] = None) -> list:
    """The recurring runs in the experiment (those named `name`, when given), every page. By
    experiment id: list_recurring_runs ignores the client's namespace (client.py l.1272)."""
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=_PAGE_SIZE, experiment_id=experiment_id,
                                          filter=name_filter(name) if name else None)
        found += [r for r in page.recurring_runs or [] if name is None or r.display_name == name]
        token = page.next_page_token
        if not token:
            return found


def replace(client, session, *, experiment_id: str, name: str, cron: str, pipeline_id: str, version_id: str,
            parameters: dict, description: str):
    """Create the schedule `name` on this pipeline version, replacing every recurring run of that
    name in the experiment (order: the module's doc). Returns (the new recurring run, the ids it
    replaced). `session` (pipelines/kubeflow.py: Session) records what it changed, for error messages."""
    session.doing = f"looking up the schedule {name!r}"
    old = find(client, experiment_id, name)
    session.doing = f"creating the schedule {name!r}"
    # Caching is the compiled pipeline's (pipelines/graph.py): with a version reference no spec is
    # sent, so kfp's enable_caching would never reach the server (client.py _override_caching_options).
    new = client.create_recurring_run(experiment_id=experiment_id, job_name=name, description=description,
                                      cron_expression=cron, max_concurrency=MAX_CONCURRENCY, no_catchup=NO_CATCHUP,
                                      params=parameters, pipeline_id=pipeline_id, version_id=version_id, enabled=False)
    session.changed.append(f"the schedule {name!r} ({new.recurring_run_id}, paused)")
    for run in old:
        session.doing = f"deleting the schedule it replaces ({run.recurring_run_id})"
        client.delete_recurring_run(run.recurring_run_id)
        session.changed.append(f"deleted the old schedule {run.recurring_run_id}")
    session.doing = f"enabling the schedule {name!r} ({new.recurring_run_id}; resume it with " \
                    "platform.schedule_action=resume)"
    client.enable_recurring_run(new.recurring_run_id)
    return client.get_recurring_run(new.recurring_run_id), [run.recurring_run_id for run in old]


def act(client, session, *, experiment_id: str, experiment: str, name: str, action: str,
        out: Callable[[str], None]) -> List:
    """platform.schedule_action: pause, resume or delete the schedule `name`, or list every schedule
    in the experiment. Returns the recurring runs acted on (or listed)."""
    session.doing = f"listing the schedules in the experiment {experiment!r}"
    runs = find(client, experiment_id, None if action == "list" else name)
    if action == "list":
        for run in runs:
            out(describe(run))
        if not runs:
            out(f"no schedules in the experiment {experiment!r}")
        return runs
    if not runs:
        raise ConfigError(f"platform.schedule_name: no schedule named {name!r} in the experiment {experiment!r}; "
                          "list them with platform.schedule_action=list")
    call = {"pause": client.disable_recurring_run, "resume": client.enable_recurring_run,
            "delete": client.delete_recurring_run}[action]
    done = {"pause": "paused", "resume": "resumed", "delete": "deleted"}[action]
    for run in runs:
        session.doing = f"{action.rstrip('e')}ing the schedule {name!r} ({run.recurring_run_id})"
        call(run.recurring_run_id)
        out(f"schedule {name!r} ({run.recurring_run_id}): {done}")
    return runs


def describe(run) -> str:
    """One line per recurring run, as `list` prints it."""
    trigger = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else "periodic"
    version = run.pipeline_version_reference.pipeline_version_id if run.pipeline_version_reference else None
    return (f"{run.display_name}  {run.recurring_run_id}  cron '{trigger}'  {run.status or run.mode}  "
            f"version {version}  no_catchup={bool(run.no_catchup)}  max_concurrency={run.max_concurrency}")
