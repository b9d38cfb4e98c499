"""The context-method contract over every `LM_METHODS` entry, and the
exact equivalences of the two reference methods."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import lm_fixtures
from tta_jax import testing
from tta_jax._src import context
from tta_jax.methods import generative_adapter, lora_sft, prompting
from tta_jax.models.generators import generative_adapter as ga
from tta_jax.models.lm import generate, model

B, L = 2, 6


@pytest.fixture(scope='module')
def tiny():
  config = lm_fixtures.tiny_config(300)
  params = model.init(config, jax.random.key(0))
  params = jax.tree.map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params
  )
  return config, params


def _chunk(seed, b=B, t=L, pad_tail=0):
  ids = np.random.default_rng(seed).integers(3, 300, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  if pad_tail:
    mask[:, t - pad_tail :] = False
    ids[~mask] = 0
  return context.TokenChunk(jnp.asarray(ids), jnp.asarray(mask))


GENERATOR = ga.GAConfig(d_r=16, rank=4, alpha=4.0, window=L)


def _methods(config):
  kw = dict(max_new_tokens=4)
  return {
    'no_context': prompting.no_context(config, **kw),
    'prompting': prompting.prompting(config, max_context_tokens=3 * L, **kw),
    'lora_sft': lora_sft.lora_sft(config, rank=2, steps=2, **kw),
    'generative_adapter': generative_adapter.generative_adapter(
      config, generator=GENERATOR, **kw
    ),
  }


def _meta(config, name):
  """The trained meta-parameters a method needs (a generator with a
  non-zero output projection), or None."""
  if name != 'generative_adapter':
    return None
  gen = ga.init(GENERATOR, config, jax.random.key(2))
  gen['w_o'] = 0.3 * jax.random.normal(jax.random.key(3), gen['w_o'].shape)
  return gen


def test_every_method_is_covered(tiny):
  assert set(_methods(tiny[0])) == set(prompting.LM_METHODS)


@pytest.mark.parametrize('name', sorted(prompting.LM_METHODS))
def test_contract(tiny, name):
  config, params = tiny
  method, meta = _methods(config)[name], _meta(config, name)
  init = jax.jit(method.init, static_argnums=(2,))
  absorb = jax.jit(
    functools.partial(method.absorb, meta=meta), donate_argnums=(1,)
  )
  answer = jax.jit(functools.partial(method.answer, meta=meta))
  score = jax.jit(functools.partial(method.score, meta=meta))
  state = init(params, jax.random.key(0), B)
  structure = jax.tree.structure(state)
  state = absorb(params, state, _chunk(1))
  assert jax.tree.structure(state) == structure
  with testing.compilations() as compiled:
    state = absorb(params, state, _chunk(2, pad_tail=2))
  assert not compiled
  gen = answer(params, state, _chunk(3))
  assert gen.tokens.shape == (B, 4)
  logp = score(params, state, _chunk(4))
  assert logp.shape == (B, L - 1)
  assert np.isfinite(np.asarray(logp)).all() and (np.asarray(logp) <= 0).all()
  # The same state and prompt give the same answer (state not consumed).
  again = answer(params, state, _chunk(3))
  np.testing.assert_array_equal(gen.tokens, again.tokens)
  # An all-padding chunk leaves what a method learned unchanged (the
  # prompting cache is checked on its answers below).
  learned = {
    'lora_sft': lambda st: st.lora,
    'generative_adapter': lambda st: st.context,
  }.get(name)
  if learned is not None:
    empty = context.TokenChunk(
      jnp.zeros((B, L), jnp.int32), jnp.zeros((B, L), bool)
    )
    before = jax.tree.map(np.asarray, learned(state))
    after = learned(absorb(params, state, empty))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_prompting_equals_the_full_prompt(tiny):
  config, params = tiny
  method = _methods(config)['prompting']
  c1, c2, prompt = _chunk(1), _chunk(2, pad_tail=2), _chunk(3)
  state = method.init(params, jax.random.key(0), B)
  state = method.absorb(params, state, c1)
  state = method.absorb(params, state, c2)
  full = jnp.concatenate([c1.tokens, c2.tokens, prompt.tokens], 1)
  full_mask = jnp.concatenate([c1.mask, c2.mask, prompt.mask], 1)
  want = generate.generate(
    params, full, full_mask, config=config, max_new_tokens=4
  )
  np.testing.assert_array_equal(
    method.answer(params, state, prompt).tokens, want.tokens
  )
  # Scores: the text after the context, as in one long sequence.
  logits = model.apply(params, full, config=config, mask=full_mask).logits
  want_logp = model.token_logprobs(logits, full)[:, -(L - 1) :]
  np.testing.assert_allclose(
    method.score(params, state, prompt), want_logp, atol=1e-5
  )
  # One chunk or two: the same state (without the padding slots' content).
  one = method.absorb(
    params,
    method.init(params, jax.random.key(0), B),
    context.TokenChunk(
      jnp.concatenate([c1.tokens, c2.tokens], 1),
      jnp.concatenate([c1.mask, c2.mask], 1),
    ),
  )
  np.testing.assert_array_equal(
    method.answer(params, one, prompt).tokens, want.tokens
  )
  assert prompting.context_fits(state)
  state = method.absorb(params, state, c1)
  state = method.absorb(params, state, c1)
  assert not prompting.context_fits(state)


def test_no_context_ignores_the_context(tiny):
  config, params = tiny
  method = _methods(config)['no_context']
  state = method.init(params, jax.random.key(0), B)
  prompt = _chunk(3)
  before = method.answer(params, state, prompt).tokens
  after = method.answer(params, method.absorb(params, state, _chunk(1)), prompt)
  np.testing.assert_array_equal(before, after.tokens)
  want = generate.generate(
    params, prompt.tokens, prompt.mask, config=config, max_new_tokens=4
  )
  np.testing.assert_array_equal(before, want.tokens)


def test_all_padding_chunk_changes_nothing(tiny):
  config, params = tiny
  method = _methods(config)['prompting']
  state = method.absorb(
    params, method.init(params, jax.random.key(0), B), _chunk(1)
  )
  empty = context.TokenChunk(
    jnp.zeros((B, L), jnp.int32), jnp.zeros((B, L), bool)
  )
  padded = method.absorb(params, state, empty)
  prompt = _chunk(3)
  np.testing.assert_array_equal(
    method.answer(params, padded, prompt).tokens,
    method.answer(params, state, prompt).tokens,
  )
