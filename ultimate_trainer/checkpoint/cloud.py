"""Checkpoints in S3, GCS and Azure Blob Storage: upload in the background, keep
the newest K in the bucket, and download a checkpoint to resume from.

One small `Bucket` class per provider wraps its official SDK (boto3,
google-cloud-storage, azure-storage-blob); each SDK does its own multipart /
chunked parallel transfer and finds credentials in its usual chain. A remote
checkpoint is the local directory's files under `<prefix>/<name>/`, with
`manifest.json` uploaded last: a checkpoint without one in the bucket is
incomplete and never resumed from. `<prefix>/latest` names the newest.

Example:
    bucket = open_bucket("s3", "my-bucket", endpoint_url="http://127.0.0.1:5000")
    uploader = Uploader(bucket, "runs/tiny", keep=3)
    uploader.submit(Path("out/checkpoint-100"))
    uploader.close()          # waits, then reports what was uploaded
"""

import concurrent.futures
import json
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from ultimate_trainer.checkpoint.store import (
    LATEST_FILE,
    MANIFEST_FILE,
    CorruptCheckpoint,
    file_digest,
    verify_checkpoint,
)
from ultimate_trainer.errors import UserError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PROVIDER_OF_SCHEME = {"s3": "s3", "gs": "gcs", "az": "azure", "https": "azure"}
# Per-file retries within one upload pass; a pass that still fails is retried after the next save.
RETRIES = 3
BACKOFF_S = 0.5


class Bucket:
    """The few operations checkpoints need, over one SDK."""

    def __init__(self, provider, bucket):
        self.provider, self.bucket = provider, bucket

    def uri(self, key=""):
        scheme = {"s3": "s3", "gcs": "gs", "azure": "az"}[self.provider]
        return f"{scheme}://{self.bucket}/{key}".rstrip("/")


class S3Bucket(Bucket):
    def __init__(self, bucket, region=None, endpoint_url=None):
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
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})


class GCSBucket(Bucket):
    def __init__(self, bucket, endpoint_url=None):
        from google.cloud import storage

        super().__init__("gcs", bucket)
        endpoint = endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint:
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
        for key in keys:
            self.handle.blob(key).delete()


class AzureBucket(Bucket):
    def __init__(self, container, account_name=None, sas_token=None, endpoint_url=None):
        from azure.storage.blob import BlobServiceClient

        super().__init__("azure", container)
        self.account_name = account_name or os.environ.get("AZURE_STORAGE_ACCOUNT")
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
                credential = sas_token.lstrip("?")
            elif key and self.account_name:
                credential = {"account_name": self.account_name, "account_key": key}
            else:
                credential = None
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
        for key in keys:
            self.container.delete_blob(key)


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


def describe_error(error, secrets=()):
    """One line for an SDK error, with any secret cut out (SAS tokens can appear in URLs)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***REDACTED***").replace(secret.lstrip("?"), "***REDACTED***")
    return f"{type(error).__name__}: {text[:300]}"


def upload_checkpoint(bucket, directory, prefix):
    """Uploads a checkpoint dir's files in parallel, each retried with backoff,
    `manifest.json` last; returns the bytes sent."""
    directory = Path(directory)
    files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]

    def send(path):
        key = _join(prefix, directory.name, path.relative_to(directory).as_posix())
        for attempt in range(RETRIES):
            try:
                bucket.upload(path, key)
                return path.stat().st_size
            except Exception:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(BACKOFF_S * 2**attempt)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        sent = sum(pool.map(send, files))
    return sent + send(directory / MANIFEST_FILE)


def remote_checkpoints(bucket, prefix):
    """{name: {relative key: size}} of the complete checkpoints under `prefix` (those with a manifest)."""
    found = {}
    base = _join(prefix) + "/" if _join(prefix) else ""
    for key, size in bucket.list(base).items():
        name, _, rest = key[len(base):].partition("/")
        if _CHECKPOINT.match(name) and rest:
            found.setdefault(name, {})[rest] = size
    return {name: files for name, files in found.items() if MANIFEST_FILE in files}


def _step(name):
    return int(_CHECKPOINT.match(name).group(1))


class Uploader:
    """Uploads checkpoints in a background thread, so training never waits on the network.

    `submit(dir)` queues a checkpoint; a failed upload stays pending and is
    retried after the next submit (and at `close`). After each success the
    bucket's `latest` moves to the newest uploaded checkpoint and, with
    `keep`, only the newest `keep` checkpoints stay in the bucket. `pending`
    lists the local checkpoints not uploaded yet (the trainer keeps them).
    """

    def __init__(self, bucket, prefix, keep=None, log=print, secrets=()):
        self.bucket, self.prefix, self.keep, self.log, self.secrets = bucket, prefix, keep, log, secrets
        self.uploaded, self.failed, self.bytes_sent = [], {}, 0
        self._pending = []
        self._lock = threading.Lock()
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    @property
    def pending(self):
        with self._lock:
            return list(self._pending)

    def submit(self, directory):
        with self._lock:
            if Path(directory) not in self._pending:
                self._pending.append(Path(directory))
        self._queue.put("work")

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            for directory in self.pending:
                self._upload(directory)
            self._queue.task_done()

    def _upload(self, directory):
        start = time.perf_counter()
        try:
            sent = upload_checkpoint(self.bucket, directory, self.prefix)
            with self._lock:
                newest = max([_step(d.name) for d in self.uploaded] + [_step(directory.name)])
            if _step(directory.name) == newest:
                self._write_latest(directory.name)
            if self.keep:
                self._retain()
        except Exception as e:  # the SDKs raise many types; a failed upload must never stop training
            self.failed[directory] = describe_error(e, self.secrets)
            self.log(f"upload of {directory.name} to {self.bucket.uri(self.prefix)} failed "
                     f"({self.failed[directory]}); kept locally, retried after the next save")
            return
        with self._lock:
            self._pending.remove(directory)
            self.uploaded.append(directory)
            self.bytes_sent += sent
        self.failed.pop(directory, None)
        self.log(f"uploaded {directory.name} to {self.bucket.uri(_join(self.prefix, directory.name))} "
                 f"({sent / 1e6:,.1f} MB in {time.perf_counter() - start:.1f}s)")

    def _write_latest(self, name):
        with tempfile.TemporaryDirectory() as tmp:
            pointer = Path(tmp) / LATEST_FILE
            pointer.write_text(name + "\n")
            self.bucket.upload(pointer, _join(self.prefix, LATEST_FILE))

    def _retain(self):
        remote = remote_checkpoints(self.bucket, self.prefix)
        doomed = sorted(remote, key=_step)[: max(0, len(remote) - self.keep)]
        for name in doomed:
            # The manifest goes first, so a half-deleted checkpoint is never taken for a complete one.
            keys = [_join(self.prefix, name, MANIFEST_FILE)] + [
                _join(self.prefix, name, rel) for rel in remote[name] if rel != MANIFEST_FILE
            ]
            self.bucket.delete(keys)
            self.log(f"--save-total-limit {self.keep}: removed {self.bucket.uri(_join(self.prefix, name))}")

    def close(self, wait_s=600, retry_every_s=5):
        """Waits for every upload, retrying what failed until `wait_s` has passed;
        stops the thread and returns the report line."""
        deadline = time.monotonic() + wait_s
        self._queue.put("work")
        self._queue.join()
        while self.pending and time.monotonic() < deadline:
            time.sleep(min(retry_every_s, max(0.0, deadline - time.monotonic())))
            self._queue.put("work")
            self._queue.join()
        self._queue.put(None)
        self._thread.join()
        pending = self.pending
        where = self.bucket.uri(self.prefix)
        line = f"uploads: {len(self.uploaded)} checkpoint(s), {self.bytes_sent / 1e6:,.1f} MB to {where}"
        if pending:
            line += (f"; NOT uploaded after {wait_s:g}s of retries: {', '.join(p.name for p in pending)} (kept "
                     f"locally; last error: {self.failed.get(pending[-1], 'unknown')})")
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

    The URI names a checkpoint (`.../checkpoint-500`) or a prefix; a prefix
    resumes from its `latest`, falling back to the newest checkpoint that
    downloads and verifies, saying so.
    """
    provider, bucket_name, path, account = parse_uri(uri)
    bucket = bucket or open_bucket(provider, bucket_name, azure_account_name=account)
    with _Translated(f"--resume-from {uri}", getattr(bucket, "secrets", ())):
        return _fetch(uri, bucket, path, cache_dir, log)


def _fetch(uri, bucket, path, cache_dir, log):
    name = path.rsplit("/", 1)[-1] if path else ""
    if _CHECKPOINT.match(name):
        return download_checkpoint(bucket, path.rsplit("/", 1)[0] if "/" in path else "", name, cache_dir, log)
    remote = remote_checkpoints(bucket, path)
    if not remote:
        raise UserError(f"--resume-from {uri}: holds no complete checkpoint-<step> (none with a {MANIFEST_FILE})")
    order = sorted(remote, key=_step, reverse=True)
    latest_key = _join(path, LATEST_FILE)
    if latest_key in bucket.list(latest_key):
        pointer = Path(cache_dir) / ".latest.part"
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        bucket.download(latest_key, pointer)
        named = pointer.read_text().strip()
        pointer.unlink()
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
