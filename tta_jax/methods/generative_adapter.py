"""Generative Adapter (Chen et al., ICLR 2025, arXiv 2411.05877).

A trained generator turns a streamed context into a low-rank adapter of
the frozen LM in one forward pass per chunk, with no gradient step:
`absorb` runs each chunk under the adapter of the chunks before it and
adds its per-layer Gram state (`models.generators.generative_adapter`);
`answer` and `score` run the prompt alone (closed-book, positions from 0)
under the adapter of everything absorbed so far. The state is d_r × d_r
floats per layer whatever the context length, where prompting's KV cache
grows with every token.

    method = generative_adapter.generative_adapter(
        lm_config, generator=dict(d_r=128, rank=16, alpha=8.0, window=128),
        max_new_tokens=12, stop_ids=tok.stop_ids)
    state = method.init(params, rng, batch_size)
    state = method.absorb(params, state, chunk, meta=gen_params)
    gen = method.answer(params, state, prompt, meta=gen_params)

The generator parameters are the method's meta-parameters (`meta`), made
by `tta_jax.trainers.generative_adapter`.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tta_jax._src import context
from tta_jax.models.generators import generative_adapter as ga
from tta_jax.models.lm import generate, model


class GAState(NamedTuple):
  context: ga.State  # S [L, B, d_r, d_r] and tokens absorbed [B]
  rng: jax.Array  # base key of the randomised SVD (unused when exact)
  chunks: jax.Array  # int32: chunks absorbed (folded into the SVD key)


def generator_config(generator: ga.GAConfig | Mapping[str, Any] | None):
  if isinstance(generator, ga.GAConfig):
    return generator
  return ga.GAConfig.from_dict(dict(generator or {}))


def generative_adapter(
  config: model.LlamaConfig,
  *,
  generator: ga.GAConfig | Mapping[str, Any] | None = None,
  max_new_tokens: int = 16,
  stop_ids: tuple[int, ...] = (),
  pad_id: int = 0,
  sampling: generate.Sampling = generate.GREEDY,
) -> context.ContextMethod:
  """Answers from an adapter generated from the context.

  Args:
    config: the frozen LM's architecture.
    generator: the generator's `GAConfig` (or its fields as a dict); must
      match the trained generator passed as `meta`.
    max_new_tokens, stop_ids, pad_id, sampling: as in
      `prompting.no_context`.

  Returns:
    A `ContextMethod` whose state is the running Gram state of every
    adapted layer (d_r x d_r per layer and row) and the key of the
    randomised SVD; its `meta` is the generator's parameters.

  References:
    Chen et al., Generative Adapter: Contextualizing Language Models in
    Parameters with a Single Forward Pass, ICLR 2025.
  """
  gc = generator_config(generator)

  def check(meta):
    if meta is None:
      raise ValueError(
        'generative_adapter needs the trained generator as meta= (train '
        'one with experiments.meta_train_main)'
      )
    ga.check_params(meta, gc, config)

  def key_of(state):
    return jax.random.fold_in(state.rng, state.chunks)

  def lowrank(meta, state):
    return ga.adapter(meta, state.context, gc, key=key_of(state))

  decode = dict(
    config=config,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    stop_ids=stop_ids,
    pad_id=pad_id,
  )

  def init_fn(params, rng, batch_size):
    del params
    return GAState(
      ga.init_state(gc, config, batch_size), rng, jnp.zeros([], jnp.int32)
    )

  def absorb_fn(params, state, chunk, *, meta=None):
    check(meta)
    new = ga.update(
      meta,
      params,
      state.context,
      chunk.tokens,
      chunk.mask,
      config=gc,
      lm_config=config,
      key=key_of(state),
    )
    return GAState(new, state.rng, state.chunks + 1)

  def answer_fn(params, state, prompt, *, meta=None, rng=None):
    check(meta)
    return generate.answer(
      params, prompt, rng, **decode, lowrank=lowrank(meta, state)
    )

  def score_fn(params, state, text, *, meta=None):
    check(meta)
    out = ga.apply(
      params,
      lowrank(meta, state),
      text.tokens,
      text.mask,
      lm_config=config,
    )
    return model.token_logprobs(out.logits, text.tokens)

  return context.ContextMethod(init_fn, absorb_fn, answer_fn, score_fn)
