"""The training runner: methods that learn before they adapt.

`run(config, workdir)` loads (or first trains) the source model of every
benchmark the config names (one for single-source TTA, one per held-out
domain for leave-one-domain-out), then runs the trainer of every method in
`config.meta_methods` (`tta_jax.trainers.TRAINERS`) and saves what it
learned under `WORKDIR[/dg/<held_out>]/meta/<method>/` (`artifacts`), where
`adapt.run` finds it. A trainer gets its inputs as a `TrainContext` built
here from the config; it owns its loop and resumes from its checkpointer.
"""

import json
import pathlib
import time
from collections.abc import Sequence

import jax
from absl import logging

from tta_jax import trainers
from tta_jax._src import checkpoint
from tta_jax.data import benchmarks as benchmarks_lib, sources
from tta_jax.runners import artifacts, configs, lm, pretrain
from tta_jax.trainers import base


class _Lazy(Sequence):
  """A list built on first use (the validation stream costs seconds to
  corrupt, and most trainers never read it)."""

  def __init__(self, build):
    self._build, self._items = build, None

  def _get(self):
    if self._items is None:
      self._items = list(self._build())
    return self._items

  def __getitem__(self, i):
    return self._get()[i]

  def __len__(self):
    return len(self._get())


def _shifted_domains(config) -> Sequence[sources.Domain]:
  """Labelled shifts disjoint from the test stream (`benchmarks.
  shifted_domains`: the digits' validation stream, the extra corruptions of
  CIFAR-10-C and ImageNet-C), for trainers that learn from or select on
  shifted data; read when a trainer first asks; empty where the benchmark
  defines none."""
  if not benchmarks_lib.has_shifted_domains(config.data):
    return []
  return _Lazy(lambda: benchmarks_lib.shifted_domains(config.data))


def context(config, name: str, workdir, benchmark, module, apply_fn, variables):
  """The `TrainContext` of method `name`'s trainer on one benchmark."""
  train_domains, val_domains = benchmark.meta_source_domains()
  kwargs = (
    configs.method_kwargs(config, name) if name in config.method_configs else {}
  )
  return base.TrainContext(
    model_config=config.model.to_dict(),
    module=module,
    apply_fn=apply_fn,
    variables=variables,
    input_shape=tuple(benchmark.input_shape),
    num_classes=benchmark.num_classes,
    source_domains=train_domains,
    val_domains=val_domains,
    shifted_domains=_shifted_domains(config),
    hparams=config.meta_train[name],
    method_kwargs=kwargs,
    source_recipe=config.pretrain.to_dict(),
    seed=config.seed,
    rng=jax.random.fold_in(jax.random.key(config.seed), 1),
    checkpointer=checkpoint.StateCheckpointer(
      artifacts.trainer_checkpoint_dir(workdir, name)
    ),
    cache_dir=artifacts.backbone_cache_dir(workdir),
    log_every=config.log_every,
  )


def run_benchmark(config, workdir: pathlib.Path, benchmark) -> dict:
  """Trains every `config.meta_methods` entry on one benchmark."""
  module, apply_fn = artifacts.build_model(config.model, benchmark)
  variables, _ = pretrain.ensure_source(config, workdir, benchmark, module)
  out = {}
  for name in configs.trained_names(config):
    directory = artifacts.trained_dir(workdir, name)
    kwargs = (
      configs.method_kwargs(config, name)
      if name in config.method_configs
      else {}
    )
    current = artifacts.trainer_settings(config, name, kwargs)
    artifacts.check_settings(
      directory / 'metadata.json', current, 'meta-training'
    )
    if artifacts.is_trained(directory):
      logging.info('%s: meta-training already done (%s)', name, directory)
      out[name] = json.loads((directory / 'metadata.json').read_text())
      continue
    progress = artifacts.trainer_progress_file(workdir, name)
    artifacts.check_settings(progress, current, 'partial meta-training')
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text(json.dumps({'settings': current}, indent=2))
    ctx = context(config, name, workdir, benchmark, module, apply_fn, variables)
    t0 = time.perf_counter()
    logging.info(
      '%s: meta-training on %s (%d source domains)',
      name,
      benchmark.name,
      len(ctx.source_domains),
    )
    trainer = trainers.TRAINERS[
      configs.resolve(config, name, trainers.TRAINERS)
    ]
    result = trainer(ctx)
    ctx.checkpointer.close()
    metadata = {
      **artifacts.model_metadata(config.model, benchmark),
      'method': name,
      'seconds': time.perf_counter() - t0,
      'settings': current,
    }
    artifacts.save_trained(directory, result, metadata)
    out[name] = {**metadata, 'metrics': result.metrics}
    logging.info(
      '%s: meta-training done in %.0fs: %s',
      name,
      metadata['seconds'],
      result.metrics,
    )
  return out


def validation_accuracies(config, workdir) -> dict[str, dict[str, float]]:
  """{method: {benchmark: source-val accuracy}} of the finished trainers
  that report one (`metrics['val_accuracy']` in `meta/<name>/metadata.json`;
  leave-one-domain-out benchmarks are keyed by held-out domain)."""
  names = configs.trained_names(config)
  out = {}
  for tag, benchmark, wd in artifacts.benchmark_dirs(config, workdir):
    for name in names:
      path = artifacts.trained_dir(wd, name) / 'metadata.json'
      if path.exists():
        acc = json.loads(path.read_text())['metrics'].get('val_accuracy')
        if acc is not None:
          out.setdefault(name, {})[tag or benchmark.name] = float(acc)
  return out


def validate_config(config) -> list[str]:
  """Checks the config before any work; returns what will run (for
  language-model configs, `config.runner == 'lm'`, the trained methods of
  `runners.lm`)."""
  if config.get('runner') == 'lm':
    lm.validate_config(config)
    return lm.trained_names(config)
  return configs.check(config)


def run(config, workdir) -> dict:
  """Trains on every benchmark of the config (see module docstring).
  Language-model configs (`config.runner == 'lm'`) train around their
  frozen LM in `runners.lm.train`."""
  if config.get('runner') == 'lm':
    return lm.train(config, workdir)
  configs.check(config)  # fail on bad names and values before any training
  workdir = pathlib.Path(workdir)
  out = {
    tag or bench.name: run_benchmark(config, wd, bench)
    for tag, bench, wd in artifacts.benchmark_dirs(config, workdir)
  }
  (workdir / 'meta_train.json').write_text(
    json.dumps(out, indent=2, default=float)
  )
  return out
