"""TPT: the checks of its spec (zero steps, reset, selection, marginal
entropy, gradient scope, the AdamW step, vmap, the views)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import vlm_fixtures
from tta_jax import testing as test_utils
from tta_jax._src import augment, losses, params as params_lib
from tta_jax.methods import tpt as tpt_lib

SHAPE = vlm_fixtures.SHAPE
LR, WD, EPS = 5e-3, 0.01, 1e-8


def _adamw(lr=LR, wd=WD):
  return optax.adamw(lr, b1=0.9, b2=0.999, eps=EPS, weight_decay=wd)


_model = vlm_fixtures.tiny_classifier
_images = vlm_fixtures.images


def _adapter(lr=LR, wd=WD, **kw):
  """A TPT adapter and its jitted step, cached per settings (one compile
  per settings and batch shape)."""
  return _cached_adapter(lr, wd, tuple(sorted(kw.items())))


@functools.cache
def _cached_adapter(lr, wd, kw):
  _, apply_fn, _ = _model()
  kw = {'n_views': 16, 'flip': False, 'crop_scale': (0.3, 1.0), **dict(kw)}
  adapter = tpt_lib.tpt(apply_fn, _adamw(lr, wd), **kw)
  return adapter, jax.jit(adapter.step)


def _run(adapter, images, seed=0):
  adapter, step = adapter
  _, _, variables = _model()
  state = adapter.init(variables, jax.random.key(seed))
  new, out = step(state, {'image': images})
  return state, new, out


def test_zero_steps_and_zero_lr_are_zero_shot():
  _, apply_fn, variables = _model()
  images = _images(6)
  zero_shot = apply_fn(variables['params'], variables['batch_stats'], images)
  _, _, out = _run(_adapter(steps=0), images)
  np.testing.assert_allclose(out.logits, zero_shot.logits, rtol=2e-6, atol=0)
  _, _, out = _run(_adapter(0.0, 0.0), images)
  np.testing.assert_allclose(out.logits, zero_shot.logits, rtol=2e-6, atol=0)
  # ... and a real step changes the prediction.
  _, _, out = _run(_adapter(0.5), images)
  assert np.abs(np.asarray(out.logits - zero_shot.logits)).max() > 1e-3


def test_state_resets_and_order_does_not_matter():
  images = _images(8)
  adapter = _adapter()
  state0, state1, out = _run(adapter, images)
  assert test_utils.trees_equal(state0.params, state1.params)
  assert test_utils.trees_equal(state0.opt_state, state1.opt_state)
  assert int(state1.step) == 1
  perm = np.random.default_rng(0).permutation(8)
  _, _, shuffled = _run(adapter, images[perm])
  np.testing.assert_allclose(shuffled.logits, out.logits[perm], atol=1e-5)
  # One image alone, or after others in a batch: the same prediction.
  _, _, alone = _run(adapter, images[3:4])
  np.testing.assert_allclose(alone.logits[0], out.logits[3], atol=1e-5)


def test_vmap_equals_loop_and_lax_map():
  images = _images(5, seed=3)
  _, _, out = _run(_adapter(), images)
  loop = np.stack(
    [_run(_adapter(), images[i : i + 1])[2].logits[0] for i in range(5)]
  )
  np.testing.assert_allclose(out.logits, loop, atol=1e-5)
  _, _, mapped = _run(_adapter(samples_per_call=2), images)
  np.testing.assert_allclose(mapped.logits, out.logits, atol=1e-5)


def test_selection_is_the_lowest_entropy_views():
  logits = jax.random.normal(jax.random.key(1), (64, 10)) * 5
  idx = np.asarray(tpt_lib.select_confident(logits, 0.1))
  assert len(idx) == int(64 * 0.1) == 6
  entropy = np.asarray(losses.softmax_entropy(logits))
  np.testing.assert_array_equal(np.sort(idx), np.sort(np.argsort(entropy)[:6]))
  assert len(tpt_lib.select_confident(logits[:5], 0.1)) == 1  # at least one


def _episode(steps, views, lr=LR):
  return _jitted_episode(steps, lr)(views)


@functools.cache
def _jitted_episode(steps, lr):
  _, apply_fn, variables = _model()
  optimizer = _adamw(lr)
  trainable, _ = params_lib.split(
    variables['params'], tpt_lib.PROMPT_CONTEXT(variables['params'], {})
  )
  return jax.jit(
    lambda views: tpt_lib.episode(
      apply_fn,
      optimizer,
      variables['params'],
      variables['batch_stats'],
      optimizer.init(trainable),
      views,
      steps=steps,
    )
  )


def _views(seed=0, n=16):
  image = jnp.asarray(_images(1, seed)[0])
  return _tpt_views(jax.random.key(seed), image, n_views=n, scale=(0.3, 1.0))


_tpt_views = jax.jit(
  functools.partial(augment.tpt_views, flip=False),
  static_argnames=('n_views', 'scale'),
)


@jax.jit
def _view_logits(trainable, views):
  _, apply_fn, variables = _model()
  _, frozen = params_lib.split(
    variables['params'], tpt_lib.PROMPT_CONTEXT(variables['params'], {})
  )
  return apply_fn(
    params_lib.merge(trainable, frozen), variables['batch_stats'], views
  ).logits


def test_selection_is_reused_across_steps():
  views = _views(1)
  two = _episode(2, views, 0.2)
  one = _episode(1, views, 0.2)
  np.testing.assert_array_equal(two.selected, one.selected)
  # Step 2's loss is the marginal entropy of the step-0 selection under the
  # once-updated context (not a re-selection).
  logits = _view_logits(one.trainable, views)
  expected = losses.marginal_entropy(logits[one.selected], axis=0)
  np.testing.assert_allclose(two.losses[1], expected, rtol=1e-5)
  # Zero steps select the same views step 0 does.
  np.testing.assert_array_equal(_episode(0, views).selected, one.selected)


def test_marginal_entropy():
  logits = jax.random.normal(jax.random.key(2), (6, 10)) * 3
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  mean = p.mean(0)
  naive = -(mean * np.log(mean)).sum()
  got = losses.marginal_entropy(logits, axis=0)
  np.testing.assert_allclose(got, naive, rtol=1e-5)
  assert got >= float(losses.softmax_entropy(logits).mean()) - 1e-6  # Jensen
  # Stable at CLIP's logit magnitudes (scale 100 times a cosine).
  big = 100.0 * jnp.tanh(jax.random.normal(jax.random.key(3), (6, 10)))
  got = losses.marginal_entropy(big, axis=0)
  p = np.exp(
    np.asarray(big, np.float64) - np.asarray(big).max(1, keepdims=True)
  )
  p /= p.sum(1, keepdims=True)
  mean = p.mean(0)
  naive = -(mean * np.log(np.maximum(mean, 1e-300))).sum()
  assert np.isfinite(got)
  np.testing.assert_allclose(got, naive, atol=1e-5)


def test_only_the_context_is_tuned():
  views = _views(2)
  ep = _episode(1, views)
  assert params_lib.paths(ep.trainable) == ['prompt/ctx']
  _, _, variables = _model()
  assert not np.allclose(
    ep.trainable['prompt']['ctx'], variables['params']['prompt']['ctx']
  )


def test_first_adamw_step_is_its_closed_form():
  views = _views(3)
  _, _, variables = _model()
  p0 = variables['params']['prompt']['ctx']
  ep = _episode(1, views)

  def loss(ctx):
    logits = _view_logits({'prompt': {'ctx': ctx}}, views)
    return losses.marginal_entropy(logits[ep.selected], axis=0)

  g = jax.grad(loss)(p0)
  expected = -LR * (g / (jnp.abs(g) + EPS) + WD * p0)
  np.testing.assert_allclose(
    ep.trainable['prompt']['ctx'] - p0, expected, rtol=1e-4, atol=1e-7
  )


def _uncropped_views(image, n_views, **kw):
  """TPT's views with crops of the whole image and no flips."""
  return augment.tpt_views(
    jax.random.key(0),
    image,
    n_views=n_views,
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    flip=False,
    **kw,
  )


def test_views():
  image = jnp.asarray(_images(1)[0])
  views_fn = jax.jit(augment.tpt_views, static_argnames='n_views')
  views = views_fn(jax.random.key(0), image, n_views=64)
  assert views.shape == (64, *SHAPE)
  np.testing.assert_array_equal(views[0], image)
  assert not np.allclose(views[1], views[2])
  again = views_fn(jax.random.key(0), image, n_views=64)
  np.testing.assert_array_equal(views, again)
  # Without flips and at scale (1, 1) with ratio 1 every view is the image.
  same = _uncropped_views(image, 4)
  np.testing.assert_allclose(
    same, np.broadcast_to(image, same.shape), atol=1e-6
  )


def test_augmix_views_fill_black():
  # The geometric AugMix ops uncover the frame of a flat grey image: TPT
  # fills it with PIL's default, black (grey fill keeps every pixel above
  # 0.35 here). At severity 10 the ops move far enough to show it.
  grey = jnp.full(SHAPE, 128 / 255, jnp.float32)
  views = _uncropped_views(grey, 64, augmix_views=True, severity=10.0)
  assert float(views.min()) < 0.1


def test_bad_input():
  adapter = _adapter()
  with pytest.raises(ValueError, match='expects'):
    _run(adapter, np.zeros((2, 12, 12, 1), np.float32))
  with pytest.raises(ValueError, match='expects'):
    _run(adapter, np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match='steps'):
    tpt_lib.tpt(None, _adamw(), steps=-1)
  with pytest.raises(ValueError, match='selection_ratio'):
    tpt_lib.tpt(None, _adamw(), selection_ratio=0.0)
  with pytest.raises(ValueError, match='selects no parameters'):
    _, apply_fn, variables = test_utils.tiny_bn_net()
    tpt_lib.tpt(apply_fn, _adamw()).init(variables, jax.random.key(0))
