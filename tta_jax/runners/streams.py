"""Stream execution: init, compile, loop, resume, vmap and sharding.

`run_streams` runs K streams of identical batch structure (K > 1 is one
vmapped program): it builds the initial state, compiles the method's step
once (state donated), reads each batch on the host, steps, and keeps the
per-example scores on the host. It checkpoints the state and the scores
every `checkpoint_every` batches and on interruption, and a restarted run
resumes from the last checkpoint with the same numbers as an uninterrupted
one. Each piece is a small function; `run_streams` is the loop over them.
"""

import dataclasses
import pathlib
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tta_jax._src import base, checkpoint, metrics, validation
from tta_jax.data import sources, streams


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
  # [K, num_batches, B] rows with NaN or Inf pixels (scored as errors).
  invalid: np.ndarray | None = None
  # [K, num_batches] 1 where the step skipped its update (non-finite state).
  skipped: np.ndarray | None = None
  # [K, num_batches, B] finite inputs whose logits were not (scored wrong).
  nonfinite: np.ndarray | None = None


# ----------------------------------------------------------------------------
# The state of K streams.


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


def initial_state(adapter, variables, rngs: Sequence[jax.Array]):
  """`(state0, axes)`: K initial states stacked (axes None when K == 1)."""
  cache = {}  # one init per distinct key (EATA computes a Fisher in init)
  inits = []
  for r in rngs:
    key = tuple(np.asarray(jax.random.key_data(r)).ravel().tolist())
    if key not in cache:
      cache[key] = adapter.init(variables, r)
    inits.append(cache[key])
  if len(inits) == 1:
    return inits[0], None
  axes = stream_axes(adapter, inits[0])
  state0 = jax.tree.map(
    lambda ax, *xs: jnp.stack(xs) if ax == 0 else xs[0],
    axes,
    *inits,
    is_leaf=lambda x: x is None,
  )
  return state0, axes


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


# ----------------------------------------------------------------------------
# The compiled step and the batches it reads.


class Shardings:
  """Each batch split over all devices (batch axis), the state replicated."""

  def __init__(self, batch_axis: int, batch_size: int):
    mesh = Mesh(np.array(jax.devices()), ('data',))
    if batch_size % mesh.size:
      raise ValueError(
        f'shard_batch: batch size {batch_size} is not divisible by the '
        f'{mesh.size} devices'
      )
    self.batch = NamedSharding(mesh, P(*([None] * batch_axis), 'data'))
    self.replicated = NamedSharding(mesh, P())

  # The interface `run_streams` uses, shared with `StreamShardings`.

  def jit(self, fn):
    return jax.jit(
      fn,
      donate_argnums=(0,),
      in_shardings=(self.replicated, self.batch),
      # The per-example scores stay sharded like the batch (propagated).
      out_shardings=(self.replicated, None),
    )

  def place_state(self, state):
    return jax.device_put(state, self.replicated)

  def gather_state(self, state):
    return state

  def streams_to_read(self, num_streams: int):
    return range(num_streams)

  def place_batch(self, batches: dict, num_streams: int):
    return jax.device_put(_stack(batches, num_streams), self.batch)


class StreamShardings:
  """K vmapped streams split over all devices (stream axis), also across
  the processes of a multi-process run.

  Stacked leaves of the state are sharded along their stream axis; shared
  (frozen) leaves are replicated. Each process builds only the shards of its
  own devices (`jax.make_array_from_callback`): of the state from the
  initial state, which every process computes alike, and of each batch from
  the streams it feeds, the only ones it reads. The step returns the
  per-example scores replicated (gathered on the devices), so every
  process's `Records` hold all K streams.
  """

  def __init__(self, num_streams: int, axes, state0):
    mesh = Mesh(np.array(jax.devices()), ('streams',))
    if num_streams % mesh.size:
      raise ValueError(
        f'shard_streams: {num_streams} streams are not divisible by the '
        f'{mesh.size} devices (use a multiple of the global device count)'
      )
    self.streams = NamedSharding(mesh, P('streams'))
    self.replicated = NamedSharding(mesh, P())
    self.state = jax.tree.map(
      lambda a, _: self.replicated if a is None else self.streams,
      axes,
      state0,
      is_leaf=lambda a: a is None,
    )
    devices = self.streams.addressable_devices_indices_map((num_streams,))
    self.local_streams = sorted(
      {s for index in devices.values() for s in range(num_streams)[index[0]]}
    )

  def place_state(self, state):
    """A state held alike by every process, as sharded global arrays."""
    return jax.tree.map(_global, state, self.state)

  def gather_state(self, state):
    """A sharded state back on this process's first device, whole."""
    whole = jax.jit(lambda x: x, out_shardings=self.replicated)(state)
    return jax.tree.map(lambda x: x.addressable_data(0), whole)

  def jit(self, fn):
    return jax.jit(
      fn,
      donate_argnums=(0,),
      in_shardings=(self.state, self.streams),
      # The scores come back whole, so every process holds all K streams.
      out_shardings=(self.state, self.replicated),
    )

  def streams_to_read(self, num_streams: int):
    """Only the streams this process feeds."""
    del num_streams
    return self.local_streams

  def place_batch(self, batches: dict, num_streams: int):
    first = batches[self.local_streams[0]]
    return {
      key: jax.make_array_from_callback(
        (num_streams, *first[key].shape),
        self.streams,
        lambda index, key=key: np.stack(
          [batches[s][key] for s in range(num_streams)[index[0]]]
        ),
      )
      for key in first
    }


def _global(x, sharding):
  """`x` (the same on every process) as a global array; each process
  places only its own devices' shards."""
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _global(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def make_step(adapter, axes, *, meta, shardings):
  """The jitted, state-donating step of K streams, scoring on the device."""

  def body(state, batch):
    inputs = {key: batch[key] for key in ('image', 'mask')}
    state, out = adapter.step(state, inputs, meta=meta)
    scores = metrics.per_example(out.logits, batch['label'])
    # Rows with NaN or Inf pixels were masked out by the step (the input
    # policy of `base.adapter`); they are scored as errors and counted.
    finite = base.finite_rows(batch['image'])
    # A prediction from NaN or Inf logits (a diverged step) is an error,
    # not the argmax's class 0, and is counted.
    finite_out = jnp.all(jnp.isfinite(out.logits), axis=-1)
    scores['correct'] = scores['correct'] & finite & finite_out
    scores['invalid'] = ~finite
    scores['nonfinite'] = finite & ~finite_out
    scores['skipped'] = out.metrics.get('skipped_update', jnp.zeros([]))
    scores['metrics'] = dict(out.metrics)  # read only for TensorBoard
    return state, scores

  fn = body if axes is None else jax.vmap(body, (axes, 0), (axes, 0))
  if shardings is None:
    return jax.jit(fn, donate_argnums=(0,))
  return shardings.jit(fn)


def _read_one(pos, domains, i: int, batch_size: int, nonfinite: str):
  _, dom, idx, _ = pos[i]
  batch = streams.read_batch(domains, dom, idx, batch_size)
  validation.check_batch(batch, i, allow_nonfinite=nonfinite == 'skip')
  return {key: batch[key] for key in ('image', 'mask', 'label')}


def read_batch(
  positions, domains, i: int, batch_size: int, shardings, nonfinite='skip'
):
  """Batch `i` of every stream, stacked when K > 1, checked, placed.

  With stream shardings, only the streams this process feeds are read.
  """
  k = len(positions)
  wanted = range(k) if shardings is None else shardings.streams_to_read(k)
  batches = {
    s: _read_one(positions[s], domains, i, batch_size, nonfinite)
    for s in wanted
  }
  if shardings is None:
    return _stack(batches, k)
  return shardings.place_batch(batches, k)


def _stack(batches: dict, num_streams: int):
  """Stream 0's batch, or all streams' stacked (K > 1)."""
  if num_streams == 1:
    return batches[0]
  return jax.tree.map(
    lambda *xs: np.stack(xs), *(batches[s] for s in range(num_streams))
  )


# ----------------------------------------------------------------------------
# Host records of the scores.


class Records:
  """The scores of K streams on the host, filled as batches complete."""

  def __init__(self, positions, num_domains: int, batch_size: int):
    k, num_batches = len(positions), len(positions[0])
    shape = (k, num_batches, batch_size)
    self.scores = {
      'correct': np.zeros(shape, bool),
      'nll': np.zeros(shape, np.float32),
      'confidence': np.zeros(shape, np.float32),
      'invalid': np.zeros(shape, bool),
      'nonfinite': np.zeros(shape, bool),
    }
    self.skipped = np.zeros((k, num_batches), np.float32)
    self.domain = np.zeros(shape, np.int32)
    self.valid = np.zeros(shape, bool)
    for s, pos in enumerate(positions):
      for i, (_, dom, _, n) in enumerate(pos):
        self.domain[s, i, :n], self.domain[s, i, n:] = dom, dom[0]
        self.valid[s, i, :n] = True
    self.seconds = np.zeros((k, num_domains))
    self._pending = []  # (batch index, device scores) not yet on the host

  def add(self, i: int, scores) -> None:
    self._pending.append((i, scores))

  def flush(self) -> None:
    k, _, b = self.valid.shape
    for i, out in self._pending:
      for key in self.scores:
        self.scores[key][:, i] = np.asarray(out[key]).reshape(k, b)
      self.skipped[:, i] = np.asarray(out['skipped']).reshape(k)
    self._pending.clear()

  def running_error(self, upto: int) -> float:
    valid = self.valid[:, :upto]
    return float(1 - self.scores['correct'][:, :upto][valid].mean())

  def attribute(self, first: int, last: int, elapsed: float) -> None:
    """Splits a run's wall time over its domains by example counts."""
    for s in range(self.seconds.shape[0]):
      dom = self.domain[s, first:last][self.valid[s, first:last]]
      if dom.size:
        counts = np.bincount(dom, minlength=self.seconds.shape[1])
        self.seconds[s] += elapsed * counts / dom.size

  def result(self, compile_seconds: float, state) -> StreamResult:
    return StreamResult(
      self.scores['correct'],
      self.scores['nll'],
      self.scores['confidence'],
      self.domain,
      self.valid,
      self.seconds,
      compile_seconds,
      state,
      self.scores['invalid'],
      self.skipped,
      self.scores['nonfinite'],
    )


# ----------------------------------------------------------------------------
# Checkpoints.


class StreamCheckpoint:
  """Saves and restores `(state, scores, seconds, next batch)`."""

  def __init__(self, directory: pathlib.Path, every: int):
    self.every = every
    self.ckpt = checkpoint.StateCheckpointer(directory)
    self.seconds = 0.0  # time spent saving, kept out of throughputs
    self.saving = False  # a save is under way (set while it runs)
    self.last_saved = None  # the batch index of the last save

  def restore(self, state0, records: Records, shardings) -> tuple[int, Any]:
    """`(next batch, state)`; `(0, None)` when there is nothing to resume."""
    template = {
      'state': state0,
      'records': records.scores,
      'skipped': records.skipped,
      'seconds': records.seconds,
      'next': np.int64(0),
    }
    step, restored = self.ckpt.restore_latest(template)
    if step is None:
      return 0, None
    records.skipped = restored['skipped']
    records.scores, records.seconds = restored['records'], restored['seconds']
    state = restored['state']
    if shardings is not None:
      state = shardings.place_state(state)
    return int(restored['next']), state

  def save(self, next_index: int, state, records: Records) -> float:
    """Saves; returns the seconds it took."""
    t = time.perf_counter()
    self.saving = True
    self.ckpt.save(
      next_index,
      {
        'state': state,
        'records': records.scores,
        'skipped': records.skipped,
        'seconds': records.seconds,
        'next': np.int64(next_index),
      },
    )
    self.saving = False
    self.last_saved = next_index
    took = time.perf_counter() - t
    self.seconds += took
    return took

  def due(self, done: int) -> bool:
    return done % self.every == 0

  def close(self) -> None:
    self.ckpt.close()


class DeferredInterrupt:
  """Ctrl-C (SIGINT) stops the stream at the next batch boundary.

  The first interrupt sets `requested`; the loop then checkpoints and
  raises KeyboardInterrupt, so a save is never cut in half. A second
  interrupt raises at once. Outside the main thread (where signal handlers
  cannot be installed) interrupts are not deferred.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    logging.warning(
      'Interrupted: stopping after this batch (interrupt again to stop now)'
    )

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.getsignal(signal.SIGINT)
      signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc_info):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def _usable(state) -> bool:
  """False when a donated buffer of `state` was consumed by a failed step."""
  return state is not None and not any(
    getattr(x, 'is_deleted', lambda: False)() for x in jax.tree.leaves(state)
  )


# ----------------------------------------------------------------------------
# The loop.


def run_streams(
  adapter,
  variables,
  plans: Sequence[streams.Plan],
  domains: Sequence[sources.Domain],
  *,
  rngs: Sequence[jax.Array],
  meta: Any = None,
  shard_batch: bool = False,
  shard_streams: bool | None = None,
  checkpoint_dir: pathlib.Path | None = None,
  checkpoint_every: int = 0,
  log_every: int = 0,
  nonfinite: str = 'skip',
  name: str = '',
  progress=None,
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
    shard_streams: shard the K streams over all devices (stream axis; K a
      multiple of the device count), also over the processes of a
      multi-process run. None: only in a multi-process run.
    checkpoint_dir: where to checkpoint/resume (None: no checkpoints).
    checkpoint_every: batches between checkpoints (0: never).
    log_every: batches between progress lines (0: never) when `progress`
      is None.
    nonfinite: 'skip' (rows with NaN or Inf pixels are masked out and
      scored as errors) or 'raise' (such a batch is an error).
    name: for log lines.
    progress: a `progress.Job`: progress by time with ETAs (a terminal
      progress bar, or log lines), and TensorBoard if it writes there.

  Returns:
    A `StreamResult`.
  """
  positions = [streams.batch_positions(p) for p in plans]
  _check_same_structure(positions)
  num_batches, b = len(positions[0]), plans[0].batch_size
  if num_batches == 0:
    raise ValueError('the stream has no batches (zero examples)')
  records = Records(positions, len(domains), b)
  state0, axes = initial_state(adapter, variables, rngs)
  multiprocess = jax.process_count() > 1
  if shard_streams is None:
    shard_streams = multiprocess
  if shard_streams and len(plans) % jax.device_count():
    raise ValueError(
      f'{len(plans)} parallel streams{f" of {name}" if name else ""} are '
      f'not divisible by the {jax.device_count()} devices they are sharded '
      'over'
    )
  shardings = None
  if shard_batch and shard_streams:
    raise ValueError(
      'shard_batch and shard_streams exclude each other (one device axis)'
    )
  if shard_batch:
    shardings = Shardings(0 if axes is None else 1, b)
    state0 = shardings.place_state(state0)
  elif shard_streams and jax.device_count() > 1:
    shardings = StreamShardings(len(plans), axes, state0)
    state0 = shardings.place_state(state0)
    logging.info(
      '%s: %d streams are sharded over %d devices of %d processes',
      name,
      len(plans),
      jax.device_count(),
      jax.process_count(),
    )
  step = make_step(adapter, axes, meta=meta, shardings=shardings)

  def read(i):
    return read_batch(positions, domains, i, b, shardings, nonfinite)

  ckpt, start, state = None, 0, None
  if checkpoint_dir is not None and checkpoint_every and multiprocess:
    logging.log_first_n(
      logging.INFO, 'Stream checkpoints are off in a multi-process run', 1
    )
  elif checkpoint_dir is not None and checkpoint_every:
    ckpt = StreamCheckpoint(checkpoint_dir, checkpoint_every)
    start, state = ckpt.restore(state0, records, shardings)
    if state is not None:
      logging.info('%s: resuming at batch %d/%d', name, start, num_batches)

  def result(seconds, state):
    if shardings is not None:
      state = shardings.gather_state(state)
    return records.result(seconds, state)

  if start >= num_batches:  # the checkpoint covers the whole stream
    if ckpt is not None:
      ckpt.close()
    return result(0.0, state)
  t_compile = time.perf_counter()
  compiled = step.lower(_copy(state0), read(start)).compile()
  compile_seconds = time.perf_counter() - t_compile
  reporter = (
    progress.stream(name, num_batches, start) if progress is not None else None
  )

  t_start = time.perf_counter()
  # A run is the batches since the last reset; its time is attributed to
  # its domains when it ends. `paused` is the checkpoint time inside it.
  t_run, run_first, paused = time.perf_counter(), start, 0.0
  completed = start  # batches whose results are in `state` and `records`
  in_step = False  # True while `state` and `completed` may disagree
  seen = 0  # valid examples adapted on in this run
  try:
    with DeferredInterrupt() as interrupt:
      for i in range(start, num_batches):
        if positions[0][i][0] or state is None:  # a reset
          if state is not None and i > run_first:
            records.flush()
            elapsed = time.perf_counter() - t_run - paused
            records.attribute(run_first, i, elapsed)
          state = _copy(state0)
          t_run, run_first, paused = time.perf_counter(), i, 0.0
        batch = read(i)
        in_step = True
        state, scores = compiled(state, batch)
        records.add(i, scores)
        completed = i + 1
        in_step = False
        seen += int(records.valid[:, i].sum())
        if reporter is not None:
          writes = reporter.writer is not None
          if reporter.due() or writes or completed == num_batches:
            records.flush()
            reporter.update(
              completed,
              examples=seen,
              running_error=records.running_error(completed),
              metrics=_scalars(scores['metrics']) if writes else None,
            )
          else:
            reporter.update(completed, examples=seen)
        elif log_every and completed % log_every == 0:
          records.flush()
          saving = ckpt.seconds if ckpt is not None else 0.0
          logging.info(
            '%s: batch %d/%d, %.0f examples/s, running error %.2f%%',
            name,
            completed,
            num_batches,
            seen / (time.perf_counter() - t_start - saving),
            100 * records.running_error(completed),
          )
        if ckpt is not None and (ckpt.due(completed) or interrupt.requested):
          records.flush()
          paused += ckpt.save(completed, state, records)
        if interrupt.requested:
          logging.warning('%s: interrupted at batch %d', name, completed)
          raise KeyboardInterrupt
    records.flush()
    records.attribute(
      run_first, num_batches, time.perf_counter() - t_run - paused
    )
  except BaseException:
    # Stopped mid-stream (an error, or an interrupt raised at once): keep
    # the last consistent position, unless it is already saved, the stop
    # came from saving it, or it hit a step (`state` may then be ahead of
    # the records, or consumed).
    consistent = not in_step and _usable(state)
    if (
      ckpt is not None
      and consistent
      and not ckpt.saving
      and ckpt.last_saved != completed
    ):
      try:
        records.flush()
        ckpt.save(completed, state, records)
        logging.warning('%s: stopped at batch %d (saved)', name, completed)
      except Exception:  # noqa: BLE001 - never mask the original error
        logging.exception('%s: could not checkpoint after the error', name)
    raise
  finally:
    if ckpt is not None:
      ckpt.close()
    if reporter is not None:
      reporter.close()
  return result(compile_seconds, state)


def _scalars(metrics) -> dict[str, float]:
  """A step's metrics as floats (the mean over K vmapped streams)."""
  return {k: float(np.mean(np.asarray(v))) for k, v in metrics.items()}


def _check_same_structure(positions: Sequence[list]) -> None:
  ref = [(r, n) for r, _, _, n in positions[0]]
  for pos in positions[1:]:
    if [(r, n) for r, _, _, n in pos] != ref:
      raise ValueError(
        'parallel streams need the same batch structure (number of batches, '
        'resets and padding); these streams differ'
      )


# ----------------------------------------------------------------------------
# The episodic setting as vmapped streams, and K streams back to K results.


def run_per_domain_parallel(
  adapter, variables, plan, domains, rng, run_kwargs, directory, name
) -> StreamResult:
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

  last = parts[-1]
  if last.correct.shape[0] > 1:  # a vmapped group: its last stream
    final_state = take_stream(adapter, last.final_state, -1)
  else:  # a group of one stream holds an unstacked state
    final_state = last.final_state
  return StreamResult(
    correct=cat('correct'),
    nll=cat('nll'),
    confidence=cat('confidence'),
    domain=cat('domain'),
    valid=cat('valid'),
    seconds=sum(r.seconds.sum(0, keepdims=True) for r in parts),
    compile_seconds=sum(r.compile_seconds for r in parts),
    final_state=final_state,
    invalid=cat('invalid'),
    skipped=np.concatenate([r.skipped.reshape(1, -1) for r in parts], 1),
    nonfinite=cat('nonfinite'),
  )


def split_streams(adapter, res: StreamResult) -> list[StreamResult]:
  """The K streams of a vmapped run as K single-stream results."""
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
