r"""MGG on the digits benchmark: pre-training, evaluation and the analyses.

  python -m experiments.mgg_analyses --config=configs/mgg_digits.py:analyses \
      --workdir=$WORKDIR --steps=train,adapt,curves,report

Steps:
  train   `experiments.meta_train_main`: pre-trains every
          `config.meta_methods` entry (`tta_jax.trainers.mgg`, on the
          validation stream's shifts) into WORKDIR/meta/<name>/, after the
          source model if WORKDIR has none.
  adapt   `experiments.adapt_main`: `config.methods` over the test stream
          (WORKDIR/results.*).
  curves  error of the k-th batch of every domain vs k (the number of
          updates taken), MGG vs SAR vs Tent, reset per domain, every seed,
          up to the shortest domain's number of batches
          (`tta_jax.runners.curves`): WORKDIR/mgg_curves.{json,png}, and
          the updates each method needs to reach SAR's final error.
  report  markdown tables of WORKDIR/results.json and, if present,
          WORKDIR/ablations.json (the variants run with
          `--config.results_name=ablations`), with each MGG's pre-training
          validation accuracy: WORKDIR/mgg_analyses.md.
"""

import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

from tta_jax.runners import adapt, artifacts, configs, curves, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.DEFINE_list('steps', ['train', 'adapt', 'curves', 'report'], 'Steps.')
flags.DEFINE_list('curve_methods', ['tent', 'sar', 'mgg'], 'Curve methods.')
flags.mark_flags_as_required(['config', 'workdir'])


def _table(config, workdir: pathlib.Path, results_name: str) -> list[str]:
  path = workdir / f'{results_name}.json'
  if not path.exists():
    return []
  results = json.loads(path.read_text())['methods']
  lines = [
    f'{results_name}.json:',
    '',
    '| method | mean error (%) | std over seeds | seeds | pre-training '
    'val acc (%) |',
    '|---|---:|---:|---:|---:|',
  ]
  for name, r in results.items():
    owner = configs.artifacts_owner(config, name)
    meta = artifacts.trained_dir(workdir, owner or name) / 'metadata.json'
    acc = (
      json.loads(meta.read_text())['metrics'].get('val_accuracy')
      if owner and meta.exists()
      else None
    )
    lines.append(
      f'| {name} | {100 * r["mean_error"]:.2f} | '
      f'{100 * r.get("mean_error_std", float("nan")):.2f} | '
      f'{r.get("num_seeds", 1)} | '
      f'{"" if acc is None else f"{100 * acc:.2f}"} |'
    )
  return [*lines, '']


def report(config, workdir: pathlib.Path) -> str:
  """Markdown tables of results.json and ablations.json, and the updates."""
  lines = _table(config, workdir, 'results') + _table(
    config, workdir, 'ablations'
  )
  curves_path = workdir / 'mgg_curves.json'
  if curves_path.exists():
    c = json.loads(curves_path.read_text())
    lines.append(
      f"Updates to reach SAR's final error ({100 * c['sar_final_error']:.2f}"
      f' %, {curves.SMOOTH}-batch mean): '
      + ', '.join(f'{n}: {k}' for n, k in c['updates'].items())
    )
  text = '\n'.join(lines)
  (workdir / 'mgg_analyses.md').write_text(text + '\n')
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = FLAGS.config, pathlib.Path(FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if 'train' in FLAGS.steps:
    train.run(config, workdir)
  if 'adapt' in FLAGS.steps:
    adapt.run(config, workdir)
  if 'curves' in FLAGS.steps:
    data = curves.curves(config, workdir, FLAGS.curve_methods)
    curves.write_curves(workdir, data, stem='mgg_curves')
  if 'report' in FLAGS.steps:
    print(report(config, workdir))


if __name__ == '__main__':
  app.run(main)
