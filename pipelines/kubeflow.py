"""Submission to a Kubeflow Pipelines v2 server (platform=kubeflow), with the real kfp.Client.

    submit(config, package_path)   the compiled package becomes a version of one pipeline; then a run
                                   in the experiment (followed with platform.wait), or the schedule
                                   platform.schedule (replacing the one of the same name)
    manage_schedule(config)        platform.schedule_action: pause, resume, delete or list

A failed submission leaves as little as it can: what can be checked here (the cron, the pipeline's
parameters, names) is checked before any request; then come only reads (healthz, pipeline, version,
experiment) until the first write; writes go experiment, pipeline, version, run or schedule; and an
error says what this submission had changed by then. platform.dry_run prints the requests instead.

A version is named <commit>-<config hash> (components/lineage.py, components/config.py: config_hash)
and its description records the sha256 of the package without parameter defaults (every run and
schedule sends its parameters): a version of that name with another spec (platform.image or gpu
changed, which the config hash leaves out) gets <name>-<8 hex of the sha256> instead.

The connection itself (credentials, the client, errors as one line) is pipelines/kfp_connection.py.
"""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import kfp_server_api
import urllib3
import yaml

from components import lineage
from components.config import config_hash, parse_config
from components.errors import ClusterError, ConfigError
from pipelines import schedules
from pipelines.kfp_connection import KfpClient, Session, connect, credentials, link, quiet_kfp

FINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")  # kfp's own wait misses CANCELED
PROGRESS_EVERY_S = 60.0  # a waiting line at least this often, besides one per state change
POLL_ERRORS_TOLERATED = 5  # consecutive 5xx or dropped connections while waiting
EXPERIMENT_DESCRIPTION = "runs of python -m pipelines.submit"
_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "LIST": list,
          "STRUCT": dict}


@dataclass(frozen=True)
class Plan:
    """Everything a submission sends, decided before any request."""

    host: str
    namespace: Optional[str]
    experiment: str
    auth: str
    package: Path
    pipeline_name: str
    pipeline_description: str
    version_name: str
    version_description: str
    spec_digest: str
    parameters: dict
    run_name: str
    cron: Optional[str]
    schedule_name: str


@dataclass(frozen=True)
class Submission:
    """What submit did. kind: dry_run, run or schedule. state: the run's state at creation, or its
    final state (one of FINAL_STATES) after platform.wait."""

    kind: str
    pipeline_id: Optional[str] = None
    version_id: Optional[str] = None
    version_name: Optional[str] = None
    experiment_id: Optional[str] = None
    run_id: Optional[str] = None
    schedule_id: Optional[str] = None
    url: Optional[str] = None
    state: Optional[str] = None


def schedule_description(plan: Plan, version_name: str) -> str:
    return f"retrains {plan.pipeline_name} {version_name} at '{plan.cron}'"


def schedule_name(config: dict) -> str:
    return config["platform"]["schedule_name"] or f"{config['pipeline']}-schedule"


def read_package(path: Path) -> tuple:
    """(pipeline spec, platform spec) of a compiled package: the YAML's first document and the rest."""
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"pipeline package: {path} is not a compiled pipeline YAML")
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"pipeline package: cannot read {path}: {exc}") from None
    if not docs or not isinstance(docs[0], dict) or "root" not in docs[0] or "pipelineInfo" not in docs[0]:
        raise ConfigError(f"pipeline package: {path} is not a compiled KFP pipeline")
    platform_spec = {}
    for doc in docs[1:]:
        platform_spec.update(doc or {})
    return docs[0], platform_spec


def pipeline_parameters(spec: dict, arguments: Mapping) -> dict:
    """The run's parameters, typed as the compiled pipeline declares them: `arguments` over the
    compiled defaults. An unknown name, a wrong type or a required one missing is refused."""
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    for name in arguments:
        if name not in declared:
            raise ConfigError(f"pipeline parameter {name!r}: the compiled pipeline has no such parameter "
                              f"(it has {', '.join(declared) or 'none'})")
    values = {}
    for name, declaration in declared.items():
        kind = declaration.get("parameterType")
        if name in arguments:
            value = arguments[name]
        elif "defaultValue" in declaration:
            value = declaration["defaultValue"]
        elif declaration.get("isOptional"):
            continue
        else:
            raise ConfigError(f"pipeline parameter {name!r}: required ({kind}) and the pipeline has no default")
        values[name] = _typed(name, kind, value)
    return values


def _typed(name: str, kind: str, value):
    expected = _TYPES.get(kind)
    if expected is None:
        raise ConfigError(f"pipeline parameter {name!r}: type {kind} is not one submit can send")
    if expected is float and type(value) is int:
        return float(value)
    if expected is int and type(value) is float and value.is_integer():  # a YAML or JSON number
        return int(value)
    if type(value) is not expected:
        raise ConfigError(f"pipeline parameter {name!r}: the pipeline declares {kind}; got {type(value).__name__} "
                          f"{str(value)[:60]!r}")
    return value


def spec_digest(spec: dict, platform_spec: dict) -> str:
    """sha256 of what a version runs: the package less its parameter defaults."""
    bare = json.loads(json.dumps(spec))
    for declaration in bare["root"].get("inputDefinitions", {}).get("parameters", {}).values():
        declaration.pop("defaultValue", None)
    return hashlib.sha256(json.dumps([bare, platform_spec], sort_keys=True).encode()).hexdigest()


def plan_submission(config: dict, package_path: Path, arguments: Optional[Mapping] = None) -> Plan:
    pf = config["platform"]
    cron = schedules.check_cron(pf["schedule"]) if pf["schedule"] else None
    spec, platform_spec = read_package(package_path)
    parameters = pipeline_parameters(spec, arguments or {})
    code = lineage.code_version()
    commit = (code["commit"] or "nocommit")[:12] + ("-dirty" if code["dirty"] else "")
    computed = config_hash(parse_config(config))
    digest = spec_digest(spec, platform_spec)
    name = spec["pipelineInfo"]["name"]
    return Plan(host=pf["host"].rstrip("/"), namespace=pf["namespace"], experiment=pf["experiment"],
                auth=credentials(pf)[1], package=package_path, pipeline_name=name,
                pipeline_description=spec["pipelineInfo"].get("description", ""),
                version_name=f"{commit}-{computed}",
                version_description=f"code {code['commit'] or 'unknown'}{' (dirty)' if code['dirty'] else ''}, "
                                    f"config_hash {computed}, spec sha256:{digest}",
                spec_digest=digest, parameters=parameters,
                run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC",
                cron=cron, schedule_name=schedule_name(config))


def find_experiment(client: KfpClient, session: Session, name: str):
    """The experiment named `name` in the namespace, or None."""
    session.doing = f"looking up the experiment {name!r}"
    try:
        return client.get_experiment(experiment_name=name, namespace=session.namespace)
    except ValueError as exc:  # kfp: "No experiment is found with name ..." or "Multiple experiments ..."
        if str(exc).startswith("No experiment is found"):
            return None
        raise ClusterError(f"platform.experiment: {session.host} has several experiments named {name!r}"
                           f"{' in ' + repr(session.namespace) if session.namespace else ''}; name one of "
                           "them") from None


def find_pipeline(client: KfpClient, session: Session, name: str) -> Optional[str]:
    """The id of the pipeline named `name` in the namespace (private before shared), or None."""
    session.doing = f"looking up the pipeline {name!r}"
    found = [p for p in client.list_pipelines(page_size=100, filter=schedules.name_filter(name),
                                              namespace=session.namespace).pipelines or []
             if p.display_name == name]
    mine = [p for p in found if (p.namespace or "") == (session.namespace or "")] or found
    if len(mine) > 1:
        raise ClusterError(f"{session.host} has several pipelines named {name!r}; delete all but one")
    return mine[0].pipeline_id if mine else None


def find_version(client: KfpClient, session: Session, pipeline_id: str, plan: Plan) -> tuple:
    """(the existing version holding this spec or None, the name to upload it under otherwise)."""
    name = plan.version_name
    for candidate in (plan.version_name, f"{plan.version_name}-{plan.spec_digest[:8]}"):
        session.doing = f"looking up the pipeline version {candidate!r}"
        versions = [v for v in client.list_pipeline_versions(pipeline_id, page_size=100,
                                                             filter=schedules.name_filter(candidate))
                    .pipeline_versions or [] if v.display_name == candidate]
        same = [v for v in versions if f"spec sha256:{plan.spec_digest}" in (v.description or "")]
        if same:
            return same[0], candidate
        if not versions:
            return None, candidate
        name = candidate
    raise ClusterError(f"{session.host}: the pipeline versions {plan.version_name!r} and {name!r} both hold other "
                       "specs; delete one of them")


def _upload_pipeline(client: KfpClient, session: Session, plan: Plan) -> str:
    session.doing = f"uploading the pipeline {plan.pipeline_name!r}"
    try:
        with quiet_kfp():
            pipeline = client.upload_pipeline(str(plan.package), pipeline_name=plan.pipeline_name,
                                              description=plan.pipeline_description, namespace=plan.namespace)
    except kfp_server_api.ApiException as exc:
        pipeline_id = find_pipeline(client, session, plan.pipeline_name) if exc.status == 409 else None
        if pipeline_id is None:  # 409: uploaded meanwhile by someone else, and theirs is used
            raise
        return pipeline_id
    session.changed.append(f"created the pipeline {plan.pipeline_name!r} ({pipeline.pipeline_id})")
    return pipeline.pipeline_id


def _upload_version(client: KfpClient, session: Session, plan: Plan, pipeline_id: str, name: str):
    session.doing = f"uploading the pipeline version {name!r}"
    try:
        with quiet_kfp():
            version = client.upload_pipeline_version(str(plan.package), name, pipeline_id=pipeline_id,
                                                     description=plan.version_description)
    except kfp_server_api.ApiException as exc:
        version = find_version(client, session, pipeline_id, plan)[0] if exc.status == 409 else None
        if version is None:
            raise
        return version
    session.changed.append(f"uploaded the pipeline version {name!r} ({version.pipeline_version_id})")
    return version


def submit(config: dict, package_path: Path, *, arguments: Optional[Mapping] = None,
           out: Callable[[str], None] = print) -> Submission:
    """Submit the compiled package at `package_path` for the resolved `config` (platform=kubeflow):
    a run, followed to its end with platform.wait, or the schedule platform.schedule; with
    platform.dry_run, only print what would be sent. `arguments`: pipeline parameters over the
    compiled defaults. Raises ConfigError or ClusterError (one line each)."""
    pf = config["platform"]
    plan = plan_submission(config, Path(package_path), arguments)
    if pf["dry_run"]:
        print_plan(plan, out)
        return Submission(kind="dry_run", version_name=plan.version_name)
    session = Session(pf, plan.auth)
    with session.errors_as_one_line():
        client = connect(pf, session)
        pipeline_id = find_pipeline(client, session, plan.pipeline_name)
        version, version_name = (find_version(client, session, pipeline_id, plan) if pipeline_id
                                 else (None, plan.version_name))
        experiment = find_experiment(client, session, plan.experiment)
        if experiment is not None and experiment.storage_state == "ARCHIVED":
            raise ConfigError(f"platform.experiment: {plan.experiment!r} is archived on {session.host}; restore it "
                              "in the KFP UI or name another")
        if experiment is None:
            session.doing = f"creating the experiment {plan.experiment!r}"
            with quiet_kfp():
                experiment = client.create_experiment(plan.experiment, namespace=plan.namespace,
                                                      description=EXPERIMENT_DESCRIPTION)
            session.changed.append(f"created the experiment {plan.experiment!r} ({experiment.experiment_id})")
        pipeline_id = pipeline_id or _upload_pipeline(client, session, plan)
        version = version or _upload_version(client, session, plan, pipeline_id, version_name)
        done = dict(pipeline_id=pipeline_id, version_id=version.pipeline_version_id, version_name=version_name,
                    experiment_id=experiment.experiment_id)
        out(f"pipeline {plan.pipeline_name!r}, version {version_name!r} ({version.pipeline_version_id}), "
            f"experiment {plan.experiment!r}")
        if plan.cron:
            schedule, replaced = schedules.replace(
                client, session, experiment_id=experiment.experiment_id, name=plan.schedule_name, cron=plan.cron,
                pipeline_id=pipeline_id, version_id=version.pipeline_version_id, parameters=plan.parameters,
                description=schedule_description(plan, version_name))
            url = link(pf, f"recurringrun/details/{schedule.recurring_run_id}")
            out(f"schedule {plan.schedule_name!r} ({schedule.recurring_run_id}): '{plan.cron}' (second minute hour "
                f"day month weekday, the scheduler's time zone), one run at a time, no catch-up"
                f"{'; replaced ' + ', '.join(replaced) if replaced else ''}: {url}")
            return Submission(kind="schedule", schedule_id=schedule.recurring_run_id, url=url, **done)
        session.doing = "creating the run"
        with quiet_kfp():
            run = client.run_pipeline(experiment.experiment_id, plan.run_name, params=plan.parameters,
                                      pipeline_id=pipeline_id, version_id=version.pipeline_version_id)
        url = link(pf, f"runs/details/{run.run_id}")
        out(f"run {run.run_id}: {url}")
        state = follow(client, session, run.run_id, url, out) if pf["wait"] else run.state
        return Submission(kind="run", run_id=run.run_id, url=url, state=state, **done)


def print_plan(plan: Plan, out: Callable[[str], None]) -> None:
    """platform.dry_run: the requests submit would send, in order, with the bodies as kfp_server_api
    serializes the models kfp.Client builds (client.py create_experiment, run_pipeline,
    create_recurring_run); ids the server would assign are in <angle brackets>."""
    body = kfp_server_api.ApiClient().sanitize_for_serialization

    def query(**fields) -> str:  # unencoded, to be read
        return "&".join(f"{k}={v}" for k, v in fields.items() if v)

    version = kfp_server_api.V2beta1PipelineVersionReference(pipeline_id="<pipeline id>",
                                                             pipeline_version_id="<version id>")
    runtime = kfp_server_api.V2beta1RuntimeConfig(parameters=plan.parameters)
    experiment = kfp_server_api.V2beta1Experiment(display_name=plan.experiment, description=EXPERIMENT_DESCRIPTION,
                                                  namespace=plan.namespace or "")
    out(f"dry run: nothing is sent to {plan.host} (credentials: {plan.auth}; namespace: "
        f"{plan.namespace or 'none, single-user'})\npackage: {plan.package} (spec sha256:{plan.spec_digest})")
    out(f"1. look up the pipeline {plan.pipeline_name!r}, its version {plan.version_name!r} and the experiment "
        f"{plan.experiment!r}\n2. if the experiment is missing: POST /apis/v2beta1/experiments "
        f"{json.dumps(body(experiment))}")
    out(f"3. if the pipeline is missing: POST /apis/v2beta1/pipelines/upload?"
        f"{query(name=plan.pipeline_name, description=plan.pipeline_description, namespace=plan.namespace)} "
        f"(form file uploadfile: {plan.package.name})")
    out(f"4. unless the version exists with this spec: POST /apis/v2beta1/pipelines/upload_version?"
        f"{query(name=plan.version_name, pipelineid='<pipeline id>', description=plan.version_description)} "
        f"(form file uploadfile: {plan.package.name}; named {plan.version_name}-{plan.spec_digest[:8]} if "
        f"{plan.version_name} holds another spec)")
    if plan.cron:
        trigger = kfp_server_api.V2beta1Trigger(cron_schedule=kfp_server_api.V2beta1CronSchedule(cron=plan.cron))
        schedule = kfp_server_api.V2beta1RecurringRun(
            experiment_id="<experiment id>", mode=kfp_server_api.RecurringRunMode.DISABLE,
            pipeline_version_reference=version, runtime_config=runtime, display_name=plan.schedule_name,
            description=schedule_description(plan, plan.version_name), no_catchup=schedules.NO_CATCHUP,
            trigger=trigger, max_concurrency=schedules.MAX_CONCURRENCY)
        out(f"5. POST /apis/v2beta1/recurringruns {json.dumps(body(schedule), indent=2)}\n"
            f"6. DELETE /apis/v2beta1/recurringruns/<id> for each schedule {plan.schedule_name!r} in the experiment, "
            "then POST /apis/v2beta1/recurringruns/<new id>:enable")
    else:
        run = kfp_server_api.V2beta1Run(experiment_id="<experiment id>", display_name=plan.run_name,
                                        pipeline_version_reference=version, runtime_config=runtime)
        out(f"5. POST /apis/v2beta1/runs {json.dumps(body(run), indent=2)}")


def follow(client: KfpClient, session: Session, run_id: str, url: str, out: Callable[[str], None],
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> str:
    """Poll the run until a final state (FINAL_STATES) and return it; a line per state change and
    every PROGRESS_EVERY_S. Past platform.wait_timeout_s: ClusterError (the run goes on)."""
    pf = session.platform
    start = last_line = clock()
    last_state, errors = None, 0
    session.doing = f"following the run {run_id}"
    try:
        while True:
            try:
                state = client.get_run(run_id).state or "RUNTIME_STATE_UNSPECIFIED"
                errors = 0
            except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError) as exc:
                status = getattr(exc, "status", None)
                errors += 1  # a server restarting, a proxy dropping the connection: a while later it answers
                if (status is not None and status < 500) or errors > POLL_ERRORS_TOLERATED:
                    raise
                sleep(pf["poll_interval_s"])
                continue
            now = clock()
            if state != last_state or now - last_line >= PROGRESS_EVERY_S:
                out(f"run {run_id}: {state} after {_duration(now - start)}")
                last_state, last_line = state, now
            if state in FINAL_STATES:
                return state
            if now - start >= pf["wait_timeout_s"]:
                raise ClusterError(f"platform.wait_timeout_s: the run {run_id} is still {state} after "
                                   f"{_duration(now - start)}; it goes on on the cluster: {url}")
            sleep(min(pf["poll_interval_s"], max(0.0, start + pf["wait_timeout_s"] - now)))
    except KeyboardInterrupt:
        out(f"stopped waiting; the run {run_id} goes on on the cluster: {url}")
        raise


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def manage_schedule(config: dict, *, out: Callable[[str], None] = print) -> list:
    """platform.schedule_action on the schedule platform.schedule_name (list: every schedule in the
    experiment). Needs no package. Returns the recurring runs acted on."""
    pf, name, action = config["platform"], schedule_name(config), config["platform"]["schedule_action"]
    auth = credentials(pf)[1]
    target = "every schedule" if action == "list" else f"the schedule {name!r}"
    if pf["dry_run"]:
        out(f"dry run: nothing sent; would {action} {target} in the experiment {pf['experiment']!r} on "
            f"{pf['host']}{' namespace ' + pf['namespace'] if pf['namespace'] else ''} with {auth}")
        return []
    session = Session(pf, auth)
    with session.errors_as_one_line():
        client = connect(pf, session)
        experiment = find_experiment(client, session, pf["experiment"])
        if experiment is None:
            raise ConfigError(f"platform.experiment: no experiment {pf['experiment']!r} on {session.host}"
                              f"{' in ' + repr(session.namespace) if session.namespace else ''}, so no schedules")
        return schedules.act(client, session, experiment_id=experiment.experiment_id, experiment=pf["experiment"],
                             name=name, action=action, out=out)
