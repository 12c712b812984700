"""Typed run configuration: one dataclass per flag group, validated once.

Every field carries its own flag, help text and default in its metadata, so
the argparse parser (`cli.py`), YAML recipes and `training_args.json` all come
from this one place. The resolution order is: dataclass defaults, then the
YAML recipe given with `--config`, then the size preset, then the flags typed
on the command line.

Nothing here imports keras: `--help`, validation and `--dry-run` stay fast and
the backend can still be chosen before keras loads.

Example:
    cfg = resolve_config({"model.model_preset": "nano"})
    cfg.model.d_model  # 128
"""

import dataclasses
import difflib
import importlib.util
import json
import math
import os
from pathlib import Path

from ultimate_trainer.errors import UserError
from ultimate_trainer.models import sizing

REDACTED = "***REDACTED***"

def count(value):
    """Parses a count such as `100000000`, `1e8`, `100M` or `1.5B`.

    Example:
        >>> count("1.5B")
        1500000000
    """
    text = str(value).strip().replace("_", "").replace(",", "")
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    factor = 1
    if text and text[-1].upper() in scale:
        factor = scale[text[-1].upper()]
        text = text[:-1]
    try:
        number = float(text) * factor
    except ValueError:
        raise ValueError(f"not a count: {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"not a whole count: {value!r}")
    return int(number)


def _opt(default, help, **meta):
    """A config field; `meta` holds the flag spelling, type, choices, etc."""
    meta["help"] = help
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class DataConfig:
    dataset_id: str = _opt(None, "Hugging Face dataset id (streamed; needs network), or the directory of a downloaded copy.", type=str)
    dataset_config: str = _opt(None, "Dataset configuration name (e.g. `en` for C4); with --dataset-id.", type=str)
    text_column: str = _opt("text", "Column (field, feature) that holds the text.")
    split: str = _opt("train", "Split to train on; with --dataset-id.")
    val_split: str = _opt(None, "Split to validate on, with --dataset-id; without it a deterministic slice of the training data is held out.", type=str)
    max_train_examples: int = _opt(None, "Use at most this many training records.", type=int)
    max_val_examples: int = _opt(None, "Use at most this many validation records.", type=int)
    data_files: str = _opt(None, "Local file, directory (recursive) or glob: .txt, .jsonl, .json, .parquet, .csv, .tfrecord (docs/data.md).", type=str)
    val_fraction: float = _opt(0.05, "Share of records held out for validation when there is no --val-split.")
    data_dir: str = _opt(None, "Train on pre-tokenized shards made by `ultimate-trainer prepare-data` (read by memmap).", type=str)


@dataclasses.dataclass
class TokenizerConfig:
    tokenizer: str = _opt("byte", "Tokenizer kind. `byte`: 256 byte ids plus EOS and PAD, no training; `sentencepiece`: trained on the data.", choices=["byte", "sentencepiece"])
    tokenizer_model: str = _opt("bpe", "SentencePiece algorithm for --tokenizer sentencepiece.", choices=["bpe", "unigram"])
    auto_vocab_size: bool = _opt(False, "Pick the vocab size from the data: the smallest size on a doubling grid whose next size saves < 3%% of held-out tokens (docs/data.md).")
    vocab_size: int = _opt(16000, "Vocab size of a trained tokenizer.")
    min_vocab_size: int = _opt(5000, "Lower bound for --auto-vocab-size.")
    max_vocab_size: int = _opt(50000, "Upper bound for --auto-vocab-size.")
    tokenizer_train_examples: int = _opt(10000, "Records used to train the tokenizer.")
    retrain_tokenizer: bool = _opt(False, "Train a new tokenizer even if the output dir holds one.")
    tokenizer_path: str = _opt(None, "Existing tokenizer: a SentencePiece .model, a dir with vocab.json + merges.txt, or a run's output dir.", type=str)


@dataclasses.dataclass
class ModelConfig:
    model_preset: str = _opt(None, "Size preset: " + ", ".join(sizing.SIZE_PRESETS) + ".", type=str, metavar="|".join(sizing.SIZE_PRESETS))
    target_params: int = _opt(None, "Size the model to this many parameters (e.g. 100M, 1.3B); picks d_model, layers, heads and d_ff.", type=count)
    prefer_depth: bool = _opt(False, "With --target-params, favour more layers over width.")
    d_model: int = _opt(512, "Hidden size.")
    num_layers: int = _opt(6, "Number of transformer blocks.")
    num_heads: int = _opt(8, "Attention heads; must divide --d-model.")
    num_kv_heads: int = _opt(None, "Key/value heads for grouped-query attention; must divide --num-heads (default: --num-heads).", type=int)
    d_ff: int = _opt(2048, "Feed-forward hidden size.")
    seq_len: int = _opt(256, "Context length in tokens.")
    dropout_rate: float = _opt(0.1, "Dropout on attention output, MLP output and embeddings.")
    activation: str = _opt("gelu", "MLP activation with --no-swiglu (SwiGLU always gates with SiLU).", choices=["gelu", "relu", "silu"])
    use_rmsnorm: bool = _opt(True, "Use LayerNorm instead of RMSNorm.", flag="--no-rmsnorm")
    use_swiglu: bool = _opt(True, "Use a plain MLP with --activation instead of SwiGLU.", flag="--no-swiglu")
    use_rope: bool = _opt(True, "Use learned absolute positions instead of rotary embeddings.", flag="--no-rope")
    flash_attention: bool = _opt(True, "Force the plain attention kernel (flash is used automatically where supported).", flag="--no-flash-attention")
    tie_embeddings: bool = _opt(False, "Share the input embedding with the LM head.")
    use_bias: bool = _opt(False, "Add biases to the attention and MLP projections, as GPT-2 has (LLaMA has none); TTT layers and MoE experts take none.")
    use_lora: bool = _opt(False, "Train LoRA adapters only; every other weight is frozen.")
    lora_rank: int = _opt(8, "LoRA rank.")
    lora_alpha: float = _opt(None, "LoRA scale numerator: updates are scaled by alpha / rank (default: the rank).", type=float)
    lora_targets: str = _opt("qkv,out", "Projections that get adapters: a comma-separated subset of qkv, out, up, down.")
    init_from: str = _opt(None, "Start from the weights of this checkpoint dir (fine-tuning, LoRA); the architecture must match.", type=str)
    ttt_layer_type: str = _opt(None, "Replace attention with a TTT layer (test-time training, arXiv 2407.04620): `linear` (TTT-Linear) or `mlp` (TTT-MLP); the recipes' ttt_linear/ttt_mlp also work.", type=str, choices=["linear", "mlp", "ttt_linear", "ttt_mlp"])
    ttt_layers: str = _opt(None, "Which blocks are TTT, as comma-separated indices (a hybrid stack; default: all).", type=str)
    ttt_mini_batch_size: int = _opt(16, "Tokens per TTT inner gradient step.")
    ttt_base_lr: float = _opt(None, "TTT inner learning rate scale (default: 1.0 for linear, 0.1 for mlp).", type=float)
    ttt_use_gate: bool = _opt(False, "Gate the TTT output with GELU(x W_g), as in the paper's Mamba-style blocks.")
    ttt_share_qk: bool = _opt(False, "Share the TTT Q/K projection, with a causal depthwise conv (kernel 4) for each.")
    ttt_backbone: str = _opt("transformer", "TTT block shape: `transformer` (pre-norm TTT + MLP) or `mamba`, the paper's \"(M)\" models: a causal conv before each TTT layer, shared Q/K and the output gate.", choices=["transformer", "mamba"])
    state_passing: bool = _opt(False, "Carry each TTT layer's final inner state into the next window of the same stream (no gradient across windows); each batch row then reads its own contiguous stream, unshuffled.")
    # Mixture of experts (models/moe.py, docs/moe.md).
    num_experts: int = _opt(0, "Mixture-of-experts feed-forward layers with this many experts, each --d-ff wide; 0 is a dense MLP.")
    experts_top_k: int = _opt(2, "Experts each token is routed to.")
    moe_every: int = _opt(1, "Every k-th block is MoE (blocks k-1, 2k-1, ...; 1: all).")
    capacity_factor: float = _opt(1.25, "Expert capacity per sequence, as a multiple of an even split of its top-k assignments; assignments over it are dropped and counted. 0: dropless (every assignment computed, at num-experts/top-k times the expert compute).")
    router_aux_loss_coef: float = _opt(0.01, "Weight of the Switch load-balancing loss (1.0 when balanced) in the training loss.")
    router_z_loss_coef: float = _opt(0.001, "Weight of the router z-loss (mean squared logsumexp of the router logits) in the training loss.")


@dataclasses.dataclass
class TrainingConfig:
    epochs: int = _opt(3, "Passes over the training data (unless --max-steps or --total-tokens).")
    batch_size: int = _opt(32, "Sequences per micro-batch.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    global_batch_size: int = _opt(None, "Sequences per optimizer step; sets --gradient-accumulation-steps to global / (batch x data-parallel devices).", type=int)
    device_batch_sizes: str = _opt(None, "Per-device batch by device count, e.g. `1:16,4:32` (the entry for the most devices not above the count found applies); recipes use it with --global-batch-size.", type=str)
    learning_rate: float = _opt(5e-4, "Peak learning rate.")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to norms, biases or embeddings).")
    warmup_steps: int = _opt(500, "Linear warmup steps (capped at 10%% of the run when the run is shorter).")
    grad_clip: float = _opt(1.0, "Global gradient-norm clip; 0 disables it.")
    skip_nonfinite: int = _opt(0, "Skip up to N updates whose gradients are NaN or inf (the weights stay as they were); 0 stops at the first.")
    max_steps: int = _opt(None, "Stop after this many optimizer steps.", type=int)
    total_tokens: int = _opt(None, "Train on this many tokens (e.g. 2.4B); sets the step count.", type=count)
    lr_end: float = _opt(None, "Learning rate at the end of the cosine decay (default: learning rate / 10; a recipe may give it as `min_lr_ratio`, a fraction of the peak).", type=float)
    optimizer: str = _opt("adamw", "Optimizer. `muon`: Muon for the hidden weight matrices (experts included), AdamW for embeddings, LM head, router, norms and biases.", choices=["adamw", "adam", "sgd", "muon"])
    seed: int = _opt(42, "Random seed for weights, data order and dropout.")
    peak_flops: float = _opt(None, "Peak FLOP/s of one device for MFU; replaces the data sheet (known GPUs/TPUs) and the CPU measurement, which is then skipped (default: the data sheet's peak in the run's precision; on CPU the backend's matmul in that precision, measured once per machine and cached in ~/.cache/ultimate_trainer; docs/cost.md).", type=float)


@dataclasses.dataclass
class LoaderConfig:
    # Not in --help: text sources are always streamed, so these two only restate the default. They stay
    # accepted for the CLI guide's command lines and the MoE guide's YAML, and the plan says they change nothing.
    use_streaming: bool = _opt(True, "Stream and tokenize the text sources while training (always so); --no-use-streaming means --data-dir shards.", flag="--use-streaming", boolean_optional=True, hidden=True)
    shuffle_buffer_size: int = _opt(10000, "Windows held in the shuffle buffer.")
    stride: int = _opt(None, "Sequence stride: tokens from one training window's start to the next (default: --seq-len, so each window's first input is the previous window's last target; smaller overlaps windows).", type=int)
    tokenize_on_fly: bool = _opt(False, "Tokenize the sources while training (always so without --data-dir); excludes --data-dir.", hidden=True)
    shard_tokens: int = _opt(100_000_000, "prepare-data: tokens per shard file.", type=count)
    num_workers: int = _opt(None, "Threads of the input pipeline (tf.data's private thread pool; default: tf.data's own choice).", type=int)


@dataclasses.dataclass
class OptimizationConfig:
    use_mixed_precision: bool = _opt(False, "bfloat16 compute with float32 weights (default: on for a GPU or TPU that has bfloat16, off on CPU; --no-use-mixed-precision forces float32).", boolean_optional=True)


@dataclasses.dataclass
class DistributionConfig:
    distribution: str = _opt("auto", "How to spread training over devices (docs/distributed.md): `data` replicates the model and splits each batch; `fsdp` also splits every weight over the batch axis; `model` splits weights over the model axis of --mesh (tensor, expert and head parallelism); `auto`: data over all devices when there are several (jax; tensorflow: several GPUs), else one device; `none`: one device.", choices=["auto", "none", "data", "fsdp", "model"])
    mesh: str = _opt(None, "Device mesh for --distribution data/fsdp/model, e.g. batch=2,model=4 (an axis left out takes the remaining devices; default: all devices on batch, or on model for --distribution model).", type=str, metavar="batch=B,model=M")
    coordinator_address: str = _opt(None, "Multi-process run: HOST:PORT of process 0, the same on every process (or KERAS_DISTRIBUTION_JOB_ADDRESSES); jax only.", type=str, metavar="HOST:PORT")
    num_processes: int = _opt(None, "Multi-process run: number of processes (or KERAS_DISTRIBUTION_NUM_PROCESSES).", type=int)
    process_id: int = _opt(None, "Multi-process run: this process's id, 0 to --num-processes - 1 (or KERAS_DISTRIBUTION_PROCESS_ID); process 0 writes logs and checkpoints.", type=int)


@dataclasses.dataclass
class OutputConfig:
    output_dir: str = _opt("output_ultimate", "Where the run writes checkpoints, logs and its config.")
    log_every: int = _opt(10, "Optimizer steps between progress lines and metrics.jsonl records.")
    save_every: int = _opt(1000, "Optimizer steps between checkpoints.")
    save_total_limit: int = _opt(None, "Keep only the newest K checkpoint-<step> dirs (milestones, best_checkpoint and final_model are kept).", type=int)
    milestone_every: int = _opt(None, "Optimizer steps between milestone-<step> checkpoints, which are never deleted.", type=int)
    eval_every: int = _opt(500, "Optimizer steps between validation passes.")
    eval_steps: int = _opt(None, "Validation batches per pass (default: the whole validation set).", type=int)
    eval_enabled: bool = _opt(True, "Do not validate (no validation passes, no best_checkpoint).", flag="--no-eval")
    resume_from: str = _opt(None, "Resume exactly from a checkpoint dir, a run dir (its newest valid checkpoint), `latest` (in --output-dir), or an s3:// gs:// az:// URI of a checkpoint or a prefix (downloaded into <output-dir>/remote-checkpoints/).", type=str)
    allow_changed_config: str = _opt(None, "With --resume-from, let these settings differ from the checkpoint's, comma-separated: max_steps (also --total-tokens, --epochs), lr, lr_end (also min_lr_ratio), warmup, weight_decay, grad_clip, precision, dropout, aux_loss, z_loss; flag names work too. A changed schedule continues from the checkpoint's learning rate, without a jump. Without it a resume refuses any setting that would change the run (docs/checkpoints.md).", type=str, metavar="NAMES")
    overwrite: bool = _opt(False, "Start afresh in an output dir that holds a run; the old run is moved to <output-dir>/previous-runs/, never deleted.")
    tensorboard: bool = _opt(True, "Write TensorBoard logs to <output-dir>/tensorboard.", boolean_optional=True)
    sample_tokens: int = _opt(200, "Tokens sampled from the trained model for each of the end-of-run samples (samples.txt); 0 writes none.")
    wandb_project: str = _opt(None, "Log to this Weights & Biases project (needs `pip install wandb`; WANDB_MODE=offline works without network).", type=str)
    wandb_run_name: str = _opt(None, "W&B run name (default: the output dir's name).", type=str)
    wandb_entity: str = _opt(None, "W&B entity (team or user) that owns the project (default: your W&B default entity).", type=str)


@dataclasses.dataclass
class CloudConfig:
    cloud_provider: str = _opt(None, "Upload checkpoints (checkpoint-<step>, milestones, best_checkpoint, final_model) to this provider, in the background, after a preflight write before training.", type=str, choices=["s3", "gcs", "azure"])
    cloud_bucket: str = _opt(None, "Bucket (S3/GCS) or container (Azure) to upload to.", type=str)
    cloud_region: str = _opt(None, "The bucket's region. S3: the client's region (default: the SDK's configuration), checked against the bucket's; GCS: checked against the bucket's location; not for Azure (its storage account has the region).", type=str)
    cloud_prefix: str = _opt(None, "Key prefix inside the bucket (default: the output dir's name).", type=str)
    cloud_endpoint_url: str = _opt(None, "Endpoint of an S3/GCS/Azure-compatible service or emulator (default: the provider's; the SDKs' own variables such as AWS_ENDPOINT_URL and STORAGE_EMULATOR_HOST also work).", type=str)
    cloud_upload_wait: float = _opt(600.0, "Seconds to keep retrying uploads that failed with a transient error when training ends or is interrupted (a permanent error ends the wait; checkpoints not uploaded stay local).")
    azure_sas_token: str = _opt(None, "Azure SAS token (better: AZURE_STORAGE_SAS_TOKEN in the environment); never logged.", type=str, secret=True)
    azure_account_name: str = _opt(None, "Azure storage account name (or AZURE_STORAGE_ACCOUNT).", type=str)


@dataclasses.dataclass
class RunConfig:
    backend: str = _opt(None, "Keras backend. auto: jax when a flag needs keras.distribution (--distribution fsdp or model, several processes), else the fastest measured for the devices found and the precision (on this project's CPU tensorflow in float32, torch in bfloat16; jax on TPU and GPU; docs/benchmarks.md); the choice and its reason are printed. Default: $KERAS_BACKEND when set, else auto.", type=str, choices=["auto", "jax", "torch", "tensorflow"])
    config: str = _opt(None, "YAML recipe; flags on the command line override it.", type=str, metavar="RECIPE.yaml")
    recipe: str = _opt(None, "A shipped recipe by name, e.g. ttt-125m (`ultimate-trainer recipes` lists them); flags on the command line override it, as with --config.", type=str, metavar="NAME")
    dry_run: bool = _opt(False, "Resolve everything, print the plan and exit without training.")
    json: bool = _opt(False, "With --dry-run or --eval-only: print the result as one JSON object.")
    eval_only: bool = _opt(False, "Evaluate the checkpoint of --init-from (or --resume-from) on the validation data and exit.")
    verbose: bool = _opt(False, "Show the frameworks' own start-up logs (absl, oneDNN, CUDA probes), hidden by default.")


# (attribute on Config, argparse group title)
SECTIONS = [
    ("data", "dataset", DataConfig),
    ("tokenizer", "tokenizer", TokenizerConfig),
    ("model", "model", ModelConfig),
    ("training", "training", TrainingConfig),
    ("loader", "data loading", LoaderConfig),
    ("optimization", "optimization", OptimizationConfig),
    ("distribution", "distribution", DistributionConfig),
    ("output", "checkpoint & logging", OutputConfig),
    ("cloud", "cloud", CloudConfig),
    ("run", "run", RunConfig),
]


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    optimization: OptimizationConfig = dataclasses.field(default_factory=OptimizationConfig)
    distribution: DistributionConfig = dataclasses.field(default_factory=DistributionConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    cloud: CloudConfig = dataclasses.field(default_factory=CloudConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    # "section.field" keys the user set (recipe or flags), for precedence and
    # for checks that only apply to values given on purpose.
    explicit: frozenset = frozenset()

    def to_dict(self, redact=True):
        """The resolved config as plain data, secrets redacted."""
        out = {}
        for attr, _, cls in SECTIONS:
            section = getattr(self, attr)
            values = {}
            for f in dataclasses.fields(cls):
                value = getattr(section, f.name)
                if redact and f.metadata.get("secret") and value:
                    value = REDACTED
                values[f.name] = value
            out[attr] = values
        return out


def iter_fields():
    """Yields (section attr, group title, dataclasses.Field) for every option."""
    for attr, title, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            yield attr, title, f


def flag_name(f):
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _field_index():
    return {name: (attr, f) for attr, _, f in iter_fields() for name in [f.name]}


LR_RATIO = "training.min_lr_ratio"  # a recipe key that is no field (`resolve_config` turns it into lr_end)

# Keys of the MoE guide's recipe shape (configs/production_training.yaml) -> config keys.
# Its sections `model`, `training` and `data` also take this config's own field names.
RECIPE_KEYS = {
    "model.n_layers": "model.num_layers",
    "model.n_heads": "model.num_heads",
    "model.n_kv_heads": "model.num_kv_heads",
    "model.n_experts": "model.num_experts",
    "model.top_k": "model.experts_top_k",
    "model.max_seq_len": "model.seq_len",
    "model.vocab_size": "tokenizer.vocab_size",
    "training.max_lr": "training.learning_rate",
    "training.min_lr_ratio": LR_RATIO,  # the end LR as a fraction of the peak: --lr-end once the peak is final
    "training.checkpoint_dir": "output.output_dir",
    "training.save_interval": "output.save_every",
    "training.save_total_limit": "output.save_total_limit",
    "training.log_interval": "output.log_every",
    "data.dataset_name": "data.dataset_id",
    "data.max_examples": "data.max_train_examples",
    "data.tokenize_on_fly": "loader.tokenize_on_fly",
    "data.use_streaming": "loader.use_streaming",
    "data.num_workers": "loader.num_workers",
    "evaluation.enabled": "output.eval_enabled",
    "evaluation.eval_steps": "output.eval_steps",
    "evaluation.eval_interval": "output.eval_every",
    "mixed_precision.bf16": "optimization.use_mixed_precision",
    "wandb.project": "output.wandb_project",
    "wandb.run_name": "output.wandb_run_name",
    "wandb.name": "output.wandb_run_name",
    "wandb.entity": "output.wandb_entity",
    "wandb.enabled": None,  # false: drop the section's settings; true: needs wandb.project
}


def load_recipe(path):
    """Reads a YAML recipe into {"section.field": value}.

    Accepts sections named after the flag groups (`model:`, `training:`, ...),
    flat top-level keys, and the MoE guide's shape (`RECIPE_KEYS`: sections
    model, training, data, evaluation, mixed_precision, wandb). An unknown key
    is an error naming the nearest valid one.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"--config {path}: no such file; pass the path of a YAML recipe "
            f"(`ultimate-trainer recipes` lists the shipped ones, which --recipe NAME runs)"
        )
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"--config {path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    index = _field_index()
    sections = {attr: cls for attr, _, cls in SECTIONS}
    guide_sections = {key.split(".")[0] for key in RECIPE_KEYS}
    out = {}

    def unknown(key, valid):
        near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
        hint = f"; did you mean `{near[0]}`?" if near else ""
        raise UserError(f"--config {path}: unknown key `{key}`{hint}")

    wandb_enabled = None
    for key, value in data.items():
        if (key in sections or key in guide_sections) and isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(sections[key])} if key in sections else set()
            aliases = {k.split(".", 1)[1] for k in RECIPE_KEYS if k.startswith(key + ".")}
            for sub, subvalue in value.items():
                full = f"{key}.{sub}"
                if full == "wandb.enabled":
                    wandb_enabled = subvalue
                elif full in RECIPE_KEYS:
                    out[RECIPE_KEYS[full]] = subvalue
                elif sub in names:
                    out[full] = subvalue
                else:
                    unknown(full, [f"{key}.{n}" for n in names | aliases])
        elif key == "wandb" and value in (None, False):
            wandb_enabled = False
        elif key in index:
            out[f"{index[key][0]}.{key}"] = value
        else:
            unknown(key, list(index) + list(sections) + sorted(guide_sections))
    if wandb_enabled is False:
        for name in ("output.wandb_project", "output.wandb_run_name", "output.wandb_entity"):
            out.pop(name, None)
    elif wandb_enabled is not None and not out.get("output.wandb_project"):
        raise UserError(f"--config {path}: `wandb.enabled: {wandb_enabled}` needs `wandb.project: NAME`")
    return out


def _coerce(f, value, source):
    """Converts a recipe value to the field's type, or explains why not."""
    if value is None:
        return None
    kind = f.metadata.get("type") or type(f.default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: `{f.name}` must be true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: `{f.name}` must be {kind.__name__}, got {value!r}") from None


# Where the training text comes from, and what only means something with one of them.
SOURCE_KEYS = ("data.data_dir", "data.dataset_id", "data.data_files")
SOURCE_SETTINGS = ("data.dataset_config", "data.split", "data.val_split")


def resolve_config(cli_values, recipe_path=None):
    """Builds a validated `Config` from {"section.field": value} flags.

    `cli_values` holds only what the user typed; `recipe_path` (or the
    `run.config` value) names a YAML recipe that the flags override. A data
    source among the flags (--data-dir, --dataset-id, --data-files) replaces
    the recipe's source and its split settings (and, when the recipe reads
    shards, the vocab size it states for them).
    """
    recipe_path = recipe_path or cli_values.get("run.config")
    if cli_values.get("run.recipe"):
        from ultimate_trainer import recipes

        if recipe_path:
            raise UserError("--recipe and --config both name the recipe; pass only one")
        recipe_path = recipes.recipe_path(cli_values["run.recipe"])
    merged, lr_ratio = {}, None
    if recipe_path:
        index = _field_index()
        recipe = load_recipe(recipe_path)
        lr_ratio = recipe.pop(LR_RATIO, None)
        if any(key in cli_values for key in SOURCE_KEYS):
            # A source typed on the command line replaces the recipe's, with the settings tied to it
            # (with --data-dir, --vocab-size states the size of the shards' tokenizer).
            tied = SOURCE_KEYS + SOURCE_SETTINGS + (("tokenizer.vocab_size",) if "data.data_dir" in recipe else ())
            recipe = {k: v for k, v in recipe.items() if k not in tied}
        for key, value in recipe.items():
            merged[key] = _coerce(index[key.split(".", 1)[1]][1], value, f"--config {recipe_path}")
    merged.update(cli_values)
    if lr_ratio is not None:
        _lr_end_from_ratio(merged, lr_ratio, recipe_path, recipe)

    cfg = Config(explicit=frozenset(merged))
    for key, value in merged.items():
        attr, name = key.split(".", 1)
        setattr(getattr(cfg, attr), name, value)
    _imply_trained_tokenizer(cfg)
    _apply_preset(cfg)
    _apply_target_params(cfg)
    validate(cfg)
    return cfg


def _lr_end_from_ratio(merged, ratio, recipe_path, recipe):
    """A recipe's `min_lr_ratio` (the MoE guide's key, kept as an alias of --lr-end) as
    merged["training.lr_end"]: that fraction of the final peak, unless --lr-end was typed."""
    if "training.lr_end" in recipe:
        raise UserError(f"--config {recipe_path}: `lr_end` and `min_lr_ratio` both set the end learning rate; "
                        f"keep only one")
    try:
        fraction = float(ratio) if not isinstance(ratio, bool) else math.nan
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0 <= fraction <= 1:
        raise UserError(f"--config {recipe_path}: `min_lr_ratio` {ratio!r} must lie between 0 and 1 (a fraction of "
                        f"the peak learning rate)")
    merged.setdefault("training.lr_end", fraction * merged.get("training.learning_rate", TrainingConfig.learning_rate))


def _imply_trained_tokenizer(cfg):
    """--vocab-size, --auto-vocab-size and the other tokenizer-training flags
    mean a trained tokenizer: the CLI guide's commands pass them without
    naming one (`--tokenizer sentencepiece` stays the explicit spelling)."""
    t = cfg.tokenizer
    if "tokenizer.tokenizer" in cfg.explicit or t.tokenizer_path or cfg.data.data_dir:
        return  # an explicit choice wins; a loaded tokenizer or shards bring their own (validation says so)
    if any(f"tokenizer.{name}" in cfg.explicit and getattr(t, name) is not False for name in IMPLY_TRAINED):
        t.tokenizer = "sentencepiece"


def _apply_preset(cfg):
    preset = cfg.model.model_preset
    if preset is None:
        return
    if preset not in sizing.SIZE_PRESETS:
        near = difflib.get_close_matches(preset, list(sizing.SIZE_PRESETS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UserError(
            f"unknown --model-preset {preset!r}{hint}; choose one of "
            f"{', '.join(sizing.SIZE_PRESETS)}, or a shipped recipe with --recipe NAME"
        )
    if "model.target_params" in cfg.explicit and cfg.model.target_params is not None:
        raise UserError(
            "--model-preset and --target-params both choose the model size; pass only one"
        )
    dims = dict(zip(("d_model", "num_layers", "num_heads", "d_ff"), sizing.SIZE_PRESETS[preset]))
    for name, value in dims.items():
        if f"model.{name}" not in cfg.explicit:
            setattr(cfg.model, name, value)


SIZED_BY_TARGET = ("d_model", "num_layers", "num_heads", "d_ff")


def vocab_size_of(tokenizer_cfg):
    """The vocab size a tokenizer config gives, known before any data is read.

    `byte`: 258; a trained tokenizer: --vocab-size; --tokenizer-path: read from
    the files there. With --auto-vocab-size the size is only known after
    training, so this raises `UserError` (the caller needs the size now;
    `target_params_pending` says when the model waits for it).
    """
    t = tokenizer_cfg
    from ultimate_trainer.data import tokenizers

    if t.tokenizer_path:
        return tokenizers.peek_vocab_size(t.tokenizer_path)
    if t.tokenizer == "byte":
        return tokenizers.ByteTokenizer.vocab_size
    if t.auto_vocab_size:
        raise UserError(
            "the vocab size is needed before the data is read, but --auto-vocab-size picks it after training "
            "the tokenizer; pass --vocab-size N instead (a dry run with --auto-vocab-size prints the size it picks)"
        )
    return t.vocab_size


def target_params_pending(cfg):
    """True when --target-params waits for --auto-vocab-size: the model is
    sized by `sized_for_vocab` once the tokenizer is trained."""
    t = cfg.tokenizer
    return (cfg.model.target_params is not None and t.auto_vocab_size and not t.tokenizer_path
            and t.tokenizer == "sentencepiece")


def sized_for_vocab(cfg, vocab_size):
    """`cfg` itself, or (when `target_params_pending`) a new `Config` whose
    model is sized for `vocab_size`, the size the trained tokenizer has.

    Example:
        cfg = sized_for_vocab(cfg, tokenizer.vocab_size)   # after --auto-vocab-size picked it
    """
    if not target_params_pending(cfg):
        return cfg
    model = dataclasses.replace(cfg.model, **_solve_target(cfg.model, vocab_size))
    return dataclasses.replace(cfg, model=model)


def planned_vocab_size(cfg):
    """The vocab size of a run, known before its data is read (`vocab_size_of`),
    where --data-dir gives it: the shards' tokenizer, or, before the shards
    exist, --vocab-size (a recipe states the size of the tokenizer its shards
    are made with).

    Example:
        planned_vocab_size(resolve_config({"run.recipe": "llama-1.36b"}))  # 32000
    """
    d = cfg.data.data_dir
    if d is None or cfg.tokenizer.tokenizer_path:
        return vocab_size_of(cfg.tokenizer)
    from ultimate_trainer.data import shards

    if shards.has_meta(d):
        return shards.read_meta(d)["tokenizer"]["vocab_size"]
    if "tokenizer.vocab_size" in cfg.explicit:
        return cfg.tokenizer.vocab_size
    raise UserError(
        f"--data-dir {d} holds no prepared shards yet, so the vocab size is unknown; make them with "
        f"`ultimate-trainer prepare-data --data-dir {d}`, or pass --vocab-size N (the size of their tokenizer)"
    )


def _apply_target_params(cfg):
    m = cfg.model
    if m.target_params is None:
        if m.prefer_depth:
            raise UserError("--prefer-depth only applies with --target-params N; add it or drop --prefer-depth")
        return
    _positive(m.target_params, "--target-params")
    given = [n for n in SIZED_BY_TARGET if f"model.{n}" in cfg.explicit]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"--target-params chooses {flag} itself; drop {flag} or drop --target-params")
    if target_params_pending(cfg):
        return  # sized once the tokenizer has chosen its vocab (sized_for_vocab)
    for name, value in _solve_target(m, planned_vocab_size(cfg)).items():
        setattr(m, name, value)


def _solve_target(m, vocab):
    """{d_model, num_layers, num_heads, d_ff} for --target-params at `vocab`."""
    solution = sizing.solve_target_params(
        m.target_params, vocab, m.seq_len, use_rope=m.use_rope, use_rmsnorm=m.use_rmsnorm,
        use_swiglu=m.use_swiglu, tie_embeddings=m.tie_embeddings, prefer_depth=m.prefer_depth, use_bias=m.use_bias,
    )
    if solution is None:
        embedding = sizing.count_params(vocab, 64, 0, 1, 64, m.seq_len, use_rope=m.use_rope,
                                        tie_embeddings=m.tie_embeddings).embedding
        raise UserError(
            f"--target-params {m.target_params:,} has no architecture within 2% for vocab {vocab:,} "
            f"(the embeddings alone take {embedding:,} at d_model 64); raise --target-params, "
            f"add --tie-embeddings or use a smaller vocab"
        )
    return {name: getattr(solution, name) for name in SIZED_BY_TARGET}


def _positive(value, flag, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"{flag} must be a positive number, got {value!r}")


def validate(cfg):
    """Checks the whole config once; raises `UserError` naming the bad value and the fix."""
    flags = {f.name: flag_name(f) for _, _, f in iter_fields()}

    for attr, _, f in iter_fields():
        value = getattr(getattr(cfg, attr), f.name)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UserError(f"{flags[f.name]} {value!r} is not one of {', '.join(choices)}")

    m, t, o = cfg.model, cfg.training, cfg.output
    for name in ("d_model", "num_layers", "num_heads", "d_ff", "seq_len"):
        _positive(getattr(m, name), flags[name])
    _positive(m.num_kv_heads, flags["num_kv_heads"], allow_none=True)
    if m.d_model % m.num_heads:
        divisors = [h for h in range(1, min(m.d_model, 64) + 1) if m.d_model % h == 0][-3:]
        raise UserError(
            f"--num-heads {m.num_heads} does not divide --d-model {m.d_model}; "
            f"pick heads so that d_model % heads == 0 (e.g. {', '.join(map(str, divisors))})"
        )
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        raise UserError(
            f"--num-kv-heads {m.num_kv_heads} does not divide --num-heads {m.num_heads}; "
            f"pick a divisor of {m.num_heads}"
        )
    if m.use_rope and (m.d_model // m.num_heads) % 2:
        raise UserError(
            f"head size {m.d_model // m.num_heads} (--d-model / --num-heads) must be even for "
            f"rotary embeddings; change --num-heads or pass --no-rope"
        )
    if not 0 <= m.dropout_rate < 1:
        raise UserError(f"--dropout-rate must be in [0, 1), got {m.dropout_rate}")
    if m.use_swiglu and "model.activation" in cfg.explicit and m.activation != "gelu":
        raise UserError(
            f"--activation {m.activation} applies to the plain MLP only; add --no-swiglu "
            f"(SwiGLU always gates with SiLU)"
        )

    _validate_ttt(m, cfg.explicit, flags, cfg.loader)
    _validate_moe(m, cfg.explicit, flags)
    if m.use_bias and len(set(sizing.ttt_block_indices(m.num_layers, m.ttt_layer_type, m.ttt_layers)) &
                          set(sizing.moe_block_indices(m.num_layers, m.num_experts, m.moe_every))) == m.num_layers:
        raise UserError(
            "--use-bias adds biases to attention and dense-MLP projections, but every block here has a TTT layer "
            "and MoE experts, which take none; drop --use-bias"
        )
    _positive(m.lora_rank, flags["lora_rank"])
    _positive(m.lora_alpha, flags["lora_alpha"], allow_none=True)
    if m.use_lora:
        from ultimate_trainer.models.lora import parse_targets

        parse_targets(m.lora_targets)
    elif {"model.lora_rank", "model.lora_alpha", "model.lora_targets"} & cfg.explicit:
        raise UserError("--lora-rank, --lora-alpha and --lora-targets need --use-lora; add it")
    if m.init_from is not None and not Path(m.init_from).is_dir():
        raise UserError(f"--init-from {m.init_from}: no such checkpoint directory")

    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "learning_rate"):
        _positive(getattr(t, name), flags[name])
    _positive(t.max_steps, flags["max_steps"], allow_none=True)
    _positive(t.peak_flops, flags["peak_flops"], allow_none=True)
    _positive(t.total_tokens, flags["total_tokens"], allow_none=True)
    if t.max_steps is not None and t.total_tokens is not None:
        raise UserError("--max-steps and --total-tokens both set the run length; pass only one")
    _positive(t.global_batch_size, flags["global_batch_size"], allow_none=True)
    if t.global_batch_size and "training.gradient_accumulation_steps" in cfg.explicit:
        raise UserError("--global-batch-size derives --gradient-accumulation-steps; pass only one of them")
    if t.device_batch_sizes is not None:
        if not t.global_batch_size:
            raise UserError("--device-batch-sizes picks the per-device batch for --global-batch-size; add it")
        parse_device_batch_sizes(t.device_batch_sizes)
    if t.global_batch_size:
        resolve_batch(t, 1)  # a global batch that one device cannot reach is wrong everywhere
    if t.optimizer not in ("adamw", "muon") and "training.weight_decay" in cfg.explicit and t.weight_decay:
        raise UserError(f"--weight-decay applies to --optimizer adamw and muon only, not {t.optimizer}; drop one of them")
    for name in ("weight_decay", "warmup_steps", "grad_clip", "skip_nonfinite"):
        if getattr(t, name) < 0:
            raise UserError(f"{flags[name]} must be zero or positive, got {getattr(t, name)}")
    if t.lr_end is not None and not 0 <= t.lr_end <= t.learning_rate:
        raise UserError(
            f"--lr-end {t.lr_end} must lie between 0 and --learning-rate {t.learning_rate}"
        )

    if cfg.output.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError(
            f"--wandb-project {cfg.output.wandb_project} needs the wandb package; pip install wandb, or drop the flag"
        )
    for name, what in (("wandb_run_name", "run"), ("wandb_entity", "entity")):
        if getattr(cfg.output, name) and not cfg.output.wandb_project:
            raise UserError(f"{flags[name]} names a W&B {what}; add --wandb-project PROJECT")
    if o.allow_changed_config is not None:
        if not o.resume_from:
            raise UserError("--allow-changed-config applies to --resume-from; add it, or drop --allow-changed-config")
        from ultimate_trainer.checkpoint.resume import parse_allowed

        parse_allowed(o.allow_changed_config)
    _validate_cloud(cfg.cloud, cfg.output.resume_from, flags)
    _validate_distribution(cfg.distribution)
    loader = cfg.loader
    _positive(loader.shuffle_buffer_size, flags["shuffle_buffer_size"])
    if loader.stride is not None and not 1 <= loader.stride <= m.seq_len:
        raise UserError(
            f"--stride {loader.stride} must lie between 1 and --seq-len {m.seq_len} (the step from one "
            f"window's start to the next; default --seq-len)"
        )
    _positive(loader.shard_tokens, flags["shard_tokens"])
    _positive(loader.num_workers, flags["num_workers"], allow_none=True)
    if cfg.data.data_dir is not None:
        if loader.tokenize_on_fly:
            raise UserError("--tokenize-on-fly streams from the sources, --data-dir reads shards; pass only one")
        if "loader.shuffle_buffer_size" in cfg.explicit:
            raise UserError(
                "--shuffle-buffer-size applies to streaming; shards (--data-dir) are shuffled over the whole epoch"
            )
        # --vocab-size states the size of the shards' tokenizer (checked when they are read).
        source_flags = [
            k for k in cfg.explicit
            if k.startswith(("data.", "tokenizer."))
            and k not in ("data.data_dir", "tokenizer.tokenizer_path", "tokenizer.vocab_size")
        ]
        if source_flags:
            name = source_flags[0].split(".", 1)[1]
            raise UserError(
                f"--{name.replace('_', '-')} does not apply with --data-dir: the shards already hold their "
                f"tokenized data and tokenizer; pass such flags to `prepare-data` instead"
            )
        # Whether the shards exist is checked when they are read: `cost`, `recipes` and a dry run plan without them.
    if not loader.use_streaming and cfg.data.data_dir is None:
        raise UserError(
            "--no-use-streaming reads pre-tokenized shards: add --data-dir DIR "
            "(make it with `ultimate-trainer prepare-data --data-dir DIR`)"
        )

    _positive(o.save_total_limit, flags["save_total_limit"], allow_none=True)
    _positive(o.milestone_every, flags["milestone_every"], allow_none=True)
    for name in ("log_every", "save_every", "eval_every"):
        _positive(getattr(o, name), flags[name])
    _positive(o.eval_steps, flags["eval_steps"], allow_none=True)
    if o.sample_tokens < 0:
        raise UserError(f"--sample-tokens must be zero (no samples) or positive, got {o.sample_tokens}")
    if not o.eval_enabled:
        given = [flags[n] for n in ("eval_every", "eval_steps") if f"output.{n}" in cfg.explicit]
        if given:
            raise UserError(f"{given[0]} schedules validation, which --no-eval turns off; drop one of them")
    if not o.output_dir:
        raise UserError("--output-dir must not be empty")
    d = cfg.data
    _positive(d.max_train_examples, flags["max_train_examples"], allow_none=True)
    _positive(d.max_val_examples, flags["max_val_examples"], allow_none=True)
    if not 0 < d.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {d.val_fraction}")
    _validate_data(cfg.data, cfg.explicit, flags)
    if d.data_dir is not None and "tokenizer.vocab_size" in cfg.explicit:
        _positive(cfg.tokenizer.vocab_size, flags["vocab_size"])
        _validate_tokenizer(cfg.tokenizer, cfg.explicit - {"tokenizer.vocab_size"}, flags)
    else:
        _validate_tokenizer(cfg.tokenizer, cfg.explicit, flags)
    if cfg.run.json and not (cfg.run.dry_run or cfg.run.eval_only):
        raise UserError("--json only applies to --dry-run and --eval-only; add one of them")
    if cfg.run.eval_only and not (m.init_from or o.resume_from):
        raise UserError("--eval-only needs the checkpoint to evaluate: add --init-from CHECKPOINT")


def parse_device_batch_sizes(text):
    """`"1:16,4:32"` -> {1: 16, 4: 32}.

    Example:
        >>> parse_device_batch_sizes("1:16,4:32")
        {1: 16, 4: 32}
    """
    table = {}
    for item in str(text).split(","):
        try:
            devices, batch = (int(v) for v in item.split(":"))
        except ValueError:
            devices = batch = 0
        if devices < 1 or batch < 1:
            raise UserError(
                f"--device-batch-sizes {text!r}: give DEVICES:BATCH pairs separated by commas, e.g. 1:16,4:32"
            )
        table[devices] = batch
    return table


def resolve_batch(training_cfg, data_parallel):
    """Per-device batch and accumulation for `data_parallel` devices, as
    --global-batch-size and --device-batch-sizes ask; sets them on
    `training_cfg` and returns a line saying how, or None without
    --global-batch-size.

    Example (the TTT recipes: global 256, `1:16,2:16,4:32,8:32`): 8 devices
    -> 32 x 1, 4 -> 32 x 2, 2 -> 16 x 8, 1 -> 16 x 16.
    """
    t = training_cfg
    if not t.global_batch_size:
        return None
    if t.device_batch_sizes:
        table = parse_device_batch_sizes(t.device_batch_sizes)
        fitting = [d for d in table if d <= data_parallel]
        t.batch_size = table[max(fitting)] if fitting else table[min(table)]
    per_step = t.batch_size * data_parallel
    if t.global_batch_size % per_step:
        raise UserError(
            f"--global-batch-size {t.global_batch_size} is not a multiple of --batch-size {t.batch_size} x "
            f"{data_parallel} data-parallel device(s) = {per_step}; pick a global batch that is, or change --batch-size"
        )
    t.gradient_accumulation_steps = t.global_batch_size // per_step
    return (f"global batch {t.global_batch_size} = {t.batch_size} per device x {data_parallel} device(s) x "
            f"{t.gradient_accumulation_steps} accumulation steps")


def ttt_kind(model_cfg):
    """`linear`, `mlp` or None: --ttt-layer-type without the recipes' `ttt_` prefix."""
    kind = model_cfg.ttt_layer_type
    return kind[4:] if kind and kind.startswith("ttt_") else kind


def _validate_ttt(m, explicit, flags, loader):
    others = ("ttt_layers", "ttt_mini_batch_size", "ttt_base_lr", "ttt_use_gate", "ttt_share_qk", "ttt_backbone",
              "state_passing")
    if not m.ttt_layer_type:
        given = [flags[n] for n in others if f"model.{n}" in explicit and getattr(m, n) not in (None, False)]
        if given:
            raise UserError(f"{given[0]} configures TTT layers; add --ttt-layer-type linear|mlp")
        return
    if m.ttt_backbone == "mamba":
        m.ttt_share_qk = m.ttt_use_gate = True
    if m.state_passing:
        if m.seq_len % m.ttt_mini_batch_size:
            raise UserError(
                f"--state-passing needs --seq-len ({m.seq_len}) to be a multiple of --ttt-mini-batch-size "
                f"({m.ttt_mini_batch_size}), so each window ends on a whole inner step; "
                f"try --seq-len {m.seq_len // m.ttt_mini_batch_size * m.ttt_mini_batch_size or m.ttt_mini_batch_size}"
            )
        if loader.stride not in (None, m.seq_len):
            raise UserError(
                f"--stride {loader.stride}: --state-passing reads each stream contiguously (each window starts "
                f"at the previous window's last target, stride --seq-len); drop --stride"
            )
    _positive(m.ttt_mini_batch_size, flags["ttt_mini_batch_size"])
    _positive(m.ttt_base_lr, flags["ttt_base_lr"], allow_none=True)
    if m.ttt_layers is not None:
        try:
            indices = [int(i) for i in str(m.ttt_layers).split(",") if i.strip()]
        except ValueError:
            indices = None
        if not indices or any(not 0 <= i < m.num_layers for i in indices):
            raise UserError(
                f"--ttt-layers {m.ttt_layers!r}: give comma-separated block indices from 0 to {m.num_layers - 1}"
            )
    if (m.d_model // m.num_heads) % 2:
        raise UserError(
            f"head size {m.d_model // m.num_heads} must be even: TTT layers apply RoPE within each mini-batch; "
            f"change --num-heads"
        )
    if m.use_lora:
        raise UserError("--use-lora targets attention projections and cannot be combined with --ttt-layer-type yet")


def _validate_moe(m, explicit, flags):
    others = ("experts_top_k", "moe_every", "capacity_factor", "router_aux_loss_coef", "router_z_loss_coef")
    if m.num_experts is None or m.num_experts < 0:
        raise UserError(f"--num-experts must be zero (dense) or positive, got {m.num_experts}")
    if not m.num_experts:
        given = [flags[n] for n in others if f"model.{n}" in explicit]
        if given:
            raise UserError(f"{given[0]} configures mixture-of-experts layers; add --num-experts N")
        return
    if not 1 <= m.experts_top_k <= m.num_experts:
        raise UserError(
            f"--experts-top-k {m.experts_top_k} must lie between 1 and --num-experts {m.num_experts}"
        )
    if not 1 <= m.moe_every <= m.num_layers:
        raise UserError(
            f"--moe-every {m.moe_every} must lie between 1 and --num-layers {m.num_layers} "
            f"(every k-th block is MoE)"
        )
    for name in ("capacity_factor", "router_aux_loss_coef", "router_z_loss_coef"):
        if getattr(m, name) < 0:
            raise UserError(f"{flags[name]} must be zero or positive, got {getattr(m, name)}")
    if m.use_lora:
        from ultimate_trainer.models.lora import parse_targets

        ffn = [t for t in parse_targets(m.lora_targets) if t in ("up", "down")]
        if ffn:
            raise UserError(
                f"--lora-targets {ffn[0]} adapts the dense MLP, which MoE blocks replace with experts; "
                f"use --lora-targets qkv,out with --num-experts"
            )


def _validate_distribution(d):
    from ultimate_trainer import distribution

    if d.mesh is not None:
        if d.distribution in ("auto", "none"):
            raise UserError(f"--mesh {d.mesh} lays out --distribution data, fsdp or model; add one of them")
        distribution.parse_mesh(d.mesh)
    if d.num_processes is not None and d.num_processes < 1:
        raise UserError(f"--num-processes must be a positive number, got {d.num_processes}")
    distribution.cluster_settings(d)


def _validate_cloud(c, resume_from, flags):
    if bool(c.cloud_provider) != bool(c.cloud_bucket):
        given, missing = ("cloud_provider", "cloud_bucket") if c.cloud_provider else ("cloud_bucket", "cloud_provider")
        raise UserError(f"{flags[given]} needs {flags[missing]} too (uploads go to PROVIDER + BUCKET)")
    from_azure = str(resume_from or "").startswith(("az://", "https://"))
    if c.cloud_provider != "azure" and not from_azure:
        for name in ("azure_sas_token", "azure_account_name"):
            if getattr(c, name):
                raise UserError(f"{flags[name]} applies to --cloud-provider azure (or an az:// --resume-from) only")
    if c.cloud_region and c.cloud_provider == "azure":
        raise UserError(
            f"{flags['cloud_region']} does not apply to --cloud-provider azure: an Azure storage account, not a "
            f"container, has a region (chosen when the account is created); drop the flag"
        )
    if c.cloud_region and not c.cloud_provider and not str(resume_from or "").startswith("s3://"):
        raise UserError(
            f"{flags['cloud_region']} applies to uploads (--cloud-provider s3 or gcs) and to an s3:// --resume-from "
            f"only; drop it or add --cloud-provider"
        )
    if c.azure_sas_token:
        from ultimate_trainer.checkpoint.cloud import sas_token_problem

        problem = sas_token_problem(c.azure_sas_token)
        if problem:
            raise UserError(f"{flags['azure_sas_token']} {problem}")
    if c.cloud_upload_wait < 0:
        raise UserError(f"{flags['cloud_upload_wait']} must be zero or positive, got {c.cloud_upload_wait}")
    if c.cloud_endpoint_url and not c.cloud_endpoint_url.startswith(("http://", "https://")):
        raise UserError(f"--cloud-endpoint-url {c.cloud_endpoint_url!r}: give a URL, e.g. http://127.0.0.1:9000")


def _validate_data(d, explicit, flags):
    from ultimate_trainer.data import sources

    if d.dataset_id and d.data_files:
        raise UserError("--dataset-id and --data-files both choose the data; pass only one")
    if not d.dataset_id:
        defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
        for name in ("dataset_config", "split", "val_split"):
            if f"data.{name}" in explicit and getattr(d, name) != defaults[name]:
                raise UserError(
                    f"{flags[name]} applies to --dataset-id only; local files and the default data hold out "
                    f"a slice by --val-fraction instead"
                )
    if d.val_split is not None and d.val_split == d.split:
        raise UserError(f"--val-split {d.val_split} is also the training --split; validate on another split")
    if not d.text_column:
        raise UserError("--text-column must not be empty")
    if d.data_files:
        sources.resolve_data_files(d.data_files)


# Flags that only mean something when a tokenizer is trained here.
TRAINING_FLAGS = ("tokenizer_model", "auto_vocab_size", "vocab_size", "min_vocab_size", "max_vocab_size",
                  "tokenizer_train_examples", "retrain_tokenizer")
# Of those, the ones that ask for a trained tokenizer by themselves (the CLI guide's usage).
IMPLY_TRAINED = ("vocab_size", "auto_vocab_size", "tokenizer_train_examples", "tokenizer_model")


def _validate_tokenizer(t, explicit, flags):
    from ultimate_trainer.data import tokenizers

    given = [name for name in TRAINING_FLAGS if f"tokenizer.{name}" in explicit and getattr(t, name) is not False]
    if t.tokenizer_path:
        if given:
            raise UserError(
                f"{flags[given[0]]} trains a tokenizer, but --tokenizer-path loads one; drop one of them"
            )
        if "tokenizer.tokenizer" in explicit and t.tokenizer == "byte":
            raise UserError("--tokenizer byte needs no file; drop --tokenizer-path, or drop --tokenizer byte")
        tokenizers.peek_vocab_size(t.tokenizer_path)  # exists and is a tokenizer
        return
    if t.tokenizer != "sentencepiece":
        if given:
            raise UserError(f"{flags[given[0]]} applies to a trained tokenizer; add --tokenizer sentencepiece")
        return
    for name in ("vocab_size", "min_vocab_size", "max_vocab_size", "tokenizer_train_examples"):
        _positive(getattr(t, name), flags[name])
    if t.auto_vocab_size:
        if "tokenizer.vocab_size" in explicit:
            raise UserError("--vocab-size and --auto-vocab-size both set the vocab size; pass only one")
        if t.min_vocab_size > t.max_vocab_size:
            raise UserError(
                f"--min-vocab-size {t.min_vocab_size} is above --max-vocab-size {t.max_vocab_size}; swap or fix them"
            )
        low, low_flag = t.min_vocab_size, "--min-vocab-size"
    else:
        if {"tokenizer.min_vocab_size", "tokenizer.max_vocab_size"} & explicit:
            raise UserError("--min-vocab-size and --max-vocab-size bound --auto-vocab-size; add it or drop them")
        low, low_flag = t.vocab_size, "--vocab-size"
    if low <= tokenizers.SP_MIN_VOCAB:
        raise UserError(
            f"{low_flag} {low} leaves no room for learned pieces: a trained tokenizer holds "
            f"{tokenizers.SP_MIN_VOCAB} fixed ids (4 special, 256 bytes) first; use a few hundred more"
        )


def write_json(cfg, path):
    """Writes the resolved config (secrets redacted) atomically."""
    text = json.dumps(cfg.to_dict(redact=True), indent=2, sort_keys=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)

