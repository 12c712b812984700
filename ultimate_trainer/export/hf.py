"""Export a trained `CausalLM` to a Hugging Face transformers model directory.

LLaMA-style models (RoPE, RMSNorm, SwiGLU) become `LlamaForCausalLM`,
GPT-2-style models (learned positions, LayerNorm, GELU) `GPT2LMHeadModel`.
Projection biases (`use_bias`) map to GPT-2's, or to LLaMA's
`attention_bias` and `mlp_bias`; a bias-free model exports zero biases to
GPT-2, which always has them.
The transformers model is built on torch CPU, filled with our weights and
written by its own `save_pretrained` (`config.json`, `model.safetensors`,
`generation_config.json`). What the target cannot hold is refused with a
`UserError`, never approximated.

The tokenizer is saved in our own form (`ut_tokenizer.json`, plus
`tokenizer.model` or `vocab.json` + `merges.txt`; reload it with
`ultimate_trainer.data.tokenizers.load_tokenizer`); no transformers tokenizer
is made up for it. Its EOS and PAD ids go into the transformers config.

Example:
    from ultimate_trainer import load_model
    from ultimate_trainer.export.hf import export_hf
    model, tokenizer = load_model("output_ultimate/checkpoint-159")
    export_hf(model, tokenizer, "nano-hf")
"""

import os
import shutil
from pathlib import Path

import numpy as np

from ultimate_trainer.errors import UserError

INSTALL_HINT = 'pip install "ultimate_trainer[hf]" (transformers and safetensors)'


def check_output_dir(out_dir):
    """Refuses an output path that is a file or a non-empty directory."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; name a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--output {out} already holds files; name a new or empty directory (nothing is overwritten)")
    return out


def export_hf(model, tokenizer, out_dir):
    """Writes `model` (and `tokenizer`, unless None) as a transformers directory.

    Returns the list of files written, relative to `out_dir`. The directory
    is written whole into a temporary sibling, then renamed into place.
    """
    if getattr(model, "ttt", None):
        raise UserError(
            "this checkpoint has TTT layers, which transformers has no model class for; "
            "export works for attention models (llama- and gpt2-style)"
        )
    if getattr(model, "moe", None):
        raise UserError(
            "this checkpoint has mixture-of-experts blocks; export writes LlamaForCausalLM / GPT2LMHeadModel, "
            "which have none, so it works for dense models only"
        )
    out = check_output_dir(out_dir)
    hf_model = to_transformers(model, tokenizer)
    from transformers.utils import logging as hf_logging  # optional: transformers (the [hf] extra)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from an earlier failed export in this process
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        hf_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        check_output_dir(out)  # still new or empty: os.replace may only replace an empty directory
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def to_transformers(model, tokenizer=None):
    """Returns the transformers torch model (CPU, float32) holding `model`'s weights."""
    try:
        # optional: torch and transformers (the [hf] extra)
        import torch
        import transformers
    except ImportError as e:
        raise UserError(f"export to hf needs transformers and torch ({e}); {INSTALL_HINT}") from None
    style = _style(model)
    make_config = _llama_config if style == "llama" else _gpt2_config
    config = make_config(model, transformers, **_token_ids(model, tokenizer))
    weights = _llama_weights(model) if style == "llama" else _gpt2_weights(model)

    hf_class = transformers.LlamaForCausalLM if style == "llama" else transformers.GPT2LMHeadModel
    hf_model = hf_class(config).to(torch.float32).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping drifted from {hf_class.__name__}: missing {missing}, unexpected {unexpected}")
    return hf_model


def _style(model):
    quantized = [layer.name for layer in model._flatten_layers() if getattr(layer, "quantization_mode", None)]
    if quantized:
        raise UserError(
            f"export to hf takes float weights but layer {quantized[0]!r} is quantized; export the checkpoint "
            "saved before quantization"
        )
    flags = (model.use_rope, model.use_rmsnorm, model.use_swiglu)
    if all(flags):
        return "llama"
    if not any(flags):
        return "gpt2"
    raise UserError(
        f"export to hf takes LLaMA-style (RoPE, RMSNorm, SwiGLU) or GPT-2-style blocks; this model mixes them "
        f"(use_rope={flags[0]}, use_rmsnorm={flags[1]}, use_swiglu={flags[2]}), which no transformers class holds"
    )


def _token_ids(model, tokenizer):
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer.vocab_size != model.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model {model.vocab_size}; "
            "export a checkpoint with its own tokenizer"
        )
    # No BOS: training put EOS after each document and never a BOS before one.
    return {"bos_token_id": None, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def _np(variable):
    # A Dense layer's `kernel` already adds a LoRA adapter's A @ B * alpha / rank: adapters are merged.
    import keras  # heavy: the CLI imports this module before the backend is chosen

    return keras.ops.convert_to_numpy(variable).astype("float32")


def _heads(model):
    attention = model.blocks[0].attention
    return attention.num_heads, attention.num_kv_heads, attention.head_dim


def _rope_theta(model):
    rotary = model.blocks[0].attention.rotary
    c = rotary.get_config()
    # keras_hub's "linear" with factor 1 is plain RoPE, transformers' "default".
    plain = c["scaling_factor"] == 1.0 and c["rope_type"] != "yarn" and c["denominator_dim"] in (None, _heads(model)[2])
    if not plain:
        raise UserError(f"export to hf supports plain RoPE only; this model's rotary embedding is {c['rope_type']} scaled")
    return float(rotary.max_wavelength)


def _lm_head(model):
    """[vocab, d] for an untied head; None when tied to the token embedding."""
    if model.tie_embeddings:
        return None
    return _np(model.token_embedding.reverse_embeddings).T  # stored [d, vocab]


def _llama_config(model, transformers, **token_ids):
    num_heads, num_kv_heads, head_dim = _heads(model)
    return transformers.LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.d_model,
        intermediate_size=model.d_ff,
        num_hidden_layers=model.num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=model.seq_len,
        rms_norm_eps=float(model.final_norm.epsilon),
        rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(model)},
        attention_bias=bool(model.use_bias),
        mlp_bias=bool(model.use_bias),
        attention_dropout=0.0,
        tie_word_embeddings=bool(model.tie_embeddings),
        dtype="float32",
        **token_ids,
    )


def _llama_weights(model):
    num_heads, num_kv_heads, head_dim = _heads(model)
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    weights = {"model.embed_tokens.weight": _np(model.token_embedding.embeddings)}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        qkv = _np(block.attention.qkv.kernel)  # [d, q | k | v]
        gate_up = _np(block.mlp.up.kernel)  # [d, gate | up]
        weights.update({
            p + "input_layernorm.weight": _np(block.attention_norm.scale),
            p + "self_attn.q_proj.weight": qkv[:, :q_width].T,
            p + "self_attn.k_proj.weight": qkv[:, q_width:q_width + kv_width].T,
            p + "self_attn.v_proj.weight": qkv[:, q_width + kv_width:].T,
            p + "self_attn.o_proj.weight": _np(block.attention.out.kernel).T,
            p + "post_attention_layernorm.weight": _np(block.mlp_norm.scale),
            p + "mlp.gate_proj.weight": gate_up[:, :model.d_ff].T,
            p + "mlp.up_proj.weight": gate_up[:, model.d_ff:].T,
            p + "mlp.down_proj.weight": _np(block.mlp.down.kernel).T,
        })
        if model.use_bias:
            qkv_bias, gate_up_bias = _np(block.attention.qkv.bias), _np(block.mlp.up.bias)
            weights.update({
                p + "self_attn.q_proj.bias": qkv_bias[:q_width],
                p + "self_attn.k_proj.bias": qkv_bias[q_width:q_width + kv_width],
                p + "self_attn.v_proj.bias": qkv_bias[q_width + kv_width:],
                p + "self_attn.o_proj.bias": _np(block.attention.out.bias),
                p + "mlp.gate_proj.bias": gate_up_bias[:model.d_ff],
                p + "mlp.up_proj.bias": gate_up_bias[model.d_ff:],
                p + "mlp.down_proj.bias": _np(block.mlp.down.bias),
            })
    weights["model.norm.weight"] = _np(model.final_norm.scale)
    head = _lm_head(model)
    if head is not None:
        weights["lm_head.weight"] = head
    return weights


def _gpt2_config(model, transformers, **token_ids):
    num_heads, num_kv_heads, head_dim = _heads(model)
    if num_kv_heads != num_heads:
        raise UserError(
            f"GPT-2 has no grouped-query attention but this model has {num_kv_heads} KV heads for {num_heads} "
            "query heads; retrain with num_kv_heads equal to num_heads or use LLaMA-style blocks"
        )
    if head_dim * num_heads != model.d_model:
        raise UserError(f"GPT-2 needs num_heads to divide d_model; this model has {num_heads} heads of {head_dim}")
    if model.activation != "gelu":
        raise UserError(
            f"GPT-2 uses GELU (tanh approximation) but this model uses {model.activation}; "
            "transformers' GPT2LMHeadModel would compute something else, so it is not exported"
        )
    return transformers.GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=model.seq_len,
        n_embd=model.d_model,
        n_layer=model.num_layers,
        n_head=num_heads,
        n_inner=model.d_ff,
        activation_function="gelu_new",
        layer_norm_epsilon=float(model.final_norm.epsilon),
        resid_pdrop=float(model.dropout_rate),
        embd_pdrop=float(model.dropout_rate),
        attn_pdrop=0.0,
        scale_attn_weights=True,
        tie_word_embeddings=bool(model.tie_embeddings),
        dtype="float32",
        **token_ids,
    )


def _bias(dense):
    """A Dense layer's bias, or zeros where the model has none (GPT-2 always has one)."""
    return _np(dense.bias) if dense.use_bias else np.zeros(dense.units, "float32")


def _gpt2_weights(model):
    weights = {
        "transformer.wte.weight": _np(model.token_embedding.embeddings),
        "transformer.wpe.weight": _np(model.position_embedding.position_embeddings),
    }
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        # transformers' GPT-2 Conv1D stores [in, out], as keras Dense kernels do.
        weights.update({
            p + "ln_1.weight": _np(block.attention_norm.gamma),
            p + "ln_1.bias": _np(block.attention_norm.beta),
            p + "attn.c_attn.weight": _np(block.attention.qkv.kernel),
            p + "attn.c_attn.bias": _bias(block.attention.qkv),
            p + "attn.c_proj.weight": _np(block.attention.out.kernel),
            p + "attn.c_proj.bias": _bias(block.attention.out),
            p + "ln_2.weight": _np(block.mlp_norm.gamma),
            p + "ln_2.bias": _np(block.mlp_norm.beta),
            p + "mlp.c_fc.weight": _np(block.mlp.up.kernel),
            p + "mlp.c_fc.bias": _bias(block.mlp.up),
            p + "mlp.c_proj.weight": _np(block.mlp.down.kernel),
            p + "mlp.c_proj.bias": _bias(block.mlp.down),
        })
    weights["transformer.ln_f.weight"] = _np(model.final_norm.gamma)
    weights["transformer.ln_f.bias"] = _np(model.final_norm.beta)
    head = _lm_head(model)
    if head is not None:
        weights["lm_head.weight"] = head
    return weights
