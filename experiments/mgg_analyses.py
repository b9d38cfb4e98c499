r"""MGG on the digits benchmark: pre-training, evaluation and the analyses.

  python -m experiments.mgg_analyses --config=configs/mgg_digits.py:analyses \
      --workdir=$WORKDIR --steps=train,adapt,curves,report

Steps:
  train   pre-trains every `config.meta_methods` entry with
          `tta_jax.trainers.mgg` on the validation stream's shifts (the four
          held-out corruptions of the source-val digits) and saves it to
          WORKDIR/meta/<name>/, where `experiments.adapt_main` reads it;
          the source model is trained first if WORKDIR has none.
  adapt   runs `config.methods` over the test stream (WORKDIR/results.*).
  curves  error of the k-th batch of every domain vs k (the number of
          updates taken), MGG vs SAR vs Tent, reset per domain, every seed:
          WORKDIR/mgg_curves.{json,png}, and the updates each method needs
          to reach SAR's final error.
  report  the ablation table (data size, memory layer, alpha, pre-training
          mode) from results.json and the pre-training metadata, as
          markdown: WORKDIR/mgg_analyses.md.
"""

import json
import pathlib

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from configs import common as configs_common
from tta_jax import methods
from tta_jax._src import checkpoint
from tta_jax.data import benchmarks
from tta_jax.runners import adapt, common, meta_train
from tta_jax.trainers import base as trainers_base, mgg as mgg_trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file.')
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.DEFINE_list('steps', ['train', 'adapt', 'curves', 'report'], 'Steps.')
flags.DEFINE_list('curve_methods', ['tent', 'sar', 'mgg'], 'Curve methods.')
flags.mark_flags_as_required(['config', 'workdir'])

SMOOTH = 3  # batches averaged when reading "reached the target"


def _mgg_family(config):
  return [
    n
    for n in config.methods.split(',')
    if n and adapt.factory_name(config, n) == 'mgg'
  ]


def shifted_domains(config):
  """The validation stream's domains (shifts disjoint from the test's)."""
  val = config.copy_and_resolve_references()
  configs_common.validation_stream(val)
  return benchmarks.build(val.data, 'reset_each_shift').domains


def train(config, workdir: pathlib.Path) -> None:
  benchmark = benchmarks.build(config.data, config.setting)
  module, apply_fn = common.build_model(config.model, benchmark)
  variables, _ = common.load_source(
    config, workdir, benchmark, module, pretrain_if_missing=True
  )
  train_domains, val_domains = benchmark.meta_source_domains()
  shifted = shifted_domains(config)
  for name in [n for n in config.meta_methods.split(',') if n]:
    directory = workdir / 'meta' / name
    if meta_train.done(directory):
      logging.info('%s: pre-training already done', name)
      continue
    kwargs = adapt.method_kwargs(config, name)
    ctx = trainers_base.TrainContext(
      model_config=config.model.to_dict(),
      module=module,
      apply_fn=apply_fn,
      variables=variables,
      input_shape=tuple(benchmark.input_shape),
      num_classes=benchmark.num_classes,
      source_domains=train_domains,
      val_domains=val_domains,
      shifted_domains=shifted,
      hparams=config.meta_train[name],
      method_kwargs=kwargs,
      source_recipe=config.pretrain.to_dict(),
      seed=config.seed,
      rng=jax.random.fold_in(jax.random.key(config.seed), 1),
      checkpointer=checkpoint.StateCheckpointer(workdir / 'meta_ckpt' / name),
      cache_dir=None,
      log_every=config.log_every,
    )
    result = mgg_trainer.train(ctx)
    ctx.checkpointer.close()
    metadata = {
      **common.model_metadata(config.model, benchmark),
      'method': name,
      'settings': meta_train.settings(config, name, kwargs),
    }
    meta_train.save(directory, result, metadata)
    logging.info('%s: pre-trained: %s', name, result.metrics)


def evaluation_config(config):
  """The config with every MGG variant reading its own pre-training."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    for name in _mgg_family(cfg):
      if not cfg.method_configs[name].get('meta_from'):
        cfg.method_configs[name].meta_from = name
    cfg.meta_methods = ''
  return cfg


def curves(config, workdir: pathlib.Path, names) -> dict:
  """Per-batch error vs updates, reset per domain, every seed."""
  benchmark = benchmarks.build(config.data, 'reset_each_shift')
  module, apply_fn = common.build_model(config.model, benchmark)
  variables, _ = common.load_source(
    config, workdir, benchmark, module, pretrain_if_missing=False
  )
  cfg = evaluation_config(config)
  seeds = [int(s) for s in str(config.seeds).split(',')]
  out = {}
  for name in names:
    owner = adapt.meta_source(cfg, name)
    meta = meta_train.load_meta(workdir / 'meta' / owner) if owner else None
    adapter = methods.from_config(
      adapt.factory_name(cfg, name), adapt.method_kwargs(cfg, name), apply_fn
    )
    step = jax.jit(adapter.step)
    runs = []
    for seed in seeds:
      for d, domain in enumerate(benchmark.domains):
        order = np.random.default_rng([seed, d]).permutation(len(domain))
        state = adapter.init(variables, jax.random.key(config.seed))
        errs = []
        for i in range(
          0, len(order) - config.batch_size + 1, config.batch_size
        ):
          batch = domain.source[order[i : i + config.batch_size]]
          state, o = step(state, {'image': batch['image']}, meta=meta)
          errs.append(float(np.mean(np.argmax(o.logits, -1) != batch['label'])))
        runs.append(errs)
    out[name] = np.mean(runs, 0).tolist()
    logging.info('%s: %s', name, np.round(out[name], 3).tolist())
  return out


def updates_to_target(curve, target: float) -> int | None:
  """First k (1-based) whose SMOOTH-batch running mean is <= target."""
  c = np.convolve(curve, np.ones(SMOOTH) / SMOOTH, 'valid')
  hits = np.flatnonzero(c <= target + 1e-12)
  return int(hits[0]) + SMOOTH if hits.size else None


def write_curves(workdir: pathlib.Path, data: dict) -> dict:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  target = float(np.mean(data['sar'][-SMOOTH:])) if 'sar' in data else None
  reach = {n: updates_to_target(c, target) for n, c in data.items()}
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, curve in data.items():
    ax.plot(np.arange(1, len(curve) + 1), 100 * np.asarray(curve), label=name)
  if target is not None:
    ax.axhline(100 * target, ls=':', c='k', lw=0.8, label="SAR's final")
  ax.set_xlabel('batch k within a domain (updates before it: k - 1)')
  ax.set_ylabel('error of batch k (%)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / 'mgg_curves.png', dpi=120)
  summary = {'curves': data, 'sar_final_error': target, 'updates': reach}
  (workdir / 'mgg_curves.json').write_text(json.dumps(summary, indent=2))
  return summary


def report(config, workdir: pathlib.Path) -> str:
  results = json.loads((workdir / 'results.json').read_text())['methods']
  lines = [
    '| method | mean error (%) | std over seeds | pre-training val acc |',
    '|---|---:|---:|---:|',
  ]
  for name in [n for n in config.methods.split(',') if n]:
    if name not in results:
      continue
    r = results[name]
    meta = workdir / 'meta' / name / 'metadata.json'
    acc = (
      json.loads(meta.read_text())['metrics'].get('val_accuracy')
      if meta.exists()
      else None
    )
    lines.append(
      f'| {name} | {100 * r["mean_error"]:.2f} | '
      f'{100 * r.get("mean_error_std", float("nan")):.2f} | '
      f'{"" if acc is None else f"{100 * acc:.2f}"} |'
    )
  curves_path = workdir / 'mgg_curves.json'
  if curves_path.exists():
    c = json.loads(curves_path.read_text())
    lines += [
      '',
      f"Updates to reach SAR's final error ({100 * c['sar_final_error']:.2f}"
      f' %, {SMOOTH}-batch mean): '
      + ', '.join(f'{n}: {k}' for n, k in c['updates'].items()),
    ]
  text = '\n'.join(lines)
  (workdir / 'mgg_analyses.md').write_text(text + '\n')
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = FLAGS.config, pathlib.Path(FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if 'train' in FLAGS.steps:
    train(config, workdir)
  if 'adapt' in FLAGS.steps:
    adapt.run(evaluation_config(config), workdir)
  if 'curves' in FLAGS.steps:
    write_curves(workdir, curves(config, workdir, FLAGS.curve_methods))
  if 'report' in FLAGS.steps:
    print(report(config, workdir))


if __name__ == '__main__':
  app.run(main)
