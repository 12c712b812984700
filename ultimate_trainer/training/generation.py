"""Text sampling from a trained `CausalLM` (greedy, temperature, top-k)."""

import numpy as np


def sample_text(model, tokenizer, prompt, max_new_tokens=200, temperature=0.8, top_k=40, seed=0):
    """Continues `prompt`; returns the prompt plus the sampled continuation.

    Each new token recomputes the full window at one fixed shape, so the
    backend compiles the forward pass once.

    Example:
        sample_text(model, tokenizer, "def ", max_new_tokens=50, temperature=0)  # greedy
    """
    rng = np.random.default_rng(seed)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    generated = []
    window = model.seq_len
    for _ in range(max_new_tokens):
        context = (ids + generated)[-window:]
        x = np.full((1, window), tokenizer.pad_id, dtype="int32")
        x[0, : len(context)] = context
        # Causal attention: right padding does not change the logits at len(context) - 1.
        logits = np.asarray(model.predict_on_batch(x)[0, len(context) - 1], dtype="float64")
        token = _pick(logits, temperature, top_k, rng)
        if token == tokenizer.eos_id:
            break
        generated.append(token)
    return prompt + tokenizer.decode(generated)


def _pick(logits, temperature, top_k, rng):
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return int(rng.choice(logits.shape[-1], p=probs))
