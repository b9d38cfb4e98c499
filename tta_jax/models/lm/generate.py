"""Generation with a KV cache: one jitted program per shape.

`generate` prefills the prompt into a cache (optionally after a cached
prefix, e.g. a context), then decodes inside a `lax.while_loop` that stops
when every sequence has produced a stop token or `max_new_tokens` are done.
Prompts may be left- or right-padded: padding slots are masked, rotary
positions count real tokens only, and each sequence's first new token is
predicted from its own last real token.

Shapes are static under `jit`; `pad_to_bucket` rounds prompt lengths up so
that prompts of similar lengths share one compiled program.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax.models.lm import model as model_lib


class Sampling(NamedTuple):
  """How the next token is chosen (hashable: a static argument).

  temperature 0 is greedy (argmax); otherwise logits / temperature are
  restricted to the `top_k` largest (0: all) and to the smallest set with
  probability >= `top_p`, then sampled with an explicit key.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


GREEDY = Sampling()


class Generation(NamedTuple):
  tokens: jax.Array  # [B, N] int32: new tokens, `pad_id` after a stop
  lengths: jax.Array  # [B] int32: new tokens before the first stop token
  stopped: jax.Array  # [B] bool: a stop token was produced
  logprobs: jax.Array  # [B, N] float32: log p of each chosen token


def _choose(logits, key, sampling: Sampling):
  """Next tokens [B] from logits [B, V]."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / sampling.temperature
  neg = jnp.finfo(logits.dtype).min
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if sampling.top_p < 1.0:
    order = jnp.sort(logits, -1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(order, -1), -1)
    # The smallest logit still inside the nucleus (the top one always is).
    inside = jnp.concatenate(
      [jnp.ones_like(cum[:, :1], bool), cum[:, :-1] < sampling.top_p], -1
    )
    cutoff = jnp.min(jnp.where(inside, order, jnp.inf), -1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(key, logits, -1).astype(jnp.int32)


def grow_cache(cache: model_lib.KVCache, extra: int) -> model_lib.KVCache:
  """`cache` with `extra` more empty slots."""
  pad = [(0, 0)] * cache.k.ndim
  pad[2] = (0, extra)
  return cache._replace(
    k=jnp.pad(cache.k, pad),
    v=jnp.pad(cache.v, pad),
    mask=jnp.pad(cache.mask, ((0, 0), (0, extra))),
    positions=jnp.pad(cache.positions, ((0, 0), (0, extra))),
  )


def last_real(mask: jax.Array) -> jax.Array:
  """Index [B] of the last True of each row of mask [B, T]."""
  t = mask.shape[1]
  return (t - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


@functools.partial(
  jax.jit,
  static_argnames=(
    'config',
    'max_new_tokens',
    'sampling',
    'stop_ids',
    'pad_id',
  ),
)
def _generate(
  params,
  tokens,
  mask,
  rng,
  cache,
  lowrank,
  *,
  config,
  max_new_tokens,
  sampling,
  stop_ids,
  pad_id,
):
  b, t = tokens.shape
  if cache is None:
    cache = model_lib.init_cache(config, b, t + max_new_tokens)
  else:
    cache = grow_cache(cache, t + max_new_tokens)
  out = model_lib.apply(
    params,
    tokens,
    config=config,
    mask=mask,
    cache=cache,
    lowrank=lowrank,
    return_logits=False,
  )
  final = jnp.take_along_axis(out.final, last_real(mask)[:, None, None], 1)
  logits = model_lib.head(params, final[:, 0], config=config)  # [B, V]
  stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, logits, done, toks, logps = carry
    nxt = _choose(logits, jax.random.fold_in(rng, i), sampling)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nxt[:, None], 1)
    nxt = jnp.where(done, pad_id, nxt)
    toks = toks.at[:, i].set(nxt)
    logps = logps.at[:, i].set(jnp.where(done, 0.0, logp[:, 0]))
    live = ~done
    done = done | jnp.isin(nxt, stops)
    step = model_lib.apply(
      params,
      nxt[:, None],
      config=config,
      mask=live[:, None],
      cache=cache,
      lowrank=lowrank,
      return_logits=False,
    )
    logits = model_lib.head(params, step.final[:, 0], config=config)
    return i + 1, step.cache, logits, done, toks, logps

  toks = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  logps = jnp.zeros((b, max_new_tokens), jnp.float32)
  carry = (jnp.zeros([], jnp.int32), out.cache, logits, jnp.zeros(b, bool))
  _, _, _, done, toks, logps = jax.lax.while_loop(
    cond, body, carry + (toks, logps)
  )
  is_stop = jnp.isin(toks, stops)
  first_stop = jnp.where(
    is_stop.any(1), jnp.argmax(is_stop, 1), max_new_tokens
  ).astype(jnp.int32)
  return Generation(toks, first_stop, done & is_stop.any(1), logps)


def generate(
  params,
  tokens,
  mask=None,
  *,
  config: model_lib.LlamaConfig,
  max_new_tokens: int,
  rng: jax.Array | None = None,
  sampling: Sampling = GREEDY,
  stop_ids: tuple[int, ...] = (),
  pad_id: int = 0,
  cache: model_lib.KVCache | None = None,
  lowrank=None,
) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    params: the model parameters.
    tokens: [B, T] prompts; `mask` [B, T] marks real tokens (left, right or
      any padding). Every row needs at least one real token.
    config: the architecture.
    max_new_tokens: the decoding budget (static).
    rng: a key; required unless `sampling` is greedy. Step i uses
      `fold_in(rng, i)`.
    sampling: greedy or temperature / top-k / top-p sampling.
    stop_ids: token ids that end a sequence (kept in `tokens`, not counted
      in `lengths`).
    pad_id: written after a sequence stops.
    cache: a cached prefix (e.g. a context) the prompt continues; it is
      not modified (a grown copy is used).
    lowrank: per-layer low-rank updates, as in `model.apply`.

  Returns:
    A `Generation`.
  """
  model_lib.check_tokens(tokens, mask)
  if mask is None:
    mask = jnp.ones(tokens.shape, bool)
  try:
    empty = ~np.asarray(mask).any(1)
  except jax.errors.TracerArrayConversionError:  # inside jit: no check
    empty = np.zeros(0, bool)
  if empty.any():
    raise ValueError(
      f'prompt rows {np.flatnonzero(empty).tolist()} have no real token'
    )
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if sampling.temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {sampling.temperature}')
  if sampling.temperature > 0 and rng is None:
    raise ValueError('sampling with temperature > 0 needs an explicit rng key')
  if rng is None:
    rng = jax.random.key(0)
  return _generate(
    params,
    jnp.asarray(tokens, jnp.int32),
    jnp.asarray(mask, bool),
    rng,
    cache,
    lowrank,
    config=config,
    max_new_tokens=int(max_new_tokens),
    sampling=sampling,
    stop_ids=tuple(int(s) for s in stop_ids),
    pad_id=int(pad_id),
  )


def bucket_length(n: int, multiple: int = 32) -> int:
  """`n` rounded up to a multiple (so similar lengths share a program)."""
  return max(multiple, -(-n // multiple) * multiple)


def pad_to_bucket(tokens, mask, *, multiple: int = 32, side: str = 'left',
                  pad_id: int = 0):  # fmt: skip
  """Pads [B, T] numpy tokens/mask on `side` to `bucket_length(T)`."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  extra = bucket_length(tokens.shape[1], multiple) - tokens.shape[1]
  width = ((0, 0), (extra, 0) if side == 'left' else (0, extra))
  return (
    np.pad(tokens, width, constant_values=pad_id),
    np.pad(mask, width, constant_values=False),
  )


def answer(params, prompt, rng: jax.Array | None = None, **kwargs):
  """`generate` on a prompt of a context method (`prompt.tokens`,
  `prompt.mask`); `rng` None is key 0. `kwargs` go to `generate` (the
  decoding settings, and a `cache` or `lowrank` adapter)."""
  return generate(
    params,
    prompt.tokens,
    prompt.mask,
    rng=rng if rng is not None else jax.random.key(0),
    **kwargs,
  )


def generate_text(
  lm,
  prompts,
  *,
  max_new_tokens: int = 32,
  chat: bool = False,
  **kwargs,
) -> list[str]:
  """Continuations of text prompts by `lm` (a `load.LM`), a convenience.

  `chat` wraps each prompt as a user message in the model's chat template.
  Other keyword arguments go to `generate` (e.g. `sampling`, `rng`).
  """
  tok = lm.tokenizer
  if chat:
    prompts = [tok.chat([{'role': 'user', 'content': p}]) for p in prompts]
  ids, mask = tok.encode_batch(prompts, side='left', multiple=32)
  gen = generate(
    lm.params,
    ids,
    mask,
    config=lm.config,
    max_new_tokens=max_new_tokens,
    stop_ids=tok.stop_ids,
    pad_id=tok.pad_id,
    **kwargs,
  )
  toks, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
  return [tok.decode(t[:n]) for t, n in zip(toks, lengths, strict=True)]
