"""PyTorch -> tta_jax conversion: logits parity, strictness, the binary.

Reference architectures (`tta_jax.torch_reference.models`) get random
weights AND random BN running statistics; converted, our models must give
the same logits in eval mode (source statistics) and in train-mode BN
(statistics of the batch). All on 32x32 inputs, so the originals' 8x8
average pooling is our global mean.
"""

import hashlib
import logging as std_logging
import types

import jax
import ml_collections
import numpy as np
import pytest
from absl import app
from flax import traverse_util

from tta_jax import models, torch_reference
from tta_jax._src import checkpoint
from tta_jax.models.vision import convert

torch = pytest.importorskip('torch', reason=torch_reference.INSTALL_HINT)
from tta_jax.torch_reference import models as tm  # noqa: E402

pytestmark = pytest.mark.torch

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TTT_NORM = ((0.5,) * 3, (0.5,) * 3)
RTOL = 1e-4


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _images(batch, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(batch, 32, 32, 3)).astype(np.float32)


def _torch_logits(model, images, norm, *, train):
  mean, std = (np.asarray(v, np.float32) for v in norm)
  x = ((images - mean) / std).transpose(0, 3, 1, 2)
  model.train(train)
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _assert_logits_close(ours, ref):
  # Random deep nets in eval mode reach logits in the hundreds; float32
  # agreement is relative to that scale.
  scale = max(1.0, float(np.abs(ref).max()))
  np.testing.assert_allclose(
    np.asarray(ours), ref, rtol=RTOL, atol=RTOL * scale
  )


PARITY = [
  # name, torch model, normalisation, model kwargs, batch, train-mode too
  ('wide_resnet28_2', lambda: tm.WideResNet(28, 2, 10), ((0,) * 3, (1,) * 3),
   {}, 4, True),
  # width 2: layer1_0's shortcut zero-pads TTT's 16-channel stem to 32.
  ('resnet26', lambda: tm.ResNetCifar(26, 2, 10), TTT_NORM,
   {'mean': list(TTT_NORM[0]), 'std': list(TTT_NORM[1]), 'width': 2}, 4,
   True),
  ('resnet18', lambda: tm.resnet18(7), IMAGENET, {}, 4, True),
  # Train-mode BN would normalise layer4's 1x1 maps over 2 values: eval only.
  ('resnet50', lambda: tm.resnet50(7), IMAGENET, {}, 2, False),
]  # fmt: skip


@pytest.mark.parametrize(
  'name,make,norm,kwargs,batch,train',
  PARITY,
  ids=[p[0] for p in PARITY],
)
def test_logits_match_pytorch(name, make, norm, kwargs, batch, train):
  ref_model = tm.randomize_(make(), seed=1)
  num_classes = ref_model.fc.out_features
  variables = convert.from_torch_state_dict(
    name, _state_dict(ref_model), num_classes=num_classes,
    model_kwargs=kwargs,
  )  # fmt: skip
  module = models.build(name, num_classes=num_classes, **kwargs)
  apply_fn = jax.jit(
    models.make_apply_fn(module, (32, 32, 3)),
    static_argnames='use_batch_stats',
  )
  images = _images(batch)
  modes = (False, True) if train else (False,)
  for use_batch_stats in modes:
    ref = _torch_logits(ref_model, images, norm, train=use_batch_stats)
    out = apply_fn(
      variables['params'],
      variables['batch_stats'],
      images,
      use_batch_stats=use_batch_stats,
    )
    _assert_logits_close(out.logits, ref)


def test_wide_resnet28_10_shapes():
  ref_model = tm.WideResNet(28, 10, 10)
  variables = convert.from_torch_state_dict(
    'wide_resnet28_10', _state_dict(ref_model), num_classes=10
  )
  template = jax.eval_shape(
    lambda: models.init_variables(
      models.build('wide_resnet28_10', num_classes=10),
      (32, 32, 3),
      jax.random.key(0),
    )
  )
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), variables)
  assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), template)
  n_torch = sum(
    v.numel()
    for k, v in ref_model.state_dict().items()
    if not k.endswith('num_batches_tracked')
  )
  assert sum(x.size for x in jax.tree.leaves(variables)) == n_torch
  # Spot checks of the layout: the shortcut and the transposes.
  w = ref_model.block2.layer[0].convShortcut.weight.detach().numpy()
  np.testing.assert_array_equal(
    variables['params']['block2_0']['shortcut']['kernel'],
    w.transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    variables['params']['head']['kernel'],
    ref_model.fc.weight.detach().numpy().T,
  )
  np.testing.assert_array_equal(
    variables['batch_stats']['bn']['var'], ref_model.bn1.running_var.numpy()
  )


@pytest.fixture(scope='module')
def resnet26_dict():
  return _state_dict(tm.randomize_(tm.ResNetCifar(26, 1, 10), seed=2))


def test_wrappers_and_data_parallel_prefix(resnet26_dict):
  plain = convert.from_torch_state_dict(
    'resnet26', resnet26_dict, num_classes=10
  )
  prefixed = {
    'module.' + k: v.astype(np.float64) for k, v in resnet26_dict.items()
  }
  for wrapped in (
    {'state_dict': prefixed},
    {'model_state_dict': resnet26_dict, 'epoch': 3},
    # TTT's ckpt.pth: the classifier net, the SSL head, the optimizer.
    {'net': prefixed, 'head': {'weight': np.zeros((4, 64))}, 'err_cls': 0.1},
  ):
    got = convert.from_torch_state_dict('resnet26', wrapped, num_classes=10)
    assert jax.tree.structure(got) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain), strict=True):
      assert a.dtype == np.float32
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='wrapped under'):
    convert.unwrap_state_dict({'weights': resnet26_dict, 'step': 1})


def _error(state_dict, **kw):
  kw.setdefault('num_classes', 10)
  with pytest.raises(ValueError) as info:
    convert.from_torch_state_dict('resnet26', state_dict, **kw)
  return str(info.value)


def test_strict_unused_and_missing(resnet26_dict):
  sd = dict(resnet26_dict)
  sd['extra.weight'] = np.zeros(3, np.float32)
  sd['layer1.0.bn3.weight'] = np.zeros(16, np.float32)
  del sd['fc.bias'], sd['layer2.1.bn1.running_var']
  msg = _error(sd)
  assert 'unused PyTorch tensors: extra.weight, layer1.0.bn3.weight' in msg
  assert (
    'tta_jax leaves with no tensor: batch_stats/layer2_1/bn1/var, '
    'params/head/bias'
  ) in msg
  assert 'shape mismatches' not in msg


def test_strict_shapes(resnet26_dict):
  msg = _error(resnet26_dict, num_classes=7)
  assert 'fc.weight is (10, 64), params/head/kernel needs (7, 64)' in msg
  assert 'fc.bias is (10,), params/head/bias needs (7,)' in msg
  assert 'no tensor' not in msg  # the head is reported once, as misshapen
  # The width-1 dict does not fit the width-2 model (stem stays 16 wide).
  msg = _error(resnet26_dict, model_kwargs={'width': 2})
  assert 'layer1.0.conv1.weight is (16, 16, 3, 3)' in msg
  assert 'conv1.weight is (16, 3, 3, 3), params/conv1' not in msg


def test_strict_group_norm_and_unknown_model(resnet26_dict):
  no_stats = {k: v for k, v in resnet26_dict.items() if 'running' not in k}
  msg = _error(no_stats)
  assert 'batch_stats/bn/mean' in msg and 'GroupNorm' in msg
  with pytest.raises(ValueError, match='no PyTorch layout'):
    convert.from_torch_state_dict('digits_cnn', resnet26_dict, num_classes=10)


def _run_main(argv):
  """`python -m experiments.convert_torch_main ARGV`, in this process."""
  from experiments import convert_torch_main

  flags = convert_torch_main.FLAGS
  # Unparsing sets absl's logger to the default verbosity (WARNING), which
  # would hide the INFO lines later tests in this process look for.
  absl_logger = std_logging.getLogger('absl')
  level = absl_logger.level
  try:
    flags(['convert_torch_main', *argv])
    convert_torch_main.main(['convert_torch_main'])
  finally:
    flags.unparse_flags()
    absl_logger.setLevel(level)


def test_main_end_to_end(tmp_path):
  ref_model = tm.randomize_(tm.ResNetCifar(26, 1, 10), seed=3)
  # As TTT saves it after DataParallel training.
  sd = {'module.' + k: v for k, v in ref_model.state_dict().items()}
  pt = tmp_path / 'ckpt.pth'
  torch.save({'net': sd, 'head': {}, 'err_cls': 0.1}, pt)
  out = tmp_path / 'src'
  argv = [
    f'--checkpoint={pt}', '--model=resnet26', '--num_classes=10',
    '--input_shape=32,32,3', f'--out={out}', '--mean=0.5,0.5,0.5',
    '--std=0.5,0.5,0.5',
  ]  # fmt: skip
  _run_main(argv)

  metadata = checkpoint.load_metadata(out)
  model_config = {'name': 'resnet26', 'mean': [0.5] * 3, 'std': [0.5] * 3}
  assert metadata['model'] == model_config
  assert metadata['input_shape'] == [32, 32, 3]
  assert metadata['num_classes'] == 10
  digest = hashlib.sha256(pt.read_bytes()).hexdigest()
  assert metadata['converted_from']['sha256'] == digest

  # What the runner does with config.source_ckpt=out and this config.model.
  from tta_jax.runners import artifacts

  config = ml_collections.ConfigDict(
    {'model': model_config, 'source_ckpt': str(out)}
  )
  benchmark = types.SimpleNamespace(
    input_shape=(32, 32, 3), num_classes=10, source_train=None
  )
  module, _ = artifacts.build_model(config.model, benchmark)
  variables, _ = artifacts.load_source(config, tmp_path, benchmark, module)
  expected = convert.from_torch_state_dict(
    'resnet26', _state_dict(ref_model), num_classes=10
  )
  flat = traverse_util.flatten_dict(variables, sep='/')
  for k, v in traverse_util.flatten_dict(expected, sep='/').items():
    np.testing.assert_array_equal(np.asarray(flat[k]), v, err_msg=k)
  assert list(module.mean) == list(module.std) == [0.5] * 3

  # A second conversion into the same directory needs --overwrite.
  with pytest.raises(app.UsageError, match='--overwrite'):
    _run_main(argv)
  with pytest.raises(app.UsageError, match='32x32'):
    _run_main([*argv[:3], '--input_shape=64,64,3', *argv[4:], '--overwrite'])
