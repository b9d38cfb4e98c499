"""Progress a newcomer can trust: lines by time with ETAs, a fast rerun of
a finished workdir, the config listed without running, quiet libraries."""

import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest

from configs import default
from tta_jax.data import benchmarks
from tta_jax.runners import adapt, pretrain, progress

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SOURCE: dict[str, str] = {}


def _config(**overrides):
  if 'dir' not in _SOURCE:
    root = pathlib.Path(tempfile.mkdtemp())
    pretrain.run(default.get_config('small'), root)
    _SOURCE['dir'] = str(root / 'source')
  config = default.get_config('small')
  config.source_ckpt = _SOURCE['dir']
  config.methods = 'source,norm'
  config.clean_eval_examples = 0
  config.update(overrides)
  return config


class ProgressTest(absltest.TestCase):
  def test_lines_name_the_method_position_and_the_etas(self):
    job = progress.Job(['source', 'tent'], seconds=0.0, bar=False)
    job.finished(10.0)
    stream = job.stream('tent', num_batches=4)
    with self.assertLogs(level='INFO') as logs:
      stream.update(1, examples=32, running_error=0.25)
      stream.update(4, examples=128, running_error=0.5)
    stream.close()
    text = '\n'.join(logs.output)
    self.assertIn('tent (2/2): batch 1/4', text)
    self.assertIn('running error 25.00%', text)
    self.assertRegex(
      text, r'ETA \d+:\d\d:\d\d \(method\), \d+:\d\d:\d\d \(job\)'
    )
    self.assertIn('batch 4/4', text)

  def test_job_eta_counts_the_methods_to_come(self):
    job = progress.Job(['a', 'b', 'c'])
    job.finished(30.0)  # method a took 30 s
    # b has 5 s left; c is expected to take as long as a did.
    self.assertAlmostEqual(job.eta('b', 5.0, 20.0), 35.0)

  def test_runs_report_by_time_and_write_tensorboard(self):
    workdir = pathlib.Path(tempfile.mkdtemp())
    config = _config(progress_seconds=0.0, tensorboard=True)
    with self.assertLogs(level='INFO') as logs:
      adapt.run(config, workdir)
    text = '\n'.join(logs.output)
    self.assertIn('norm (2/2): batch 16/16', text)
    self.assertIn(f'Results: {workdir}/results.{{json,md,csv,png}}', text)
    events = list((workdir / 'tensorboard' / 'norm').glob('events.*'))
    self.assertNotEmpty(events)

  def test_a_finished_workdir_is_rerun_without_building_data(self):
    workdir = pathlib.Path(tempfile.mkdtemp())
    first = adapt.run(_config(), workdir)
    real = benchmarks.build

    def refuse(*args, **kwargs):
      raise AssertionError('the benchmark data was built again')

    benchmarks.build = refuse
    try:
      again = adapt.run(_config(), workdir)
    finally:
      benchmarks.build = real
    self.assertEqual(again['methods'], first['methods'])
    self.assertEqual(again['domains'], first['domains'])


def test_dry_run_lists_the_keys_and_the_libraries_stay_quiet(tmp_path):
  workdir = tmp_path / 'run'
  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.adapt_main',
      '--config=configs/default.py:small',
      f'--workdir={workdir}',
      '--dry_run',
    ],
    check=False,
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'PYTHONPATH': str(ROOT)},
  )
  assert out.returncode == 0, out.stderr
  assert 'config.batch_size = 32    # test batch size' in out.stdout
  assert "config.methods = 'source,norm,tent'" in out.stdout
  assert 'The config is valid; methods: source, norm, tent' in out.stdout
  assert 'Unable to initialize backend' not in out.stderr
  assert not workdir.exists()


if __name__ == '__main__':
  absltest.main()
