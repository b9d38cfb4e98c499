"""The meta-training runner: methods that learn before they adapt.

`run(config, workdir)` loads (or first trains) the source model of every
benchmark the config names (one for single-source TTA, one per held-out
domain for leave-one-domain-out), then runs the meta-trainer of every method
in `config.meta_methods` and saves what it learned under
`WORKDIR[/dg/<held_out>]/meta/<method>/`:

- `meta/`: meta-parameters the method's `step` takes as `meta=...` (a
  generator's weights, learned hyperparameters);
- `backbone/`: a meta-trained model replacing the source one for this
  method (Meta-TTT), with its model config in `metadata.json`.

`adapt.run` finds them there. A meta-trainer is a function of a
`MetaTrainContext` returning a `MetaTrainResult` (see `tta_jax._src.meta`),
registered in `tta_jax.methods.META_TRAINERS`; it owns its loop and uses
the context's checkpointer to resume.
"""

import json
import pathlib
import time
from typing import Any

import jax
from absl import logging

from tta_jax._src import checkpoint, meta as meta_lib
from tta_jax.data import benchmarks
from tta_jax.runners import adapt, common


def _trainers() -> dict[str, Any]:
  from tta_jax import methods

  return methods.META_TRAINERS


def trainer_name(config, name: str) -> str:
  """The meta-trainer a (possibly variant) name uses.

  A name with its own registered trainer uses it; a variant
  (`method_configs.<name>.method`) uses its method's trainer.
  """
  if name in _trainers():
    return name
  if name in config.method_configs:
    return config.method_configs[name].get('method', name)
  return name


def meta_method_names(config) -> list[str]:
  names = [m.strip() for m in config.meta_methods.split(',') if m.strip()]
  trainers = _trainers()
  unknown = [m for m in names if trainer_name(config, m) not in trainers]
  if unknown:
    raise ValueError(
      f'no meta-trainer for {unknown}; valid: {sorted(trainers)} (or '
      'method_configs variants of them)'
    )
  missing = [m for m in names if m not in config.meta_train]
  if missing:
    raise ValueError(f'no config.meta_train entry for {missing}')
  return names


def save(
  directory: pathlib.Path, result: meta_lib.MetaTrainResult, metadata: dict
) -> None:
  """Writes a meta-trainer's artifacts (see the module docstring)."""
  import orbax.checkpoint as ocp

  directory.mkdir(parents=True, exist_ok=True)
  if result.variables is not None:
    checkpoint.save_variables(
      directory / 'backbone',
      result.variables,
      {
        'model': result.model or metadata['model'],
        **{k: v for k, v in metadata.items() if k != 'model'},
      },
    )
  if result.meta is not None:
    checkpoint.quiet_orbax()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(
      (directory / 'meta').absolute(),
      checkpoint.to_storable(result.meta),
      force=True,
    )
    ckptr.wait_until_finished()
  (directory / 'metadata.json').write_text(
    json.dumps({**metadata, 'metrics': result.metrics}, indent=2, default=float)
  )


def load_meta(directory: pathlib.Path) -> Any:
  """The meta-parameters saved by `save` (as nested dicts of arrays)."""
  import orbax.checkpoint as ocp

  checkpoint.quiet_orbax()
  return ocp.StandardCheckpointer().restore(
    (pathlib.Path(directory) / 'meta').absolute()
  )


def done(directory: pathlib.Path) -> bool:
  return (directory / 'metadata.json').exists()


def settings(config, name: str, method_kwargs: dict) -> dict:
  """What a method's meta-training depends on, as plain JSON data."""
  return adapt.jsonable(
    {
      'meta_train': config.meta_train[name],
      'method': method_kwargs,
      'model': config.model,
      'pretrain': config.get('pretrain', {}),
      'seed': config.seed,
    }
  )


def check_settings(path: pathlib.Path, current: dict, what: str) -> None:
  """Refuses to reuse `what` (in `path`'s folder) made under other settings.

  `path` is a JSON file holding the settings the artifacts were made with
  (under key 'settings'); a file without them (older runs) is accepted.
  """
  if not path.exists():
    return
  saved = json.loads(path.read_text()).get('settings')
  if saved is None or saved == current:
    return
  differ = sorted(
    k for k in set(saved) | set(current) if saved.get(k) != current.get(k)
  )
  raise ValueError(
    f'{what} in {path.parent} was made with other settings (differing: '
    f'{differ}); use a new --workdir or delete {path.parent} to redo it'
  )


def run_benchmark(config, workdir: pathlib.Path, benchmark) -> dict:
  """Meta-trains every `config.meta_methods` entry on one benchmark."""
  module, apply_fn = common.build_model(config.model, benchmark)
  variables, _ = common.load_source(
    config, workdir, benchmark, module, pretrain_if_missing=True
  )
  train_domains, val_domains = benchmark.meta_source_domains()
  out = {}
  for name in meta_method_names(config):
    directory = workdir / 'meta' / name
    kwargs = (
      adapt.method_kwargs(config, name) if name in config.method_configs else {}
    )
    current = settings(config, name, kwargs)
    check_settings(directory / 'metadata.json', current, 'meta-training')
    if done(directory):
      logging.info('%s: meta-training already done (%s)', name, directory)
      out[name] = json.loads((directory / 'metadata.json').read_text())
      continue
    progress = workdir / 'meta_ckpt' / f'{name}.json'
    check_settings(progress, current, 'partial meta-training')
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text(json.dumps({'settings': current}, indent=2))
    ctx = meta_lib.MetaTrainContext(
      config=config,
      method_config=config.meta_train[name],
      method_kwargs=kwargs,
      module=module,
      apply_fn=apply_fn,
      variables=variables,
      source_domains=train_domains,
      val_domains=val_domains,
      input_shape=tuple(benchmark.input_shape),
      num_classes=benchmark.num_classes,
      rng=jax.random.fold_in(jax.random.key(config.seed), 1),
      checkpointer=checkpoint.StateCheckpointer(workdir / 'meta_ckpt' / name),
      log_every=config.log_every,
    )
    t0 = time.perf_counter()
    logging.info(
      '%s: meta-training on %s (%d source domains)',
      name,
      benchmark.name,
      len(train_domains),
    )
    result = _trainers()[trainer_name(config, name)](ctx)
    ctx.checkpointer.close()
    metadata = {
      **common.model_metadata(config.model, benchmark),
      'method': name,
      'seconds': time.perf_counter() - t0,
      'settings': current,
    }
    save(directory, result, metadata)
    out[name] = {**metadata, 'metrics': result.metrics}
    logging.info(
      '%s: meta-training done in %.0fs: %s',
      name,
      metadata['seconds'],
      result.metrics,
    )
  return out


def validation_accuracies(config, workdir) -> dict[str, dict[str, float]]:
  """{method: {benchmark: source-val accuracy}} of the finished meta-trainers
  that report one (`metrics['val_accuracy']` in `meta/<name>/metadata.json`;
  leave-one-domain-out benchmarks are keyed by held-out domain)."""
  workdir = pathlib.Path(workdir)
  names = meta_method_names(config)
  out = {}
  for tag, benchmark in benchmarks.targets(config.data, config.setting):
    wd = workdir if tag is None else workdir / 'dg' / tag
    for name in names:
      path = wd / 'meta' / name / 'metadata.json'
      if path.exists():
        acc = json.loads(path.read_text())['metrics'].get('val_accuracy')
        if acc is not None:
          out.setdefault(name, {})[tag or benchmark.name] = float(acc)
  return out


def run(config, workdir) -> dict:
  """Meta-trains on every benchmark of the config (see module docstring)."""
  workdir = pathlib.Path(workdir)
  meta_method_names(config)  # fail on unknown names before any training
  out = {}
  for tag, benchmark in benchmarks.targets(config.data, config.setting):
    wd = workdir if tag is None else workdir / 'dg' / tag
    out[tag or benchmark.name] = run_benchmark(config, wd, benchmark)
  (workdir / 'meta_train.json').write_text(
    json.dumps(out, indent=2, default=float)
  )
  return out
