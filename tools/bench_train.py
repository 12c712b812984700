"""Training throughput: ours against keras-hub's LlamaBackbone and
hand-written JAX + optax and PyTorch (eager and torch.compile) train steps,
per backend.

Each (backend, implementation, shape) runs in its own process, since Keras
picks its backend once per process. All train the same LLaMA shape on the
same random tokens: untied embeddings, dropout 0, AdamW. Ours runs `fit` as a
real run sets it up: its optimizer (`training/optimizers.py`: global-norm clip
1.0 and the gradient-norm statistic), its loss (`training/losses.py`) and its
host allocator settings (`backend.tune_allocator`); keras-hub runs `fit` with
a plain AdamW and Keras' loss, as a keras-hub user would; `jax_optax` (jax
only) is a minimal `jax.jit` step over a parameter dict with `optax.adamw`,
the ceiling a hand-written loop reaches;
`torch_eager` / `torch_compile` (torch only) are the same model in plain
PyTorch (SDPA attention, AdamW, clip 1.0), the second with the forward+loss
and the optimizer step `torch.compile`d; `cli` (small only) is the whole
program, `python -m ultimate_trainer` on a synthetic text file with a trained
16,000-piece SentencePiece tokenizer (data pipeline, callbacks and logging
included), timed from its own logged windows. The first window (compile and
warm-up) is discarded; the figure is the median of the timed windows.
`--precisions float32,bfloat16` also runs ours and the CLI in bfloat16
(Keras mixed_bfloat16) and prints the speed-up and both loss curves.

MFU = FLOPs/token x tokens/s / peak, with FLOPs/token = 6 N_non-embedding +
6 V d + 12 L d seq (`models/sizing.flops_per_token`) and a peak of
200 GFLOP/s float32 (the measured matmul peak of the project's 2-core CPU;
override with --peak-flops).

Example:
    python tools/bench_train.py --shapes tiny --backends jax,tensorflow
    python tools/bench_train.py --precisions float32,bfloat16 --steps 3 --windows 4 --repeats tiny=2   # full run
    python tools/bench_train.py --windows 4 --steps 5 --json results.json
    python tools/bench_train.py --shapes tiny,moe-tiny --impls ours --backends jax   # MoE vs dense
    python tools/bench_train.py --trees before=../old-checkout,after=. --repeats small=2   # a change's cost

`--trees NAME=PATH,...` runs the CLI (small) from each source tree in turn
(A, B, A, B: a slow spell of the machine falls on both) and prints each
tree's tokens/s as a ratio to the first's: a refactor must not cost speed.

`jax_optax` needs optax (`pip install -e ".[bench]"`).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # name: vocab, d_model, layers, heads, d_ff, seq_len, batch
    "tiny": (8192, 256, 8, 8, 1024, 256, 16),
    "small": (16000, 512, 12, 8, 2048, 256, 8),
    # tiny with an MoE layer in every block: 8 experts of width 512, top-2, capacity factor
    # 1.25. Its active FFN width, top_k x expert width = 1024, is tiny's d_ff: the same active
    # parameters per token (plus the 256 x 8 router), 4x the FFN parameters.
    "moe-tiny": (8192, 256, 8, 8, 512, 256, 16),
}
# shape -> (experts, top_k); ours only (keras-hub and the optax step have no MoE).
MOE = {"moe-tiny": (8, 2)}
IMPLEMENTATIONS = ("ours", "keras_hub", "jax_optax", "torch_eager", "torch_compile", "cli")
LABELS = {"ours": "ours", "keras_hub": "keras-hub", "jax_optax": "JAX + optax", "torch_eager": "torch eager",
          "torch_compile": "torch.compile", "cli": "CLI end-to-end"}
# Hand-written loops that do not go through Keras: each runs under its own framework only.
NATIVE = {"jax_optax": "jax", "torch_eager": "torch", "torch_compile": "torch"}


def _jax_optax_worker(args):
    """A minimal hand-written LLaMA train step: one jitted function, params in a dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from ultimate_trainer.models import sizing

    vocab, d, layers, heads, d_ff, seq, batch = SHAPES[args.shape]
    hd = d // heads
    dtype = jnp.bfloat16 if args.mixed_precision else jnp.float32
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 2 + 7 * layers))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    params = {
        "embed": normal(vocab, d), "head": normal(d, vocab), "norm": jnp.ones(d),
        "layers": [
            {"attn_norm": jnp.ones(d), "wq": normal(d, d), "wk": normal(d, d), "wv": normal(d, d),
             "wo": normal(d, d), "mlp_norm": jnp.ones(d), "gate": normal(d, d_ff), "up": normal(d, d_ff),
             "down": normal(d_ff, d)}
            for _ in range(layers)
        ],
    }
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    counts = sizing.count_params(sizing.Architecture(vocab, d, layers, heads, d_ff, seq))
    if total != counts.total:
        raise SystemExit(f"jax_optax has {total} params, expected {counts.total}")
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    angles = np.arange(seq)[:, None] * inv[None, :]
    cos, sin = jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)
    mask = jnp.tril(jnp.ones((seq, seq), bool))

    def rms(x, w):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * w).astype(dtype)

    def rope(x):  # [b, s, h, hd], rotate-half as in LLaMA
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        c, s_ = cos[None, :, None, :], sin[None, :, None, :]
        return jnp.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_], -1)

    def forward(p, tokens):
        h = p["embed"][tokens].astype(dtype)
        b = tokens.shape[0]
        for lp in p["layers"]:
            x = rms(h, lp["attn_norm"])
            q = rope((x @ lp["wq"].astype(dtype)).reshape(b, seq, heads, hd))
            k = rope((x @ lp["wk"].astype(dtype)).reshape(b, seq, heads, hd))
            v = (x @ lp["wv"].astype(dtype)).reshape(b, seq, heads, hd)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
            probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), -1).astype(dtype)
            h = h + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, seq, d) @ lp["wo"].astype(dtype)
            x = rms(h, lp["mlp_norm"])
            h = h + (jax.nn.silu(x @ lp["gate"].astype(dtype)) * (x @ lp["up"].astype(dtype))) @ lp["down"].astype(dtype)
        return (rms(h, p["norm"]) @ p["head"].astype(dtype)).astype(jnp.float32)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean()

    optimizer = optax.adamw(1e-4, weight_decay=0.004)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    data = np.random.default_rng(0).integers(0, vocab, (batch * 8, seq + 1)).astype("int32")
    rates = []
    for window in range(args.windows + 1):
        start = time.perf_counter()
        for i in range(args.steps):
            rows = data[(i % 8) * batch : (i % 8 + 1) * batch]
            params, opt_state, loss = step(params, opt_state, rows[:, :-1], rows[:, 1:])
        loss.block_until_ready()
        if window:
            rates.append(args.steps * batch * seq / (time.perf_counter() - start))
    flops = sizing.flops_per_token(counts.non_embedding, vocab, d, layers, seq)
    median = statistics.median(rates)
    print(json.dumps({
        "backend": "jax", "impl": "jax_optax", "shape": args.shape, "params": total, "flops_per_token": flops,
        "tokens_per_sec": median, "windows": rates, "mfu": median * flops / args.peak_flops,
        "precision": "bfloat16" if args.mixed_precision else "float32",
    }))


def _torch_worker(args):
    """A hand-written PyTorch LLaMA train step, eager or `torch.compile`d (model and
    AdamW step both), the fastest peer on this CPU."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ultimate_trainer.models import sizing

    torch.manual_seed(0)
    vocab, d, layers, heads, d_ff, seq, batch = SHAPES[args.shape]
    hd = d // heads
    dtype = torch.bfloat16 if args.mixed_precision else torch.float32

    def linear(i, o):
        layer = torch.nn.Linear(i, o, bias=False)
        torch.nn.init.normal_(layer.weight, std=0.02)
        return layer

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = torch.nn.RMSNorm(d, eps=1e-6), torch.nn.RMSNorm(d, eps=1e-6)
            self.wq, self.wk, self.wv, self.wo = linear(d, d), linear(d, d), linear(d, d), linear(d, d)
            self.gate, self.up, self.down = linear(d, d_ff), linear(d, d_ff), linear(d_ff, d)

        def forward(self, h, cos, sin):
            def rope(t):  # [b, h, s, hd], rotate-half
                t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
                return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

            b = h.shape[0]
            x = self.attn_norm(h)
            q = rope(self.wq(x).view(b, seq, heads, hd).transpose(1, 2))
            k = rope(self.wk(x).view(b, seq, heads, hd).transpose(1, 2))
            v = self.wv(x).view(b, seq, heads, hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + self.wo(a.transpose(1, 2).reshape(b, seq, d))
            x = self.mlp_norm(h)
            return h + self.down(F.silu(self.gate(x)) * self.up(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d)
            torch.nn.init.normal_(self.embed.weight, std=0.02)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))
            self.norm, self.head = torch.nn.RMSNorm(d, eps=1e-6), linear(d, vocab)
            inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

        def forward(self, tokens):
            h = self.embed(tokens)
            for block in self.blocks:
                h = block(h, self.cos, self.sin)
            return self.head(self.norm(h)).float()

    model = Model()
    total = sum(p.numel() for p in model.parameters())
    counts = sizing.count_params(sizing.Architecture(vocab, d, layers, heads, d_ff, seq))
    if total != counts.total:
        raise SystemExit(f"{args.impl} has {total} params, expected {counts.total}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.004)

    def loss_fn(x, y):
        with torch.autocast("cpu", dtype=dtype, enabled=args.mixed_precision):
            return F.cross_entropy(model(x).view(-1, vocab), y.reshape(-1))

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    if args.impl == "torch_compile":
        # Forward and loss compile into one graph (AOTAutograd derives the backward); the
        # clip and AdamW update into another.
        loss_fn, optimizer_step = torch.compile(loss_fn), torch.compile(optimizer_step)

    def train_step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        return loss
    data = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (batch * 8, seq + 1)).astype("int64"))
    rates = []
    for window in range(args.windows + 1):
        start = time.perf_counter()
        for i in range(args.steps):
            rows = data[(i % 8) * batch : (i % 8 + 1) * batch]
            loss = train_step(rows[:, :-1], rows[:, 1:])
            optimizer_step()
        float(loss)
        if window:
            rates.append(args.steps * batch * seq / (time.perf_counter() - start))
    flops = sizing.flops_per_token(counts.non_embedding, vocab, d, layers, seq)
    median = statistics.median(rates)
    print(json.dumps({
        "backend": "torch", "impl": args.impl, "shape": args.shape, "params": total, "flops_per_token": flops,
        "tokens_per_sec": median, "windows": rates, "mfu": median * flops / args.peak_flops,
        "precision": "bfloat16" if args.mixed_precision else "float32",
    }))


def _synthetic_corpus(path, megabytes, seed=0):
    """Text of random words drawn Zipf-like from a 40,000-word lexicon: enough
    distinct pieces for a 16,000-piece tokenizer, written once per run."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(40000)]
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    weights /= weights.sum()
    with open(path, "w") as f:
        written = 0
        while written < megabytes * 1e6:
            words = rng.choice(len(lexicon), 200, p=weights)
            line = " ".join(lexicon[w] for w in words) + ".\n\n"  # one record per paragraph
            f.write(line)
            written += len(line)


def _cli_worker(args):
    """The whole program: `python -m ultimate_trainer` on text files, with the
    shape's model and batch (data pipeline, callbacks and logging included).
    The tokenizer (SentencePiece, trained on the file first) has the shape's
    vocabulary; the figure is the median of the logged windows after the first."""
    from ultimate_trainer.models import sizing

    vocab, d, layers, heads, d_ff, seq, batch = SHAPES[args.shape]
    # The corpus and its tokenizer are made by the first CLI run and shared by the next ones.
    shared = os.path.join(args.work_dir, f"vocab-{vocab}")
    corpus, tokenizer_dir = os.path.join(shared, "corpus.txt"), os.path.join(shared, "tokenizer")
    if not os.path.exists(corpus):
        os.makedirs(shared, exist_ok=True)
        _synthetic_corpus(corpus, 8)
    tokenizer = (["--tokenizer-path", tokenizer_dir] if os.path.isdir(tokenizer_dir) else
                 ["--tokenizer", "sentencepiece", "--vocab-size", str(vocab), "--tokenizer-train-examples", "5000"])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "ultimate_trainer", "--data-files", corpus, *tokenizer, "--d-model", str(d),
               "--num-layers", str(layers), "--num-heads", str(heads), "--d-ff", str(d_ff), "--seq-len", str(seq),
               "--batch-size", str(batch), "--dropout-rate", "0", "--max-steps", str(args.steps * (args.windows + 1)),
               "--log-every", str(args.steps), "--no-eval", "--save-every", "1000000",
               "--peak-flops", str(args.peak_flops), "--output-dir", out]
        if args.mixed_precision:
            cmd.append("--use-mixed-precision")
        tree = os.environ.get("UT_BENCH_TREE")  # --trees: the program comes from that checkout
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree)) if tree else None
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if '"tokens_per_sec"' in line]
        if not os.path.isdir(tokenizer_dir):
            os.makedirs(tokenizer_dir)
            for name in ("ut_tokenizer.json", "tokenizer.model"):
                shutil.copy(os.path.join(out, name), tokenizer_dir)
    counts = sizing.count_params(sizing.Architecture(vocab, d, layers, heads, d_ff, seq))
    flops = sizing.flops_per_token(counts.non_embedding, vocab, d, layers, seq)
    # The logged MFU implies the run's FLOPs/token: it must be this shape's (a tokenizer short
    # of the vocabulary would make a smaller model).
    logged = records[-1]["mfu"] * args.peak_flops / records[-1]["tokens_per_sec"]
    if abs(logged / flops - 1) > 1e-3:
        raise SystemExit(f"the CLI run trained {logged:,.0f} FLOPs/token, expected {flops:,} (tokenizer vocab?)")
    rates = [r["tokens_per_sec"] for r in records[1:]]
    median = statistics.median(rates)
    print(json.dumps({
        "backend": os.environ["KERAS_BACKEND"], "impl": "cli", "shape": args.shape, "params": counts.total,
        "flops_per_token": flops, "tokens_per_sec": median, "windows": rates, "mfu": median * flops / args.peak_flops,
        "losses": [r["loss"] for r in records],
        "precision": "mixed_bfloat16" if args.mixed_precision else "float32",
    }))


def _worker(args):
    if args.impl == "cli":
        return _cli_worker(args)
    if args.impl == "jax_optax":
        return _jax_optax_worker(args)
    if args.impl in ("torch_eager", "torch_compile"):
        return _torch_worker(args)
    experts, top_k = MOE.get(args.shape, (0, 2))
    import keras
    import numpy as np

    from ultimate_trainer.models import sizing

    vocab, d, layers, heads, d_ff, seq, batch = SHAPES[args.shape]
    if args.impl == "ours":
        from ultimate_trainer.backend import tune_allocator

        tune_allocator()  # as a real run does (training/trainer.py)
    keras.utils.set_random_seed(0)
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    if args.impl == "ours":
        from ultimate_trainer.models.causal_lm import CausalLM

        moe = dict(num_experts=experts, top_k=top_k, capacity_factor=1.25) if experts else None
        model = CausalLM(vocab_size=vocab, seq_len=seq, d_model=d, num_layers=layers, num_heads=heads, d_ff=d_ff,
                         moe=moe)
        model.build((None, seq))
        x = np.random.default_rng(0).integers(0, vocab, (batch * args.steps, seq)).astype("int32")
        inputs = x
    else:
        import keras_hub

        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=vocab, num_layers=layers, num_query_heads=heads, hidden_dim=d,
            intermediate_dim=d_ff, num_key_value_heads=heads, tie_word_embeddings=False,
        )
        model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
        x = np.random.default_rng(0).integers(0, vocab, (batch * args.steps, seq)).astype("int32")
        inputs = {"token_ids": x, "padding_mask": np.ones_like(x)}
    if args.impl == "ours":
        from ultimate_trainer.config import TrainingConfig
        from ultimate_trainer.training.losses import TokenCrossEntropy
        from ultimate_trainer.training.optimizers import build_optimizer

        optimizer = build_optimizer(TrainingConfig(learning_rate=1e-4), 1e-4, model)
        loss = TokenCrossEntropy()  # a real run's loss
    else:
        optimizer = keras.optimizers.AdamW(1e-4)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # Ours compiles as a real run does (`backend.compile_options`: XLA on tensorflow); keras-hub
    # as a keras-hub user's `fit` does (Keras' defaults). --jit-compile overrides both.
    compile_kwargs = {}
    if args.impl == "ours":
        from ultimate_trainer.backend import compile_options

        compile_kwargs = compile_options()
    if args.jit_compile != "auto":
        compile_kwargs["jit_compile"] = args.jit_compile == "true"
    if args.steps_per_execution > 1:
        compile_kwargs["steps_per_execution"] = args.steps_per_execution
    model.compile(optimizer=optimizer, loss=loss, **compile_kwargs)
    counts = sizing.count_params(sizing.Architecture(vocab, d, layers, heads, d_ff, seq, num_experts=experts,
                                                    experts_top_k=top_k))
    if model.count_params() != counts.total:
        raise SystemExit(f"{args.impl} has {model.count_params()} params, expected {counts.total}")
    flops = sizing.flops_per_token(counts.active_non_embedding, vocab, d, layers, seq)

    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    if keras.backend.backend() == "tensorflow":
        # A tf.data pipeline, as a real run feeds tensorflow: numpy arrays through `fit` under
        # XLA ran ours' tiny windows at about 1,200 tok/s against 2,000-2,165 from tf.data.
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((inputs, x)).batch(batch).repeat().prefetch(2)
        model.fit(data, epochs=args.windows + 1, steps_per_epoch=args.steps, callbacks=[Timer()], verbose=0)
    else:
        # Exactly one pass over the data per epoch (window): with more rows than an epoch takes,
        # the epoch that reaches the end of the arrays runs short and its window reads too fast.
        model.fit(inputs, x, batch_size=batch, epochs=args.windows + 1, steps_per_epoch=args.steps,
                  callbacks=[Timer()], verbose=0, shuffle=False)
    tokens = args.steps * batch * seq
    rates = [tokens / t for t in times[1:]]
    median = statistics.median(rates)
    print(json.dumps({
        "backend": keras.backend.backend(), "impl": args.impl, "shape": args.shape,
        "params": counts.total, "active_params": counts.active, "flops_per_token": flops, "tokens_per_sec": median,
        "windows": rates, "mfu": median * flops / args.peak_flops,
        "precision": "mixed_bfloat16" if args.mixed_precision else "float32",
    }))


def _runs(impl, backend, shape, precision):
    """Whether the run plan includes this combination: hand-written loops run under their
    own framework only, MoE shapes and bfloat16 only for ours (the peers are the float32
    baselines of the issue's table), the CLI only on `small` (the acceptance shape)."""
    if NATIVE.get(impl, backend) != backend:
        return False
    if impl not in ("ours", "cli") and (shape in MOE or precision != "float32"):
        return False
    return impl != "cli" or shape == "small"


def _cell(r):
    return f"{r['tokens_per_sec']:,.0f} ({100 * r['mfu']:.0f}%)" if r else "-"


def _ratio(a, b):
    return f"{a['tokens_per_sec'] / b['tokens_per_sec']:.2f}x" if a and b else "-"


def summarize(results):
    """The markdown table and the comparisons the issue asks for, from the workers' results."""
    def find(backend, shape, impl, precision="float32"):
        return next((r for r in results if (r["backend"], r["shape"], r["impl"], r["precision"])
                     == (backend, shape, impl, precision)), None)

    keys = list(dict.fromkeys((r["backend"], r["shape"], r["precision"]) for r in results))
    lines = ["| backend | shape | precision | " + " | ".join(f"{LABELS[i]} tok/s (MFU)" for i in IMPLEMENTATIONS)
             + " | ours / keras-hub | ours / JAX + optax | CLI / ours |",
             "|---|---|---|" + "---|" * (len(IMPLEMENTATIONS) + 3)]
    for backend, shape, precision in keys:
        row = {i: find(backend, shape, i, precision) for i in IMPLEMENTATIONS}
        lines.append(f"| {backend} | {shape} | {precision} | {' | '.join(_cell(row[i]) for i in IMPLEMENTATIONS)} | "
                     f"{_ratio(row['ours'], row['keras_hub'])} | {_ratio(row['ours'], row['jax_optax'])} | "
                     f"{_ratio(row['cli'], row['ours'])} |")
    lines.append("")
    for shape in dict.fromkeys(r["shape"] for r in results):
        ours = [r for r in results if r["shape"] == shape and r["impl"] == "ours" and r["precision"] == "float32"]
        peer = find("torch", shape, "torch_compile")
        if ours and peer:
            best = max(ours, key=lambda r: r["tokens_per_sec"])
            lines.append(f"{shape}: best of ours, float32 ({best['backend']}, {best['tokens_per_sec']:,.0f} tok/s) / "
                         f"hand-written torch.compile ({peer['tokens_per_sec']:,.0f} tok/s) = {_ratio(best, peer)}")
    for backend, shape, precision in keys:
        if precision != "bfloat16":
            continue
        for impl in ("ours", "cli"):
            mixed, full = find(backend, shape, impl, "bfloat16"), find(backend, shape, impl)
            if not (mixed and full):
                continue
            line = f"{backend} {shape} {LABELS[impl]}: bfloat16 / float32 = {_ratio(mixed, full)} tokens/s"
            if mixed.get("losses") and full.get("losses"):
                gap = max(abs(a - b) for a, b in zip(mixed["losses"], full["losses"]))
                line += (f"; loss per window float32 {', '.join(f'{x:.3f}' for x in full['losses'])}, "
                         f"bfloat16 {', '.join(f'{x:.3f}' for x in mixed['losses'])} (largest gap {gap:.3f})")
            lines.append(line)
    for backend in dict.fromkeys(r["backend"] for r in results):
        for shape in MOE:
            moe, dense = find(backend, shape, "ours"), find(backend, "tiny", "ours")
            if moe and dense:
                lines.append(f"{backend}: {shape} / tiny (same active parameters) = {_ratio(moe, dense)} tokens/s")
    return "\n".join(lines)


def _parse_repeats(text, parser):
    """`tiny=2,small=1` -> {"tiny": 2, "small": 1}."""
    repeats = {}
    for item in filter(None, (text or "").split(",")):
        shape, _, count = item.partition("=")
        if shape not in SHAPES or not count.isdigit() or int(count) < 1:
            parser.error(f"--repeats takes SHAPE=N pairs with a shape of {', '.join(SHAPES)} and N >= 1, not {item!r}")
        repeats[shape] = int(count)
    return repeats


def _run_worker(args, impl, backend, shape, precision, work_dir, tree=None):
    """One worker process; its result, or None (said on stderr) when it failed."""
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--shape", shape,
           "--steps", str(args.steps), "--windows", str(args.windows),
           "--peak-flops", str(args.peak_flops), "--jit-compile", args.jit_compile,
           "--steps-per-execution", str(args.steps_per_execution), "--work-dir", work_dir]
    cmd += ["--mixed-precision"] if precision == "bfloat16" else []
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if tree:
        env["UT_BENCH_TREE"] = tree
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        print(f"{backend} {shape} {impl} {precision}: failed\n{(out.stdout + out.stderr)[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["precision"] = precision
    return result


def _merge(runs, peak_flops):
    """One result from repeated runs of a cell: the median over all their timed windows."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[0], windows=[w for r in runs for w in r["windows"]])
    merged["tokens_per_sec"] = statistics.median(merged["windows"])
    merged["mfu"] = merged["tokens_per_sec"] * merged["flops_per_token"] / peak_flops
    return merged


def _print_result(result, suffix=""):
    spread = max(result["windows"]) / min(result["windows"]) - 1
    print(f"{result['backend']:<10} {result['shape']:<5} {result['precision']:<8} {result['impl']:<13} "
          f"{result['tokens_per_sec']:>8,.0f} tok/s  MFU {100 * result['mfu']:5.1f}%  "
          f"(window spread {100 * spread:.0f}%{suffix})", flush=True)


def _parse_trees(text, parser):
    """`before=../old,after=.` -> [("before", "../old"), ("after", ".")], each a source checkout."""
    trees = []
    for item in filter(None, (text or "").split(",")):
        name, _, path = item.partition("=")
        if not name or not os.path.isfile(os.path.join(path, "ultimate_trainer", "__main__.py")):
            parser.error(f"--trees takes NAME=PATH pairs, each PATH a checkout holding ultimate_trainer/, not {item!r}")
        trees.append((name, path))
    if len(trees) < 2:
        parser.error("--trees needs at least two NAME=PATH pairs to compare")
    return trees


def compare_trees(args, trees, repeats, work_dir):
    """The CLI (small) from each tree, alternating, per backend; prints tokens/s and the ratio to the first tree."""
    lines = ["| backend | " + " | ".join(f"{name} tok/s" for name, _ in trees)
             + " | " + " | ".join(f"{name} / {trees[0][0]}" for name, _ in trees[1:]) + " |",
             "|---|" + "---|" * (2 * len(trees) - 1)]
    for backend in args.backends.split(","):
        runs = {name: [] for name, _ in trees}
        for attempt in range(repeats.get("small", 1)):
            for name, path in trees:
                result = _run_worker(args, "cli", backend, "small", "float32", work_dir, tree=path)
                if result is not None:
                    runs[name].append(result)
                    _print_result(result, f", tree {name}, run {attempt + 1}")
        merged = {name: _merge(done, args.peak_flops) if done else None for name, done in runs.items()}
        first = merged[trees[0][0]]
        lines.append(f"| {backend} | " + " | ".join(_cell(merged[name]) for name, _ in trees) + " | "
                     + " | ".join(_ratio(merged[name], first) for name, _ in trees[1:]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="jax,torch,tensorflow")
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--steps", type=int, default=4, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows after the warm-up window")
    parser.add_argument("--peak-flops", type=float, default=200e9, help="device peak FLOP/s for MFU")
    parser.add_argument("--precisions", default="float32",
                        help="float32 and/or bfloat16 (Keras mixed_bfloat16, torch autocast); bfloat16 runs ours "
                             "and the CLI only")
    parser.add_argument("--mixed-precision", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", default="",
                        help="run each cell of these shapes N times, going round the implementations, and "
                             "take the median of all their windows (e.g. tiny=2)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--trees", help="NAME=PATH,NAME=PATH: compare the CLI (small) run from these source checkouts")
    parser.add_argument("--jit-compile", default="auto", choices=["auto", "true", "false"],
                        help="Keras `compile(jit_compile=...)` for the fit-based runs (default: a real run's for ours, "
                             "Keras' for keras-hub)")
    parser.add_argument("--steps-per-execution", type=int, default=1,
                        help="Keras `compile(steps_per_execution=...)` for the fit-based runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    precisions = args.precisions.split(",")
    unknown = set(precisions) - {"float32", "bfloat16"}
    if unknown:
        parser.error(f"--precisions takes float32 and/or bfloat16, not {', '.join(sorted(unknown))}")
    repeats = _parse_repeats(args.repeats, parser)
    results = []
    work_dir = tempfile.mkdtemp(prefix="bench_train_")
    if args.trees:
        table = compare_trees(args, _parse_trees(args.trees, parser), repeats, work_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; {args.steps} steps x {args.windows} windows")
        print(table)
        return 0
    for backend in args.backends.split(","):
        for shape in args.shapes.split(","):
            for precision in precisions:
                planned = []
                for impl in args.impls.split(","):
                    if _runs(impl, backend, shape, precision):
                        planned.append(impl)
                    elif NATIVE.get(impl, backend) == backend:  # say so; other frameworks' loops are just not theirs
                        print(f"{backend} {shape} {impl} {precision}: not run (bfloat16 and MoE shapes run "
                              f"ours and the CLI only; the CLI runs small only)", file=sys.stderr)
                # Repeats go round the implementations (A, B, A, B), so a slow spell of the machine
                # falls on all of them rather than on one.
                runs = {}
                for attempt in range(repeats.get(shape, 1)):
                    for impl in planned:
                        result = _run_worker(args, impl, backend, shape, precision, work_dir)
                        if result is None:
                            continue
                        runs.setdefault(impl, []).append(result)
                        suffix = f", run {attempt + 1} of {repeats[shape]}" if shape in repeats else ""
                        _print_result(result, suffix)
                for impl, done in runs.items():
                    merged = _merge(done, args.peak_flops)
                    if len(done) > 1:
                        _print_result(merged, f", median of all {len(merged['windows'])} windows")
                    results.append(merged)
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"peak {args.peak_flops / 1e9:.0f} GFLOP/s; {args.steps} steps x {args.windows} windows"
          + "".join(f"; {shape} cells run {n} times" for shape, n in repeats.items()))
    print(summarize(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
