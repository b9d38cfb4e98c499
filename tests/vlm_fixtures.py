"""A tiny vision-language classifier (the digits dual encoder on 16x16
images, a one-layer MiniLM-shaped text tower) for the TPT and STSS tests."""

import functools

import jax
import jax.numpy as jnp
import pytest

from tta_jax import models, testing as test_utils
from tta_jax.models import vlm

SHAPE = (16, 16, 1)


@functools.cache
def tiny_classifier():
  """`(module, apply_fn, variables)`; skips without all-MiniLM-L6-v2."""
  if not vlm.bert.available():
    pytest.skip(f'all-MiniLM-L6-v2 missing: {vlm.bert.INSTALL_HINT}')
  module = vlm.digits_classifier(
    10,
    width=4,
    text_config=dict(width=32, layers=1, heads=2, mlp_dim=64),
    input_shape=SHAPE,
  )
  variables = models.init_variables(module, SHAPE, jax.random.key(0))
  # A sharper scale than the init, so views' entropies spread out.
  variables['params'] = {**variables['params'], 'logit_scale': jnp.log(60.0)}
  return module, models.make_apply_fn(module, SHAPE), variables


def images(n, seed=0):
  return test_utils.fake_batch(seed, n, shape=SHAPE, labels=False)['image']
