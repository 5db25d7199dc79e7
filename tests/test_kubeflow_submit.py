"""Submission to Kubeflow Pipelines (pipelines/kubeflow.py, pipelines/schedules.py).

The contract tests run the real kfp.Client (2.17.3) against tests/kfp_standin.py, a KFP v2beta1
API on 127.0.0.1 that validates every request and response against KFP's swagger; they assert the
exact requests sent, in order, and that the stand-in saw no contract violation. The package is the
project's train pipeline, compiled by pipelines/graph.py as submit compiles it."""

import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import kfp.client.client as kfp_client_module
import pytest
import yaml
from kfp import compiler, dsl

from components import lineage
from components.config import StorageConfig, config_hash, parse_config
from components.errors import ClusterError, ConfigError
from components.run_store import RunStore
from kfp_standin import Server, StandIn
from pipelines import graph, kubeflow, schedules, submit
from pipelines.config import compose_config

TOKEN = "secret-token"
BEARER = f"Bearer {TOKEN}"
CRON = "0 0 3 * * *"


@pytest.fixture(autouse=True)
def _no_local_kfp_state(tmp_path, monkeypatch):
    """No credentials or kfp context from this machine; kfp's context file must stay untouched."""
    context = tmp_path / "kfp-context.json"
    monkeypatch.setattr(kfp_client_module.Client, "_LOCAL_KFP_CONTEXT", str(context))
    for name in ("KFP_TOKEN", "KFP_COOKIE", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-service-account-token"))
    yield
    assert not context.exists()


@pytest.fixture
def start():
    """start(**StandIn fields) -> a running stand-in; each is stopped and checked for contract
    violations at the end of the test."""
    servers = []

    def start_one(**fields) -> Server:
        servers.append(Server(StandIn(**fields)).start())
        return servers[-1]

    yield start_one
    for server in servers:
        server.stop()
    for server in servers:
        assert server.standin.violations == []


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", TOKEN)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The train pipeline, compiled as submit compiles it."""
    path = tmp_path_factory.mktemp("package") / "pipeline.yaml"
    compiler.Compiler().compile(graph.build_pipeline(compose_config([])), str(path))
    return path


def config(server, *overrides) -> dict:
    return compose_config(["platform=kubeflow", f"platform.host={server.url}", "platform.poll_interval_s=0.01",
                           *overrides])


def compiled_default(package) -> str:
    return yaml.safe_load(package.read_text())["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]


def default_parameters(config_json: str) -> dict:
    """What a run of the default pipeline sends: config_json and the typed parameters, each as the
    compiled pipeline declares it (all strings, "" for null: components/run_parameters.py)."""
    return {"config_json": config_json, "run_id": "", "data_path": "data/digits.csv", "data_repo": "",
            "data_rev": "", "target": "", "batch_size": "auto", "micro_batch_size": "auto"}


def name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]})


def expected_version_name(cfg: dict) -> str:
    code = lineage.code_version()
    return f"{code['commit'][:12]}{'-dirty' if code['dirty'] else ''}-{config_hash(parse_config(cfg))}"


# --- the first submission ------------------------------------------------------------------------

def test_contract_a_first_run_looks_up_then_creates_experiment_pipeline_version_and_run(start, token, package):
    server = start(users={BEARER: ("alice@example.com", ())})
    cfg, out = config(server), []
    done = kubeflow.submit(cfg, package, out=out.append)
    st = server.standin
    assert st.calls() == ["GET /apis/v2beta1/healthz", "GET /apis/v2beta1/pipelines", "GET /apis/v2beta1/experiments",
                          "GET /apis/v2beta1/experiments", "POST /apis/v2beta1/experiments",
                          "POST /apis/v2beta1/pipelines/upload", "POST /apis/v2beta1/pipelines/upload_version",
                          "POST /apis/v2beta1/runs"]
    healthz, pipelines, experiments, _, create_experiment, upload, upload_version, create_run = st.requests
    assert all(r.headers["authorization"] == BEARER for r in st.requests)
    assert healthz.headers["user-agent"] == "OpenAPI-Generator/2.17.3/python"
    assert pipelines.query == {"page_token": "", "page_size": "100", "sort_by": "",
                               "filter": name_filter("convergence-train")}  # single-user: no namespace
    assert experiments.query == {"filter": name_filter("convergence-pipeline"), "namespace": ""}
    assert create_experiment.body == {"display_name": "convergence-pipeline", "namespace": "",
                                      "description": "runs of python -m pipelines.submit"}
    spec = yaml.safe_load(package.read_text())
    assert upload.query == {"name": "convergence-train", "description": spec["pipelineInfo"]["description"]}
    assert upload.form == {"uploadfile": ("pipeline.yaml", package.read_bytes())}
    pipeline = next(iter(st.pipelines.values()))
    version_name = expected_version_name(cfg)
    code, digest = lineage.code_version(), kubeflow.spec_digest(spec, {})
    assert upload_version.query == {
        "name": version_name, "pipelineid": pipeline["pipeline_id"],
        "description": f"code {code['commit']}{' (dirty)' if code['dirty'] else ''}, "
                       f"config_hash {config_hash(parse_config(cfg))}, spec sha256:{digest}"}
    assert upload_version.form == upload.form
    version = next(v for v in st.versions.values() if v["name"] == version_name)
    experiment = next(iter(st.experiments.values()))
    assert create_run.body == {
        "experiment_id": experiment["experiment_id"], "display_name": create_run.body["display_name"],
        "pipeline_version_reference": {"pipeline_id": pipeline["pipeline_id"],
                                       "pipeline_version_id": version["pipeline_version_id"]},
        "runtime_config": {"parameters": default_parameters(compiled_default(package))}}
    assert create_run.body["display_name"].startswith("convergence-train 20")
    run_id = next(iter(st.runs))
    assert done == kubeflow.Submission(kind="run", pipeline_id=pipeline["pipeline_id"],
                                       version_id=version["pipeline_version_id"], version_name=version_name,
                                       experiment_id=experiment["experiment_id"], run_id=run_id,
                                       url=f"{server.url}/#/runs/details/{run_id}", state="PENDING")
    assert out[-1] == f"run {run_id}: {server.url}/#/runs/details/{run_id}"


def test_contract_submitting_again_reuses_the_pipeline_version_and_the_experiment(start, package):
    server = start()  # a port-forward: no credentials
    cfg = config(server)
    first = kubeflow.submit(cfg, package, out=lambda line: None)
    del server.standin.requests[:]
    again = kubeflow.submit(cfg, package, out=lambda line: None)
    version_name = expected_version_name(cfg)
    assert server.standin.calls() == [
        "GET /apis/v2beta1/healthz", "GET /apis/v2beta1/pipelines",
        f"GET /apis/v2beta1/pipelines/{first.pipeline_id}/versions", "GET /apis/v2beta1/experiments",
        "POST /apis/v2beta1/runs"]
    assert server.standin.requests[2].query == {"page_token": "", "page_size": "100", "sort_by": "",
                                                "filter": name_filter(version_name)}
    assert all("authorization" not in r.headers for r in server.standin.requests)
    assert (again.pipeline_id, again.version_id, again.experiment_id) == \
        (first.pipeline_id, first.version_id, first.experiment_id)
    assert again.run_id != first.run_id and len(server.standin.runs) == 2


def test_contract_a_version_name_holding_another_spec_gets_the_spec_digest_appended(start, package, tmp_path):
    server = start()
    first = kubeflow.submit(config(server), package, out=lambda line: None)
    # platform.image changes the spec but not the config hash: same name, another spec
    other = compose_config(["platform.image=registry.example.com/convergence@sha256:" + "a" * 64])
    other_package = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(graph.build_pipeline(other), str(other_package))
    digest = kubeflow.spec_digest(*kubeflow.read_package(other_package))
    second = kubeflow.submit(config(server), other_package, out=lambda line: None)
    assert second.version_name == f"{first.version_name}-{digest[:8]}" != first.version_name
    assert second.pipeline_id == first.pipeline_id and second.version_id != first.version_id
    third = kubeflow.submit(config(server), other_package, out=lambda line: None)
    assert third.version_id == second.version_id  # found under the suffixed name: no third upload
    assert len(server.standin.named("POST /apis/v2beta1/pipelines/upload_version")) == 2


def test_contract_a_409_on_either_upload_uses_what_the_other_submitter_uploaded(start, package):
    server = start()
    st, cfg = server.standin, config(server)
    theirs = {}
    # another submitter uploads the same pipeline, then the same version, just before we do
    st.before("POST", "/pipelines/upload$", lambda: theirs.update(pipeline=st.add_pipeline("convergence-train")))
    plan = kubeflow.plan_submission(cfg, package)
    st.before("POST", "/pipelines/upload_version$", lambda: theirs.update(version=st.add_version(
        theirs["pipeline"]["pipeline_id"], plan.version_name, package.read_bytes(), plan.version_description)))
    done = kubeflow.submit(cfg, package, out=lambda line: None)
    assert [r.call for r in st.requests if r.method == "POST"] == [
        "POST /apis/v2beta1/experiments", "POST /apis/v2beta1/pipelines/upload",
        "POST /apis/v2beta1/pipelines/upload_version", "POST /apis/v2beta1/runs"]
    assert (done.pipeline_id, done.version_id) == (theirs["pipeline"]["pipeline_id"],
                                                   theirs["version"]["pipeline_version_id"])
    assert len(st.pipelines) == 1 and len(st.versions) == 2  # theirs: the first version and ours


# --- multi-user mode: the namespace, auth -------------------------------------------------------

def test_contract_multi_user_the_namespace_goes_into_every_call_that_takes_one(start, token, package):
    server = start(multi_user=True, users={BEARER: ("alice@example.com", ("team-ml",))})
    kubeflow.submit(config(server, "platform.namespace=team-ml", f"platform.schedule='{CRON}'"), package,
                    out=lambda line: None)
    st = server.standin
    by_call = {r.call: r for r in st.requests}
    assert st.calls().count("GET /apis/v2beta1/healthz") == 1  # the constructor's own check is skipped
    assert by_call["GET /apis/v2beta1/pipelines"].query["namespace"] == "team-ml"
    assert by_call["GET /apis/v2beta1/experiments"].query["namespace"] == "team-ml"
    assert by_call["POST /apis/v2beta1/experiments"].body["namespace"] == "team-ml"
    assert by_call["POST /apis/v2beta1/pipelines/upload"].query["namespace"] == "team-ml"
    experiment = next(iter(st.experiments.values()))
    listing = by_call["GET /apis/v2beta1/recurringruns"].query
    assert listing["experiment_id"] == experiment["experiment_id"] and "namespace" not in listing
    assert [r["namespace"] for r in (experiment, *st.pipelines.values(), *st.recurring_runs.values())] == \
        ["team-ml"] * 3


def test_contract_multi_user_without_a_namespace_is_refused_after_healthz_alone(start, token, package):
    server = start(multi_user=True, users={BEARER: ("alice@example.com", ("team-ml",))})
    with pytest.raises(ConfigError, match=r"^platform\.namespace: required: .* multi-user mode; set your "
                                          r"profile's namespace, e\.g\. platform\.namespace="):
        kubeflow.submit(config(server), package)
    assert server.standin.calls() == ["GET /apis/v2beta1/healthz"]


def test_contract_refused_credentials_are_one_line_and_nothing_is_created(start, monkeypatch, package):
    server = start(multi_user=True, users={BEARER: ("alice@example.com", ("team-ml",))})
    monkeypatch.setenv("KFP_TOKEN", "expired")
    with pytest.raises(ClusterError) as refused:
        kubeflow.submit(config(server, "platform.namespace=team-ml"), package)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (f"{server.url} refused the credentials (the bearer token in $KFP_TOKEN) with 401 "
                       f"Unauthorized while asking {server.url} for /apis/v2beta1/healthz: Unauthenticated: Request "
                       "header error: there is no user identity header.; nothing was created; set $KFP_TOKEN to a "
                       "valid token or $KFP_COOKIE to a session cookie")
    assert server.standin.calls() == ["GET /apis/v2beta1/healthz"]


def test_contract_a_namespace_the_caller_may_not_use_is_a_one_line_403_before_any_write(start, token, package):
    server = start(multi_user=True, users={BEARER: ("alice@example.com", ("team-ml",))})
    with pytest.raises(ClusterError) as denied:
        kubeflow.submit(config(server, "platform.namespace=team-typo"), package)
    message = str(denied.value)
    assert "\n" not in message
    assert message.startswith(f"platform.namespace: {server.url} denied access to the namespace 'team-typo' "
                              "(403 Forbidden) while looking up the pipeline 'convergence-train': Failed to authorize "
                              "with API: PermissionDenied: User 'alice@example.com' is not authorized")
    assert message.endswith("; nothing was created; check that the namespace (a Kubeflow profile) exists and that "
                            "the bearer token in $KFP_TOKEN may use it")
    assert all(r.method == "GET" for r in server.standin.requests) and not server.standin.experiments


def test_contract_the_cookie_and_the_service_account_token_are_sent(start, monkeypatch, tmp_path, package):
    server = start(users={"authservice_session=abc": ("bob", ()), "Bearer from-the-volume": ("pod", ())})
    monkeypatch.setenv("KFP_COOKIE", "authservice_session=abc")
    kubeflow.submit(config(server), package, out=lambda line: None)
    assert {r.headers.get("cookie") for r in server.standin.requests} == {"authservice_session=abc"}
    monkeypatch.delenv("KFP_COOKIE")
    token_file = tmp_path / "token"
    token_file.write_text("from-the-volume")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    del server.standin.requests[:]
    kubeflow.submit(config(server), package, out=lambda line: None)
    assert {r.headers.get("authorization") for r in server.standin.requests} == {"Bearer from-the-volume"}


# --- failures ------------------------------------------------------------------------------------

def test_contract_a_rejected_run_says_what_the_submission_created(start, package):
    server = start()
    server.standin.fail("POST", "/runs$", 500, "Internal error: the database is gone")
    with pytest.raises(ClusterError) as rejected:
        kubeflow.submit(config(server), package)
    st = server.standin
    experiment, pipeline = next(iter(st.experiments.values())), next(iter(st.pipelines.values()))
    version = next(v for v in st.versions.values() if v["name"] != "convergence-train")
    assert str(rejected.value) == (
        f"{server.url} rejected the request with 500 Internal Server Error while creating the run: Internal error: "
        f"the database is gone; before that, this submission: created the experiment 'convergence-pipeline' "
        f"({experiment['experiment_id']}), created the pipeline 'convergence-train' ({pipeline['pipeline_id']}), "
        f"uploaded the pipeline version '{version['name']}' ({version['pipeline_version_id']})")


def test_contract_bad_parameters_and_a_bad_cron_fail_before_any_request(start, token, package):
    server = start()
    with pytest.raises(ConfigError, match=r"^pipeline parameter 'config_jsn': the compiled pipeline has no such "
                                          r"parameter \(it has batch_size, config_json, data_path, data_repo, "
                                          r"data_rev, micro_batch_size, run_id, target\)$"):
        kubeflow.submit(config(server), package, arguments={"config_jsn": "{}"})
    with pytest.raises(ConfigError, match=r"^pipeline parameter 'config_json': the pipeline declares STRING; got dict"):
        kubeflow.submit(config(server), package, arguments={"config_json": {}})
    with pytest.raises(ConfigError, match=r"use '0 0 2 \* \* \*'$"):
        kubeflow.submit(config(server, "platform.schedule='0 2 * * *'"), package)
    assert server.standin.requests == []


def test_contract_parameters_are_sent_typed_as_the_compiled_pipeline_declares(start, tmp_path):
    @dsl.component(base_image="python:3.11")
    def echo(n: int, lr: float, flag: bool, name: str, sizes: list, extra: dict):
        print(n, lr, flag, name, sizes, extra)

    @dsl.pipeline(name="typed")
    def typed(n: int = 3, lr: float = 0.1, flag: bool = True, name: str = "x", sizes: list = [8, 16],
              extra: dict = {"a": 1}):
        echo(n=n, lr=lr, flag=flag, name=name, sizes=sizes, extra=extra)

    path = tmp_path / "typed.yaml"
    compiler.Compiler().compile(typed, str(path))
    server = start()
    kubeflow.submit(config(server), path, arguments={"n": 5, "lr": 1, "flag": False}, out=lambda line: None)
    sent = server.standin.named("POST /apis/v2beta1/runs")[0].body["runtime_config"]["parameters"]
    assert sent == {"n": 5, "lr": 1.0, "flag": False, "name": "x", "sizes": [8, 16], "extra": {"a": 1}}
    assert [type(sent[k]) for k in ("n", "lr", "flag")] == [int, float, bool]
    with pytest.raises(ConfigError, match="'n': the pipeline declares NUMBER_INTEGER; got bool"):
        kubeflow.submit(config(server), path, arguments={"n": True})


def test_contract_an_unreachable_host_fails_in_one_line_without_kfps_25_s_of_healthz_retries(package):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ClusterError, match=rf"^platform\.host: cannot reach http://127\.0\.0\.1:{port} while asking "
                                           r".*healthz: .*Connection refused; nothing was created$"):
        kubeflow.submit(compose_config(["platform=kubeflow", f"platform.host=http://127.0.0.1:{port}"]), package)
    assert time.monotonic() - started < 3


def test_contract_a_host_that_is_not_the_kfp_api_says_so(package):
    class LoginPage(BaseHTTPRequestHandler):
        def do_GET(self):
            page = b"<html><body>Log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    http = HTTPServer(("127.0.0.1", 0), LoginPage)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ClusterError, match=r"healthz answered with text/html, not KFP's JSON: the host is not the "
                                               r"KFP API, or it wants a login"):
            kubeflow.submit(compose_config(["platform=kubeflow",
                                            f"platform.host=http://127.0.0.1:{http.server_address[1]}"]), package)
    finally:
        http.shutdown()
        http.server_close()


# --- following a run -----------------------------------------------------------------------------

def test_contract_a_cancelled_run_ends_the_wait(start, package):
    server = start(run_states=["PENDING", "RUNNING", "RUNNING", "CANCELING", "CANCELED"])
    out = []
    done = kubeflow.submit(config(server, "platform.wait=true"), package, out=out.append)
    assert done.state == "CANCELED"
    assert [line.split(": ", 1)[1].split(" after")[0] for line in out[2:]] == ["RUNNING", "CANCELING", "CANCELED"]
    assert server.standin.calls().count(f"GET /apis/v2beta1/runs/{done.run_id}") == 4


def test_contract_a_run_that_never_ends_hits_the_timeout_in_one_line(start, package):
    server = start(run_states=["PENDING", "RUNNING"])
    with pytest.raises(ClusterError) as timed_out:
        kubeflow.submit(config(server, "platform.wait=true", "platform.wait_timeout_s=0.3"), package,
                        out=lambda line: None)
    run_id = next(iter(server.standin.runs))
    assert str(timed_out.value) == (f"platform.wait_timeout_s: the run {run_id} is still RUNNING after 0m00s; it goes "
                                    f"on on the cluster: {server.url}/#/runs/details/{run_id}")


def test_follow_survives_a_few_server_errors_and_prints_a_line_a_minute(start, package):
    server = start(run_states=["PENDING"] + ["RUNNING"] * 5 + ["SUCCEEDED"])
    run = kubeflow.submit(config(server), package, out=lambda line: None)
    for _ in range(3):
        server.standin.fail("GET", f"/runs/{run.run_id}$", 503, "upstream connect error")
    clock, out = iter(range(0, 10000, 30)), []
    session = kubeflow.Session(config(server)["platform"], "no credentials")
    client = kubeflow.connect(session.platform, session)
    with session.errors_as_one_line():
        state = kubeflow.follow(client, session, run.run_id, run.url, out.append, clock=lambda: next(clock),
                                sleep=lambda s: None)
    assert state == "SUCCEEDED"
    assert server.standin.calls().count(f"GET /apis/v2beta1/runs/{run.run_id}") == 3 + 6  # 3 answered 503
    # a line per state change, and one more every minute of RUNNING (the clock moves 30 s a poll)
    assert [line.split(": ")[1] for line in out] == ["RUNNING after 0m30s", "RUNNING after 1m30s",
                                                     "RUNNING after 2m30s", "SUCCEEDED after 3m00s"]


# --- schedules -----------------------------------------------------------------------------------

def recurring_body(server, name="train-schedule", cron=CRON) -> dict:
    st = server.standin
    version = next(v for v in st.versions.values() if v["name"] != "convergence-train")
    return {"display_name": name, "experiment_id": next(iter(st.experiments)), "mode": "DISABLE",
            "description": f"retrains convergence-train {version['name']} at '{cron}'",
            "trigger": {"cron_schedule": {"cron": cron}}, "max_concurrency": 1, "no_catchup": True,
            "pipeline_version_reference": {"pipeline_id": version["pipeline_id"],
                                           "pipeline_version_id": version["pipeline_version_id"]},
            "runtime_config": {"parameters": default_parameters(compiled_default_of(st))}}


def compiled_default_of(st) -> str:
    version = next(v for v in st.versions.values() if v["name"] != "convergence-train")
    return version["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]


def test_contract_a_schedule_is_a_recurring_run_on_the_version_created_paused_then_enabled(start, package):
    server = start()
    out = []
    done = kubeflow.submit(config(server, f"platform.schedule='{CRON}'"), package, out=out.append)
    st = server.standin
    assert st.calls()[-4:] == ["GET /apis/v2beta1/recurringruns", "POST /apis/v2beta1/recurringruns",
                               f"POST /apis/v2beta1/recurringruns/{done.schedule_id}:enable",
                               f"GET /apis/v2beta1/recurringruns/{done.schedule_id}"]
    assert "POST /apis/v2beta1/runs" not in st.calls()
    listing, create, enable = st.requests[-4:-1]
    assert listing.query == {"page_token": "", "page_size": "100", "sort_by": "", "experiment_id": done.experiment_id,
                             "filter": name_filter("train-schedule")}
    assert create.body == recurring_body(server)
    assert type(create.body["max_concurrency"]) is int  # kfp sends a number; the server answers "1"
    assert enable.body is None
    (recurring,) = st.recurring_runs.values()
    assert (recurring["status"], recurring["max_concurrency"], recurring["no_catchup"]) == ("ENABLED", "1", True)
    assert out[-1].startswith(f"schedule 'train-schedule' ({done.schedule_id}): '{CRON}'")
    assert done.url == f"{server.url}/#/recurringrun/details/{done.schedule_id}"


def test_contract_the_same_schedule_name_replaces_every_recurring_run_of_that_name(start, package):
    server = start()
    st = server.standin
    first = kubeflow.submit(config(server, f"platform.schedule='{CRON}'"), package, out=lambda line: None)
    duplicate = str(uuid.uuid4())  # one an older submitter left with the same name
    st.recurring_runs[duplicate] = {**st.recurring_runs[first.schedule_id], "recurring_run_id": duplicate}
    other = kubeflow.submit(config(server, "platform.schedule='0 30 4 * * MON-FRI'", "platform.schedule_name=other"),
                            package, out=lambda line: None)
    del st.requests[:]
    out = []
    done = kubeflow.submit(config(server, "platform.schedule='0 0 5 * * *'"), package, out=out.append)
    calls = st.calls()
    # created paused, the old ones deleted, then enabled: never two enabled, never none left by a failed create
    assert calls[calls.index("GET /apis/v2beta1/recurringruns"):] == [
        "GET /apis/v2beta1/recurringruns", "POST /apis/v2beta1/recurringruns",
        f"DELETE /apis/v2beta1/recurringruns/{first.schedule_id}", f"DELETE /apis/v2beta1/recurringruns/{duplicate}",
        f"POST /apis/v2beta1/recurringruns/{done.schedule_id}:enable",
        f"GET /apis/v2beta1/recurringruns/{done.schedule_id}"]
    assert st.named("POST /apis/v2beta1/recurringruns")[0].body == recurring_body(server, cron="0 0 5 * * *")
    left = {r["recurring_run_id"]: (r["display_name"], r["status"], r["trigger"]["cron_schedule"]["cron"])
            for r in st.recurring_runs.values()}
    assert left == {done.schedule_id: ("train-schedule", "ENABLED", "0 0 5 * * *"),
                    other.schedule_id: ("other", "ENABLED", "0 30 4 * * MON-FRI")}
    assert f"replaced {first.schedule_id}, {duplicate}: " in out[-1]


def test_contract_a_failed_replacement_leaves_the_old_schedule_or_says_what_exists(start, package):
    server = start()
    st = server.standin
    first = kubeflow.submit(config(server, f"platform.schedule='{CRON}'"), package, out=lambda line: None)
    st.fail("POST", "/recurringruns$", 400, "Invalid input error: something the server dislikes")
    with pytest.raises(ClusterError, match=r"while creating the schedule 'train-schedule': Invalid input error: "
                                           r"something the server dislikes; nothing was created$"):
        kubeflow.submit(config(server, "platform.schedule='0 0 5 * * *'"), package)
    assert list(st.recurring_runs) == [first.schedule_id]  # untouched
    st.fail("POST", ":enable$", 503, "upstream connect error")
    with pytest.raises(ClusterError) as failed:
        kubeflow.submit(config(server, "platform.schedule='0 0 5 * * *'"), package)
    (new,) = st.recurring_runs
    assert str(failed.value).endswith(
        f"while enabling the schedule 'train-schedule' ({new}; resume it with platform.schedule_action=resume): "
        f"upstream connect error; before that, this submission: the schedule 'train-schedule' ({new}, paused), "
        f"deleted the old schedule {first.schedule_id}")


def test_contract_pause_resume_delete_and_list_the_named_schedule(start, package):
    server = start()
    st = server.standin
    created = kubeflow.submit(config(server, f"platform.schedule='{CRON}'"), package, out=lambda line: None)
    sid = created.schedule_id
    for action, call, status in (("pause", f"POST /apis/v2beta1/recurringruns/{sid}:disable", "DISABLED"),
                                 ("resume", f"POST /apis/v2beta1/recurringruns/{sid}:enable", "ENABLED")):
        del st.requests[:]
        out = []
        kubeflow.manage_schedule(config(server, f"platform.schedule_action={action}"), out=out.append)
        assert st.calls() == ["GET /apis/v2beta1/healthz", "GET /apis/v2beta1/experiments",
                              "GET /apis/v2beta1/recurringruns", call]
        assert st.recurring_runs[sid]["status"] == status
        assert out == [f"schedule 'train-schedule' ({sid}): {action}d"]
    out = []
    kubeflow.manage_schedule(config(server, "platform.schedule_action=list"), out=out.append)
    assert st.requests[-1].query == {"page_token": "", "page_size": "100", "sort_by": "",
                                     "experiment_id": created.experiment_id}
    assert out == [f"train-schedule  {sid}  cron '{CRON}'  ENABLED  version {created.version_id}  no_catchup=True  "
                   "max_concurrency=1"]
    kubeflow.manage_schedule(config(server, "platform.schedule_action=delete"), out=lambda line: None)
    assert st.calls()[-1] == f"DELETE /apis/v2beta1/recurringruns/{sid}" and not st.recurring_runs
    with pytest.raises(ConfigError, match=r"^platform\.schedule_name: no schedule named 'train-schedule' in the "
                                          r"experiment 'convergence-pipeline'; list them with"):
        kubeflow.manage_schedule(config(server, "platform.schedule_action=pause"))


def test_contract_managing_a_schedule_never_creates_the_experiment(start):
    server = start()
    with pytest.raises(ConfigError, match=r"^platform\.experiment: no experiment 'convergence-pipeline' on "):
        kubeflow.manage_schedule(config(server, "platform.schedule_action=list"))
    assert server.standin.calls() == ["GET /apis/v2beta1/healthz", "GET /apis/v2beta1/experiments"]


# --- dry run -------------------------------------------------------------------------------------

def printed_body(out: list, request: str) -> dict:
    text = next(line for line in out if request in line)
    return json.loads(text.split(request, 1)[1].split("\n6. ")[0])


@pytest.mark.parametrize("schedule", [None, CRON])
def test_contract_a_dry_run_sends_nothing_and_prints_the_bodies_a_submission_sends(start, package, schedule):
    server = start()
    extra = [f"platform.schedule='{schedule}'"] if schedule else []
    out = []
    assert kubeflow.submit(config(server, "platform.dry_run=true", *extra), package, out=out.append).kind == "dry_run"
    assert server.standin.requests == []
    request = "POST /apis/v2beta1/recurringruns " if schedule else "POST /apis/v2beta1/runs "
    printed = printed_body(out, request)
    kubeflow.submit(config(server, *extra), package, out=lambda line: None)
    sent = server.standin.named(request.strip())[0].body
    ids = {"<experiment id>": sent["experiment_id"],
           "<pipeline id>": sent["pipeline_version_reference"]["pipeline_id"],
           "<version id>": sent["pipeline_version_reference"]["pipeline_version_id"]}
    printed = json.loads(_replace(json.dumps(printed), ids))
    if not schedule:
        printed["display_name"] = sent["display_name"]  # the run's name carries the time
    assert printed == sent
    assert printed_body(out, "POST /apis/v2beta1/experiments ") == \
        server.standin.named("POST /apis/v2beta1/experiments")[0].body


def _replace(text: str, ids: dict) -> str:
    for placeholder, value in ids.items():
        text = text.replace(placeholder, value)
    return text


def test_a_dry_run_of_a_schedule_action_contacts_nothing():
    out = []
    cfg = compose_config(["platform=kubeflow", "platform.host=http://127.0.0.1:9", "platform.dry_run=true",
                          "platform.schedule_action=pause"])
    assert kubeflow.manage_schedule(cfg, out=out.append) == []
    assert out == ["dry run: nothing sent; would pause the schedule 'train-schedule' in the experiment "
                   "'convergence-pipeline' on http://127.0.0.1:9 with no credentials (neither $KFP_TOKEN nor "
                   "$KFP_COOKIE is set)"]


# --- the stand-in holds the contract -------------------------------------------------------------

def test_contract_the_standin_refuses_what_the_kfp_server_refuses(start):
    import urllib.request

    server = start()
    body = json.dumps({"display_name": "x", "bogus": 1}).encode()
    request = urllib.request.Request(f"{server.url}/apis/v2beta1/experiments", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.request.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 400
    assert server.standin.violations == ["POST /apis/v2beta1/experiments: body <body>: Additional properties are not "
                                         "allowed ('bogus' was unexpected)"]
    contract = server.standin.contract
    assert contract.errors("v2beta1ListRecurringRunsResponse", {"recurring_runs": []}, requests=False)
    assert contract.errors("v2beta1RecurringRun", {"max_concurrency": 1}, requests=False)  # int64 answers as a string
    assert not contract.errors("v2beta1RecurringRun", {"max_concurrency": 1}, requests=True)
    del server.standin.violations[:]


# --- the cron KFP reads --------------------------------------------------------------------------

@pytest.mark.parametrize("cron", ["0 0 3 * * *", "0 */15 * * * *", "0 0 3 * * MON", "0 0 3 * * mon-fri",
                                  "0 0 9 ? * 2-6", "30 5,35 8-18/2 1,15 JAN-jun *", "5/15 * * * * *", "@daily",
                                  "0 0 0 31 12 0"])
def test_cron_accepts_what_robfig_cron_parses(cron):
    assert schedules.check_cron(f"  {cron} ") == cron


def test_cron_refuses_five_fields_with_the_six_field_form_that_means_the_same():
    with pytest.raises(ConfigError) as refused:
        schedules.check_cron("0 2 * * *")
    assert str(refused.value) == ("platform.schedule: '0 2 * * *' has 5 fields, but KFP's cron has 6 with seconds "
                                  "first and would read it as second=0 minute=2 hour=* day of month=* month=*; for "
                                  "what the Unix cron means use '0 0 2 * * *'")


@pytest.mark.parametrize("cron, message", [
    ("60 0 3 * * *", "the second field '60' has 60, outside 0-59"),
    ("0 60 3 * * *", "the minute field '60' has 60, outside 0-59"),
    ("0 0 24 * * *", "the hour field '24' has 24, outside 0-23"),
    ("0 0 3 0 * *", "the day of month field '0' has 0, outside 1-31"),
    ("0 0 3 32 * *", "the day of month field '32' has 32, outside 1-31"),
    ("0 0 3 * 13 *", "the month field '13' has 13, outside 1-12"),
    ("0 0 3 * * 7", "the day of week field '7' has 7, outside 0-6; day of week is 0-6 (Sunday is 0)"),
    ("0 0 5-3 * * *", "the hour field '5-3' has the range '5-3', which ends before it starts"),
    ("0 */0 * * * *", "the minute field '*/0' has the step '0'; a step is a positive number"),
    ("0 0 MON * * *", "the hour field 'MON' has 'MON', not a number"),
    ("0 0 3 * * FUN", "the day of week field 'FUN' has 'FUN', not a number or a name (sun, mon, tue"),
    ("0 0 3,,4 * * *", "the hour field '3,,4' has '', not a number"),
])
def test_cron_refuses_a_field_out_of_its_range_naming_it(cron, message):
    with pytest.raises(ConfigError) as refused:
        schedules.check_cron(cron)
    assert str(refused.value).startswith(f"platform.schedule: '{cron}': {message}")


@pytest.mark.parametrize("cron, message", [
    ("0 0 3 * * * 2026", "has 7 fields; KFP's cron has 6"),
    ("0 3 *", "has 3 fields"),
    ("@every 1h", "use 6 fields, seconds first"),
    ("@DAILY", "use 6 fields, seconds first"),
])
def test_cron_refuses_other_shapes(cron, message):
    with pytest.raises(ConfigError, match=message):
        schedules.check_cron(cron)


# --- the platform config -------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ([], "platform.host: required with platform=kubeflow"),
    (["platform.host=kfp.example.com"], "platform.host: must start with http:// or https://"),
    (["platform.host=http://x", "platform.namespace=Team_ML"], "platform.namespace: a Kubernetes namespace"),
    (["platform.host=http://x", "platform.schedule_action=stop"], "platform.schedule_action: must be one of pause"),
    (["platform.host=http://x", "platform.schedule_action=pause", f"platform.schedule='{CRON}'"],
     "platform.schedule_action: manages an existing schedule"),
    (["platform.host=http://x", "platform.wait=true", f"platform.schedule='{CRON}'"],
     "platform.wait: a schedule starts its runs later"),
    (["platform.host=http://x", "platform.wait_timeout_s=0"], "platform.wait_timeout_s: must be > 0"),
])
def test_the_kubeflow_platform_keys_are_checked_when_composed(overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        compose_config(["platform=kubeflow", *overrides])


def test_kubeflow_keys_are_refused_with_the_local_platform():
    with pytest.raises(ConfigError, match=r"^platform\.host: only used with platform=kubeflow"):
        compose_config(["platform.host=http://x"])


# --- through python -m pipelines.submit ------------------------------------------------------------

CLUSTER_READY = ["output_dir=s3://b/runs", "data=digits", "train.max_steps=50"]


def submit_argv(server, *overrides) -> list:
    return ["platform=kubeflow", f"platform.host={server.url}", "platform.poll_interval_s=0.01", *overrides]


def test_contract_submit_compiles_with_no_run_id_and_creates_the_run_on_the_uploaded_version(start, token, capsys):
    server = start(users={BEARER: ("alice@example.com", ())})
    assert submit.main(submit_argv(server, *CLUSTER_READY)) == 0
    st = server.standin
    assert st.calls()[-3:] == ["POST /apis/v2beta1/pipelines/upload", "POST /apis/v2beta1/pipelines/upload_version",
                               "POST /apis/v2beta1/runs"]
    cfg = config(server, *CLUSTER_READY)
    (version,) = [v for v in st.versions.values() if v["name"] == expected_version_name(cfg)]
    (pipeline,) = st.pipelines.values()
    (create_run,) = st.named("POST /apis/v2beta1/runs")
    assert create_run.body["pipeline_version_reference"] == {"pipeline_id": pipeline["pipeline_id"],
                                                             "pipeline_version_id": version["pipeline_version_id"]}
    parameters = create_run.body["runtime_config"]["parameters"]
    sent = json.loads(parameters.pop("config_json"))
    # the paths as given (a pod reads them), no run id (KFP's, at run time), the overrides in
    assert sent == {**cfg, "run_id": None}
    # the typed parameters of that config (data=digits reads no path)
    assert parameters == {"run_id": "", "data_path": "", "data_repo": "", "data_rev": "", "target": "",
                          "batch_size": "auto", "micro_batch_size": "auto"}
    assert (sent["output_dir"], sent["data"]["name"], sent["train"]["max_steps"]) == ("s3://b/runs", "digits", 50)
    (run_id,) = st.runs
    assert capsys.readouterr().out.splitlines()[-1] == f"run {run_id}: {server.url}/#/runs/details/{run_id}"


def test_contract_a_dry_run_through_submit_prints_the_run_and_sends_nothing(start, capsys):
    server = start()
    assert submit.main(submit_argv(server, *CLUSTER_READY, "platform.dry_run=true")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dry run: nothing is sent to {server.url} ")
    assert "5. POST /apis/v2beta1/runs {" in out and '\\"output_dir\\": \\"s3://b/runs\\"' in out
    assert server.standin.requests == []


@pytest.mark.parametrize("overrides, message", [
    (["output_dir=runs", "data=digits"], "output_dir: runs is a path on this machine (on Kubeflow every step runs "
                                         "in a pod); use output_dir=s3://bucket/prefix"),
    (["output_dir=s3://b/runs"], "data.repo: null (this checkout) is on this machine (on Kubeflow every step runs "
                                 "in a pod); use data.repo=<a git URL>, data=file data.path=s3://bucket/key, or "
                                 "data=digits"),
    (["output_dir=s3://b/runs", "data=file", "data.path=mine.csv"],
     "data.path: mine.csv is on this machine (on Kubeflow every step runs in a pod); use data.path=s3://bucket/key, "
     "data=dvc data.repo=<a git URL>, or data=digits"),
    (["output_dir=s3://b/runs", "data=digits", "run_id=r1"],
     "run_id: on Kubeflow each run's id is KFP's, given when it starts; drop run_id=r1"),
    (["output_dir=s3://b/runs", "data=digits", "registry.uri=reg"],
     "registry.uri: reg is a path on this machine (on Kubeflow every step runs in a pod); use an s3:// location"),
])
def test_contract_locations_a_pod_cannot_reach_are_one_line_before_any_request(start, capsys, tmp_path, overrides,
                                                                               message):
    server = start()
    assert submit.main(submit_argv(server, *overrides)) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert server.standin.requests == []
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("status, code", [("completed", 0), ("diverged", 3)])
def test_contract_wait_prints_the_published_run_and_exits_as_a_local_run(start, s3_server, s3_bucket, capsys, status,
                                                                         code):
    server = start()
    st = server.standin
    bucket = ["output_dir=s3://" + f"{s3_bucket}/runs", f"storage.endpoint_url={s3_server.endpoint_url}",
              "storage.region=us-east-1", "data=digits"]
    summary = {"run_id": None, "status": status, "test": {"accuracy": 0.97}, "data_version": "v1",
               "promotion": {"promoted": True, "reason": "run r promoted: no champion yet"}}

    def publish():  # what the run's evaluate and promote steps do on the cluster
        (run_id,) = st.runs
        store = RunStore.open(f"s3://{s3_bucket}/runs/{run_id}", StorageConfig(endpoint_url=s3_server.endpoint_url,
                                                                                 region="us-east-1"))
        store.put_json("summary.json", {**summary, "run_id": run_id})
        store.seal({"status": status})

    st.before("GET", "/runs/", publish)
    assert submit.main(submit_argv(server, *bucket, "platform.wait=true")) == code
    (run_id,) = st.runs
    out = capsys.readouterr().out
    assert f"run {run_id}: SUCCEEDED after " in out
    assert f"run directory: s3://{s3_bucket}/runs/{run_id}" in out
    assert "promotion: promoted: run r promoted: no champion yet" in out


def test_contract_wait_on_a_run_that_did_not_succeed_is_one_line_and_exit_2(start, capsys):
    server = start(run_states=["PENDING", "RUNNING", "FAILED"])
    assert submit.main(submit_argv(server, *CLUSTER_READY, "platform.wait=true")) == 2
    (run_id,) = server.standin.runs
    assert capsys.readouterr().err.splitlines() == [
        f"error: run {run_id} ended FAILED; its steps' logs: {server.url}/#/runs/details/{run_id}"]
