"""The adaptation runner: every requested method over the configured stream.

`run(config, workdir)` loads (or first trains) the source model, plans the
stream, runs each method with its `step` compiled once (state donated), and
scores the logits each step returns. Per method and domain it reports
error, ECE, NLL, examples and wall time; per method the error on the clean
test split before and after adaptation (forgetting). Results land in
`WORKDIR/results.json`, `results.md` (also printed), `results.csv` and
`results.png` (`config.results_name` renames them, e.g. 'validation' for a
validation stream, whose per-method records go to `methods_validation/`).

Long runs are resumable: the adaptation state and the scores so far are
checkpointed with orbax every `checkpoint_every` batches (and on
interruption); a restarted run continues from there and produces the same
numbers as an uninterrupted one. Finished methods are kept in
`WORKDIR/methods/<name>.json` and not rerun.

K independent streams with the same batch structure (the domains of the
episodic setting, or K seeds) can run as one vmapped program (`parallel`),
sharded over the devices, also of several processes (`shard_streams`, see
`runners.distributed`), or each batch can be sharded (`shard_batch`; BN
statistics are then reduced across shards, as on one device).

The pieces: `configs` reads the config, `artifacts` owns the workdir,
`pretrain` makes the source model, `streams` runs them, `scoring`
aggregates, `report` writes the tables; this module orchestrates.
"""

import pathlib
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from tta_jax import methods, models
from tta_jax.data import sources, streams
from tta_jax.runners import (
  artifacts,
  configs,
  distributed,
  lm,
  pretrain,
  progress,
  report,
  scoring,
  streams as stream_lib,
)


def validate_config(config) -> list[str]:
  """Checks the config before any work; returns the requested methods.

  Language-model configs (`config.runner == 'lm'`) are `runners.lm`'s.
  """
  if config.get('runner') == 'lm':
    return lm.validate_config(config)
  return configs.check(config)


def source_context(config, benchmark) -> dict[str, Any]:
  """What the runner can give factories that ask for it (EATA's Fisher)."""
  if benchmark.source_val is None or not config.num_source_images:
    return {}
  n = min(config.num_source_images, len(benchmark.source_val))
  images = sources.materialize(benchmark.source_val)['image'][:n]
  return {'source_images': images}


def build_adapter(config, name, apply_fn, variables, benchmark, context, wd):
  """`(adapter, variables, meta)` of method `name`, on its trained
  artifacts if it has any (a missing training is an error, never a silent
  fallback to the source model)."""
  owner = configs.artifacts_owner(config, name)
  meta = None
  if config.method_configs[name].get('model'):
    apply_fn, variables = artifacts.model_variant(
      config, name, variables, benchmark
    )
  if owner is not None:
    if not artifacts.is_trained(artifacts.trained_dir(wd, owner)):
      raise FileNotFoundError(
        f'{name}: no meta-training of {owner!r} in {wd / "meta"}; run '
        f'experiments.meta_train_main first with {owner!r} in meta_methods '
        '(same config and workdir)'
      )
    apply_fn, variables, meta = artifacts.load_trained(
      wd, owner, apply_fn, variables, benchmark
    )
  adapter = methods.from_config(
    configs.resolve(config, name, methods.METHODS),
    configs.method_kwargs(config, name),
    apply_fn,
    **context,
  )
  return adapter, variables, meta


def run_method(
  name,
  config,
  apply_fn,
  variables,
  benchmark,
  context,
  workdir: pathlib.Path,
  job: progress.Job | None = None,
  label: str | None = None,
) -> dict[str, Any]:
  """Runs one method over the configured stream(s); returns its results.

  `job` reports progress (`label` is the method's name in it).
  """
  cached = artifacts.cached_result(config, workdir, name)
  if cached is not None:
    logging.info('%s: already done', name)
    return cached
  adapter, variables, meta = build_adapter(
    config, name, apply_fn, variables, benchmark, context, workdir
  )
  domains, seeds = benchmark.domains, configs.seeds_of(config)
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  run_kwargs = dict(
    meta=meta,
    shard_batch=config.shard_batch,
    shard_streams=config.get('shard_streams', False) or None,  # None: auto
    checkpoint_every=config.checkpoint_every,
    log_every=config.log_every,
    nonfinite=config.nonfinite,
    progress=job,
  )
  label = label or name

  def plan(seed):
    return streams.plan(
      config.setting,
      domains,
      seed=seed,
      batch_size=config.batch_size,
      dirichlet_delta=config.dirichlet_delta,
    )

  def ckpt_dir(tag):
    return artifacts.stream_checkpoint_dir(config, workdir, name, tag)

  if config.parallel == 'domains':
    per_seed = [
      stream_lib.run_per_domain_parallel(
        adapter,
        variables,
        plan(s),
        domains,
        rng,
        run_kwargs,
        ckpt_dir(f'seed{s}'),
        label,
      )
      for s in seeds
    ]
  elif config.parallel == 'seeds' and len(seeds) > 1:
    res = stream_lib.run_streams(
      adapter,
      variables,
      [plan(s) for s in seeds],
      domains,
      rngs=[rng] * len(seeds),
      checkpoint_dir=ckpt_dir('seeds'),
      name=label,
      **run_kwargs,
    )
    per_seed = stream_lib.split_streams(adapter, res)
  else:
    per_seed = [
      stream_lib.run_streams(
        adapter,
        variables,
        [plan(s)],
        domains,
        rngs=[rng],
        checkpoint_dir=ckpt_dir(f'seed{s}'),
        name=label,
        **run_kwargs,
      )
      for s in seeds
    ]

  out = scoring.summarize(per_seed, domains)
  out['config_hash'] = artifacts.result_key(config, name)
  out['compile_seconds'] = float(np.mean([r.compile_seconds for r in per_seed]))
  if benchmark.clean_test is not None and config.clean_eval_examples:
    kw = dict(meta=meta, max_examples=config.clean_eval_examples)
    before = adapter.init(variables, rng)
    after = per_seed[-1].final_state
    for key, state in (('before', before), ('after', after)):
      out[f'clean_error_{key}'] = scoring.clean_error(
        adapter, state, benchmark.clean_test, config.batch_size, **kw
      )
    out['forgetting'] = out['clean_error_after'] - out['clean_error_before']
  distributed.on_primary(artifacts.save_result, config, workdir, name, out)
  return out


def run_benchmark(
  config, workdir: pathlib.Path, benchmark, names, job=None, tag=None
):
  """Every method of `names` on one benchmark; returns the results dict."""
  module, apply_fn = artifacts.build_model(config.model, benchmark)
  distributed.check_source(config, workdir)
  variables, source_meta = pretrain.ensure_source(
    config, workdir, benchmark, module
  )
  context = source_context(config, benchmark)
  context['input_shape'] = tuple(benchmark.input_shape)
  context['num_classes'] = benchmark.num_classes
  if benchmark.class_subset is not None:
    apply_fn = models.restrict_classes(apply_fn, benchmark.class_subset)
    context['num_classes'] = len(benchmark.class_subset)
  logging.info(
    'Benchmark %s, setting %s: %d domains, %d examples per seed',
    benchmark.name,
    config.setting,
    len(benchmark.domains),
    sum(len(d) for d in benchmark.domains),
  )
  results = {
    'config': configs.jsonable(config),
    'source': source_meta,
    'domains': [d.name for d in benchmark.domains],
    'methods': {},
  }
  for name in names:
    t0 = time.perf_counter()
    label = _label(name, tag)
    done = artifacts.cached_result(config, workdir, name) is not None
    results['methods'][name] = run_method(
      name, config, apply_fn, variables, benchmark, context, workdir, job, label
    )
    seconds = time.perf_counter() - t0
    if job is not None and not done:
      job.finished(seconds)
    logging.info(
      '%s: mean error %.2f%% (%.1fs)',
      label,
      100 * results['methods'][name]['mean_error'],
      seconds,
    )
  # Methods this workdir finished earlier under the same settings stay in
  # the tables when a rerun asks for fewer.
  for name in artifacts.recorded_names(config, workdir):
    if name not in results['methods']:
      results['methods'][name] = artifacts.cached_result(config, workdir, name)
  return results


def run(config, workdir) -> dict[str, Any]:
  """Runs every method of `config.methods`; writes and returns the results.

  For leave-one-domain-out benchmarks, every held-out domain gets its own
  source model, meta-training artifacts and checkpoints under
  `WORKDIR/dg/<domain>/`, and the results hold one entry per held-out
  domain. Language-model configs (`config.runner == 'lm'`) run
  `runners.lm.run`.
  """
  if config.get('runner') == 'lm':
    return lm.run(config, workdir)
  names = validate_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info('Config:\n%s', config)
  per_target = artifacts.finished_results(config, workdir, names)
  if per_target is not None:
    logging.info('Every method is already done in %s', workdir)
  else:
    logging.info('Building the benchmark data (%s)', config.data.name)
    targets = artifacts.benchmark_dirs(config, workdir)
    tensorboard = config.tensorboard and distributed.is_primary()
    job = progress.Job(
      [_label(n, tag) for tag, _, _ in targets for n in names],
      seconds=config.progress_seconds,
      tensorboard_dir=workdir / 'tensorboard' if tensorboard else None,
    )
    per_target = {
      tag: run_benchmark(config, wd, bench, names, job, tag)
      for tag, bench, wd in targets
    }
  if list(per_target) == [None]:
    results = per_target[None]
  else:
    results = scoring.merge_held_out(config, per_target)
  name = artifacts.results_name(config)
  if distributed.is_primary():  # the other processes hold the same results
    report.write(results, workdir, name)
    logging.info('Results: %s', workdir / f'{name}.{{json,md,csv,png}}')
  return results


def _label(name: str, tag: str | None) -> str:
  """A method's name in progress lines (with its held-out domain)."""
  return name if tag is None else f'{name}@{tag}'
