r"""The whole embedded benchmark, the PyTorch way and this library's way.

Runs Tent, EATA and SAR over the default benchmark stream
(`configs/default.py`: the digits CNN, 15 corruptions of the MNIST test
digits and the UCI digits, batch 64) in the continual and reset-each-shift
settings, twice, on the same source weights and the same batches in the
same order:

- PyTorch, as the PyTorch TTA benchmarks run it: one stream per process, a
  Python loop over the batches, each one step of the reference method
  (`tta_jax.torch_reference.methods.Stream`, re-implementations of the
  official code; model in train mode, BN on batch statistics), predictions
  taken to the host per batch; in reset-each-shift, the official `reset()`
  (model and optimizer states reloaded) before every domain.
- JAX, as this library's runner runs it (`tta_jax.runners.streams`): the
  method compiled once, state donated, no host sync per batch. Modes:
  `stream` (`run_streams`, one stream); in reset-each-shift also
  `domains` (`run_per_domain_parallel`: the domains as one vmapped
  program, `config.parallel='domains'`); where JAX sees several devices
  (GPUs, or on a CPU `--devices N` host devices, XLA's host-platform
  device count), each of them again with every batch sharded over the
  devices (`+shard`, `config.shard_batch`).

It checks that the errors agree domain by domain (`--tolerance`; a
disagreement beyond it exits with status 1), and prints a markdown table:
wall seconds of each side, the best JAX mode and the ratio PyTorch / JAX
(> 1: JAX is faster).

  python benchmarks/end_to_end.py --out=runs/end_to_end
  python benchmarks/end_to_end.py --quick          # ~1 minute, a smoke run
  python benchmarks/end_to_end.py --devices=2 --omp_wait_policy=PASSIVE
  python benchmarks/end_to_end.py --config=configs/default.py \
      --config.data.max_examples_per_domain=200

Wall time is the stream's, from the method's construction (EATA's Fisher
included) to the last prediction on the host; JAX's compile time is kept
out of it and shown on its own. The source model is the one the config
trains (`runners.pretrain.ensure_source`): trained into `WORKDIR/source`
on the first run and reused afterwards, as `experiments.adapt_main` does;
`--config.source_ckpt` points at another. On a GPU, JAX runs there;
`--torch_device=cuda` puts PyTorch there too.

On a CPU, the `+shard` modes run XLA's in-process all-reduce between host
devices; on 2 heavily loaded cores one such run stalled until XLA's
rendezvous timeout aborted the process (another run of the same command
went through), so the headline numbers leave them out.

Absolute numbers depend on the machine and its load (recorded with the
table); this is a script, not a test: nothing here asserts on time.
"""

import argparse
import ast
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / 'benchmarks'))

import step_speed  # noqa: E402  (benchmarks/step_speed.py)

# Per domain, |JAX error - PyTorch error| in percentage points: 0.5 is 5
# of a corrupted domain's 1,000 examples. The two sides reduce in
# different orders in float32 (XLA's and PyTorch's kernels), so logits
# differ by ~1e-5 after the first step and the adapted parameters drift
# apart slowly along a stream; a prediction that is a near tie can flip,
# and an entropy filter (EATA, SAR) can keep or drop a borderline example.
# A few such flips per domain are float32 noise; a wrong update (a missed
# reset, another optimizer, a filter off, batches in another order) moves
# errors further.
DEFAULT_TOLERANCE = 0.5


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
    '--config',
    default=str(_ROOT / 'configs' / 'default.py'),
    help='a get_config file[:argument]; override keys with '
    '--config.KEY=VALUE (e.g. --config.data.max_examples_per_domain=200)',
  )
  p.add_argument(
    '--workdir',
    default='',
    help='holds (or receives) the source model in WORKDIR/source; default: '
    "runs/default (runs/default_small with --quick), adapt_main's workdir",
  )
  p.add_argument('--methods', default='tent,eata,sar')
  p.add_argument('--settings', default='continual,reset_each_shift')
  p.add_argument(
    '--devices',
    type=int,
    default=0,
    help='host devices (CPU; 0 leaves XLA_FLAGS alone); with several '
    'devices the batch-sharded modes run too',
  )
  p.add_argument(
    '--no_shard',
    action='store_true',
    help='no +shard modes even where JAX sees several devices',
  )
  p.add_argument('--torch_device', default='cpu', help="'cpu' or 'cuda'")
  p.add_argument(
    '--torch_threads',
    type=int,
    default=0,
    help='torch.set_num_threads; 0: the CPUs this process may use',
  )
  p.add_argument(
    '--omp_wait_policy',
    default='',
    help="sets OMP_WAIT_POLICY before torch loads; 'PASSIVE' keeps "
    "PyTorch's OpenMP threads from spinning on a loaded machine",
  )
  p.add_argument(
    '--repeats',
    type=int,
    default=1,
    help='timed runs of every side (in turn); the median is reported',
  )
  p.add_argument(
    '--tolerance',
    type=float,
    default=DEFAULT_TOLERANCE,
    help='largest |JAX - PyTorch| error per domain, percentage points',
  )
  p.add_argument('--out', default='', help='writes OUT.md and OUT.json')
  p.add_argument(
    '--quick',
    action='store_true',
    help='smoke run (~1 min): configs/default.py:small (a width-8 CNN, '
    '3 corruptions + UCI, 100 examples each, batch 32)',
  )
  args, rest = p.parse_known_args(argv)
  args.overrides = []
  for arg in rest:
    key, eq, value = arg.partition('=')
    if not (key.startswith('--config.') and eq):
      p.error(f'unrecognized argument {arg!r}')
    args.overrides.append((key[len('--config.') :], value))
  if args.repeats < 1:
    p.error('--repeats must be >= 1')
  if args.quick and args.config == p.get_default('config'):
    args.config += ':small'
  if not args.workdir:
    args.workdir = str(
      _ROOT / 'runs' / ('default_small' if args.quick else 'default')
    )
  return args


def _load_config(args):
  from ml_collections.config_flags import config_flags

  config = config_flags.ConfigFileFlagParser(name='config').parse(args.config)
  for key, text in args.overrides:
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(f'unknown config key {key!r}')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string
    node[leaf] = value
  if config.model.name != 'digits_cnn':
    raise ValueError(
      'the PyTorch side has the digits CNN only (tta_jax.torch_reference.'
      f'methods.DigitsNet); config.model.name is {config.model.name!r}'
    )
  return config


# ------------------------------------------------------------------ setup


class Setup:
  """The benchmark, the source model (trained if missing), the plans."""

  def __init__(self, config, workdir):
    import jax

    from tta_jax.data import benchmarks
    from tta_jax.runners import adapt, artifacts, pretrain

    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.benchmark = benchmarks.build(config.data, 'continual')
    self.domains = self.benchmark.domains
    module, self.apply_fn = artifacts.build_model(config.model, self.benchmark)
    self.variables, self.source_meta = pretrain.ensure_source(
      config, self.workdir, self.benchmark, module
    )
    self.variables = jax.device_get(self.variables)
    self.context = adapt.source_context(config, self.benchmark)
    self.context['input_shape'] = tuple(self.benchmark.input_shape)
    self.context['num_classes'] = self.benchmark.num_classes
    # As `runners.adapt.run_method`: the methods' base key.
    self.rng = jax.random.fold_in(jax.random.key(config.seed), 0)

  def plan(self, setting):
    from tta_jax.data import streams

    seed = int(str(self.config.seeds).split(',')[0])
    return streams.plan(
      setting,
      self.domains,
      seed=seed,
      batch_size=self.config.batch_size,
      dirichlet_delta=self.config.dirichlet_delta,
    )

  def adapter(self, name):
    from tta_jax.runners import adapt

    adapter, variables, meta = adapt.build_adapter(
      self.config,
      name,
      self.apply_fn,
      self.variables,
      self.benchmark,
      self.context,
      self.workdir,
    )
    if meta is not None:
      raise ValueError(f'{name}: methods with meta-parameters are not timed')
    return adapter, variables


def _per_domain_errors(correct, domain, valid, num_domains):
  """Error (%) of every domain from per-example records."""
  correct, domain = correct[valid], domain[valid]
  return [
    float(100 * (1 - correct[domain == d].mean())) for d in range(num_domains)
  ]


# ------------------------------------------------------------------ PyTorch


def warm_up_torch(setup, name, device, torch_model, steps=3):
  """Untimed steps on a throwaway model: PyTorch's one-time setup (kernel
  selection, allocator, thread pool) stays out of the timings, as JAX's
  compile does."""
  import numpy as np
  import torch

  from tta_jax.torch_reference import methods as ref

  config = setup.config.method_configs[name].to_dict()
  factory = config.pop('method', name)
  n = min(setup.config.batch_size, len(setup.domains[0]))
  images = setup.domains[0].source[np.arange(n)]
  x = torch.from_numpy(
    np.ascontiguousarray(images['image'].transpose(0, 3, 1, 2))
  ).to(device)
  stream = ref.Stream(
    factory,
    torch_model(),
    config,
    num_classes=setup.benchmark.num_classes,
    source_images=x if factory == 'eata' else None,
  )
  for _ in range(steps):
    stream.step(x).argmax(1).cpu()
  stream.reset()


def run_torch(setup, name, setting, device, torch_model):
  """One stream the PyTorch way: `(seconds, per-domain errors)`."""
  import numpy as np
  import torch

  from tta_jax.data import streams
  from tta_jax.torch_reference import methods as ref

  config = setup.config.method_configs[name].to_dict()
  factory = config.pop('method', name)
  plan = setup.plan(setting)
  positions = streams.batch_positions(plan)
  b = plan.batch_size
  nchw = lambda x: torch.from_numpy(
    np.ascontiguousarray(x.transpose(0, 3, 1, 2))
  ).to(device)
  source = setup.context.get('source_images')
  model = torch_model()
  correct = np.zeros((len(positions), b), bool)
  domain = np.zeros((len(positions), b), np.int64)
  valid = np.zeros((len(positions), b), bool)
  sync = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
  sync()
  t = time.perf_counter()
  stream = ref.Stream(
    factory,
    model,
    config,
    num_classes=setup.benchmark.num_classes,
    source_images=None if source is None else nchw(source),
  )
  for i, (reset, dom, idx, n) in enumerate(positions):
    if reset and i:
      stream.reset()
    batch = streams.read_batch(setup.domains, dom, idx, b)
    logits = stream.step(nchw(batch['image'][:n]))
    pred = logits.argmax(1).cpu().numpy()
    correct[i, :n] = pred == batch['label'][:n]
    domain[i, :n], valid[i, :n] = dom, True
  sync()
  seconds = time.perf_counter() - t
  errors = _per_domain_errors(correct, domain, valid, len(setup.domains))
  return seconds, errors


# ------------------------------------------------------------------ JAX


def jax_modes(setting, shard):
  modes = ['stream']
  if setting == 'reset_each_shift':
    modes.append('domains')
  if shard:
    modes += [f'{m}+shard' for m in modes]
  return modes


def run_jax(setup, adapter, variables, setting, mode):
  """One stream the library's way: `(seconds, compile seconds, errors)`."""
  import jax

  from tta_jax.runners import streams as stream_lib

  plan = setup.plan(setting)
  kwargs = dict(
    meta=None,
    shard_batch=mode.endswith('+shard'),
    checkpoint_every=0,
    log_every=0,
    nonfinite=setup.config.nonfinite,
    progress=None,
  )
  t = time.perf_counter()
  if mode.startswith('domains'):
    with tempfile.TemporaryDirectory() as directory:  # no checkpoints
      res = stream_lib.run_per_domain_parallel(
        adapter,
        variables,
        plan,
        setup.domains,
        setup.rng,
        kwargs,
        pathlib.Path(directory),
        mode,
      )
  else:
    res = stream_lib.run_streams(
      adapter,
      variables,
      [plan],
      setup.domains,
      rngs=[setup.rng],
      name=mode,
      **kwargs,
    )
  jax.block_until_ready(res.final_state)
  seconds = time.perf_counter() - t - res.compile_seconds
  errors = _per_domain_errors(
    res.correct, res.domain, res.valid, len(setup.domains)
  )
  return seconds, res.compile_seconds, errors


# ------------------------------------------------------------------ rows


def benchmark_row(setup, name, setting, args, device, torch_model):
  """Times both sides `args.repeats` times (in turn); one table row."""
  import jax

  adapter, variables = setup.adapter(name)
  # Untimed: compiles what `init` jits (EATA's Fisher pass) once, so that
  # only the stream's compile is left to subtract.
  jax.block_until_ready(adapter.init(variables, setup.rng))
  modes = jax_modes(setting, args.shard)
  warm_up_torch(setup, name, device, torch_model)
  times = {'torch': [], **{m: [] for m in modes}}
  compile_s, errors = {}, {}
  for r in range(args.repeats):
    s, err = run_torch(setup, name, setting, device, torch_model)
    times['torch'].append(s)
    errors.setdefault('torch', err)
    if err != errors['torch']:
      raise RuntimeError(f'{name} {setting}: PyTorch run {r} changed errors')
    for mode in modes:
      s, c, err = run_jax(setup, adapter, variables, setting, mode)
      times[mode].append(s)
      compile_s.setdefault(mode, c)
      errors.setdefault(mode, err)
      if err != errors[mode]:
        raise RuntimeError(
          f'{name} {setting} {mode}: run {r} gave other errors'
        )
  wall = {k: statistics.median(v) for k, v in times.items()}
  best = min(modes, key=lambda m: wall[m])
  # Rounded: errors are ratios of counts; 1e-9 pp is float noise.
  diffs = {
    m: round(
      max(abs(a - b) for a, b in zip(errors[m], errors['torch'], strict=True)),
      9,
    )
    for m in modes
  }
  mean = lambda e: sum(e) / len(e)
  return {
    'method': name,
    'setting': setting,
    'modes': modes,
    'wall_s': wall,
    'times_s': times,
    'compile_s': compile_s,
    'best': best,
    'ratio': wall['torch'] / wall[best],
    'errors': errors,
    'mean_error': {k: mean(v) for k, v in errors.items()},
    'max_abs_diff': diffs,
    'max_abs_diff_all': max(diffs.values()),
  }


# ------------------------------------------------------------------ report


def _markdown(rows, meta):
  modes = []
  for r in rows:
    modes += [m for m in r['modes'] if m not in modes]
  head = ['method', 'setting', 'PyTorch s']
  head += [f'JAX {m} s' for m in modes]
  head += [
    'best JAX',
    'PyTorch / JAX',
    'error PyTorch %',
    'error JAX %',
    'max abs diff (pp)',
    'JAX compile s',
  ]
  lines = [
    f'The embedded benchmark end to end ({meta["time"]}): '
    f'{meta["num_domains"]} domains, {meta["num_examples"]:,} examples per '
    f'stream, batch {meta["batch_size"]}; wall seconds per stream (median '
    f'of {meta["repeats"]}), JAX compile excluded.',
    '',
    f'- JAX {meta["jax_version"]} on {meta["jax_devices"]} '
    f'{meta["jax_device_kind"]} device(s); PyTorch {meta["torch_version"]} '
    f'on {meta["torch_device"]} with torch.get_num_threads() = '
    f'{meta["torch_threads"]}'
    + (
      f', OMP_WAIT_POLICY={meta["omp_wait_policy"]}'
      if meta['omp_wait_policy']
      else ''
    )
    + f'; {meta["cpus"]} CPUs usable, load average {meta["loadavg"]} '
    f'before and {meta["loadavg_after"]} after.',
    f'- {meta["machine"]}',
    f'- Source model: clean test error '
    f'{meta["source_clean_test_error"]:.2f}%; errors are means over the '
    f'domains; max abs diff: the largest per-domain |JAX - PyTorch| '
    f'over the JAX modes (tolerance {meta["tolerance"]} pp).',
    '',
    '| ' + ' | '.join(head) + ' |',
    '|' + '---|' * len(head),
  ]
  for r in rows:
    wall = r['wall_s']
    cells = [r['method'], r['setting'], f'{wall["torch"]:.1f}']
    cells += [f'{wall[m]:.1f}' if m in wall else '-' for m in modes]
    best = r['best']
    cells += [
      best,
      f'{r["ratio"]:.2f}x',
      f'{r["mean_error"]["torch"]:.2f}',
      f'{r["mean_error"][best]:.2f}',
      f'{r["max_abs_diff_all"]:.2f}',
      ' / '.join(f'{r["compile_s"][m]:.1f}' for m in r['modes']),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  torch_total = sum(r['wall_s']['torch'] for r in rows)
  jax_total = sum(r['wall_s'][r['best']] for r in rows)
  lines += [
    '',
    f'Total: PyTorch {torch_total:.1f} s, JAX (best mode per row) '
    f'{jax_total:.1f} s: {torch_total / jax_total:.2f}x.',
  ]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  args = _parse(argv)
  step_speed.set_host_devices(args.devices)
  if args.omp_wait_policy:
    os.environ['OMP_WAIT_POLICY'] = args.omp_wait_policy
  import jax

  sys.path.insert(0, str(_ROOT))
  try:
    import torch
  except ImportError:
    from tta_jax import torch_reference

    sys.exit(f'error: {torch_reference.INSTALL_HINT}')
  from tta_jax.torch_reference import methods as ref

  args.shard = jax.device_count() > 1 and not args.no_shard
  cpus = len(os.sched_getaffinity(0))
  torch.set_num_threads(args.torch_threads or cpus)
  device = torch.device(args.torch_device)

  config = _load_config(args)
  methods_ = [m.strip() for m in args.methods.split(',') if m.strip()]
  settings = [s.strip() for s in args.settings.split(',') if s.strip()]
  for name in methods_:
    if name not in config.method_configs:
      raise ValueError(f'unknown method {name!r}')
    factory = config.method_configs[name].get('method', name)
    if factory not in ref.STREAM_METHODS:
      raise ValueError(
        f'{name}: no PyTorch reference; valid: {ref.STREAM_METHODS}'
      )
  for setting in settings:
    if setting not in ('continual', 'reset_each_shift'):
      raise ValueError(
        f'unknown setting {setting!r}; valid: continual, reset_each_shift'
      )

  loadavg = lambda: ' '.join(f'{x:.1f}' for x in os.getloadavg())
  t0 = time.perf_counter()
  setup = Setup(config, args.workdir)
  print(
    f'Source model ready ({time.perf_counter() - t0:.0f} s, '
    f'{args.workdir}); JAX {jax.__version__} on {jax.device_count()} '
    f'{jax.devices()[0].device_kind} device(s); torch threads '
    f'{torch.get_num_threads()}; load {loadavg()}',
    flush=True,
  )
  width = config.model.width
  num_classes = setup.benchmark.num_classes
  source_net = ref.from_flax(setup.variables['params'], num_classes, width)

  def torch_model():
    import copy

    return copy.deepcopy(source_net).to(device)

  meta = {
    'time': datetime.datetime.now().isoformat(timespec='seconds'),
    'argv': sys.argv if argv is None else argv,
    'config': args.config,
    'overrides': args.overrides,
    'jax_version': jax.__version__,
    'jax_backend': jax.default_backend(),
    'jax_devices': jax.device_count(),
    'jax_device_kind': jax.devices()[0].device_kind,
    'torch_version': torch.__version__,
    'torch_threads': torch.get_num_threads(),
    'torch_device': str(device),
    'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', ''),
    'cpus': cpus,
    'loadavg': loadavg(),
    'machine': f'{platform.processor() or platform.machine()}, '
    f'{platform.platform()}',
    'repeats': args.repeats,
    'tolerance': args.tolerance,
    'num_domains': len(setup.domains),
    'domains': [d.name for d in setup.domains],
    'num_examples': sum(len(d) for d in setup.domains),
    'batch_size': config.batch_size,
    'source_clean_test_error': 100
    * setup.source_meta.get('clean_test_error', float('nan')),
  }
  rows = []
  for setting in settings:
    for name in methods_:
      t = time.perf_counter()
      row = benchmark_row(setup, name, setting, args, device, torch_model)
      rows.append(row)
      wall = row['wall_s']
      print(
        f'{name} {setting}: PyTorch {wall["torch"]:.1f} s, '
        + ', '.join(f'JAX {m} {wall[m]:.1f} s' for m in row['modes'])
        + f' (ratio {row["ratio"]:.2f}x); error PyTorch '
        f'{row["mean_error"]["torch"]:.2f}% JAX '
        f'{row["mean_error"][row["best"]]:.2f}%, max abs diff '
        f'{row["max_abs_diff_all"]:.2f} pp [{time.perf_counter() - t:.0f} s]',
        flush=True,
      )
  meta['loadavg_after'] = loadavg()
  table = _markdown(rows, meta)
  print('\n' + table)
  if args.out:
    md, js = step_speed.out_paths(args.out)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    js.write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    print(f'wrote {md} and {js}')
  bad = failures(rows, args.tolerance)
  for line in bad:
    print(f'FAIL: {line}', file=sys.stderr)
  return 1 if bad else 0


def failures(rows, tolerance):
  """A line per row whose JAX and PyTorch errors disagree beyond tolerance."""
  return [
    f'{r["method"]} {r["setting"]}: JAX ({m}) and PyTorch errors differ by '
    f'{d:.2f} pp on a domain (tolerance {tolerance} pp)'
    for r in rows
    for m, d in r['max_abs_diff'].items()
    if not d <= tolerance  # NaN fails too
  ]


if __name__ == '__main__':
  sys.exit(main())
