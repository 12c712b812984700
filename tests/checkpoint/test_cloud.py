"""Checkpoints in S3, GCS and Azure, against real emulators on 127.0.0.1 (tests/emulators.py)."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli, tiny_model_flags
from ultimate_trainer.checkpoint import cloud, store
from ultimate_trainer.errors import UserError

FLAGS = [*tiny_model_flags(), "--dropout-rate", "0", "--log-every", "1", "--eval-every", "1000", "--save-every", "2"]
SCHEME = {"s3": "s3", "gcs": "gs", "azure": "az"}


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli([*FLAGS, "--max-steps", "6", "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    return _losses(out)


def _credentials(emulator):
    """(flags, env): Azure authenticates with a SAS token on the command line, the secret to hunt for."""
    if emulator.provider != "azure":
        return [], emulator.env()
    token = emulator.sas_token()
    return ["--azure-sas-token", token], {}


# End to end through the CLI, about 40 s a provider: the default run keeps S3, and GCS and Azure
# run in the slow step. Every provider's bucket code still runs in the default run, in process,
# in test_remote_resume_verifies_falls_back_and_resumes_a_broken_download.
@pytest.mark.parametrize("emulator", ["s3", pytest.param("gcs", marks=pytest.mark.slow),
                                      pytest.param("azure", marks=pytest.mark.slow)], indirect=True)
def test_upload_retention_and_exact_resume_from_the_bucket(emulator, tmp_path, straight):
    secret_flags, env = _credentials(emulator)
    out = tmp_path / "run"
    first = run_cli([*FLAGS, "--max-steps", "6", "--save-total-limit", "2", "--output-dir", str(out),
                     *emulator.flags(), "--cloud-prefix", "runs/tiny", *secret_flags], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    for step in (2, 4, 6):
        assert f"uploaded checkpoint-{step}" in first.stdout
    assert "uploads: 3 checkpoint(s)" in first.stdout and "NOT uploaded" not in first.stdout

    os.environ.update(emulator.env())
    bucket = emulator.open_bucket() if emulator.provider != "azure" else cloud.open_bucket(
        "azure", emulator.bucket, endpoint_url=emulator.endpoint, azure_account_name="devstoreaccount1",
        azure_sas_token=secret_flags[1])
    keys = bucket.list("runs/tiny/")
    assert {k.split("/")[2] for k in keys if "/checkpoint-" in k} == {"checkpoint-4", "checkpoint-6"}  # limit 2
    manifest = json.loads((out / "checkpoint-4" / store.MANIFEST_FILE).read_text())
    assert {k[len("runs/tiny/checkpoint-4/"):] for k in keys if "/checkpoint-4/" in k} == set(manifest["files"]) | {
        store.MANIFEST_FILE}
    assert "runs/tiny/latest" in keys
    # As if the machine died while checkpoint-6 was uploading: no manifest, so it is not complete.
    bucket.delete(["runs/tiny/checkpoint-6/manifest.json"])

    resumed = tmp_path / "resumed"
    uri = f"{SCHEME[emulator.provider]}://{emulator.bucket}/runs/tiny"
    extra = ["--azure-account-name", "devstoreaccount1"] if emulator.provider == "azure" else []
    second = run_cli([*FLAGS, "--max-steps", "6", "--output-dir", str(resumed), "--resume-from", uri,
                      "--cloud-endpoint-url", emulator.endpoint, *extra, *secret_flags], env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "downloaded" in second.stdout and "at step 4" in second.stdout
    got = _losses(resumed)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(straight[step], abs=1e-6)

    if secret_flags:  # the SAS token appears nowhere: output, configs, checkpoints, logs
        token = secret_flags[1]
        assert token not in first.stdout + first.stderr + second.stdout + second.stderr
        for path in [*out.rglob("*"), *resumed.rglob("*")]:
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


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
