"""A stand-in for the Kubernetes API server on 127.0.0.1, the part the train_job step talks to
(components/k8s.py): TrainJobs (create, get, delete; the body validated against Trainer v2.3's
CRD schema with unknown fields refused, and every TrainJob it serves too), JobSets, events, pods
and pod logs. The real kubernetes client talks to it over HTTP with a bearer token.

A "controller" plays Trainer: `on_create(standin, trainjob)` runs when a TrainJob is created
(RunPods starts the manifest's own command, one process per node, as Trainer's pods would).
Nothing here is reached from outside loopback."""

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from conftest import free_port
from loopback import LoopbackServer

SCHEMA = Path(__file__).with_name("reference") / "kubeflow-trainer" / "trainjob.v1alpha1.schema.json"
TOKEN = "standin-token"
TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
JOBSETS = re.compile(r"^/apis/jobset\.x-k8s\.io/v1alpha2/namespaces/([^/]+)/jobsets/([^/]+)$")
EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
NO_RESOURCE = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "the server could not find the requested resource", "reason": "NotFound", "details": {},
               "code": 404}


def strict(schema):
    """Every object schema with properties refuses unknown ones, as Kubernetes does (it prunes or,
    with fieldValidation=Strict, rejects them); a bare {"type": "object"} (metadata: ObjectMeta,
    which the API server checks) stays open."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def trainjob_validator():
    """Trainer v2.3's TrainJob CRD schema (tests/reference/kubeflow-trainer), unknown fields refused."""
    import jsonschema

    crd = json.loads(SCHEMA.read_text())
    assert (crd["group"], crd["version"], crd["kind"]) == ("trainer.kubeflow.org", "v1alpha1", "TrainJob")
    return jsonschema.Draft4Validator(strict(crd["openAPIV3Schema"]))


def now() -> str:
    """RFC 3339 with fixed-width microseconds, as the API server stamps log lines (sorts as text)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def condition(kind: str, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def jobs_status(active=0, ready=0, succeeded=0, failed=0) -> list:
    return [{"name": "node", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
             "suspended": 0}]


def not_found(kind: str, group: str, name: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f'{kind}.{group} "{name}" not found', "reason": "NotFound",
            "details": {"name": name, "group": group, "kind": kind}, "code": 404}


class K8sStandin:
    def __init__(self, validator, on_create=None):
        self.validator, self.on_create = validator, on_create
        self.requests = []  # (method, path, query, body)
        self.invalid = []  # schema errors of bodies received or objects served: must stay empty
        self.trainjobs, self.jobsets, self.events = {}, {}, []
        self.pods = {}  # name -> labels
        self.logs = {}  # pod name -> [(timestamp, line)]
        self.refuse = None  # None, 401, 403, or "no-crd" (Trainer not installed)
        self.lock = threading.RLock()
        self.server = LoopbackServer(self._handler())

    @property
    def host(self) -> str:
        return self.server.url

    def start(self) -> "K8sStandin":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def api_client(self, token: str = TOKEN):
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.host
        configuration.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(configuration)

    # -- what a controller does ----------------------------------------------------------------
    def set_status(self, name: str, **status) -> None:
        with self.lock:
            self.trainjobs[name].setdefault("status", {}).update(status)

    def add_pod(self, name: str, labels: dict) -> None:
        with self.lock:
            self.pods[name] = labels
            self.logs.setdefault(name, [])

    def log(self, pod: str, line: str) -> None:
        with self.lock:
            self.logs[pod].append((now(), line))

    def event(self, name: str, kind: str, type_: str, reason: str, message: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.events.append({"metadata": {"name": f"{name}.{uuid.uuid4().hex[:8]}", "namespace": "x"},
                            "involvedObject": {"kind": kind, "name": name}, "type": type_, "reason": reason,
                            "message": message, "count": 1, "lastTimestamp": stamp})

    def paths(self):
        """(method, path) of every request, in order, consecutive repeats (polls) once."""
        out = []
        for method, path, _, _ in self.requests:
            if not out or out[-1] != (method, path):
                out.append((method, path))
        return out

    # -- HTTP --------------------------------------------------------------------------------
    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str):
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with standin.lock:
                    standin.requests.append((method, url.path, query, body))
                    code, answer = standin.answer(method, url.path, query, body, self.headers.get("Authorization"))
                self._send(code, answer, "text/plain" if isinstance(answer, str) else "application/json")

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

        return Handler

    def answer(self, method, path, query, body, auth):
        if auth != f"Bearer {TOKEN}" or self.refuse == 401:
            return 401, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
        m = TRAINJOBS.match(path)
        if m:
            return self.trainjob(method, m.group(1), m.group(2), body)
        m = JOBSETS.match(path)
        if m and method == "GET":
            js = self.jobsets.get(m.group(2))
            return (200, js) if js else (404, not_found("jobsets", "jobset.x-k8s.io", m.group(2)))
        m = EVENTS.match(path)
        if m and method == "GET":
            _, _, name = query.get("fieldSelector", "").partition("involvedObject.name=")
            return 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {},
                         "items": [e for e in self.events if e["involvedObject"]["name"] == name]}
        m = PODS.match(path)
        if m and method == "GET":
            wanted = dict(kv.split("=", 1) for kv in query.get("labelSelector", "").split(",") if kv)
            items = [{"metadata": {"name": n, "namespace": m.group(1), "labels": labels}}
                     for n, labels in self.pods.items() if wanted.items() <= labels.items()]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        m = LOG.match(path)
        if m and method == "GET" and m.group(2) in self.logs:
            lines = self.logs[m.group(2)]
            if "tailLines" in query:
                lines = lines[-int(query["tailLines"]):]
            stamped = query.get("timestamps", "").lower() in ("1", "t", "true")  # Go ParseBool; the client sends "True"
            return 200, "".join(f"{t} {line}\n" if stamped else f"{line}\n" for t, line in lines)
        return 404, NO_RESOURCE

    def trainjob(self, method, namespace, name, body):
        if self.refuse == "no-crd":
            return 404, NO_RESOURCE
        if self.refuse == 403:
            verb = {"POST": "create", "GET": "get", "DELETE": "delete"}[method]
            return 403, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "reason": "Forbidden",
                         "message": f'trainjobs.trainer.kubeflow.org is forbidden: User "system:serviceaccount:'
                                    f'{namespace}:default-editor" cannot {verb} resource "trainjobs" in API group '
                                    f'"trainer.kubeflow.org" in the namespace "{namespace}"', "code": 403}
        if method == "POST":
            errors = sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                            for e in self.validator.iter_errors(body))
            if errors:
                self.invalid.extend(errors)
                return 422, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid",
                             "message": "; ".join(errors), "code": 422}
            name = body["metadata"]["name"]
            if name in self.trainjobs:
                return 409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                             "message": f'trainjobs.trainer.kubeflow.org "{name}" already exists', "code": 409}
            obj = json.loads(json.dumps(body))
            obj["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="1",
                                   creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            self.trainjobs[name] = obj
            if self.on_create:
                self.on_create(self, obj)
            return 201, obj
        if name not in self.trainjobs:
            return 404, not_found("trainjobs", "trainer.kubeflow.org", name)
        if method == "DELETE":
            self.trainjobs.pop(name)
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "details": {"name": name, "group": "trainer.kubeflow.org", "kind": "trainjobs"}}
        obj = self.trainjobs[name]
        self.invalid.extend(f"served {'/'.join(map(str, e.absolute_path))}: {e.message}"
                            for e in self.validator.iter_errors(obj))
        return 200, obj


class RunPods:
    """on_create that runs the TrainJob as Trainer would, here: numNodes processes of its command,
    args and env (secretKeyRefs from `secrets`), each with the PET_* rendezvous the controller injects
    and a /tmp of its own under `root`; node 0's output is rank 0's pod log."""

    def __init__(self, root: Path, secrets: dict):
        self.root, self.secrets, self.procs, self.threads = Path(root), secrets, [], []

    def __call__(self, standin: K8sStandin, job: dict) -> None:
        name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
        nodes = trainer["numNodes"]
        standin.set_status(name, jobsStatus=jobs_status(active=nodes, ready=nodes))  # running, no condition (v2.3)
        pod0 = f"{name}-node-0-0-x7k2p"
        standin.add_pod(pod0, {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                               "batch.kubernetes.io/job-completion-index": "0"})
        port = free_port()
        for node in range(nodes):
            pod_tmp = self.root / f"node-{node}" / "tmp"
            pod_tmp.mkdir(parents=True)
            env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]),
                   "TMPDIR": str(pod_tmp), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                   "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                   "PET_NODE_RANK": str(node), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"):
                env.pop(var, None)  # only what the manifest gives the pod
            for e in trainer.get("env", []):
                if "value" in e:
                    env[e["name"]] = e["value"]
                else:
                    ref = e["valueFrom"]["secretKeyRef"]
                    value = self.secrets.get((ref["name"], ref["key"]))
                    if value is None and not ref["optional"]:
                        raise AssertionError(f"secret {ref} missing")
                    if value is not None:
                        env[e["name"]] = value
            args = [str(pod_tmp / a[len("/tmp/"):]) if a.startswith("/tmp/") else a for a in trainer["args"]]
            proc = subprocess.Popen(trainer["command"] + args, env=env, cwd=pod_tmp, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            self.procs.append(proc)
        thread = threading.Thread(target=self._watch, args=(standin, name, pod0, nodes), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _watch(self, standin, name, pod0, nodes):
        out = {}

        def drain(i, proc):
            out[i] = []
            for line in proc.stdout:
                out[i].append(line.rstrip("\n"))
                if i == 0:
                    standin.log(pod0, line.rstrip("\n"))

        readers = [threading.Thread(target=drain, args=(i, p)) for i, p in enumerate(self.procs)]
        for r in readers:
            r.start()
        codes = [p.wait() for p in self.procs]
        for r in readers:
            r.join()
        self.output = out
        if all(c == 0 for c in codes):
            standin.set_status(name, jobsStatus=jobs_status(succeeded=nodes),
                               conditions=[condition("Complete", "JobsCompleted", "TrainJob is completed")])
        else:
            standin.set_status(name, jobsStatus=jobs_status(failed=1),
                               conditions=[condition("Failed", "JobsFailed", f"node exit codes {codes}")])

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for thread in self.threads:
            thread.join(timeout=10)
