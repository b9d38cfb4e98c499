"""`models.wrap`: stock flax modules as the library's `ApplyFn`.

The stock modules are written the way the flax examples write them
(`examples/mnist` CNN, `examples/imagenet/models.py` ResNet): stock
`nn.BatchNorm(use_running_average=not train)`, a `train` argument, logits
out. `StockDigitsCNN` is the library's `DigitsCNN` written that way, with
the same variable names, so the wrapped module must behave exactly as the
library's own model in every BN mode and under every method.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tta_jax import models, testing
from tta_jax._src import params as params_lib
from tta_jax.methods import eata, lame, norm, sar, t3a, tent

ModuleDef = Any


class StockDigitsCNN(nn.Module):
  """`DigitsCNN` with stock BatchNorm and a `train` flag."""

  num_classes: int = 10
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
    )
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False)
    x = (x - 0.5) / 0.5

    def unit(x, ch, i):
      return nn.relu(norm(name=f'bn{i}')(conv(ch, name=f'conv{i}')(x)))

    x = unit(x, self.width, 1)
    x = unit(x, self.width, 2)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = unit(x, 2 * self.width, 3)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = unit(x, 4 * self.width, 4)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)


class CNN(nn.Module):
  """The flax MNIST example's CNN, with BatchNorm and dropout added."""

  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(features=8, kernel_size=(3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=16, kernel_size=(3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=32)(x)
    x = nn.relu(x)
    x = nn.Dropout(rate=self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(features=10)(x)
    return x


class ResNetBlock(nn.Module):
  """The flax ImageNet example's ResNet block."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(
        self.filters, (1, 1), self.strides, name='conv_proj'
      )(residual)
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """The flax ImageNet example's ResNet (`axis_name='batch'` included)."""

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      axis_name='batch',
    )
    x = conv(
      self.num_filters,
      (7, 7),
      (2, 2),
      padding=[(3, 3), (3, 3)],
      name='conv_init',
    )(x)
    x = norm(name='bn_init')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(
          self.num_filters * 2**i,
          strides=strides,
          conv=conv,
          norm=norm,
          act=self.act,
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    x = jnp.asarray(x, self.dtype)
    return x


TinyResNet = functools.partial(
  ResNet, stage_sizes=[1, 1], block_cls=ResNetBlock, num_filters=4
)
RESNET_SHAPE = (16, 16, 3)


class LayerNormNet(nn.Module):
  """A BN-free convnet with LayerNorm; it sows its pooled features."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.LayerNorm()(nn.Conv(8, (3, 3))(x)))
    x = nn.relu(nn.LayerNorm(name='ln_out')(nn.Conv(8, (3, 3))(x)))
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pooled', x)
    return nn.Dense(4)(x)


def _twin():
  module, apply_fn, variables = testing.tiny_bn_net(0)
  stock = StockDigitsCNN(num_classes=testing.TINY_CLASSES, width=4)
  return apply_fn, models.wrap(stock, testing.TINY_SHAPE), variables


def _images(n=16, shape=None, seed=0):
  shape = shape or testing.TINY_SHAPE
  return testing.fake_batch(seed, n, shape=shape, labels=False)['image']


def _stock_train_forward(module, variables, images):
  """The stock train-mode forward (batch statistics), as under `pmap` with
  one device: a vmap binds the example ResNet's `axis_name='batch'`."""

  def forward(x):
    logits, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits

  return jax.vmap(forward, axis_name='batch')(images[None])[0]


def test_twin_has_the_library_models_variables():
  _, model, variables = _twin()
  fresh = model.init(jax.random.key(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(variables)
  assert model.num_classes == testing.TINY_CLASSES
  assert model.head == 'head'
  assert model.feature_names == ('pre_logits',)
  assert model.norm_paths == ('bn1', 'bn2', 'bn3', 'bn4')


@pytest.mark.parametrize(
  'mode',
  [
    None,
    models.BATCH,
    models.BNMode(source_weight=0.3),
    models.mixed_bn(0.5),
  ],
  ids=['source', 'batch', 'prior', 'mixed'],
)
@pytest.mark.parametrize('masked', [False, True])
def test_twin_matches_the_library_model(mode, masked):
  apply_fn, model, v = _twin()
  images = _images()
  mask = (np.arange(16) < 11) if masked else None
  ours = model(v['params'], v['batch_stats'], images, bn_mode=mode, mask=mask)
  lib = apply_fn(v['params'], v['batch_stats'], images, bn_mode=mode, mask=mask)
  testing.assert_trees_close(ours.logits, lib.logits)
  testing.assert_trees_close(ours.batch_stats, lib.batch_stats)
  testing.assert_trees_close(
    ours.features['pre_logits'], lib.features['pre_logits']
  )
  if mode is None:  # source mode hands the statistics back unchanged
    assert ours.batch_stats is v['batch_stats']


def test_use_batch_stats_is_test_batch_statistics():
  apply_fn, model, v = _twin()
  images = _images()
  ours = model(v['params'], v['batch_stats'], images, use_batch_stats=True)
  src = model(v['params'], v['batch_stats'], images)
  lib = apply_fn(v['params'], v['batch_stats'], images, use_batch_stats=True)
  testing.assert_trees_close(ours.logits, lib.logits)
  assert not np.allclose(ours.logits, src.logits, atol=1e-3)
  # The returned statistics are the batch's own, not a momentum update.
  conv1 = jax.lax.conv_general_dilated(
    (images - 0.5) / 0.5,
    v['params']['conv1']['kernel'],
    (1, 1),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  np.testing.assert_allclose(
    ours.batch_stats['bn1']['mean'], conv1.mean((0, 1, 2)), atol=1e-5
  )


def test_mask_keeps_padding_out_of_the_statistics():
  _, model, v = _twin()
  images = _images()
  garbage = images.copy()
  garbage[10:] = 100.0
  mask = np.arange(16) < 10
  padded = model(v['params'], v['batch_stats'], garbage, mask=mask,
                 use_batch_stats=True)  # fmt: skip
  alone = model(v['params'], v['batch_stats'], images[:10],
                use_batch_stats=True)  # fmt: skip
  np.testing.assert_allclose(padded.logits[:10], alone.logits, atol=1e-5)


ADAM = optax.adam(1e-2)
METHODS = {
  'norm': norm.norm,
  'norm_ema': lambda fn: norm.norm(fn, momentum=0.1),
  'tent': lambda fn: tent.tent(fn, ADAM),
  'eata': lambda fn: eata.eata(
    fn,
    ADAM,
    source_images=_images(8, getattr(fn, 'input_shape', None), seed=9),
    d_margin=0.4,
    margin_e0=1.0,
  ),
  'sar': lambda fn: sar.sar(fn, ADAM, margin_e0=1.0),
  'lame': lame.lame,
  't3a': lambda fn: t3a.t3a(fn, filter_k=4),
}


@pytest.mark.parametrize('name', sorted(METHODS))
def test_methods_run_the_wrapped_twin_as_the_library_model(name):
  apply_fn, model, v = _twin()
  runs = []
  for fn in (apply_fn, model):
    adapter = METHODS[name](fn)
    state = adapter.init(v, jax.random.key(0))
    step = jax.jit(adapter.step)
    logits = []
    for i in range(3):
      state, out = step(state, {'image': _images(seed=i)})
      logits.append(out.logits)
    runs.append((state, logits))
  (s_lib, l_lib), (s_ours, l_ours) = runs
  testing.assert_trees_close(l_ours, l_lib, rtol=1e-4, atol=1e-5)
  testing.assert_trees_close(s_ours.params, s_lib.params, rtol=1e-4, atol=1e-5)
  testing.assert_trees_close(
    s_ours.batch_stats, s_lib.batch_stats, rtol=1e-4, atol=1e-5
  )
  if name in ('tent', 'eata', 'sar'):  # the adaptation did move the params
    assert not testing.trees_equal(s_ours.params, v['params'])


def test_flax_mnist_cnn():
  module = CNN()
  model = models.wrap(module, (28, 28, 1))
  v = model.init(jax.random.key(1))
  assert model.num_classes == 10
  assert model.head == 'Dense_1'
  images = _images(8, (28, 28, 1))
  out = model(v['params'], v['batch_stats'], images)
  assert out.features['pre_logits'].shape == (8, 32)
  # Source mode is the stock evaluation forward, bit for bit.
  stock = module.apply(v, images, train=False)
  np.testing.assert_array_equal(out.logits, stock)
  # Test-batch statistics are those of the stock train-mode forward (whose
  # dropout is off here; the wrapped model never drops).
  batch = model(v['params'], v['batch_stats'], images, use_batch_stats=True)
  train = _stock_train_forward(CNN(dropout_rate=0.0), v, images)
  np.testing.assert_allclose(batch.logits, train, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['norm', 'tent', 'eata', 'sar'])
def test_flax_imagenet_resnet(name):
  module = TinyResNet(num_classes=10)
  model = models.wrap(module, RESNET_SHAPE)
  v = model.init(jax.random.key(2))
  # Non-trivial source statistics and affines, as after training.
  v = jax.tree.map(
    lambda x: x + 0.1 * jax.random.uniform(jax.random.key(3), x.shape), v
  )
  assert model.head == 'Dense_0'
  assert 'ResNetBlock_1/norm_proj' in model.norm_paths
  adapter = METHODS[name](model)
  state = adapter.init(v, jax.random.key(0))
  step = jax.jit(adapter.step)
  images = [_images(8, RESNET_SHAPE, seed=i) for i in range(3)]
  state, out = step(state, {'image': images[0]})
  # Every method here predicts its first batch with test-batch statistics,
  # before any update: the stock train-mode forward.
  train = _stock_train_forward(module, v, images[0])
  np.testing.assert_allclose(out.logits, train, rtol=1e-4, atol=1e-5)
  for x in images[1:]:
    state, out = step(state, {'image': x})
  assert np.all(np.isfinite(out.logits))
  for metric in out.metrics.values():
    assert np.all(np.isfinite(metric))
  if name == 'norm':
    assert testing.trees_equal(state.params, v['params'])
    return
  # Only BN scale and bias move.
  moved, kept = params_lib.split(
    state.params, params_lib.bn_affine(v['params'], v['batch_stats'])
  )
  orig_moved, orig_kept = params_lib.split(
    v['params'], params_lib.bn_affine(v['params'], v['batch_stats'])
  )
  assert testing.trees_equal(kept, orig_kept)
  assert not testing.trees_equal(moved, orig_moved)


def test_eata_reads_num_classes_from_the_logits():
  model = models.wrap(TinyResNet(num_classes=7), RESNET_SHAPE)
  v = model.init(jax.random.key(0))
  state = eata.eta(model, ADAM).init(v, jax.random.key(0))
  assert state.extra.probs.shape == (7,)


def test_layernorm_model_adapts_its_norm_affine():
  model = models.wrap(LayerNormNet(), (8, 8, 1), train_kwarg=None)
  v = model.init(jax.random.key(0))
  assert v['batch_stats'] == {}
  assert model.norm_paths == ('LayerNorm_0', 'ln_out')
  assert set(model.feature_names) == {'pre_logits', 'pooled'}
  with pytest.raises(ValueError, match='selects no parameters'):
    tent.tent(model, ADAM).init(v, jax.random.key(0))
  adapter = tent.tent(model, ADAM, adapt=model.norm_affine)
  state = adapter.init(v, jax.random.key(0))
  step = jax.jit(adapter.step)
  for i in range(2):
    state, out = step(state, {'image': _images(seed=i)})
  moved, kept = params_lib.split(
    state.params, model.norm_affine(v['params'], {})
  )
  assert sorted(moved) == ['LayerNorm_0', 'ln_out']
  assert testing.trees_equal(kept, params_lib.split(
    v['params'], model.norm_affine(v['params'], {}))[1])  # fmt: skip
  assert not testing.trees_equal(state.params, v['params'])


def test_features_by_module_path():
  model = models.wrap(
    TinyResNet(num_classes=3),
    RESNET_SHAPE,
    features={'stage1': 'ResNetBlock_0', 'stage2': 'ResNetBlock_1'},
  )
  v = model.init(jax.random.key(0))
  out = model(v['params'], v['batch_stats'], _images(2, RESNET_SHAPE))
  assert out.features['stage1'].shape == (2, 4)
  assert out.features['stage2'].shape == (2, 8)
  np.testing.assert_allclose(
    out.features['stage2'], out.features['pre_logits'], atol=1e-6
  )


def test_use_running_average_argument():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, use_running_average: bool):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=use_running_average)(x)
      return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

  model = models.wrap(Net(), (8, 8, 1), train_kwarg='use_running_average')
  v = model.init(jax.random.key(0))
  images = _images()
  out = model(v['params'], v['batch_stats'], images)
  stock = Net().apply(v, images, use_running_average=True)
  np.testing.assert_array_equal(out.logits, stock)


def test_bad_input_names_the_problem():
  with pytest.raises(ValueError, match="no argument 'training'"):
    models.wrap(CNN(), (28, 28, 1), train_kwarg='training')
  with pytest.raises(ValueError, match='no module at the paths'):
    models.wrap(CNN(), (28, 28, 1), features={'x': 'Conv_9'})
  _, model, v = _twin()
  with pytest.raises(ValueError, match='this model expects'):
    model(v['params'], v['batch_stats'], _images(2, (9, 9, 1)))
  with pytest.raises(ValueError, match='mask shape'):
    model(v['params'], v['batch_stats'], _images(4), mask=np.ones(3, bool))
  with pytest.raises(ValueError, match='feature_shift'):
    model(v['params'], v['batch_stats'], _images(4), feature_shift=(1.0, 0.0))
