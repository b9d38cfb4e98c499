r"""Speed of one adaptation step: every method in JAX, and PyTorch alongside.

For each model and each registered method (`tta_jax.methods.METHODS`, at
`configs.common.method_configs()`), times one jitted, state-donating
`adapter.step` on a fixed batch already on the device, and reports the
median examples/s over `--repeats` timed repeats after warm-up (each repeat
runs `--steps_per_repeat` steps back to back and blocks once at its end).
In the same run and on the same weights, batch and thread settings, the
PyTorch reference steps of Tent, EATA and SAR
(`tta_jax.torch_reference.methods`, re-implementations of the official
code) are timed the same way, and the table gives the JAX/PyTorch ratio.

  python benchmarks/step_speed.py --out=/tmp/step_speed
  python benchmarks/step_speed.py --quick          # ~1 minute, a smoke run
  python benchmarks/step_speed.py --devices=2 --models=digits_cnn \
      --methods=tent,eata,sar                      # + a batch-sharded column

Models: `digits_cnn` (28x28x1) and `wide_resnet28_2` (32x32x3, the
RobustBench layout, converted from the PyTorch network of
`tta_jax.torch_reference.models`, so that both sides hold the same
weights). The weights are random,
with the classifier scaled so that about half of the batch passes the
entropy filters of EATA and SAR (a random network's predictions are near
uniform and would select nothing, and the PyTorch EATA skips its backward
when nothing is selected). Images are uniform noise; the cost of a step
does not depend on their content, except through those filters.

`--devices N` sets XLA's host-platform device count before JAX starts (CPU)
and, for N > 1, adds a column with the batch sharded over the N devices
(state replicated, as `runners.streams.run_streams(shard_batch=True)` does).
Methods that take meta-parameters get randomly initialised ones from their
module's `init_meta(...)` if it has one; methods whose step cannot run
without them are skipped with a note. Other columns: forward/backward passes
per step read from the code (`_PASSES`), XLA's FLOP count of the compiled
step (loop bodies counted once), and the compile time.

Absolute numbers depend on the machine and its load; compare ratios taken
in one run. This is a script, not a test: nothing here asserts on time.
"""

import argparse
import datetime
import inspect
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]

INPUT_SHAPES = {'digits_cnn': (28, 28, 1), 'wide_resnet28_2': (32, 32, 3)}
NUM_CLASSES = 10
DIGITS_WIDTH = 16  # configs.common.base_config().model.width

# Forward / backward passes per step, in units of one pass over the batch,
# read from the method files (cf. specs/anchors_and_baselines.md, 5.1).
_PASSES = {
  'source': '1 / 0',
  'norm': '1 / 0',
  'norm_prior': '1 / 0',
  'norm_alpha': '1 / 0',
  'norm_ema': '2 / 0',
  'tent': '1 / 1',
  'eata': '1 / 1',
  'eta': '1 / 1',
  'sar': '2 / 2',
  'lame': '1 / 0',
  't3a': '1 / 0',
  # Teacher on the batch; per memory update (<= ceil(B / 64)): teacher and
  # student on the 64-slot bank, student backward.
  'rotta': '1 + 2u (64 rows) / u (64 rows)',
  # Anchor, student, teacher (or 32 augmented teacher copies when the
  # anchor's confidence is below the threshold, as on random weights).
  'cotta': '2 + 1 or 32 / 1',
  # Per example: 32 augmented views forward and backward, then the image.
  'memo': '32B + B (1 row) / 32B (1 row)',
}

# Benchmark-only settings that bound memory without changing results.
_MEMORY_SETTINGS = {'memo': {'samples_per_call': 8}}

# A method without a `configs.common.method_configs()` entry gets its
# factory defaults and this optimizer (if it takes one).
_FALLBACK_OPTIMIZER = {'name': 'adam', 'learning_rate': 1e-3}

# PyTorch references (tta_jax/torch_reference/methods.py) of these methods.
TORCH_METHODS = ('tent', 'eata', 'sar')


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='digits_cnn,wide_resnet28_2')
  p.add_argument(
    '--methods',
    default='all',
    help="comma-separated METHODS keys or method_configs variants; 'all': "
    'every registered method',
  )
  p.add_argument('--batch_size', type=int, default=200)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument(
    '--steps_per_repeat',
    type=int,
    default=0,
    help='steps per timed repeat; 0: enough for --min_repeat_s',
  )
  p.add_argument('--min_repeat_s', type=float, default=1.0)
  p.add_argument('--warmup', type=int, default=2, help='untimed steps')
  p.add_argument(
    '--devices',
    type=int,
    default=0,
    help='host devices (CPU; 0 leaves XLA_FLAGS alone); > 1 adds a sharded '
    'column',
  )
  p.add_argument(
    '--torch_threads',
    type=int,
    default=0,
    help='torch.set_num_threads; 0: the CPUs this process may use (what '
    "XLA's CPU thread pool uses)",
  )
  p.add_argument(
    '--torch_channels_last',
    action='store_true',
    help='PyTorch model and input in channels_last memory format (the '
    'official code uses the NCHW default)',
  )
  p.add_argument(
    '--omp_wait_policy',
    default='',
    help="sets OMP_WAIT_POLICY before torch loads; 'PASSIVE' keeps "
    "PyTorch's OpenMP threads from spinning on a loaded machine",
  )
  p.add_argument('--no_torch', action='store_true')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='', help='writes OUT.md and OUT.json')
  p.add_argument(
    '--quick',
    action='store_true',
    help='smoke run (~1 min): Tent/EATA/SAR, batch 64 on the digits CNN and '
    '8 on WRN-28-2, 3 repeats of 1 step',
  )
  args = p.parse_args(argv)
  if args.quick:
    args.methods = 'tent,eata,sar' if args.methods == 'all' else args.methods
    args.repeats, args.warmup = min(args.repeats, 3), 1
    args.steps_per_repeat = args.steps_per_repeat or 1
    args.min_repeat_s = 0.0
  return args


def _quick_batch(args, model):
  if not args.quick:
    return args.batch_size
  return min(args.batch_size, 64 if model == 'digits_cnn' else 8)


def set_host_devices(n: int) -> None:
  """XLA's host-platform device count (CPU), before JAX starts; 0: unset."""
  if n:
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + f' --xla_force_host_platform_device_count={n}'
    )


def out_paths(out):
  path = pathlib.Path(out)
  if path.suffix in ('.md', '.json'):
    path = path.with_suffix('')
  return path.with_suffix('.md'), path.with_suffix('.json')


# ------------------------------------------------------------------ timing


class _Timer:
  """Times `step(carry) -> carry` (which may donate `carry`) in repeats."""

  def __init__(self, step, carry, block=None):
    self.step, self.carry = step, carry
    self.block = block or _block
    self.steps_per_repeat = 0
    self.times = []  # seconds per step, one entry per repeat

  def warm_up(self, args):
    """Untimed steps; with `--steps_per_repeat=0` these also size a repeat."""
    last = 0.0
    for _ in range(max(args.warmup, 1)):
      t = time.perf_counter()
      self.carry = self.step(self.carry)
      self.block(self.carry)
      last = time.perf_counter() - t
    n = args.steps_per_repeat
    if not n:
      n = max(1, min(50, math.ceil(args.min_repeat_s / max(last, 1e-6))))
    self.steps_per_repeat = n

  def repeat(self):
    t = time.perf_counter()
    for _ in range(self.steps_per_repeat):
      self.carry = self.step(self.carry)
    self.block(self.carry)
    self.times.append((time.perf_counter() - t) / self.steps_per_repeat)

  @property
  def median(self):
    return statistics.median(self.times)


def _time_interleaved(timers, args):
  """Warms up every timer, then runs their repeats in turn (A B A B ...).

  Interleaving exposes every side to the same machine state, so load that
  comes and goes moves all columns of a row alike.
  """
  for timer in timers.values():
    timer.warm_up(args)
  for _ in range(args.repeats):
    for timer in timers.values():
      timer.repeat()


def _copy(tree):
  import jax
  import jax.numpy as jnp

  return jax.tree.map(jnp.copy, tree)


def _block(tree):
  import jax

  jax.block_until_ready(tree)


# ------------------------------------------------------------------ models


def _entropy_pass_fraction(apply_fn, variables, images, e0):
  import jax
  import jax.numpy as jnp

  from tta_jax._src import losses

  @jax.jit
  def frac(params):
    out = apply_fn(
      params, variables['batch_stats'], images, use_batch_stats=True
    )
    return jnp.mean(losses.softmax_entropy(out.logits) < e0)

  return lambda scale: float(frac(_scale_head(variables['params'], scale)))


def _scale_head(params, scale):
  head = params['head']
  return {
    **params,
    'head': {'kernel': head['kernel'] * scale, 'bias': head['bias'] * scale},
  }


def _calibrate_head(apply_fn, variables, images, e0, target=0.5):
  """The head scale at which about `target` of the batch has entropy < e0."""
  frac = _entropy_pass_fraction(apply_fn, variables, images, e0)
  lo, hi = 1.0, 2.0
  if frac(lo) >= target:
    return lo, frac(lo)
  while frac(hi) < target and hi < 1e6:
    lo, hi = hi, 2 * hi
  for _ in range(20):  # bisection on a log scale
    mid = math.sqrt(lo * hi)
    lo, hi = (mid, hi) if frac(mid) < target else (lo, mid)
  return hi, frac(hi)


class ModelSetup:
  """A model on both sides with the same weights, and the test batch."""

  def __init__(self, name, batch_size, seed, with_torch, channels_last=False):
    import jax
    import numpy as np

    from tta_jax import models

    self.name, self.shape = name, INPUT_SHAPES[name]
    self.channels_last = channels_last
    kwargs = {'width': DIGITS_WIDTH} if name == 'digits_cnn' else {}
    module = models.build(name, num_classes=NUM_CLASSES, **kwargs)
    self.apply_fn = models.make_apply_fn(module, self.shape)
    rng = np.random.default_rng(seed)
    self.images = rng.uniform(size=(batch_size, *self.shape)).astype(np.float32)
    # Clean "source" images for EATA's Fisher (computed in init, untimed).
    self.source_images = rng.uniform(size=(128, *self.shape)).astype(np.float32)
    torch_model = None
    if name == 'digits_cnn':
      variables = jax.device_get(
        models.init_variables(module, self.shape, jax.random.key(seed))
      )
    else:
      import torch

      from tta_jax.models.vision import convert
      from tta_jax.torch_reference import models as torch_models

      torch.manual_seed(seed)
      torch_model = torch_models.WideResNet(28, 2, NUM_CLASSES)
      state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
      variables = convert.from_torch_state_dict(
        name, state_dict, num_classes=NUM_CLASSES, input_shape=self.shape
      )
    e0 = 0.4 * math.log(NUM_CLASSES)
    self.head_scale, self.pass_fraction = _calibrate_head(
      self.apply_fn, variables, self.images, e0
    )
    variables['params'] = jax.device_get(
      _scale_head(variables['params'], self.head_scale)
    )
    self.variables = variables
    self._torch_state = None
    if with_torch:
      self._torch_state = self._make_torch_state(torch_model)

  def _make_torch_state(self, torch_model):
    import copy

    import torch

    from tta_jax.torch_reference import methods as torch_reference

    if torch_model is None:
      torch_model = torch_reference.from_flax(
        self.variables['params'], NUM_CLASSES, DIGITS_WIDTH
      )
    else:
      with torch.no_grad():
        torch_model.fc.weight.mul_(self.head_scale)
        torch_model.fc.bias.mul_(self.head_scale)
    return copy.deepcopy(torch_model.state_dict()), torch_model

  def torch_model(self):
    """A fresh PyTorch copy of the model (the reference methods mutate it)."""
    import copy

    import torch

    state_dict, model = self._torch_state
    model = copy.deepcopy(model)
    model.load_state_dict(state_dict)
    if self.channels_last:
      model = model.to(memory_format=torch.channels_last)
    return model

  def nchw(self, images):
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    if self.channels_last:
      x = x.contiguous(memory_format=torch.channels_last)
    return x


# ------------------------------------------------------------------ methods


def _method_config(name, all_configs):
  """(registered factory name, config dict, notes) for `name`."""
  from tta_jax import methods

  notes = []
  if name in all_configs:
    config = all_configs[name].to_dict()
    factory = config.pop('method', name)
  elif name in methods.METHODS:
    factory, config = name, {}
    if 'optimizer' in inspect.signature(methods.METHODS[name]).parameters:
      config['optimizer'] = dict(_FALLBACK_OPTIMIZER)
    notes.append(
      'no method_configs entry: factory defaults'
      + (', Adam 1e-3' if 'optimizer' in config else '')
    )
  else:
    raise ValueError(
      f'unknown method {name!r}; valid: {sorted(methods.METHODS)} and '
      f'method_configs variants {sorted(all_configs)}'
    )
  for key, value in _MEMORY_SETTINGS.get(factory, {}).items():
    params = inspect.signature(methods.METHODS[factory]).parameters
    if key in params and key not in config:
      config[key] = value
      notes.append(f'{key}={value} (memory bound only)')
  return factory, config, notes


def _random_meta(factory, adapter, setup, state, rng):
  """Random meta-parameters from the method module's `init_meta`, or None.

  `init_meta` is called with those of these keyword arguments its signature
  names: `variables`, `rng`, `apply_fn`, `adapter`, `state`, `input_shape`,
  `num_classes`, `images` (an example batch).
  """
  from tta_jax import methods

  module = sys.modules[methods.METHODS[factory].__module__]
  init_meta = getattr(module, 'init_meta', None)
  if init_meta is None:
    return None, False
  available = {
    'variables': setup.variables,
    'rng': rng,
    'apply_fn': setup.apply_fn,
    'adapter': adapter,
    'state': state,
    'input_shape': setup.shape,
    'num_classes': NUM_CLASSES,
    'images': setup.images,
  }
  wanted = inspect.signature(init_meta).parameters
  return init_meta(**{k: v for k, v in available.items() if k in wanted}), True


def build_adapter(name, setup, all_configs):
  """`(factory name, adapter, notes)` of `name` on `setup`'s model."""
  from tta_jax import methods

  factory, config, notes = _method_config(name, all_configs)
  adapter = methods.from_config(
    factory,
    config,
    setup.apply_fn,
    source_images=setup.source_images,
    input_shape=setup.shape,
    num_classes=NUM_CLASSES,
  )
  return factory, adapter, notes


def _jax_timers(name, setup, all_configs, args, batch_size):
  """Compiles `name` on `setup`.

  Returns:
    `(result, timers)`: compile time and XLA FLOPs, and a `_Timer` for the
    step (plus one for the batch-sharded step when there are several
    devices); or a dict with a `skipped` reason for a method that cannot
    run without meta-parameters and has no way to build random ones.
  """
  import jax
  import numpy as np

  from tta_jax import trainers

  factory, adapter, notes = build_adapter(name, setup, all_configs)
  rng = jax.random.key(args.seed + 1)
  try:
    state = adapter.init(setup.variables, rng)
  except ValueError as e:  # TPT adapts a prompt context these models lack
    if 'selects no parameters' not in str(e):
      raise
    return {
      'skipped': 'adapts parameters this model lacks (a vision-language '
      'prompt context: see benchmarks/vlm_speed.py)',
      'notes': notes,
    }
  batch = {'image': setup.images[:batch_size]}

  meta, has_init_meta = _random_meta(
    factory, adapter, setup, state, jax.random.key(args.seed + 2)
  )
  if has_init_meta:
    notes.append('random meta from init_meta')
  fn = lambda s, b, m: adapter.step(s, b, meta=m)
  result = {'notes': notes}

  def compile_step(jitted, state, batch, meta):
    t = time.perf_counter()
    compiled = jitted.lower(state, batch, meta).compile()
    return compiled, time.perf_counter() - t

  def timer(compiled, state, batch, meta):
    return _Timer(lambda carry: compiled(carry[0], batch, meta), (state, None))

  jitted = jax.jit(fn, donate_argnums=(0,))
  device_batch = jax.device_put(batch)
  device_meta = jax.device_put(meta)
  # Distinct buffers per leaf: states alias arrays (SAR's params0 is the
  # initial params), and a buffer cannot be donated twice.
  state = _copy(state)
  try:
    compiled, result['compile_s'] = compile_step(
      jitted, state, device_batch, device_meta
    )
  except Exception as e:
    learns_first = factory in trainers.TRAINERS
    if has_init_meta or not (learns_first or 'meta' in str(e).lower()):
      raise
    first_line = str(e).strip().splitlines()[0][:160]
    return {
      'skipped': f'needs meta ({type(e).__name__}: {first_line}) and its '
      'module has no init_meta(...) to build a random one',
      'notes': notes,
    }
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  result['gflop'] = (cost or {}).get('flops', float('nan')) / 1e9
  if ' while(' in compiled.as_text():
    notes.append(
      'the step loops (lax.map/scan): XLA counts a loop body once, so its '
      'GFLOP is a lower bound'
    )
  timers = {'jax': timer(compiled, state, device_batch, device_meta)}

  if jax.device_count() > 1:
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    d = jax.device_count()
    if batch_size % d:
      result['sharded_note'] = f'batch {batch_size} not divisible by {d}'
    else:
      mesh = Mesh(np.array(jax.devices()), ('data',))
      rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
      sharded = jax.jit(
        fn,
        donate_argnums=(0,),
        in_shardings=(rep, shard, rep),
        out_shardings=(rep, None),
      )
      state = jax.device_put(_copy(adapter.init(setup.variables, rng)), rep)
      sh_batch = jax.device_put(batch, shard)
      sh_meta = jax.device_put(meta, rep)
      compiled, _ = compile_step(sharded, state, sh_batch, sh_meta)
      timers['sharded'] = timer(compiled, state, sh_batch, sh_meta)
  return result, timers


def _torch_step(name, setup, config, batch_size):
  """`(step, x)`: the PyTorch reference step of `name` and its input."""
  from tta_jax.torch_reference import methods as ref

  stream = ref.Stream(
    name,
    setup.torch_model(),
    config,
    num_classes=NUM_CLASSES,
    source_images=setup.nchw(setup.source_images),
  )
  return stream.step, setup.nchw(setup.images[:batch_size])


def _torch_timer(name, setup, all_configs, batch_size):
  _, config, _ = _method_config(name, all_configs)
  step, x = _torch_step(name, setup, config, batch_size)

  def run(x):
    step(x)
    return x

  # Eager CPU ops are synchronous: nothing to block on.
  return _Timer(run, x, block=lambda _: None)


def _benchmark(name, setup, all_configs, args, batch_size, with_torch):
  """One table row: JAX (and sharded, PyTorch) timings of `name`."""
  import jax

  row = {'method': name, 'model': setup.name, 'batch': batch_size}
  result = _jax_timers(name, setup, all_configs, args, batch_size)
  if 'skipped' in result:
    return {**row, **result}
  result, timers = result
  row.update(result)
  if with_torch and name in TORCH_METHODS:
    timers['torch'] = _torch_timer(name, setup, all_configs, batch_size)
  _time_interleaved(timers, args)
  for key, timer in timers.items():
    row[f'{key}_s'], row[f'{key}_times'] = timer.median, timer.times
  row['steps_per_repeat'] = {k: t.steps_per_repeat for k, t in timers.items()}
  out = timers['jax'].carry[1]
  row['metrics'] = {k: float(v) for k, v in jax.device_get(out.metrics).items()}
  return row


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Achieved float32 GFLOP/s of a jitted n x n matmul on this device.

  The reference for "% of peak": what this device sustains on the
  operation it runs best, measured in the same run (on a CPU or a GPU
  alike) rather than read from a data sheet.
  """
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------ report


def _fmt(x, digits=0):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return '-'
  return f'{x:,.{digits}f}'


def _peak_cell(gflops, peak):
  if math.isnan(gflops):  # no FLOP count
    return '-'
  if not peak:
    return _fmt(gflops, 1)
  return f'{gflops:,.1f} ({100 * gflops / peak:.0f}%)'


def _markdown(rows, meta):
  sharded = meta['jax_devices'] > 1
  head = ['method', 'model', 'batch', 'JAX ex/s']
  if sharded:
    head.append(f'JAX ex/s, batch over {meta["jax_devices"]} devices')
  head += [
    'PyTorch ex/s',
    'JAX / PyTorch',
    'fwd / bwd per step',
    'XLA GFLOP / step',
    'JAX GFLOP/s (% of matmul peak)',
    'compile s',
  ]
  lines = [
    f'One adaptation step, median of {meta["repeats"]} timed repeats '
    f'after warm-up ({meta["time"]}).',
    '',
    f'- JAX {meta["jax_version"]} ({meta["jax_backend"]}, '
    f'{meta["jax_devices"]} device(s)); PyTorch {meta["torch_version"]} '
    f'with torch.get_num_threads() = {meta["torch_threads"]}'
    f'{", channels_last" if meta["torch_channels_last"] else ""}'
    + (
      f', OMP_WAIT_POLICY={meta["omp_wait_policy"]}'
      if meta['omp_wait_policy']
      else ''
    )
    + f'; {meta["cpus"]} CPUs usable, load average {meta["loadavg"]}.',
    f'- {meta["machine"]}',
    '',
    '| ' + ' | '.join(head) + ' |',
    '|' + '---|' * len(head),
  ]
  notes = []
  for r in rows:
    if 'skipped' in r:
      notes.append(f'- {r["method"]} on {r["model"]}: skipped, {r["skipped"]}')
      continue
    b = r['batch']
    jax_eps = b / r['jax_s']
    torch_eps = b / r['torch_s'] if 'torch_s' in r else None
    cells = [r['method'], r['model'], str(b), _fmt(jax_eps)]
    if sharded:
      cells.append(_fmt(b / r['sharded_s']) if 'sharded_s' in r else '-')
    cells += [
      _fmt(torch_eps),
      f'{jax_eps / torch_eps:.2f}x' if torch_eps else '-',
      _PASSES.get(r['method'], '?'),
      _fmt(r['gflop'], 1),
      _peak_cell(r['gflop'] / r['jax_s'], meta.get('matmul_gflops')),
      _fmt(r['compile_s'], 1),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
    if r.get('metrics', {}).get('n_selected', 1) == 0:
      notes.append(
        f'- {r["method"]} on {r["model"]}: no sample kept in the timed '
        'steps (the batch repeats, so its samples are all redundant): the '
        'PyTorch reference then skips its backward pass, the fixed-shape '
        'JAX step computes it and discards the update.'
      )
    for note in r.get('notes', []):
      notes.append(f'- {r["method"]} on {r["model"]}: {note}')
  lines.append('')
  if meta.get('matmul_gflops'):
    lines.append(
      f'- Matmul peak: a jitted 2048 x 2048 float32 matmul ran at '
      f'{meta["matmul_gflops"]:,.0f} GFLOP/s on this device in this run.'
    )
  for m in meta['models']:
    lines.append(
      f'- {m["name"]}: head scaled x{m["head_scale"]:.3g}, so '
      f'{100 * m["pass_fraction"]:.0f}% of the batch has entropy below '
      '0.4 ln K (EATA/SAR filters).'
    )
  lines += notes
  return '\n'.join(lines) + '\n'


def main(argv=None):
  args = _parse(argv)
  set_host_devices(args.devices)
  import jax

  sys.path.insert(0, str(_ROOT))
  from configs import common
  from tta_jax import methods

  if args.omp_wait_policy:
    os.environ['OMP_WAIT_POLICY'] = args.omp_wait_policy
  with_torch = not args.no_torch
  torch = None
  if with_torch:
    try:
      import torch
    except ImportError:
      print('torch is not installed: JAX columns only')
      with_torch = False
  cpus = len(os.sched_getaffinity(0))
  if torch is not None:
    torch.set_num_threads(args.torch_threads or cpus)

  all_configs = common.method_configs()
  names = (
    list(methods.METHODS)
    if args.methods == 'all'
    else [m.strip() for m in args.methods.split(',') if m.strip()]
  )
  model_names = [m.strip() for m in args.models.split(',') if m.strip()]
  unknown = [m for m in model_names if m not in INPUT_SHAPES]
  if unknown:
    raise ValueError(f'unknown models {unknown}; valid: {sorted(INPUT_SHAPES)}')
  for name in names:  # fail on a typo before any timing
    _method_config(name, all_configs)

  meta = {
    'time': datetime.datetime.now().isoformat(timespec='seconds'),
    'argv': sys.argv,
    'jax_version': jax.__version__,
    'jax_backend': jax.default_backend(),
    'jax_devices': jax.device_count(),
    'torch_version': torch.__version__ if torch is not None else None,
    'torch_threads': torch.get_num_threads() if torch is not None else None,
    'cpus': cpus,
    'loadavg': ' '.join(f'{x:.1f}' for x in os.getloadavg()),
    'machine': f'{platform.processor() or platform.machine()}, '
    f'{platform.platform()}',
    'torch_channels_last': args.torch_channels_last,
    'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', ''),
    'repeats': args.repeats,
    'models': [],
    'matmul_gflops': matmul_peak_gflops(),
  }
  print(
    f'JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} '
    f'device(s); torch threads {meta["torch_threads"]}; load '
    f'{meta["loadavg"]}',
    flush=True,
  )
  if os.getloadavg()[0] > 0.5 * cpus:
    print(
      f'WARNING: load average {meta["loadavg"]} on {cpus} CPUs: timings '
      'are noisy, and OpenMP threads that spin (PyTorch, unless '
      '--omp_wait_policy=PASSIVE) slow down far more than the rest.',
      flush=True,
    )
  rows = []
  for model in model_names:
    b = _quick_batch(args, model)
    setup = ModelSetup(
      model, b, args.seed, with_torch, args.torch_channels_last
    )
    meta['models'].append(
      {
        'name': model,
        'head_scale': setup.head_scale,
        'pass_fraction': setup.pass_fraction,
      }
    )
    for name in names:
      t = time.perf_counter()
      row = _benchmark(name, setup, all_configs, args, b, with_torch)
      rows.append(row)
      if 'skipped' in row:
        print(f'{model} {name}: skipped, {row["skipped"]}', flush=True)
        continue
      line = f'{model} {name}: JAX {b / row["jax_s"]:,.0f} ex/s'
      if 'sharded_s' in row:
        line += f', sharded {b / row["sharded_s"]:,.0f} ex/s'
      if 'torch_s' in row:
        line += (
          f', PyTorch {b / row["torch_s"]:,.0f} ex/s '
          f'(ratio {row["torch_s"] / row["jax_s"]:.2f}x)'
        )
      print(f'{line} [{time.perf_counter() - t:.0f} s]', flush=True)

  table = _markdown(rows, meta)
  print('\n' + table)
  if args.out:
    md, js = out_paths(args.out)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    js.write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    print(f'wrote {md} and {js}')


if __name__ == '__main__':
  main()
