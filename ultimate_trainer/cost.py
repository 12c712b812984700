"""What a run will cost before it starts: parameters, FLOPs, time, memory and
the Chinchilla check (`ultimate-trainer cost`, `tools/cost.py`, docs/cost.md).

Everything comes from the run's config, never from its data: the parameter
count and FLOPs per token are `training/plan.model_summary` (the closed form
of `models/sizing.py` that the tests check against `model.count_params()`),
the device peaks are `training/mfu.PEAKS` (the table MFU uses in training).
Nothing here imports keras.

Example:
    cfg = resolve_config({"run.recipe": "ttt-125m"})
    report = estimate(cfg, device_type="a100", devices=8, wall_seconds=2.7 * 3600)
    report["time"]["mfu"]  # the MFU that 2.7 h on 8 x A100 implies
"""

import dataclasses
import difflib
import math

from rich.console import Console
from rich.table import Table

from ultimate_trainer import config as config_lib
from ultimate_trainer import recipes
from ultimate_trainer.backend import bf16_missing
from ultimate_trainer.errors import UserError
from ultimate_trainer.models import sizing
from ultimate_trainer.training import mfu as mfu_lib
from ultimate_trainer.training.plan import model_summary

# Hoffmann et al. 2022 ("Chinchilla"), approach 3: L(N, D) = E + A / N^alpha + B / D^beta.
CHINCHILLA_FIT = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
# The model sizes the fit was made on (Hoffmann et al., section 3).
FIT_RANGE = (70e6, 16e9)
# Their compute-optimal runs train about 20 tokens per parameter.
CHINCHILLA_TOKENS_PER_PARAM = 20

DEFAULT_DEVICE = "a100"
DEFAULT_MFU = 0.4
SHARDING = ("data", "fsdp", "model")
GIB = 2**30

# The config fields a cost depends on; `cost` notes any other flag it is given as ignored.
COST_FIELDS = frozenset(
    [f"model.{name}" for name in (
        "model_preset", "target_params", "prefer_depth", "d_model", "num_layers", "num_heads", "num_kv_heads",
        "d_ff", "seq_len", "dropout_rate", "activation", "rmsnorm", "swiglu", "rope",
        "flash_attention", "tie_embeddings", "use_bias", "use_lora", "lora_rank", "lora_targets", "ttt_layer_type",
        "ttt_layers", "ttt_mini_batch_size", "ttt_use_gate", "ttt_share_qk", "ttt_backbone", "num_experts",
        "experts_top_k", "moe_every", "capacity_factor")]
    + [f"tokenizer.{name}" for name in ("tokenizer", "vocab_size", "tokenizer_path", "auto_vocab_size")]
    + [f"training.{name}" for name in (
        "epochs", "batch_size", "gradient_accumulation_steps", "global_batch_size", "device_batch_sizes",
        "max_steps", "total_tokens", "optimizer", "peak_flops")]
    + ["optimization.use_mixed_precision", "run.config", "run.recipe", "data.data_dir"]  # shards: their vocab
)


def chinchilla_loss(params, tokens, fit=CHINCHILLA_FIT):
    """Loss the Chinchilla fit predicts for `params` parameters trained on `tokens` tokens.

    Example (Chinchilla itself, 70B parameters on 1.4T tokens):
        >>> round(chinchilla_loss(70e9, 1.4e12), 3)
        1.937
    """
    return fit["E"] + fit["A"] / params ** fit["alpha"] + fit["B"] / tokens ** fit["beta"]


def chinchilla_tokens(params):
    """Compute-optimal training tokens for `params` parameters (about 20 per parameter).

    Example:
        >>> chinchilla_tokens(125_000_000)
        2500000000
    """
    return int(CHINCHILLA_TOKENS_PER_PARAM * params)


def device_names():
    """The device types of the peak table, as `--device-type` spells them."""
    return [key.replace(" ", "-") for key in mfu_lib.PEAKS]


def device_peak(device_type, mixed_precision):
    """Data-sheet peak FLOP/s of one `device_type` (`a100`, `h100`, `tpu-v5p`, ...).

    Example:
        >>> device_peak("h100", True)
        989000000000000.0
    """
    return mfu_lib.table_peak(_device_key(device_type), mixed_precision)


def _device_key(device_type):
    key = device_type.lower().replace("-", " ").replace("_", " ")
    if key not in mfu_lib.PEAKS:
        near = difflib.get_close_matches(device_type.lower(), device_names(), n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UserError(
            f"unknown --device-type {device_type!r}{hint}; choose one of {', '.join(device_names())}, "
            f"or give the peak of one device with --peak-flops"
        )
    return key


def training_precision(cfg, device_type):
    """(bfloat16?, why): the precision a training run of `cfg` computes in on
    `device_type`, by training's own rule (`config.trains_in_bfloat16`):
    an explicit --use-mixed-precision / --no-use-mixed-precision wins, else
    bfloat16 on GPUs and TPUs; float32 on GPUs without bfloat16 (T4, V100)
    either way. `device_type` None is a device known only by --peak-flops:
    the flags decide (float32 unless --use-mixed-precision).

    Example:
        >>> cfg = config_lib.resolve_config({"model.model_preset": "nano"})
        >>> training_precision(cfg, "a100")
        (True, 'bfloat16, the training default on a100 (--no-use-mixed-precision for float32)')
        >>> training_precision(cfg, "v100")[1]
        'float32: v100 (compute capability 7.0) has no bfloat16'
    """
    asked = "optimization.use_mixed_precision" in cfg.explicit
    flag = "--use-mixed-precision" if cfg.optimization.use_mixed_precision else "--no-use-mixed-precision"
    if device_type is None:
        mixed = cfg.optimization.use_mixed_precision
        return mixed, (f"as given ({flag})" if asked else
                       "float32: --peak-flops names no device; add --use-mixed-precision to price bfloat16")
    key = _device_key(device_type)
    capability = mfu_lib.COMPUTE_CAPABILITY.get(key)
    missing = bf16_missing(device_type, capability) if capability else None
    mixed = config_lib.trains_in_bfloat16(cfg, "tpu" if key.startswith("tpu") else "gpu", missing)
    if missing:
        return mixed, f"float32: {missing}" + (" (training falls back from --use-mixed-precision)"
                                               if asked and cfg.optimization.use_mixed_precision else "")
    if asked:
        return mixed, f"{'bfloat16' if mixed else 'float32'} as given ({flag})"
    return mixed, f"bfloat16, the training default on {device_type} (--no-use-mixed-precision for float32)"


def parse_duration(text):
    """Seconds in `90s`, `45m`, `2.7h` or `1.5d`.

    Example:
        >>> parse_duration("2.7h")
        9720.0
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = str(text).strip().lower()
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value and value[-1] in units else None
    except ValueError:
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"--wall-time {text!r}: give a positive duration with its unit, e.g. 2.7h, 90m or 45s")
    return seconds


def flops_split(model_cfg, vocab_size, params):
    """Training FLOPs per token, split into the terms of `sizing.flops_per_token`.

    `matmul`: 6 x the active non-embedding parameters plus the LM head;
    `attention`: the scores and their weighted sum of the attention blocks;
    `ttt`: the inner loops of the TTT blocks.
    """
    m = model_cfg
    kind = config_lib.ttt_kind(m)
    ttt_blocks = len(sizing.ttt_block_indices(m.num_layers, kind, m.ttt_layers))
    per_ttt = sizing.ttt_flops_per_token(m.d_model, m.num_heads, kind, m.ttt_mini_batch_size) if ttt_blocks else 0
    active_non_embedding = params["active"] - params["embedding"]
    return {
        "matmul": sizing.flops_per_token(active_non_embedding, vocab_size, m.d_model, 0, m.seq_len),
        "attention": sizing.flops_per_token(0, 0, m.d_model, m.num_layers, m.seq_len, ttt_layers=ttt_blocks),
        "ttt": ttt_blocks * per_ttt,
    }


@dataclasses.dataclass(frozen=True)
class MemoryCase:
    """One way to lay a step out on the devices, for `memory_per_device`."""

    micro_batch: int  # sequences per device per forward pass
    accumulation: int
    sharding: str = "data"
    devices: int = 1
    remat: bool = False


def _activation_elements(m, vocab_size):
    """Per token: (elements a block keeps for its backward pass, of which split
    across devices by tensor parallelism, elements of the LM head).

    An estimate of what autodiff keeps for the backward pass of one block
    (in the compute dtype): the inputs of every matmul and norm and the
    non-linearities' inputs. Per token, with d = d_model, f = d_ff, kv = key
    and value width, h = heads, s = seq_len, K = TTT mini-batch:
    attention 5d + 3kv (norm in/out, q k v, rotated q k, output), plus 2hs
    (scores, probabilities) without a fused kernel; TTT ~12d + 2hK and its
    inner weights per mini-batch (h f_head^2 / K, x8 for TTT-MLP); SwiGLU MLP
    2d + 4f (plain MLP 2d + 2f); an MoE block keeps top_k x capacity slots
    of d + 4f + d each and its router logits; dropout keeps a one-byte mask
    per d-wide output (counted as a quarter element at 4 bytes).
    """
    d, h, s = m.d_model, m.num_heads, m.seq_len
    head = d // h
    kv = (m.num_kv_heads or h) * head
    kind = config_lib.ttt_kind(m)
    ttt = set(sizing.ttt_block_indices(m.num_layers, kind, m.ttt_layers))
    moe = set(sizing.moe_block_indices(m.num_layers, m.num_experts, m.moe_every))
    mlp_wide = 4 * m.d_ff if m.swiglu else 2 * m.d_ff
    blocks = []
    for i in range(m.num_layers):
        if i in ttt:
            inner = (8 if kind == "mlp" else 1) * h * head * head / m.ttt_mini_batch_size
            mixer_split = 3 * d + 2 * h * m.ttt_mini_batch_size + inner
            mixer_whole = 9 * d + (2 * d if m.ttt_backbone == "mamba" else 0)
        else:
            mixer_split = 3 * kv + 3 * d + (0 if _fused_attention(m) else 2 * h * s)
            mixer_whole = 2 * d
        if i in moe:
            capacity = m.capacity_factor or m.num_experts / m.experts_top_k  # dropless: every slot
            ffn_split = m.experts_top_k * capacity * (2 * d + mlp_wide)
            ffn_whole = 2 * d + m.num_experts
        else:
            ffn_split, ffn_whole = mlp_wide, 2 * d
        masks = 2 * d / 4 if m.dropout_rate else 0
        blocks.append((mixer_whole + ffn_whole + masks, mixer_split + ffn_split))
    head_elements = 2 * d + 2 * vocab_size  # final norm; float32 logits and their gradient
    return blocks, head_elements


def _fused_attention(m):
    # A fused (flash) kernel keeps no score matrix; GPUs and TPUs use one unless told not to.
    return m.flash_attention


def memory_per_device(cfg, vocab_size, params, case, bfloat16=None):
    """Bytes per device for weights, gradients, accumulators, optimizer state and activations.

    Weights and gradients are float32 (mixed precision keeps float32
    variables); AdamW and Adam keep 2 slots per trainable weight, SGD with
    momentum 1, Muon 1 for its matrices and 2 for the weights on its AdamW
    branch (embeddings, LM head). Keras' gradient accumulation keeps one
    float32 sum per trainable weight. `fsdp` and `model` split every state
    across the devices (`fsdp` also gathers one block's weights at a time);
    `model` (tensor parallelism) splits the head- and d_ff-wide activations
    and runs the whole micro-batch on every device. With `remat` a block
    keeps only its input and recomputes the rest in its backward pass.
    Activations are in the compute dtype: `bfloat16` (default: the config's
    --use-mixed-precision), else float32.

    Example:
        cfg = resolve_config({"model.model_preset": "nano"})
        _, params, _ = model_summary(cfg.model, 258)
        memory_per_device(cfg, 258, params, MemoryCase(micro_batch=32, accumulation=1))["total"]
    """
    m = cfg.model
    trainable = params["trainable"]
    optimizer = cfg.training.optimizer
    if optimizer in ("adamw", "adam"):
        slots = 2 * trainable
    elif optimizer == "sgd":
        slots = trainable
    elif m.use_lora:  # muon: the adapters are matrices
        slots = trainable
    else:  # muon: 1 slot per Muon matrix, 2 per AdamW-branch weight (1-D weights, < 0.1%, counted as Muon's)
        slots = trainable + params["embedding"]
    split = case.devices if case.sharding in ("fsdp", "model") else 1
    out = {
        "weights": 4 * params["total"] / split,
        "gradients": 4 * trainable / split,
        "accumulators": 4 * trainable / split if case.accumulation > 1 else 0,
        "optimizer": 4 * slots / split,
    }
    if case.sharding == "fsdp" and case.devices > 1:
        out["weights"] += 4 * params["non_embedding"] / m.num_layers  # one block gathered at a time
    act_bytes = 2 if (cfg.optimization.use_mixed_precision if bfloat16 is None else bfloat16) else 4
    blocks, head = _activation_elements(m, vocab_size)
    tp = case.devices if case.sharding == "model" else 1
    per_block = [whole + part / tp for whole, part in blocks]
    if case.remat:
        # Each block keeps its input; one block's full set exists while it is recomputed.
        elements = m.num_layers * m.d_model + max(per_block)
    else:
        elements = sum(per_block) + m.d_model  # + the embedding output
    tokens = case.micro_batch * m.seq_len
    out["activations"] = tokens * (elements * act_bytes + 4 * head / tp)
    out["total"] = sum(out.values())
    return out


def _budget(cfg, params, data_parallel):
    """Micro-batch, accumulation, tokens per step and the run's token budget."""
    t = cfg.training
    split = config_lib.batch_split(t, data_parallel)
    sequences = split.global_batch
    tokens_per_step = sequences * cfg.model.seq_len
    if t.total_tokens:
        steps = max(1, t.total_tokens // tokens_per_step)
        source = f"--total-tokens {t.total_tokens:,}"
    elif t.max_steps:
        steps = t.max_steps
        source = f"--max-steps {t.max_steps:,}"
    else:
        n = params["active"]
        steps = max(1, math.ceil(chinchilla_tokens(n) / tokens_per_step))
        source = (f"Chinchilla-optimal {CHINCHILLA_TOKENS_PER_PARAM} tokens per parameter "
                  f"(the run sets no --total-tokens or --max-steps)")
    return {
        "tokens": steps * tokens_per_step,
        "steps": steps,
        "tokens_per_step": tokens_per_step,
        "global_batch": sequences,
        "micro_batch": split.batch_size,
        "accumulation": split.gradient_accumulation_steps,
        "data_parallel": data_parallel,
        "source": source,
        "batch_rule": split.line,
    }


def estimate(cfg, device_type=None, devices=1, mfu=None, wall_seconds=None, sharding="data",
             remat=False):
    """The whole cost report of a resolved `Config`, as plain data (what `cost --json` prints).

    Give `mfu` to get the time, or `wall_seconds` to get the MFU it implies
    (default: `DEFAULT_MFU`). `devices` of `device_type` (default
    `DEFAULT_DEVICE`, or a device known only by --peak-flops when that is
    given) run the step, laid out by `sharding`, in the precision training
    would use there (`training_precision`).

    Example:
        report = estimate(resolve_config({"model.model_preset": "nano", "training.max_steps": 20}))
        report["time"]["hours"]  # at DEFAULT_MFU on one DEFAULT_DEVICE
    """
    _check_request(cfg, devices, sharding, mfu, wall_seconds)
    m = cfg.model
    vocab = config_lib.planned_vocab_size(cfg)
    architecture, params, flops = model_summary(m, vocab)
    split = flops_split(m, vocab, params)
    assert sum(split.values()) == flops, (split, flops)  # the split must add up to what training logs
    data_parallel = 1 if sharding == "model" else devices
    budget = _budget(cfg, params, data_parallel)
    total_flops = flops * budget["tokens"]

    if device_type is None and not cfg.training.peak_flops:
        device_type = DEFAULT_DEVICE
    mixed, precision_source = training_precision(cfg, device_type)
    hardware = _hardware(cfg, device_type, devices, mixed, precision_source)
    case = MemoryCase(budget["micro_batch"], budget["accumulation"], sharding, devices, remat)
    memory = {
        "sharding": sharding, "devices": devices, "remat": remat,
        "per_device": memory_per_device(cfg, vocab, params, case, mixed),
        "variants": [
            {"label": label, "micro_batch": c.micro_batch, "accumulation_steps": c.accumulation, "sharding": c.sharding,
             "remat": c.remat, **memory_per_device(cfg, vocab, params, c, mixed)}
            for label, c in _memory_variants(case, data_parallel)
        ],
    }
    chinchilla, notes = _chinchilla(m, architecture, params, budget["tokens"])
    if budget["batch_rule"]:
        notes.append(budget["batch_rule"])
    return {
        "model": architecture,
        "parameters": params,
        "flops_per_token": {"total": flops, **split},
        "budget": {k: v for k, v in budget.items() if k != "batch_rule"},
        "total_flops": total_flops,
        "hardware": hardware,
        "time": _time(total_flops, devices, hardware["peak_flops_per_device"], mfu, wall_seconds),
        "memory": memory,
        "chinchilla": chinchilla,
        "notes": notes,
    }


def _check_request(cfg, devices, sharding, mfu, wall_seconds):
    """`UserError` for a cost question that has no answer: bad numbers, or a run sized by its data."""
    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    if sharding not in SHARDING:
        raise UserError(f"--sharding {sharding!r} is not one of {', '.join(SHARDING)}")
    if mfu is not None and wall_seconds is not None:
        raise UserError("--mfu and --wall-time both fix the time; give --wall-time to get the MFU it implies, or --mfu")
    if mfu is not None and not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} must lie in (0, 1], e.g. 0.4 for 40%")
    if cfg.tokenizer.auto_vocab_size and not cfg.tokenizer.tokenizer_path:
        raise UserError("--auto-vocab-size picks the vocab from the data, which cost does not read; "
                        "pass --vocab-size N (a dry run prints the size it picks)")
    if "training.epochs" in cfg.explicit:
        raise UserError("--epochs: a run's length in epochs depends on its data, which cost does not read; "
                        "give --total-tokens N or --max-steps N")


def _hardware(cfg, device_type, devices, mixed, precision_source):
    """The devices, their precision and peak FLOP/s (--peak-flops, else the data sheet)."""
    precision = "bfloat16" if mixed else "float32"
    if cfg.training.peak_flops:
        peak, peak_source = cfg.training.peak_flops, "--peak-flops"
    else:
        peak, peak_source = device_peak(device_type, mixed), f"data sheet of {device_type}, {precision}"
    return {"device_type": device_type, "devices": devices, "precision": precision,
            "precision_source": precision_source, "peak_flops_per_device": peak, "peak_source": peak_source}


def _time(total_flops, devices, peak, mfu, wall_seconds):
    """The run's time at `mfu`, or the MFU that `wall_seconds` implies."""
    if wall_seconds is not None:
        seconds = wall_seconds
        used_mfu = total_flops / (seconds * devices * peak)
        mfu_source = "implied by --wall-time"
    else:
        used_mfu = DEFAULT_MFU if mfu is None else mfu
        seconds = total_flops / (devices * peak * used_mfu)
        mfu_source = "--mfu" if mfu is not None else f"default {DEFAULT_MFU:g}"
    return {"mfu": used_mfu, "mfu_source": mfu_source, "seconds": seconds, "hours": seconds / 3600,
            "device_hours": seconds * devices / 3600}


def _memory_variants(case, data_parallel):
    """(label, `MemoryCase`): the configured layout and the ones next to it, at the same global batch."""
    variants = [("as configured", case)]
    if case.accumulation > 1:
        variants.append(("no accumulation",
                         dataclasses.replace(case, micro_batch=case.micro_batch * case.accumulation, accumulation=1)))
    elif case.micro_batch % 2 == 0:
        variants.append(("accumulation 2",
                         dataclasses.replace(case, micro_batch=case.micro_batch // 2, accumulation=2)))
    variants.append(("without remat" if case.remat else "with remat", dataclasses.replace(case, remat=not case.remat)))
    if case.devices > 1:
        for kind in SHARDING:
            if kind != case.sharding:
                # The same global batch: tensor parallelism runs all of it on every device.
                if kind == "model":
                    other = dataclasses.replace(case, sharding=kind, micro_batch=case.micro_batch * data_parallel)
                elif case.sharding == "model":
                    other = dataclasses.replace(case, sharding=kind,
                                                micro_batch=max(1, case.micro_batch // case.devices))
                else:
                    other = dataclasses.replace(case, sharding=kind)
                variants.append((f"{kind} sharding", other))
    return variants


def _chinchilla(m, architecture, params, tokens):
    """The Chinchilla check of a run of `tokens` tokens, and notes on where the fit does not hold."""
    notes = []
    n = params["total"]
    if m.num_experts:
        n = params["active"]
        notes.append("the Chinchilla fit is for dense models; it is shown for the active parameters, "
                     "which overstates an MoE model's loss")
    if not m.num_experts and architecture.get("ttt"):
        notes.append("the Chinchilla fit was made on transformers; TTT layers change the loss per parameter")
    if not FIT_RANGE[0] <= n <= FIT_RANGE[1]:
        notes.append(f"{n:,} parameters lie outside the {_count(FIT_RANGE[0])}-{_count(FIT_RANGE[1])} models the "
                     f"Chinchilla fit was made on; its loss is an extrapolation")
    return {
        "fit": CHINCHILLA_FIT,
        "params": n,
        "optimal_tokens": chinchilla_tokens(n),
        "tokens_per_param": tokens / n,
        "predicted_loss": chinchilla_loss(n, tokens),
        "predicted_loss_at_optimal_tokens": chinchilla_loss(n, chinchilla_tokens(n)),
    }, notes


def _count(value):
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:g}"


def _gib(value):
    return f"{value / GIB:,.2f} GiB"


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.1f} days"


def render(report, console=None):
    """Prints the report as tables (rich).

    Example:
        render(estimate(resolve_config({"model.model_preset": "nano", "training.max_steps": 20})))
    """
    console = console or Console(width=120)
    p, f, b, h, t = (report[k] for k in ("parameters", "flops_per_token", "budget", "hardware", "time"))
    a = report["model"]
    summary = Table(title="run cost", show_header=False, title_justify="left")
    summary.add_column("quantity", style="bold")
    summary.add_column("value", justify="right")
    summary.add_column("detail")
    shape = (f"{a['block_style']}, {a['num_layers']} layers, d_model {a['d_model']}, {a['num_heads']} heads, "
             f"d_ff {a['d_ff']}, vocab {a['vocab_size']:,}, seq_len {a['seq_len']}")
    if a.get("ttt"):
        shape += f"; TTT-{a['ttt']['kind'].capitalize()} in {len(a['ttt']['blocks'])} blocks"
    if a.get("moe"):
        shape += f"; MoE in {len(a['moe']['blocks'])} blocks, {a['moe']['num_experts']} experts, top-{a['moe']['top_k']}"
    summary.add_row("model", "", shape)
    summary.add_row("parameters", f"{p['total']:,}",
                    f"{p['non_embedding']:,} non-embedding, {p['embedding']:,} embedding")
    if p["active"] != p["total"]:
        summary.add_row("active per token", f"{p['active']:,}", "MoE: top-k of the experts")
    if p["trainable"] != p["total"]:
        summary.add_row("trainable", f"{p['trainable']:,}", "LoRA adapters only")
    terms = f"matmul {_count(f['matmul'])} + attention {_count(f['attention'])}"
    if f["ttt"]:
        terms += f" + TTT {_count(f['ttt'])}"
    summary.add_row("FLOPs per token", _count(f["total"]), terms + " (forward + backward)")
    summary.add_row("tokens", f"{b['tokens']:,}",
                    f"{b['steps']:,} steps x {b['tokens_per_step']:,} ({b['source']})")
    summary.add_row("total FLOPs", f"{report['total_flops']:.3e}", "FLOPs per token x tokens")
    device = h["device_type"] or "devices"
    summary.add_row("hardware", f"{h['devices']} x {device}",
                    f"{h['peak_flops_per_device'] / 1e12:,.1f} TFLOP/s peak each ({h['peak_source']})")
    summary.add_row("precision", h["precision"], h["precision_source"])
    summary.add_row("MFU", f"{100 * t['mfu']:.1f}%", t["mfu_source"])
    summary.add_row("time", _duration(t["seconds"]), f"{t['device_hours']:,.3g} device-hours")
    c = report["chinchilla"]
    summary.add_row("Chinchilla tokens", f"{c['optimal_tokens']:,}",
                    f"20 x {c['params']:,} parameters; this run: {c['tokens_per_param']:.1f} tokens per parameter")
    summary.add_row("predicted loss", f"{c['predicted_loss']:.3f}",
                    f"E + A/N^a + B/D^b (Hoffmann et al.); {c['predicted_loss_at_optimal_tokens']:.3f} at 20 N tokens")
    console.print(summary)

    mem = report["memory"]
    table = Table(title=f"memory per device ({mem['devices']} device(s), {mem['sharding']} sharding"
                        f"{', remat' if mem['remat'] else ''})", title_justify="left")
    for column in ("layout", "batch x accum", "weights", "gradients", "accumulators", "optimizer", "activations",
                   "total"):
        table.add_column(column, justify="left" if column == "layout" else "right")
    for v in mem["variants"]:
        table.add_row(
            v["label"], f"{v['micro_batch']} x {v['accumulation_steps']}", _gib(v["weights"]), _gib(v["gradients"]),
            _gib(v["accumulators"]), _gib(v["optimizer"]), _gib(v["activations"]), _gib(v["total"]),
        )
    console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)


def recipe_table(names, device_type=DEFAULT_DEVICE, mfu=DEFAULT_MFU):
    """One row per shipped recipe: size, token budget, FLOPs, the precision
    training would use on `device_type` and device-hours at `mfu` there.

    Example:
        recipe_table(["ttt-125m"])[0]["params"]  # the exact count of the recipe's model
    """
    rows = []
    for name in names:
        cfg = config_lib.resolve_config({"run.recipe": name})
        report = estimate(cfg, device_type=device_type, devices=1, mfu=mfu)
        p, b = report["parameters"], report["budget"]
        rows.append({
            "name": name,
            "description": recipes.describe(name),
            "params": p["total"],
            "active_params": p["active"],
            "tokens": b["tokens"],
            "tokens_source": b["source"],
            "total_flops": report["total_flops"],
            "device_type": device_type,
            "precision": report["hardware"]["precision"],
            "precision_source": report["hardware"]["precision_source"],
            "peak_flops_per_device": report["hardware"]["peak_flops_per_device"],
            "mfu": mfu,
            "device_hours": report["time"]["device_hours"],
            "chinchilla_loss": report["chinchilla"]["predicted_loss"],
        })
    return rows


def render_recipes(rows, device_type, mfu, console=None):
    """Prints `recipe_table` rows as a table (rich)."""
    console = console or Console(width=132)
    table = Table(title=f"shipped recipes (train one with `ultimate-trainer train --recipe NAME`)",
                  title_justify="left")
    for column in ("recipe", "parameters", "tokens", "FLOPs", "precision",
                   f"{device_type}-hours at {100 * mfu:g}% MFU", "Chinchilla loss"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    chinchilla_budget = False
    for r in rows:
        params = f"{r['params']:,}" + (f" ({r['active_params']:,} active)" if r["active_params"] != r["params"] else "")
        star = "*" if r["tokens_source"].startswith("Chinchilla") else ""
        chinchilla_budget = chinchilla_budget or bool(star)
        table.add_row(r["name"], params, f"{_count(r['tokens'])}{star}", f"{r['total_flops']:.2e}", r["precision"],
                      f"{r['device_hours']:,.1f}", f"{r['chinchilla_loss']:.2f}")
    console.print(table)
    if chinchilla_budget:
        console.print("* the recipe sets no token budget; priced at 20 tokens per parameter (Chinchilla)",
                      highlight=False)
    console.print(f"precision: what training computes in on {device_type}, priced at its peak (bfloat16 where the "
                  f"device has it, unless the recipe sets it)", highlight=False)
