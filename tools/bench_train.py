"""Training throughput: ours against keras-hub's LlamaBackbone, per backend.

Each (backend, implementation, shape) runs in its own process, since Keras
picks its backend once per process. Both models train with `fit` on the same
random tokens, untied embeddings, dropout 0, AdamW. The first window (compile
and warm-up) is discarded; the figure is the median of the timed windows.

MFU = FLOPs/token x tokens/s / peak, with FLOPs/token = 6 N_non-embedding +
6 V d + 12 L d seq (`models/sizing.flops_per_token`) and a peak of
200 GFLOP/s float32 (the measured matmul peak of the project's 2-core CPU;
override with --peak-flops).

Example:
    python tools/bench_train.py --shapes tiny --backends jax,tensorflow
    python tools/bench_train.py --windows 4 --steps 5 --json results.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPES = {
    # name: vocab, d_model, layers, heads, d_ff, seq_len, batch
    "tiny": (8192, 256, 8, 8, 1024, 256, 16),
    "small": (16000, 512, 12, 8, 2048, 256, 8),
}
IMPLEMENTATIONS = ("ours", "keras_hub")


def _worker(args):
    import keras
    import numpy as np

    from ultimate_trainer.models import sizing

    vocab, d, layers, heads, d_ff, seq, batch = SHAPES[args.shape]
    keras.utils.set_random_seed(0)
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    if args.impl == "ours":
        from ultimate_trainer.models.causal_lm import CausalLM

        model = CausalLM(vocab_size=vocab, seq_len=seq, d_model=d, num_layers=layers, num_heads=heads, d_ff=d_ff)
        model.build((None, seq))
        x = np.random.default_rng(0).integers(0, vocab, (batch * 8, seq)).astype("int32")
        inputs = x
    else:
        import keras_hub

        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=vocab, num_layers=layers, num_query_heads=heads, hidden_dim=d,
            intermediate_dim=d_ff, num_key_value_heads=heads, tie_word_embeddings=False,
        )
        model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
        x = np.random.default_rng(0).integers(0, vocab, (batch * 8, seq)).astype("int32")
        inputs = {"token_ids": x, "padding_mask": np.ones_like(x)}
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    counts = sizing.count_params(vocab, d, layers, heads, d_ff, seq)
    if model.count_params() != counts.total:
        raise SystemExit(f"{args.impl} has {model.count_params()} params, expected {counts.total}")
    flops = sizing.flops_per_token(counts.non_embedding, vocab, d, layers, seq)

    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(inputs, x, batch_size=batch, epochs=args.windows + 1, steps_per_epoch=args.steps,
              callbacks=[Timer()], verbose=0, shuffle=False)
    tokens = args.steps * batch * seq
    rates = [tokens / t for t in times[1:]]
    median = statistics.median(rates)
    print(json.dumps({
        "backend": keras.backend.backend(), "impl": args.impl, "shape": args.shape,
        "params": counts.total, "flops_per_token": flops, "tokens_per_sec": median,
        "windows": rates, "mfu": median * flops / args.peak_flops,
        "precision": "mixed_bfloat16" if args.mixed_precision else "float32",
    }))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="jax,torch,tensorflow")
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--steps", type=int, default=4, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows after the warm-up window")
    parser.add_argument("--peak-flops", type=float, default=200e9, help="device peak FLOP/s for MFU")
    parser.add_argument("--mixed-precision", action="store_true", help="bfloat16 compute")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    results = []
    for backend in args.backends.split(","):
        for shape in args.shapes.split(","):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--shape", shape,
                       "--steps", str(args.steps), "--windows", str(args.windows),
                       "--peak-flops", str(args.peak_flops)] + (["--mixed-precision"] if args.mixed_precision else [])
                env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if out.returncode:
                    print(f"{backend} {shape} {impl}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(result)
                spread = max(result["windows"]) / min(result["windows"]) - 1
                print(f"{backend:<10} {shape:<5} {impl:<9} {result['tokens_per_sec']:>8,.0f} tok/s  "
                      f"MFU {100 * result['mfu']:5.1f}%  (window spread {100 * spread:.0f}%)", flush=True)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"peak {args.peak_flops / 1e9:.0f} GFLOP/s; {args.steps} steps x {args.windows} windows")
    print("| backend | shape | ours tok/s (MFU) | keras-hub tok/s (MFU) | ours / keras-hub |")
    print("|---|---|---|---|---|")
    for backend in args.backends.split(","):
        for shape in args.shapes.split(","):
            row = {r["impl"]: r for r in results if r["backend"] == backend and r["shape"] == shape}
            if not row:
                continue
            cells = [f"{row[i]['tokens_per_sec']:,.0f} ({100 * row[i]['mfu']:.0f}%)" if i in row else "-" for i in IMPLEMENTATIONS]
            ratio = (f"{row['ours']['tokens_per_sec'] / row['keras_hub']['tokens_per_sec']:.2f}x"
                     if len(row) == 2 else "-")
            print(f"| {backend} | {shape} | {cells[0]} | {cells[1]} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
