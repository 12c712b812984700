"""Checkpoints in S3, GCS and Azure Blob Storage: a preflight before training,
uploads in the background, the newest K kept in the bucket, and a download to
resume from.

One small `Bucket` class per provider wraps its official SDK (boto3,
google-cloud-storage, azure-storage-blob); each SDK does its own multipart /
chunked parallel transfer and finds credentials in its usual chain. A remote
checkpoint is the local directory's files under `<prefix>/<name>/`, with
`manifest.json` uploaded last: a checkpoint without one in the bucket is
incomplete and never resumed from. One-line pointer objects name checkpoints:
`<prefix>/latest` the newest checkpoint-<step>, `<prefix>/best_checkpoint`
the best one's directory and `<prefix>/final_model` the final checkpoint.

Errors are classified once, here (`is_permanent`): bad or missing
credentials, a missing bucket, access denied or a malformed token are
permanent and never retried; timeouts, throttling, 5xx and dropped
connections are transient and retried with backoff.

Example:
    bucket = open_bucket("s3", "my-bucket", endpoint_url="http://127.0.0.1:5000")
    preflight(bucket, "runs/tiny")      # raises UserError on a permanent error
    uploader = Uploader(bucket, "runs/tiny", keep=3)
    uploader.submit(Path("out/checkpoint-100"))
    uploader.close()          # waits, then reports what was uploaded
"""

import collections
import concurrent.futures
import dataclasses
import json
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from ultimate_trainer.checkpoint.layout import CHECKPOINT_NAME
from ultimate_trainer.checkpoint.store import (
    LATEST_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    CorruptCheckpoint,
    file_digest,
    link_copy,
    verify_checkpoint,
)
from ultimate_trainer.config.parsers import sas_token_problem  # noqa: F401  re-exported
from ultimate_trainer.errors import UserError

_CHECKPOINT = CHECKPOINT_NAME
_MILESTONE = re.compile(r"^milestone-(\d+)$")
_BEST = re.compile(r"^best_checkpoint-(\d+)-[0-9a-f]{8}$")
# Pointer objects: one line naming a directory under the same prefix.
BEST_POINTER, FINAL_POINTER = "best_checkpoint", "final_model"
PROBE_PREFIX = ".ut-preflight-"
# Under the output dir: hard-linked snapshots of best_checkpoint/ waiting to be uploaded.
STAGING_DIR = ".cloud-staging"
PROVIDER_OF_SCHEME = {"s3": "s3", "gs": "gcs", "az": "azure", "https": "azure"}
# Tries per file within one upload pass (and per preflight request); a pass that still fails
# with a transient error is retried after the next save and at the end of the run.
RETRIES = 3
BACKOFF_S = 0.5

# HTTP statuses and service error codes that a later try can succeed after.
_TRANSIENT_STATUS = {408, 429}
_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeoutException", "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
    "RequestLimitExceeded", "InternalError", "InternalServerError", "ServiceUnavailable", "ServerBusy",
    "OperationTimedOut",
}
# Exceptions, of any of the three SDKs, that carry no HTTP status but say the request can
# never succeed as configured. Matched by class name, so classifying imports no SDK.
_PERMANENT_TYPES = {
    "AzureSigningError", "ClientAuthenticationError", "ResourceNotFoundError", "NoCredentialsError",
    "PartialCredentialsError", "DefaultCredentialsError", "ParamValidationError", "NoRegionError",
    "InvalidRegionError",
}
_SIG = re.compile(r"(sig=)[^&\s'\"]+", re.IGNORECASE)


def _chain(error):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _type_names(error):
    return {k.__name__ for k in type(error).__mro__}


def _status_and_code(error):
    """(HTTP status, service error code) that an SDK exception carries; None for each it lacks."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode"), response.get("Error", {}).get("Code")
    code = getattr(error, "error_code", None)  # azure-core
    code = str(getattr(code, "value", code)) if code else None
    for status in (getattr(error, "status_code", None), getattr(error, "code", None),
                   getattr(response, "status_code", None)):
        if isinstance(status, int) and 100 <= status < 600:
            return status, code
    return None, code


def _deciding(error):
    """The exception in `error`'s chain that says what happened (S3's S3UploadFailedError wraps
    the service's answer, for one): the first with an HTTP status, a service code or a known
    permanent type; else `error` itself."""
    for e in _chain(error):
        status, code = _status_and_code(e)
        if status is not None or code or _type_names(e) & (_PERMANENT_TYPES | {"RefreshError"}):
            return e
    return error


def is_permanent(error):
    """Whether retrying cannot fix `error`: bad, missing or malformed credentials, a missing
    bucket or container, access denied, a malformed request (4xx other than 408 and 429,
    service codes other than throttling and timeouts). Timeouts, throttling, 5xx and
    connection errors are transient, and so is anything unrecognised.

    Example:
        with_retries(lambda: bucket.upload(path, key))   # retries only while not is_permanent(e)
    """
    e = _deciding(error)
    status, code = _status_and_code(e)
    if code in _TRANSIENT_CODES:
        return False
    if status is not None:
        return not (status in _TRANSIENT_STATUS or status >= 500)
    if code:
        return True  # the service answered with an error code that no retry changes
    names = _type_names(e)
    if "RefreshError" in names:  # google-auth says itself whether a token refresh may work later
        return not getattr(e, "retryable", False)
    return bool(names & _PERMANENT_TYPES)


def with_retries(action, attempts=None):
    """`action()`, tried up to `attempts` (default RETRIES) times with exponential backoff
    while its errors are transient; a permanent error is raised at once."""
    attempts = attempts or RETRIES
    for attempt in range(attempts):
        try:
            return action()
        except Exception as e:  # the SDKs raise many types; is_permanent sorts them
            if attempt == attempts - 1 or is_permanent(e):
                raise
            time.sleep(BACKOFF_S * 2**attempt)


def describe_error(error, secrets=()):
    """One line for an SDK error, with any secret cut out (SAS tokens can appear in URLs)."""
    e = _deciding(error)
    status, code = _status_and_code(e)
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***REDACTED***").replace(secret.lstrip("?"), "***REDACTED***")
    text = _SIG.sub(r"\1***REDACTED***", text)
    tags = [f"HTTP {status}"] if status else []
    if code and code not in text and code != type(e).__name__:
        tags.append(code)
    return f"{type(e).__name__}{' (' + ', '.join(tags) + ')' if tags else ''}: {text[:300]}"


class Bucket:
    """The few operations checkpoints need, over one SDK."""

    secrets = ()  # strings to cut out of error messages

    def __init__(self, provider, bucket):
        self.provider, self.bucket = provider, bucket

    def uri(self, key=""):
        scheme = {"s3": "s3", "gcs": "gs", "azure": "az"}[self.provider]
        return f"{scheme}://{self.bucket}/{key}".rstrip("/")

    def describe(self):
        return f"{self.provider} {'container' if self.provider == 'azure' else 'bucket'} {self.bucket!r}"

    def location(self):
        """The bucket's region or location (S3, GCS); Azure containers have none."""
        raise NotImplementedError(f"{self.provider} has no bucket location")


class S3Bucket(Bucket):
    def __init__(self, bucket, region=None, endpoint_url=None):
        # heavy: the S3 SDK (boto3) loads only for --cloud-provider s3
        import boto3
        from boto3.s3.transfer import TransferConfig

        super().__init__("s3", bucket)
        # endpoint_url falls back to AWS_ENDPOINT_URL(_S3) inside boto3.
        self.client = boto3.client("s3", region_name=region, endpoint_url=endpoint_url)
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8)

    def upload(self, path, key):
        self.client.upload_file(str(path), self.bucket, key, Config=self.transfer)

    def download(self, key, path):
        self.client.download_file(self.bucket, key, str(path), Config=self.transfer)

    def list(self, prefix):
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def delete(self, keys):
        # heavy: loaded already by S3Bucket.__init__; at the top it would load for every run
        from botocore.exceptions import ClientError

        keys = list(keys)
        for i in range(0, len(keys), 1000):
            answer = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
            # DeleteObjects answers 200 and lists the keys it could not delete.
            for failed in answer.get("Errors", [])[:1]:
                raise ClientError({"Error": {"Code": failed.get("Code"), "Message": f"{failed.get('Key')}: "
                                   f"{failed.get('Message')}"}}, "DeleteObjects")

    def location(self):
        # Buckets of us-east-1 answer None, the oldest EU buckets "EU".
        answer = self.client.get_bucket_location(Bucket=self.bucket).get("LocationConstraint")
        return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(answer, answer)


class GCSBucket(Bucket):
    def __init__(self, bucket, endpoint_url=None):
        # heavy: the GCS SDK loads only for --cloud-provider gcs
        from google.cloud import storage

        super().__init__("gcs", bucket)
        endpoint = endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint:
            # heavy: part of the GCS SDK, needed only for an emulator endpoint
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"),
                                    credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
        else:
            client = storage.Client()
        self.handle = client.bucket(bucket)
        self.client = client

    def upload(self, path, key):
        # Resumable uploads in 32 MB chunks above the SDK's 8 MB threshold.
        self.handle.blob(key, chunk_size=32 << 20).upload_from_filename(str(path))

    def download(self, key, path):
        self.handle.blob(key).download_to_filename(str(path))

    def list(self, prefix):
        return {b.name: b.size for b in self.client.list_blobs(self.bucket, prefix=prefix)}

    def delete(self, keys):
        # heavy: loaded already by GCSBucket.__init__; at the top it would load for every run
        from google.api_core.exceptions import NotFound

        for key in keys:
            try:
                self.handle.blob(key).delete()
            except NotFound:  # gone already: what deleting wants (S3 and Azure agree)
                pass

    def location(self):
        return self.client.get_bucket(self.bucket).location


class AzureBucket(Bucket):
    def __init__(self, container, account_name=None, sas_token=None, endpoint_url=None):
        # heavy: the Azure SDK loads only for --cloud-provider azure
        from azure.storage.blob import BlobServiceClient

        super().__init__("azure", container)
        self.account_name = account_name or os.environ.get("AZURE_STORAGE_ACCOUNT")
        source = "--azure-sas-token" if sas_token else "AZURE_STORAGE_SAS_TOKEN"
        sas_token = sas_token or os.environ.get("AZURE_STORAGE_SAS_TOKEN")
        self.secrets = [sas_token or ""]
        connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if connection and not sas_token and not endpoint_url:
            service = BlobServiceClient.from_connection_string(connection)
        else:
            if endpoint_url:
                account_url = endpoint_url
            elif self.account_name:
                account_url = f"https://{self.account_name}.blob.core.windows.net"
            else:
                raise UserError(
                    "--cloud-provider azure needs the storage account: --azure-account-name NAME (or "
                    "AZURE_STORAGE_ACCOUNT), or AZURE_STORAGE_CONNECTION_STRING"
                )
            key = os.environ.get("AZURE_STORAGE_KEY")
            if sas_token:
                problem = sas_token_problem(sas_token)
                if problem:
                    raise UserError(f"{source} {problem}")
                # In the URL, not as the credential: the SDK takes a credential string that is not
                # exactly a SAS token for an account key, and fails only when it signs a request.
                service = BlobServiceClient(account_url=f"{account_url}?{sas_token.strip().lstrip('?')}")
            else:
                credential = {"account_name": self.account_name, "account_key": key} if key and self.account_name \
                    else None
                service = BlobServiceClient(account_url=account_url, credential=credential)
        self.container = service.get_container_client(container)

    def upload(self, path, key):
        with open(path, "rb") as f:
            self.container.upload_blob(key, f, overwrite=True, max_concurrency=4)

    def download(self, key, path):
        with open(path, "wb") as f:
            self.container.download_blob(key, max_concurrency=4).readinto(f)

    def list(self, prefix):
        return {b.name: b.size for b in self.container.list_blobs(name_starts_with=prefix)}

    def delete(self, keys):
        # heavy: loaded already by AzureBucket.__init__; at the top it would load for every run
        from azure.core.exceptions import ResourceNotFoundError

        for key in keys:
            try:
                self.container.delete_blob(key)
            except ResourceNotFoundError:  # gone already
                pass


class _Translated:
    """Turns an SDK exception inside the block into a one-line `UserError` naming
    what was being done (secrets cut out); `UserError`s pass through."""

    def __init__(self, what, secrets=()):
        self.what, self.secrets = what, secrets

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if error is None or isinstance(error, UserError) or not isinstance(error, Exception):
            return False
        raise UserError(
            f"{self.what}: {describe_error(error, self.secrets)}; check the bucket name, the credentials "
            f"and --cloud-endpoint-url"
        ) from None


def open_bucket(provider, bucket, region=None, endpoint_url=None, azure_account_name=None, azure_sas_token=None):
    """The `Bucket` for a provider (`s3`, `gcs` or `azure`)."""
    with _Translated(f"cannot open the {provider} bucket {bucket!r}", [azure_sas_token or ""]):
        if provider == "s3":
            return S3Bucket(bucket, region, endpoint_url)
        if provider == "gcs":
            return GCSBucket(bucket, endpoint_url)
        if provider == "azure":
            return AzureBucket(bucket, azure_account_name, azure_sas_token, endpoint_url)
    raise UserError(f"--cloud-provider {provider!r}: use s3, gcs or azure")


def bucket_for_upload(cloud_cfg):
    """The bucket `--cloud-provider` / `--cloud-bucket` name, with the run's endpoint and credentials."""
    c = cloud_cfg
    return open_bucket(c.cloud_provider, c.cloud_bucket, c.cloud_region, c.cloud_endpoint_url,
                       c.azure_account_name, c.azure_sas_token)


def bucket_for_uri(cloud_cfg, uri):
    """The bucket a `--resume-from` URI names, with the run's endpoint and credentials."""
    c = cloud_cfg
    provider, bucket, _, account = parse_uri(uri)
    return open_bucket(provider, bucket, c.cloud_region, c.cloud_endpoint_url, account or c.azure_account_name,
                       c.azure_sas_token)


def upload_destination(cloud_cfg, output_dir, log=print):
    """Opens the upload bucket and runs the `preflight`; returns (bucket, prefix).
    Called before anything is computed, so a permanent error costs nothing.

    Example:
        bucket, prefix = upload_destination(cfg.cloud, "runs/nano")
    """
    bucket = bucket_for_upload(cloud_cfg)
    prefix = cloud_cfg.cloud_prefix or Path(output_dir).resolve().name
    preflight(bucket, prefix, cloud_cfg.cloud_region, log)
    return bucket, prefix


def preflight(bucket, prefix, region=None, log=print):
    """Proves that this run can upload: writes a small probe object under `prefix` and deletes
    it (uploads need both), and with `region` checks the bucket's location (`check_region`).

    A permanent error raises a one-line `UserError` naming the provider, the bucket and the
    cause. Transient errors are retried with backoff as uploads are; when the service still
    does not answer, it says so and returns False: training goes ahead, and the uploads keep
    retrying (an outage is no reason to lose a run).

    Example:
        preflight(open_bucket("s3", "my-bucket"), "runs/tiny", region="eu-west-1")
    """
    key = _join(prefix, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.write_text("written by ultimate_trainer's cloud preflight; safe to delete\n")
        for verb, action in (("write", lambda: bucket.upload(probe, key)), ("delete", lambda: bucket.delete([key]))):
            try:
                with_retries(action)
            except Exception as e:
                cause = describe_error(e, bucket.secrets)
                if is_permanent(e):
                    raise UserError(
                        f"cloud preflight: cannot {verb} {bucket.uri(key)} ({bucket.describe()}): {cause}; check "
                        f"the {bucket.describe().split()[1]} name, the credentials and --cloud-endpoint-url"
                    ) from None
                log(f"cloud preflight: {bucket.uri(prefix)} did not answer in {RETRIES} tries ({cause}); training "
                    f"anyway, uploads keep retrying in the background")
                return False
    if region:
        check_region(bucket, region, log)
    log(f"cloud preflight: wrote and deleted a probe object in {bucket.uri(prefix)}")
    return True


def check_region(bucket, region, log=print):
    """Refuses a `--cloud-region` that differs from the bucket's location (S3, GCS); returns it.

    On S3 the region also configures the client; a location that cannot be read (no
    s3:GetBucketLocation) is then only reported. On GCS the flag only makes this check, so a
    location that cannot be read is refused.
    """
    try:
        location = with_retries(bucket.location)
    except Exception as e:
        cause = describe_error(e, bucket.secrets)
        if bucket.provider == "gcs" and is_permanent(e):
            raise UserError(
                f"--cloud-region {region}: cannot read the location of {bucket.uri()} ({cause}); on GCS the flag "
                f"only checks the bucket's location, so drop it or grant storage.buckets.get"
            ) from None
        log(f"--cloud-region {region}: could not read the location of {bucket.uri()} ({cause}); not checked")
        return None
    if str(location).lower() != region.lower():
        raise UserError(
            f"--cloud-region {region}: {bucket.uri()} is in {location}; pass --cloud-region {str(location).lower()} "
            f"or drop the flag"
        )
    return location


def parse_uri(uri):
    """`s3://bucket/prefix` -> ("s3", "bucket", "prefix", account or None).

    Azure also takes `https://<account>.blob.core.windows.net/<container>/<prefix>`.
    """
    parsed = urlparse(uri)
    if parsed.scheme not in PROVIDER_OF_SCHEME or not parsed.netloc:
        raise UserError(f"{uri}: not a cloud URI; use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX")
    if parsed.scheme == "https":
        host = parsed.netloc.split(".")
        if len(host) < 3 or host[1] != "blob":
            raise UserError(f"{uri}: an https URI must be an Azure blob URL, https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX")
        container, _, prefix = parsed.path.lstrip("/").partition("/")
        return "azure", container, prefix.strip("/"), host[0]
    return PROVIDER_OF_SCHEME[parsed.scheme], parsed.netloc, parsed.path.strip("/"), None


def _join(*parts):
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def upload_checkpoint(bucket, directory, prefix, name=None):
    """Uploads a checkpoint dir's files to `<prefix>/<name>/` (`name`: the dir's own by default)
    in parallel, each retried with backoff on transient errors, `manifest.json` last; returns
    the bytes sent."""
    directory = Path(directory)
    name = name or directory.name
    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]

    def send(path):
        with_retries(lambda: bucket.upload(path, _join(prefix, name, path.relative_to(directory).as_posix())))
        return path.stat().st_size

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        sent = sum(pool.map(send, files))
    return sent + send(directory / MANIFEST_FILE)


def remote_dirs(bucket, prefix, pattern):
    """{name: {relative key: size}} of the directories under `prefix` whose name matches `pattern`."""
    found = {}
    base = _join(prefix) + "/" if _join(prefix) else ""
    for key, size in bucket.list(base).items():
        name, _, rest = key[len(base):].partition("/")
        if pattern.match(name) and rest:
            found.setdefault(name, {})[rest] = size
    return found


def remote_checkpoints(bucket, prefix):
    """{name: {relative key: size}} of the complete checkpoints under `prefix` (those with a manifest)."""
    return {name: files for name, files in remote_dirs(bucket, prefix, _CHECKPOINT).items() if MANIFEST_FILE in files}


def delete_remote_dir(bucket, prefix, name, files):
    """Deletes `<prefix>/<name>/`, its manifest first, so a half-deleted checkpoint is never
    taken for a complete one."""
    bucket.delete([_join(prefix, name, MANIFEST_FILE)] + [_join(prefix, name, rel) for rel in files
                                                          if rel != MANIFEST_FILE])


def read_pointer(bucket, prefix, name):
    """The directory name a pointer object (`latest`, `best_checkpoint`, `final_model`) holds, or None."""
    key = _join(prefix, name)
    if key not in bucket.list(key):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        bucket.download(key, path)
        return path.read_text().strip() or None


def write_pointer(bucket, prefix, name, target):
    """Points `<prefix>/<name>` at the directory `target`: one object write, so readers see the
    old target or the new one, never a mix."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(target + "\n")
        with_retries(lambda: bucket.upload(path, _join(prefix, name)))


def _step(name):
    return int(_CHECKPOINT.match(name).group(1))


@dataclasses.dataclass(eq=False)
class _Job:
    kind: str  # checkpoint, milestone, best or final
    source: Path  # the directory submitted
    local: Path  # the directory uploaded from: for best, a hard-linked snapshot of it
    remote: str  # its directory name under the prefix (for final, the checkpoint it is)


class Uploader:
    """Uploads checkpoints in a background thread, so training never waits on the network.

    `submit(dir)` queues a `checkpoint-<step>`, `milestone-<step>`, `best_checkpoint` or
    `final_model` dir; a failed upload stays pending and is retried after the next submit
    (and at `close`, as long as its errors are transient). The retention rules are the
    local ones:

    - checkpoint-<step>: `<prefix>/latest` moves to the newest; with `keep`, only the
      newest `keep` stay in the bucket (never the one `final_model` names);
    - milestone-<step>: never deleted;
    - best_checkpoint: replaced when a better one comes. Locally it is rewritten in full
      and swapped by a rename; in the bucket it is uploaded under a new name
      (`best_checkpoint-<step>-<manifest digest>/`), then the `best_checkpoint` pointer
      switches to it, then the older ones are deleted: at every moment the pointer names
      a complete checkpoint. What is uploaded is a hard-linked snapshot, so a newer local
      best never mixes into an older one's upload;
    - final_model: locally hard links of the last checkpoint, so in the bucket the
      `final_model` pointer names that checkpoint-<step> and retention keeps it.

    `pending` lists the local dirs not uploaded yet (the trainer keeps them).
    """

    def __init__(self, bucket, prefix, keep=None, log=print, secrets=None):
        self.bucket, self.prefix, self.keep, self.log = bucket, prefix, keep, log
        self.secrets = bucket.secrets if secrets is None else secrets
        self.failed, self.bytes_sent = {}, 0
        self._done, self._pending, self._current = [], [], None
        self._last_pass = collections.Counter()
        self._lock = threading.Lock()
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    @property
    def pending(self):
        with self._lock:
            return [job.source for job in self._pending]

    @property
    def uploaded(self):
        """The remote names uploaded so far, in order."""
        with self._lock:
            return [job.remote for job in self._done]

    def submit(self, directory):
        """Queues a checkpoint dir for upload (called right after it is saved)."""
        directory = Path(directory)
        kind, remote = self._identify(directory)
        with self._lock:
            if not any(j.kind == kind and j.remote == remote for j in self._pending):
                local = directory
                if kind == "best":
                    # A newer best makes an older one that has not started pointless.
                    for old in [j for j in self._pending if j.kind == "best" and j is not self._current]:
                        self._pending.remove(old)
                    staging = directory.parent / STAGING_DIR
                    self._clean_staging(staging)
                    staging.mkdir(exist_ok=True)
                    local = link_copy(directory, staging / remote)
                self._pending.append(_Job(kind, directory, local, remote))
        self._queue.put("work")

    @staticmethod
    def _identify(directory):
        """(kind, remote name) of a checkpoint dir."""
        name = directory.name
        if _CHECKPOINT.match(name) or _MILESTONE.match(name):
            return "checkpoint" if _CHECKPOINT.match(name) else "milestone", name
        if name not in (BEST_POINTER, FINAL_POINTER):
            raise ValueError(f"cannot upload {directory}: not a checkpoint-<step>, milestone-<step>, "
                             f"{BEST_POINTER} or {FINAL_POINTER} dir")
        step = json.loads((directory / STATE_FILE).read_text())["step"]
        if name == FINAL_POINTER:
            return "final", f"checkpoint-{step}"
        return "best", f"{BEST_POINTER}-{step}-{file_digest(directory / MANIFEST_FILE)[:8]}"

    def _clean_staging(self, staging):
        """Removes snapshots no pending upload needs (also those a crashed run left)."""
        needed = {j.local for j in self._pending if j.kind == "best"}
        for path in staging.iterdir() if staging.is_dir() else []:
            if path not in needed:
                shutil.rmtree(path, ignore_errors=True)

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            outcome = collections.Counter()
            with self._lock:
                jobs = list(self._pending)
            for job in jobs:
                with self._lock:
                    waits = job.kind == "final" and any(j.kind == "checkpoint" and j.remote == job.remote
                                                        for j in self._pending)
                    if job not in self._pending or waits:
                        continue
                    self._current = job
                try:
                    outcome[self._upload(job)] += 1
                finally:
                    self._current = None
            self._last_pass = outcome
            self._queue.task_done()

    def _upload(self, job):
        start, sent = time.perf_counter(), 0
        try:
            if job.kind != "final" or job.remote not in self.uploaded:
                sent = upload_checkpoint(self.bucket, job.local, self.prefix, job.remote)
            if job.kind == "checkpoint":
                self._after_checkpoint(job)
            elif job.kind == "best":
                write_pointer(self.bucket, self.prefix, BEST_POINTER, job.remote)
                for name, files in remote_dirs(self.bucket, self.prefix, _BEST).items():
                    if name != job.remote:
                        delete_remote_dir(self.bucket, self.prefix, name, files)
            elif job.kind == "final":
                write_pointer(self.bucket, self.prefix, FINAL_POINTER, job.remote)
        except Exception as e:  # the SDKs raise many types; a failed upload must never stop training
            permanent = is_permanent(e)
            self.failed[job.source] = describe_error(e, self.secrets)
            self.log(f"upload of {job.source.name} to {self.bucket.uri(self.prefix)} failed "
                     f"({self.failed[job.source]}); kept locally, retried after the next save"
                     + (" (a permanent error: not retried when the run ends)" if permanent else ""))
            return "permanent" if permanent else "transient"
        with self._lock:
            self._pending.remove(job)
            self._done.append(job)
            self.bytes_sent += sent
        self.failed.pop(job.source, None)
        if job.local != job.source:
            shutil.rmtree(job.local, ignore_errors=True)
        where = self.bucket.uri(_join(self.prefix, job.remote))
        if job.kind == "final":
            self.log(f"uploaded {FINAL_POINTER}: {self.bucket.uri(_join(self.prefix, FINAL_POINTER))} names {where}")
        else:
            pointer = f"; {self.bucket.uri(_join(self.prefix, BEST_POINTER))} names it" if job.kind == "best" else ""
            self.log(f"uploaded {job.source.name} to {where} ({sent / 1e6:,.1f} MB in "
                     f"{time.perf_counter() - start:.1f}s){pointer}")
        return "ok"

    def _after_checkpoint(self, job):
        with self._lock:
            newest = max(_step(j.remote) for j in self._done + [job] if j.kind == "checkpoint")
        if _step(job.remote) == newest:
            write_pointer(self.bucket, self.prefix, LATEST_FILE, job.remote)
        if not self.keep:
            return
        remote = remote_checkpoints(self.bucket, self.prefix)
        final = read_pointer(self.bucket, self.prefix, FINAL_POINTER)
        candidates = sorted((name for name in remote if name != final), key=_step)
        for name in candidates[: max(0, len(candidates) - self.keep)]:
            delete_remote_dir(self.bucket, self.prefix, name, remote[name])
            self.log(f"--save-total-limit {self.keep}: removed {self.bucket.uri(_join(self.prefix, name))}")

    def close(self, wait_s=600, retry_every_s=5):
        """Waits for every upload, retrying what failed with a transient error until `wait_s`
        has passed (a pass whose errors were all permanent ends the wait); stops the thread
        and returns the report line."""
        deadline = time.monotonic() + wait_s
        self._queue.put("work")
        self._queue.join()
        while self.pending and self._last_pass["transient"] and time.monotonic() < deadline:
            time.sleep(min(retry_every_s, max(0.0, deadline - time.monotonic())))
            self._queue.put("work")
            self._queue.join()
        self._queue.put(None)
        self._thread.join()
        with self._lock:
            pending = list(self._pending)
            kinds = collections.Counter(job.kind for job in self._done)
        for job in pending:
            if job.local != job.source:
                shutil.rmtree(job.local, ignore_errors=True)
        for staging in {job.local.parent for job in self._done + pending if job.local != job.source}:
            if staging.is_dir() and not any(staging.iterdir()):
                staging.rmdir()
        parts = [f"{kinds['checkpoint']} checkpoint(s)"] + [f"{kinds['milestone']} milestone(s)"] * bool(
            kinds["milestone"]) + [BEST_POINTER] * bool(kinds["best"]) + [FINAL_POINTER] * bool(kinds["final"])
        line = f"uploads: {', '.join(parts)}, {self.bytes_sent / 1e6:,.1f} MB to {self.bucket.uri(self.prefix)}"
        if pending:
            names = ", ".join(job.source.name for job in pending)
            last = self.failed.get(pending[-1].source) or next(iter(self.failed.values()), "unknown")
            if self._last_pass["transient"]:
                line += f"; NOT uploaded after {wait_s:g}s of retries: {names} (kept locally; last error: {last})"
            else:
                line += f"; NOT uploaded: {names} (kept locally; a permanent error, not retried: {last})"
        return line


def download_checkpoint(bucket, prefix, name, cache_dir, log=print):
    """Downloads `<prefix>/<name>/` into `cache_dir/<name>` and verifies it.

    Files already there with the manifest's size and SHA-256 are kept, so an
    interrupted download resumes; each file lands under a `.part` name and is
    renamed when complete, so a partial file is never taken for a whole one.
    """
    target = Path(cache_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    base = _join(prefix, name)
    manifest_part = target / (MANIFEST_FILE + ".part")
    bucket.download(_join(base, MANIFEST_FILE), manifest_part)
    try:
        files = json.loads(manifest_part.read_text())["files"]
    except (ValueError, KeyError):
        raise CorruptCheckpoint(f"--resume-from {bucket.uri(base)}: its {MANIFEST_FILE} is damaged") from None
    fetched = 0
    for rel, entry in files.items():
        path = target / rel
        if path.is_file() and path.stat().st_size == entry["bytes"] and file_digest(path) == entry["sha256"]:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        bucket.download(_join(base, rel), part)
        os.replace(part, path)
        fetched += entry["bytes"]
    os.replace(manifest_part, target / MANIFEST_FILE)
    verify_checkpoint(target, "--resume-from")
    log(f"downloaded {bucket.uri(base)} into {target} ({fetched / 1e6:,.1f} MB fetched, the rest was cached)")
    return target


def fetch_for_resume(uri, cache_dir, bucket=None, log=print):
    """Resolves a `--resume-from` URI to a verified local checkpoint dir.

    The URI names a checkpoint directory (`.../checkpoint-500`, `.../milestone-500`), a
    pointer (`.../best_checkpoint`, `.../final_model`) or a prefix; a prefix resumes from
    its `latest`, falling back to the newest checkpoint that downloads and verifies,
    saying so.
    """
    provider, bucket_name, path, account = parse_uri(uri)
    bucket = bucket or open_bucket(provider, bucket_name, azure_account_name=account)
    with _Translated(f"--resume-from {uri}", bucket.secrets):
        return _fetch(uri, bucket, path, cache_dir, log)


def _fetch(uri, bucket, path, cache_dir, log):
    parent, _, name = path.rpartition("/")
    if name in (BEST_POINTER, FINAL_POINTER):
        target = read_pointer(bucket, parent, name)
        if target is None:
            raise UserError(f"--resume-from {uri}: no such pointer object in the bucket")
        return download_checkpoint(bucket, parent, target, cache_dir, log)
    if _CHECKPOINT.match(name) or _MILESTONE.match(name) or _BEST.match(name):
        return download_checkpoint(bucket, parent, name, cache_dir, log)
    remote = remote_checkpoints(bucket, path)
    if not remote:
        raise UserError(f"--resume-from {uri}: holds no complete checkpoint-<step> (none with a {MANIFEST_FILE})")
    order = sorted(remote, key=_step, reverse=True)
    named = read_pointer(bucket, path, LATEST_FILE)
    if named in remote:
        order = [named] + [n for n in order if n != named]
    problems = []
    for name in order:
        try:
            checkpoint = download_checkpoint(bucket, path, name, cache_dir, log)
        except CorruptCheckpoint as e:
            problems.append(str(e))
            shutil.rmtree(Path(cache_dir) / name, ignore_errors=True)
            continue
        if problems:
            log(f"--resume-from {uri}: {len(problems)} checkpoint(s) failed verification ({problems[0]}); "
                f"resuming from {name}, the newest valid one")
        return checkpoint
    raise UserError(f"--resume-from {uri}: no checkpoint there verifies; the newest: {problems[0]}")
