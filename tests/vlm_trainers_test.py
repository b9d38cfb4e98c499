"""The dual encoder's trainers, called directly: LiT and CoOp."""

import functools
import logging
import math
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tta_jax import models, testing
from tta_jax._src import checkpoint, params as params_lib
from tta_jax.data import sources
from tta_jax.models import vlm
from tta_jax.trainers import base, coop, lit

SHAPE = (28, 28, 1)


@pytest.fixture(autouse=True)
def _needs_minilm():
  if not vlm.bert.available():
    pytest.skip(f'all-MiniLM-L6-v2 missing: {vlm.bert.INSTALL_HINT}')


@functools.cache
def _tiny():
  module = vlm.digits_classifier(
    10, width=4, text_config=dict(width=32, layers=1, heads=2, mlp_dim=64)
  )
  variables = models.init_variables(module, SHAPE, jax.random.key(0))
  return module, models.make_apply_fn(module, SHAPE), variables


def _digits(n, seed):
  """Real-looking data is not needed: blobs of ink per class."""
  r = np.random.default_rng(seed)
  labels = np.tile(np.arange(10), n // 10).astype(np.int32)
  images = np.zeros((len(labels), *SHAPE), np.float32)
  for i, k in enumerate(labels):
    y, x = 4 + 2 * k, 4 + r.integers(0, 16)
    images[i, y : y + 6, x : x + 6] = 1.0
  return sources.ArraySource(images, labels)


def _ctx(hparams, directory, variables=None):
  module, apply_fn, init = _tiny()
  return base.TrainContext(
    model_config={'name': 'vlm_digits'},
    module=module,
    apply_fn=apply_fn,
    variables=init if variables is None else variables,
    input_shape=SHAPE,
    num_classes=10,
    source_domains=[sources.Domain('source', _digits(100, 0))],
    val_domains=[sources.Domain('source', _digits(20, 1))],
    shifted_domains=[],
    hparams=ml_collections.ConfigDict(hparams),
    method_kwargs={},
    source_recipe={},
    seed=0,
    rng=jax.random.key(0),
    checkpointer=checkpoint.StateCheckpointer(directory),
    cache_dir=None,
    log_every=0,
  )


LIT = dict(
  steps=4,
  batch_size=20,
  learning_rate=1e-2,
  warmup_steps=1,
  weight_decay=1e-4,
  bn_momentum=0.9,
  plain_fraction=0.4,
  styled_fraction=0.7,
  numerals=True,
  text_init='keep',
  checkpoint_every=2,
)


def test_caption_bank():
  bank = lit.caption_bank(vlm.DIGIT_CLASSNAMES, lit.NUMERALS)
  assert len(bank.texts) == len(bank.label) == len(bank.style)
  for k, name in enumerate(vlm.DIGIT_CLASSNAMES):
    for s, words in enumerate(lit.STYLES.values()):
      caps = [t for t, y, z in zip(*bank, strict=True) if y == k and z == s]
      assert caps, (name, s)
      assert all(name in c or str(k) in c for c in caps)
      assert all(any(w in c for w in words) for c in caps)
  assert 'a photo of a seven.' in bank.texts


def test_augmentations_follow_their_family():
  image = np.zeros(SHAPE, np.float32)
  image[8:20, 12:15] = 1.0  # a vertical stroke
  u = jnp.asarray([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])  # no jitter, scale 1
  names = list(lit.STYLES)

  def aug(style):
    return np.asarray(
      lit._augment_one(jnp.asarray(image), names.index(style), u)
    )

  plain = aug('plain')
  np.testing.assert_allclose(plain, image, atol=1e-5)
  assert aug('thick').sum() > plain.sum() > aug('thin').sum()
  assert aug('small').sum() < plain.sum() < aug('large').sum()
  assert not np.allclose(aug('rotated'), plain)
  assert not np.allclose(aug('shifted'), plain)


def test_clip_loss_is_symmetric_infonce():
  r = np.random.default_rng(0)
  img = vlm.l2_normalize(jnp.asarray(r.normal(size=(6, 8)), jnp.float32))
  txt = vlm.l2_normalize(jnp.asarray(r.normal(size=(6, 8)), jnp.float32))
  logits = 10.0 * np.asarray(img) @ np.asarray(txt).T
  labels = np.arange(6)

  def ce(z):
    z = z - z.max(1, keepdims=True)
    return -(z[labels, labels] - np.log(np.exp(z).sum(1))).mean()

  expected = 0.5 * (ce(logits) + ce(logits.T))
  np.testing.assert_allclose(lit.clip_loss(img, txt, 10.0), expected, rtol=1e-5)


def test_lit_trains_the_image_tower_only_and_resumes(tmp_path, caplog):
  _, _, init = _tiny()
  result = lit.train(_ctx(LIT, tmp_path / 'a'))
  trained = result.variables['params']
  assert testing.trees_equal(trained['text'], init['params']['text'])
  assert testing.trees_equal(trained['prompt'], init['params']['prompt'])
  assert not testing.trees_equal(trained['image'], init['params']['image'])
  assert trained['logit_scale'] != init['params']['logit_scale']
  assert np.isfinite(result.metrics['loss'])
  assert 0.0 <= result.metrics['val_accuracy'] <= 1.0
  # Interrupted after step 2 (its checkpoint kept), then resumed: the same
  # model.
  shutil.rmtree(tmp_path / 'a' / '4')
  with caplog.at_level(logging.INFO, logger='absl'):
    resumed = lit.train(_ctx(LIT, tmp_path / 'a'))
  assert 'lit: resuming at step 2' in caplog.text  # not from the start
  testing.assert_trees_close(resumed.variables, result.variables, atol=1e-6)


def test_lit_refuses_bad_settings(tmp_path):
  with pytest.raises(ValueError, match='text_init'):
    lit.train(_ctx({**LIT, 'text_init': 'random'}, tmp_path))
  with pytest.raises(ValueError, match='default all-MiniLM'):
    lit.train(_ctx({**LIT, 'text_init': 'pretrained'}, tmp_path))


COOP = dict(
  shots=3,
  epochs=3,
  batch_size=10,
  learning_rate=0.5,
  momentum=0.9,
  weight_decay=5e-4,
  warmup_epochs=1,
  warmup_lr=1e-5,
  crop_scale=(0.5, 1.0),
  flip=False,
)


def test_few_shot():
  labels = np.repeat(np.arange(10), 20)
  idx = coop.few_shot(labels, 16, 10, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[idx]), np.full(10, 16))
  np.testing.assert_array_equal(idx, coop.few_shot(labels, 16, 10, seed=0))
  assert not np.array_equal(idx, coop.few_shot(labels, 16, 10, seed=1))
  with pytest.raises(ValueError, match='shots'):
    coop.few_shot(labels, 21, 10, seed=0)


def test_coop_schedule():
  lr = functools.partial(
    coop.epoch_learning_rate,
    lr=0.002,
    epochs=50,
    warmup_epochs=1,
    warmup_lr=1e-5,
  )
  # Dassl's warmup hands over to a cosine that has not stepped yet: the
  # epoch after the warmup trains at the full rate.
  assert lr(0) == 1e-5
  assert lr(1) == pytest.approx(0.002)
  assert lr(2) == pytest.approx(0.001 * (1 + math.cos(math.pi / 50)))
  assert lr(49) == pytest.approx(0.001 * (1 + math.cos(math.pi * 48 / 50)))
  assert lr(1) > lr(25) > lr(49) > 0


def test_coop_schedule_matches_torch_cosine():
  # After the warmup epoch, epoch e trains at torch's CosineAnnealingLR
  # (T_max = epochs) after e - 1 steps.
  torch = pytest.importorskip('torch')
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=0.002)
  cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
  for epoch in range(1, 50):
    ours = coop.epoch_learning_rate(
      epoch, lr=0.002, epochs=50, warmup_epochs=1, warmup_lr=1e-5
    )
    assert ours == pytest.approx(opt.param_groups[0]['lr'], rel=1e-6)
    opt.step()
    cosine.step()


def test_coop_trains_the_context_only_and_resumes(tmp_path, caplog):
  _, _, init = _tiny()
  calls = []

  def gradient(loss_fn, trainable):  # the hook SAPT uses
    calls.append(1)
    return jax.value_and_grad(loss_fn)(trainable)

  result = coop.train(_ctx(COOP, tmp_path / 'a'), gradient=gradient)
  assert calls  # traced through the hook
  mask = vlm.context_mask(init['params'], {})
  ctx0, frozen0 = params_lib.split(init['params'], mask)
  ctx1, frozen1 = params_lib.split(result.variables['params'], mask)
  assert testing.trees_equal(frozen0, frozen1)
  assert not testing.trees_equal(ctx0, ctx1)
  assert np.isfinite(result.metrics['loss'])
  assert {'source_zero_shot_accuracy', 'source_accuracy'} <= set(result.metrics)
  source = _digits(100, 0)  # _ctx's source domain
  shots = sources.SubsetSource(
    source, coop.few_shot(source.labels, COOP['shots'], 10, 0)
  )
  _, apply_fn, _ = _tiny()
  for key, variables in (
    ('shots_zero_shot_accuracy', init),
    ('shots_accuracy', result.variables),
  ):
    assert result.metrics[key] == lit.zero_shot_accuracy(
      apply_fn, variables, shots
    )
  shutil.rmtree(tmp_path / 'a' / '3')  # interrupted after epoch 2
  with caplog.at_level(logging.INFO, logger='absl'):
    resumed = coop.train(_ctx(COOP, tmp_path / 'a'))
  assert 'coop: resuming at epoch 2' in caplog.text  # not from the start
  testing.assert_trees_close(resumed.variables, result.variables, atol=1e-6)
