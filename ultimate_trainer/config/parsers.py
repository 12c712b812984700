"""Pure parsers of flag values: counts, meshes, cluster settings, LoRA
targets, TTT kinds and layers, per-device batch tables, SAS tokens.

They read only their arguments (and, for the cluster, the environment
mapping given), so validation, `distribution`, `models` and `checkpoint`
share one reading of each flag.

Example:
    >>> parse_mesh("batch=2,model=4")
    {'batch': 2, 'model': 4}
"""

import math
import os
import re
from urllib.parse import parse_qs

from ultimate_trainer.errors import UserError

BATCH, MODEL = "batch", "model"  # the mesh axes
# Keras' own variables for the cluster (keras.distribution.initialize reads them too).
ENV_ADDRESS = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
ENV_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
# --lora-targets names; models/lora.py maps each to its projection.
LORA_TARGETS = ("qkv", "out", "up", "down")


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


def parse_mesh(text):
    """`--mesh` text -> {axis: size}; axes `batch` and `model`.

    Example:
        >>> parse_mesh("batch=2,model=4")
        {'batch': 2, 'model': 4}
    """
    mesh = {}
    for item in str(text).split(","):
        name, _, size = item.strip().partition("=")
        if name not in (BATCH, MODEL) or not size.strip().isdigit() or int(size) < 1 or name in mesh:
            raise UserError(
                f"--mesh {text!r}: give AXIS=SIZE pairs for the axes batch and model, e.g. batch=2,model=4"
            )
        mesh[name] = int(size)
    return mesh


def cluster_settings(dist_cfg, environ=None):
    """(coordinator address, number of processes, this process's id) from the
    flags, each falling back to Keras' variables (KERAS_DISTRIBUTION_JOB_ADDRESSES,
    KERAS_DISTRIBUTION_NUM_PROCESSES, KERAS_DISTRIBUTION_PROCESS_ID); None for a
    single-process run.

    Example:
        >>> from ultimate_trainer.config import DistributionConfig
        >>> cluster_settings(DistributionConfig(coordinator_address="10.0.0.1:1234",
        ...                                     num_processes=2, process_id=1), environ={})
        ('10.0.0.1:1234', 2, 1)
    """
    environ = os.environ if environ is None else environ
    address = dist_cfg.coordinator_address or environ.get(ENV_ADDRESS) or None
    processes, process_id = dist_cfg.num_processes, dist_cfg.process_id
    try:
        if processes is None and environ.get(ENV_PROCESSES):
            processes = int(environ[ENV_PROCESSES])
        if process_id is None and environ.get(ENV_PROCESS_ID):
            process_id = int(environ[ENV_PROCESS_ID])
    except ValueError:
        raise UserError(f"{ENV_PROCESSES} and {ENV_PROCESS_ID} must be whole numbers") from None
    if address is None and process_id is None and processes in (None, 1):
        return None
    needed = {"--coordinator-address (or " + ENV_ADDRESS + ")": address,
              "--num-processes (or " + ENV_PROCESSES + ")": processes,
              "--process-id (or " + ENV_PROCESS_ID + ")": process_id}
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise UserError(f"a multi-process run needs {', '.join(missing)} as well; give all three on every process")
    if processes < 1 or not 0 <= process_id < processes:
        raise UserError(f"--process-id {process_id} must lie between 0 and --num-processes {processes} - 1")
    return address, processes, process_id


def parse_lora_targets(text):
    """'qkv,out' -> ('qkv', 'out'), checked against `LORA_TARGETS`.

    Example:
        >>> parse_lora_targets("qkv, down")
        ('qkv', 'down')
    """
    names = tuple(t.strip() for t in str(text).split(",") if t.strip())
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise UserError(
            f"--lora-targets {text!r}: unknown target {unknown[0] if unknown else '(none)'!r}; "
            f"use a comma-separated subset of {', '.join(LORA_TARGETS)}"
        )
    return names


def ttt_kind(model_cfg):
    """`linear`, `mlp` or None: --ttt-layer-type without the recipes' `ttt_` prefix.

    Example:
        >>> from ultimate_trainer.config import ModelConfig
        >>> ttt_kind(ModelConfig(ttt_layer_type="ttt_mlp"))
        'mlp'
    """
    kind = model_cfg.ttt_layer_type
    return kind[4:] if kind and kind.startswith("ttt_") else kind


def ttt_block_indices(num_layers, ttt_layer_type, ttt_layers=None):
    """The block indices that hold a TTT layer: `ttt_layers` ("0,2,4" or a
    list), or every block when it is None; none without `ttt_layer_type`.

    Example:
        >>> ttt_block_indices(4, "linear", "2,0")
        (0, 2)
    """
    if not ttt_layer_type:
        return ()
    if ttt_layers is None or ttt_layers == "":
        return tuple(range(num_layers))
    if isinstance(ttt_layers, str):
        ttt_layers = [int(i) for i in ttt_layers.split(",") if i.strip()]
    return tuple(sorted(set(int(i) for i in ttt_layers)))


def moe_block_indices(num_layers, num_experts, moe_every=1):
    """The blocks with an MoE feed-forward layer: every `moe_every`-th block,
    counting from 1 (blocks 1, 3, 5, ... for 2); none without experts.

    Example:
        >>> moe_block_indices(6, 8, 2)
        (1, 3, 5)
    """
    if not num_experts:
        return ()
    return tuple(i for i in range(num_layers) if (i + 1) % moe_every == 0)


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


def sas_token_problem(token):
    """Why `token` cannot be an Azure SAS token, or None when it looks like one. Never quotes it.

    Example:
        >>> sas_token_problem("sv=2024-08-04&sp=rw&sig=abc%3D") is None
        True
    """
    fields = parse_qs(token.strip().lstrip("?"), keep_blank_values=True)
    missing = [name for name in ("sv", "sig") if not fields.get(name, [""])[0]]
    if missing:
        why = f"it has no {' and no '.join(f'{m}=' for m in missing)} field"
    elif not all(re.fullmatch(r"[a-z]+", name) for name in fields):  # SAS field names are all like sv, sp, sig
        why = "it holds more than the token's fields (a URL, or other text)"
    else:
        return None
    return (f"is not a SAS token: {why}; pass the query string Azure generates (sv=...&...&sig=...), without the "
            f"URL before it")


TFDS_PREFIX = "tfds:"


def parse_tfds_id(text):
    """`"tfds:NAME[/CONFIG][:VERSION]"` -> (name, config or None, version or None); UserError when malformed.

    Example:
        >>> parse_tfds_id("tfds:c4/en:3.1.0")
        ('c4', 'en', '3.1.0')
    """
    body = str(text)[len(TFDS_PREFIX):] if str(text).startswith(TFDS_PREFIX) else str(text)
    match = re.fullmatch(r"([a-z][a-z0-9_]*)(?:/([A-Za-z0-9_.+-]+))?(?::(\d+\.\d+\.\d+))?", body)
    if not match:
        raise UserError(f"--dataset-id {text}: not a TFDS id; write tfds:NAME[/CONFIG][:VERSION], e.g. "
                        f"tfds:c4/en:3.1.0 (lowercase name, version MAJOR.MINOR.PATCH)")
    return match.group(1), match.group(2), match.group(3)


def parse_data_mix(text):
    """`"SRC:W,SRC:W"` -> ((source, weight), ...): the weight after each source's last colon.

    A source is any --dataset-id form or a file glob (`tfds:c4/en:3.1.0:0.7`
    reads as source `tfds:c4/en:3.1.0`, weight 0.7). Weights are numbers
    >= 0, not all 0; they need not sum to 1 (the mixture normalizes them).

    Example:
        >>> parse_data_mix("web/*.parquet:0.7, code.jsonl:0.3")
        (('web/*.parquet', 0.7), ('code.jsonl', 0.3))
    """
    pairs = []
    for item in str(text).split(","):
        source, colon, weight = item.strip().rpartition(":")
        if not colon or not source.strip():
            raise UserError(f"--data-mix {text!r}: the item {item.strip()!r} has no SOURCE:WEIGHT; write "
                            f"SRC:W,SRC:W, e.g. web/*.parquet:0.7,code.jsonl:0.3")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0:
            raise UserError(f"--data-mix {text!r}: the weight {weight.strip()!r} of {source.strip()} is not a "
                            f"number >= 0; give each source a weight such as 0.7")
        pairs.append((source.strip(), value))
    if not any(w > 0 for _, w in pairs):
        raise UserError(f"--data-mix {text!r}: every weight is 0; give at least one source a weight above 0")
    return tuple(pairs)


def mix_text(items, where="data.mix"):
    """A recipe's `data.mix` list of {source, weight} mappings as the --data-mix flag's text.

    Example:
        >>> mix_text([{"source": "web/*.parquet", "weight": 0.7}, {"source": "code.jsonl", "weight": 0.3}])
        'web/*.parquet:0.7,code.jsonl:0.3'
    """
    if isinstance(items, str):
        return items
    if not isinstance(items, (list, tuple)) or not items:
        raise UserError(f"{where}: expected a list of {{source: S, weight: W}} mappings, got {items!r}")
    parts = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"source", "weight"}:
            raise UserError(f"{where}: each item must be a mapping with exactly `source` and `weight`, got {item!r}")
        if isinstance(item["weight"], bool) or not isinstance(item["weight"], (int, float)):
            raise UserError(f"{where}: the weight {item['weight']!r} of {item['source']} is not a number; give a "
                            f"weight such as 0.7")
        if not isinstance(item["source"], str) or "," in item["source"] or not item["source"].strip():
            raise UserError(f"{where}: the source {item['source']!r} must be a non-empty path, glob or dataset id "
                            f"without commas")
        parts.append(f"{item['source']}:{item['weight']}")
    return ",".join(parts)
