r"""GeneralizeFormer's analyses on the offline leave-one-domain-out benchmark.

Run after the benchmark's two commands, with the same config and workdir
(add `:ablations` to all three for the ablation rows):

  python -m experiments.meta_train_main \
      --config=configs/generalizeformer_dg.py:ablations --workdir=$WORKDIR
  python -m experiments.adapt_main \
      --config=configs/generalizeformer_dg.py:ablations --workdir=$WORKDIR
  python -m experiments.generalizeformer_analyses \
      --config=configs/generalizeformer_dg.py:ablations --workdir=$WORKDIR

Prints and writes under WORKDIR/analyses/:

- `tables.md`: held-out error per method (mean over the held-out domains)
  with source accuracy before/after adaptation (forgetting), and the
  ablations (without gradients, without features, without meta-learning,
  BN only, classifier only, both) from WORKDIR/results.json;
- the hyperparameter sweep (with `:sweep`): every variant's source-domain
  validation accuracy (the meta-trainer's selection score, mean over the
  held-out runs) beside its held-out error, ranked by the former; the
  first row is the one the selection picks;
- `batch_sizes.json`: error of BN adaptation, Tent and GeneralizeFormer on
  each held-out domain at test batch sizes 1, 16, 64, 128 (the generator
  is the one meta-trained at the config's batch size, as in the paper),
  with each stream's source-domain error after adaptation (forgetting);
- `layers.json` and `layers.png`: per generated layer, the mean L2 distance
  between GeneralizeFormer's generated parameters and the source ones, on
  source-domain test batches under no shift, an input-level shift (Gaussian
  noise, severity 5), a feature-level shift (a fixed random per-channel
  affine map per example after the stem convolution) and an output-level
  shift (each batch drawn from two classes).
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util
from ml_collections import config_flags

from configs import generalizeformer_dg as gf_config
from tta_jax import methods
from tta_jax._src import params as params_lib
from tta_jax.data import benchmarks, sources
from tta_jax.data.images import corruptions
from tta_jax.methods import generalizeformer as gf
from tta_jax.runners import (
  adapt,
  artifacts,
  configs,
  report as report_lib,
  scoring,
  train,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Config file.', lock_config=True
)
flags.DEFINE_string('workdir', None, "The benchmark runs' workdir.")
flags.DEFINE_list(
  'analyses', ['tables', 'batch_sizes', 'layers'], 'Which analyses to run.'
)
flags.DEFINE_list('batch_sizes', ['1', '16', '64', '128'], 'Test batch sizes.')
flags.DEFINE_list(
  'sweep_methods', ['norm', 'tent', 'generalizeformer'], 'Methods to sweep.'
)
flags.DEFINE_integer('max_examples', 0, 'Per held-out domain; 0: all.')
flags.DEFINE_integer('layer_examples', 1024, 'Source test examples (layers).')

ABLATION_ROWS = (
  ('generalizeformer', 'GeneralizeFormer (BN + classifier)'),
  ('generalizeformer_no_grads', 'without layer-wise gradients'),
  ('generalizeformer_no_features', 'without features'),
  ('generalizeformer_no_meta', 'without meta-learning'),
  ('generalizeformer_bn', 'BN affine only'),
  ('generalizeformer_classifier', 'classifier only'),
)


def _pct(x):
  return '' if x is None else f'{100 * x:.1f}'


def tables(results) -> str:
  """Main and ablation tables from a leave-one-domain-out results.json."""
  doms = results['domains']
  ms = results['methods']

  def row(label, m):
    cells = [_pct(m['domains'][d]['error']) for d in doms]
    clean = (
      f'{_pct(m.get("clean_error_before"))} → '
      f'{_pct(m.get("clean_error_after"))}'
    )
    return f'| {label} | ' + ' | '.join(cells + [_pct(m['mean_error']), clean])

  head = (
    '| method | '
    + ' | '.join(doms)
    + ' | mean | source err before → after |\n|'
    + '---|' * (len(doms) + 3)
  )
  main = [head] + [
    row(n, m) + ' |'
    for n, m in ms.items()
    if n in ('source', 'norm', 'tent', 't3a', 'generalizeformer')
  ]
  out = '## Held-out error (%), leave-one-domain-out\n\n' + '\n'.join(main)
  ablations = [
    row(label, ms[n]) + ' |' for n, label in ABLATION_ROWS if n in ms
  ]
  if len(ablations) > 1:
    out += '\n\n## Ablations\n\n' + head.replace('method', 'variant')
    out += '\n' + '\n'.join(ablations)
  else:
    out += '\n\n(no ablation rows: run the three commands with `:ablations`)'
  return out


def _benchmarks(config, workdir):
  for tag, bench in benchmarks.targets(config.data, config.setting):
    yield tag, bench, (workdir if tag is None else workdir / 'dg' / tag)


def _method(config, name, bench, wd, *, apply_fn=None, **overrides):
  """(adapter, variables, meta) of a configured method, as adapt.run has."""
  module, base_apply = artifacts.build_model(config.model, bench)
  variables, _ = artifacts.load_source(config, wd, bench, module)
  fn, variables, meta = artifacts.load_trained(
    wd, name, base_apply, variables, bench
  )
  context = adapt.source_context(config, bench)
  context.update(
    input_shape=tuple(bench.input_shape), num_classes=bench.num_classes
  )
  kwargs = {**configs.method_kwargs(config, name), **overrides}
  adapter = methods.from_config(
    configs.resolve(config, name, methods.METHODS),
    kwargs,
    apply_fn or fn,
    **context,
  )
  return adapter, variables, meta


def _stream(adapter, variables, meta, data, batch_size, seed=0):
  """Error over one shuffled stream (padded last batch); the final state."""
  n = len(data['label'])
  order = np.random.default_rng(seed).permutation(n)
  step = jax.jit(adapter.step)
  state = adapter.init(variables, jax.random.key(seed))
  wrong = 0
  for start in range(0, n, batch_size):
    idx = order[start : start + batch_size]
    valid = np.arange(batch_size) < len(idx)
    idx = np.concatenate([idx, np.repeat(idx[:1], batch_size - len(idx))])
    state, out = step(
      state, {'image': data['image'][idx], 'mask': valid}, meta=meta
    )
    pred = np.asarray(jnp.argmax(out.logits, -1))
    wrong += int((pred != data['label'][idx])[valid].sum())
  return wrong / n, state


def batch_sizes(config, workdir) -> dict:
  """Held-out error and source error after the stream, per batch size."""
  out = {}
  for tag, bench, wd in _benchmarks(config, workdir):
    data = sources.materialize(bench.domains[0].source)
    if FLAGS.max_examples:
      data = {k: v[: FLAGS.max_examples] for k, v in data.items()}
    for name in FLAGS.sweep_methods:
      adapter, variables, meta = _method(config, name, bench, wd)
      for b in map(int, FLAGS.batch_sizes):
        err, state = _stream(adapter, variables, meta, data, b)
        clean = scoring.clean_error(
          adapter,
          state,
          bench.clean_test,
          64,
          meta=meta,
          max_examples=config.clean_eval_examples,
        )
        out.setdefault(name, {}).setdefault(str(b), {})[tag] = {
          'error': err,
          'source_error_after': clean,
        }
        logging.info('%s %s bs %d: error %.4f', tag, name, b, err)
  for per_b in out.values():
    for per_tag in per_b.values():
      per_tag['mean'] = {
        k: float(np.mean([v[k] for t, v in per_tag.items() if t != 'mean']))
        for k in ('error', 'source_error_after')
      }
  return out


def batch_size_table(sweep) -> str:
  sizes = FLAGS.batch_sizes
  lines = [
    '## Mean held-out error (%) by test batch size '
    '(source error after the stream)\n',
    '| method | ' + ' | '.join(f'bs {b}' for b in sizes) + ' |',
    '|' + '---|' * (len(sizes) + 1),
  ]
  for name, per_b in sweep.items():
    cells = [
      f'{_pct(per_b[b]["mean"]["error"])} '
      f'({_pct(per_b[b]["mean"]["source_error_after"])})'
      for b in sizes
    ]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _layer_key(path, head='head'):
  return (path[0] == head, '/'.join(path[:-1]))


def layers(config, workdir, directory: pathlib.Path) -> dict:
  """Per-layer ||theta_t - theta_s|| under input/feature/output shifts."""
  tag, bench, wd = next(iter(_benchmarks(config, workdir)))
  data = sources.materialize(bench.clean_test)
  n = min(FLAGS.layer_examples, len(data['label']))
  clean = sources.ArraySource(data['image'][:n], data['label'][:n])
  noisy = sources.materialize(
    corruptions.corrupted_source(clean, 'gaussian_noise', 5, 0)
  )
  bs = config.batch_size
  _, base_apply = artifacts.build_model(config.model, bench)
  r = np.random.default_rng(0)
  width = config.model.width
  # Per example: a per-channel affine map shared by the batch would be
  # undone exactly by the stem BN's batch statistics.
  shift = (
    jnp.asarray(np.clip(1 + 0.5 * r.normal(size=(bs, width)), 0.2, 2.0)),
    jnp.asarray(0.5 * r.normal(size=(bs, width))),
  )

  def feature_shifted(*args, **kwargs):
    return base_apply(*args, feature_shift=shift, **kwargs)

  by_label = np.argsort(data['label'][:n], kind='stable')
  two_class = []  # consecutive sorted labels: batches of <= 2 classes
  for start in range(0, n - bs + 1, bs):
    two_class.append(by_label[start : start + bs])
  shifts = {
    'none': (
      None,
      data['image'][:n],
      [np.arange(s, s + bs) for s in range(0, n - bs + 1, bs)],
    ),
    'input (gaussian noise)': (None, noisy['image'], None),
    'feature (per-example stem affine)': (
      feature_shifted,
      data['image'][:n],
      None,
    ),
    'output (two classes per batch)': (None, data['image'][:n], two_class),
  }
  out = {}
  for label, (apply_fn, images, shift_batches) in shifts.items():
    # accumulate=True from a fresh state: state.params is theta_t.
    adapter, variables, meta = _method(
      config,
      'generalizeformer',
      bench,
      wd,
      apply_fn=apply_fn,
      accumulate=True,
    )
    step = jax.jit(adapter.step)
    state0 = adapter.init(variables, jax.random.key(0))
    mask = gf.generation_mask(
      configs.method_kwargs(config, 'generalizeformer').get('generate', 'both')
    )(variables['params'], variables['batch_stats'])
    theta_s = params_lib.split(variables['params'], mask)[0]
    batches = shift_batches or shifts['none'][2]
    sums = {}
    for idx in batches:
      state, _ = step(state0, {'image': images[idx]}, meta=meta)
      theta_t = params_lib.split(state.params, mask)[0]
      flat_t = traverse_util.flatten_dict(theta_t)
      flat_s = traverse_util.flatten_dict(theta_s)
      per_layer = {}
      for path in flat_t:
        d = np.sum(np.square(np.asarray(flat_t[path] - flat_s[path])))
        key = _layer_key(path)
        per_layer[key] = per_layer.get(key, 0.0) + d
      for key, sq in per_layer.items():
        sums[key] = sums.get(key, 0.0) + np.sqrt(sq) / len(batches)
    out[label] = {k[1]: float(v) for k, v in sorted(sums.items())}
  _plot_layers(out, directory / 'layers.png', tag)
  return out


def _plot_layers(dist, path, tag):
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  names = list(next(iter(dist.values())))
  fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) + 2), 3.5))
  for label, per_layer in dist.items():
    ax.plot(
      range(len(names)), [per_layer[k] for k in names], marker='o', label=label
    )
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=45, ha='right')
  ax.set_ylabel('||theta_t - theta_s||_2')
  ax.set_title(f'generated vs source parameters ({tag})', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = FLAGS.config, pathlib.Path(FLAGS.workdir)
  directory = workdir / 'analyses'
  directory.mkdir(parents=True, exist_ok=True)
  report = []
  if 'tables' in FLAGS.analyses:
    results = json.loads((workdir / 'results.json').read_text())
    report.append(tables(results))
    names = ['generalizeformer', *gf_config.SWEEP]
    if any(n in results['methods'] for n in names[1:]):
      report.append(
        report_lib.validation_ranking(
          results, train.validation_accuracies(config, workdir), names
        )
      )
  if 'batch_sizes' in FLAGS.analyses:
    sweep = batch_sizes(config, workdir)
    (directory / 'batch_sizes.json').write_text(json.dumps(sweep, indent=2))
    report.append(batch_size_table(sweep))
  if 'layers' in FLAGS.analyses:
    dist = layers(config, workdir, directory)
    (directory / 'layers.json').write_text(json.dumps(dist, indent=2))
    names = list(next(iter(dist.values())))
    lines = [
      '## Mean per-layer L2 distance, generated vs source parameters\n',
      '| shift | ' + ' | '.join(names) + ' |',
      '|' + '---|' * (len(names) + 1),
    ]
    for label, per_layer in dist.items():
      lines.append(
        f'| {label} | '
        + ' | '.join(f'{per_layer[k]:.3f}' for k in names)
        + ' |'
      )
    report.append('\n'.join(lines) + f'\n\n(plot: {directory}/layers.png)')
  text = '\n\n'.join(report)
  (directory / 'tables.md').write_text(text + '\n')
  print(text, flush=True)


if __name__ == '__main__':
  # Required only when run: importing the module's functions (tests,
  # notebooks) must not make other absl programs require these flags.
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
