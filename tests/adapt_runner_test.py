"""The benchmark runner end to end on the embedded digits (small config)."""

import json
import pathlib
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import numpy as np
from absl.testing import absltest

from configs import default
from tta_jax.data import benchmarks, sources, streams
from tta_jax.data.images import corruptions, digits
from tta_jax.runners import adapt, pretrain

_SOURCE: dict[str, str] = {}


def _config(**overrides):
  config = default.get_config('small')
  config.source_ckpt = _SOURCE['dir']
  config.clean_eval_examples = 0
  config.methods = 'tent'
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config


def _errors(results, name='tent'):
  return {d: v['error'] for d, v in results['methods'][name]['domains'].items()}


class AdaptRunnerTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if 'dir' not in _SOURCE:
      root = pathlib.Path(tempfile.mkdtemp())
      config = default.get_config('small')
      pretrain.run(config, root)
      _SOURCE['dir'] = str(root / 'source')

  def workdir(self):
    return pathlib.Path(tempfile.mkdtemp())

  def test_end_to_end_outputs(self):
    workdir = self.workdir()
    config = _config(methods='source,norm,tent', clean_eval_examples=64)
    results = adapt.run(config, workdir)
    for name in ('results.json', 'results.md', 'results.csv', 'results.png'):
      self.assertTrue((workdir / name).exists(), name)
    saved = json.loads((workdir / 'results.json').read_text())
    self.assertEqual(set(saved['methods']), {'source', 'norm', 'tent'})
    domains = ['gaussian_noise', 'defocus_blur', 'contrast', 'uci_digits']
    self.assertEqual(saved['domains'], domains)
    for m in saved['methods'].values():
      self.assertEqual(list(m['domains']), domains)
      for d in m['domains'].values():
        self.assertEqual(d['n'], 100)
        self.assertBetween(d['error'], 0.0, 1.0)
        self.assertBetween(d['ece'], 0.0, 1.0)
        self.assertGreater(d['seconds'], 0.0)
      self.assertIn('clean_error_after', m)
    # source does not adapt: its clean error before and after are equal.
    src = saved['methods']['source']
    self.assertEqual(src['clean_error_before'], src['clean_error_after'])
    table = (workdir / 'results.md').read_text()
    self.assertIn('| tent |', table)
    # A second run reuses the finished methods.
    again = adapt.run(config, workdir)
    self.assertEqual(again['methods']['tent'], results['methods']['tent'])

  def test_validation_stream_beside_the_test_results(self):
    workdir = self.workdir()
    test = adapt.run(_config(methods='source'), workdir)
    config = default.get_config('small,validation')
    config.source_ckpt, config.methods = _SOURCE['dir'], 'source'
    config.clean_eval_examples = 0
    val = adapt.run(config, workdir)
    self.assertEqual(val['domains'], list(corruptions.VALIDATION_CORRUPTIONS))
    self.assertTrue((workdir / 'validation.md').exists())
    kept = json.loads((workdir / 'results.json').read_text())
    self.assertEqual(kept['domains'], test['domains'])
    self.assertTrue((workdir / 'methods_validation' / 'source.json').exists())
    # The validation stream corrupts the source-val digits, not the test
    # digits, and never includes the UCI digits.
    bench = benchmarks.build(config.data, config.setting)
    val_labels = [bench.domains[0].source[np.arange(8)]['label']]
    splits = digits.load(
      train=config.data.train_size,
      val=config.data.val_size,
      test=config.data.test_size,
    )
    np.testing.assert_array_equal(val_labels[0], splits.val.labels[:8])
    config.data.natural_shift = True
    with self.assertRaisesRegex(ValueError, 'natural_shift'):
      benchmarks.build(config.data, config.setting)
    # Other benchmarks refuse a validation split instead of ignoring it.
    config.data.name = 'digits_rotated'
    with self.assertRaisesRegex(ValueError, 'target_split'):
      benchmarks.build(config.data, config.setting)

  def test_gradual_needs_severities(self):
    config = _config()
    config.data.name = 'digits_rotated'
    with self.assertRaisesRegex(ValueError, "'gradual' needs .* severities"):
      benchmarks.build(config.data, 'gradual')

  def test_resume_equals_uninterrupted(self):
    config = _config(checkpoint_every=2)
    real_read = streams.read_batch
    with mock.patch.object(streams, 'read_batch', wraps=real_read) as read:
      full = adapt.run(config, self.workdir())
    full_reads = read.call_count
    workdir = self.workdir()

    def flaky(*args, **kwargs):
      if read.call_count == 8:  # counted before this call runs
        raise KeyboardInterrupt('simulated interruption')
      return real_read(*args, **kwargs)

    with mock.patch.object(streams, 'read_batch', side_effect=flaky) as read:
      with self.assertRaises(KeyboardInterrupt):
        adapt.run(config, workdir)
    ckpts = list((workdir / 'adapt_ckpt').glob('*/seed0/*'))
    self.assertNotEmpty(ckpts)
    # The second run starts from the checkpoint, not from the beginning: it
    # reads fewer batches than a whole run does.
    with mock.patch.object(streams, 'read_batch', wraps=real_read) as read:
      resumed = adapt.run(config, workdir)
    self.assertLess(read.call_count, full_reads)
    self.assertEqual(_errors(resumed), _errors(full))
    for d, v in full['methods']['tent']['domains'].items():
      r = resumed['methods']['tent']['domains'][d]
      self.assertEqual(r['nll'], v['nll'])
      self.assertEqual(r['ece'], v['ece'])

  def test_vmapped_domains_equal_sequential(self):
    # With the clean check: it adapts from the last stream's final state.
    kw = dict(setting='reset_each_shift', clean_eval_examples=32)
    seq = adapt.run(_config(**kw), self.workdir())
    par = adapt.run(_config(parallel='domains', **kw), self.workdir())
    self.assertEqual(_errors(seq), _errors(par))
    self.assertEqual(
      seq['methods']['tent']['clean_error_after'],
      par['methods']['tent']['clean_error_after'],
    )
    for d, v in seq['methods']['tent']['domains'].items():
      self.assertAlmostEqual(
        v['nll'], par['methods']['tent']['domains'][d]['nll'], places=4
      )

  def test_vmapped_seeds_equal_sequential(self):
    kw = dict(seeds='0,1', clean_eval_examples=32)
    seq = adapt.run(_config(**kw), self.workdir())
    par = adapt.run(_config(parallel='seeds', **kw), self.workdir())
    self.assertEqual(_errors(seq), _errors(par))
    self.assertEqual(
      seq['methods']['tent']['clean_error_after'],
      par['methods']['tent']['clean_error_after'],
    )
    self.assertEqual(seq['methods']['tent']['num_seeds'], 2)
    self.assertIn('mean_error_std', par['methods']['tent'])

  def test_sharded_equals_single_device(self):
    self.assertGreaterEqual(jax.device_count(), 2)
    single = adapt.run(_config(), self.workdir())
    sharded = adapt.run(_config(shard_batch=True), self.workdir())
    self.assertEqual(_errors(single), _errors(sharded))
    for d, v in single['methods']['tent']['domains'].items():
      self.assertAlmostEqual(
        v['nll'], sharded['methods']['tent']['domains'][d]['nll'], places=4
      )

  def test_mixed_bn_for_any_batch_bn_method(self):
    # Meta-TTT's mixed BN as a method option: with alpha=1 (the source
    # statistics' weight) and a zero learning rate Tent predicts as `source`.
    config = _config(methods='source,tent,tent_src,tent_mixed')
    tent_src = config.method_configs.tent.to_dict()
    tent_src['optimizer']['learning_rate'] = 0.0
    config.method_configs.tent_src = {
      **tent_src,
      'method': 'tent',
      'mixed_bn_alpha': 1.0,
    }
    config.method_configs.tent_mixed = {
      **config.method_configs.tent,
      'method': 'tent',
      'mixed_bn_alpha': 0.5,
    }
    results = adapt.run(config, self.workdir())
    self.assertEqual(_errors(results, 'tent_src'), _errors(results, 'source'))
    self.assertNotEqual(_errors(results, 'tent_mixed'), _errors(results))
    config = _config(methods='t3a')
    config.method_configs.t3a.mixed_bn_alpha = 0.5
    # T3A picks its own BN statistics: the option is not one of its keywords.
    with self.assertRaisesRegex(
      ValueError, r"unknown config keys \['mixed_bn_alpha'\] for method 't3a'"
    ):
      adapt.run(config, self.workdir())
    config = _config(methods='tent')
    config.method_configs.tent.mixed_bn_alpha = 1.5
    with self.assertRaisesRegex(ValueError, r'must be in \[0, 1\]'):
      adapt.run(config, self.workdir())

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, r"unknown methods \['tentt'\]"):
      adapt.run(_config(methods='tentt'), self.workdir())
    with self.assertRaisesRegex(ValueError, 'unknown stream setting'):
      adapt.run(_config(setting='episodic'), self.workdir())
    with self.assertRaisesRegex(ValueError, "unknown dataset 'mnist_c'.*valid"):
      adapt.run(_config(**{'data.name': 'mnist_c'}), self.workdir())
    with self.assertRaisesRegex(ValueError, 'trained with model='):
      adapt.run(_config(**{'model.width': 16}), self.workdir())

  def test_unknown_config_key_on_the_command_line(self):
    out = subprocess.run(
      [
        sys.executable,
        '-m',
        'experiments.adapt_main',
        '--config=configs/default.py:small',
        f'--workdir={self.workdir()}',
        '--config.methodz=tent',
      ],
      capture_output=True,
      text=True,
      cwd=pathlib.Path(__file__).parents[1],
      check=False,
      timeout=300,
    )
    self.assertNotEqual(out.returncode, 0)
    self.assertIn('methodz', out.stderr)

  def test_non_finite_images_are_rejected_with_the_batch_index(self):
    real_build = benchmarks.build

    def poisoned(data_config, setting):
      bench = real_build(data_config, setting)
      d = bench.domains[1]
      images = d.source.images.copy()
      images[5, 3, 3, 0] = np.nan
      bad = sources.Domain(d.name, sources.ArraySource(images, d.source.labels))
      return bench._replace(domains=[bench.domains[0], bad])

    benchmarks.build = poisoned
    try:
      # shuffle=False ordering is not exposed; any batch of domain 1 may
      # hold row 5, so the message names the batch wherever it is. (The
      # default policy masks such rows out: tests/reliability_test.py.)
      with self.assertRaisesRegex(ValueError, r'batch \d+ contains NaN'):
        adapt.run(_config(nonfinite='raise'), self.workdir())
    finally:
      benchmarks.build = real_build


if __name__ == '__main__':
  absltest.main()
