r"""Where an adaptation step's time goes, in JAX and in PyTorch, side by side.

Profiles the jitted step of each method (`jax.profiler`, per XLA operation)
and its PyTorch reference (`torch.profiler`, per ATen operation) on the same
weights and batch as `benchmarks/step_speed.py`, and sorts every operation's
time into the same categories on both sides:

  conv forward, conv input-grad, conv weight-grad, BN (forward and
  backward), max-pool (forward and backward), other model and loss ops
  (ReLU, head, entropy, the method's filters), optimizer, and
  host / dispatch / idle (the step's wall time minus its operations' time).

  python benchmarks/step_profile.py --models=digits_cnn \
      --methods=tent,eata,sar --omp_wait_policy=PASSIVE --out=/tmp/profile

How operations are attributed. JAX: each executed XLA operation (a fusion,
convolution, ...) is classified by the source location XLA keeps in its
metadata (`jvp(...)` is the forward pass, `transpose(jvp(...))` the
backward; the BN layers' names; the `optimizer` name scope of
`tta_jax._src.grad_step.update`); a fusion counts for the operation at its
root, so e.g. a ReLU fused into a BN normalisation counts as BN. A
convolution in the backward pass whose output has a kernel's shape is a
weight gradient. Some operations (XLA's Eigen convolutions) finish after
their trace event ends; the time until the next operation starts is
charged to them (`attribute_xla`). PyTorch: each ATen operation's self
time goes to the nearest enclosing convolution / BN / pooling operation
or autograd node, or to the optimizer when it runs inside
`Optimizer.step`; the rest of the step (Python, dispatch, waiting) is the
host row. Profiling costs time itself: the categories add up to the
profiled step's wall time, and the wall row is measured without the
profiler.

Absolute numbers depend on the machine and its load; compare columns taken
in one run. This is a script, not a test: nothing here asserts on time.
"""

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_speed  # noqa: E402  (benchmarks/step_speed.py)

CATEGORIES = (
  'conv forward',
  'conv input-grad',
  'conv weight-grad',
  'BN',
  'max-pool',
  'other model and loss ops',
  'optimizer',
  'host / dispatch / idle',
)


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='digits_cnn')
  p.add_argument('--methods', default='tent,eata,sar')
  p.add_argument('--batch_size', type=int, default=200)
  p.add_argument('--steps', type=int, default=20, help='profiled steps')
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--omp_wait_policy', default='')
  p.add_argument('--torch_threads', type=int, default=0)
  p.add_argument('--no_torch', action='store_true')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='', help='writes OUT.md and OUT.json')
  return p.parse_args(argv)


# ---------------------------------------------------------------- JAX side

_SHAPE = re.compile(r'= \(?[a-z0-9]+\[([0-9,]*)\]')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_BN = re.compile(r'(^|/)(bn|norm|batch_?norm)[^/]*/', re.IGNORECASE)


def _instructions(hlo_text: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Instruction name -> (metadata op_name, output shape)."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = ', line)
    if not m:
      continue
    op = _OP_NAME.search(line)
    shape = _SHAPE.search(line)
    dims = ()
    if shape and shape.group(1):
      dims = tuple(int(d) for d in shape.group(1).split(','))
    out[m.group(1)] = (op.group(1) if op else '', dims)
  return out


def classify_xla(op_name: str, shape, kernel_shapes) -> str:
  """The category of an XLA operation from its metadata (see module doc)."""
  if '/optimizer/' in op_name or op_name.endswith('/optimizer'):
    return 'optimizer'
  backward = 'transpose(' in op_name
  if 'conv_general_dilated' in op_name:
    if not backward:
      return 'conv forward'
    if tuple(shape) in kernel_shapes:
      return 'conv weight-grad'
    return 'conv input-grad'
  if 'max_pool' in op_name or 'reduce_window' in op_name:
    return 'max-pool'
  if 'select_and_' in op_name:
    return 'max-pool'
  if _BN.search(op_name):
    return 'BN'
  return 'other model and loss ops'


def _trace_events(directory: str):
  (path,) = glob.glob(f'{directory}/**/*perfetto_trace.json.gz', recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def profile_jax(name, setup, all_configs, args):
  """`({category: ms per step}, wall ms per step, ops per step)` of JAX."""
  import jax
  import numpy as np
  from flax import traverse_util

  _, adapter, _ = step_speed.build_adapter(name, setup, all_configs)
  state = step_speed._copy(adapter.init(setup.variables, jax.random.key(1)))
  batch = jax.device_put({'image': setup.images[: args.batch_size]})
  step = jax.jit(adapter.step, donate_argnums=(0,))
  compiled = step.lower(state, batch).compile()
  instructions = _instructions(compiled.as_text())
  kernel_shapes = {
    tuple(np.shape(v))
    for k, v in traverse_util.flatten_dict(setup.variables['params']).items()
    if k[-1] == 'kernel' and np.ndim(v) == 4
  }

  def run(n):
    nonlocal state
    t = time.perf_counter()
    for _ in range(n):
      state, out = compiled(state, batch)
    jax.block_until_ready((state, out))
    return time.perf_counter() - t

  run(args.warmup)
  wall = min(run(args.steps) for _ in range(3)) / args.steps
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      profiled = run(args.steps) / args.steps
    events = _trace_events(directory)
  ops = sorted(
    (e['ts'], e['ts'] + e['dur'], e['name'])
    for e in events
    if e.get('ph') == 'X' and e['name'] in instructions
  )
  ms = collections.Counter({c: 0.0 for c in CATEGORIES})
  seen = set()
  for category, us in attribute_xla(ops, instructions, kernel_shapes):
    ms[category] += us / 1e3
    seen.add(category)
  per_step = _per_step(ms, args.steps, profiled)
  for category in set(CATEGORIES) - seen - {'host / dispatch / idle'}:
    per_step[category] = None  # no operation of its own (fused, or none)
  return per_step, 1e3 * wall, len(ops) / args.steps


def attribute_xla(ops, instructions, kernel_shapes):
  """`(category, microseconds)` per executed XLA operation.

  `ops` are `(start, end, name)` in start order, microseconds. XLA's CPU
  runtime runs a step's operations one after another, but some (Eigen
  convolutions) return before their work is done, so their trace event
  covers the launch only and the work shows as a gap before the next
  operation: each gap inside a step is charged to the operation before it.
  A gap before the program's first operation lies between two steps (the
  host's dispatch) and is left to the host row.
  """
  if not ops:
    return []
  first = ops[0][2]
  out = []
  for i, (start, end, name) in enumerate(ops):
    op_name, shape = instructions[name]
    us = end - start
    if i + 1 < len(ops) and ops[i + 1][2] != first:
      us += max(ops[i + 1][0] - end, 0)
    out.append((classify_xla(op_name, shape, kernel_shapes), us))
  return out


def _per_step(ms, steps, profiled_wall):
  """ms per step by category; the rest of the profiled wall time is host."""
  per_step = {c: v / steps for c, v in ms.items()}
  per_step['host / dispatch / idle'] = 1e3 * profiled_wall - sum(
    per_step.values()
  )
  return per_step


# ------------------------------------------------------------ PyTorch side

# (pattern in an ATen op or autograd node name, category); first match wins.
_TORCH_RULES = (
  ('convolution_backward', 'conv input-grad'),
  ('ConvolutionBackward', 'conv input-grad'),
  ('convolution', 'conv forward'),
  ('conv2d', 'conv forward'),
  ('batch_norm', 'BN'),
  ('BatchNorm', 'BN'),
  ('max_pool', 'max-pool'),
  ('MaxPool', 'max-pool'),
)


def classify_torch(chain: list[str]) -> str:
  """The category of a PyTorch op from its name and its ancestors' names."""
  if any(n.startswith('Optimizer.') for n in chain):
    return 'optimizer'
  for n in chain:
    for pattern, category in _TORCH_RULES:
      if pattern in n:
        return category
  return 'other model and loss ops'


def profile_torch(name, setup, all_configs, args):
  """`({category: ms per step}, wall ms per step, ops per step)` of PyTorch."""
  import torch
  from torch.profiler import ProfilerActivity, profile

  _, config, _ = step_speed._method_config(name, all_configs)
  step, x = step_speed._torch_step(name, setup, config, args.batch_size)

  def run(n):
    t = time.perf_counter()
    for _ in range(n):
      step(x)
    return time.perf_counter() - t

  run(args.warmup)
  wall = min(run(args.steps) for _ in range(3)) / args.steps
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    profiled = run(args.steps) / args.steps
  ms = collections.Counter({c: 0.0 for c in CATEGORIES})
  count, seen = 0, set()
  for e in prof.events():
    chain, p = [e.name], e.cpu_parent
    while p is not None:
      chain.append(p.name)
      p = p.cpu_parent
    category = classify_torch(chain)
    ms[category] += e.self_cpu_time_total / 1e3
    seen.add(category)
    count += e.name.startswith('aten::') and not (e.cpu_children or [])
  del torch
  per_step = _per_step(ms, args.steps, profiled)
  for category in set(CATEGORIES) - seen - {'host / dispatch / idle'}:
    per_step[category] = None  # no operation of its own
  return per_step, 1e3 * wall, count / args.steps


# ------------------------------------------------------------------ report


def _table(rows) -> str:
  header = ['category']
  for r in rows:
    header += [f'{r["method"]} JAX', f'{r["method"]} PyTorch']
  lines = [
    '| ' + ' | '.join(header) + ' |',
    '|' + '---|' * len(header),
  ]
  fmt = lambda v: '-' if v is None else f'{v:.1f}'
  for c in (*CATEGORIES, 'wall per step', 'operations per step'):
    key = {'wall per step': 'wall', 'operations per step': 'ops'}.get(c)
    cells = [c]
    for r in rows:
      for side in ('jax', 'torch'):
        d = r.get(side)
        if d is None:
          cells.append('-')
        elif key == 'ops':
          cells.append(f'{d["ops"]:.0f}')
        else:
          cells.append(fmt(d['wall'] if key else d['ms'][c]))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  args = _parse(argv)
  if args.omp_wait_policy:
    os.environ['OMP_WAIT_POLICY'] = args.omp_wait_policy
  import jax

  sys.path.insert(0, str(step_speed._ROOT))
  from configs import common

  with_torch = not args.no_torch
  if with_torch:
    import torch

    torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
  all_configs = common.method_configs()
  report = []
  for model in args.models.split(','):
    setup = step_speed.ModelSetup(model, args.batch_size, args.seed, with_torch)
    rows = []
    for name in args.methods.split(','):
      row = {'method': name, 'model': model, 'batch': args.batch_size}
      ms, wall, ops = profile_jax(name, setup, all_configs, args)
      row['jax'] = {'ms': ms, 'wall': wall, 'ops': ops}
      if with_torch and name in step_speed.TORCH_METHODS:
        ms, wall, ops = profile_torch(name, setup, all_configs, args)
        row['torch'] = {'ms': ms, 'wall': wall, 'ops': ops}
      rows.append(row)
      print(f'{model} {name}: profiled', flush=True)
    report.append((model, rows))

  load = ', '.join(f'{v:.1f}' for v in os.getloadavg())
  lines = [
    f'# Step profile ({datetime.date.today()})',
    '',
    f'- JAX {jax.__version__} ({jax.devices()[0].platform}); '
    + (f'PyTorch {torch.__version__}, ' if with_torch else '')
    + f'{len(os.sched_getaffinity(0))} CPUs, load average {load}; '
    f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "")}',
    f'- ms per step, batch {args.batch_size}, {args.steps} profiled steps.',
  ]
  for model, rows in report:
    lines += ['', f'## {model}', '', _table(rows)]
  lines += [
    '',
    '`-`: no operation of its own in that step: XLA fused it into '
    'neighbouring operations (whose row counts it), or the step runs none '
    '(conv weight-grad, when only BN affine parameters adapt).',
  ]
  text = '\n'.join(lines)
  print(text)
  if args.out:
    md, js = step_speed.out_paths(args.out)
    md.write_text(text + '\n')
    js.write_text(json.dumps([r for _, rows in report for r in rows], indent=1))
    print(f'wrote {md} and {js}')


if __name__ == '__main__':
  main()
