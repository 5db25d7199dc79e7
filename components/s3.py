"""The S3 backend of components/run_store.py, through boto3 (AWS, MinIO, moto).

Credentials come only from boto3's standard chain (AWS_* env, AWS_PROFILE, ~/.aws, the pod's
role); nothing here reads or writes them. Integrity: the sha256 computed locally travels in the
object's metadata and is checked after every download; uploads also ask S3 for its own SHA256
checksum (real S3 verifies it on receipt; moto 5.2.5 stores it without verifying). Every failure
becomes one StorageError line naming the object and what to do.
"""

import hashlib
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bx
from botocore.config import Config as BotoConfig

from components.config import StorageConfig
from components.errors import StorageError
from components.run_store import Entry, RunStore, check_key, checksum_error, join_uri, split_s3

MiB = 1 << 20
SHA256_META = "sha256"  # x-amz-meta-sha256: the hex digest of the whole file


def make_client(settings: StorageConfig):
    config = BotoConfig(
        # max_attempts counts the first request, like AWS_MAX_ATTEMPTS (botocore's own
        # "max_attempts" would count retries only)
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout_s, read_timeout=settings.read_timeout_s,
        # a custom endpoint (MinIO, moto) seldom resolves bucket.host names: address buckets by path
        s3={"addressing_style": "path"} if settings.endpoint_url else None)
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url,
                                          region_name=settings.region, config=config)


def describe_error(exc: Exception, target: str, client, settings: StorageConfig, bucket: str) -> str:
    """A botocore error as one line naming `target` and what to do (data_sources.py says the same)."""
    endpoint, n = client.meta.endpoint_url, settings.max_attempts
    attempts = f"{n} attempt" + "s" * (n != 1)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return (f"{target}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) in the environment of every step")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return (f"{target}: cannot reach the S3 endpoint {endpoint} ({attempts}); check "
                "storage.endpoint_url and that the server is up")
    if isinstance(exc, bx.ReadTimeoutError):
        return (f"{target}: the S3 endpoint {endpoint} did not answer within storage.read_timeout_s="
                f"{settings.read_timeout_s:g} ({attempts}); check that it is an S3 server")
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        if code == "NoSuchBucket":
            return f"{target}: bucket {bucket!r} does not exist at {endpoint}; create it or fix output_dir"
        if code in ("InvalidAccessKeyId", "InvalidToken", "ExpiredToken"):
            return (f"{target}: the credentials were refused ({code}); check AWS_ACCESS_KEY_ID "
                    "(or AWS_PROFILE, AWS_SESSION_TOKEN) for this endpoint")
        if code == "SignatureDoesNotMatch":
            return (f"{target}: the secret key does not match the access key id (SignatureDoesNotMatch); "
                    "check AWS_SECRET_ACCESS_KEY")
        if code in ("AccessDenied", "403"):  # a HEAD request's 403 carries no reason
            return (f"{target}: access denied ({code}); the credentials lack permission on bucket "
                    f"{bucket!r}: check its policy and the IAM user's")
        message = " ".join(str(error.get("Message", "")).split())
        return f"{target}: S3 refused the request ({code or 'error'}: {message}); see the endpoint's logs"
    return f"{target}: S3 request failed ({' '.join(str(exc).split())}); retry, or check storage.*"


class S3Store(RunStore):
    def __init__(self, uri: str, settings: StorageConfig, client=None):
        super().__init__(uri, settings)
        self.bucket, self.prefix = split_s3(self.uri)
        self.client = client or make_client(settings)
        part = settings.multipart_threshold_mb * MiB
        self.transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part)

    def child(self, path: str) -> "S3Store":
        return S3Store(join_uri(self.uri, path), self.settings, client=self.client)

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, key: Optional[str] = None) -> Iterator[None]:
        try:
            yield
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise StorageError(self._describe(exc, join_uri(self.uri, key) if key else self.uri)) from None

    def _describe(self, exc: Exception, target: str) -> str:
        return describe_error(exc, target, self.client, self.settings, self.bucket)

    def _put(self, local_path: Path, key: str, entry: Entry) -> None:
        args = {"Metadata": {SHA256_META: entry["sha256"]}, "ChecksumAlgorithm": "SHA256"}
        with self._errors(key):
            try:
                self.client.upload_file(str(local_path), self.bucket, self._object(key), ExtraArgs=args,
                                        Config=self.transfer)
            except S3UploadFailedError as exc:
                # boto3 folds the ClientError, and with it the error code, into its message
                if isinstance(exc.__context__, bx.ClientError):
                    raise exc.__context__ from None
                raise
        self.uploads[key] += 1

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(check_key(key)):
            self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ChecksumAlgorithm="SHA256",
                                   Metadata={SHA256_META: hashlib.sha256(data).hexdigest()})
        self.uploads[key] += 1

    def _get_object(self, key: str) -> Optional[dict]:
        with self._errors(key):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._object(key))
            except bx.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return None
                raise

    def _download(self, key: str, dest: Path) -> Optional[str]:
        response = self._get_object(key)
        if response is None:
            raise StorageError(f"{join_uri(self.uri, key)}: not found; check the run id and output_dir")
        with self._errors(key), open(dest, "wb") as f:
            shutil.copyfileobj(response["Body"], f, 1 << 20)
        return response.get("Metadata", {}).get(SHA256_META)

    def _read(self, key: str) -> Optional[bytes]:
        tagged = self.read_tagged(key)
        return None if tagged is None else tagged[0]

    def _stat(self, key: str) -> Optional[Entry]:
        with self._errors(key):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._object(key))
            except bx.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    return None
                raise
        return {"size": head["ContentLength"], "sha256": head.get("Metadata", {}).get(SHA256_META)}

    def exists(self, key: str) -> bool:
        # a listing, not a HEAD: its errors say why (a HEAD's 403 or 404 has no body)
        return key in self._list_objects(check_key(key), max_keys=1)

    def list(self, prefix: str = "") -> List[str]:
        return sorted(self._list_objects(prefix))

    def _list_objects(self, prefix: str, max_keys: Optional[int] = None) -> List[str]:
        root = self._object("")
        kwargs = {"Bucket": self.bucket, "Prefix": root + prefix}
        if max_keys:
            kwargs["PaginationConfig"] = {"MaxItems": max_keys}
        with self._errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(**kwargs)
            return [item["Key"][len(root):] for page in pages for item in page.get("Contents", [])]

    def delete(self, key: str) -> None:
        with self._errors(check_key(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    # Conditional writes (S3 since 2024, moto 5.2.5 too): S3 checks the condition and stores the
    # object as one step, so of two racing writers exactly one succeeds.
    def create_bytes(self, key: str, data: bytes) -> bool:
        return self._put_if(key, data, IfNoneMatch="*")

    def read_tagged(self, key: str) -> Optional[tuple]:
        response = self._get_object(check_key(key))
        if response is None:
            return None
        with self._errors(key):
            data = response["Body"].read()
        stored, got = response.get("Metadata", {}).get(SHA256_META), hashlib.sha256(data).hexdigest()
        if stored is not None and got != stored:
            raise checksum_error(join_uri(self.uri, key), stored, got)
        return data, response["ETag"]

    def replace_bytes(self, key: str, data: bytes, tag: str) -> bool:
        return self._put_if(key, data, IfMatch=tag)

    def _put_if(self, key: str, data: bytes, **condition) -> bool:
        with self._errors(check_key(key)):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data,
                                       ChecksumAlgorithm="SHA256",
                                       Metadata={SHA256_META: hashlib.sha256(data).hexdigest()}, **condition)
            except bx.ClientError as exc:
                # 412: the condition failed; 409: a concurrent conditional write to the key is in
                # flight (S3 asks to retry); 404: If-Match on an object deleted meanwhile
                if exc.response.get("Error", {}).get("Code") in (
                        "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"):
                    return False
                raise
        self.uploads[key] += 1
        return True
