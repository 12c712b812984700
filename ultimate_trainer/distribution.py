"""Devices, meshes, layouts and multi-process runs: `--distribution`, `--mesh`,
`--coordinator-address`, `--num-processes`, `--process-id`.

What runs where (docs/distributed.md):
- jax: `data` is `keras.distribution.DataParallel`; `fsdp` and `model` are
  `keras.distribution.ModelParallel` over a `DeviceMesh` with the layout map
  of `CausalLM.get_layout_map`; several processes join one cluster through
  `keras.distribution.initialize`.
- tensorflow: `data` is `tf.distribute.MirroredStrategy` over the local
  GPUs (or N logical CPUs with `--mesh batch=N`); one process.
- torch: one device.

`auto` is data parallel over all devices when there is more than one
(jax; tensorflow: more than one GPU), else one device. `--batch-size` is per
device: one micro-batch holds batch x data-parallel size sequences.

Nothing here runs before `setup`, which must come before anything asks jax
for its devices (joining a cluster changes what `jax.devices()` returns).

Example:
    dist = setup(cfg)                 # cluster joined, mesh chosen, distribution set
    with dist.scope():
        model = build_causal_lm(cfg.model, vocab, state_passing_rows=dist.micro_batch(cfg))
    report = check_layouts(model, dist)
"""

import contextlib
import dataclasses
import math
import re

from ultimate_trainer.backend import accelerator, bf16_unsupported_reason
from ultimate_trainer.config.derived import trains_in_bfloat16
from ultimate_trainer.config.parsers import BATCH, MODEL, cluster_settings, parse_mesh
from ultimate_trainer.errors import UserError
from ultimate_trainer.models.layout import get_layout_map

MODES = ("auto", "none", "data", "fsdp", "model")


def resolve_mesh(mode, mesh_text, device_count):
    """The {"batch": B, "model": M} mesh of a mode (`data`, `fsdp`, `model`) on
    `device_count` devices. An axis left out of `--mesh` takes the devices the
    others leave; the sizes must multiply to the device count.

    Example:
        >>> resolve_mesh("model", "model=2", 4)
        {'batch': 2, 'model': 2}
    """
    given = parse_mesh(mesh_text) if mesh_text else {}
    if mode == "data" and given.get(MODEL, 1) != 1:
        raise UserError(f"--distribution data replicates the weights; --mesh {mesh_text} splits them: "
                        f"use --distribution model (or fsdp), or drop model= from --mesh")
    if not given:
        given = {MODEL: device_count} if mode == "model" else {BATCH: device_count}
    product = math.prod(given.values())
    if device_count % product:
        raise UserError(
            f"--mesh {mesh_text} needs a multiple of {product} devices, but {device_count} were found; "
            f"pick sizes whose product divides {device_count}"
        )
    missing = [a for a in (BATCH, MODEL) if a not in given]
    if missing:
        given[missing[0]] = device_count // product
        if len(missing) == 2:
            given[MODEL] = 1
    elif product != device_count:
        raise UserError(
            f"--mesh {mesh_text} uses {product} of the {device_count} devices; make the sizes multiply to "
            f"{device_count}, or leave one axis out to give it the rest"
        )
    return {BATCH: given.get(BATCH, 1), MODEL: given.get(MODEL, 1)}


def fit_axes(axes, shape, sizes):
    """A layout's axes fitted to a weight's shape: a mesh axis that does not
    divide its dimension moves to the largest unsplit dimension it divides,
    else it is dropped. Returns (axes, note or None).

    Example:
        >>> fit_axes(("batch", "model"), (258, 64), {"batch": 2, "model": 4})
        (('batch', 'model'), None)
        >>> fit_axes((None, "model"), (64, 258), {"batch": 1, "model": 4})
        (('model',), 'model axis (4) moved from dim 1 (258) to dim 0 (64)')
    """
    if len(axes) > len(shape):
        raise ValueError(f"layout {axes} has more axes than the weight's shape {shape}")
    # An axis of size 1 splits nothing: it leaves its dimension free for another.
    fitted = [a if a is not None and sizes[a] > 1 else None for a in axes] + [None] * (len(shape) - len(axes))
    notes = []
    for i, axis in enumerate(list(fitted)):
        if axis is None or shape[i] % sizes[axis] == 0:
            continue
        fitted[i] = None
        free = sorted((j for j in range(len(shape)) if fitted[j] is None and j != i and shape[j] % sizes[axis] == 0),
                      key=lambda j: -shape[j])
        if free:
            fitted[free[0]] = axis
            notes.append(f"{axis} axis ({sizes[axis]}) moved from dim {i} ({shape[i]}) to dim {free[0]} "
                         f"({shape[free[0]]})")
        else:
            notes.append(f"{axis} axis ({sizes[axis]}) divides no dimension of {tuple(shape)}")
    while fitted and fitted[-1] is None:
        fitted.pop()
    return tuple(fitted), "; ".join(notes) or None


@dataclasses.dataclass
class Distribution:
    """What `setup` chose: the mode, the mesh, the processes, and the backend's
    distribution object (a keras `Distribution` on jax, a `tf.distribute`
    strategy on tensorflow, else None)."""

    mode: str  # none | data | fsdp | model (auto resolved)
    backend: str
    mesh: dict  # {"batch": B, "model": M}
    reason: str
    num_processes: int = 1
    process_id: int = 0
    strategy: object = None
    layout_map: object = None
    local_rows: tuple = (0, 1)  # this process's share of each batch, as (first, stop) of `data_parallel` slices
    joined: bool = False  # a cluster was joined (keras.distribution.initialize)

    @property
    def data_parallel(self):
        return self.mesh.get(BATCH, 1)

    @property
    def devices(self):
        return math.prod(self.mesh.values())

    @property
    def is_chief(self):
        """Process 0: the one that writes logs, checkpoints and uploads."""
        return self.process_id == 0

    def micro_batch(self, training_cfg):
        """Sequences per micro-batch over all devices: --batch-size x data-parallel size."""
        return training_cfg.batch_size * self.data_parallel

    def scope(self):
        """Where the model is built and compiled (a tf.distribute strategy's scope;
        on jax the distribution is already global)."""
        if self.backend == "tensorflow" and self.strategy is not None:
            return self.strategy.scope()
        return contextlib.nullcontext()

    def barrier(self, name):
        """Waits until every process of the cluster gets here (no-op in one process)."""
        if self.joined:
            from jax.experimental import multihost_utils  # optional: jax, only in a multi-process jax run

            multihost_utils.sync_global_devices(name)

    @contextlib.contextmanager
    def chief_first(self):
        """Process 0 runs the block first (it may write files, e.g. a trained
        tokenizer or a downloaded checkpoint); the others run it after."""
        if not self.joined:
            yield
            return
        if self.is_chief:
            try:
                yield
            finally:
                self.barrier("chief_first")
        else:
            self.barrier("chief_first")
            yield

    @contextlib.contextmanager
    def host_values(self, model):
        """Within the block every variable of `model` and its optimizer reads
        whole on this process, so process 0 can save them alone. Weights split
        across processes are gathered first, a collective every process must
        join (call it on all of them). The distribution is lifted inside: Keras
        creates throwaway variables while saving, and creating a distributed
        variable is a collective too."""
        if not self.joined:
            yield
            return
        # heavy: keras and jax, only in a multi-process run (the plan and cost import this module keras-free)
        import keras
        from jax.experimental import multihost_utils

        variables = list(model.variables) + (list(model.optimizer.variables) if model.optimizer else [])
        split = [v for v in variables if not v.value.is_fully_addressable and not v.value.is_fully_replicated]
        values = multihost_utils.process_allgather([v.value for v in split], tiled=True) if split else []
        keras.distribution.set_distribution(None)
        try:
            with (keras.StatelessScope(state_mapping=list(zip(split, values))) if split else contextlib.nullcontext()):
                yield
        finally:
            keras.distribution.set_distribution(self.strategy)

    def process_batches(self, dataset):
        """This process's rows of each global batch (multi-process runs); every
        process reads the same global stream, so the windows and their order do
        not depend on the number of processes."""
        if self.num_processes == 1:
            return dataset
        import tensorflow as tf  # heavy: only a multi-process run shards its dataset

        first, stop = self.local_rows
        parts = self.data_parallel

        def take(x, y):
            per = tf.shape(x)[0] // parts
            return x[first * per : stop * per], y[first * per : stop * per]

        return dataset.map(take)

    def describe(self):
        return {
            "mode": self.mode,
            "backend": self.backend,
            "mesh": dict(self.mesh),
            "devices": self.devices,
            "data_parallel": self.data_parallel,
            "num_processes": self.num_processes,
            "process_id": self.process_id,
            "reason": self.reason,
            "layout": layout_rules(self.layout_map) if self.layout_map is not None else None,
        }


def layout_rules(layout_map):
    """{pattern: axes} of a LayoutMap, for the plan (`()`: declared whole)."""
    return {pattern: list(layout.axes) for pattern, layout in layout_map.items()}


def format_distribution(info, rules=False):
    """Plan lines for `Distribution.describe()`; `rules`: list the layout map's rules too."""
    mesh = ", ".join(f"{k}={v}" for k, v in info["mesh"].items())
    lines = [f"distribution: {info['mode']} ({info['reason']}); mesh {mesh} over {info['devices']} device(s)"
             + (f", {info['num_processes']} processes (this is process {info['process_id']})"
                if info["num_processes"] > 1 else "")]
    if info["layout"] and info["mode"] in ("fsdp", "model"):
        sharded = {p: a for p, a in info["layout"].items() if any(a)}
        whole = [p for p, a in info["layout"].items() if not any(a)]
        lines.append(f"layout: {len(sharded)} rules split weights, {len(whole)} patterns declared whole "
                     f"(norms, biases, scalars, statistics, RNG states):")
        if rules:
            lines += [f"  {p} -> ({', '.join(str(x) for x in a)})" for p, a in sharded.items()]
        else:
            lines[-1] = lines[-1].rstrip(":") + " (--dry-run lists them)"
    return lines


def setup(cfg, dry_run=False):
    """Joins the cluster (multi-process), picks the mesh and sets the run's
    distribution; call before anything asks jax for its devices. A dry run
    does not join a cluster: it assumes every process has this one's devices.
    Returns a `Distribution`."""
    import keras  # heavy: the plan and cost import this module keras-free; setup runs once the backend is chosen

    d = cfg.distribution
    backend = keras.backend.backend()
    cluster = cluster_settings(d)
    if backend != "jax":
        if cluster:
            raise UserError(f"multi-process runs use keras.distribution, which Keras implements on jax only; "
                            f"use --backend jax (the {backend} backend trains in one process)")
        return _setup_tensorflow(d) if backend == "tensorflow" else _setup_torch(d)
    processes, process_id = (cluster[1], cluster[2]) if cluster else (1, 0)
    if cluster and not dry_run:
        keras.distribution.initialize(job_addresses=cluster[0], num_processes=processes, process_id=process_id)
    count = len(keras.distribution.list_devices()) * (processes if cluster and dry_run else 1)
    mode = d.distribution
    if mode == "auto":
        mode = "data" if count > 1 else "none"
        reason = (f"auto: {count} devices" if count > 1 else "auto: one device")
    else:
        reason = f"--distribution {mode}"
    if mode == "none":
        if processes > 1:
            raise UserError("--distribution none trains on one device, but this is a multi-process run; "
                            "use --distribution data, fsdp or model (or auto)")
        keras.distribution.set_distribution(None)
        return Distribution("none", backend, {BATCH: 1, MODEL: 1}, reason)
    mesh = resolve_mesh(mode, d.mesh, count)
    dist = Distribution(mode, backend, mesh, reason, processes, process_id, joined=bool(cluster) and not dry_run)
    if dry_run:
        # The plan only: names stand in for the devices of processes not joined.
        plan_mesh = keras.distribution.DeviceMesh((mesh[BATCH], mesh[MODEL]), (BATCH, MODEL),
                                                  [f"device:{i}" for i in range(count)])
        dist.layout_map = get_layout_map(plan_mesh, fsdp=mode == "fsdp")
        return dist
    # Data parallelism wants a 1-D mesh (DataParallel warns on more axes).
    shape, names = ((mesh[BATCH],), (BATCH,)) if mode == "data" else ((mesh[BATCH], mesh[MODEL]), (BATCH, MODEL))
    device_mesh = keras.distribution.DeviceMesh(shape, names, keras.distribution.list_devices())
    dist.layout_map = get_layout_map(device_mesh, fsdp=mode == "fsdp")
    if processes > 1:
        dist.local_rows = _local_rows(device_mesh, mesh[BATCH])
    dist.strategy = keras_distribution(mode, device_mesh, dist.layout_map, mesh)
    keras.distribution.set_distribution(dist.strategy)
    return dist


def _local_rows(device_mesh, data_parallel):
    """(first, stop) batch slices held by this process's devices; they must be
    contiguous for a process to feed its rows as one block."""
    import jax  # optional: jax, the only backend with a device mesh here

    sharding = jax.sharding.NamedSharding(device_mesh.backend_mesh, jax.sharding.PartitionSpec(BATCH))
    held = sorted({index[0].start or 0 for index in sharding.addressable_devices_indices_map((data_parallel,)).values()})
    if held != list(range(held[0], held[-1] + 1)):
        raise UserError(f"this process's devices hold batch slices {held} of the mesh, not a contiguous block; "
                        f"give every process the same number of devices and put the batch axis first")
    return held[0], held[-1] + 1


def keras_distribution(mode, device_mesh, layout_map, mesh):
    """A keras DataParallel (`mode` data) or ModelParallel whose variable
    layouts come from `layout_map` fitted to each weight's shape (`fit_axes`);
    its `adjusted` records each weight whose layout had to change. Inputs are
    split per process by `Distribution.process_batches`, not by Keras'
    auto-sharding, which refuses the validation set's last, shorter batch.

    Example:
        mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"))
        strategy = keras_distribution("model", mesh, get_layout_map(mesh), {"batch": 2, "model": 2})
        keras.distribution.set_distribution(strategy)
    """
    import keras  # heavy: the plan and cost import this module keras-free

    def fitted(self, variable):
        if getattr(variable, "_layout", None) is not None:
            return variable._layout
        layout = layout_map[variable.path]
        axes, note = fit_axes(tuple(layout.axes) if layout is not None else (), tuple(variable.shape), mesh)
        if note:
            self.adjusted[variable.path] = note
        return keras.distribution.TensorLayout(axes + (None,) * (len(variable.shape) - len(axes)), device_mesh)

    if mode == "data":
        # Replicated weights, as DataParallel does; only carried TTT states (one per batch row) are split.
        class RowDataParallel(keras.distribution.DataParallel):
            adjusted = {}
            get_variable_layout = fitted

        return RowDataParallel(device_mesh=device_mesh, auto_shard_dataset=False)

    class FittedModelParallel(keras.distribution.ModelParallel):
        adjusted = {}
        get_variable_layout = fitted

    return FittedModelParallel(layout_map=layout_map, batch_dim_name=BATCH, auto_shard_dataset=False)


def _setup_tensorflow(d):
    import tensorflow as tf  # heavy: a tensorflow run only

    mode = d.distribution
    if mode in ("fsdp", "model"):
        raise UserError(f"--distribution {mode} shards weights with keras.distribution, which Keras implements on "
                        f"jax only; use --backend jax (tensorflow offers --distribution data: MirroredStrategy)")
    gpus = tf.config.list_physical_devices("GPU")
    if mode == "none" or (mode == "auto" and len(gpus) < 2):
        reason = ("--distribution none" if mode == "none" else
                  f"auto: {len(gpus) or 'no'} GPU{'s' if len(gpus) != 1 else ''}; tensorflow trains on one device")
        return Distribution("none", "tensorflow", {BATCH: 1, MODEL: 1}, reason)
    if gpus:
        replicas = resolve_mesh("data", d.mesh, len(gpus))[BATCH]
        if replicas != len(gpus):
            raise UserError(f"--mesh {d.mesh}: MirroredStrategy replicates over all {len(gpus)} GPUs; drop --mesh")
        devices = [f"/gpu:{i}" for i in range(len(gpus))]
    else:
        # No GPU: --mesh batch=N splits the CPU into N logical devices (mostly for testing the path).
        replicas = parse_mesh(d.mesh).get(BATCH, 1) if d.mesh else 1
        resolve_mesh("data", d.mesh, replicas)  # refuses model=
        if replicas > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            try:
                tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
            except RuntimeError:
                raise UserError("--mesh batch=N on a CPU must be set before tensorflow starts; this process "
                                "already started it") from None
        devices = [f"/cpu:{i}" for i in range(replicas)]
    strategy = tf.distribute.MirroredStrategy(devices)
    return Distribution("data", "tensorflow", {BATCH: replicas, MODEL: 1},
                        f"{'auto' if mode == 'auto' else '--distribution data'}: tf.distribute.MirroredStrategy "
                        f"over {', '.join(devices)}", strategy=strategy)


def _setup_torch(d):
    if d.distribution not in ("auto", "none"):
        raise UserError(f"--distribution {d.distribution}: Keras 3 distributes training on jax "
                        f"(keras.distribution) and tensorflow (MirroredStrategy, data only), not torch; "
                        f"use --backend jax")
    if d.mesh:
        raise UserError("--mesh applies to --distribution data, fsdp or model; torch trains on one device")
    reason = ("--distribution none" if d.distribution == "none"
              else "auto: torch trains on one device (Keras distributes on jax and tensorflow)")
    return Distribution("none", "torch", {BATCH: 1, MODEL: 1}, reason)


def check_layouts(model, dist):
    """Checks every weight of `model` against the layout it was given and
    reports the ones left whole. Returns {"sharded": [...], "declared_whole":
    [...], "adjusted": {path: note}, "whole_on_this_mesh": [...]}; raises
    `UserError` when a weight's sharding differs from its layout or, under
    fsdp/model, a weight no rule of the layout map covers ended up fully
    replicated (a gap in `CausalLM.get_layout_map`).

    Example:
        report = check_layouts(model, dist)
        len(report["sharded"]), report["adjusted"]
    """
    if dist.backend != "jax" or dist.strategy is None:
        return None
    layout_map = dist.layout_map
    report = {"sharded": [], "declared_whole": [], "adjusted": {}, "whole_on_this_mesh": []}
    unmapped, mismatched = [], []
    for variable in model.variables:
        path = variable.path
        expected = tuple(variable._layout.axes) if variable._layout is not None else ()
        actual = tuple(variable.value.sharding.spec)
        if _strip(actual) != _strip(expected):
            mismatched.append(f"{path} is {actual}, its layout says {expected}")
        rules = [p for p in layout_map if re.fullmatch(p, path)]
        if path in dist.strategy.adjusted:
            report["adjusted"][path] = dist.strategy.adjusted[path]
        if any(actual):
            report["sharded"].append(path)
        elif not rules:
            unmapped.append(path)
        elif not layout_map[rules[0]].axes:
            report["declared_whole"].append(path)
        else:
            report["whole_on_this_mesh"].append(path)
    if mismatched:
        raise UserError(f"{len(mismatched)} weight(s) are not laid out as planned, e.g. {mismatched[0]}")
    if unmapped and dist.mode in ("fsdp", "model"):
        raise UserError(
            f"{len(unmapped)} weight(s) have no rule in the layout map and would be fully replicated on every "
            f"device: {', '.join(unmapped[:4])}{' ...' if len(unmapped) > 4 else ''}; this is a gap in "
            f"CausalLM.get_layout_map (add a rule, or add the weight to REPLICATED_WEIGHTS if it is small); "
            f"--distribution data trains without it"
        )
    report["unmapped"] = unmapped
    return report


def _strip(axes):
    axes = list(axes)
    while axes and axes[-1] is None:
        axes.pop()
    return tuple(axes)


def format_layout_report(report, dist):
    """One line on how the weights were laid out."""
    line = (f"layout: {len(report['sharded'])} weights split over the mesh, "
            f"{len(report['declared_whole'])} declared whole (norms, biases, scalars, statistics, RNG)")
    if dist.mode == "data":
        line = (f"layout: weights replicated on all {dist.devices} devices (data parallel)"
                + (f"; {len(report['sharded'])} carried TTT states split by batch row" if report["sharded"] else ""))
    if report["whole_on_this_mesh"] and dist.mode != "data":
        line += f", {len(report['whole_on_this_mesh'])} whole on this mesh (their axes have size 1 or are absent)"
    lines = [line]
    for path, note in report["adjusted"].items():
        lines.append(f"layout: {path}: {note}")
    return lines


def device_defaults(cfg, devices):
    """The line saying what precision a GPU or TPU trains `cfg` in by default
    (bfloat16 unless --use-mixed-precision / --no-use-mixed-precision was
    given; flash attention is automatic there already), or None on a CPU.
    The choice itself is `config.derive`'s; this only says it.

    Example:
        line = device_defaults(cfg, backend.describe_devices())
    """
    accel = accelerator(devices["devices"])
    if accel is None:
        return None
    flash = "off (--no-flash-attention)" if not cfg.model.flash_attention else "on where the kernel exists"
    if "optimization.use_mixed_precision" in cfg.explicit:
        chosen = "on" if cfg.optimization.use_mixed_precision else "off"
        return f"device defaults ({accel}): bfloat16 {chosen} as given; flash attention " + flash
    reason = bf16_unsupported_reason()
    if not trains_in_bfloat16(cfg, accel, reason):
        return f"device defaults ({accel}): float32, since {reason}"
    return (f"device defaults ({accel}): bfloat16 compute with float32 weights (--no-use-mixed-precision for "
            f"float32); flash attention " + flash)
