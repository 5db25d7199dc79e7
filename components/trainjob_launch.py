"""The train_job step (platform.nodes > 1): the train step's training as a Kubeflow Trainer
TrainJob on several nodes, run from a light pod that hands the pipeline the same outputs.

1. Stage: what the TrainJob's pods read (they get no KFP artifacts) goes to `<run>/trainjob/`
   in the run's store: config.json (the run's config with its run id and the probe's batch sizes
   already in it, as the train step gets them: no probe.json is needed) and the dataset artifact's
   files under dataset/. A train_result.json left by an earlier try is removed.
2. Create the TrainJob (components/trainjob.py: manifest) in this pod's namespace with the pod's
   service account (components/k8s.py, which documents the Role it needs).
3. Follow it: a line per change of its conditions, child jobs or progress and at least once a
   minute, with rank 0's new log lines. Complete: done. Failed: rank 0's log tail, then one line
   with the condition's reason and message. A TrainJob that after
   platform.trainjob_start_timeout_s has no condition and no child job that ever ran (its JobSet
   was never created: quota, admission, a missing runtime) failed to start: the JobSet's status and
   the namespace's events for it are printed and named in one line. (Trainer v2.3 sets no condition
   while a TrainJob runs, so a running job is told apart by its jobsStatus, or its JobSet's.)
4. Collect: rank 0 of the pods published model.pt and train_result.json to the run's store
   (components/train.py); they become this step's model artifact and outcome, exactly the train
   step's, so evaluate and promote run unchanged.
5. Clean up: unless platform.trainjob_keep, the TrainJob (with its JobSet and pods) and the staged
   inputs are deleted once it ended, failed or never started; what explains it is in this step's
   log by then.

A retry of this step (KFP's retry, a preempted launcher pod) finds the TrainJob of the same name
(the run id's: trainjob.job_name): still running, it follows it; complete (kept), it collects it;
failed, it deletes it and trains again, resuming from the run's synced checkpoint. Cancelling the
pipeline run stops this pod, not the TrainJob: `kubectl delete trainjob <name>`.
"""

import time
from pathlib import Path
from typing import Callable, Optional

from components import run_store, trainjob
from components.errors import ClusterError, StorageError
from components.k8s import Cluster, Transient, in_cluster_client, pod_namespace
from components.train_outputs import MODEL_FILE, RESULT_FILE

POLL_S = 10.0
PROGRESS_EVERY_S = 60.0  # a line at least this often, changed or not
LOG_TAIL_LINES = 50
TRANSIENT_TRIES = 5  # consecutive failed reads of the TrainJob before giving up on following it


class TrainJobFailed(ClusterError):
    """The TrainJob failed or never started; the message is its condition's, or what the JobSet and events say."""


def run(config: dict, dataset_path: str, model_out: str, api_client=None, poll_s: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic) -> dict:
    """Train `config` (with its run id and batch sizes decided) as a TrainJob on platform.nodes nodes;
    write the best model to `model_out` and return the train step's outcome. `api_client`: a
    kubernetes ApiClient, else the pod's in-cluster one; `poll_s`: else POLL_S."""
    pf = config["platform"]
    poll_s = POLL_S if poll_s is None else poll_s
    store = run_store.open_run(config)
    job = trainjob.manifest(config)
    namespace = pod_namespace(pf.get("namespace"))
    job["metadata"]["namespace"] = namespace
    name = job["metadata"]["name"]
    cluster = Cluster(api_client or in_cluster_client(), namespace)
    ended = False
    try:
        existing = cluster.get_trainjob(name)
        if existing is not None and condition(existing, "Failed"):
            print(f"train_job: TrainJob {namespace}/{name} failed in an earlier try; deleting it to train again",
                  flush=True)
            cluster.delete_trainjob(name)
            wait_gone(cluster, name, pf["trainjob_start_timeout_s"], poll_s, clock)
            existing = None
        if existing is None:
            stage(config, dataset_path, store)
            cluster.create_trainjob(job)
            print(f"train_job: created TrainJob {namespace}/{name}: {trainjob.RUNTIME}, "
                  f"{job['spec']['trainer']['numNodes']} nodes x {job['spec']['trainer']['numProcPerNode']} "
                  f"processes, image {job['spec']['trainer']['image']}", flush=True)
        else:
            print(f"train_job: following TrainJob {namespace}/{name}, created by an earlier try of this step",
                  flush=True)
        Follower(cluster, name, pf["trainjob_start_timeout_s"], poll_s, clock).follow()
        ended = True
        return collect(store, model_out)
    except TrainJobFailed:
        ended = True
        raise
    finally:
        if ended and not pf["trainjob_keep"]:
            clean_up(cluster, name, store)


def stage(config: dict, dataset_path: str, store) -> None:
    """config.json and dataset/ under <run>/trainjob/, where the manifest's args point."""
    inputs = store.child(trainjob.INPUTS_DIR)
    inputs.put_json("config.json", config)
    root = Path(dataset_path)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        inputs.put_file(path, f"dataset/{path.relative_to(root).as_posix()}")
    store.delete(RESULT_FILE)  # an earlier try's: only this TrainJob's may be collected


def collect(store, model_out: str) -> dict:
    """The train step's outcome and model, as rank 0 published them."""
    if not store.exists(RESULT_FILE):
        raise StorageError(f"{run_store.join_uri(store.uri, RESULT_FILE)}: the TrainJob completed but its rank 0 "
                           "published no result; see its log")
    outcome = store.get_json(RESULT_FILE)
    if outcome["model_file"] is not None:
        store.get_file(MODEL_FILE, Path(model_out))
    return outcome


def clean_up(cluster: Cluster, name: str, store) -> None:
    """Delete the TrainJob and the staged inputs; a refusal here is reported, not raised (the outcome stands)."""
    try:
        cluster.delete_trainjob(name)
        inputs = store.child(trainjob.INPUTS_DIR)
        for key in inputs.list():
            inputs.delete(key)
        print(f"train_job: deleted TrainJob {cluster.namespace}/{name} and its inputs "
              "(platform.trainjob_keep=true keeps them)", flush=True)
    except (ClusterError, StorageError) as exc:
        print(f"train_job: could not clean up: {exc}", flush=True)


def wait_gone(cluster: Cluster, name: str, timeout_s: float, poll_s: float, clock) -> None:
    deadline = clock() + timeout_s
    while cluster.get_trainjob(name) is not None:
        if clock() > deadline:
            raise ClusterError(f"train_job: TrainJob {cluster.namespace}/{name} was still there {timeout_s:g} s "
                               "after deleting it (a finalizer?); delete it, then retry")
        time.sleep(poll_s)


def condition(obj: dict, kind: str) -> Optional[dict]:
    """The TrainJob's condition of that type when its status is True."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def jobs_ran(status: Optional[dict], key: str = "jobsStatus") -> bool:
    """Some child job of it (TrainJob jobsStatus, JobSet replicatedJobsStatus) is or was running."""
    return any(sum(j.get(k) or 0 for k in ("active", "ready", "succeeded", "failed")) > 0
               for j in (status or {}).get(key) or [])


def describe(obj: dict) -> str:
    """One line of where the TrainJob is: its conditions, child jobs and progress."""
    status = obj.get("status") or {}
    parts = [f"{c['type']}={c['status']}" + (f" ({c['reason']})" if c.get("reason") else "")
             for c in status.get("conditions") or []] or ["no conditions"]
    for j in status.get("jobsStatus") or []:
        parts.append(f"{j['name']}: " + ", ".join(f"{j.get(k) or 0} {k}" for k in ("active", "ready", "succeeded",
                                                                                    "failed", "suspended")))
    progress = (status.get("trainerStatus") or {}).get("progressPercentage")
    if progress is not None:
        parts.append(f"{progress}%")
    return "; ".join(parts)


class Follower:
    """Polls one TrainJob to its end (follow), printing progress and rank 0's log as it goes."""

    def __init__(self, cluster: Cluster, name: str, start_timeout_s: float, poll_s: float, clock):
        self.cluster, self.name, self.poll_s, self.clock = cluster, name, poll_s, clock
        self.where = f"TrainJob {cluster.namespace}/{name}"
        self.start_deadline = clock() + start_timeout_s
        self.start_timeout_s = start_timeout_s
        self.started = False
        self.last_log = ""  # the timestamp of rank 0's last line printed (RFC 3339 sorts as text)

    def follow(self) -> dict:
        last_line, last_print, failures = None, float("-inf"), 0
        while True:
            try:
                obj = self.cluster.get_trainjob(self.name)
                failures = 0
            except Transient as exc:
                failures += 1
                if failures >= TRANSIENT_TRIES:
                    raise
                print(f"train_job: {exc} (try {failures} of {TRANSIENT_TRIES})", flush=True)
                time.sleep(self.poll_s)
                continue
            if obj is None:
                raise ClusterError(f"train_job: {self.where} was deleted while this step followed it")
            status = obj.get("status") or {}
            self.started = self.started or bool(status.get("conditions")) or jobs_ran(status)
            self.print_new_log()
            line, now = describe(obj), self.clock()
            if line != last_line or now - last_print >= PROGRESS_EVERY_S:
                print(f"train_job: {self.where}: {line}", flush=True)
                last_line, last_print = line, now
            if condition(obj, "Complete"):
                return obj
            failed = condition(obj, "Failed")
            if failed:
                self.print_log_tail()
                raise TrainJobFailed(f"train_job: {self.where} failed ({failed.get('reason')}): "
                                     f"{failed.get('message') or 'no message'}; rank 0's log tail is above")
            if not self.started and now >= self.start_deadline:
                self.check_start()
            time.sleep(self.poll_s)

    def check_start(self) -> None:
        """No condition and no job ran by the deadline: unless its JobSet shows running jobs (a
        controller that fills no jobsStatus), it did not start."""
        jobset = self.cluster.get_jobset(self.name)
        if jobs_ran((jobset or {}).get("status"), "replicatedJobsStatus"):
            self.started = True
            return
        events = self.cluster.events(self.name)
        js = "no JobSet" if jobset is None else f"JobSet {self.name}: {jobset_line(jobset)}"
        print(f"train_job: {self.where} did not start within {self.start_timeout_s:g} s (no conditions); {js}",
              flush=True)
        print(f"train_job: events for {self.name} in {self.cluster.namespace}:" if events else
              f"train_job: no events for {self.name} in {self.cluster.namespace}", flush=True)
        for e in events:
            print(f"  {e['time'] or '-'} {e['kind']} {e['type']} {e['reason']}: {e['message']}", flush=True)
        last = next((e for e in reversed(events) if e["type"] == "Warning"), events[-1] if events else None)
        said = f"; last event: {last['kind']} {last['reason']}: {last['message']}" if last else "; no events"
        raise TrainJobFailed(f"train_job: {self.where} did not start within {self.start_timeout_s:g} s "
                             f"(platform.trainjob_start_timeout_s): no conditions, {js}{said}")

    def print_new_log(self) -> None:
        """Rank 0's lines since the last one printed (a pod not there yet, or its log refused: nothing)."""
        try:
            pod = self.cluster.rank0_pod(self.name)
            text = self.cluster.pod_log(pod, since_seconds=int(self.poll_s * 3) + 60) if pod else ""
        except ClusterError:
            return
        for line in text.splitlines():
            stamp, _, rest = line.partition(" ")
            if stamp > self.last_log:
                print(f"  [rank 0] {rest}", flush=True)
                self.last_log = stamp

    def print_log_tail(self) -> None:
        try:
            pod = self.cluster.rank0_pod(self.name)
            text = self.cluster.pod_log(pod, tail_lines=LOG_TAIL_LINES) if pod else None
        except ClusterError as exc:
            print(f"train_job: no log of rank 0: {exc}", flush=True)
            return
        if text is None:
            print(f"train_job: no pod of rank 0 for {self.where}", flush=True)
            return
        print(f"train_job: the last {LOG_TAIL_LINES} lines of rank 0's log (pod {pod}):", flush=True)
        for line in text.splitlines():
            print(f"  {line.partition(' ')[2]}", flush=True)


def jobset_line(jobset: dict) -> str:
    status = jobset.get("status") or {}
    parts = [f"{c.get('type')}={c.get('status')} ({c.get('reason')}: {c.get('message')})"
             for c in status.get("conditions") or []]
    for j in status.get("replicatedJobsStatus") or []:
        parts.append(f"{j.get('name')}: {j.get('active') or 0} active, {j.get('failed') or 0} failed")
    return "; ".join(parts) or "no status"
