"""--distribution, --mesh, the layout map and multi-process runs (jax, CPU).

Several devices come from XLA_FLAGS=--xla_force_host_platform_device_count=4,
which must be set before jax starts, so those checks run in subprocesses
(tests/distributed_checks.py). The references are independent: one-device
training for the losses, weight specs written out by hand for the layouts.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_model_flags
from ultimate_trainer import config as config_lib
from ultimate_trainer import distribution as dl
from ultimate_trainer.errors import UserError

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def _run_checks(what, stdin=None, timeout=600, backend="jax"):
    env = dict(os.environ, **FOUR_DEVICES, KERAS_BACKEND=backend)
    done = subprocess.run([sys.executable, str(REPO / "tests" / "distributed_checks.py"), what], input=stdin,
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# ---------------------------------------------------------------- pure parts


def test_mesh_resolution():
    assert dl.resolve_mesh("model", None, 4) == {"batch": 1, "model": 4}
    assert dl.resolve_mesh("fsdp", None, 4) == {"batch": 4, "model": 1}
    assert dl.resolve_mesh("model", "model=2", 8) == {"batch": 4, "model": 2}
    assert dl.resolve_mesh("fsdp", "batch=2,model=2", 4) == {"batch": 2, "model": 2}
    with pytest.raises(UserError, match="AXIS=SIZE"):
        dl.resolve_mesh("fsdp", "batch=two", 4)  # the config's parser (tests/config/test_parsers.py)
    with pytest.raises(UserError, match="needs a multiple of 6 devices, but 4"):
        dl.resolve_mesh("model", "batch=3,model=2", 4)
    with pytest.raises(UserError, match="uses 2 of the 4 devices"):
        dl.resolve_mesh("fsdp", "batch=2,model=1", 4)
    with pytest.raises(UserError, match="replicates the weights"):
        dl.resolve_mesh("data", "model=2", 4)


def test_fit_axes_moves_or_drops_an_axis_that_does_not_divide():
    sizes = {"batch": 2, "model": 4}
    assert dl.fit_axes(("batch", "model"), (64, 256), sizes) == (("batch", "model"), None)
    assert dl.fit_axes(("batch", "model"), (64, 258), sizes)[0] == ("batch",)  # 258 % 4, dim 0 taken
    assert dl.fit_axes((None, "model"), (64, 258), sizes)[0] == ("model",)  # moved to the free dim
    axes, note = dl.fit_axes(("model",), (6,), sizes)
    assert axes == () and "divides no dimension" in note
    assert dl.fit_axes(("batch", "model"), (64, 64), {"batch": 4, "model": 1})[0] == ("batch",)  # size 1: dropped


@pytest.mark.parametrize("flags, message", [
    ({"distribution.mesh": "batch=2"}, "add one of them"),
    ({"distribution.distribution": "fsdp", "distribution.mesh": "rows=2"}, "AXIS=SIZE"),
    ({"distribution.process_id": 1}, "--coordinator-address"),
    ({"distribution.num_processes": 0}, "positive"),
])
def test_bad_distribution_flags_are_refused(flags, message):
    with pytest.raises(UserError, match=message):
        config_lib.resolve_config({"model.model_preset": "nano", **flags})


def test_torch_and_tensorflow_say_what_they_support():
    d = config_lib.DistributionConfig
    for mode in ("data", "fsdp", "model"):
        with pytest.raises(UserError, match="use --backend jax"):
            dl._setup_torch(d(distribution=mode))
    assert "one device" in dl._setup_torch(d()).reason
    with pytest.raises(UserError, match="jax only"):
        dl._setup_tensorflow(d(distribution="fsdp"))


def test_plan_counts_the_global_batch():
    from ultimate_trainer.training.plan import eval_batches_for

    assert eval_batches_for(10, 4) == 3
    assert eval_batches_for(10, 4, whole=True) == 2  # a batch split over devices must be full


# ---------------------------------------------------------------- several devices (subprocesses)


def test_every_weight_is_laid_out_as_planned_and_gaps_are_reported():
    out = _run_checks("layouts")
    assert out["mismatched"] == []
    assert out["report"]["unmapped"] == 0 and out["report"]["sharded"] > 0
    specs = out["specs"]
    expected = {  # fsdp on batch=2, model=2, written out by hand
        "causal_lm/block_1/attention/qkv/kernel": ["batch", "model"],
        "causal_lm/block_1/attention/out/kernel": ["model", "batch"],
        "causal_lm/block_0/mlp/gate_up/kernel": ["batch", "model"],
        "causal_lm/block_0/mlp/down/kernel": ["model", "batch"],
        "causal_lm/block_1/moe/experts_gate_up": ["model", "batch", None],
        "causal_lm/block_1/moe/experts_down": ["model", None, "batch"],
        "causal_lm/block_1/moe/router/kernel": ["batch", "model"],
        "causal_lm/block_0/ttt/w1": ["model", None, "batch"],
        "causal_lm/block_0/ttt/w2": ["model", "batch", None],
        "causal_lm/block_0/ttt/q_proj/kernel": ["batch", "model"],
        "causal_lm/block_0/ttt/o_proj/kernel": ["model", "batch"],
        "causal_lm/token_embedding/embeddings": ["batch", "model"],
        "causal_lm/token_embedding/reverse_embeddings": ["batch", "model"],
    }
    for path, axes in expected.items():
        assert specs[path] == axes, path
    assert specs["causal_lm/block_0/ttt/b1"][0] == "model"
    assert specs["causal_lm/block_0/ttt/conv_q/kernel"][:2] == [None, "model"]
    assert specs["causal_lm/block_0/pre_conv/conv/kernel"][:2] == [None, "model"]
    assert specs["causal_lm/carried_state_0_1"][0] == "batch"  # one carried TTT state per batch row
    assert not any(specs["causal_lm/final_norm/scale"]) and not any(specs["causal_lm/block_1/moe/stat_calls"])
    assert out["lora_unmapped"] == 0
    assert out["lora_specs"]["block_0/attention/qkv/lora_kernel_b"] == [None, "model"]
    assert out["lora_specs"]["block_0/attention/out/lora_kernel_a"] == ["model", None]
    assert "block_1/attention/qkv/kernel" in out["incomplete_error"]
    assert "no rule in the layout map" in out["incomplete_error"]


def _equal_loss_cases(tmp_path, model_flags):
    """(name, argv): one device, data parallel on 4, and a 2x2 model-parallel mesh,
    all with 8 sequences per step (per-device batch x data-parallel size)."""
    common = [*model_flags, "--max-steps", "3", "--log-every", "1", "--no-eval", "--no-tensorboard"]
    return [
        ("one", [*common, "--distribution", "none", "--batch-size", "8"]),
        ("data", [*common, "--distribution", "data", "--batch-size", "2"]),
        ("model", [*common, "--distribution", "model", "--mesh", "batch=2,model=2", "--batch-size", "4"]),
    ]


def _assert_equal_losses(tmp_path, model_flags):
    cases = _equal_loss_cases(tmp_path, model_flags)
    argvs = [argv + ["--output-dir", str(tmp_path / name)] for name, argv in cases]
    results = _run_checks("cli", stdin=json.dumps(argvs))
    for (name, _), result in zip(cases, results):
        assert result["rc"] == 0, (name, result["stderr"][-2000:])
    one = _losses(tmp_path / "one")
    assert len(one) == 3
    for name in ("data", "model"):
        assert _losses(tmp_path / name) == pytest.approx(one, abs=1e-4), name
    assert "global batch 8 = 2 per device x 4 data-parallel devices" in results[1]["stdout"]
    assert "mesh batch=2, model=2 over 4 device(s)" in results[2]["stdout"]
    return results


def test_data_and_model_parallel_losses_equal_one_device(tmp_path):
    # The acceptance check, on a model smaller than `tiny` (test_tiny_... runs `tiny`, slow). Over
    # 20 s on purpose: three real runs in one process, each ending with its checkpoint and samples.
    small = ["--d-model", "64", "--num-layers", "2", "--num-heads", "4", "--d-ff", "128", "--seq-len", "32",
             "--dropout-rate", "0"]
    results = _assert_equal_losses(tmp_path, small)
    assert "layout: 10 weights split over the mesh" in results[2]["stdout"]


@pytest.mark.slow
def test_tiny_data_and_model_parallel_losses_equal_one_device(tmp_path):
    _assert_equal_losses(tmp_path, ["--model-preset", "tiny", "--seq-len", "64"])


@pytest.mark.slow
def test_ttt_state_passing_data_parallel_equals_one_device(tmp_path):
    # Each row of the global micro-batch is its own stream; the carried states are split by row.
    common = [*tiny_model_flags(), "--ttt-layer-type", "linear", "--ttt-mini-batch-size", "8", "--state-passing",
              "--max-steps", "3", "--log-every", "1", "--no-eval", "--no-tensorboard"]
    argvs = [[*common, "--distribution", "none", "--batch-size", "8", "--output-dir", str(tmp_path / "one")],
             [*common, "--distribution", "data", "--batch-size", "2", "--output-dir", str(tmp_path / "data")]]
    one, data = _run_checks("cli", stdin=json.dumps(argvs))
    assert one["rc"] == 0 and data["rc"] == 0, data["stderr"][-2000:]
    assert "carried TTT states split by batch row" in data["stdout"]
    assert _losses(tmp_path / "data") == pytest.approx(_losses(tmp_path / "one"), abs=1e-4)


@pytest.mark.slow
def test_every_layer_type_trains_sharded_as_on_one_device():
    out = _run_checks("layouts-fit")
    assert out["sharded_losses"] == pytest.approx(out["single_losses"], abs=1e-4)
    assert out["slots_checked"] > 0 and out["slots_mismatched"] == []


def test_mesh_and_batch_errors_and_the_dry_run_plan(tmp_path):
    flags = [*tiny_model_flags(), "--max-steps", "2", "--output-dir", str(tmp_path / "run")]
    argvs = [
        [*flags, "--distribution", "model", "--mesh", "batch=3,model=2"],
        [*flags, "--distribution", "data", "--global-batch-size", "6", "--batch-size", "1"],
        [*flags, "--distribution", "model", "--mesh", "model=2", "--dry-run"],
        [*flags, "--distribution", "auto", "--dry-run"],
        [*flags, "--distribution", "data", "--seq-len", "256", "--batch-size", "32", "--dry-run", "--json"],
    ]
    mesh, batch, dry, auto, small_val = _run_checks("cli", stdin=json.dumps(argvs))
    assert mesh["rc"] == 2 and "needs a multiple of 6 devices, but 4 were found" in mesh["stderr"]
    assert batch["rc"] == 2
    assert "--global-batch-size 6 is not a multiple of --batch-size 1 x 4 data-parallel device(s)" in batch["stderr"]
    assert dry["rc"] == 0
    assert "distribution: model (--distribution model); mesh batch=2, model=2 over 4 device(s)" in dry["stdout"]
    assert ".*/attention/qkv/kernel -> (None, model)" in dry["stdout"]
    assert "global batch 8 = 4 per device x 2 data-parallel devices" in dry["stdout"]
    assert "distribution: data (auto: 4 devices)" in auto["stdout"]
    # 104 validation windows, less than one micro-batch of 32 x 4: a batch of 104 = 26 per device.
    plan = json.loads(small_val["stdout"])
    assert plan["data"]["val_windows"] == 104
    assert (plan["data"]["eval_batch_size"], plan["data"]["eval_batches"]) == (104, 1)
    assert plan["schedule"]["global_batch_size"] == 128 and plan["distribution"]["data_parallel"] == 4


@pytest.mark.slow
def test_tensorflow_mirrored_strategy_losses_equal_one_device(tmp_path):
    # MirroredStrategy over 2 logical CPUs; the strategy run goes first, before tensorflow starts.
    common = [*tiny_model_flags(), "--backend", "tensorflow", "--max-steps", "3", "--log-every", "1", "--no-eval",
              "--no-tensorboard"]
    argvs = [[*common, "--distribution", "data", "--mesh", "batch=2", "--batch-size", "2",
              "--output-dir", str(tmp_path / "mirrored")],
             [*common, "--distribution", "none", "--batch-size", "4", "--output-dir", str(tmp_path / "one")]]
    mirrored, one = _run_checks("cli", stdin=json.dumps(argvs), backend="tensorflow")
    assert mirrored["rc"] == 0 and one["rc"] == 0, mirrored["stderr"][-2000:] + one["stderr"][-2000:]
    assert "tf.distribute.MirroredStrategy over /cpu:0, /cpu:1" in mirrored["stdout"]
    assert _losses(tmp_path / "mirrored") == pytest.approx(_losses(tmp_path / "one"), abs=1e-4)
    norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
              if "grad_norm" in line] for name in ("mirrored", "one")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # the clip sees the whole gradient, not a replica's


# ---------------------------------------------------------------- two processes on 127.0.0.1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster(args, tmp_path, name, timeout=300):
    """Runs `args` as processes 0 and 1 of a cluster on 127.0.0.1; kills both on failure."""
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    logs, procs = [], []
    try:
        for i in range(2):
            log = open(tmp_path / f"{name}-{i}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "ultimate_trainer", *args, "--coordinator-address", address,
                 "--num-processes", "2", "--process-id", str(i)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    outputs = [(tmp_path / f"{name}-{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


@pytest.mark.slow
def test_two_process_cluster_trains_saves_once_and_resumes_on_both(tmp_path):
    flags = [*tiny_model_flags(), "--batch-size", "2", "--log-every", "1", "--save-every", "2", "--eval-every", "2",
             "--no-tensorboard", "--max-steps", "4"]
    first, second = tmp_path / "first", tmp_path / "second"
    out0, out1 = _cluster([*flags, "--output-dir", str(first)], tmp_path, "first")
    assert "2 processes (this is process 0)" in out0 and "global batch 4 = 2 per device x 2" in out0
    assert "saved" not in out1 and "step 1/4" not in out1  # process 1 trains silently
    assert (first / "checkpoint-2").is_dir() and (first / "checkpoint-4").is_dir()
    assert (first / "latest").exists() and (first / "training_summary.json").exists()
    assert not list(first.glob(".*tmp*")), "only process 0 writes checkpoints"
    # Both processes restore checkpoint-2 and continue exactly as the uninterrupted run did.
    out0, _ = _cluster([*flags, "--output-dir", str(second), "--resume-from", str(first / "checkpoint-2")],
                       tmp_path, "second")
    assert "resumed from" in out0
    assert _losses(second) == pytest.approx(_losses(first)[2:], abs=1e-5)


def test_bfloat16_is_the_default_on_an_accelerator_unless_chosen():
    cpu = {"devices": {"cpu": 1}}
    gpu = {"devices": {"gpu": 8, "cpu": 1}}
    cfg = config_lib.resolve_config({"model.model_preset": "nano"})
    assert dl.device_defaults(cfg, cpu) is None and not config_lib.derive(cfg).use_mixed_precision
    line = dl.device_defaults(cfg, gpu)
    assert config_lib.derive(cfg, accel="gpu").use_mixed_precision
    assert "bfloat16 compute" in line and "flash attention on" in line
    assert not cfg.optimization.use_mixed_precision  # the spec stays as resolved; the default is a derived value
    cfg = config_lib.resolve_config({"model.model_preset": "nano", "optimization.use_mixed_precision": False,
                                     "model.flash_attention": False})
    line = dl.device_defaults(cfg, gpu)
    assert not config_lib.derive(cfg, accel="gpu").use_mixed_precision and "bfloat16 off as given" in line
    assert "off (--no-flash-attention)" in line
