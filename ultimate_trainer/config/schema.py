"""The run's schema: one frozen dataclass per flag group, and the `RunSpec` that holds them.

Every field carries its own flag, help text and default in its metadata, so
the argparse parser (`cli.py`), YAML recipes, `training_args.json` and
`--help` all come from this one place. The sections are frozen: a resolved
spec is never changed; what follows from it is in `derived.Derived`.

Example:
    >>> spec = RunSpec(model=ModelConfig(d_model=256))
    >>> spec.to_dict()["model"]["d_model"]
    256
"""

import dataclasses
import json
import os
from pathlib import Path

from ultimate_trainer.config.parsers import count

REDACTED = "***REDACTED***"

# --model-preset name -> (d_model, num_layers, num_heads, d_ff)
SIZE_PRESETS = {
    "nano": (128, 6, 4, 512),
    "tiny": (256, 8, 8, 1024),
    "small": (512, 12, 8, 2048),
    "medium": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "xlarge": (1280, 32, 20, 5120),
}
SIZED_BY_PRESET = ("d_model", "num_layers", "num_heads", "d_ff")
# Fields renamed to read like their flags (--no-rope, --no-rmsnorm, --no-swiglu, --no-eval) -> their new
# names: recipes and the training_args.json of older runs still say the old ones.
RENAMED = {"model.use_rope": "model.rope", "model.use_rmsnorm": "model.rmsnorm", "model.use_swiglu": "model.swiglu",
           "output.eval_enabled": "output.eval"}


def _opt(default, help, **meta):
    """A config field; `meta` holds the flag spelling, type, choices, etc."""
    meta["help"] = help
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from (--dataset-id, --data-files, --data-dir) and how it is split.

    Example:
        DataConfig(data_files="corpus/*.jsonl", val_fraction=0.01)
    """

    dataset_id: str = _opt(None, "Hugging Face dataset id (streamed; needs network), the directory of a downloaded copy, or tfds:NAME[/CONFIG][:VERSION] (with --tfds-data-dir).", type=str)
    dataset_config: str = _opt(None, "Dataset configuration name (e.g. `en` for C4); with --dataset-id.", type=str)
    text_column: str = _opt("text", "Column (field, feature) that holds the text.")
    split: str = _opt("train", "Split to train on; with --dataset-id.")
    val_split: str = _opt(None, "Split to validate on, with --dataset-id; without it a deterministic slice of the training data is held out.", type=str)
    max_train_examples: int = _opt(None, "Use at most this many training records.", type=int)
    max_val_examples: int = _opt(None, "Use at most this many validation records.", type=int)
    data_files: str = _opt(None, "Local file, directory (recursive) or glob: .txt, .jsonl, .json, .parquet, .csv, .tfrecord (docs/data.md).", type=str)
    val_fraction: float = _opt(0.05, "Share of records held out for validation when there is no --val-split.")
    data_dir: str = _opt(None, "Train on pre-tokenized shards made by `ultimate-trainer prepare-data` (read by memmap).", type=str)
    data_mix: str = _opt(None, "Train on a weighted mixture of sources, SRC:W,SRC:W (each SRC a --dataset-id form or a file glob; recipe: `data.mix: [{source: S, weight: W}]`); drawn deterministically, resumable exactly (docs/data.md).", type=str, metavar="SRC:W,SRC:W")
    tfds_data_dir: str = _opt(None, "Directory (or gs:// path) of prepared TFDS datasets, for --dataset-id tfds:NAME[/CONFIG][:VERSION].", type=str)
    eval_tokens: int = _opt(None, "Bound the validation set by tokens: its first records until they hold this many tokens (read once and kept; with --max-val-examples, whichever comes first). A streamed source without this or --max-val-examples: 256 x --seq-len.", type=int)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """The tokenizer: bytes, a SentencePiece model trained on the data, or one loaded from --tokenizer-path.

    Example:
        TokenizerConfig(tokenizer="sentencepiece", vocab_size=8000)
    """

    tokenizer: str = _opt("byte", "Tokenizer kind. `byte`: 256 byte ids plus EOS and PAD, no training; `sentencepiece`: trained on the data.", choices=["byte", "sentencepiece"])
    tokenizer_model: str = _opt("bpe", "SentencePiece algorithm for --tokenizer sentencepiece.", choices=["bpe", "unigram"])
    auto_vocab_size: bool = _opt(False, "Pick the vocab size from the data: the smallest size on a doubling grid whose next size saves < 3%% of held-out tokens (docs/data.md).")
    vocab_size: int = _opt(16000, "Vocab size of a trained tokenizer.")
    min_vocab_size: int = _opt(5000, "Lower bound for --auto-vocab-size.")
    max_vocab_size: int = _opt(50000, "Upper bound for --auto-vocab-size.")
    tokenizer_train_examples: int = _opt(10000, "Records used to train the tokenizer.")
    retrain_tokenizer: bool = _opt(False, "Train a new tokenizer even if the output dir holds one.")
    tokenizer_path: str = _opt(None, "Existing tokenizer: a SentencePiece .model, a dir with vocab.json + merges.txt, or a run's output dir.", type=str)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture: sizes (or a preset / --target-params), block options, LoRA, TTT and MoE.

    Example:
        ModelConfig(d_model=256, num_layers=4, num_heads=4, d_ff=1024)
    """

    model_preset: str = _opt(None, "Size preset: " + ", ".join(SIZE_PRESETS) + ".", type=str, metavar="|".join(SIZE_PRESETS))
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
    rmsnorm: bool = _opt(True, "Use LayerNorm instead of RMSNorm.", flag="--no-rmsnorm")
    swiglu: bool = _opt(True, "Use a plain MLP with --activation instead of SwiGLU.", flag="--no-swiglu")
    rope: bool = _opt(True, "Use learned absolute positions instead of rotary embeddings.", flag="--no-rope")
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


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The optimization: batch, run length, learning-rate schedule, optimizer and seed.

    Example:
        TrainingConfig(batch_size=8, max_steps=100, learning_rate=3e-4)
    """

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


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How windows are cut from the token stream and fed to the model.

    Example:
        LoaderConfig(stride=128, shuffle_buffer_size=1000)
    """

    # Not in --help: text sources are always streamed, so these two only restate the default. They stay
    # accepted for the CLI guide's command lines and the MoE guide's YAML, and the plan says they change nothing.
    use_streaming: bool = _opt(True, "Stream and tokenize the text sources while training (always so); --no-use-streaming means --data-dir shards.", flag="--use-streaming", boolean_optional=True, hidden=True)
    shuffle_buffer_size: int = _opt(10000, "Windows held in the shuffle buffer.")
    stride: int = _opt(None, "Sequence stride: tokens from one training window's start to the next (default: --seq-len, so each window's first input is the previous window's last target; smaller overlaps windows).", type=int)
    tokenize_on_fly: bool = _opt(False, "Tokenize the sources while training (always so without --data-dir); excludes --data-dir.", hidden=True)
    shard_tokens: int = _opt(100_000_000, "prepare-data: tokens per shard file.", type=count)
    num_workers: int = _opt(None, "Threads of the input pipeline (tf.data's private thread pool; default: tf.data's own choice).", type=int)


@dataclasses.dataclass(frozen=True)
class OptimizationConfig:
    """Compute precision (the default follows the device: `Derived.use_mixed_precision`).

    Example:
        OptimizationConfig(use_mixed_precision=True)
    """

    use_mixed_precision: bool = _opt(False, "bfloat16 compute with float32 weights (default: on for a GPU or TPU that has bfloat16, off on CPU; --no-use-mixed-precision forces float32).", boolean_optional=True)


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """Devices, mesh and processes (distribution.py).

    Example:
        DistributionConfig(distribution="fsdp", mesh="batch=4")
    """

    distribution: str = _opt("auto", "How to spread training over devices (docs/distributed.md): `data` replicates the model and splits each batch; `fsdp` also splits every weight over the batch axis; `model` splits weights over the model axis of --mesh (tensor, expert and head parallelism); `auto`: data over all devices when there are several (jax; tensorflow: several GPUs), else one device; `none`: one device.", choices=["auto", "none", "data", "fsdp", "model"])
    mesh: str = _opt(None, "Device mesh for --distribution data/fsdp/model, e.g. batch=2,model=4 (an axis left out takes the remaining devices; default: all devices on batch, or on model for --distribution model).", type=str, metavar="batch=B,model=M")
    coordinator_address: str = _opt(None, "Multi-process run: HOST:PORT of process 0, the same on every process (or KERAS_DISTRIBUTION_JOB_ADDRESSES); jax only.", type=str, metavar="HOST:PORT")
    num_processes: int = _opt(None, "Multi-process run: number of processes (or KERAS_DISTRIBUTION_NUM_PROCESSES).", type=int)
    process_id: int = _opt(None, "Multi-process run: this process's id, 0 to --num-processes - 1 (or KERAS_DISTRIBUTION_PROCESS_ID); process 0 writes logs and checkpoints.", type=int)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """The output dir, logging, checkpoints, validation, resume and W&B.

    Example:
        OutputConfig(output_dir="runs/a", save_every=500)
    """

    output_dir: str = _opt("output_ultimate", "Where the run writes checkpoints, logs and its config.")
    log_every: int = _opt(10, "Optimizer steps between progress lines and metrics.jsonl records.")
    save_every: int = _opt(1000, "Optimizer steps between checkpoints.")
    save_total_limit: int = _opt(None, "Keep only the newest K checkpoint-<step> dirs (milestones, best_checkpoint and final_model are kept).", type=int)
    milestone_every: int = _opt(None, "Optimizer steps between milestone-<step> checkpoints, which are never deleted.", type=int)
    eval_every: int = _opt(500, "Optimizer steps between validation passes.")
    eval_steps: int = _opt(None, "Validation batches per pass (default: the whole validation set).", type=int)
    eval: bool = _opt(True, "Do not validate (no validation passes, no best_checkpoint).", flag="--no-eval")
    resume_from: str = _opt(None, "Resume exactly from a checkpoint dir, a run dir (its newest valid checkpoint), `latest` (in --output-dir), or an s3:// gs:// az:// URI of a checkpoint or a prefix (downloaded into <output-dir>/remote-checkpoints/).", type=str)
    allow_changed_config: str = _opt(None, "With --resume-from, let these settings differ from the checkpoint's, comma-separated: max_steps (also --total-tokens, --epochs), lr, lr_end (also min_lr_ratio), warmup, weight_decay, grad_clip, precision, dropout, aux_loss, z_loss; flag names work too. A changed schedule continues from the checkpoint's learning rate, without a jump. Without it a resume refuses any setting that would change the run (docs/checkpoints.md).", type=str, metavar="NAMES")
    overwrite: bool = _opt(False, "Start afresh in an output dir that holds a run; the old run is moved to <output-dir>/previous-runs/, never deleted.")
    tensorboard: bool = _opt(True, "Write TensorBoard logs to <output-dir>/tensorboard.", boolean_optional=True)
    sample_tokens: int = _opt(200, "Tokens sampled from the trained model for each of the end-of-run samples (samples.txt); 0 writes none.")
    wandb_project: str = _opt(None, "Log to this Weights & Biases project (needs `pip install wandb`; WANDB_MODE=offline works without network).", type=str)
    wandb_run_name: str = _opt(None, "W&B run name (default: the output dir's name).", type=str)
    wandb_entity: str = _opt(None, "W&B entity (team or user) that owns the project (default: your W&B default entity).", type=str)


@dataclasses.dataclass(frozen=True)
class CloudConfig:
    """Checkpoint uploads to S3, GCS or Azure (checkpoint/cloud.py).

    Example:
        CloudConfig(cloud_provider="s3", cloud_bucket="ckpts")
    """

    cloud_provider: str = _opt(None, "Upload checkpoints (checkpoint-<step>, milestones, best_checkpoint, final_model) to this provider, in the background, after a preflight write before training.", type=str, choices=["s3", "gcs", "azure"])
    cloud_bucket: str = _opt(None, "Bucket (S3/GCS) or container (Azure) to upload to.", type=str)
    cloud_region: str = _opt(None, "The bucket's region. S3: the client's region (default: the SDK's configuration), checked against the bucket's; GCS: checked against the bucket's location; not for Azure (its storage account has the region).", type=str)
    cloud_prefix: str = _opt(None, "Key prefix inside the bucket (default: the output dir's name).", type=str)
    cloud_endpoint_url: str = _opt(None, "Endpoint of an S3/GCS/Azure-compatible service or emulator (default: the provider's; the SDKs' own variables such as AWS_ENDPOINT_URL and STORAGE_EMULATOR_HOST also work).", type=str)
    cloud_upload_wait: float = _opt(600.0, "Seconds to keep retrying uploads that failed with a transient error when training ends or is interrupted (a permanent error ends the wait; checkpoints not uploaded stay local).")
    azure_sas_token: str = _opt(None, "Azure SAS token (better: AZURE_STORAGE_SAS_TOKEN in the environment); never logged.", type=str, secret=True)
    azure_account_name: str = _opt(None, "Azure storage account name (or AZURE_STORAGE_ACCOUNT).", type=str)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What this invocation does: backend, recipe, dry run, evaluation only.

    Example:
        RunConfig(dry_run=True, json=True)
    """

    backend: str = _opt(None, "Keras backend. auto: jax when a flag needs keras.distribution (--distribution fsdp or model, several processes), else the fastest measured for the devices found and the precision (on this project's CPU tensorflow in float32, torch in bfloat16; jax on TPU and GPU; docs/benchmarks.md); the choice and its reason are printed. Default: $KERAS_BACKEND when set, else auto.", type=str, choices=["auto", "jax", "torch", "tensorflow"])
    config: str = _opt(None, "YAML recipe; flags on the command line override it.", type=str, metavar="RECIPE.yaml")
    recipe: str = _opt(None, "A shipped recipe by name, e.g. ttt-125m (`ultimate-trainer recipes` lists them); flags on the command line override it, as with --config.", type=str, metavar="NAME")
    dry_run: bool = _opt(False, "Resolve everything, print the plan and exit without training.")
    json: bool = _opt(False, "With --dry-run or --eval-only: print the result as one JSON object.")
    eval_only: bool = _opt(False, "Evaluate the checkpoint of --init-from (or --resume-from) on the validation data and exit.")
    verbose: bool = _opt(False, "Show the frameworks' own start-up logs (absl, oneDNN, CUDA probes), hidden by default.")


# (attribute on RunSpec, argparse group title, section class)
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


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The resolved settings of a run, one frozen section per flag group.

    Made by `resolve_config` (or `RunSpec.from_dict` for a saved run); a value
    that follows from the settings is a field of `Derived`, and a spec for other
    settings is a new one (`dataclasses.replace`), never this one changed.

    Example:
        >>> spec = RunSpec(training=TrainingConfig(batch_size=8))
        >>> spec.training.batch_size, spec.model.d_model
        (8, 512)
    """

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

    @classmethod
    def from_dict(cls, data, explicit=frozenset()):
        """A spec from `to_dict`'s shape; keys it does not know (an older or newer
        run's) are skipped, and missing ones keep their defaults.

        Example:
            >>> RunSpec.from_dict({"model": {"d_model": 64, "gone": 1}}).model.d_model
            64
        """
        data = {attr: dict(values) for attr, values in data.items() if isinstance(values, dict)}
        for old_key, new_key in RENAMED.items():  # a run saved before the rename
            (attr, old_name), (_, new_name) = old_key.split("."), new_key.split(".")
            if old_name in data.get(attr, {}):
                data[attr].setdefault(new_name, data[attr].pop(old_name))
        sections = {}
        for attr, _, section_cls in SECTIONS:
            names = {f.name for f in dataclasses.fields(section_cls)}
            given = data.get(attr, {})
            sections[attr] = section_cls(**{k: v for k, v in given.items() if k in names})
        return cls(**sections, explicit=frozenset(explicit))


# The name the package used before the spec was frozen; the same class.
Config = RunSpec


def iter_fields():
    """Yields (section attr, group title, dataclasses.Field) for every option."""
    for attr, title, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            yield attr, title, f


def flag_name(f):
    """The command-line flag of a field: its `flag` metadata, else --field-name."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_index():
    """{field name: (section attr, dataclasses.Field)}: field names are unique across sections."""
    return {f.name: (attr, f) for attr, _, f in iter_fields()}


def write_json(cfg, path):
    """Writes the resolved config (secrets redacted) atomically."""
    text = json.dumps(cfg.to_dict(redact=True), indent=2, sort_keys=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
