"""TTT throughput: TTT-Linear and TTT-MLP `tiny` models against the attention model of the
same size, training tokens/s at several sequence lengths.

Each (mixer, sequence length) runs in its own process: the `tiny` preset's
shape (d 256, 8 layers, 8 heads, FFN 1024), vocab 8192, float32, `fit` on
random tokens with AdamW, the same number of tokens per step at every length
(--tokens-per-step). The first window (compile and warm-up) is discarded;
the figure is the median of the timed windows.

Example:
    python tools/bench_ttt.py --seq-lens 512,2048
    KERAS_BACKEND=tensorflow python tools/bench_ttt.py --seq-lens 2048 --mixers attention,linear
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _worker(args):
    import keras
    import numpy as np

    from ultimate_trainer.config import resolve_config
    from ultimate_trainer.models.causal_lm import build_causal_lm

    values = {"model.model_preset": "tiny", "model.seq_len": args.seq_len}
    if args.mixer != "attention":
        values["model.ttt_layer_type"] = args.mixer
    cfg = resolve_config(values)
    keras.utils.set_random_seed(0)
    model = build_causal_lm(cfg.model, args.vocab_size)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batch = max(1, args.tokens_per_step // args.seq_len)
    x = np.random.default_rng(0).integers(0, args.vocab_size, (batch * args.steps, args.seq_len + 1)).astype("int32")
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(x[:, :-1], x[:, 1:], batch_size=batch, epochs=args.windows + 1, callbacks=[Timer()], verbose=0,
              shuffle=False)
    rates = [args.steps * batch * args.seq_len / t for t in times[1:]]
    print(json.dumps({"backend": keras.backend.backend(), "mixer": args.mixer, "seq_len": args.seq_len,
                      "batch": batch, "params": model.count_params(), "tokens_per_sec": statistics.median(rates),
                      "windows": rates}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default="attention,linear,mlp")
    parser.add_argument("--seq-lens", default="512,2048")
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mixer", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    backend = os.environ.get("KERAS_BACKEND", "jax")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; backend {backend}; tiny shape, "
          f"{args.tokens_per_step} tokens per step, {args.steps} steps x {args.windows} windows")
    results = {}
    for seq in args.seq_lens.split(","):
        for mixer in args.mixers.split(","):
            cmd = [sys.executable, __file__, "--worker", "--mixer", mixer, "--seq-len", seq, "--vocab-size",
                   str(args.vocab_size), "--tokens-per-step", str(args.tokens_per_step), "--steps", str(args.steps),
                   "--windows", str(args.windows)]
            out = subprocess.run(cmd, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True)
            if out.returncode:
                print(f"{mixer} {seq}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(mixer, int(seq))] = r
            print(f"{mixer:<9} seq {seq:>5}  {r['tokens_per_sec']:>8,.0f} tok/s  ({r['params'] / 1e6:.1f}M params, "
                  f"batch {r['batch']})", flush=True)
    print("\n| seq_len | " + " | ".join(f"{m} tok/s" for m in args.mixers.split(",")) + " | TTT-Linear / attention |")
    print("|---|" + "---|" * (len(args.mixers.split(",")) + 1))
    for seq in args.seq_lens.split(","):
        row = [results.get((m, int(seq))) for m in args.mixers.split(",")]
        cells = [f"{r['tokens_per_sec']:,.0f}" if r else "-" for r in row]
        lin, att = results.get(("linear", int(seq))), results.get(("attention", int(seq)))
        ratio = f"{lin['tokens_per_sec'] / att['tokens_per_sec']:.2f}x" if lin and att else "-"
        print(f"| {seq} | " + " | ".join(cells) + f" | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
