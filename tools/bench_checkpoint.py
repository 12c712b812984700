"""Checkpoint costs: save and restore time per preset, and the step time while an
upload runs in the background.

For each preset: build the model with its optimizer state, time
`save_checkpoint` (model.keras with every optimizer slot, tokenizer, config,
manifest with SHA-256, fsync, rename) and the restore a resume does (verify
the manifest, build, load weights and slots). Then, for --upload-preset,
train steps on random tokens and compare the median step time with and
without an upload of its checkpoint running (S3 API, to a moto server this
script starts on 127.0.0.1, or to --endpoint-url).

Example:
    python tools/bench_checkpoint.py --presets small,medium --upload-preset small
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _model(preset, vocab):
    import keras

    from ultimate_trainer.config import TrainingConfig, resolve_config
    from ultimate_trainer.models.causal_lm import build_causal_lm
    from ultimate_trainer.training.optimizers import build_optimizer

    cfg = resolve_config({"model.model_preset": preset})
    model = build_causal_lm(cfg.model, vocab)
    model.compile(optimizer=build_optimizer(TrainingConfig(), 1e-4, model),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    return cfg, model


def _save_restore(preset, vocab, workdir):
    from ultimate_trainer.checkpoint import store
    from ultimate_trainer.data.tokenizers import ByteTokenizer

    cfg, model = _model(preset, vocab)
    start = time.perf_counter()
    # A run's checkpoint name (the uploader keeps the newest by step); one directory per preset.
    path = store.save_checkpoint(model, ByteTokenizer(), cfg, Path(workdir) / preset, "checkpoint-1", {"step": 1})
    save = time.perf_counter() - start
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    start = time.perf_counter()
    store.verify_checkpoint(path)
    _, fresh = _model(preset, vocab)
    fresh.load_weights(path / store.MODEL_FILE)
    restore = time.perf_counter() - start
    return {"preset": preset, "params": model.count_params(), "bytes": size, "save_s": save, "restore_s": restore,
            "path": path, "model": model}


def _step_times(model, vocab, seq, batch, steps):
    import keras
    import numpy as np

    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    x = np.random.default_rng(0).integers(0, vocab, (batch * steps, seq + 1)).astype("int32")
    model.fit(x[:, :-1], x[:, 1:], batch_size=batch, epochs=1, callbacks=[Timer()], verbose=0, shuffle=False)
    return times


def _moto(port):
    binary = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import socket

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    raise SystemExit("moto_server did not start")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,medium")
    parser.add_argument("--upload-preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="timed steps with and without an upload")
    parser.add_argument("--endpoint-url", help="an S3 endpoint to upload to (default: a local moto server)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print("| preset | params | checkpoint MB | save s | restore s |")
    print("|---|---|---|---|---|")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    moto = None
    try:
        results = {}
        for preset in args.presets.split(","):
            r = _save_restore(preset, args.vocab_size, workdir)
            results[preset] = r
            print(f"| {preset} | {r['params'] / 1e6:,.1f}M | {r['bytes'] / 1e6:,.0f} | {r['save_s']:.1f} | "
                  f"{r['restore_s']:.1f} |", flush=True)
        if args.upload_preset:
            from ultimate_trainer.checkpoint import cloud
            from ultimate_trainer.config import resolve_config

            r = results.get(args.upload_preset) or _save_restore(args.upload_preset, args.vocab_size, workdir)
            endpoint = args.endpoint_url
            if endpoint is None:
                port = 18000 + os.getpid() % 1000
                moto = _moto(port)
                endpoint = f"http://127.0.0.1:{port}"
            bucket = cloud.open_bucket("s3", "bench", endpoint_url=endpoint)
            bucket.client.create_bucket(Bucket="bench")
            seq = resolve_config({"model.model_preset": args.upload_preset}).model.seq_len
            model = r["model"]
            _step_times(model, args.vocab_size, seq, args.batch_size, 3)  # compile
            quiet = _step_times(model, args.vocab_size, seq, args.batch_size, args.steps)
            uploader = cloud.Uploader(bucket, "bench", log=lambda line: None)
            start = time.perf_counter()
            uploader.submit(r["path"])
            busy = _step_times(model, args.vocab_size, seq, args.batch_size, args.steps)
            overlapped = time.perf_counter() - start
            report = uploader.close(wait_s=60)
            if "NOT uploaded" in report:
                raise SystemExit(report)
            upload_s = time.perf_counter() - start
            base, loaded = statistics.median(quiet), statistics.median(busy)
            print(f"\nupload of {args.upload_preset} ({r['bytes'] / 1e6:,.0f} MB, {report.split(', ')[0]}): "
                  f"{upload_s:.1f}s; {args.steps} steps took {overlapped:.1f}s alongside it")
            print(f"median step time: {base:.3f}s without an upload, {loaded:.3f}s with one "
                  f"({100 * (loaded / base - 1):+.1f}%)")
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
