r"""Meta-TTT's ablation table and alpha plot, from a finished digits run.

  python -m experiments.meta_train_main \
      --config=configs/meta_ttt_digits.py:alpha_sweep=true --workdir=$WORKDIR
  python -m experiments.adapt_main \
      --config=configs/meta_ttt_digits.py:alpha_sweep=true --workdir=$WORKDIR
  python -m experiments.meta_ttt_analyses --workdir=$WORKDIR

Reads WORKDIR/results.json and the meta-training metadata, prints and
writes WORKDIR/meta_ttt_ablations.md (mean error of every method, with the
learned alpha and the meta-training time of meta-trained variants) and,
when the alpha sweeps ran, WORKDIR/meta_ttt_alpha.png (mean error against
alpha: fixed alpha without meta-learning, and alpha's initial value with
meta-learning). When the shift sweep also ran on the validation stream
(`:shift_sweep` on both training commands, then the adapt command again
with `:shift_sweep,validation=true`), it writes
WORKDIR/meta_ttt_shift_selection.md: validation and test error per shift
probability, the validation pick marked. No labels are read here beyond
the stored error rates.
"""

import json
import pathlib
import re

from absl import app, flags

flags.DEFINE_string('workdir', None, 'The workdir of the digits run.')
FLAGS = flags.FLAGS

_ROWS = {
  'source': 'source model (no adaptation)',
  'norm': 'test-batch BN',
  'tent': 'Tent',
  'meta_ttt': 'Meta-TTT (full)',
  'meta_ttt_no_meta': '- meta-learning (ERM model, alpha 0.75 fixed)',
  'meta_ttt_fixed_alpha': '- learnable alpha (fixed 0.75, meta-trained)',
  'meta_ttt_no_minimax': '- minimax (entropy minimisation only)',
  'meta_ttt_no_shift': '- shift synthesis',
  'meta_ttt_no_test_steps': 'meta-trained, no test-time step (mixed BN)',
  'norm_meta_backbone': 'test-batch BN on the meta-trained backbone',
  'tent_meta_backbone': 'Tent on the meta-trained backbone',
}


def _meta(workdir: pathlib.Path, name: str) -> dict:
  path = workdir / 'meta' / name / 'metadata.json'
  return json.loads(path.read_text()) if path.exists() else {}


def ablation_table(results: dict, workdir: pathlib.Path) -> str:
  methods = results['methods']
  lines = [
    '| method | variant | mean error (%) | learned alpha (mean, min-max) '
    '| meta-training (s) |',
    '|---|---|---|---|---|',
  ]
  names = [n for n in _ROWS if n in methods]
  names += [n for n in methods if n not in _ROWS]
  for name in names:
    meta = _meta(workdir, name)
    m = meta.get('metrics', {})
    alpha = (
      f'{m["alpha_mean"]:.3f} ({m["alpha_min"]:.2f}-{m["alpha_max"]:.2f})'
      if 'alpha_mean' in m
      else ''
    )
    seconds = f'{meta["seconds"]:.0f}' if 'seconds' in meta else ''
    err = 100 * methods[name]['mean_error']
    lines.append(
      f'| {name} | {_ROWS.get(name, "")} | {err:.2f} | {alpha} | {seconds} |'
    )
  return '\n'.join(lines)


def _alpha(tag: str) -> float:
  return float(tag.replace('p', '.'))  # configs.meta_ttt_digits._tag


def alpha_curves(results: dict) -> dict[str, list[tuple[float, float]]]:
  """`{curve: [(alpha, mean error)]}` of the alpha sweeps, sorted by alpha."""
  methods, curves = results['methods'], {'fixed': [], 'init': []}
  for name, m in methods.items():
    fixed = re.fullmatch(r'meta_ttt_no_meta_alpha_([\dp]+)', name)
    init = re.fullmatch(r'meta_ttt_alpha_init_([\dp]+)', name)
    if fixed:
      curves['fixed'].append((_alpha(fixed[1]), m['mean_error']))
    elif init:
      curves['init'].append((_alpha(init[1]), m['mean_error']))
  if curves['init'] and 'meta_ttt' in methods:  # the default init, 0.75
    curves['init'].append((0.75, methods['meta_ttt']['mean_error']))
  return {k: sorted(v) for k, v in curves.items() if v}


def plot(curves, results: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  labels = {
    'fixed': 'fixed alpha, no meta-learning',
    'init': 'alpha init, meta-learned',
  }
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key, points in curves.items():
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, [100 * y for y in ys], marker='o', label=labels[key])
  if 'tent' in results['methods']:
    ax.axhline(
      100 * results['methods']['tent']['mean_error'], ls='--', c='k', lw=1
    )
    ax.text(0.01, 100 * results['methods']['tent']['mean_error'], 'Tent')
  ax.set_xlabel('alpha (weight of the source statistics)')
  ax.set_ylabel('mean error (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def shift_probability(workdir: pathlib.Path, name: str) -> float | None:
  """A meta-trained variant's shift probability: from the settings its
  meta-training recorded, else from a `meta_ttt_shift_<p>` name."""
  settings = _meta(workdir, name).get('settings', {})
  if 'shift_p' in settings.get('meta_train', {}):
    return float(settings['meta_train']['shift_p'])
  tag = re.fullmatch(r'meta_ttt_shift_([\dp]+)', name)
  return _alpha(tag[1]) if tag else None


def shift_selection(
  validation: dict, results: dict | None, workdir: pathlib.Path
) -> str | None:
  """The shift sweep as a table: the pick is the lowest validation error."""
  rows = []
  for name, m in validation['methods'].items():
    if name != 'meta_ttt' and not name.startswith('meta_ttt_shift_'):
      continue
    p = shift_probability(workdir, name)
    if p is not None:
      test = (results or {}).get('methods', {}).get(name)
      rows.append((p, name, m['mean_error'], test and test['mean_error']))
  if len(rows) < 2:
    return None
  rows.sort()
  pick = min(rows, key=lambda r: r[2])
  lines = [
    '| shift p | method | validation error (%) | test error (%) |',
    '|---|---|---|---|',
  ]
  for row in rows:
    p, name, val, test = row
    mark = ' (pick)' if row is pick else ''
    test = '' if test is None else f'{100 * test:.2f}'
    lines.append(f'| {p:g}{mark} | {name} | {100 * val:.2f} | {test} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  workdir = pathlib.Path(FLAGS.workdir)
  results = json.loads((workdir / 'results.json').read_text())
  if (workdir / 'validation.json').exists():
    validation = json.loads((workdir / 'validation.json').read_text())
    selection = shift_selection(validation, results, workdir)
    if selection:
      (workdir / 'meta_ttt_shift_selection.md').write_text(selection + '\n')
      print(selection)
  table = ablation_table(results, workdir)
  (workdir / 'meta_ttt_ablations.md').write_text(table + '\n')
  print(table)
  curves = alpha_curves(results)
  if curves:
    plot(curves, results, workdir / 'meta_ttt_alpha.png')
    print(f'alpha plot: {workdir / "meta_ttt_alpha.png"}')
    for key, points in curves.items():
      print(key, ', '.join(f'{a:g}: {100 * e:.2f}' for a, e in points))


if __name__ == '__main__':
  # Required only when run: importing the module's functions (tests,
  # notebooks) must not make other absl programs require these flags.
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
