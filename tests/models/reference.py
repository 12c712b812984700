"""Independent numpy implementations of the model's pieces, for comparisons."""

import numpy as np


def rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def layer_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def rope(x, base=10000.0):
    """Rotary embedding on [batch, seq, heads, dim], rotate-half convention (LLaMA/HF)."""
    seq, dim = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    angles = np.arange(seq)[:, None] * inv_freq[None, :]  # [seq, dim/2]
    cos = np.concatenate([np.cos(angles)] * 2, -1)[None, :, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, -1)[None, :, None, :]
    half = dim // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + np.exp(-x))


def causal_attention(x, w_qkv, w_out, num_heads, num_kv_heads, use_rope=True, b_qkv=0.0, b_out=0.0):
    b, t, d = x.shape
    hd = d // num_heads
    qkv = x @ w_qkv + b_qkv
    q = qkv[..., : num_heads * hd].reshape(b, t, num_heads, hd)
    k = qkv[..., num_heads * hd : (num_heads + num_kv_heads) * hd].reshape(b, t, num_kv_heads, hd)
    v = qkv[..., (num_heads + num_kv_heads) * hd :].reshape(b, t, num_kv_heads, hd)
    if use_rope:
        q, k = rope(q), rope(k)
    group = num_heads // num_kv_heads
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    mask = np.tril(np.ones((t, t), bool))
    scores = np.where(mask, scores, -np.inf)
    y = np.einsum("bhqk,bkhd->bqhd", softmax(scores), v).reshape(b, t, d)
    return y @ w_out + b_out


def feed_forward(x, w_up, w_down, use_swiglu=True, activation="gelu", b_up=0.0, b_down=0.0):
    h = x @ w_up + b_up
    if use_swiglu:
        gate, up = np.split(h, 2, axis=-1)
        h = silu(gate) * up
    else:
        h = {"gelu": gelu_tanh, "relu": lambda a: np.maximum(a, 0), "silu": silu}[activation](h)
    return h @ w_down + b_down
