"""A stand-in Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, for contract tests of
pipelines/kubeflow.py with the real kfp.Client.

It answers the calls kfp.Client makes the way the KFP 2.17 API server does (backend code at tag
2.17.0, as ../shared/reference/README.md lists): snake_case keys, zero values left out, int64 as
strings, enums as names, `recurringRuns` as the one camelCase list key; 409 for a pipeline or
version name that exists; in multi-user mode, an empty namespace refused with 400 and a namespace
the caller may not use with 403 (400 with `error_message` on the upload endpoints); 401 for a
missing or unknown credential when `users` is given.

Every request and every response is validated against the swagger document
kfp_api_single_file.swagger.json: the path and method, each query key (declared, of its type), the
JSON body or multipart form, the `filter=` JSON, and the response body. Two adjustments make the
schemas as strict as the server: `additionalProperties: false` on every object schema with
properties and none given (the server rejects unknown fields: protojson DiscardUnknown is false),
and int64 fields accept an integer or a numeric string in requests (protojson does; kfp.Client
sends max_concurrency as a number) but only a numeric string in responses. A request that fails
is answered 400 and recorded in `violations`, as is a response that fails (a stand-in bug); the
tests' fixture asserts there are none.
"""

import email.parser
import email.policy
import functools
import itertools
import json
import re
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable, Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

import yaml
from jsonschema import Draft4Validator

from loopback import LoopbackServer

SWAGGER = Path(__file__).resolve().parent / "reference" / "kfp-v2beta1" / "kfp_api_single_file.swagger.json"
PREFIX = "/apis/v2beta1"
UPLOADS = (f"{PREFIX}/pipelines/upload", f"{PREFIX}/pipelines/upload_version")
OPERATIONS = ("OPERATION_UNSPECIFIED", "EQUALS", "NOT_EQUALS", "GREATER_THAN", "GREATER_THAN_EQUALS", "LESS_THAN",
              "LESS_THAN_EQUALS", "IN", "IS_SUBSTRING")
FINAL = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")
# grpc codes the gateway maps to these HTTP statuses
CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13, 503: 14}
INT64 = r"^-?[0-9]+$"


def _strict(schema, requests: bool):
    """A swagger schema as strict as the server (module doc)."""
    if isinstance(schema, list):
        return [_strict(s, requests) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:  # draft 4 ignores a $ref's siblings anyway
        return {"$ref": schema["$ref"]}
    if schema.get("type") == "string" and schema.get("format") == "int64":
        as_string = {"type": "string", "pattern": INT64}
        return {"anyOf": [{"type": "integer"}, as_string]} if requests else as_string
    if requests and schema.get("type") == "string" and "enum" in schema:  # protojson takes a name or a number
        return {"anyOf": [{"type": "string", "enum": schema["enum"]},
                          {"type": "integer", "minimum": 0, "maximum": len(schema["enum"]) - 1}]}
    out = {k: _strict(v, requests) if k in ("items", "additionalProperties") else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: _strict(v, requests) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


class Contract:
    """The swagger document, compiled into validators (`Contract.shared()`: one per test session)."""

    @classmethod
    @functools.lru_cache(maxsize=None)
    def shared(cls) -> "Contract":
        return cls()

    def __init__(self, path: Path = SWAGGER):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the contract tests validate against KFP's swagger there "
                                    "(the project's ../shared/reference, see its README)")
        self.spec = json.loads(path.read_text())
        self._definitions = {mode: {name: _strict(s, mode) for name, s in self.spec["definitions"].items()}
                             for mode in (True, False)}
        self._routes = []
        for template, methods in self.spec["paths"].items():
            pattern = re.sub(r"\{([^}]+)\}", lambda m: f"(?P<{m.group(1).replace('.', '_')}>[^/:]+)", template)
            for method, operation in methods.items():
                self._routes.append((template.count("{"), method.upper(), re.compile(f"^{pattern}$"), template,
                                     operation))
        self._routes.sort(key=lambda route: route[0])  # literal paths before templated ones

    def errors(self, definition: str, body, requests: bool) -> List[str]:
        validator = Draft4Validator({"$ref": f"#/definitions/{definition}",
                                     "definitions": self._definitions[requests]},
                                    format_checker=Draft4Validator.FORMAT_CHECKER)
        return [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in validator.iter_errors(body)]

    def operation(self, method: str, path: str):
        """(template, operation, path parameters) for a request, or None."""
        for _, route_method, pattern, template, operation in self._routes:
            match = pattern.match(path)
            if route_method == method and match:
                return template, operation, match.groupdict()
        return None


@dataclass
class Request:
    method: str
    path: str
    query: Dict[str, str]
    body: Optional[object]
    form: Dict[str, tuple]  # name -> (filename, bytes)
    headers: Dict[str, str]

    @property
    def call(self) -> str:
        return f"{self.method} {self.path}"


class Reply(Exception):
    """An error answer: status, body, content type."""

    def __init__(self, status: int, body, content_type: str = "application/json"):
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


def rpc_error(status: int, message: str) -> Reply:
    return Reply(status, {"code": CODES[status], "message": message})


def upload_error(status: int, message: str) -> Reply:
    """pipeline_upload_server.go writeErrorToResponse: no Content-Type set, so Go sniffs text/plain."""
    return Reply(status, {"error_message": message, "error_details": message}, "text/plain; charset=utf-8")


def _pruned(message: dict) -> dict:
    """protojson with EmitUnpopulated false: zero values and empty lists and maps left out
    (inside pipeline_spec and parameters, which are Structs, every value is kept)."""
    return {k: (v if k in ("pipeline_spec", "parameters") or not isinstance(v, dict) else _pruned(v))
            for k, v in message.items() if v not in (None, "", 0, False, [], {})}


@dataclass
class StandIn:
    """The server's state and behaviour. `users`: credential ("Bearer <token>" or a Cookie header
    value) -> (identity, namespaces it may use); None: no authentication (a port-forward)."""

    multi_user: bool = False
    users: Optional[Dict[str, tuple]] = None
    run_states: List[str] = field(default_factory=lambda: ["PENDING", "RUNNING", "SUCCEEDED"])
    contract: Contract = field(default_factory=Contract.shared)
    requests: List[Request] = field(default_factory=list)
    violations: List[str] = field(default_factory=list)
    experiments: Dict[str, dict] = field(default_factory=dict)
    pipelines: Dict[str, dict] = field(default_factory=dict)
    versions: Dict[str, dict] = field(default_factory=dict)
    runs: Dict[str, dict] = field(default_factory=dict)
    recurring_runs: Dict[str, dict] = field(default_factory=dict)
    _forced: List[tuple] = field(default_factory=list)
    _before: List[tuple] = field(default_factory=list)
    _run_steps: Dict[str, List[str]] = field(default_factory=dict)
    _clock: itertools.count = field(default_factory=lambda: itertools.count(1))

    # --- what a test tells it ------------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int, message: str) -> None:
        """Answer the next matching request with this error (a JSON endpoint's googleRpcStatus)."""
        self._forced.append((method, re.compile(path_regex), rpc_error(status, message)))

    def before(self, method: str, path_regex: str, action: Callable[[], None]) -> None:
        """Run `action` just before the next matching request is handled (another client's call)."""
        self._before.append((method, re.compile(path_regex), action))

    def calls(self) -> List[str]:
        return [r.call for r in self.requests]

    def named(self, call: str) -> List[Request]:
        return [r for r in self.requests if r.call == call]

    # --- state ---------------------------------------------------------------------------------

    def _now(self) -> str:
        seconds = next(self._clock)
        return f"2026-01-01T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z"

    def add_pipeline(self, name: str, namespace: str = "", package: Optional[bytes] = None,
                     version_description: str = "") -> dict:
        """A pipeline and its first version, named after it (CreatePipelineAndPipelineVersion)."""
        pipeline = {"pipeline_id": str(uuid.uuid4()), "name": name, "display_name": name, "created_at": self._now(),
                    "namespace": namespace}
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self.add_version(pipeline["pipeline_id"], name, package, version_description)
        return pipeline

    def add_version(self, pipeline_id: str, name: str, package: Optional[bytes], description: str = "") -> dict:
        docs = list(yaml.safe_load_all(package)) if package else [{}]
        spec = docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": str(uuid.uuid4()), "name": name,
                   "display_name": name, "description": description, "created_at": self._now(), "pipeline_spec": spec}
        self.versions[version["pipeline_version_id"]] = version
        return version

    # --- authentication and authorization ------------------------------------------------------

    def _user(self, request: Request) -> tuple:
        """(identity, namespaces it may use) of the request's credential; (None, ()) without `users`."""
        if self.users is None:
            return None, ()
        for credential in (request.headers.get("authorization"), request.headers.get("cookie")):
            if credential in self.users:
                return self.users[credential]
        raise rpc_error(401, "Unauthenticated: Request header error: there is no user identity header.")

    def _authorize(self, request: Request, namespace: str, verb: str, resource: str, upload: bool = False) -> None:
        """What the API server's SubjectAccessReview decides, in multi-user mode only."""
        identity, namespaces = self._user(request)
        if not self.multi_user or self.users is None or namespace in namespaces:
            return
        if upload:
            raise upload_error(400, "pipeline upload denied: permission to create pipelines.pipelines.kubeflow.org "
                                    f"in namespace {namespace!r} is required")
        raise rpc_error(403, f"Failed to authorize with API: PermissionDenied: User '{identity}' is not authorized "
                             f"with reason:  (request: &ResourceAttributes{{Namespace:{namespace},Verb:{verb},Group:"
                             f"pipelines.kubeflow.org,Version:v1beta1,Resource:{resource},Subresource:,Name:,}}): "
                             "Unauthorized access")

    def _namespace(self, namespace: Optional[str], what: str) -> str:
        if not self.multi_user:
            return ""  # single-user mode keeps every resource in the empty namespace
        if not namespace:
            raise rpc_error(400, f"Invalid input error: {what} cannot have an empty namespace in multi-user mode")
        return namespace

    # --- dispatch ------------------------------------------------------------------------------

    def handle(self, request: Request) -> tuple:
        """(status, body, content type) for a recorded, validated request."""
        self.requests.append(request)
        for i, (method, pattern, action) in enumerate(self._before):
            if method == request.method and pattern.search(request.path):
                del self._before[i]
                action()
                break
        found = self.contract.operation(request.method, request.path)
        if found is None:
            self.violations.append(f"{request.call}: no such path in the swagger")
            return 404, {"code": 5, "message": "Not Found"}, "application/json"
        template, operation, params = found
        try:
            self._check_request(request, operation)
            for i, (method, pattern, reply) in enumerate(self._forced):
                if method == request.method and pattern.search(request.path):
                    del self._forced[i]
                    raise reply
            self._user(request)  # behind Kubeflow's gateway every path, healthz too, needs a credential
            body = getattr(self, "_" + operation["operationId"])(request, **params)
            status, content_type = 200, "application/json"
        except Reply as reply:
            status, body, content_type = reply.status, reply.body, reply.content_type
        self._check_response(request, template, operation, status, body)
        return status, body, content_type

    def _check_request(self, request: Request, operation: dict) -> None:
        problems = []
        declared = {p["name"]: p for p in operation.get("parameters", [])}
        for key, value in request.query.items():
            p = declared.get(key)
            if p is None or p["in"] != "query":
                problems.append(f"query {key!r} is not a parameter of {operation['operationId']}")
            elif p.get("type") == "integer" and not re.match(INT64, value):
                problems.append(f"query {key}={value!r} is not an integer")
            elif key == "filter" and value:
                problems += [f"filter {e}" for e in self.contract.errors("v2beta1Filter", _filter(value), True)]
        body_param = next((p for p in declared.values() if p["in"] == "body"), None)
        if body_param is not None:
            definition = body_param["schema"]["$ref"].rsplit("/", 1)[-1]
            problems += [f"body {e}" for e in self.contract.errors(definition, request.body, True)]
        elif request.body not in (None, {}):
            problems.append("a body where the operation takes none")
        for name, p in declared.items():
            if p["in"] == "formData" and p.get("required") and name not in request.form:
                problems.append(f"form field {name!r} missing (got {sorted(request.form)})")
        if problems:
            self.violations += [f"{request.call}: {p}" for p in problems]
            raise rpc_error(400, f"proto: {problems[0]}")

    def _check_response(self, request: Request, template: str, operation: dict, status: int, body) -> None:
        if status == 200:
            ref = operation["responses"]["200"].get("schema", {}).get("$ref")
            errors = self.contract.errors(ref.rsplit("/", 1)[-1], body, False) if ref else \
                ([] if body == {} else [f"{body!r} where the server sends google.protobuf.Empty"])
        elif template in UPLOADS:  # the upload server's own error shape, not the swagger's googleRpcStatus
            errors = [] if isinstance(body, str) or set(body) == {"error_message", "error_details"} else [repr(body)]
        else:
            errors = self.contract.errors("googleRpcStatus", body, False)
        self.violations += [f"{request.call} answered {status}: {e}" for e in errors]

    # --- the operations (named after the swagger's operationId) --------------------------------

    def _HealthzService_GetHealthz(self, request):
        return _pruned({"multi_user": self.multi_user, "pipeline_store": "database"})

    def _ExperimentService_ListExperiments(self, request):
        namespace = self._namespace(request.query.get("namespace"), "An experiment")
        self._authorize(request, namespace, "list", "experiments")
        found = [e for e in self.experiments.values() if e["namespace"] == namespace]
        return self._page(request, "experiments", _filtered(found, request.query.get("filter")))

    def _ExperimentService_CreateExperiment(self, request):
        body = request.body
        namespace = self._namespace(body.get("namespace"), "An experiment")
        self._authorize(request, namespace, "create", "experiments")
        if any(e["display_name"] == body["display_name"] and e["namespace"] == namespace
               for e in self.experiments.values()):
            raise rpc_error(409, f"Already exist error: Failed to create a new experiment. The name "
                                 f"{body['display_name']} already exists. Please specify a new name")
        experiment = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"],
                      "description": body.get("description", ""), "created_at": self._now(), "namespace": namespace,
                      "storage_state": "AVAILABLE"}
        self.experiments[experiment["experiment_id"]] = experiment
        return _pruned(experiment)

    def _ExperimentService_GetExperiment(self, request, experiment_id):
        experiment = self._get(self.experiments, experiment_id, "Experiment")
        self._authorize(request, experiment["namespace"], "get", "experiments")
        return _pruned(experiment)

    def _PipelineService_ListPipelines(self, request):
        namespace = request.query.get("namespace", "") if self.multi_user else ""
        if namespace:
            self._authorize(request, namespace, "list", "pipelines")
        found = [p for p in self.pipelines.values() if p["namespace"] == namespace]
        return self._page(request, "pipelines", _filtered(found, request.query.get("filter")))

    def _PipelineService_GetPipeline(self, request, pipeline_id):
        return _pruned(self._get(self.pipelines, pipeline_id, "Pipeline"))

    def _PipelineService_ListPipelineVersions(self, request, pipeline_id):
        pipeline = self._get(self.pipelines, pipeline_id, "Pipeline")
        if pipeline["namespace"]:
            self._authorize(request, pipeline["namespace"], "list", "pipelines")
        found = [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id]
        return self._page(request, "pipeline_versions", _filtered(found, request.query.get("filter")))

    def _PipelineService_GetPipelineVersion(self, request, pipeline_id, pipeline_version_id):
        return _pruned(self._get(self.versions, pipeline_version_id, "PipelineVersion"))

    def _UploadPipeline(self, request):
        filename, package = request.form["uploadfile"]
        namespace = request.query.get("namespace", "") if self.multi_user else ""
        self._authorize(request, namespace or "kubeflow", "create", "pipelines", upload=True)
        name = request.query.get("name") or request.query.get("display_name") or filename
        if any(p["name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise upload_error(409, "Failed to create a pipeline and a pipeline version")
        pipeline = self.add_pipeline(name, namespace, package, request.query.get("description", ""))
        pipeline["description"] = request.query.get("description", "")
        return _pruned(pipeline)

    def _UploadPipelineVersion(self, request):
        filename, package = request.form["uploadfile"]
        pipeline = self.pipelines.get(request.query.get("pipelineid", ""))
        if pipeline is None:
            raise upload_error(400, "Failed to create a pipeline version")
        self._authorize(request, pipeline["namespace"] or "kubeflow", "create", "pipelines", upload=True)
        name = request.query.get("name") or filename
        if any(v["name"] == name and v["pipeline_id"] == pipeline["pipeline_id"] for v in self.versions.values()):
            raise upload_error(409, "Failed to create a pipeline version")
        return _pruned(self.add_version(pipeline["pipeline_id"], name, package, request.query.get("description", "")))

    def _RunService_CreateRun(self, request):
        body = request.body
        experiment = self._get(self.experiments, body.get("experiment_id", ""), "Experiment")
        self._authorize(request, experiment["namespace"], "create", "runs")
        version = self._referenced_version(body)
        self._check_parameters(version, body.get("runtime_config", {}).get("parameters", {}))
        run_id = str(uuid.uuid4())
        self._run_steps[run_id] = list(self.run_states)
        now = self._now()
        run = {**body, "run_id": run_id, "storage_state": "AVAILABLE", "service_account": "pipeline-runner",
               "created_at": now, "scheduled_at": now, "state": self._run_steps[run_id].pop(0),
               "state_history": []}
        self.runs[run_id] = run
        return self._run_view(run)

    def _RunService_GetRun(self, request, run_id):
        run = self._get(self.runs, run_id, "Run")
        experiment = self.experiments[run["experiment_id"]]
        self._authorize(request, experiment["namespace"], "get", "runs")
        if self._run_steps[run_id]:
            run["state"] = self._run_steps[run_id].pop(0)
            if run["state"] in FINAL:
                run["finished_at"] = self._now()
        return self._run_view(run)

    def _RecurringRunService_CreateRecurringRun(self, request):
        body = request.body
        experiment = self._get(self.experiments, body.get("experiment_id", ""), "Experiment")
        self._authorize(request, experiment["namespace"], "create", "jobs")
        self._referenced_version(body)
        concurrency = int(body.get("max_concurrency", 0))
        if not 1 <= concurrency <= 10:
            raise rpc_error(400, "Invalid input error: The max concurrency of the recurring run is out of range. "
                                 f"Support 1-10. Received {concurrency}.")
        cron = body.get("trigger", {}).get("cron_schedule", {}).get("cron", "")
        if not (cron.startswith("@") or len(cron.split()) in (5, 6)):  # robfig cron.Parse: 5 fields pass too
            raise rpc_error(400, "Invalid input error: Schedule cron is not a supported format"
                                 f"(https://godoc.org/github.com/robfig/cron). Error: {cron!r}")
        now = self._now()
        enabled = body.get("mode") in ("ENABLE", 1)
        recurring = {**body, "recurring_run_id": str(uuid.uuid4()), "max_concurrency": str(concurrency),
                     "mode": "ENABLE" if enabled else "DISABLE", "status": "ENABLED" if enabled else "DISABLED",
                     "service_account": "pipeline-runner", "created_at": now, "updated_at": now,
                     "namespace": experiment["namespace"]}
        self.recurring_runs[recurring["recurring_run_id"]] = recurring
        return _pruned(recurring)

    def _RecurringRunService_ListRecurringRuns(self, request):
        experiment_id = request.query.get("experiment_id")
        if experiment_id:
            namespace = self._get(self.experiments, experiment_id, "Experiment")["namespace"]
        else:
            namespace = self._namespace(request.query.get("namespace"), "A recurring run")
        self._authorize(request, namespace, "list", "jobs")
        found = [r for r in self.recurring_runs.values() if r["namespace"] == namespace
                 and (not experiment_id or r["experiment_id"] == experiment_id)]
        return self._page(request, "recurringRuns", _filtered(found, request.query.get("filter")))

    def _RecurringRunService_GetRecurringRun(self, request, recurring_run_id):
        return _pruned(self._recurring(request, recurring_run_id, "get"))

    def _RecurringRunService_EnableRecurringRun(self, request, recurring_run_id):
        self._recurring(request, recurring_run_id, "enable").update(mode="ENABLE", status="ENABLED",
                                                                     updated_at=self._now())
        return {}

    def _RecurringRunService_DisableRecurringRun(self, request, recurring_run_id):
        self._recurring(request, recurring_run_id, "disable").update(mode="DISABLE", status="DISABLED",
                                                                      updated_at=self._now())
        return {}

    def _RecurringRunService_DeleteRecurringRun(self, request, recurring_run_id):
        self._recurring(request, recurring_run_id, "delete")
        del self.recurring_runs[recurring_run_id]
        return {}

    # --- helpers -------------------------------------------------------------------------------

    def _get(self, table: dict, key: str, kind: str) -> dict:
        if key not in table:
            raise rpc_error(404, f"NotFound: {kind} {key} not found")
        return table[key]

    def _recurring(self, request: Request, recurring_run_id: str, verb: str) -> dict:
        recurring = self._get(self.recurring_runs, recurring_run_id, "RecurringRun")
        self._authorize(request, recurring["namespace"], verb, "jobs")
        return recurring

    def _referenced_version(self, body: dict) -> dict:
        reference = body.get("pipeline_version_reference") or {}
        version = self._get(self.versions, reference.get("pipeline_version_id", ""), "PipelineVersion")
        if version["pipeline_id"] != reference.get("pipeline_id"):
            raise rpc_error(400, "Invalid input error: the pipeline version does not belong to the pipeline")
        return version

    def _check_parameters(self, version: dict, parameters: dict) -> None:
        """The parameters against the version's root inputs: known names, JSON types as declared."""
        spec = version["pipeline_spec"].get("pipeline_spec", version["pipeline_spec"])
        declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
        kinds = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "LIST": list,
                 "STRUCT": dict}
        for name, value in parameters.items():
            kind = declared.get(name, {}).get("parameterType")
            if kind is None or type(value) is not kinds[kind]:
                raise rpc_error(400, f"Invalid input error: parameter {name}={value!r:.40} does not match the "
                                     f"pipeline's inputs ({kind or 'not declared'})")

    def _run_view(self, run: dict) -> dict:
        view = {**run, "state_history": run["state_history"] + [{"update_time": self._now(), "state": run["state"]}]}
        run["state_history"] = view["state_history"]
        return _pruned(view)

    def _page(self, request: Request, key: str, items: list) -> dict:
        size = int(request.query.get("page_size") or 20)
        start = int(request.query.get("page_token") or 0)
        page = items[start:start + size]
        token = str(start + size) if start + size < len(items) else ""
        return _pruned({key: [_pruned(i) for i in page], "total_size": len(items), "next_page_token": token})


def _filter(value: str) -> dict:
    """A `filter=` as protojson reads it: camelCase or snake_case keys, enums as names or numbers."""
    def snake(key: str) -> str:
        return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), key)

    parsed = json.loads(value)
    predicates = [{snake(k): v for k, v in p.items()} for p in parsed.get("predicates", [])]
    for p in predicates:
        if isinstance(p.get("operation"), int) and 0 <= p["operation"] < len(OPERATIONS):
            p["operation"] = OPERATIONS[p["operation"]]
    return {**{snake(k): v for k, v in parsed.items()}, "predicates": predicates}


def _filtered(items: list, value: Optional[str]) -> list:
    """The EQUALS predicates on display_name that kfp.Client sends; any other filter is refused."""
    if not value:
        return items
    for p in _filter(value)["predicates"]:
        if (p.get("operation"), p.get("key")) != ("EQUALS", "display_name"):
            raise rpc_error(400, f"the stand-in supports only display_name EQUALS filters; got {p}")
        items = [i for i in items if i["display_name"] == p.get("string_value")]
    return items


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn

    def log_message(self, *args):  # quiet
        pass

    def _serve(self):
        url = urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        body, form = None, {}
        if headers.get("content-type", "").startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + headers["content-type"].encode() + b"\r\n\r\n" + raw)
            for part in message.iter_parts():
                form[part.get_param("name", header="content-disposition")] = (part.get_filename(),
                                                                             part.get_payload(decode=True))
        elif raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        status, answer, content_type = self.standin.handle(Request(self.command, url.path, query, body, form, headers))
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve


class Server(LoopbackServer):
    """The stand-in on 127.0.0.1 on a free port, served from a thread; stop() shuts it down."""

    def __init__(self, standin: StandIn):
        self.standin = standin
        super().__init__(type("Handler", (_Handler,), {"standin": standin}))
