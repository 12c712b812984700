"""How a `CausalLMBackbone`'s weights are laid out on a device mesh: the
`keras.distribution.LayoutMap` of every block type. Its own module (keras
alone) so `distribution.py` reads it without importing the model."""

# Weights that stay whole on every device on purpose: norms and biases (a
# d_model vector each), per-token offsets, scalars, the MoE routing
# statistics and the dropout RNG states. Anything else that ends up fully
# replicated under fsdp/model is reported (distribution.check_layouts).
REPLICATED_WEIGHTS = (
    r".*/(attention_norm|mlp_norm|final_norm|pre_conv/norm|ttt/post_norm)/(scale|gamma|beta)",
    r".*/(ttt/conv_q|ttt/conv_k|pre_conv/conv)/bias",
    r".*/(attention/out|mlp/down)/bias",
    r".*/ttt/token_offset",
    r".*/moe/stat_[a-z_]+",
    r".*/stream_step",
    r"(.*/)?seed_generator(_[0-9]+)?/seed_generator_state",
)


def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch", fsdp=False):
    """A `keras.distribution.LayoutMap` for every weight of every block type.

    Megatron-style tensor parallelism on the model axis: column-parallel
    input projections (fused QKV, gate/up, the TTT projections), row-
    parallel output projections, per-head TTT inner weights split by
    head, MoE experts split by expert (expert parallelism), the
    embeddings split along d_model and the LM head along the vocab.
    With `fsdp`, each weight's other large axis is also split along the
    data axis (weights gathered per use, ZeRO-3 style). Axes absent from
    the mesh are left whole. Carried TTT states (`--state-passing`) are
    split by batch row on the data axis. `REPLICATED_WEIGHTS` are
    declared whole. A dimension the mesh axis does not divide is left to
    `distribution.py`, which moves the axis to a dimension it divides or
    keeps the weight whole and says so.

    Example:
        mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"))
        layout_map = get_layout_map(mesh, fsdp=True)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
        model = build_causal_lm(model_cfg, vocab_size)   # weights created sharded
    """
    import keras  # heavy: here, not above: distribution.py imports this module before the backend is chosen

    axes = device_mesh.axis_names
    m = model_parallel_dim_name if model_parallel_dim_name in axes else None
    b = data_parallel_dim_name if data_parallel_dim_name in axes else None
    d = b if fsdp else None
    rules = {
        # embeddings: lookups split along d_model; logits along the vocab
        r".*/token_embedding/embeddings": (d, m),
        r".*/token_embedding/reverse_embeddings": (d, m),
        r".*/position_embedding/embeddings": (d, m),
        # attention and dense MLP
        r".*/attention/qkv/kernel": (d, m),
        r".*/attention/out/kernel": (m, d),
        r".*/mlp/(gate_up|up)/kernel": (d, m),
        r".*/mlp/down/kernel": (m, d),
        # biases of column-parallel projections follow their output columns
        r".*/attention/qkv/bias": (m,),
        r".*/mlp/(gate_up|up)/bias": (m,),
        # LoRA adapters: the rank axis stays whole, the other follows the base kernel
        r".*/(attention/qkv|mlp/gate_up|mlp/up)/lora_kernel_a": (d, None),
        r".*/(attention/qkv|mlp/gate_up|mlp/up)/lora_kernel_b": (None, m),
        r".*/(attention/out|mlp/down)/lora_kernel_a": (m, None),
        r".*/(attention/out|mlp/down)/lora_kernel_b": (None, d),
        # TTT: projections as attention; inner weights [heads, in, out] by head
        r".*/ttt/(q_proj|k_proj|v_proj|gate)/kernel": (d, m),
        r".*/ttt/o_proj/kernel": (m, d),
        r".*/ttt/w1": (m, None, d),
        r".*/ttt/w2": (m, d, None),
        r".*/ttt/(b1|b2|ttt_norm_scale|ttt_norm_bias|lr_bias)": (m,),
        r".*/ttt/lr_weight": (m, d),
        # depthwise convs [kernel, channels, 1] by channel (TTT share-QK and the Mamba-style pre-conv);
        # Keras layouts name one mesh axis per dimension: the model axis, else the data axis
        r".*/(ttt/conv_q|ttt/conv_k|pre_conv/conv)/kernel": (None, m or d),
        # MoE: experts [experts, in, out] by expert; the router by expert
        r".*/moe/experts_(gate_up|up)": (m, d, None),
        r".*/moe/experts_down": (m, None, d),
        r".*/moe/router/kernel": (d, m),
        # TTT state passing: one carried state per batch row, split with the batch
        r".*/carried_state_[0-9]+_[0-9]+": (b,),
    }
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for pattern, spec in rules.items():
        layout_map[pattern] = spec
    for pattern in REPLICATED_WEIGHTS:
        layout_map[pattern] = ()
    return layout_map
