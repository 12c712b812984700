"""Text generation from a trained `CausalLM`: greedy, temperature, top-k and top-p.

With the cache (the default) each new token costs one position: the model's
state (`CausalLM.initial_state`) holds the attention blocks' keys and values
and the TTT blocks' inner weights. Several prompts decode together, one row
each (`generate_batch`, what the end-of-run samples use): as many tokens of
each prompt as the shortest one holds run in one call, eagerly (a TTT block
splits them into mini-batches at Python positions), then every row advances
one position per compiled step, a longer prompt's row fed its own next token
until its prompt is used up. A step costs
about the same for 1 row as for 3 on a CPU, so 3 samples take the time of
one. Without the cache every token recomputes the whole window at one fixed
shape (compiled once), which is what the cache is measured against.
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
    if use_cache:
        texts, stats = generate_batch(model, tokenizer, [prompt], max_new_tokens, temperature, top_k, top_p, [seed])
        return texts[0], stats
    rng = np.random.default_rng(seed)
    ids = _prompt_ids(model, tokenizer, prompt)
    start = time.perf_counter()
    generated = []
    with no_grad():  # the steps run inside (generators)
        for logits in _recomputed_steps(model, tokenizer, ids, max_new_tokens, generated):
            token = pick(np.asarray(logits, dtype="float64"), temperature, top_k, top_p, rng)
            if token == tokenizer.eos_id:
                break
            generated.append(token)
    return prompt + tokenizer.decode(generated), _stats([generated], time.perf_counter() - start, False)


def generate_batch(model, tokenizer, prompts, max_new_tokens=200, temperature=0.8, top_k=40, top_p=1.0, seeds=None):
    """Continues each of `prompts` with the cache, all in one batch, each row
    with its own random stream (`seeds`, default 0, 1, ...); returns (texts, stats).

    A row's text is what `generate` gives for that prompt and seed alone: rows
    share no state, and a row that ends (end of text, `max_new_tokens`, the
    window full) only waits for the others.

    Example:
        texts, stats = generate_batch(model, tokenizer, ["The ", "def "], max_new_tokens=50)
    """
    rows = [_prompt_ids(model, tokenizer, p) for p in prompts]
    rngs = [np.random.default_rng(s) for s in (seeds if seeds is not None else range(len(rows)))]
    generated = [[] for _ in rows]
    done = [max_new_tokens <= 0 for _ in rows]
    start = time.perf_counter()
    with no_grad():
        step = compile_model_fn(model, model.call_with_state)  # one shape: a token per row
        position = min(len(r) for r in rows)  # each row's first `position` tokens run in one call
        logits, state = model.call_with_state(np.array([r[:position] for r in rows], dtype="int32"),
                                              model.initial_state(len(rows), max_length=model.seq_len), 0)
        while True:
            last = keras.ops.convert_to_numpy(logits[:, -1])
            tokens = []
            for i, row in enumerate(rows):
                if position < len(row):  # still inside its prompt: fed, not sampled
                    tokens.append(row[position])
                    continue
                if not done[i]:
                    token = pick(np.asarray(last[i], dtype="float64"), temperature, top_k, top_p, rngs[i])
                    done[i] = token == tokenizer.eos_id
                    if not done[i]:
                        generated[i].append(token)
                        done[i] = len(generated[i]) >= max_new_tokens
                tokens.append(generated[i][-1] if generated[i] else tokenizer.eos_id)  # a finished row's is unused
            # The cache holds seq_len positions, the longest context the model trained on.
            if all(done) or position >= model.seq_len:
                break
            logits, state = step(np.array(tokens, dtype="int32")[:, None], state, np.int32(position))
            position += 1
    texts = [p + tokenizer.decode(g) for p, g in zip(prompts, generated)]
    return texts, _stats(generated, time.perf_counter() - start, True)


def _prompt_ids(model, tokenizer, prompt):
    return (tokenizer.encode(prompt) or [tokenizer.eos_id])[-model.seq_len:]


def _stats(generated, seconds, cache):
    new = sum(len(g) for g in generated)
    return {"new_tokens": new, "seconds": seconds, "tokens_per_sec": new / max(seconds, 1e-9), "cache": cache}


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


def sample_texts(model, tokenizer, prompts, max_new_tokens=200, temperature=0.8, top_k=40, seed=0):
    """The end-of-training samples, all in one batch: prompt i with seed `seed + i`, texts only.

    Example:
        sample_texts(model, tokenizer, ["The ", "def "], max_new_tokens=100)
    """
    seeds = [seed + i for i in range(len(prompts))]
    return generate_batch(model, tokenizer, list(prompts), max_new_tokens, temperature, top_k, 1.0, seeds)[0]
