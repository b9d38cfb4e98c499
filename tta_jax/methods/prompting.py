"""The two reference points of LM context methods: no context, full prompt.

`no_context` answers closed-book: the context is ignored, so it measures
what the frozen LM already knows. `prompting` keeps the whole context in
the prompt: `absorb` prefills each chunk into a KV cache (exactly
equivalent to one long prompt, positions continuing across chunks) and
`answer` continues that cache with the question. Methods that put the
context into the weights (a generated adapter, a LoRA fitted on the
context) sit between the two; `LM_METHODS` registers them all.

    method = prompting.prompting(config, max_context_tokens=1024,
                                 max_new_tokens=16, stop_ids=tok.stop_ids)
    state = method.init(params, rng, batch_size=8)
    state = method.absorb(params, state, TokenChunk(tokens, mask))
    gen = method.answer(params, state, TokenChunk(prompt, prompt_mask))
"""

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp

from tta_jax._src import context
from tta_jax.methods import generative_adapter, lora_sft
from tta_jax.models.lm import generate, model


class NoContextState(NamedTuple):
  """Nothing: the context is never looked at."""


class PromptingState(NamedTuple):
  cache: model.KVCache  # the context's keys/values, [L, B, S, Hkv, Dh]


def _score(params, config, text, cache=None):
  out = model.apply(
    params,
    text.tokens,
    config=config,
    mask=text.mask,
    cache=None
    if cache is None
    else generate.grow_cache(cache, text.tokens.shape[1]),
  )
  return model.token_logprobs(out.logits, text.tokens)


def no_context(
  config: model.LlamaConfig,
  *,
  max_new_tokens: int = 16,
  stop_ids: tuple[int, ...] = (),
  pad_id: int = 0,
  sampling: generate.Sampling = generate.GREEDY,
) -> context.ContextMethod:
  """Closed-book answers of the frozen LM (the context is ignored).

  Args:
    config: the LM's architecture.
    max_new_tokens: answer length budget.
    stop_ids: tokens that end an answer (e.g. the tokenizer's `stop_ids`).
    pad_id: written after an answer stops.
    sampling: greedy by default; sampling uses `fold_in(rng, i)`.
  """

  decode = dict(
    config=config,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    stop_ids=stop_ids,
    pad_id=pad_id,
  )

  def init_fn(params, rng, batch_size):
    del params, rng, batch_size
    return NoContextState()

  def absorb_fn(params, state, chunk, *, meta=None):
    del params, chunk, meta
    return state

  def answer_fn(params, state, prompt, *, meta=None, rng=None):
    del state, meta
    return generate.answer(params, prompt, rng, **decode)

  def score_fn(params, state, text, *, meta=None):
    del state, meta
    return _score(params, config, text)

  return context.ContextMethod(init_fn, absorb_fn, answer_fn, score_fn)


def prompting(
  config: model.LlamaConfig,
  *,
  max_context_tokens: int,
  max_new_tokens: int = 16,
  stop_ids: tuple[int, ...] = (),
  pad_id: int = 0,
  sampling: generate.Sampling = generate.GREEDY,
  cache_dtype: str | None = None,
) -> context.ContextMethod:
  """The whole context in the prompt, prefilled chunk by chunk.

  Args:
    config: the LM's architecture.
    max_context_tokens: cache slots for the context (chunks, padding
      included, must fit; the runner sizes it to the longest stream).
    max_new_tokens, stop_ids, pad_id, sampling: as in `no_context`.
    cache_dtype: KV-cache dtype (default: the compute dtype).
  """

  decode = dict(
    config=config,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    stop_ids=stop_ids,
    pad_id=pad_id,
  )

  def init_fn(params, rng, batch_size):
    del params, rng
    return PromptingState(
      model.init_cache(config, batch_size, max_context_tokens, cache_dtype)
    )

  def absorb_fn(params, state, chunk, *, meta=None):
    del meta
    out = model.apply(
      params,
      chunk.tokens,
      config=config,
      mask=chunk.mask,
      cache=state.cache,
      return_logits=False,
    )
    return PromptingState(out.cache)

  def answer_fn(params, state, prompt, *, meta=None, rng=None):
    del meta
    return generate.answer(params, prompt, rng, **decode, cache=state.cache)

  def score_fn(params, state, text, *, meta=None):
    del meta
    return _score(params, config, text, state.cache)

  return context.ContextMethod(init_fn, absorb_fn, answer_fn, score_fn)


def context_fits(state) -> bool:
  """Whether the absorbed chunks fitted the KV cache (a host-side check:
  under `jit` an overflowing write would be clamped, not raised)."""
  cache = getattr(state, 'cache', None)
  return cache is None or int(jnp.max(cache.index)) <= cache.size


# Name -> factory(config, **kwargs) -> ContextMethod. The language-model
# counterpart of `tta_jax.methods.METHODS`.
LM_METHODS: dict[str, Callable[..., context.ContextMethod]] = {
  'no_context': no_context,
  'prompting': prompting,
  'lora_sft': lora_sft.lora_sft,
  'generative_adapter': generative_adapter.generative_adapter,
}
