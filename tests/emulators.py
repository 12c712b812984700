"""Real storage emulators on 127.0.0.1, started and stopped by the tests.

- S3: moto's server (`moto_server`, from the `moto[server]` test extra);
- GCS: `gcp-storage-emulator`, in memory;
- Azure: Azurite's blob service from npm (`node_modules/.bin/azurite-blob`,
  installed by the README's test command).

Each emulator can be stopped and started again on the same port, to test
uploads that fail and recover. All are in memory: a restart loses the
bucket, so `start()` creates it again.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port, process, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"emulator exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"emulator did not listen on {port} within {timeout}s")


class Emulator:
    """One emulator process; `endpoint` stays the same across restarts."""

    provider = None
    bucket = "ut-checkpoints"

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = None

    def command(self):
        raise NotImplementedError

    def env(self):
        """What a subprocess (the CLI) needs in its environment to reach this emulator."""
        return {}

    def start(self):
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=dict(os.environ, **self.env()), cwd=self.tmp_path)
        _wait_for_port(self.port, self.process)
        self.create_bucket()
        return self

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def flags(self):
        return ["--cloud-provider", self.provider, "--cloud-bucket", self.bucket, "--cloud-endpoint-url",
                self.endpoint]

    def open_bucket(self):
        from ultimate_trainer.checkpoint.cloud import open_bucket

        os.environ.update(self.env())
        return open_bucket(self.provider, self.bucket, endpoint_url=self.endpoint, **self.bucket_kwargs())

    def bucket_kwargs(self):
        return {}


class S3Emulator(Emulator):
    provider = "s3"

    def command(self):
        return [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]

    def env(self):
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def create_bucket(self):
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=self.bucket)


class GCSEmulator(Emulator):
    provider = "gcs"

    def command(self):
        return [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(self.port),
                "--in-memory"]

    def env(self):
        return {"GOOGLE_CLOUD_PROJECT": "ut-tests"}

    def create_bucket(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="ut-tests", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": self.endpoint})
        client.create_bucket(self.bucket)


class AzureEmulator(Emulator):
    provider = "azure"

    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def command(self):
        binary = REPO / "node_modules" / ".bin" / "azurite-blob"
        if not binary.exists() and not shutil.which("azurite-blob"):
            raise RuntimeError("Azurite is not installed: run `npm install --no-save azurite@3.35.0` in the repo")
        return [str(binary if binary.exists() else shutil.which("azurite-blob")), "--blobHost", "127.0.0.1",
                "--blobPort", str(self.port), "--inMemoryPersistence", "--disableTelemetry",
                "--skipApiVersionCheck", "--silent"]

    def env(self):
        return {"AZURE_STORAGE_KEY": AZURITE_KEY}

    def bucket_kwargs(self):
        return {"azure_account_name": AZURITE_ACCOUNT}

    def flags(self):
        return super().flags() + ["--azure-account-name", AZURITE_ACCOUNT]

    def create_bucket(self):
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient(account_url=self.endpoint,
                                    credential={"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY})
        service.create_container(self.bucket)

    def sas_token(self):
        """A container SAS token, signed with the Azurite key: what a user would pass."""
        from datetime import datetime, timedelta, timezone

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        return generate_container_sas(
            AZURITE_ACCOUNT, self.bucket, account_key=AZURITE_KEY,
            permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True, create=True),
            expiry=datetime.now(timezone.utc) + timedelta(hours=2),
        )


EMULATORS = {"s3": S3Emulator, "gcs": GCSEmulator, "azure": AzureEmulator}
