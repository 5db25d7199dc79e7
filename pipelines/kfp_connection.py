"""The connection to a KFP v2 server (pipelines/kubeflow.py submits through it): credentials,
kfp.Client with the habits a command-line submitter needs, and every server or network error as one
line that says what was being done and what the submission had changed by then."""

import contextlib
import io
import json
import os
import warnings
from typing import Optional

import kfp_server_api
import urllib3
from kfp import client as kfp_client
from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

from components.errors import ClusterError, ConfigError


def credentials(platform: dict) -> tuple:
    """(kfp.Client keyword arguments, what they are in words): the first present of a bearer token
    in $token_env, a cookie in $cookie_env, the service-account token file kfp reads in a pod."""
    token = os.environ.get(platform["token_env"], "").strip()
    if token:
        return {"existing_token": token}, f"the bearer token in ${platform['token_env']}"
    cookie = os.environ.get(platform["cookie_env"], "").strip()
    if cookie:
        return {"cookies": cookie}, f"the cookie in ${platform['cookie_env']}"
    path = os.environ.get(kfp_client.KF_PIPELINES_SA_TOKEN_ENV) or kfp_client.KF_PIPELINES_SA_TOKEN_PATH
    if os.path.isfile(path):  # re-read before every request: the kubelet rotates it
        return {"credentials": ServiceAccountTokenVolumeCredentials(path)}, f"the service-account token in {path}"
    return {}, f"no credentials (neither ${platform['token_env']} nor ${platform['cookie_env']} is set)"


class Session:
    """One conversation with a KFP server: any error becomes one ClusterError line that says what
    was being done and what this submission had changed by then."""

    def __init__(self, platform: dict, auth: str):
        self.platform, self.auth = platform, auth
        self.host, self.namespace = platform["host"].rstrip("/"), platform["namespace"]
        self.doing, self.changed = f"asking {self.host} for /apis/v2beta1/healthz", []

    @contextlib.contextmanager
    def errors_as_one_line(self):
        try:
            yield self
        except kfp_server_api.ApiException as exc:
            raise ClusterError(self._refused(exc)) from None
        except urllib3.exceptions.HTTPError as exc:
            reason = str(getattr(exc, "reason", None) or exc)
            reason = reason.split(">: ", 1)[-1]  # "<urllib3...HTTPConnection object at 0x..>: Failed to ..."
            raise ClusterError(f"platform.host: cannot reach {self.host} while {self.doing}: {reason}"
                               f"{self.so_far()}") from None

    def so_far(self) -> str:
        return f"; before that, this submission: {', '.join(self.changed)}" if self.changed else \
            "; nothing was created"

    def _refused(self, exc: kfp_server_api.ApiException) -> str:
        status, message = exc.status, _server_message(exc)
        where = f" while {self.doing}: {message}{self.so_far()}"
        if status == 0:  # kfp_server_api's way of saying TLS failed
            return f"platform.host: cannot reach {self.host} while {self.doing}: {exc.reason}{self.so_far()}"
        if status == 401:
            return (f"{self.host} refused the credentials ({self.auth}) with 401 Unauthorized{where}; set "
                    f"${self.platform['token_env']} to a valid token or ${self.platform['cookie_env']} to a "
                    "session cookie")
        if status == 403 and self.namespace:
            return (f"platform.namespace: {self.host} denied access to the namespace {self.namespace!r} (403 Forbidden)"
                    f"{where}; check that the namespace (a Kubeflow profile) exists and that {self.auth} may use it")
        if status == 403:
            return f"{self.host} denied the request (403 Forbidden, credentials: {self.auth}){where}"
        if status == 400 and not self.namespace and "namespace" in message.lower():
            return f"platform.namespace: required by {self.host} (multi-user mode){where}"
        return f"{self.host} rejected the request with {status} {exc.reason}{where}"


def _server_message(exc: kfp_server_api.ApiException) -> str:
    """The server's own words: googleRpcStatus.message, the upload endpoints' error_message, or text."""
    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        body = str(answer.get("message") or answer.get("error_message") or answer.get("error") or body)
    if body.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
        return "(an HTML page, not KFP's API: a login page?)"
    text = " ".join(body.split()) or "(no message)"
    return text if len(text) <= 300 else text[:297] + "..."


class KfpClient(kfp_client.Client):
    """kfp.Client with three habits changed for a command-line submitter (kfp 2.17.3, client.py):
    the namespace is platform.namespace alone (~/.config/kfp/context.json, which may hold another
    cluster's namespace or cookie, is neither read nor written); healthz is asked once with a timeout,
    not 5 times 5 s apart, and a multi-user server without a namespace is refused there; a failed
    connection is retried once, and no request is sent twice after it reached the server."""

    def __init__(self, host: str, namespace: Optional[str], timeout_s: float, **auth):
        self._namespace, self._timeout_s, self._healthz = namespace or "", timeout_s, None
        with warnings.catch_warnings():  # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(host=host, namespace=namespace or "kubeflow", **auth)
        self.get_kfp_healthz()  # the constructor asks only when it knows no namespace

    def _load_context_setting_or_default(self) -> None:
        self._context_setting = {"namespace": self._namespace}

    def _load_config(self, *args, **kwargs):
        config = super()._load_config(*args, **kwargs)
        config.retries = urllib3.Retry(total=None, connect=1, read=0, status=0, other=0)
        return config

    def get_kfp_healthz(self, sleep_duration: int = 5):
        if self._healthz is None:
            timeout = (self._timeout_s, self._timeout_s)  # a tuple: kfp_server_api ignores a float
            raw = self.healthzs.healthz_service_get_healthz(_request_timeout=timeout, _preload_content=False)
            try:
                answer = json.loads(raw.data)
            except ValueError:
                answer = None
            host = self._existing_config.host
            if not isinstance(answer, dict):
                kind = raw.headers.get("Content-Type") or "no content type"
                raise ClusterError(f"platform.host: {host}/apis/v2beta1/healthz answered with {kind}, not KFP's "
                                   "JSON: the host is not the KFP API, or it wants a login (a token or a session "
                                   "cookie)")
            if answer.get("multi_user") is True and not self._namespace:
                raise ConfigError(f"platform.namespace: required: {host} runs KFP in multi-user mode; set your "
                                  "profile's namespace, e.g. platform.namespace=kubeflow-user-example-com")
            self._healthz = kfp_server_api.V2beta1GetHealthzResponse(
                multi_user=answer.get("multi_user") is True, pipeline_store=answer.get("pipeline_store"))
        return self._healthz


def connect(platform: dict, session: Session) -> KfpClient:
    auth, _ = credentials(platform)
    return KfpClient(session.host, platform["namespace"], platform["request_timeout_s"], **auth)


def quiet_kfp():
    """kfp.Client prints "<thing> details: <link>" itself; the links submit prints are its own."""
    return contextlib.redirect_stdout(io.StringIO())


def link(platform: dict, page: str) -> str:
    """A KFP UI page: runs/details/<id>, recurringrun/details/<id>."""
    return f"{(platform['ui_host'] or platform['host']).rstrip('/')}/#/{page}"
