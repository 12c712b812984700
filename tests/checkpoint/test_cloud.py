"""Checkpoints in S3, GCS and Azure, against real emulators on 127.0.0.1 (tests/emulators.py)."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli, run_main, tiny_model_flags
from ultimate_trainer.checkpoint import cloud, store
from ultimate_trainer.errors import UserError

FLAGS = [*tiny_model_flags(), "--dropout-rate", "0", "--log-every", "1", "--eval-every", "1000", "--save-every", "2"]
SCHEME = {"s3": "s3", "gcs": "gs", "azure": "az"}


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _credentials(emulator):
    """(flags, env): Azure authenticates with a SAS token on the command line, the secret to hunt for."""
    if emulator.provider != "azure":
        return [], emulator.env()
    token = emulator.sas_token()
    return ["--azure-sas-token", token], {}


# End to end through the CLI (the uploading run in process, the resume in a new one), about 40 s a
# provider: the default run keeps S3, and GCS and Azure run in the slow step. Every provider's bucket
# code still runs in the default run, in process, in
# test_remote_resume_verifies_falls_back_and_resumes_a_broken_download.
@pytest.mark.parametrize("emulator", ["s3", pytest.param("gcs", marks=pytest.mark.slow),
                                      pytest.param("azure", marks=pytest.mark.slow)], indirect=True)
def test_upload_retention_and_exact_resume_from_the_bucket(emulator, tmp_path):
    secret_flags, env = _credentials(emulator)
    out = tmp_path / "run"
    first = run_main([*FLAGS, "--max-steps", "6", "--save-total-limit", "2", "--milestone-every", "4",
                      "--output-dir", str(out), *emulator.flags(), "--cloud-prefix", "runs/tiny", *secret_flags],
                     env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.index("cloud preflight: wrote and deleted a probe") < first.stdout.index("training ")
    for step in (2, 4, 6):
        assert f"uploaded checkpoint-{step}" in first.stdout
    assert "uploads: 3 checkpoint(s), 1 milestone(s), best_checkpoint, final_model" in first.stdout
    assert "NOT uploaded" not in first.stdout

    os.environ.update(emulator.env())
    bucket = emulator.open_bucket() if emulator.provider != "azure" else cloud.open_bucket(
        "azure", emulator.bucket, endpoint_url=emulator.endpoint, azure_account_name="devstoreaccount1",
        azure_sas_token=secret_flags[1])
    keys = bucket.list("runs/tiny/")
    assert {k.split("/")[2] for k in keys if "/checkpoint-" in k} == {"checkpoint-4", "checkpoint-6"}  # limit 2
    # Pruning left the milestone, the best (step 6, the only validation after step 0) and the final model.
    assert _remote_layout(bucket, "runs/tiny") == {
        "milestone-4": True, "best_checkpoint": ("best_checkpoint-6-", True), "final_model": ("checkpoint-6", True)}
    assert not any(cloud.PROBE_PREFIX in k for k in keys)
    manifest = json.loads((out / "checkpoint-4" / store.MANIFEST_FILE).read_text())
    assert {k[len("runs/tiny/checkpoint-4/"):] for k in keys if "/checkpoint-4/" in k} == set(manifest["files"]) | {
        store.MANIFEST_FILE}
    assert "runs/tiny/latest" in keys
    # As if the machine died while checkpoint-6 was uploading: no manifest, so it is not complete.
    bucket.delete(["runs/tiny/checkpoint-6/manifest.json"])

    # The resumed run goes on exactly as the first, uninterrupted one did; in a new process, so that
    # nothing the checkpoint lacks can come from the process that trained it.
    resumed = tmp_path / "resumed"
    uri = f"{SCHEME[emulator.provider]}://{emulator.bucket}/runs/tiny"
    extra = ["--azure-account-name", "devstoreaccount1"] if emulator.provider == "azure" else []
    second = run_cli([*FLAGS, "--max-steps", "6", "--output-dir", str(resumed), "--resume-from", uri,
                      "--cloud-endpoint-url", emulator.endpoint, *extra, *secret_flags], env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "downloaded" in second.stdout and "at step 4" in second.stdout
    got, straight = _losses(resumed), _losses(out)
    assert sorted(got) == [5, 6] and sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(straight[step], abs=1e-6)

    if secret_flags:  # the SAS token appears nowhere: output, configs, checkpoints, logs
        token = secret_flags[1]
        assert token not in first.stdout + first.stderr + second.stdout + second.stderr
        for path in [*out.rglob("*"), *resumed.rglob("*")]:
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


def _remote_layout(bucket, prefix):
    """What the bucket holds besides checkpoint-<step>: {milestone name: complete} and, for
    each of best_checkpoint and final_model, (the start of what its pointer names, whether
    that dir is complete); asserts that only one best dir is left."""
    import re

    dirs = cloud.remote_dirs(bucket, prefix, re.compile(r"^(milestone-\d+|best_checkpoint-.+)$"))
    layout = {name: store.MANIFEST_FILE in files for name, files in dirs.items() if name.startswith("milestone-")}
    assert len([name for name in dirs if name.startswith("best_checkpoint-")]) <= 1, sorted(dirs)
    complete = cloud.remote_checkpoints(bucket, prefix)
    for pointer in (cloud.BEST_POINTER, cloud.FINAL_POINTER):
        target = cloud.read_pointer(bucket, prefix, pointer)
        if target is not None:
            whole = target in complete or store.MANIFEST_FILE in dirs.get(target, {})
            layout[pointer] = (target if pointer == cloud.FINAL_POINTER else target[: target.rindex("-") + 1], whole)
    return layout


def test_uploads_survive_an_outage_and_complete_after_the_restart(tmp_path):
    from tests.emulators import S3Emulator

    emulator = S3Emulator(tmp_path)  # not started: every upload fails until it comes up
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ultimate_trainer", *FLAGS, "--max-steps", "40", "--save-every", "5",
           "--output-dir", str(out), *emulator.flags(), "--cloud-prefix", "outage"]
    env = dict(os.environ, **emulator.env(), AWS_MAX_ATTEMPTS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, rest, stderr = [], "", ""
    try:
        for line in proc.stdout:
            lines.append(line)
            if "upload of checkpoint-" in line and "failed" in line:
                emulator.start()
                break
        rest, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(lines) + rest
    try:
        assert proc.returncode == 0, stderr[-3000:]
        assert "cloud preflight:" in stdout and "training anyway" in stdout  # an outage is transient
        assert "step 40/40" in stdout, "training went on while uploads failed"
        assert "uploads: 8 checkpoint(s)" in stdout and "NOT uploaded" not in stdout
        keys = emulator.open_bucket().list("outage/")
        assert {f"outage/checkpoint-{s}/{store.MANIFEST_FILE}" for s in range(5, 41, 5)} <= set(keys)
    finally:
        emulator.stop()


def test_remote_resume_verifies_falls_back_and_resumes_a_broken_download(emulator, tmp_path, saver):
    prefix = f"{SCHEME[emulator.provider]}://{emulator.bucket}"
    bucket = emulator.open_bucket()
    run = tmp_path / "run"
    uploader = cloud.Uploader(bucket, "p", log=lambda line: None)
    for step in (2, 4):
        uploader.submit(saver(run, f"checkpoint-{step}", step))
    assert "2 checkpoint(s)" in uploader.close()
    assert {k.split("/")[1] for k in bucket.list("p/") if "/checkpoint-" in k} == {"checkpoint-2", "checkpoint-4"}
    # The newest is damaged in the bucket: resuming from the prefix falls back to the older one.
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a model")
    bucket.upload(bad, "p/checkpoint-4/model.keras")
    logged = []
    got = cloud.fetch_for_resume(f"{prefix}/p", tmp_path / "cache", bucket, logged.append)
    assert got == tmp_path / "cache" / "checkpoint-2" and store.verify_checkpoint(got)
    assert any("failed verification" in line and "resuming from checkpoint-2" in line for line in logged)
    # An interrupted download: one file gone, another left half-written; the rest is reused.
    (got / store.STATE_FILE).unlink()
    (got / (store.MODEL_FILE + ".part")).write_bytes(b"half")
    logged.clear()
    again = cloud.fetch_for_resume(f"{prefix}/p/checkpoint-2", tmp_path / "cache", bucket, logged.append)
    assert again == got and store.verify_checkpoint(again)
    fetched = float(logged[-1].split("(")[1].split(" MB")[0])
    assert fetched < 0.01, logged[-1]  # only trainer_state.json came again
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        cloud.fetch_for_resume(f"{prefix}/nothing-here", tmp_path / "cache", bucket)


@pytest.mark.parametrize(
    "uri, parsed",
    [
        ("s3://b/runs/x", ("s3", "b", "runs/x", None)),
        ("gs://b", ("gcs", "b", "", None)),
        ("az://c/p/checkpoint-5", ("azure", "c", "p/checkpoint-5", None)),
        ("https://acct.blob.core.windows.net/c/p", ("azure", "c", "p", "acct")),
    ],
)
def test_uri_parsing(uri, parsed):
    assert cloud.parse_uri(uri) == parsed


def test_bad_uris_and_error_redaction():
    with pytest.raises(UserError, match="an https URI must be an Azure blob URL"):
        cloud.parse_uri("https://example.com/x")
    with pytest.raises(UserError, match="not a cloud URI"):
        cloud.parse_uri("ftp://x/y")
    line = cloud.describe_error(RuntimeError("GET https://a/b?sv=2024&sig=SECRET failed\nmore"), ["sv=2024&sig=SECRET"])
    assert "SECRET" not in line and "***REDACTED***" in line and "more" not in line


def test_bucket_errors_are_one_line(monkeypatch):
    for name in ("AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="--cloud-provider azure needs the storage account"):
        cloud.open_bucket("azure", "container")
    with pytest.raises(UserError, match="use s3, gcs or azure"):
        cloud.open_bucket("ftp", "b")


# --- preflight, error classification, best / milestone / final (in process) ---


# The tests of `shared` run on one pytest-xdist worker (tools/run_tests.py), which starts each emulator once.
ONE_WORKER = pytest.mark.xdist_group("cloud-emulators")


@pytest.fixture(scope="module", params=["s3", "gcs", "azure"])
def shared(request, tmp_path_factory):
    """One emulator of each provider for the in-process tests below (each uses its own prefix)."""
    from tests.emulators import EMULATORS

    running = EMULATORS[request.param](tmp_path_factory.mktemp(request.param)).start()
    yield running
    running.stop()


def _counting(bucket, monkeypatch):
    calls = []
    upload = bucket.upload
    monkeypatch.setattr(bucket, "upload", lambda path, key: (calls.append(key), upload(path, key)))
    return calls


@ONE_WORKER
def test_preflight_probes_and_stops_at_once_on_a_missing_bucket(shared, monkeypatch):
    monkeypatch.setattr(cloud, "BACKOFF_S", 5.0)  # a retry would show in the time taken
    ok = shared.open_bucket()
    logged = []
    assert cloud.preflight(ok, "pre", log=logged.append) is True
    assert "wrote and deleted a probe object" in logged[-1] and not ok.list("pre/")  # the probe is gone

    missing = cloud.open_bucket(shared.provider, "no-such-bucket", endpoint_url=shared.endpoint,
                                **shared.bucket_kwargs())
    calls = _counting(missing, monkeypatch)
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        cloud.preflight(missing, "pre")
    assert time.monotonic() - start < 4 and len(calls) == 1  # permanent: not retried
    line = str(caught.value)
    noun = "container" if shared.provider == "azure" else "bucket"
    assert "\n" not in line and f"({shared.provider} {noun} 'no-such-bucket')" in line, line
    assert {"s3": "NoSuchBucket", "gcs": "HTTP 404", "azure": "ContainerNotFound"}[shared.provider] in line, line

    # --cloud-region: S3 and GCS check the bucket's location (moto's buckets are in us-east-1,
    # the GCS emulator's in US); Azure refuses the flag in the config (test_region_and_sas_flags_are_checked).
    if shared.provider != "azure":
        here, there = {"s3": ("us-east-1", "eu-west-1"), "gcs": ("us", "europe-west4")}[shared.provider]
        kwargs = {"region": there} if shared.provider == "s3" else {}
        assert cloud.preflight(cloud.open_bucket(shared.provider, shared.bucket, endpoint_url=shared.endpoint),
                               "pre", region=here, log=logged.append)
        elsewhere = cloud.open_bucket(shared.provider, shared.bucket, endpoint_url=shared.endpoint, **kwargs)
        with pytest.raises(UserError, match=rf"(?i)--cloud-region {there}: .* is in {here}; pass --cloud-region {here}"):
            cloud.preflight(elsewhere, "pre", region=there)


@ONE_WORKER
def test_azure_sas_tokens_are_checked_before_any_request(shared, monkeypatch):
    if shared.provider != "azure":
        pytest.skip("Azure only")
    good = shared.sas_token()
    kwargs = dict(endpoint_url=shared.endpoint, azure_account_name="devstoreaccount1")
    assert cloud.preflight(cloud.open_bucket("azure", shared.bucket, azure_sas_token=good, **kwargs), "sas",
                           log=lambda line: None)
    # "not-a-token" is what the SDK used to take for an account key, failing only when it signed a
    # request ("AzureSigningError: Incorrect padding"), after training.
    for token in ("not-a-token", good.split("&sig=")[0], "https://x.blob.core.windows.net/c?" + good):
        with pytest.raises(UserError, match="--azure-sas-token is not a SAS token") as caught:
            cloud.open_bucket("azure", shared.bucket, azure_sas_token=token, **kwargs)
        assert token not in str(caught.value)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "garbage")
    with pytest.raises(UserError, match="AZURE_STORAGE_SAS_TOKEN is not a SAS token"):
        cloud.open_bucket("azure", shared.bucket, **kwargs)
    # Well formed, but a wrong signature: the service refuses it, a permanent error.
    forged = good.replace("sig=", "sig=AAAA")
    with pytest.raises(UserError, match=r"cloud preflight: cannot write .*\(azure container 'ut-checkpoints'\): "
                                        r".*HTTP 403") as caught:
        cloud.preflight(cloud.open_bucket("azure", shared.bucket, azure_sas_token=forged, **kwargs), "sas")
    assert "sig=***REDACTED***" in str(caught.value) or "sig=" not in str(caught.value)
    assert forged not in str(caught.value) and forged.split("sig=")[1] not in str(caught.value)


class _Gated:
    """A bucket whose uploads wait until `gate` is set."""

    def __init__(self, bucket):
        import threading

        self.bucket, self.gate = bucket, threading.Event()

    def __getattr__(self, name):
        return getattr(self.bucket, name)

    def upload(self, path, key):
        assert self.gate.wait(60)
        return self.bucket.upload(path, key)


@ONE_WORKER
def test_best_milestone_and_final_follow_the_retention_rules(shared, tmp_path, saver):
    bucket = shared.open_bucket()
    run, logged = tmp_path / "run", []
    gated = _Gated(bucket)
    uploader = cloud.Uploader(gated, "rules", keep=1, log=logged.append)
    uploader.submit(saver(run, "checkpoint-2", 2))
    uploader.submit(saver(run, "milestone-2", 2))
    uploader.submit(saver(run, "best_checkpoint", 2, replace=True))
    # The local best is replaced (as the trainer does) while the upload of step 2's waits:
    # the bucket gets step 2's files, not a mix.
    saver(run, "best_checkpoint", 3, replace=True)
    gated.gate.set()
    uploader.submit(saver(run, "checkpoint-4", 4))
    checkpoint = saver(run, "checkpoint-6", 6)
    uploader.submit(checkpoint)
    uploader.submit(store.link_copy(checkpoint, run / "final_model"))
    line = uploader.close()
    assert line.startswith("uploads: 3 checkpoint(s), 1 milestone(s), best_checkpoint, final_model"), line
    assert {k.split("/")[1] for k in bucket.list("rules/checkpoint-")} == {"checkpoint-6"}  # keep 1
    assert _remote_layout(bucket, "rules") == {
        "milestone-2": True, "best_checkpoint": ("best_checkpoint-2-", True), "final_model": ("checkpoint-6", True)}
    assert not (run / cloud.STAGING_DIR).exists()
    best = cloud.fetch_for_resume(f"{SCHEME[shared.provider]}://{shared.bucket}/rules/best_checkpoint", tmp_path / "cache",
                                  bucket, logged.append)
    assert json.loads((best / store.STATE_FILE).read_text())["step"] == 2 and store.verify_checkpoint(best)

    # A better one replaces it, and a later run on the same prefix prunes its checkpoints but
    # never the milestone, the best or the checkpoint final_model names.
    later = cloud.Uploader(bucket, "rules", keep=1, log=logged.append)
    later.submit(saver(run, "best_checkpoint", 8, replace=True))
    later.submit(saver(run, "checkpoint-8", 8))
    later.submit(saver(run, "checkpoint-10", 10))
    assert "NOT uploaded" not in later.close()
    assert {k.split("/")[1] for k in bucket.list("rules/checkpoint-")} == {"checkpoint-6", "checkpoint-10"}
    assert _remote_layout(bucket, "rules") == {
        "milestone-2": True, "best_checkpoint": ("best_checkpoint-8-", True), "final_model": ("checkpoint-6", True)}
    milestone = cloud.fetch_for_resume(f"{SCHEME[shared.provider]}://{shared.bucket}/rules/milestone-2", tmp_path / "cache",
                                       bucket, logged.append)
    assert store.verify_checkpoint(milestone)["step"] == 2


@ONE_WORKER
def test_a_permanent_upload_error_ends_the_wait_at_once(shared, tmp_path, saver):
    if shared.provider != "s3":
        pytest.skip("the classification is the same for every provider (test_errors_are_classified)")
    missing = cloud.open_bucket("s3", "deleted-after-the-preflight", endpoint_url=shared.endpoint)
    uploader = cloud.Uploader(missing, "p", log=lambda line: None)
    uploader.submit(saver(tmp_path, "checkpoint-2", 2))
    start = time.monotonic()
    line = uploader.close(wait_s=600)
    assert time.monotonic() - start < 10, "retried a permanent error"
    assert "NOT uploaded: checkpoint-2 (kept locally; a permanent error, not retried: NoSuchBucket" in line, line


def test_transient_errors_are_retried_with_backoff(tmp_path, monkeypatch, saver):
    from tests.emulators import S3Emulator

    monkeypatch.setattr(cloud, "BACKOFF_S", 0.01)
    emulator = S3Emulator(tmp_path)  # not started yet: connections are refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket = emulator.open_bucket()
    calls = _counting(bucket, monkeypatch)
    logged = []
    assert cloud.preflight(bucket, "t", log=logged.append) is False
    assert len(calls) == cloud.RETRIES and "training anyway" in logged[-1]
    uploader = cloud.Uploader(bucket, "t", log=logged.append)
    uploader.submit(saver(tmp_path / "run", "checkpoint-2", 2))
    try:
        time.sleep(0.5)
        emulator.start()
        assert uploader.close(wait_s=60, retry_every_s=0.2).startswith("uploads: 1 checkpoint(s)")
    finally:
        emulator.stop()
    assert any("upload of checkpoint-2" in line and "failed" in line for line in logged)


def _sdk_errors():
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError, ServiceRequestError
    from azure.storage.blob._shared.authentication import AzureSigningError
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
    from google.api_core import exceptions as google

    def s3(code, status):
        return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")

    def wrapped(error):  # what boto3's upload_file raises: the service's answer as the context
        try:
            raise error
        except ClientError:
            try:
                raise S3UploadFailedError("Failed to upload x to b/k: ...")
            except S3UploadFailedError as outer:
                return outer

    def azure(status, code):
        error = HttpResponseError(message=code)
        error.status_code, error.error_code = status, code
        return error

    permanent = [s3("NoSuchBucket", 404), wrapped(s3("AccessDenied", 403)), s3("InvalidAccessKeyId", 403),
                 NoCredentialsError(), google.NotFound("bucket"), google.Forbidden("denied"),
                 google.Unauthorized("who"), ResourceNotFoundError("container"), azure(403, "AuthenticationFailed"),
                 AzureSigningError("Incorrect padding")]
    transient = [s3("SlowDown", 503), s3("RequestTimeout", 400), s3("InternalError", 500),
                 wrapped(s3("ServiceUnavailable", 503)), EndpointConnectionError(endpoint_url="http://x"),
                 google.ServiceUnavailable("later"), google.TooManyRequests("slow down"),
                 google.GatewayTimeout("timeout"), azure(503, "ServerBusy"), azure(500, "InternalError"),
                 ServiceRequestError("connection reset"), ConnectionResetError(104, "reset"), TimeoutError()]
    return permanent, transient


def test_errors_are_classified_once_for_preflight_and_uploads():
    permanent, transient = _sdk_errors()
    for error in permanent:
        assert cloud.is_permanent(error), cloud.describe_error(error)
    for error in transient:
        assert not cloud.is_permanent(error), cloud.describe_error(error)
    assert cloud.describe_error(permanent[1]).startswith("ClientError (HTTP 403): An error occurred (AccessDenied)")


def test_region_and_sas_flags_are_checked():
    from ultimate_trainer.config import resolve_config

    azure = {"cloud.cloud_provider": "azure", "cloud.cloud_bucket": "c"}
    with pytest.raises(UserError, match="--cloud-region does not apply to --cloud-provider azure: an Azure storage "
                                        "account, not a container, has a region"):
        resolve_config({**azure, "cloud.cloud_region": "westeurope"})
    with pytest.raises(UserError, match="--cloud-region applies to uploads"):
        resolve_config({"cloud.cloud_region": "eu-west-1"})
    resolve_config({"cloud.cloud_region": "eu-west-1", "output.resume_from": "s3://b/run"})
    resolve_config({"cloud.cloud_region": "europe-west4", "cloud.cloud_provider": "gcs", "cloud.cloud_bucket": "b"})
    with pytest.raises(UserError, match="--azure-sas-token is not a SAS token: it has no sv= and no sig= field") as e:
        resolve_config({**azure, "cloud.azure_sas_token": "SECRETjunk"})
    assert "SECRETjunk" not in str(e.value)
    assert cloud.sas_token_problem("?sv=2024-08-04&sp=rw&sig=abc%3D") is None


def _nothing_computed(out, stdout):
    assert "step " not in stdout and "training " not in stdout and "saved" not in stdout, stdout
    assert not (out / "training_args.json").exists() and not list(out.glob("checkpoint-*"))


@ONE_WORKER
def test_a_run_stops_before_step_one_on_a_missing_bucket_or_a_bad_sas_token(shared, tmp_path, capsys):
    """The acceptance line: exit 2, one line, nothing computed. S3 through the real CLI
    (one subprocess), Azure in process through the same entry point."""
    from ultimate_trainer.cli import main

    out = tmp_path / "run"
    if shared.provider == "s3":
        result = run_cli([*FLAGS, "--max-steps", "2", "--output-dir", str(out), "--cloud-provider", "s3",
                          "--cloud-bucket", "no-such-bucket", "--cloud-endpoint-url", shared.endpoint],
                         env=shared.env())
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "(s3 bucket 'no-such-bucket')" in lines[0] and "NoSuchBucket" in lines[0], lines
        _nothing_computed(out, result.stdout)
    elif shared.provider == "azure":
        good = shared.sas_token()
        for token, message in (("not-a-token", "--azure-sas-token is not a SAS token"),
                               (good.replace("sig=", "sig=AAAA"), "cloud preflight: cannot write")):
            capsys.readouterr()
            # --distribution none: the run sets keras' global distribution, here the default one.
            code = main([*FLAGS, "--max-steps", "2", "--output-dir", str(out), *shared.flags(),
                         "--azure-sas-token", token, "--distribution", "none"])
            captured = capsys.readouterr()
            assert code == 2, captured.err[-2000:]
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and message in lines[0] and token not in lines[0], lines
            _nothing_computed(out, captured.out)
    else:
        pytest.skip("S3 and Azure carry the acceptance line; GCS shares the preflight (test_preflight_probes...)")
