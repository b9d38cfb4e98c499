"""LoRA fitted on the context: a few gradient steps per chunk (baseline).

The cost the Generative Adapter avoids: each context gets its own LoRA
(PEFT's initialisation: A Kaiming-uniform, B = 0, scale alpha / rank) on
the chosen linears of every layer, trained with Adam for `steps` steps of
next-token cross-entropy on every absorbed chunk, then the prompt is
answered closed-book through the fine-tuned LoRA. Rows of a batch are
independent contexts, each with its own LoRA (the loss is a sum of
per-row means, so a row's update does not depend on the others); a row
whose chunk is all padding keeps its LoRA and optimizer state, and so does
a row whose step would make its LoRA non-finite (the gradient methods'
non-finite policy: the update is skipped, never written).

    method = lora_sft.lora_sft(lm_config, rank=8, steps=5,
                               learning_rate=1e-3, max_new_tokens=12)
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import context, grad_step
from tta_jax.models.lm import generate, model


class LoraState(NamedTuple):
  lora: dict[str, model.LowRank]  # a [L, B, D_in, r], b [L, B, r, D_out]
  opt_state: Any  # Adam over `lora`


def _dims(config: model.LlamaConfig, name: str) -> tuple[int, int]:
  d, f = config.hidden_size, config.intermediate_size
  q, kv = (
    config.num_heads * config.head_size,
    (config.num_kv_heads * config.head_size),
  )
  dims = {
    'q_proj': (d, q),
    'k_proj': (d, kv),
    'v_proj': (d, kv),
    'o_proj': (q, d),
    'gate_proj': (d, f),
    'up_proj': (d, f),
    'down_proj': (f, d),
  }
  if name not in dims:
    raise ValueError(f'unknown LoRA target {name!r}; valid: {sorted(dims)}')
  return dims[name]


def lora_sft(
  config: model.LlamaConfig,
  *,
  rank: int = 8,
  alpha: float = 16.0,
  targets: Sequence[str] = ('q_proj', 'v_proj'),
  learning_rate: float = 1e-3,
  steps: int = 5,
  max_new_tokens: int = 16,
  stop_ids: tuple[int, ...] = (),
  pad_id: int = 0,
  sampling: generate.Sampling = generate.GREEDY,
) -> context.ContextMethod:
  """A per-context LoRA fine-tuned on the context.

  Args:
    config: the frozen LM's architecture.
    rank, alpha: LoRA rank and scale (the update is alpha / rank · x A B).
    targets: the linears of every layer that get a LoRA.
    learning_rate: Adam's step size.
    steps: gradient steps per absorbed chunk.
    max_new_tokens, stop_ids, pad_id, sampling: as in
      `prompting.no_context`.

  Returns:
    A `ContextMethod` whose state is the LoRA of every row and its Adam
    state.

  References:
    Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR
    2022; the per-context fine-tuning baseline of Chen et al., Generative
    Adapter, ICLR 2025.
  """
  targets = tuple(targets)
  if not targets:
    raise ValueError('lora_sft needs at least one target linear')
  for t in targets:
    _dims(config, t)
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  opt = optax.adam(learning_rate)
  scale = alpha / rank

  def scaled(lora):
    return {k: model.LowRank(v.a, scale * v.b) for k, v in lora.items()}

  decode = dict(
    config=config,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    stop_ids=stop_ids,
    pad_id=pad_id,
  )

  def init_fn(params, rng, batch_size):
    del params
    n, lora = config.num_layers, {}
    for i, t in enumerate(targets):
      d_in, d_out = _dims(config, t)
      bound = 1.0 / d_in**0.5  # kaiming_uniform(a=√5) of a [r, D_in] weight
      a = jax.random.uniform(
        jax.random.fold_in(rng, i),
        (n, batch_size, d_in, rank),
        jnp.float32,
        -bound,
        bound,
      )
      lora[t] = model.LowRank(a, jnp.zeros((n, batch_size, rank, d_out)))
    return LoraState(lora, opt.init(lora))

  def absorb_fn(params, state, chunk, *, meta=None):
    del meta
    valid = chunk.mask[:, 1:] & chunk.mask[:, :-1]
    count = jnp.sum(valid, 1)
    live = count > 0  # rows with something to learn

    def loss_fn(lora):
      out = model.apply(
        params,
        chunk.tokens,
        config=config,
        mask=chunk.mask,
        lowrank=scaled(lora),
      )
      logp = model.token_logprobs(out.logits, chunk.tokens)
      per_row = -jnp.sum(logp * valid, 1) / jnp.maximum(count, 1)
      return jnp.sum(per_row)

    def per_row(x):  # leaves with a batch axis: [L, B, ...]
      return x.ndim >= 2 and x.shape[1] == live.shape[0]

    def row_finite(tree):
      rows = [
        jnp.all(jnp.isfinite(jnp.moveaxis(x, 1, 0).reshape(x.shape[1], -1)), 1)
        for x in jax.tree.leaves(tree)
        if per_row(x)
      ]
      return jnp.all(jnp.stack(rows), 0)

    def step(_, carry):
      lora, opt_state = carry
      _, grads = grad_step.inner_value_and_grad(loss_fn)(lora)
      new_lora, new_opt = grad_step.update(opt, grads, opt_state, lora)
      take = live & row_finite(new_lora)

      def keep(new, old):  # rows not taken keep their LoRA and Adam state
        if per_row(new):
          shape = (1, -1) + (1,) * (new.ndim - 2)
          return jnp.where(take.reshape(shape), new, old)
        return new

      return (
        jax.tree.map(keep, new_lora, lora),
        jax.tree.map(keep, new_opt, opt_state),
      )

    lora, opt_state = jax.lax.fori_loop(
      0, steps, step, (state.lora, state.opt_state)
    )
    return LoraState(lora, opt_state)

  def answer_fn(params, state, prompt, *, meta=None, rng=None):
    del meta
    return generate.answer(
      params, prompt, rng, **decode, lowrank=scaled(state.lora)
    )

  def score_fn(params, state, text, *, meta=None):
    del meta
    out = model.apply(
      params,
      text.tokens,
      config=config,
      mask=text.mask,
      lowrank=scaled(state.lora),
    )
    return model.token_logprobs(out.logits, text.tokens)

  return context.ContextMethod(init_fn, absorb_fn, answer_fn, score_fn)
