"""The workdir layout and what lives in it.

One module owns where things are, so no other code works out a path:

  WORKDIR/source/                  the source model (variables/, metadata.json)
  WORKDIR/pretrain_ckpt/           its training, resumable per epoch
  WORKDIR/meta/<method>/           what a trainer learned (`save_trained`):
      meta/        meta-parameters for `step(meta=...)`
      backbone/    a trained model replacing the source one for the method
      metadata.json  settings and final metrics (written last: "done")
  WORKDIR/meta_ckpt/<method>[.json] a trainer's resumable state and settings
  WORKDIR/meta_backbones/          backbones shared by trainers (cache)
  WORKDIR/methods[_<results>]/<method>.json  finished methods' results
  WORKDIR/adapt_ckpt/<method>-<hash>/  resumable stream states
  WORKDIR/<results>.{json,md,csv,png}  the tables
  WORKDIR/dg/<held_out>/...        the same per held-out domain
                                   (leave-one-domain-out benchmarks)

Loading never trains: a missing source model is an error here;
`runners.pretrain.ensure_source` is what trains one first.
"""

import hashlib
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from tta_jax import models
from tta_jax._src import checkpoint
from tta_jax.data import benchmarks
from tta_jax.runners import configs
from tta_jax.trainers import base as trainers_base


def benchmark_dirs(config, workdir) -> list[tuple[str | None, Any, Any]]:
  """`(tag, benchmark, workdir)` of every benchmark the config names."""
  workdir = pathlib.Path(workdir)
  return [
    (tag, bench, workdir if tag is None else workdir / 'dg' / tag)
    for tag, bench in benchmarks.targets(config.data, config.setting)
  ]


def build_model(model_config, benchmark: benchmarks.Benchmark):
  """`(module, apply_fn)` for the config's model on the benchmark's data."""
  module = models.from_config(model_config, benchmark.num_classes)
  return module, models.make_apply_fn(module, benchmark.input_shape)


def model_metadata(model_config, benchmark) -> dict[str, Any]:
  return checkpoint.model_metadata(
    model_config, benchmark.input_shape, benchmark.num_classes
  )


# ----------------------------------------------------------------------------
# The source model.


def source_dir(config, workdir) -> pathlib.Path:
  if config.source_ckpt:
    return pathlib.Path(config.source_ckpt)
  return pathlib.Path(workdir) / 'source'


def pretrain_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / 'pretrain_ckpt'


# The data settings a source model's training depends on.
SOURCE_DATA_KEYS = (
  'name',
  'train_size',
  'val_size',
  'split_seed',
  'rotations',
  'dg_domains',
  'loader_kwargs',
)


def source_training(config) -> dict[str, Any]:
  """What the source model trained into WORKDIR/source depends on."""
  data = {k: config.data[k] for k in SOURCE_DATA_KEYS if k in config.data}
  return configs.jsonable(
    {'pretrain': config.pretrain, 'seed': config.seed, 'data': data}
  )


def check_source_training(config, workdir, metadata: dict) -> None:
  """Refuses a workdir's source model trained under other settings."""
  saved = metadata.get('training')
  if saved is None:
    logging.warning(
      'The source model in %s records no training settings (an older '
      'run): it is used as it is',
      source_dir(config, workdir),
    )
    return
  current = source_training(config)
  if saved != current:
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    differ = sorted(
      k
      for k in set(flat_saved) | set(flat_current)
      if flat_saved.get(k) != flat_current.get(k)
    )
    raise ValueError(
      f'the source model in {source_dir(config, workdir)} was trained with '
      f'other settings (differing: {differ}); use a new --workdir, or '
      'delete that folder to train it again'
    )


def _flatten(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f'{prefix}.{k}' if prefix else k))
  return out


def has_source(config, workdir) -> bool:
  return checkpoint.has_variables(source_dir(config, workdir))


def load_source(config, workdir, benchmark, module):
  """`(variables, metadata)` of the source model; never trains one."""
  directory = source_dir(config, workdir)
  if not checkpoint.has_variables(directory):
    if config.source_ckpt:
      raise FileNotFoundError(
        f'config.source_ckpt={config.source_ckpt!r} holds no checkpoint '
        '(expected variables/ and metadata.json written by pretrain_main)'
      )
    raise FileNotFoundError(
      f'no source checkpoint in {directory}; run experiments.pretrain_main '
      'first or set config.source_ckpt'
    )
  metadata = checkpoint.load_metadata(directory)
  checkpoint.check_metadata(
    metadata, model_metadata(config.model, benchmark), directory
  )
  template = models.init_variables(
    module, benchmark.input_shape, jax.random.key(0)
  )
  return checkpoint.load_variables(directory, template), metadata


# ----------------------------------------------------------------------------
# Trained artifacts (experiments.meta_train_main).


def trained_dir(workdir, name: str) -> pathlib.Path:
  return pathlib.Path(workdir) / 'meta' / name


def trainer_checkpoint_dir(workdir, name: str) -> pathlib.Path:
  return pathlib.Path(workdir) / 'meta_ckpt' / name


def trainer_progress_file(workdir, name: str) -> pathlib.Path:
  return pathlib.Path(workdir) / 'meta_ckpt' / f'{name}.json'


def backbone_cache_dir(workdir) -> pathlib.Path:
  """Backbones shared by trainers: with leave-one-domain-out workdirs
  (WORKDIR/dg/<held_out>/) the cache is the top workdir's, so held-out
  domains that need the same backbone share it."""
  workdir = pathlib.Path(workdir).absolute()
  root = workdir.parents[1] if workdir.parent.name == 'dg' else workdir
  return root / 'meta_backbones'


def is_trained(directory: pathlib.Path) -> bool:
  return (pathlib.Path(directory) / 'metadata.json').exists()


def save_trained(
  directory: pathlib.Path, result: trainers_base.TrainResult, metadata: dict
) -> None:
  """Writes a trainer's artifacts (see the module docstring)."""
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
    metadata = {**metadata, 'meta_sha256': checkpoint.digest(result.meta)}
    checkpoint.quiet_orbax()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(
      (directory / 'meta').absolute(),
      checkpoint.to_storable(result.meta),
      force=True,
    )
    ckptr.wait_until_finished()
  checkpoint.write_atomically(
    directory / 'metadata.json',
    json.dumps(
      {**metadata, 'metrics': result.metrics}, indent=2, default=float
    ),
  )


def load_meta(directory: pathlib.Path) -> Any:
  """The meta-parameters saved by `save_trained` (nested dicts of arrays),
  verified against the checksum in `metadata.json`."""
  checkpoint.quiet_orbax()
  directory = pathlib.Path(directory)
  meta = ocp.StandardCheckpointer().restore((directory / 'meta').absolute())
  expected = (checkpoint.load_metadata(directory) or {}).get('meta_sha256')
  if expected is not None and checkpoint.digest(meta) != expected:
    raise ValueError(
      f'the trained meta-parameters in {directory} are damaged (they do not '
      f'match their checksum); delete {directory} and train again'
    )
  return meta


def load_trained(workdir, name: str, apply_fn, variables, benchmark):
  """What a trainer learned for method `name`.

  Returns `(apply_fn, variables, meta)`: a trained backbone replaces the
  source model, with its own architecture if its metadata says so (e.g. BN
  layers with a learnable mixing weight); meta-parameters (a generator)
  are passed to `step`.
  """
  directory = trained_dir(workdir, name)
  meta = None
  if checkpoint.has_variables(directory / 'backbone'):
    metadata = checkpoint.load_metadata(directory / 'backbone')
    module, apply_fn = build_model(metadata['model'], benchmark)
    template = models.init_variables(
      module, benchmark.input_shape, jax.random.key(0)
    )
    variables = checkpoint.load_variables(directory / 'backbone', template)
    if benchmark.class_subset is not None:
      apply_fn = models.restrict_classes(apply_fn, benchmark.class_subset)
  if (directory / 'meta').exists():
    meta = load_meta(directory)
  return apply_fn, variables, meta


def model_variant(config, name, variables, benchmark):
  """`(apply_fn, variables)` of method `name`'s model variant
  (`configs.model_config`): the variables are the source ones at the
  variant's parameter paths (a variant may use fewer, e.g. no prompt
  context; it may not need new ones)."""
  module, apply_fn = build_model(configs.model_config(config, name), benchmark)
  template = jax.eval_shape(
    lambda: models.init_variables(
      module, benchmark.input_shape, jax.random.key(0)
    )
  )
  variables = fit_variables(template, variables, name)
  if benchmark.class_subset is not None:
    apply_fn = models.restrict_classes(apply_fn, benchmark.class_subset)
  return apply_fn, variables


def fit_variables(template, variables, name: str):
  """`variables` restricted to `template`'s paths, shapes checked."""
  from flax import traverse_util

  out = {}
  for collection, tree in template.items():
    want = traverse_util.flatten_dict(dict(tree))
    have = traverse_util.flatten_dict(dict(variables.get(collection, {})))
    missing = sorted('/'.join(k) for k in want.keys() - have.keys())
    wrong = sorted(
      '/'.join(k)
      for k in want.keys() & have.keys()
      if tuple(want[k].shape) != tuple(have[k].shape)
    )
    if missing or wrong:
      raise ValueError(
        f'{name}: the model variant needs {collection} the source model '
        f'lacks (missing {missing[:4]}, other shapes {wrong[:4]})'
      )
    out[collection] = (
      traverse_util.unflatten_dict({k: have[k] for k in want}) if want else {}
    )
  return out


def trainer_settings(config, name: str, method_kwargs: dict) -> dict:
  """What a method's training depends on, as plain JSON data."""
  return configs.jsonable(
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


# ----------------------------------------------------------------------------
# Finished methods and their stream checkpoints.


def results_name(config) -> str:
  return config.get('results_name', 'results')


def records_dir(config, workdir) -> pathlib.Path:
  """Finished methods' records: `methods/`, or `methods_<results_name>/`
  for another stream (a validation run keeps the test run's records)."""
  name = results_name(config)
  folder = 'methods' if name == 'results' else f'methods_{name}'
  return pathlib.Path(workdir) / folder


def result_key(config, name: str) -> str:
  """A hash of what a method's results depend on (the cache key)."""
  relevant = {
    k: config[k]
    for k in (
      'data',
      'model',
      'setting',
      'batch_size',
      'seeds',
      'dirichlet_delta',
      'seed',
      'source_ckpt',
      'pretrain',
    )
  }
  relevant['method'] = config.method_configs[name]
  # A re-trained method is re-evaluated, not read from the cache.
  owner = configs.artifacts_owner(config, name) or name
  if owner in config.get('meta_train', {}):
    relevant['meta_train'] = config.meta_train[owner]
  blob = json.dumps(configs.jsonable(relevant), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_result(config, workdir, name: str) -> dict | None:
  """A finished method's results, if made under the current config.

  An unreadable record (a damaged file) is ignored with a warning: the
  method runs again and rewrites it.
  """
  path = records_dir(config, workdir) / f'{name}.json'
  if not path.exists():
    return None
  try:
    cached = json.loads(path.read_text())
    if not isinstance(cached, dict):
      raise ValueError('not a JSON object')
  except ValueError as e:
    logging.warning('%s is damaged (%s): %s runs again', path, e, name)
    return None
  if cached.get('config_hash') != result_key(config, name):
    return None
  return cached


def save_result(config, workdir, name: str, result: dict) -> pathlib.Path:
  """Writes a finished method's record atomically (all or nothing)."""
  path = records_dir(config, workdir) / f'{name}.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  checkpoint.write_atomically(path, json.dumps(result, indent=2))
  return path


def recorded_names(config, workdir) -> list[str]:
  """Methods with a valid record under the current config, in the order of
  `config.method_configs` (a rerun with fewer methods keeps the others in
  the tables)."""
  folder = records_dir(config, workdir)
  if not folder.exists():
    return []
  return [
    name
    for name in config.method_configs
    if (folder / f'{name}.json').exists()
    and cached_result(config, workdir, name) is not None
  ]


def finished_results(config, workdir, names) -> dict | None:
  """`{tag: results}` when every method of every benchmark is already
  recorded under the current config, read without building any data (a
  rerun of a finished workdir only rewrites the tables); else None."""
  tags = benchmarks.target_tags(config.data)
  if tags is None:
    return None
  workdir = pathlib.Path(workdir)
  out = {}
  for tag in tags:
    wd = workdir if tag is None else workdir / 'dg' / tag
    records = {n: cached_result(config, wd, n) for n in names}
    source = checkpoint.load_metadata(source_dir(config, wd))
    if source is None or any(r is None for r in records.values()):
      return None
    for name in recorded_names(config, wd):
      records.setdefault(name, cached_result(config, wd, name))
    out[tag] = {
      'config': configs.jsonable(config),
      'source': source,
      'domains': list(records[names[0]]['domains']),
      'methods': records,
    }
  return out


def stream_checkpoint_dir(config, workdir, name: str, tag: str):
  key = result_key(config, name)
  return pathlib.Path(workdir) / 'adapt_ckpt' / f'{name}-{key}' / tag
