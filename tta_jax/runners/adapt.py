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
episodic setting, or K seeds of one setting) can run as one vmapped
program (`config.parallel`), and each batch can be sharded over the
available devices (`config.shard_batch`); BN statistics are then reduced
across shards by XLA, so results equal the single-device run.
"""

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tta_jax import methods, models
from tta_jax._src import checkpoint, metrics, validation
from tta_jax.data import benchmarks, sources, streams
from tta_jax.runners import common, report

PARALLEL = ('', 'domains', 'seeds')


@dataclasses.dataclass
class StreamResult:
  """Per-example records of K parallel streams, [K, num_batches, B] each."""

  correct: np.ndarray
  nll: np.ndarray
  confidence: np.ndarray
  domain: np.ndarray
  valid: np.ndarray
  seconds: np.ndarray  # [K, num_domains] wall seconds attributed per domain
  compile_seconds: float = 0.0
  final_state: Any = None


# ----------------------------------------------------------------------------
# Config checks.


def validate_config(config) -> list[str]:
  """Checks names early; returns the requested method names."""
  names = [m.strip() for m in config.methods.split(',') if m.strip()]
  valid = sorted(set(methods.METHODS) | set(config.method_configs))
  if not names:
    raise ValueError(f'config.methods is empty; valid: {valid}')
  unknown = [m for m in names if m not in valid]
  if unknown:
    raise ValueError(f'unknown methods {unknown}; valid: {valid}')
  missing = [m for m in names if m not in config.method_configs]
  if missing:
    raise ValueError(f'no config.method_configs entry for {missing}')
  for m in names:
    factory = factory_name(config, m)
    if factory not in methods.METHODS:
      raise ValueError(
        f'method_configs.{m}.method={factory!r} is not a '
        f'registered method; valid: {sorted(methods.METHODS)}'
      )
    with_mixed_bn(config, m, None)  # checks mixed_bn_alpha
  streams.parse_setting(config.setting)
  if config.parallel not in PARALLEL:
    raise ValueError(
      f'unknown config.parallel {config.parallel!r}; valid: {PARALLEL}'
    )
  if config.parallel == 'domains':
    base, _ = streams.parse_setting(config.setting)
    if base != 'reset_each_shift':
      raise ValueError(
        "config.parallel='domains' runs the domains as "
        'independent streams, which only the reset_each_shift '
        f'settings define (got {config.setting!r})'
      )
  return names


def factory_name(config, name: str) -> str:
  """The registered method a (possibly variant) name runs."""
  return config.method_configs[name].get('method', name)


# Keys of `config.method_configs.<name>` the runner reads (not the factory).
RUNNER_KEYS = ('method', 'mixed_bn_alpha', 'meta_from')
# Methods whose test-batch BN `mixed_bn_alpha` replaces: they normalise with
# `use_batch_stats=True` (the others pick their own BN statistics; `norm`
# mixes with its own `source_weight`).
MIXED_BN_METHODS = ('tent', 'eata', 'eta', 'sar', 'cotta')


def meta_source(config, name: str) -> str | None:
  """Whose meta-training artifacts a method uses, or None.

  A method in `config.meta_methods` uses its own; `method_configs.<name>.
  meta_from` names another's (e.g. Tent on Meta-TTT's meta-trained
  backbone, or Meta-TTT without its test-time steps).
  """
  meta_from = config.method_configs[name].get('meta_from')
  if meta_from:
    return meta_from
  from tta_jax.runners import meta_train

  return name if name in meta_train.meta_method_names(config) else None


def method_kwargs(config, name: str) -> dict[str, Any]:
  kwargs = config.method_configs[name].to_dict()
  for key in RUNNER_KEYS:
    kwargs.pop(key, None)
  return kwargs


def with_mixed_bn(config, name: str, apply_fn):
  """`method_configs.<name>.mixed_bn_alpha`: Meta-TTT's mixed BN, any method.

  Test-batch statistics are mixed with the source statistics with weight
  `alpha` on the source (exact mixture variance, unbiased batch variance;
  1: source BN, 0: test-batch BN), for the methods of `MIXED_BN_METHODS`.
  """
  alpha = config.method_configs[name].get('mixed_bn_alpha')
  if alpha is None:
    return apply_fn
  factory = factory_name(config, name)
  if factory not in MIXED_BN_METHODS:
    raise ValueError(
      f'method_configs.{name}.mixed_bn_alpha: {factory!r} picks its own BN '
      f'statistics; mixed BN applies to {list(MIXED_BN_METHODS)}'
    )
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'mixed_bn_alpha must be in [0, 1], got {alpha}')
  from tta_jax.methods import meta_ttt

  return models.with_batch_bn(apply_fn, meta_ttt.mixed_bn(float(alpha)))


def seeds_of(config) -> list[int]:
  return [int(s) for s in str(config.seeds).split(',') if s.strip()]


# ----------------------------------------------------------------------------
# Running streams.


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stream_axes(adapter, state):
  """vmap axes of a state for K streams: frozen parameters are shared.

  Parameters outside the method's declared `adapted` mask are identical in
  every stream, so they stay unbatched: convolutions then see one kernel and
  a K*B batch instead of K kernels (a grouped convolution). Undeclared
  methods get every leaf batched.
  """
  axes = jax.tree.map(lambda _: 0, state)
  if adapter.adapted is None:
    return axes
  mask = adapter.adapted(state.params, state.batch_stats)
  return axes._replace(params=jax.tree.map(lambda m: 0 if m else None, mask))


def take_stream(adapter, state, i: int):
  """Stream `i` of a K-stream state laid out by `stream_axes`."""
  axes = stream_axes(adapter, state)
  return jax.tree.map(
    lambda a, x: x if a is None else x[i],
    axes,
    state,
    is_leaf=lambda a: a is None,
  )


def _check_same_structure(positions: Sequence[list]) -> None:
  ref = [(r, n) for r, _, _, n in positions[0]]
  for pos in positions[1:]:
    if [(r, n) for r, _, _, n in pos] != ref:
      raise ValueError(
        'parallel streams need the same batch structure (number of batches, '
        'resets and padding); these streams differ'
      )


def _mesh_shardings(batch_ndim_offset: int):
  devices = jax.devices()
  mesh = Mesh(np.array(devices), ('data',))
  batch_spec = P(*([None] * batch_ndim_offset), 'data')
  return mesh, NamedSharding(mesh, batch_spec), NamedSharding(mesh, P())


def run_streams(
  adapter,
  variables,
  plans: Sequence[streams.Plan],
  domains: Sequence[sources.Domain],
  *,
  rngs: Sequence[jax.Array],
  meta: Any = None,
  shard_batch: bool = False,
  checkpoint_dir: pathlib.Path | None = None,
  checkpoint_every: int = 0,
  log_every: int = 0,
  name: str = '',
) -> StreamResult:
  """Runs K streams of identical batch structure; K > 1 is one vmap.

  Args:
    adapter: the method.
    variables: the source variables.
    plans: K stream plans (same batch structure).
    domains: the domains the plans index.
    rngs: K base keys (one per stream).
    meta: the method's meta-parameters, if any.
    shard_batch: shard every batch over all devices (batch axis).
    checkpoint_dir: where to checkpoint/resume (None: no checkpoints).
    checkpoint_every: batches between checkpoints (0: never).
    log_every: batches between progress lines (0: never).
    name: for log lines.

  Returns:
    A `StreamResult`.
  """
  k = len(plans)
  positions = [streams.batch_positions(p) for p in plans]
  _check_same_structure(positions)
  num_batches, b = len(positions[0]), plans[0].batch_size
  if num_batches == 0:
    raise ValueError('the stream has no batches (zero examples)')
  shape = (k, num_batches, b)
  rec = {
    'correct': np.zeros(shape, bool),
    'nll': np.zeros(shape, np.float32),
    'confidence': np.zeros(shape, np.float32),
  }
  domain = np.zeros(shape, np.int32)
  valid = np.zeros(shape, bool)
  for s, pos in enumerate(positions):
    for i, (_, dom, _, n) in enumerate(pos):
      domain[s, i, :n], domain[s, i, n:] = dom, dom[0]
      valid[s, i, :n] = True
  seconds = np.zeros((k, len(domains)))

  cache = {}  # one init per distinct key (EATA computes a Fisher in init)
  inits = []
  for r in rngs:
    key = tuple(np.asarray(jax.random.key_data(r)).ravel().tolist())
    if key not in cache:
      cache[key] = adapter.init(variables, r)
    inits.append(cache[key])
  axes = None
  if k == 1:
    state0 = inits[0]
  else:
    axes = stream_axes(adapter, inits[0])
    state0 = jax.tree.map(
      lambda ax, *xs: jnp.stack(xs) if ax == 0 else xs[0],
      axes,
      *inits,
      is_leaf=lambda x: x is None,
    )
  if shard_batch:
    mesh, batch_sharding, replicated = _mesh_shardings(0 if k == 1 else 1)
    if b % mesh.size:
      raise ValueError(
        f'shard_batch: batch size {b} is not divisible by the '
        f'{mesh.size} devices'
      )
    state0 = jax.device_put(state0, replicated)

  def body(state, batch):
    inputs = {key: batch[key] for key in ('image', 'mask')}
    state, out = adapter.step(state, inputs, meta=meta)
    return state, metrics.per_example(out.logits, batch['label'])

  fn = body if k == 1 else jax.vmap(body, in_axes=(axes, 0), out_axes=(axes, 0))
  if shard_batch:
    step = jax.jit(
      fn,
      donate_argnums=(0,),
      in_shardings=(replicated, batch_sharding),
      out_shardings=(replicated, batch_sharding),
    )
  else:
    step = jax.jit(fn, donate_argnums=(0,))

  def read(i):
    batches = []
    for s in range(k):
      _, dom, idx, _ = positions[s][i]
      batch = streams.read_batch(domains, dom, idx, b)
      validation.check_batch(batch, i)
      batches.append({key: batch[key] for key in ('image', 'mask', 'label')})
    batch = (
      batches[0] if k == 1 else jax.tree.map(lambda *xs: np.stack(xs), *batches)
    )
    if shard_batch:
      batch = jax.device_put(batch, batch_sharding)
    return batch

  start, state = 0, None
  ckpt = None
  if checkpoint_dir is not None and checkpoint_every:
    ckpt = checkpoint.StateCheckpointer(checkpoint_dir)
    if ckpt.latest_step() is not None:
      template = {
        'state': state0,
        'records': rec,
        'seconds': seconds,
        'next': np.int64(0),
      }
      restored = ckpt.restore(template)
      state, rec = restored['state'], restored['records']
      seconds, start = restored['seconds'], int(restored['next'])
      if shard_batch:
        state = jax.device_put(state, replicated)
      logging.info('%s: resuming at batch %d/%d', name, start, num_batches)

  # Checkpoint time (this run, whole stream), kept out of throughputs.
  paused = [0.0, 0.0]

  def save(next_index):
    if ckpt is not None:
      t = time.perf_counter()
      ckpt.save(
        next_index,
        {
          'state': state,
          'records': rec,
          'seconds': seconds,
          'next': np.int64(next_index),
        },
      )
      paused[0] += time.perf_counter() - t
      paused[1] += time.perf_counter() - t

  t_compile = time.perf_counter()
  compiled = step.lower(_copy(state0), read(start)).compile()
  compile_seconds = time.perf_counter() - t_compile

  pending = []  # (batch index, device records) not yet copied to the host

  def flush():
    for i, out in pending:
      for key in rec:
        rec[key][:, i] = np.asarray(out[key]).reshape(k, b)
    pending.clear()

  t_start = time.perf_counter()
  t_run, run_first = time.perf_counter(), start
  completed = start  # batches whose results are in `state` and `rec`
  try:
    for i in range(start, num_batches):
      reset = positions[0][i][0]
      if reset or state is None:
        if state is not None and i > run_first:  # close the previous run
          flush()
          _attribute(
            seconds,
            domain,
            valid,
            run_first,
            i,
            time.perf_counter() - t_run - paused[0],
          )
        state = _copy(state0)
        t_run, run_first, paused[0] = time.perf_counter(), i, 0.0
      state, out = compiled(state, read(i))
      pending.append((i, out))
      completed = i + 1
      if log_every and (i + 1) % log_every == 0:
        flush()
        done = valid[:, start : i + 1].sum()
        err = 1 - rec['correct'][:, : i + 1][valid[:, : i + 1]].mean()
        logging.info(
          '%s: batch %d/%d, %.0f examples/s, running error %.2f%%',
          name,
          i + 1,
          num_batches,
          done / (time.perf_counter() - t_start - paused[1]),
          100 * err,
        )
      if ckpt is not None and (i + 1) % checkpoint_every == 0:
        flush()
        save(i + 1)
    flush()
    _attribute(
      seconds,
      domain,
      valid,
      run_first,
      num_batches,
      time.perf_counter() - t_run - paused[0],
    )
  except BaseException:
    # Nothing lost on interruption: keep the last consistent position.
    if (
      ckpt is not None
      and state is not None
      and not any(
        getattr(x, 'is_deleted', lambda: False)()
        for x in jax.tree.leaves(state)
      )
    ):
      try:
        flush()
        save(completed)
        logging.warning(
          '%s: interrupted; checkpointed at batch %d', name, completed
        )
      except Exception:  # noqa: BLE001 - never mask the original error
        logging.exception('%s: could not checkpoint on interruption', name)
    raise
  finally:
    if ckpt is not None:
      ckpt.close()
  return StreamResult(
    rec['correct'],
    rec['nll'],
    rec['confidence'],
    domain,
    valid,
    seconds,
    compile_seconds,
    state,
  )


def _attribute(seconds, domain, valid, first, last, elapsed):
  """Splits a run's wall time over its domains by example counts."""
  for s in range(seconds.shape[0]):
    dom = domain[s, first:last][valid[s, first:last]]
    if dom.size:
      counts = np.bincount(dom, minlength=seconds.shape[1])
      seconds[s] += elapsed * counts / dom.size


def clean_error(
  adapter,
  state,
  source: sources.Source,
  batch_size: int,
  *,
  meta=None,
  max_examples: int = 0,
) -> float:
  """Error of `state` on clean data, without carrying adaptation over.

  Every clean batch is predicted by `step(state, batch)` from the same
  `state`, so this measures the adapted model, not further adaptation.
  """
  n = len(source) if not max_examples else min(max_examples, len(source))
  pred = jax.jit(lambda s, x: adapter.step(s, x, meta=meta)[1].logits)
  correct = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    batch = source[idx]
    m = len(idx)
    image = np.concatenate(
      [batch['image'], np.repeat(batch['image'][:1], batch_size - m, 0)]
    )
    logits = pred(state, {'image': image, 'mask': np.arange(batch_size) < m})
    correct.append(np.asarray(jnp.argmax(logits, -1))[:m] == batch['label'])
  return float(1 - np.concatenate(correct).mean())


# ----------------------------------------------------------------------------
# Methods.


def _config_hash(config, name: str) -> str:
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
  # A re-meta-trained method is re-evaluated, not read from the cache.
  owner = meta_source(config, name) or name
  if owner in config.get('meta_train', {}):
    relevant['meta_train'] = config.meta_train[owner]
  blob = json.dumps(jsonable(relevant), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def jsonable(x):
  """`x` (ConfigDicts, tuples, numpy scalars inside) as plain JSON data."""
  if hasattr(x, 'to_dict'):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return x


def method_artifacts(
  workdir: pathlib.Path, name: str, apply_fn, variables, benchmark
):
  """What `meta_train` learned for a method, if anything.

  Returns `(apply_fn, variables, meta)`: a meta-trained backbone (Meta-TTT)
  replaces the source model for this method, with its own architecture if
  its metadata says so (e.g. BN layers with a learnable mixing weight);
  meta-parameters (a generator) are passed to `step`.
  """
  directory = workdir / 'meta' / name
  meta = None
  if checkpoint.has_variables(directory / 'backbone'):
    metadata = checkpoint.load_metadata(directory / 'backbone')
    module, apply_fn = common.build_model(metadata['model'], benchmark)
    template = models.init_variables(
      module, benchmark.input_shape, jax.random.key(0)
    )
    variables = checkpoint.load_variables(directory / 'backbone', template)
    if benchmark.class_subset is not None:
      apply_fn = restrict_classes(apply_fn, benchmark.class_subset)
  if (directory / 'meta').exists():
    from tta_jax.runners import meta_train

    meta = meta_train.load_meta(directory)
  return apply_fn, variables, meta


def _results_name(config) -> str:
  return config.get('results_name', 'results')


def _records_folder(config) -> str:
  """Finished methods' records: `methods/`, or `methods_<results_name>/`
  for another stream (a validation run keeps the test run's records)."""
  name = _results_name(config)
  return 'methods' if name == 'results' else f'methods_{name}'


def run_method(
  name, config, apply_fn, variables, benchmark, context, workdir: pathlib.Path
) -> dict[str, Any]:
  """Runs one method over the configured stream(s); returns its results."""
  done = workdir / _records_folder(config) / f'{name}.json'
  key = _config_hash(config, name)
  if done.exists():
    cached = json.loads(done.read_text())
    if cached.get('config_hash') == key:
      logging.info('%s: already done (%s)', name, done)
      return cached
  owner = meta_source(config, name)
  if owner is None:
    method_variables, meta = variables, None
  else:
    from tta_jax.runners import meta_train

    if not meta_train.done(workdir / 'meta' / owner):
      raise FileNotFoundError(
        f'{name}: no meta-training of {owner!r} in {workdir / "meta"}; run '
        f'experiments.meta_train_main first with {owner!r} in meta_methods '
        '(same config and workdir)'
      )
    apply_fn, method_variables, meta = method_artifacts(
      workdir, owner, apply_fn, variables, benchmark
    )
  apply_fn = with_mixed_bn(config, name, apply_fn)
  adapter = methods.from_config(
    factory_name(config, name), method_kwargs(config, name), apply_fn, **context
  )
  domains = benchmark.domains
  seeds = seeds_of(config)
  plan_kwargs = dict(
    batch_size=config.batch_size, dirichlet_delta=config.dirichlet_delta
  )
  method_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  results_by_seed = []

  def stream_dir(tag):
    return workdir / 'adapt_ckpt' / f'{name}-{key}' / tag

  run_kwargs = dict(
    meta=meta,
    shard_batch=config.shard_batch,
    checkpoint_every=config.checkpoint_every,
    log_every=config.log_every,
  )
  if config.parallel == 'domains':
    for seed in seeds:
      plan = streams.plan(config.setting, domains, seed=seed, **plan_kwargs)
      res = _run_per_domain_parallel(
        adapter,
        method_variables,
        plan,
        domains,
        method_rng,
        run_kwargs,
        stream_dir(f'seed{seed}'),
        name,
      )
      results_by_seed.append(res)
  elif config.parallel == 'seeds' and len(seeds) > 1:
    plans = [
      streams.plan(config.setting, domains, seed=s, **plan_kwargs)
      for s in seeds
    ]
    res = run_streams(
      adapter,
      method_variables,
      plans,
      domains,
      rngs=[method_rng] * len(seeds),
      checkpoint_dir=stream_dir('seeds'),
      name=name,
      **run_kwargs,
    )
    results_by_seed.extend(_split_k(adapter, res))
  else:
    for seed in seeds:
      plan = streams.plan(config.setting, domains, seed=seed, **plan_kwargs)
      res = run_streams(
        adapter,
        method_variables,
        [plan],
        domains,
        rngs=[method_rng],
        checkpoint_dir=stream_dir(f'seed{seed}'),
        name=name,
        **run_kwargs,
      )
      results_by_seed.append(res)

  out = _summarize(results_by_seed, domains)
  out['config_hash'] = key
  out['compile_seconds'] = float(
    np.mean([r.compile_seconds for r in results_by_seed])
  )
  if benchmark.clean_test is not None and config.clean_eval_examples:
    state0 = adapter.init(method_variables, method_rng)
    final = results_by_seed[-1].final_state
    kw = dict(meta=meta, max_examples=config.clean_eval_examples)
    out['clean_error_before'] = clean_error(
      adapter, state0, benchmark.clean_test, config.batch_size, **kw
    )
    out['clean_error_after'] = clean_error(
      adapter, final, benchmark.clean_test, config.batch_size, **kw
    )
    out['forgetting'] = out['clean_error_after'] - out['clean_error_before']
  done.parent.mkdir(parents=True, exist_ok=True)
  done.write_text(json.dumps(out, indent=2))
  return out


def _run_per_domain_parallel(
  adapter, variables, plan, domains, rng, run_kwargs, directory, name
):
  """The episodic setting as vmapped streams, one per domain.

  Each run of the episodic `plan` (one domain, reset before it) becomes its
  own stream; runs that share a batch structure (same size) go into one
  vmapped program. The results are concatenated into one pseudo-stream.
  """
  global_plans, groups = [], {}
  for d, run in enumerate(plan.runs):
    global_plans.append(streams.Plan([run], plan.batch_size, plan.domain_names))
    signature = tuple(
      (r, n) for r, _, _, n in streams.batch_positions(global_plans[-1])
    )
    groups.setdefault(signature, []).append(d)
  parts = []
  for g, ids in enumerate(groups.values()):
    parts.append(
      run_streams(
        adapter,
        variables,
        [global_plans[d] for d in ids],
        domains,
        rngs=[rng] * len(ids),
        checkpoint_dir=directory / f'group{g}',
        name=f'{name}[{len(ids)} streams]',
        **run_kwargs,
      )
    )

  def cat(key):
    return np.concatenate(
      [
        getattr(r, key).reshape(1, -1, getattr(r, key).shape[-1]) for r in parts
      ],
      axis=1,
    )

  last = parts[-1].final_state
  return StreamResult(
    correct=cat('correct'),
    nll=cat('nll'),
    confidence=cat('confidence'),
    domain=cat('domain'),
    valid=cat('valid'),
    seconds=sum(r.seconds.sum(0, keepdims=True) for r in parts),
    compile_seconds=sum(r.compile_seconds for r in parts),
    final_state=take_stream(adapter, last, -1),
  )


def _split_k(adapter, res: StreamResult) -> list[StreamResult]:
  out = []
  for s in range(res.correct.shape[0]):
    fields = {}
    for f in dataclasses.fields(res):
      v = getattr(res, f.name)
      if isinstance(v, np.ndarray):
        v = v[s : s + 1]
      fields[f.name] = v
    fields['final_state'] = (
      None
      if res.final_state is None
      else take_stream(adapter, res.final_state, s)
    )
    out.append(StreamResult(**fields))
  return out


def _summarize(results: Sequence[StreamResult], domains) -> dict[str, Any]:
  """Per-domain metrics, averaged over seeds (with their std)."""
  per_seed = []
  for res in results:
    valid = res.valid.reshape(-1)
    dom = res.domain.reshape(-1)[valid]
    rec = {
      k: getattr(res, k).reshape(-1)[valid]
      for k in ('correct', 'nll', 'confidence')
    }
    doms = {}
    for d, domain in enumerate(domains):
      sel = dom == d
      if not sel.any():
        continue
      m = metrics.summarize({k: v[sel] for k, v in rec.items()})
      m['seconds'] = float(res.seconds[:, d].sum())
      m['examples_per_second'] = (
        m['n'] / m['seconds'] if m['seconds'] > 0 else float('nan')
      )
      doms[domain.name] = m
    overall = metrics.summarize(rec)
    per_seed.append((doms, overall, float(res.seconds.sum())))
  doms = {}
  for name in per_seed[0][0]:
    vals = [s[0][name] for s in per_seed]
    doms[name] = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
    doms[name]['n'] = int(vals[0]['n'])
    if len(vals) > 1:
      doms[name]['error_std'] = float(np.std([v['error'] for v in vals]))
  errors = [np.mean([d['error'] for d in s[0].values()]) for s in per_seed]
  total_n = sum(d['n'] for d in doms.values())
  seconds = float(np.mean([s[2] for s in per_seed]))
  out = {
    'domains': doms,
    'mean_error': float(np.mean(errors)),
    'mean_ece': float(np.mean([d['ece'] for d in doms.values()])),
    'mean_nll': float(np.mean([d['nll'] for d in doms.values()])),
    'overall_error': float(np.mean([s[1]['error'] for s in per_seed])),
    'seconds': seconds,
    'examples_per_second': total_n / seconds if seconds > 0 else float('nan'),
    'num_seeds': len(per_seed),
  }
  if len(errors) > 1:
    out['mean_error_std'] = float(np.std(errors))
  return out


# ----------------------------------------------------------------------------
# Entry point.


def restrict_classes(apply_fn, subset: np.ndarray):
  """An `apply_fn` whose logits are those of `subset` (ImageNet-R/A).

  Methods then adapt on, and are scored on, the benchmark's classes only,
  as the reference benchmarks do.
  """
  subset = jnp.asarray(subset)

  def restricted(*args, **kwargs):
    out = apply_fn(*args, **kwargs)
    return out._replace(logits=out.logits[:, subset])

  return restricted


def source_context(config, benchmark) -> dict[str, Any]:
  """What the runner can give factories that ask for it (EATA's Fisher)."""
  if benchmark.source_val is None or not config.num_source_images:
    return {}
  n = min(config.num_source_images, len(benchmark.source_val))
  images = sources.materialize(benchmark.source_val)['image'][:n]
  return {'source_images': images}


def run_benchmark(config, workdir: pathlib.Path, benchmark, names):
  """Every method of `names` on one benchmark; returns the results dict."""
  module, apply_fn = common.build_model(config.model, benchmark)
  variables, source_meta = common.load_source(
    config, workdir, benchmark, module, pretrain_if_missing=True
  )
  if benchmark.class_subset is not None:
    apply_fn = restrict_classes(apply_fn, benchmark.class_subset)
  context = source_context(config, benchmark)
  context['input_shape'] = tuple(benchmark.input_shape)
  context['num_classes'] = (
    len(benchmark.class_subset)
    if benchmark.class_subset is not None
    else benchmark.num_classes
  )
  logging.info(
    'Benchmark %s, setting %s: %d domains, %d examples per seed',
    benchmark.name,
    config.setting,
    len(benchmark.domains),
    sum(len(d) for d in benchmark.domains),
  )
  results = {
    'config': jsonable(config),
    'source': source_meta,
    'domains': [d.name for d in benchmark.domains],
    'methods': {},
  }
  for name in names:
    t0 = time.perf_counter()
    results['methods'][name] = run_method(
      name, config, apply_fn, variables, benchmark, context, workdir
    )
    logging.info(
      '%s: mean error %.2f%% (%.1fs)',
      name,
      100 * results['methods'][name]['mean_error'],
      time.perf_counter() - t0,
    )
  return results


def merge_held_out(config, per_target: Mapping[str, dict]) -> dict[str, Any]:
  """Leave-one-domain-out: one entry per held-out domain per method."""
  targets = list(per_target)
  first = per_target[targets[0]]
  merged = {
    'config': jsonable(config),
    'protocol': 'leave_one_domain_out',
    'source': {t: r['source'] for t, r in per_target.items()},
    'domains': targets,
    'methods': {},
  }
  for name in first['methods']:
    runs = {t: per_target[t]['methods'][name] for t in targets}
    doms = {t: runs[t]['domains'][t] for t in targets}
    seconds = sum(d['seconds'] for d in doms.values())
    entry = {
      'domains': doms,
      'mean_error': float(np.mean([d['error'] for d in doms.values()])),
      'mean_ece': float(np.mean([d['ece'] for d in doms.values()])),
      'mean_nll': float(np.mean([d['nll'] for d in doms.values()])),
      'seconds': seconds,
      'examples_per_second': (
        sum(d['n'] for d in doms.values()) / seconds
        if seconds > 0
        else float('nan')
      ),
      'held_out': runs,
    }
    for key in ('clean_error_before', 'clean_error_after', 'forgetting'):
      if all(key in r for r in runs.values()):
        entry[key] = float(np.mean([r[key] for r in runs.values()]))
    merged['methods'][name] = entry
  return merged


def run(config, workdir) -> dict[str, Any]:
  """Runs every method of `config.methods`; writes and returns the results.

  For leave-one-domain-out benchmarks, every held-out domain gets its own
  source model, meta-training artifacts and checkpoints under
  `WORKDIR/dg/<domain>/`, and the results hold one entry per held-out
  domain.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = validate_config(config)
  per_target = {}
  for tag, benchmark in benchmarks.targets(config.data, config.setting):
    wd = workdir if tag is None else workdir / 'dg' / tag
    per_target[tag] = run_benchmark(config, wd, benchmark, names)
  if list(per_target) == [None]:
    results = per_target[None]
  else:
    results = merge_held_out(config, per_target)
  report.write(results, workdir, _results_name(config))
  return results
