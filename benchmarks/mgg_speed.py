r"""MGG vs SAR vs Tent: time per batch, updates to a target error, state size.

  python -m benchmarks.mgg_speed --config=configs/mgg_digits.py \
      --workdir=$WORKDIR

after `experiments.mgg_analyses` (or meta_train_main + adapt_main) filled
WORKDIR: the source model, MGG's pre-training in WORKDIR/meta/mgg and the
error-vs-updates curves in WORKDIR/mgg_curves.json. Prints, side by side:
milliseconds per jitted `step` on one batch (median of `--repeats`, state
donated, after compilation); the number of updates each method needs before
its 3-batch mean error reaches SAR's final error on the stream (the
"fewer updates" reading of the paper's 4.2x; `mgg_curves.json`); and the
floats the optimiser state keeps per adapted coordinate (MGG: m, v and the
8x8 + 8 memory, 74; Tent's Adam: 2; SAR's: 2 + the initial copy), with the
same for ViT-B/16's 38,400 LayerNorm coordinates (from shapes alone).
"""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tta_jax import methods, models
from tta_jax._src import params as params_lib
from tta_jax.data import benchmarks
from tta_jax.methods import mgg
from tta_jax.runners import artifacts, configs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file.')
flags.DEFINE_string('workdir', None, 'A workdir MGG was evaluated in.')
flags.DEFINE_list('methods', ['tent', 'sar', 'mgg'], 'Methods compared.')
flags.DEFINE_integer('repeats', 30, 'Timed steps per method.')
flags.mark_flags_as_required(['config', 'workdir'])


def _floats(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def time_step(adapter, variables, batch, meta, repeats: int) -> float:
  """Median milliseconds of one jitted, donated step."""
  step = jax.jit(adapter.step, donate_argnums=(0,))
  # A private copy: donation must not delete the source variables.
  state = jax.tree.map(jnp.copy, adapter.init(variables, jax.random.key(0)))
  state, out = step(state, batch, meta=meta)  # compile
  jax.block_until_ready(out.logits)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, out = step(state, batch, meta=meta)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def vit_b_state_floats() -> dict[str, float]:
  """Optimiser-state floats per LayerNorm coordinate of ViT-B/16."""
  module = models.build('vit_base_patch16_224', num_classes=1000)
  shapes = jax.eval_shape(
    lambda: models.init_variables(module, (224, 224, 3), jax.random.key(0))
  )
  theta, _ = params_lib.split(
    shapes['params'], mgg.norm_affine(shapes['params'], {})
  )
  n = _floats(theta)
  opt = jax.eval_shape(lambda: mgg.mgg_optimizer(None).init(theta))
  return {'coordinates': n, 'floats_per_coordinate': _floats(opt) / n}


def main(argv):
  del argv
  config, workdir = FLAGS.config, pathlib.Path(FLAGS.workdir)
  benchmark = benchmarks.build(config.data, config.setting)
  module, apply_fn = artifacts.build_model(config.model, benchmark)
  variables, _ = artifacts.load_source(config, workdir, benchmark, module)
  domain = benchmark.domains[0]
  batch = {'image': domain.source[np.arange(config.batch_size)]['image']}
  curves = workdir / 'mgg_curves.json'
  reach = json.loads(curves.read_text()) if curves.exists() else None
  rows = []
  for name in FLAGS.methods:
    adapter = methods.from_config(
      configs.resolve(config, name, methods.METHODS),
      configs.method_kwargs(config, name),
      apply_fn,
    )
    owner = configs.artifacts_owner(config, name)
    meta = (
      artifacts.load_meta(artifacts.trained_dir(workdir, owner))
      if owner
      else None
    )
    state = adapter.init(variables, jax.random.key(0))
    mask = adapter.adapted(variables['params'], variables['batch_stats'])
    n = _floats(params_lib.split(variables['params'], mask)[0])
    extra = _floats(state.opt_state) + _floats(state.extra)
    ms = time_step(adapter, variables, batch, meta, FLAGS.repeats)
    updates = reach['updates'].get(name) if reach else None
    rows.append((name, ms, updates, extra / n, n))
  target = reach['sar_final_error'] if reach else float('nan')
  print(
    f'{config.model.name}, batch {config.batch_size}, '
    f'{jax.devices()[0].platform}; target = SAR final error '
    f'{100 * target:.2f} %'
  )
  print('| method | ms / batch | updates to target | state floats / coord |')
  print('|---|---:|---:|---:|')
  for name, ms, updates, per, n in rows:
    print(f'| {name} | {ms:.2f} | {updates} | {per:.1f} (N = {n}) |')
  vit = vit_b_state_floats()
  mb = vit['coordinates'] * vit['floats_per_coordinate'] * 4 / 2**20
  print(
    f'ViT-B/16: {vit["coordinates"]} LayerNorm coordinates, MGG state '
    f'{vit["floats_per_coordinate"]:.1f} floats each ({mb:.1f} MiB fp32)'
  )


if __name__ == '__main__':
  app.run(main)
