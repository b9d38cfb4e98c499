"""Streams sharded over devices and processes (`jax.distributed`).

The fast tests run the stream-sharded path in this process, on the eight
CPU devices of tests/conftest.py: it must give the scores and final states
of the unsharded vmapped run. The slow test starts the adaptation binary
as two CPU processes joined by `jax.distributed` (JAX's gloo collectives)
and compares its results.json with a one-process run of the same config.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import pytest
from absl.testing import absltest

from configs import default
from tta_jax import methods, testing
from tta_jax.data import sources, streams
from tta_jax.runners import configs, distributed, streams as stream_lib

ROOT = pathlib.Path(__file__).parents[1]


def _domains(sizes=(40, 24), seed=0):
  r = np.random.default_rng(seed)
  out = []
  for d, n in enumerate(sizes):
    images = r.uniform(size=(n, *testing.TINY_SHAPE)).astype(np.float32)
    images += 0.3 * d
    labels = r.integers(0, testing.TINY_CLASSES, n).astype(np.int32)
    out.append(sources.Domain(f'd{d}', sources.ArraySource(images, labels)))
  return out


def _run(k, **kwargs):
  _, apply_fn, variables = testing.tiny_bn_net()
  adapter = methods.METHODS['tent'](apply_fn, optax.adam(1e-2))
  domains = _domains()
  plans = [
    streams.plan('continual', domains, batch_size=8, seed=s) for s in range(k)
  ]
  rngs = [jax.random.key(s) for s in range(k)]
  res = stream_lib.run_streams(
    adapter, variables, plans, domains, rngs=rngs, **kwargs
  )
  return adapter, res


class StreamShardingTest(absltest.TestCase):
  def test_sharded_streams_equal_the_unsharded_run(self):
    # Each device runs its own stream (K = 8 over 8 devices) where the
    # unsharded run vmaps all 8 on one device. XLA compiles each for its
    # shapes, and the CPU convolution and matmul kernels block their loops
    # by batch size, so float32 sums run in another order: the logits of
    # the first batch already differ in the last bits (about 1e-7), and
    # 10 Tent steps later the NLLs by up to about 1e-4. Hence a tolerance;
    # the predictions must agree exactly.
    self.assertEqual(jax.device_count(), 8)
    adapter, plain = _run(8)
    _, sharded = _run(8, shard_streams=True)
    for key in ('correct', 'invalid', 'skipped', 'domain', 'valid'):
      np.testing.assert_array_equal(
        getattr(sharded, key), getattr(plain, key), err_msg=key
      )
    for key in ('nll', 'confidence'):
      np.testing.assert_allclose(
        getattr(sharded, key), getattr(plain, key), rtol=0, atol=1e-3
      )
    # The final state comes back whole on one device (frozen leaves were
    # replicated, adapted ones sharded by stream), close to the plain run's.
    leaves = jax.tree.leaves(sharded.final_state)
    self.assertTrue(all(len(x.devices()) == 1 for x in leaves))
    for s in (0, 7):
      testing.assert_trees_close(
        stream_lib.take_stream(adapter, sharded.final_state, s),
        stream_lib.take_stream(adapter, plain.final_state, s),
        rtol=1e-3,
        atol=1e-4,
      )

  def test_state_layout_and_the_streams_each_process_reads(self):
    _, apply_fn, variables = testing.tiny_bn_net()
    adapter = methods.METHODS['tent'](apply_fn, optax.adam(1e-2))
    state0, axes = stream_lib.initial_state(
      adapter, variables, [jax.random.key(0)] * 8
    )
    sh = stream_lib.StreamShardings(8, axes, state0)
    # One process holds all eight devices, so it feeds all eight streams.
    self.assertEqual(sh.local_streams, list(range(8)))
    placed = sh.place_state(state0)
    kernel = placed.params['conv1']['kernel']  # frozen: shared
    self.assertTrue(kernel.sharding.is_fully_replicated)
    scale = placed.params['bn1']['scale']  # adapted: one per stream
    self.assertEqual(scale.shape[0], 8)
    self.assertEqual(scale.addressable_shards[3].data.shape[0], 1)
    self.assertEqual(placed.rng.addressable_shards[5].index[0], slice(5, 6))
    back = sh.gather_state(placed)
    self.assertTrue(testing.trees_equal(back, state0))

  def test_streams_not_divisible_by_the_devices(self):
    with self.assertRaisesRegex(ValueError, '6 parallel streams .* 8 devices'):
      _run(6, shard_streams=True)
    with self.assertRaisesRegex(ValueError, 'exclude each other'):
      _run(8, shard_streams=True, shard_batch=True)


class ConfigTest(absltest.TestCase):
  def test_sharded_streams_need_a_multiple_of_the_devices(self):
    config = default.get_config('small')
    config.shard_streams = True
    with self.assertRaisesRegex(ValueError, "set config.parallel='seeds'"):
      configs.check(config)
    config.parallel, config.seeds = 'seeds', '0,1,2'
    with self.assertRaisesRegex(ValueError, '3 seeds, not a multiple of 8'):
      configs.check(config)
    config.seeds = ','.join(map(str, range(8)))
    self.assertEqual(configs.check(config), ['source', 'norm', 'tent'])
    config.shard_batch = True
    with self.assertRaisesRegex(ValueError, 'shard_batch must be False'):
      configs.check(config)


class SettingsTest(absltest.TestCase):
  def test_flags_and_environment(self):
    env = {
      distributed.COORDINATOR_ENV: 'localhost:1234',
      distributed.NUM_PROCESSES_ENV: '2',
      distributed.PROCESS_ID_ENV: '1',
    }
    with absltest.mock.patch.dict(os.environ, env):
      self.assertEqual(distributed.settings(), ('localhost:1234', 2, 1))
      self.assertEqual(  # a flag wins over the environment
        distributed.settings(process_id=0), ('localhost:1234', 2, 0)
      )
    clear = {k: '' for k in env}
    with absltest.mock.patch.dict(os.environ, clear):
      self.assertIsNone(distributed.settings())
      with self.assertRaisesRegex(ValueError, 'needs --num_processes'):
        distributed.settings('localhost:1234')
      with self.assertRaisesRegex(ValueError, 'needs --coordinator_address'):
        distributed.settings(num_processes=2, process_id=0)
      with self.assertRaisesRegex(ValueError, r'in \[0, --num_processes\)'):
        distributed.settings('localhost:1234', 2, 2)
      with self.assertRaisesRegex(ValueError, 'host:port'):
        distributed.settings('localhost', 2, 0)


# ----------------------------------------------------------------------------
# Two processes.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  # One CPU device per process, and none of the test session's settings.
  env.pop('XLA_FLAGS', None)
  for key in (
    distributed.COORDINATOR_ENV,
    distributed.NUM_PROCESSES_ENV,
    distributed.PROCESS_ID_ENV,
  ):
    env.pop(key, None)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]
  )
  return env


def _start(binary, args, log: pathlib.Path):
  command = [sys.executable, '-m', binary, *args]
  with log.open('w') as f:
    return subprocess.Popen(
      command, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT
    )


def _wait(procs, logs, timeout: float):
  """Waits for every process to succeed; on a timeout, or as soon as one
  fails (its peers would wait for it), kills the others and fails."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      for p, log in zip(procs, logs, strict=True):
        if p.poll() not in (None, 0):
          pytest.fail(f'exit code {p.returncode}:\n{_tail(log)}')
      if time.monotonic() > deadline:
        pytest.fail(f'timed out after {timeout:.0f}s:\n{_tail(logs[0])}')
      time.sleep(0.5)
    for p, log in zip(procs, logs, strict=True):
      if p.returncode != 0:
        pytest.fail(f'exit code {p.returncode}:\n{_tail(log)}')
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _tail(log: pathlib.Path, n: int = 40) -> str:
  return '\n'.join(log.read_text(errors='replace').splitlines()[-n:])


INEXACT = ('nll', 'ece')  # float sums whose order XLA picks per shape
TIMINGS = ('seconds', 'per_second')


def _scores(results, exact=False):
  """Every method's numbers, flattened (`a.b.c` keys), timings aside:
  the exact ones (errors, counts) or the inexact ones (NLL, ECE)."""
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      path = f'{prefix}.{key}'
      if isinstance(value, dict):
        walk(path, value)
      elif not any(t in key for t in TIMINGS) and key != 'config_hash':
        if any(key.endswith(i) for i in INEXACT) != exact:
          out[path] = value

  walk('', results['methods'])
  return out


def _adapt(args, workdir: pathlib.Path, log: pathlib.Path, process=None):
  """Starts experiments.adapt_main; `process`: (address, id) of 2."""
  args = [*args, f'--workdir={workdir}']
  if process is not None:
    address, i = process
    args += [
      f'--coordinator_address={address}',
      '--num_processes=2',
      f'--process_id={i}',
    ]
  return _start('experiments.adapt_main', args, log)


@pytest.mark.slow
class TwoProcessTest(absltest.TestCase):
  """Two CPU processes, one device each, against one process."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp())
    log = cls.root / 'pretrain.log'
    args = ['--config=configs/default.py:small', f'--workdir={cls.root}']
    _wait([_start('experiments.pretrain_main', args, log)], [log], 300)

  def compare(self, tag: str, overrides: list[str], num_streams: int):
    root = self.root / tag
    root.mkdir()
    config = [
      '--config=configs/default.py:small',
      '--config.clean_eval_examples=32',
      f'--config.source_ckpt={self.root / "source"}',
      *overrides,
    ]
    log = root / 'single.log'
    _wait([_adapt(config, root / 'single', log)], [log], 300)
    address = f'localhost:{_free_port()}'
    logs = [root / f'process{i}.log' for i in range(2)]
    procs = [
      _adapt(config, root / 'multi', logs[i], (address, i)) for i in range(2)
    ]
    _wait(procs, logs, 300)
    one = json.loads((root / 'single' / 'results.json').read_text())
    two = json.loads((root / 'multi' / 'results.json').read_text())
    self.assertEqual(two['domains'], one['domains'])
    # Errors (and every count) are equal; NLL and ECE to float32 rounding:
    # each device runs K/2 streams where the single process vmaps K, and
    # XLA's CPU kernels sum in another order for the other shapes.
    self.assertEqual(_scores(two, exact=True), _scores(one, exact=True))
    inexact_one, inexact_two = _scores(one), _scores(two)
    self.assertEqual(inexact_two.keys(), inexact_one.keys())
    for key, value in inexact_one.items():
      self.assertAlmostEqual(inexact_two[key], value, delta=1e-5 * abs(value))
    sharded = f'{num_streams} streams are sharded over 2 devices of 2 processes'
    for log in logs:
      text = log.read_text()
      self.assertIn(sharded, text)
      self.assertIn('Stream checkpoints are off in a multi-process run', text)
    # Only the first process writes (and prints) the tables.
    self.assertIn('| mean err |', logs[0].read_text())
    self.assertNotIn('| mean err |', logs[1].read_text())
    self.assertEqual(
      sorted(p.name for p in (root / 'multi').iterdir()),
      ['methods', 'results.csv', 'results.json', 'results.md', 'results.png'],
    )

  def test_seeds(self):
    overrides = ['--config.parallel=seeds', '--config.seeds=0,1']
    self.compare('seeds', ['--config.methods=norm,eata', *overrides], 2)

  def test_domains(self):
    overrides = [
      '--config.methods=tent',
      '--config.setting=reset_each_shift',
      '--config.parallel=domains',
    ]
    self.compare('domains', overrides, 4)


if __name__ == '__main__':
  absltest.main()
