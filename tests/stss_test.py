"""STSS and ZERO (TLLA's test stage): the checks of its spec (no parameter
change and no gradient, the rho' -> 0 limit, flat views kept, the cache,
the perturbations' geometry, the vote)."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import vlm_fixtures
from tta_jax import models, testing as test_utils
from tta_jax._src import augment, losses, params as params_lib
from tta_jax.methods import stss as stss_lib, tpt as tpt_lib
from tta_jax.models import vlm

SHAPE = vlm_fixtures.SHAPE
VIEWS = dict(n_views=16, flip=False, crop_scale=(0.3, 1.0))


_model = vlm_fixtures.tiny_classifier
_images = vlm_fixtures.images


@functools.cache
def _adapter(method='stss', **kw):
  """An adapter, its initial state and jitted step, cached per settings."""
  _, apply_fn, variables = _model()
  factory = stss_lib.stss if method == 'stss' else stss_lib.zero
  adapter = factory(apply_fn, **{**VIEWS, **kw})
  return (
    adapter,
    adapter.init(variables, jax.random.key(0)),
    jax.jit(adapter.step),
  )


def _step(method='stss', images=None, **kw):
  _, state, step = _adapter(method, **kw)
  return step(state, {'image': _images(4) if images is None else images})


def test_nothing_changes_and_no_gradient_is_taken():
  _, _, variables = _model()
  params0 = test_utils.copy_tree(variables['params'])
  adapter, state, _ = _adapter(n_perturbations=4, n_selected=3)

  def no_grad(*args, **kwargs):
    raise AssertionError('STSS took a gradient')

  with (
    mock.patch.object(jax, 'grad', no_grad),
    mock.patch.object(jax, 'value_and_grad', no_grad),
    mock.patch.object(jax, 'vjp', no_grad),
  ):
    step = jax.jit(adapter.step)
    for seed in range(3):
      state, out = step(state, {'image': _images(4, seed)})
  assert np.all(np.isfinite(out.logits))
  assert test_utils.trees_equal(state.params, params0)
  assert test_utils.trees_equal(variables['params'], params0)
  assert int(state.step) == 3


def test_rho_zero_is_zero_and_zero_is_confidence_selection():
  images = _images(4)
  _, zero = _step('zero', images, n_selected=3)
  _, flat0 = _step('stss', images, n_selected=3, n_perturbations=4, rho=0.0)
  np.testing.assert_allclose(zero.logits, flat0.logits, rtol=1e-5, atol=1e-5)
  # Scores at rho' = 0 are the entropies, so the selection is TPT's.
  logits = 30.0 * jax.random.normal(jax.random.key(1), (64, 10))
  same = jnp.broadcast_to(logits[:, None], (64, 5, 10))
  scores = stss_lib.sharpness_scores(same)
  np.testing.assert_array_equal(scores, losses.softmax_entropy(logits))
  np.testing.assert_array_equal(
    stss_lib.select_flattest(scores, 6),
    tpt_lib.select_confident(logits, 0.1),
  )
  # ... and with rho' > 0 the choice differs somewhere.
  _, sharp = _step('stss', images, n_selected=3, n_perturbations=4, rho=3.0)
  assert not np.array_equal(zero.logits, sharp.logits)


def _unit(*v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v)


def test_keeps_the_flat_views():
  """Hand-built features: two classes along e1, e2; the two perturbations
  tilt the class features along +-e3, so a view's margin moves with its e3
  component. Views 0 and 2 have none (flat), 1 and 3 a large one (sharp)."""
  t = 0.3
  head = np.stack(
    [
      [_unit(1, 0, 0), _unit(0, 1, 0)],
      [_unit(1, 0, t), _unit(0, 1, -t)],
      [_unit(1, 0, -t), _unit(0, 1, t)],
    ]
  )
  u = (0.4 + np.sqrt(5.84)) / 4  # u^2 + (u - 0.2)^2 + 0.5^2 = 1
  feats = np.stack(
    [
      _unit(0.8, 0.6, 0.0),  # margin 0.2, flat
      [u, u - 0.2, 0.5],  # margin 0.2 too, sharp
      _unit(1.0, 0.1, 0.0),  # confident and flat
      _unit(0.7, 0.4, 0.6),  # confident at p*, sharp
    ]
  ).astype(np.float32)
  logits = jnp.asarray(20.0 * np.einsum('ve,rke->vrk', feats, head))
  entropy = losses.softmax_entropy(logits[:, 0])
  # Views 0 and 1 tie under p*: entropy cannot separate them ...
  np.testing.assert_allclose(entropy[0], entropy[1], rtol=1e-5)
  scores = stss_lib.sharpness_scores(logits)
  assert scores[0] < scores[1] and scores[2] < scores[3]
  # ... and entropy keeps the sharp view 3, STSS the flat ones.
  np.testing.assert_array_equal(
    np.sort(stss_lib.select_flattest(entropy, 2)), [2, 3]
  )
  np.testing.assert_array_equal(
    np.sort(stss_lib.select_flattest(scores, 2)), [0, 2]
  )
  # lambda = 1 is the worst-case entropy over the perturbations; lambda = 0
  # the entropy alone.
  np.testing.assert_allclose(
    scores, losses.softmax_entropy(logits[:, 1:]).max(axis=1), rtol=1e-5
  )
  np.testing.assert_allclose(
    stss_lib.sharpness_scores(logits, 0.0), entropy, rtol=1e-6
  )


def test_the_cache_holds_the_perturbed_class_features():
  module, _, variables = _model()
  rho, n = 0.7, 3
  _, state, _ = _adapter(n_perturbations=n, rho=rho)
  params = variables['params']
  ctx0 = params['prompt']['ctx']
  perturbed = stss_lib.perturb(
    jax.random.key(0), {'prompt': {'ctx': ctx0}}, n, rho
  )['prompt']['ctx']
  norms = np.linalg.norm(np.asarray(perturbed - ctx0).reshape(n, -1), axis=1)
  np.testing.assert_allclose(norms, rho, rtol=1e-5)
  assert state.extra.head.shape == (n + 1, 10, 32)
  for r, ctx in enumerate([ctx0, *perturbed]):
    text = module.apply(
      {'params': params}, ctx, method=vlm.VLMClassifier.class_text_features
    )
    np.testing.assert_allclose(state.extra.head[r], text, atol=1e-6)
  # A fixed seed gives the same perturbations, another seed others.
  _, again, _ = _adapter(n_perturbations=n, rho=rho, n_views=15)
  np.testing.assert_array_equal(again.extra.head, state.extra.head)
  _, other, _ = _adapter(n_perturbations=n, rho=rho, perturbation_seed=1)
  assert not np.allclose(other.extra.head[1:], state.extra.head[1:])


def _counted(apply_fn, calls):
  """`apply_fn` whose class head appends to `calls` when it runs."""

  def head(*args, **kwargs):
    calls.append(1)
    return apply_fn.class_head(*args, **kwargs)

  def counted_apply(*args, **kwargs):
    return apply_fn(*args, **kwargs)

  counted_apply.class_head = head
  return counted_apply


def test_the_step_equals_its_recipe_and_never_encodes_text():
  _, apply_fn, variables = _model()
  calls = []
  counted_apply = _counted(apply_fn, calls)
  adapter = stss_lib.stss(
    counted_apply, n_perturbations=3, n_selected=4, rho=0.8, **VIEWS
  )
  state = adapter.init(variables, jax.random.key(5))
  encoded = len(calls)
  images = jnp.asarray(_images(3, seed=2))
  _, out = jax.jit(adapter.step)(state, {'image': images})
  assert len(calls) == encoded  # the text tower ran only in init
  for i, image in enumerate(images):
    views = augment.tpt_views(
      tpt_lib.image_key(state.rng, image),
      image,
      **{'n_views': 16, 'flip': False, 'scale': (0.3, 1.0)},
    )
    out0 = apply_fn(variables['params'], variables['batch_stats'], views)
    feats = out0.features['pre_logits']
    logits = state.extra.scale * jnp.einsum(
      've,rke->vrk', feats, state.extra.head
    )
    # The logits under p* are the classifier's own.
    np.testing.assert_allclose(
      logits[:, 0],
      out0.logits,
      rtol=1e-5,
      atol=1e-5,
    )
    selected = stss_lib.select_flattest(stss_lib.sharpness_scores(logits), 4)
    expected = stss_lib.vote_views(logits[:, 0], selected, 'hard')
    np.testing.assert_allclose(out.logits[i], expected, rtol=1e-5, atol=1e-5)


def test_zero_encodes_the_classes_once():
  _, apply_fn, variables = _model()
  calls = []
  cached = _counted(apply_fn, calls)

  def plain(*args, **kwargs):  # no class head: the model's own logits
    return apply_fn(*args, **kwargs)

  images = {'image': jnp.asarray(_images(3, seed=4))}
  logits = {}
  for name, fn in (('cached', cached), ('plain', plain)):
    adapter = stss_lib.zero(fn, n_selected=4, **VIEWS)
    state = adapter.init(variables, jax.random.key(5))
    _, out = jax.jit(adapter.step)(state, images)
    logits[name] = out.logits
  assert len(calls) == 1  # in init, not in the step
  assert state.extra == stss_lib.StssState((), (), ())  # plain: no cache
  np.testing.assert_allclose(
    logits['cached'], logits['plain'], rtol=1e-5, atol=1e-5
  )


def test_batch_is_per_image():
  images = _images(4, seed=3)
  _, whole = _step('stss', images, n_perturbations=2)
  _, part = _step('stss', images[2:], n_perturbations=2)
  np.testing.assert_allclose(whole.logits[2:], part.logits, atol=1e-5)
  _, mapped = _step('stss', images, n_perturbations=2, samples_per_call=2)
  np.testing.assert_allclose(whole.logits, mapped.logits, atol=1e-5)


def test_votes():
  logits = jnp.asarray(
    [
      [5.0, 0.0, 0.0],  # class 0
      [0.0, 4.0, 0.0],  # class 1
      [0.0, 6.0, 0.0],  # class 1
      [9.0, 0.0, 0.0],  # class 0
      [0.0, 0.0, 1.0],  # class 2
    ]
  )
  everything = jnp.arange(5)
  hard = stss_lib.vote_views(logits, everything, 'hard')
  assert int(jnp.argmax(hard)) in (0, 1)  # two votes each, 0 more probable
  probs = jax.nn.softmax(logits)
  assert probs[[0, 3], 0].sum() > probs[[1, 2], 1].sum()
  assert int(jnp.argmax(hard)) == 0
  np.testing.assert_allclose(jnp.sum(jnp.exp(hard)), 1.0, rtol=1e-6)
  # s = 1: the single view's argmax; a majority wins over probability.
  single = stss_lib.vote_views(logits, jnp.asarray([4]), 'hard')
  assert int(jnp.argmax(single)) == 2
  three = jnp.asarray([1, 2, 3])
  assert int(jnp.argmax(stss_lib.vote_views(logits, three, 'hard'))) == 1
  # Soft: the argmax of the mean probabilities.
  soft = stss_lib.vote_views(logits, three, 'soft')
  np.testing.assert_allclose(
    jnp.exp(soft), probs[three].mean(0), rtol=1e-5, atol=1e-7
  )
  # Confident views vote as one; the output stays finite.
  huge = jnp.asarray([[300.0, 0.0], [300.0, 0.0], [0.0, 1.0]])
  out = stss_lib.vote_views(huge, jnp.arange(3), 'hard')
  assert np.all(np.isfinite(out)) and int(jnp.argmax(out)) == 0


def test_restricted_classes_keep_the_head():
  _, apply_fn, variables = _model()
  subset = np.asarray([1, 4, 7])
  restricted = models.restrict_classes(apply_fn, subset)
  text, scale = restricted.class_head(variables['params'])
  full, _ = apply_fn.class_head(variables['params'])
  np.testing.assert_array_equal(text, full[subset])
  adapter = stss_lib.stss(restricted, n_perturbations=2, **VIEWS)
  state = adapter.init(variables, jax.random.key(0))
  _, out = jax.jit(adapter.step)(state, {'image': _images(2)})
  assert out.logits.shape == (2, 3)


def test_bad_settings():
  _, apply_fn, variables = _model()
  for kw, match in (
    ({'n_selected': 17}, 'n_selected'),
    ({'n_selected': 0}, 'n_selected'),
    ({'rho': -1.0}, 'rho'),
    ({'n_perturbations': -1}, 'n_perturbations'),
    ({'vote': 'mode'}, 'vote'),
  ):
    with pytest.raises(ValueError, match=match):
      stss_lib.stss(apply_fn, **{**VIEWS, **kw})
  # The prompt ensemble has no context to perturb.
  adapter = stss_lib.stss(
    apply_fn, perturb_mask=params_lib.by_regex('^nothing$'), **VIEWS
  )
  with pytest.raises(ValueError, match='stss: the adapt mask selects no'):
    adapter.init(variables, jax.random.key(0))


def test_the_runners_models_carry_the_class_head():
  """The runners build dual encoders with `models.make_apply_fn`, so STSS
  there reads the cached head (one image-tower pass per view) rather than
  running every view through each perturbed copy of the model."""
  from configs import vlm_digits
  from tta_jax.runners import artifacts

  config = vlm_digits.get_config('small')

  class Benchmark:
    input_shape, num_classes = SHAPE, 10

  _, apply_fn = artifacts.build_model(config.model, Benchmark)
  assert callable(apply_fn.class_head)
