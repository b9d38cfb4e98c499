"""The dual encoder, its classifier, prompts and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tta_jax import models
from tta_jax._src import params as params_lib
from tta_jax.models import vlm

SHAPE = (16, 16, 1)
TINY_TEXT = dict(width=32, layers=1, heads=2, mlp_dim=64)


@pytest.fixture(autouse=True)
def _needs_minilm():
  if not vlm.bert.available():
    pytest.skip(f'all-MiniLM-L6-v2 missing: {vlm.bert.INSTALL_HINT}')


@functools.cache
def _tiny(prompt='context'):
  module = models.build(
    'vlm_digits',
    num_classes=10,
    prompt=prompt,
    width=4,
    text_config=TINY_TEXT,
    input_shape=SHAPE,
  )
  return module, models.init_variables(module, SHAPE, jax.random.key(0))


def _encode(module, variables, ids):
  return module.apply(
    variables, jnp.asarray(ids), method=lambda m, i: m.encode_text(i)
  )


def test_context_starts_as_the_hand_prompt():
  module, variables = _tiny()
  tok = vlm.bert.minilm_tokenizer()
  hand = vlm.text.template_prompts(
    tok, vlm.DIGIT_CLASSNAMES, ['a photo of a {}.']
  )
  expected = _encode(module, variables, hand[0])
  got = module.apply(variables, method='class_text_features')
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), 1.0, rtol=1e-6)
  # Another context gives other features; an explicit ctx overrides it.
  ctx = variables['params']['prompt']['ctx']
  ctx = ctx + 0.5 * jax.random.normal(jax.random.key(1), ctx.shape)
  moved = module.apply(variables, ctx=ctx, method='class_text_features')
  assert np.abs(np.asarray(moved - got)).max() > 1e-3


def test_classifier_outputs_and_scale():
  module, variables = _tiny()
  apply_fn = models.make_apply_fn(module, SHAPE)
  x = np.random.default_rng(0).uniform(size=(3, *SHAPE)).astype(np.float32)
  out = source = apply_fn(variables['params'], variables['batch_stats'], x)
  assert out.logits.shape == (3, 10)
  img = out.features['pre_logits']
  np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, rtol=1e-6)
  txt = module.apply(variables, method='class_text_features')
  np.testing.assert_allclose(out.logits, (1 / 0.07) * img @ txt.T, rtol=1e-5)
  # The scale is clipped at 100.
  params = {**variables['params'], 'logit_scale': jnp.log(1e4)}
  out = apply_fn(params, variables['batch_stats'], x)
  np.testing.assert_allclose(out.logits, 100.0 * img @ txt.T, rtol=1e-5)
  # Batch statistics: the image tower's BN layers follow `bn_mode`.
  batch = apply_fn(
    variables['params'], variables['batch_stats'], x, use_batch_stats=True
  )
  assert batch.logits.shape == (3, 10)
  assert np.abs(np.asarray(batch.logits - source.logits)).max() > 1e-4


def test_ensemble_is_the_mean_of_templates():
  module, variables = _tiny('ensemble')
  assert 'prompt' not in variables['params']
  tok = vlm.bert.minilm_tokenizer()
  ids = vlm.text.template_prompts(
    tok, vlm.DIGIT_CLASSNAMES, vlm.DIGIT_TEMPLATES
  )
  per_template = _encode(module, variables, ids)  # [T, K, E]
  expected = vlm.l2_normalize(per_template.mean(0))
  got = module.apply(variables, method='class_text_features')
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_context_mask():
  _, variables = _tiny()
  mask = vlm.context_mask(variables['params'], {})
  assert params_lib.selected_paths(variables['params'], mask) == ['prompt/ctx']


def test_pretrained_text_tower():
  module = vlm.digits_classifier(10, width=4, input_shape=SHAPE)
  variables = models.init_variables(module, SHAPE, jax.random.key(0))
  loaded = vlm.load_pretrained_text(module, variables)
  table = loaded['params']['text']['word_embeddings']['embedding']
  assert table.shape == (30522, 384)
  tok = vlm.bert.minilm_tokenizer()
  ids = tok.words('a photo of a')
  np.testing.assert_array_equal(
    loaded['params']['prompt']['ctx'], table[np.asarray(ids)]
  )
  with pytest.raises(ValueError, match='default all-MiniLM'):
    vlm.load_pretrained_text(*_tiny())


def test_bad_input():
  with pytest.raises(ValueError, match='class list is empty'):
    vlm.digits_classifier(classnames=[], text_config=TINY_TEXT)
  with pytest.raises(ValueError, match='class list is empty'):
    vlm.digits_classifier(
      classnames=[], prompt='ensemble', text_config=TINY_TEXT
    )
  with pytest.raises(ValueError, match='reads at most 256'):
    vlm.digits_classifier(
      2, classnames=['one', 'seven ' * 300], text_config=TINY_TEXT
    )
  with pytest.raises(ValueError, match='num_classes=3'):
    vlm.digits_classifier(3, text_config=TINY_TEXT)
  with pytest.raises(ValueError, match='not n_ctx=4'):
    vlm.digits_classifier(ctx_init='a photo', text_config=TINY_TEXT)
  with pytest.raises(ValueError, match='unknown prompt'):
    vlm.digits_classifier(prompt='soft', text_config=TINY_TEXT)
  module, variables = _tiny()
  apply_fn = models.make_apply_fn(module, SHAPE)
  p, s = variables['params'], variables['batch_stats']
  for shape in ((2, 12, 12, 1), (2, 16, 16, 3)):
    with pytest.raises(ValueError, match='expects'):
      apply_fn(p, s, np.zeros(shape, np.float32))
  # The module checks on its own, too (without make_apply_fn's shape).
  with pytest.raises(ValueError, match='expects'):
    module.apply(variables, np.zeros((2, 16, 16, 3), np.float32))


@pytest.mark.parametrize('prompt', ['context', 'ensemble'])
def test_source_encodes_the_classes_once(prompt):
  """`source` on a dual encoder: the class head cached in `init` gives the
  model's own logits (restricted classes too), and the compiled step no
  longer runs the text tower."""
  from tta_jax import methods

  module, variables = _tiny(prompt)
  apply_fn = models.make_apply_fn(module, SHAPE)
  images = jax.random.uniform(jax.random.key(1), (3, *SHAPE))
  for fn in (apply_fn, models.restrict_classes(apply_fn, [1, 4, 7])):
    flops = {}
    for cache in (True, False):
      adapter = methods.source.source(fn, cache_class_head=cache)
      state = adapter.init(variables, jax.random.key(0))
      step = jax.jit(lambda s, x, a=adapter: a.step(s, {'image': x})[1].logits)
      got = step(state, images)
      np.testing.assert_allclose(
        got,
        fn(variables['params'], variables['batch_stats'], images).logits,
        rtol=1e-6,
        atol=1e-5,
      )
      flops[cache] = step.lower(state, images).compile().cost_analysis()
      flops[cache] = (flops[cache] or {}).get('flops', 0.0)
    # The text tower (a one-layer transformer over 10 or 30 prompts) is
    # most of an uncached step's work on these 16 x 16 images.
    assert flops[True] < 0.5 * flops[False], flops
