"""Command line: flags -> `Config` -> backend -> the command.

`ultimate-trainer [train] [flags]` trains (the default command). Flags come
from the config dataclasses, so `--help`, YAML recipes and
`training_args.json` always agree. Keras is imported only after the backend
has been chosen.
"""

import argparse
import json
import sys
from pathlib import Path

from ultimate_trainer import config as config_lib
from ultimate_trainer.backend import BACKENDS, init_devices, quiet_start, select_backend
from ultimate_trainer.errors import UserError

DESCRIPTION = """\
Pretrain a decoder-only language model with Keras 3 on JAX, PyTorch or TensorFlow.

With no dataset flag it trains on text every Python install carries (the standard
library's documentation topics), so the first run needs no network:

  python -m ultimate_trainer --model-preset nano
"""

EPILOG = """\
commands:
  train (default)   train a model; the flags above
  prepare-data      tokenize the dataset into shards: prepare-data --data-dir DIR [dataset/tokenizer flags]
  generate          sample text: generate --checkpoint DIR --prompt TEXT; see generate --help
  export            write a checkpoint as a Hugging Face transformers model; see export --help
  cost              parameters, FLOPs, time, memory and Chinchilla loss of a run; see cost --help
  recipes           list the shipped recipes (train one with --recipe NAME)
examples:
  python -m ultimate_trainer --model-preset nano --dry-run
  python -m ultimate_trainer --model-preset tiny --backend torch --max-steps 200
  python -m ultimate_trainer --target-params 20M --prefer-depth --dry-run --json
  python -m ultimate_trainer cost --recipe ttt-125m --devices 8 --wall-time 2.7h
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block; main() prints it.
        raise UserError(f"{message}; see --help")


def _help_text(f):
    text = f.metadata["help"]
    default = f.default
    if not (isinstance(default, bool) or default is None):
        text = f"{text} (default: {default})"
    return text


def build_parser(prog="ultimate-trainer", description=DESCRIPTION, epilog=EPILOG):
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = {}
    for attr, title, f in config_lib.iter_fields():
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        meta = f.metadata
        hidden = meta.get("hidden")  # accepted aliases of the default (see config.LoaderConfig)
        kwargs = dict(dest=f"{attr}.{f.name}", default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS if hidden else _help_text(f))
        flag = config_lib.flag_name(f)
        if meta.get("boolean_optional"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, bool):
            kwargs["action"] = "store_false" if flag.startswith("--no-") else "store_true"
        else:
            kwargs["type"] = meta.get("type") or type(f.default)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = meta.get("metavar") or (
                "|".join(meta["choices"]) if meta.get("choices") else f.name.upper()
            )
        group.add_argument(flag, **kwargs)
    return parser


def parse_config(argv):
    """Parses train flags into a validated `Config`."""
    namespace = build_parser().parse_args(argv)
    return config_lib.resolve_config(vars(namespace))


def _train(argv):
    cfg = parse_config(argv)
    if "loader.shard_tokens" in cfg.explicit:
        raise UserError("--shard-tokens only applies to `prepare-data`; drop it from a training run")
    select_backend(cfg.run.backend, cfg)
    with quiet_start(not cfg.run.verbose):
        # heavy: keras and the frameworks load here, once the backend is chosen and their logs silenced
        from ultimate_trainer.training.trainer import train

        init_devices()
    return train(cfg)


def _prepare_data(argv):
    """`prepare-data --data-dir DIR [dataset and tokenizer flags]`: tokenize into shards."""
    namespace = build_parser().parse_args(argv)
    values = vars(namespace)
    destination = values.pop("data.data_dir", None)
    if not destination:
        raise UserError("prepare-data needs --data-dir DIR, the directory to write the shards into")
    cfg = config_lib.resolve_config(values)
    select_backend(cfg.run.backend)
    with quiet_start(not cfg.run.verbose):
        # heavy: tensorflow loads here, once the backend is chosen and its logs silenced
        from ultimate_trainer.data import shards, sources, tokenizers

        init_devices()

    train, val, source = sources.open_records(cfg.data)
    tokenizer = tokenizers.make_tokenizer(cfg.tokenizer, train, val, log=print,
                                          vocab_size_given="tokenizer.vocab_size" in cfg.explicit)
    shards.prepare_shards(destination, tokenizer, {"train": train, "val": val}, source,
                          shard_tokens=cfg.loader.shard_tokens)
    print(f"prepared {destination}; train with --data-dir {destination}")
    return 0


def _generate(argv):
    """`generate --checkpoint DIR --prompt TEXT`: sample text from a trained model."""
    parser = _Parser(prog="ultimate-trainer generate", description="Sample text from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint-<step> directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest; 0 for all (default: 40)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token (= --temperature 0)")
    parser.add_argument("--num-samples", type=int, default=1, help="independent samples (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole window per token (slower)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per sample")
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend (default: $KERAS_BACKEND, else jax)")
    parser.add_argument("--verbose", action="store_true", help="show the frameworks' own start-up logs")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature and --top-k must be >= 0 and --top-p in (0, 1]")
    select_backend(args.backend, default="jax")  # auto's table measures training, not generation
    with quiet_start(not args.verbose):
        # heavy: keras loads here, once the backend is chosen and its logs silenced
        from ultimate_trainer.checkpoint.store import load_model
        from ultimate_trainer.training.generation import generate

        init_devices()

    model, tokenizer = load_model(args.checkpoint)
    for i in range(args.num_samples):
        text, stats = generate(
            model, tokenizer, args.prompt, args.max_new_tokens, 0.0 if args.greedy else args.temperature,
            args.top_k, args.top_p, args.seed + i, use_cache=not args.no_cache,
        )
        if args.json:
            print(json.dumps({"text": text, **stats}))
        else:
            print(text)
            print(f"[{stats['new_tokens']} tokens in {stats['seconds']:.2f}s, {stats['tokens_per_sec']:.1f} tok/s, "
                  f"{'KV cache' if stats['cache'] else 'no cache'}]", file=sys.stderr)
    return 0


def _export(argv):
    parser = _Parser(
        prog="ultimate-trainer export",
        description="Write a checkpoint as a Hugging Face transformers model directory (docs/export.md).",
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint-<step> directory")
    parser.add_argument("--format", default="hf", choices=["hf"], help="hf: transformers (default: hf)")
    parser.add_argument("--output", required=True, metavar="OUT_DIR", help="a new or empty directory")
    parser.add_argument("--backend", choices=BACKENDS, help="keras backend that loads the checkpoint")
    parser.add_argument("--verbose", action="store_true", help="show the frameworks' own start-up logs")
    args = parser.parse_args(argv)
    # optional: transformers (the [hf] extra), needed by `export` alone
    from ultimate_trainer.export.hf import check_output_dir, export_hf

    check_output_dir(args.output)
    select_backend(args.backend, default="jax")  # auto's table measures training speed
    with quiet_start(not args.verbose):
        # heavy: keras loads here, once the backend is chosen and its logs silenced
        from ultimate_trainer.checkpoint.store import load_model

        init_devices()

    model, tokenizer = load_model(args.checkpoint)
    files = export_hf(model, tokenizer, args.output)
    out = Path(args.output)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {args.checkpoint} as transformers {architecture} to {out}:")
    for name in files:
        print(f"  {name} ({(out / name).stat().st_size:,} bytes)")
    return 0


def _cost(argv):
    """`cost [train flags] [--device-type T --devices N --mfu F | --wall-time 2.7h ...]`."""
    # lazy: rich and the cost tables load for `cost` and `recipes` only, not for every --help
    from ultimate_trainer import cost as cost_lib

    parser = build_parser(
        prog="ultimate-trainer cost",
        description="What a run costs, from its flags, preset or recipe (never its data): exact parameters, "
                    "FLOPs, time on N devices, memory per device, and the Chinchilla tokens and loss (docs/cost.md).",
        epilog="examples:\n  ultimate-trainer cost --model-preset small --total-tokens 1B\n"
               "  ultimate-trainer cost --recipe ttt-125m --devices 8 --device-type a100 --wall-time 2.7h\n"
               "  ultimate-trainer cost --recipe moe-1b --devices 8 --sharding fsdp --json",
    )
    for action in parser._actions:  # the train parser's --json speaks of --dry-run
        if action.dest == "run.json":
            action.help = "print the report as one JSON object"
    group = parser.add_argument_group("cost")
    group.add_argument("--device-type", default=None, metavar="|".join(cost_lib.device_names()),
                       help=f"device the run is planned on; its peak comes from the MFU table of training, in the "
                            f"precision training uses there (bfloat16 on a GPU or TPU that has it unless "
                            f"--no-use-mixed-precision) (default: {cost_lib.DEFAULT_DEVICE}; none with "
                            f"--peak-flops)")
    group.add_argument("--devices", type=int, default=1, help="number of devices (default: 1)")
    group.add_argument("--mfu", type=float, default=None,
                       help=f"model FLOPs utilisation to plan with (default: {cost_lib.DEFAULT_MFU})")
    group.add_argument("--wall-time", default=None, metavar="DURATION",
                       help="instead of --mfu: a measured or stated run time (2.7h, 90m, 45s); prints the MFU it implies")
    group.add_argument("--sharding", default="data", choices=cost_lib.SHARDING,
                       help="how the devices share the model: data (replicated), fsdp (states split) or model "
                            "(tensor parallel) (default: data)")
    group.add_argument("--remat", action="store_true",
                       help="estimate memory with each block recomputed in the backward pass")
    values = vars(parser.parse_args(argv))
    options = {name: values.pop(name) for name in ("device_type", "devices", "mfu", "wall_time", "sharding", "remat")}
    as_json = values.pop("run.json", False)
    ignored = sorted(config_lib.flag_name(f) for attr, _, f in config_lib.iter_fields()
                     if f"{attr}.{f.name}" in values and f"{attr}.{f.name}" not in cost_lib.COST_FIELDS)
    cfg = config_lib.resolve_config(values)
    wall = options.pop("wall_time")
    report = cost_lib.estimate(cfg, wall_seconds=cost_lib.parse_duration(wall) if wall else None, **options)
    if ignored:
        report["notes"].append(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not change the cost; "
                               f"ignored here")
    if as_json:
            print(json.dumps(report, indent=2))
    else:
        cost_lib.render(report)
    return 0


def _recipes(argv):
    """`recipes [--device-type T] [--mfu F] [--json]`: the shipped recipes and their cost."""
    # lazy: rich and the cost tables load for `cost` and `recipes` only, not for every --help
    from ultimate_trainer import cost as cost_lib
    from ultimate_trainer import recipes

    parser = _Parser(prog="ultimate-trainer recipes",
                     description="The shipped recipes (ultimate_trainer/recipes/*.yaml); train one with `train --recipe NAME`.")
    parser.add_argument("--device-type", default=cost_lib.DEFAULT_DEVICE, metavar="|".join(cost_lib.device_names()),
                        help=f"device to price the runs on, in the precision training uses there "
                             f"(default: {cost_lib.DEFAULT_DEVICE})")
    parser.add_argument("--mfu", type=float, default=cost_lib.DEFAULT_MFU,
                        help=f"model FLOPs utilisation to price at (default: {cost_lib.DEFAULT_MFU})")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    args = parser.parse_args(argv)
    rows = cost_lib.recipe_table(recipes.recipe_names(), args.device_type, args.mfu)
    if args.json:
            print(json.dumps(rows, indent=2))
    else:
        cost_lib.render_recipes(rows, args.device_type, args.mfu)
    return 0


COMMANDS = {"train": _train, "prepare-data": _prepare_data, "generate": _generate, "export": _export,
            "cost": _cost, "recipes": _recipes}


def main(argv=None):
    """Entry point of `python -m ultimate_trainer` and `ultimate-trainer`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS["train"]
    if argv and argv[0] in COMMANDS:
        command = COMMANDS[argv.pop(0)]
    try:
        return command(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
