"""The meta-training runner and the leave-one-domain-out protocol."""

import json
import pathlib
import tempfile

import jax.numpy as jnp
import pytest
from absl.testing import absltest

from configs import default
from tta_jax import trainers
from tta_jax.runners import adapt, artifacts, configs, train
from tta_jax.trainers import base


def _toy_trainer(ctx: base.TrainContext) -> base.TrainResult:
  """A 'meta-trainer' whose artifacts are recognisable downstream: a
  backbone that always predicts class 0, and a learning rate."""
  assert ctx.source_domains and ctx.val_domains
  assert ctx.hparams.scale == 3.0
  params = dict(ctx.variables['params'])
  head = dict(params['head'])
  head['bias'] = head['bias'].at[0].add(1e4)
  params['head'] = head
  return base.TrainResult(
    meta={'log_learning_rate': jnp.log(1e-3)},
    variables={**ctx.variables, 'params': params},
    metrics={'loss': 0.5},
  )


def _toy_config(held_out: str, methods: str):
  """Rotated digits, leave-one-domain-out over `held_out`, with the toy
  trainer and `source_on_toy`: the source method on toy's backbone."""
  config = default.get_config('small')
  config.data.name = 'digits_rotated_dg'
  config.data.rotations = (0, 60, 75)
  config.data.held_out = held_out
  config.meta_methods = 'toy'
  config.meta_train.toy = {'scale': 3.0}
  config.methods = methods
  config.method_configs.source_on_toy = {'method': 'source', 'meta_from': 'toy'}
  return config


class MetaTrainRunnerTest(absltest.TestCase):
  @pytest.mark.slow
  def test_leave_one_domain_out_with_meta_artifacts(self):
    trainers.TRAINERS['toy'] = _toy_trainer
    try:
      config = _toy_config('rot0,rot75', 'source,toy,source_on_toy')
      config.method_configs.toy = {
        'method': 'tent',
        'optimizer': {'name': 'adam', 'learning_rate': 1.0, 'inject': True},
      }
      workdir = pathlib.Path(tempfile.mkdtemp())
      # Before meta-training, adaptation refuses (no silent source model).
      with self.assertRaisesRegex(FileNotFoundError, 'meta_train_main'):
        adapt.run(config, workdir)
      train.run(config, workdir)
      for held in ('rot0', 'rot75'):
        d = workdir / 'dg' / held
        self.assertTrue((d / 'source' / 'metadata.json').exists())
        self.assertTrue((d / 'meta' / 'toy' / 'backbone').exists())
        loaded = artifacts.load_meta(d / 'meta' / 'toy')
        self.assertAlmostEqual(
          float(jnp.exp(loaded['log_learning_rate'])), 1e-3, places=6
        )
      # Meta-training is not repeated, nor reused under other settings.
      again = train.run(config, workdir)
      self.assertEqual(again['rot0']['toy']['metrics'], {'loss': 0.5})
      changed = config.copy_and_resolve_references()
      changed.meta_train.toy.scale = 4.0
      with self.assertRaisesRegex(ValueError, r"other settings.*'meta_train'"):
        train.run(changed, workdir)

      results = adapt.run(config, workdir)
      self.assertEqual(results['protocol'], 'leave_one_domain_out')
      self.assertEqual(results['domains'], ['rot0', 'rot75'])
      saved = json.loads((workdir / 'results.json').read_text())
      toy = saved['methods']['toy']
      # The meta-trained backbone predicts class 0 everywhere: 90 % error.
      for held in ('rot0', 'rot75'):
        self.assertAlmostEqual(toy['domains'][held]['error'], 0.9, delta=0.02)
        on_toy = saved['methods']['source_on_toy']['domains'][held]
        self.assertAlmostEqual(on_toy['error'], 0.9, delta=0.02)
      self.assertLess(
        saved['methods']['source']['domains']['rot0']['error'], 0.9
      )
      self.assertIn('clean_error_after', toy)
      self.assertIn('held_out', toy)
    finally:
      trainers.TRAINERS.pop('toy', None)

  def test_meta_from_on_one_held_out_domain(self):
    # The default suite's share of the slow test above: adaptation refuses
    # before meta-training, and a method on another's meta-trained backbone.
    trainers.TRAINERS['toy'] = _toy_trainer
    try:
      config = _toy_config('rot75', 'source_on_toy')
      config.pretrain.epochs = 1  # toy's backbone ignores what it learned
      workdir = pathlib.Path(tempfile.mkdtemp())
      with self.assertRaisesRegex(FileNotFoundError, 'meta_train_main'):
        adapt.run(config, workdir)
      train.run(config, workdir)
      results = adapt.run(config, workdir)
      self.assertEqual(results['domains'], ['rot75'])
      on_toy = results['methods']['source_on_toy']['domains']['rot75']
      # toy's backbone predicts class 0 everywhere: 90 % error.
      self.assertAlmostEqual(on_toy['error'], 0.9, delta=0.02)
    finally:
      trainers.TRAINERS.pop('toy', None)

  def test_partial_run_under_other_settings_is_refused(self):
    config = default.get_config('small')
    config.meta_methods = 'meta_ttt'
    config.method_configs.meta_ttt = {'method': 'meta_ttt'}
    config.meta_train.meta_ttt = {'steps': 5}
    workdir = pathlib.Path(tempfile.mkdtemp())
    kwargs = configs.method_kwargs(config, 'meta_ttt')
    progress = workdir / 'meta_ckpt' / 'meta_ttt.json'
    progress.parent.mkdir(parents=True)
    progress.write_text(
      json.dumps(
        {'settings': artifacts.trainer_settings(config, 'meta_ttt', kwargs)}
      )
    )
    config.method_configs.meta_ttt.max_lr = 0.5  # a test-time keyword
    with self.assertRaisesRegex(ValueError, r"partial.*'method'"):
      train.run(config, workdir)

  def test_misspelled_trainer_settings_are_refused(self):
    from configs import meta_ttt_digits, vlm_digits

    config = meta_ttt_digits.get_config('small')
    config.meta_train.meta_ttt.learning_rat = 0.1  # learning_rate
    with self.assertRaisesRegex(
      ValueError, r"unknown meta_ttt trainer settings \['learning_rat'\]"
    ):
      train.run(config, tempfile.mkdtemp())
    # A variant is checked against the trainer it runs.
    config = meta_ttt_digits.get_config('small')
    config.meta_train.meta_ttt_no_shift.shiftp = 0.0
    with self.assertRaisesRegex(ValueError, r"settings \['shiftp'\]"):
      configs.trained_names(config)
    # The source recipe of a source trainer (LiT), beside its name.
    pretrain = vlm_digits.get_config('small').pretrain
    trainers.check_settings('lit', pretrain, ignore=('trainer',))
    pretrain.stepz = 3
    with self.assertRaisesRegex(
      ValueError, r"lit trainer settings \['stepz'\]"
    ):
      trainers.check_settings('lit', pretrain, ignore=('trainer',))

  def test_unknown_meta_method(self):
    config = default.get_config('small')
    config.meta_methods = 'nope'
    with self.assertRaisesRegex(ValueError, 'no meta-trainer'):
      train.run(config, tempfile.mkdtemp())


if __name__ == '__main__':
  absltest.main()
