"""The LoRA fine-tuned on the context (the paper's costly alternative)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import lm_fixtures
from tta_jax._src import context
from tta_jax.methods import lora_sft
from tta_jax.models.lm import model


@pytest.fixture(scope='module')
def tiny():
  config = lm_fixtures.tiny_config(300)
  params = model.init(config, jax.random.key(0))
  return config, params


def _chunk(seed, b=2, t=12):
  rng = np.random.default_rng(seed)
  return context.TokenChunk(
    jnp.asarray(rng.integers(3, 300, (b, t)), jnp.int32), jnp.ones((b, t), bool)
  )


def test_fitting_the_context_lowers_its_loss_per_row(tiny):
  config, params = tiny
  method = lora_sft.lora_sft(
    config, rank=4, steps=10, learning_rate=1e-2, targets=('o_proj',)
  )
  chunk = _chunk(1)
  state0 = method.init(params, jax.random.key(0), 2)
  # B = 0 at init: the base model.
  np.testing.assert_array_equal(
    method.score(params, state0, chunk),
    model.token_logprobs(
      model.apply(params, chunk.tokens, config=config).logits, chunk.tokens
    ),
  )
  state = jax.jit(method.absorb)(params, state0, chunk)
  before = method.score(params, state0, chunk).sum(1)
  after = method.score(params, state, chunk).sum(1)
  assert (after > before + 1.0).all()  # each row learned its own context
  # Rows are independent: row 0 alone learns exactly what it learned
  # beside row 1 (up to float summation order).
  alone = jax.jit(method.absorb)(
    params,
    jax.tree.map(lambda x: x[:, :1] if x.ndim > 1 else x, state0),
    context.TokenChunk(chunk.tokens[:1], chunk.mask[:1]),
  )
  np.testing.assert_allclose(
    alone.lora['o_proj'].b[:, 0], state.lora['o_proj'].b[:, 0], atol=1e-5
  )


def test_bad_settings(tiny):
  config, _ = tiny
  with pytest.raises(ValueError, match="unknown LoRA target 'w_up'"):
    lora_sft.lora_sft(config, targets=('w_up',))
  with pytest.raises(ValueError, match='steps must be >= 1'):
    lora_sft.lora_sft(config, steps=0)


def test_a_step_that_would_go_non_finite_is_skipped_per_row(tiny):
  config, params = tiny
  # Adam's first step moves every weight by ~lr: 1e38 overflows the
  # forward of the next step, whose NaN update must not be written.
  method = lora_sft.lora_sft(
    config, rank=4, steps=3, learning_rate=1e38, targets=('o_proj',)
  )
  state0 = method.init(params, jax.random.key(0), 2)
  state = jax.jit(method.absorb)(params, state0, _chunk(2))
  for leaf in jax.tree.leaves(state):
    assert np.isfinite(np.asarray(leaf, np.float64)).all()
  # The first (finite) step was taken, the later ones were not.
  assert np.abs(np.asarray(state.lora['o_proj'].b)).max() > 1e37
