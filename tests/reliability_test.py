"""Reliability: bad input, damaged checkpoints, interrupted runs, reruns.

Each test holds one of the guarantees the README's reliability section
lists: non-finite inputs never poison a stream, a damaged checkpoint is
never trusted, every resume finishes and equals the uninterrupted run,
results are merged, `init` owns its buffers, and bad configs fail in one
line before any work.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest

from configs import default
from tta_jax import methods, testing as test_utils
from tta_jax._src import base, checkpoint
from tta_jax.data import streams
from tta_jax.methods import tent
from tta_jax.runners import adapt, pretrain, scoring, streams as stream_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SOURCE: dict[str, str] = {}
TIMING = {'seconds', 'examples_per_second', 'compile_seconds', 'train_seconds'}


def _source() -> str:
  if 'dir' not in _SOURCE:
    root = pathlib.Path(tempfile.mkdtemp())
    pretrain.run(default.get_config('small'), root)
    _SOURCE['dir'] = str(root / 'source')
  return _SOURCE['dir']


def _config(**overrides):
  config = default.get_config('small')
  config.source_ckpt = _source()
  config.methods = 'tent'
  config.checkpoint_every = 2
  config.clean_eval_examples = 32
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return config


def _strip(tree):
  """Results without wall-clock fields (they differ between runs)."""
  if isinstance(tree, dict):
    return {k: _strip(v) for k, v in tree.items() if k not in TIMING}
  if isinstance(tree, list):
    return [_strip(v) for v in tree]
  return tree


def _workdir() -> pathlib.Path:
  return pathlib.Path(tempfile.mkdtemp())


class _Stop(Exception):
  """The simulated interruption."""


class ResumeTest(absltest.TestCase):
  """Interrupt at every position, resume, compare bit for bit."""

  @pytest.mark.slow  # ~45 s; adapt_runner_test resumes in the default suite
  def test_resume_at_every_boundary_equals_uninterrupted(self):
    # Two domains of 40 digits in batches of 16: 3 + 3 batches (each
    # domain's last one padded), a checkpoint every 2 batches. BN-EMA
    # carries its state from batch to batch and compiles fast.
    config = _config(
      methods='norm_ema',
      batch_size=16,
      **{'data.max_examples_per_domain': 40},
    )
    config.data.corruptions = ('gaussian_noise', 'contrast')
    config.data.natural_shift = False
    reference = _strip(adapt.run(config, _workdir()))
    real_read, real_clean = stream_lib.read_batch, scoring.clean_error
    # Stop before batch i (0 .. 5, the last batch included; the first read
    # is the compilation's), and at the method boundary: after the last
    # batch, while scoring clean data.
    for stop_at in [*range(6), 'boundary']:
      workdir = _workdir()
      reads = {'n': 0}

      def read(*args, stop_at=stop_at, reads=reads, **kwargs):
        if stop_at != 'boundary' and reads['n'] == stop_at + 1:
          raise _Stop(f'before batch {stop_at}')
        reads['n'] += 1
        return real_read(*args, **kwargs)

      def clean(*args, **kwargs):
        raise _Stop('at the method boundary')

      stream_lib.read_batch = read
      if stop_at == 'boundary':
        scoring.clean_error = clean
      try:
        with self.assertRaises(_Stop):
          adapt.run(config, workdir)
      finally:
        stream_lib.read_batch, scoring.clean_error = real_read, real_clean
      self.assertEqual(
        _strip(adapt.run(config, workdir)), reference, f'stopped {stop_at}'
      )


class CheckpointTest(absltest.TestCase):
  def _saved(self):
    directory = _workdir() / 'ckpt'
    ckpt = checkpoint.StateCheckpointer(directory)
    r = np.random.default_rng(0)
    trees = {
      s: {'w': r.normal(size=(64, 64)).astype(np.float32)} for s in (2, 4)
    }
    for s, tree in trees.items():
      ckpt.save(s, tree)
    ckpt.close()
    return directory, trees

  def _data_files(self, directory, step):
    files = [
      p
      for p in (directory / str(step)).rglob('*')
      if p.is_file() and 'd' in p.parts and p.stat().st_size > 1000
    ]
    self.assertNotEmpty(files)
    return files

  def test_damaged_latest_step_falls_back_to_the_intact_one(self):
    directory, trees = self._saved()
    for path in self._data_files(directory, 4):
      data = bytearray(path.read_bytes())
      for i in range(200, min(600, len(data))):
        data[i] ^= 0xFF
      path.write_bytes(bytes(data))
    ckpt = checkpoint.StateCheckpointer(directory)
    with self.assertLogs(level='WARNING') as logs:
      step, tree = ckpt.restore_latest(trees[2])
    self.assertEqual(step, 2)
    np.testing.assert_array_equal(tree['w'], trees[2]['w'])
    self.assertIn('not used', '\n'.join(logs.output))
    self.assertNotIn(4, ckpt.manager.all_steps())  # deleted, so never reused
    ckpt.close()

  def test_explicit_restore_of_a_damaged_step_raises(self):
    directory, trees = self._saved()
    for path in self._data_files(directory, 4):
      path.write_bytes(path.read_bytes()[:100])
    ckpt = checkpoint.StateCheckpointer(directory)
    with self.assertRaisesRegex(ValueError, 'step 4 .* is damaged'):
      ckpt.restore(trees[4])
    ckpt.close()

  def test_truncated_latest_step_falls_back(self):
    directory, trees = self._saved()
    for path in self._data_files(directory, 4):
      path.write_bytes(path.read_bytes()[:100])
    ckpt = checkpoint.StateCheckpointer(directory)
    step, tree = ckpt.restore_latest(trees[2])
    self.assertEqual(step, 2)
    np.testing.assert_array_equal(tree['w'], trees[2]['w'])
    # The damaged step is gone, so the run can save it again.
    ckpt.save(4, trees[4])
    self.assertEqual(ckpt.restore_latest(trees[2])[0], 4)
    ckpt.close()

  def test_damaged_stream_checkpoint_is_not_trusted(self):
    config = _config()
    reference = _strip(adapt.run(config, _workdir()))
    workdir = _workdir()
    real_read = stream_lib.read_batch
    seen = {'n': 0}

    def read(*args, **kwargs):
      if seen['n'] == 9:
        raise _Stop
      seen['n'] += 1
      return real_read(*args, **kwargs)

    stream_lib.read_batch = read
    try:
      with self.assertRaises(_Stop):
        adapt.run(config, workdir)
    finally:
      stream_lib.read_batch = real_read
    steps = [
      d for d in workdir.glob('adapt_ckpt/*/seed0/*') if d.name.isdigit()
    ]
    latest = max(steps, key=lambda d: int(d.name))
    damaged = []
    for path in latest.rglob('*'):
      if path.is_file() and path.stat().st_size > 5000:
        data = bytearray(path.read_bytes())
        data[5000:5400] = bytes(b ^ 0xFF for b in data[5000:5400])
        path.write_bytes(bytes(data))
        damaged.append(path)
    self.assertNotEmpty(damaged)
    # The damaged step is refused (not silently read), and the run resumes
    # from the step before it to the same results.
    with self.assertLogs(level='WARNING') as logs:
      result = _strip(adapt.run(config, workdir))
    self.assertTrue(
      any(f'step {latest.name} ' in m and 'not used' in m for m in logs.output),
      logs.output,
    )
    self.assertEqual(result, reference)

  def test_damaged_source_model_is_refused(self):
    directory = pathlib.Path(_source())
    copy = _workdir() / 'source'
    subprocess.run(['cp', '-r', str(directory), str(copy)], check=True)
    for path in (copy / 'variables').rglob('*'):
      if path.is_file() and path.stat().st_size > 2000:
        data = bytearray(path.read_bytes())
        data[1000:1100] = bytes(b ^ 0xFF for b in data[1000:1100])
        path.write_bytes(bytes(data))
    config = _config(source_ckpt=str(copy))
    with self.assertRaisesRegex(ValueError, 'damaged'):
      adapt.run(config, _workdir())

  def test_interrupt_during_a_save_stops_after_it_and_resumes(self):
    config = _config()
    reference = _strip(adapt.run(config, _workdir()))
    workdir = _workdir()
    real_save = checkpoint.StateCheckpointer.save
    calls = {'n': 0}

    def save(self, step, tree):
      calls['n'] += 1
      if calls['n'] == 2:  # Ctrl-C arrives in the middle of a save
        os.kill(os.getpid(), signal.SIGINT)
      return real_save(self, step, tree)

    checkpoint.StateCheckpointer.save = save
    try:
      with self.assertRaises(KeyboardInterrupt):
        adapt.run(config, workdir)
    finally:
      checkpoint.StateCheckpointer.save = real_save
    # The save completed (no temporary directory left), then the run
    # stopped; a leftover from a killed save would be cleaned up too.
    (folder,) = workdir.glob('adapt_ckpt/*/seed0')
    self.assertEmpty(list(folder.glob('*.orbax-checkpoint-tmp*')))
    (folder / '99.orbax-checkpoint-tmp-1').mkdir()
    self.assertEqual(_strip(adapt.run(config, workdir)), reference)


class ResultsTest(absltest.TestCase):
  def test_rerun_with_fewer_methods_keeps_the_others(self):
    workdir = _workdir()
    both = adapt.run(_config(methods='source,tent'), workdir)
    only = adapt.run(_config(methods='tent'), workdir)
    self.assertEqual(list(only['methods']), ['tent', 'source'])
    saved = json.loads((workdir / 'results.json').read_text())
    self.assertEqual(set(saved['methods']), {'source', 'tent'})
    self.assertEqual(
      _strip(saved['methods']['source']), _strip(both['methods']['source'])
    )
    self.assertIn('| source |', (workdir / 'results.md').read_text())

  def test_damaged_record_is_rebuilt(self):
    workdir = _workdir()
    first = adapt.run(_config(), workdir)
    (workdir / 'methods' / 'tent.json').write_text('{"trunc')
    with self.assertLogs(level='WARNING') as logs:
      again = adapt.run(_config(), workdir)
    self.assertIn('damaged', '\n'.join(logs.output))
    self.assertEqual(_strip(again), _strip(first))
    json.loads((workdir / 'methods' / 'tent.json').read_text())


class NonFiniteStreamTest(absltest.TestCase):
  def _poisoned(self, config, *, rows):
    real_read = streams.read_batch
    first = []

    def read(domains, dom, idx, batch_size):
      batch = real_read(domains, dom, idx, batch_size)
      if not first:
        first.append((np.array(dom), np.array(idx)))
      if np.array_equal(dom, first[0][0]) and np.array_equal(idx, first[0][1]):
        # The stream's first batch, poisoned for every method.
        batch = dict(batch, image=np.array(batch['image']))
        for r in rows:
          batch['image'][r, 3, 3, 0] = np.nan
      return batch

    streams.read_batch = read
    try:
      return adapt.run(config, _workdir())
    finally:
      streams.read_batch = real_read

  def test_nonfinite_logits_are_errors_and_counted(self):
    # A step that diverges on finite inputs: its NaN logits would argmax to
    # class 0, the label here; they are scored wrong and counted instead.
    logits = jnp.asarray(
      [[5.0, 0.0, 0.0], [np.nan, 0.0, 0.0], [np.inf, 0.0, 0.0], [5, 0, 0]]
    )
    adapter = types.SimpleNamespace(
      step=lambda state, inputs, meta=None: (
        state,
        base.StepOutput(logits, {}),
      )
    )
    step = stream_lib.make_step(adapter, None, meta=None, shardings=None)
    batch = {
      'image': jnp.zeros((4, 2, 2, 1)),
      'mask': jnp.ones(4, bool),
      'label': jnp.zeros(4, jnp.int32),
    }
    _, scores = step(jnp.zeros(()), batch)
    np.testing.assert_array_equal(scores['correct'], [1, 0, 0, 1])
    np.testing.assert_array_equal(scores['nonfinite'], [0, 1, 1, 0])
    np.testing.assert_array_equal(scores['invalid'], [0, 0, 0, 0])

  def test_nan_rows_are_masked_scored_and_counted(self):
    # Through the runner, for a method that adapts and one that does not;
    # every method's own handling of such rows is in the contract test.
    config = _config(methods='source,tent')
    clean = adapt.run(config, _workdir())
    poisoned = self._poisoned(config, rows=[2, 5])
    for name in ('source', 'tent'):
      m = poisoned['methods'][name]
      self.assertEqual(m['invalid_inputs'], 2.0)
      self.assertEqual(m['nonfinite_outputs'], 0.0)  # not counted twice
      self.assertEqual(m['skipped_updates'], 0.0)
      self.assertTrue(np.isfinite(m['mean_nll']))
      # Two wrong rows at most change the first domain's error by 2 %;
      # the other domains score exactly as without them.
      first, *rest = m['domains']
      self.assertLessEqual(
        abs(
          m['domains'][first]['error']
          - clean['methods'][name]['domains'][first]['error']
        ),
        0.02 + 1e-9,
      )
      for d in rest:
        np.testing.assert_allclose(
          m['domains'][d]['error'],
          clean['methods'][name]['domains'][d]['error'],
          atol=0.011,  # at most one flipped prediction per domain
        )

  def test_raise_policy(self):
    config = _config(nonfinite='raise')
    with self.assertRaisesRegex(ValueError, 'NaN or Inf'):
      self._poisoned(config, rows=[0])

  def test_an_update_that_would_be_non_finite_is_skipped(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    adapter = tent.tent(apply_fn, optax.sgd(float('inf')))
    state0 = adapter.init(variables, jax.random.key(0))
    batch = test_utils.fake_batch(0, 8, labels=False)
    state, out = jax.jit(adapter.step)(state0, batch)
    self.assertEqual(float(out.metrics['skipped_update']), 1.0)
    self.assertTrue(test_utils.trees_equal(state.params, state0.params))
    self.assertEqual(int(state.step), 1)


class DonationTest(absltest.TestCase):
  def test_init_owns_its_buffers(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    for name, config in [
      ('tent', {'optimizer': {'name': 'adam', 'learning_rate': 1e-3}}),
      ('cotta', {'optimizer': {'name': 'adam', 'learning_rate': 1e-3}}),
      ('sar', {'optimizer': {'name': 'sgd', 'learning_rate': 1e-3}}),
    ]:
      adapter = methods.from_config(name, config, apply_fn)
      step = jax.jit(adapter.step, donate_argnums=0)
      batch = test_utils.fake_batch(0, 8, labels=False)
      for _ in range(2):  # the second init still finds the caller's arrays
        state = adapter.init(variables, jax.random.key(0))
        state, _ = step(state, batch)
        state, _ = step(state, batch)
      for leaf in jax.tree.leaves(variables):
        self.assertFalse(leaf.is_deleted())


class ParallelTest(absltest.TestCase):
  def test_parallel_domains_on_uneven_domains_equals_sequential(self):
    # Like the main benchmark: domains of different sizes (the UCI digits
    # are larger: 100 here, the corruptions 70), so a group of one stream
    # (the last, whose state the clean check adapts from) follows a
    # vmapped group.
    config = _config(
      methods='tent', setting='reset_each_shift', **{'data.test_size': 70}
    )
    config.data.corruptions = ('gaussian_noise', 'contrast', 'fog')
    sequential = adapt.run(config, _workdir())
    config.parallel = 'domains'
    parallel = adapt.run(config, _workdir())
    seq, par = sequential['methods']['tent'], parallel['methods']['tent']
    for d in seq['domains']:
      np.testing.assert_allclose(
        par['domains'][d]['error'], seq['domains'][d]['error'], atol=1e-9
      )
    self.assertIn('clean_error_after', par)


class SmallConfigTest(absltest.TestCase):
  def test_small_config_is_meaningful(self):
    # The small source model works, and adaptation measurably helps on the
    # small corruption stream (so end-to-end tests can tell broken methods).
    results = adapt.run(_config(methods='source,norm,tent'), _workdir())
    self.assertLess(results['source']['clean_test_error'], 0.10)
    source = results['methods']['source']['mean_error']
    for name in ('norm', 'tent'):
      self.assertLess(results['methods'][name]['mean_error'], source - 0.05)


def _cli(*args):
  return subprocess.run(
    [sys.executable, '-m', 'experiments.adapt_main', *args],
    check=False,
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'PYTHONPATH': str(ROOT)},
  )


@pytest.mark.parametrize(
  'args, message',
  [
    (['--config.methdos=tent'], "unknown config key 'methdos'.*'methods'"),
    (
      ['--config.data.nokey=1'],
      "unknown config key 'nokey'.*train_size",
    ),
    (['--config.methods=tentt'], r"unknown methods \['tentt'\]"),
    (['--config.batch_size=-3'], 'batch_size must be > 0'),
    (['--config.data.severity=7'], 'severity must be one of'),
    (['--config.method_configs.tent.optimizer.learning_rate=-1'], '>= 0'),
    (['--config.method_configs.tent.steps=0'], 'steps must be >= 1'),
  ],
)
def test_bad_configs_fail_in_one_line_before_any_work(tmp_path, args, message):
  workdir = tmp_path / 'run'
  out = _cli('--config=configs/default.py:small', f'--workdir={workdir}', *args)
  assert out.returncode == 2, out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr
  assert __import__('re').search(message, lines[0]), lines[0]
  assert not workdir.exists()


def test_missing_config_file_and_workdir_file(tmp_path):
  out = _cli('--config=configs/nonexist.py', f'--workdir={tmp_path / "w"}')
  assert out.returncode == 2 and "no config file 'configs/nonexist.py'" in (
    out.stderr
  )
  afile = tmp_path / 'afile'
  afile.write_text('x')
  out = _cli('--config=configs/default.py:small', f'--workdir={afile}')
  assert out.returncode == 2 and 'is a file' in out.stderr


if __name__ == '__main__':
  absltest.main()


def test_source_settings_check_compares_what_the_source_learns(tmp_path):
  from tta_jax.runners import artifacts

  corrupted = default.get_config('small')
  metadata = {'training': artifacts.source_training(corrupted)}
  # The rotated stream's source is the same clean split: reused.
  rotated = default.get_config('small')
  rotated.data.name = 'digits_rotated'
  rotated.data.rotations = (15, 30)
  artifacts.check_source_training(rotated, tmp_path, metadata)
  # Another source split is refused, naming the difference.
  other = default.get_config('small')
  other.data.train_size += 1
  with pytest.raises(ValueError, match=r'other settings.*data\.train_size'):
    artifacts.check_source_training(other, tmp_path, metadata)
  # Where rotations make the source domains, they count.
  dg = default.get_config('small')
  dg.data.name = 'digits_rotated_dg'
  dg.data.rotations = (0, 15)
  dg_metadata = {'training': artifacts.source_training(dg)}
  dg.data.rotations = (0, 30)
  with pytest.raises(ValueError, match=r'data\.rotations'):
    artifacts.check_source_training(dg, tmp_path, dg_metadata)
