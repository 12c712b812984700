"""Generation throughput: new tokens/s with the KV cache and without it.

Builds a model of a size preset (random weights: speed does not depend on
them), then generates greedily from a prompt of --prompt-tokens, --new-tokens
at a time, through `training.generation.generate`, the path `ultimate-trainer
generate` uses. Without the cache every token recomputes the whole window at
one fixed shape. The first run of each path (compilation) is discarded; the
figure is the median of --repeats runs. Each backend runs in its own process.

Example:
    python tools/bench_generate.py --preset small
    python tools/bench_generate.py --preset tiny --backends jax,torch,tensorflow
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _IdTokenizer:
    """Text -> ids one character each, modulo the vocab: enough to drive `generate`
    without training a tokenizer of the preset's vocab size. EOS never occurs."""

    pad_id, eos_id = 0, -1

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text):
        return [1 + ord(c) % (self.vocab_size - 1) for c in text]

    def decode(self, ids):
        return ""


def _worker(args):
    import keras

    from ultimate_trainer.config import resolve_config
    from ultimate_trainer.models.causal_lm import build_causal_lm
    from ultimate_trainer.training.generation import generate

    cfg = resolve_config({"model.model_preset": args.preset})
    keras.utils.set_random_seed(0)
    model = build_causal_lm(cfg.model, args.vocab_size)
    tokenizer = _IdTokenizer(args.vocab_size)
    prompt = ("def generate(model, prompt):\n    return model(prompt)\n" * 20)[: args.prompt_tokens]
    result = {"backend": keras.backend.backend(), "preset": args.preset, "params": model.count_params(),
              "seq_len": cfg.model.seq_len}
    for use_cache in (True, False):
        rates = []
        for _ in range(args.repeats + 1):
            _, stats = generate(model, tokenizer, prompt, args.new_tokens, temperature=0, use_cache=use_cache)
            rates.append(stats["tokens_per_sec"])
        result["cache" if use_cache else "no_cache"] = statistics.median(rates[1:])
    print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--backends", default="jax")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; preset {args.preset}, vocab {args.vocab_size}, "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy")
    print("| backend | with KV cache tok/s | without tok/s | speed-up |")
    print("|---|---|---|---|")
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--vocab-size", str(args.vocab_size),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3"),
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{backend}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {backend} | {r['cache']:,.1f} | {r['no_cache']:,.1f} | {r['cache'] / r['no_cache']:.1f}x |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
