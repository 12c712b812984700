"""Text generation from a trained `CausalLM`: greedy, temperature, top-k and top-p.

With the cache (the default) the prompt is run once and each new token
costs one position: the model's state (`CausalLM.initial_state`) holds the
attention blocks' keys and values and the TTT blocks' inner weights. The
prompt runs eagerly (a TTT block splits it into mini-batches at Python
positions), each further token through one compiled step. Without the
cache every token recomputes the whole window at one fixed shape (compiled
once), which is what the cache is measured against.
"""

import time

import keras
import numpy as np

from ultimate_trainer.backend import compile_model_fn, no_grad


def generate(model, tokenizer, prompt, max_new_tokens=200, temperature=0.8, top_k=40, top_p=1.0, seed=0,
             use_cache=True):
    """Continues `prompt`; returns (text, stats) with the continuation and tokens/s.

    Example:
        text, stats = generate(model, tokenizer, "def ", max_new_tokens=50, temperature=0)  # greedy
    """
    rng = np.random.default_rng(seed)
    ids = (tokenizer.encode(prompt) or [tokenizer.eos_id])[-model.seq_len:]
    step = _cached_steps if use_cache else _recomputed_steps
    start = time.perf_counter()
    generated = []
    with no_grad():  # the steps run inside (generators)
        for logits in step(model, tokenizer, ids, max_new_tokens, generated):
            token = pick(np.asarray(logits, dtype="float64"), temperature, top_k, top_p, rng)
            if token == tokenizer.eos_id:
                break
            generated.append(token)
    seconds = time.perf_counter() - start
    stats = {"new_tokens": len(generated), "seconds": seconds, "tokens_per_sec": len(generated) / max(seconds, 1e-9),
             "cache": use_cache}
    return prompt + tokenizer.decode(generated), stats


def _cached_steps(model, tokenizer, ids, max_new_tokens, generated):
    call = compile_model_fn(model, model.call_with_state)  # one shape: a token
    state = model.initial_state(1, max_length=model.seq_len)
    logits, state = model.call_with_state(np.array([ids], dtype="int32"), state, 0)
    position = len(ids)
    while True:
        yield keras.ops.convert_to_numpy(logits[0, -1])
        # `generate` has appended the token it picked (or stopped iterating).
        if len(generated) >= max_new_tokens or position >= model.seq_len:
            return  # the cache holds seq_len positions, the longest context the model trained on
        logits, state = call(np.array([[generated[-1]]], dtype="int32"), state, np.int32(position))
        position += 1


def _recomputed_steps(model, tokenizer, ids, max_new_tokens, generated):
    window = model.seq_len
    for _ in range(max_new_tokens):
        context = (ids + generated)[-window:]
        x = np.full((1, window), tokenizer.pad_id, dtype="int32")
        x[0, : len(context)] = context
        # Causal attention: right padding does not change the logits at len(context) - 1.
        yield model.predict_on_batch(x)[0, len(context) - 1]


def pick(logits, temperature, top_k, top_p, rng):
    """Chooses the next token: argmax at temperature 0, else a sample after top-k and top-p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # smallest set whose mass reaches top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(logits.shape[-1], p=probs))


def sample_text(model, tokenizer, prompt, max_new_tokens=200, temperature=0.8, top_k=40, seed=0):
    """The end-of-training samples: `generate` with the cache, text only."""
    return generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, 1.0, seed)[0]
