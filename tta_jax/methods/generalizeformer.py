"""GeneralizeFormer: meta-learned, layer-adaptive parameters per test batch.

For every test batch, one forward and one backward pass of the source model
give the batch's pooled features z and the layer-wise gradients g of the
batch-mean prediction entropy with respect to the generated parameters (BN
scale/bias and the classifier weights); a meta-learned transformer phi
(`tta_jax.models.generators.generalizeformer`) reads (theta_s, z, g) as one
token per layer row and writes theta_t = theta_s + Delta; the batch is
predicted with theta_t. Convolutions are never generated, and nothing of the
backbone is updated: by default each batch starts again from theta_s
(stateless).

phi is meta-trained by `meta_train` on the source domains only: per episode
a meta-target batch from a domain the episode's backbone was not trained on
(the meta-source), and the supervised cross-entropy of theta_t on it.

Where the official code departs from the paper (spec A.6, A.9), the paper
is followed and the code's behaviour is an option: `accumulate=True` (the
code adds Delta in place, so theta_t accumulates over the stream),
`aux_tent_huber_weight` (the code's only loss that reaches phi: a Huber
regression onto one AdamW Tent step), `split_generators=True` (the code's
three generators). The code's dropout at test time and its whole-test-set
Tent run before generation are not reproduced.
"""

import inspect
import re
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from tta_jax import models
from tta_jax._src import (
  base,
  checkpoint,
  losses,
  meta as meta_lib,
  params as params_lib,
)
from tta_jax.data import sources
from tta_jax.models.generators import generalizeformer as generator_lib

GENERATE = ('bn', 'classifier', 'both', 'all')
BN_MODES = ('batch', 'source')
_ARCH = (
  'num_layers',
  'd_model',
  'num_heads',
  'ff_dim',
  'dropout',
  'token_width',
  'fusion',
  'use_grads',
  'use_features',
  'grad_norm',
  'split_generators',
  'last_stage',
  'head',
)


def generation_mask(
  generate: str = 'both', *, head: str = 'head', exclude: str = 'downsample'
) -> params_lib.MaskFn:
  """The generated leaves: BN affine, classifier kernel, both, or all.

  `exclude` (a path regex) keeps leaves at their source values; the default
  skips ResNet's downsample BNs, as the official code does. The classifier
  bias is not generated (as in the code). 'all' generates every parameter,
  convolutions included (the paper's full-generation comparison).
  """
  bn = params_lib.bn_affine
  clf = params_lib.by_regex(f'^{re.escape(head)}/kernel$')
  fns = {
    'bn': bn,
    'classifier': clf,
    'both': params_lib.union(bn, clf),
    'all': params_lib.all_params,
  }
  if generate not in fns:
    raise ValueError(f'generate must be one of {GENERATE}, got {generate!r}')
  if exclude and generate != 'all':
    return params_lib.difference(fns[generate], params_lib.by_regex(exclude))
  return fns[generate]


def generalizeformer(
  apply_fn,
  *,
  generate: str = 'both',
  num_layers: int = 8,
  d_model: int = 512,
  num_heads: int = 2,
  ff_dim: int = 512,
  dropout: float = 0.1,
  token_width: int = 512,
  fusion: str = 'concat',
  use_grads: bool = True,
  use_features: bool = True,
  grad_norm: str = 'none',
  split_generators: bool = False,
  last_stage: str = r'^layer4',
  features: str = 'pre_logits',
  exclude: str = 'downsample',
  head: str = 'head',
  bn_mode: str = 'batch',
  min_batch_stats: int = 2,
  accumulate: bool = False,
  aux_tent_huber_weight: float = 0.0,
  aux_tent_lr: float = 1e-4,
) -> base.Adapter:
  """GeneralizeFormer (Ambekar et al., WACV 2025): generated BN + classifier.

  `step(state, batch, meta=phi)` computes z (the masked batch mean of
  `features`) and g = jax.grad of the batch-mean entropy at theta_s, both in
  `bn_mode`; generates theta_t; and returns theta_t's logits. phi comes from
  `init_meta` (zero output layer: theta_t = theta_s) or `meta_train`.
  With `train=True` (meta-training) the generator's dropout is on; test
  time is deterministic. `first_order=True` stops the gradient of g.

  Args:
    apply_fn: the model's `ApplyFn`.
    generate: 'bn', 'classifier', 'both' (the paper) or 'all' (every
      parameter, the paper's slower full-generation variant).
    num_layers, d_model, num_heads, ff_dim, dropout, token_width, fusion:
      the transformer (official code: 8, 512, 2, 512, 0.1, 512-wide tokens;
      see `generator.ParamGenerator`).
    use_grads, use_features: feed the gradient / feature stream (ablations).
    grad_norm: 'none' (default: raw, the official code and spec A.9-8),
      'global_rms' (gradients divided by their joint RMS, keeping the
      layers' relative sizes: entropy gradients are ~1e-4..1e-2, too small
      beside theta_s and z for the input projection to read them at a
      1e-4 learning rate; `configs/generalizeformer_dg.py` uses it) or
      'token_rms' (each row by its own RMS).
    split_generators: the code's three generators (BN layers matching
      `last_stage`, other BN layers, classifier) instead of one.
    last_stage: regex of the first split group.
    features: the `ModelOutput.features` key giving z.
    exclude: regex of leaves never generated (ResNet downsample BNs).
    head: the classifier module.
    bn_mode: 'batch' (test-batch statistics, the code's Tent-mode network)
      or 'source' (running statistics). Running statistics never change.
    min_batch_stats: with fewer valid rows, 'batch' falls back to source
      statistics (spec A.9-10: batch size 1).
    accumulate: the official code's behaviour: theta_t is written back and
      is the next batch's theta_s (cumulative); default stateless.
    aux_tent_huber_weight: weight of the code's Huber loss (delta 1) between
      theta_t and one AdamW step of Tent (lr `aux_tent_lr`, weight decay
      5e-4) from theta_s, reported as `metrics['aux_loss']` and added to the
      meta-loss by `meta_train`; 0 (the paper) leaves it out.
    aux_tent_lr: that Tent step's learning rate.

  Returns:
    An `Adapter`; `step` needs `meta=phi`. It adapts no parameter unless
    `accumulate` (then the generated ones).

  References:
    Ambekar, Xiao, Zhen & Snoek, GeneralizeFormer: Layer-Adaptive Model
    Generation across Test-Time Distribution Shifts, WACV 2025
    (arXiv 2502.12195; code: ambekarsameer96/generalizeformer).
  """
  if bn_mode not in BN_MODES:
    raise ValueError(f'bn_mode must be one of {BN_MODES}, got {bn_mode!r}')
  if grad_norm not in generator_lib.GRAD_NORMS:
    raise ValueError(f'grad_norm must be one of {generator_lib.GRAD_NORMS}')
  kwargs = {k: v for k, v in locals().items() if k in _ARCH}
  module = generator_lib.ParamGenerator(**kwargs)
  gen_mask = generation_mask(generate, head=head, exclude=exclude)
  tent_tx = optax.adamw(aux_tent_lr, weight_decay=5e-4)

  def init_fn(variables, rng):
    params_lib.split_by(
      gen_mask,
      variables['params'],
      variables['batch_stats'],
      who='generalizeformer',
    )
    return base.AdaptState(
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=optax.EmptyState(),
      rng=rng,
      step=jnp.zeros([], jnp.int32),
    )

  def step_fn(
    state, batch, *, meta=None, first_order=False, train=False, **extra_args
  ):
    del extra_args
    if meta is None:
      raise ValueError(
        'generalizeformer needs meta=phi (init_meta, or meta_train_main)'
      )
    mask = batch.get('mask')
    inputs, forward = generator_inputs(
      apply_fn,
      state.params,
      state.batch_stats,
      batch,
      gen_mask,
      features=features,
      bn_mode=bn_mode,
      min_batch_stats=min_batch_stats,
      first_order=first_order,
    )
    theta_s, grads = inputs.theta_s, inputs.grads
    rng = jax.random.fold_in(state.rng, state.step)
    theta_t = module.apply(
      {'params': meta},
      theta_s,
      inputs.features,
      grads,
      deterministic=not train,
      rngs={'dropout': rng} if train else None,
    )
    out = forward(theta_t)
    delta = jax.tree.map(jnp.subtract, theta_t, theta_s)
    metrics = {
      'entropy_source': inputs.entropy,
      'entropy': losses.masked_mean(losses.softmax_entropy(out.logits), mask),
      'delta_norm': optax.tree.norm(delta),
    }
    if aux_tent_huber_weight:
      upd, _ = tent_tx.update(grads, tent_tx.init(theta_s), theta_s)
      target = jax.lax.stop_gradient(optax.apply_updates(theta_s, upd))
      errs = jax.tree.map(
        lambda a, b: optax.huber_loss(a, b, delta=1.0), theta_t, target
      )
      total = sum(jnp.sum(e) for e in jax.tree.leaves(errs))
      count = sum(e.size for e in jax.tree.leaves(errs))
      metrics['aux_loss'] = aux_tent_huber_weight * total / count
    params = state.params
    if accumulate:  # the official code: Delta is added in place
      _, frozen = params_lib.split(params, gen_mask(params, state.batch_stats))
      params = params_lib.merge(theta_t, frozen)
    return state._replace(params=params, step=state.step + 1), base.StepOutput(
      out.logits, metrics
    )

  adapted = gen_mask if accumulate else params_lib.no_params
  return base.Adapter(init_fn, step_fn, adapted)


class GeneratorInputs(NamedTuple):
  """What the generator reads for one batch (spec A.3)."""

  theta_s: Any  # the generated leaves at their current (source) values
  features: jax.Array  # [D] masked batch mean of the pooled features
  grads: Any  # d mean entropy / d theta_s (the layer-wise gradients)
  entropy: jax.Array  # the batch-mean entropy at theta_s


def generator_inputs(
  apply_fn,
  params,
  batch_stats,
  batch,
  gen_mask: params_lib.MaskFn,
  *,
  features: str = 'pre_logits',
  bn_mode: str = 'batch',
  min_batch_stats: int = 2,
  first_order: bool = False,
):
  """One forward and backward at theta_s: `(GeneratorInputs, forward)`.

  `forward(theta)` runs the model on the batch with the generated leaves
  set to `theta`, in the same BN mode (`bn_mode`, falling back to source
  statistics below `min_batch_stats` valid rows) and with padding masked.
  """
  mask = batch.get('mask')
  valid = losses.batch_mask(batch, batch['image'].shape[0])
  theta_s, frozen = params_lib.split(params, gen_mask(params, batch_stats))
  mode = None
  if bn_mode == 'batch':
    # Too few rows for batch statistics: the source ones (spec A.9-10).
    few = (jnp.sum(valid) < min_batch_stats).astype(jnp.float32)
    mode = models.BNMode(source_weight=few)

  def forward(theta):
    return apply_fn(
      params_lib.merge(theta, frozen),
      batch_stats,
      batch['image'],
      bn_mode=mode,
      mask=mask,
    )

  def entropy(theta):
    out = forward(theta)
    ent = losses.masked_mean(losses.softmax_entropy(out.logits), mask)
    return ent, out.features[features]

  grad_fn = meta_lib.inner_value_and_grad(
    entropy, has_aux=True, first_order=first_order
  )
  (ent, feats), grads = grad_fn(theta_s)
  z = losses.masked_mean(feats, valid[:, None], axis=0)  # [D]
  return GeneratorInputs(theta_s, z, grads, ent), forward


def _factory_defaults() -> dict[str, Any]:
  sig = inspect.signature(generalizeformer)
  return {
    p.name: p.default
    for p in sig.parameters.values()
    if p.kind == p.KEYWORD_ONLY
  }


def init_meta(
  variables, rng, *, apply_fn=None, input_shape=None, **kwargs
) -> Any:
  """phi for `generalizeformer(**kwargs)` on a model's `variables`.

  Args:
    variables: the source variables (the token layout follows them).
    rng: init key.
    apply_fn, input_shape: needed only when `features` is not 'pre_logits'
      (whose width is the classifier's input width).
    **kwargs: the factory's keyword arguments (unknown keys fail).

  Returns:
    The generator's parameters; its output layer is zero, so theta_t =
    theta_s until meta-training moves it.
  """
  cfg = _factory_defaults()
  unknown = sorted(set(kwargs) - set(cfg))
  if unknown:
    raise ValueError(f'init_meta: unknown arguments {unknown}')
  cfg.update(kwargs)
  params, stats = variables['params'], variables['batch_stats']
  mask = generation_mask(
    cfg['generate'], head=cfg['head'], exclude=cfg['exclude']
  )
  theta, _ = params_lib.split_by(mask, params, stats, who='generalizeformer')
  if cfg['features'] == 'pre_logits':
    dim = params[cfg['head']]['kernel'].shape[0]
  else:
    if apply_fn is None or input_shape is None:
      raise ValueError(
        'init_meta: features other than pre_logits need '
        'apply_fn and input_shape'
      )
    out = jax.eval_shape(
      lambda: apply_fn(params, stats, jnp.zeros((2, *input_shape)))
    )
    dim = out.features[cfg['features']].shape[-1]
  module = generator_lib.ParamGenerator(
    **{k: v for k, v in cfg.items() if k in _ARCH}
  )
  init = jax.jit(lambda r, t, z: module.init(r, t, z, t)['params'])
  return init(rng, theta, jnp.zeros((dim,), jnp.float32))


# ----------------------------------------------------------------------------
# Meta-training.

BACKBONES = ('meta_source', 'joint', 'source')


class _Split(NamedTuple):
  variables: Any  # the backbone of this meta-source / meta-target split
  targets: tuple[str, ...]  # meta-target domains (unseen by the backbone)


def meta_train(ctx: meta_lib.MetaTrainContext) -> meta_lib.MetaTrainResult:
  """Meta-trains phi on the source domains (paper: meta-source/target).

  `ctx.method_config` (see `configs/generalizeformer_dg.py`) chooses the
  backbone of each episode:

  - 'meta_source' (default): one backbone per source domain k, trained from
    scratch with the source recipe (`config.pretrain`; `backbone_epochs`
    epochs, 0: as many as the source model) on the other source domains
    (the meta-source); episodes of split k draw
    meta-target batches from domain k, which that backbone never saw, as
    the test domain was never seen. Backbones are cached under
    `WORKDIR/meta_backbones/` and shared by the variants (ablations).
  - 'joint' (the official code's loop, spec A.6): one backbone, from the
    source model, takes an AdamW cross-entropy step on a random meta-source
    domain d before each phi step on a batch of another domain; the
    trained backbone is returned and replaces the source model.
  - 'source' (the 'without meta-learning' ablation): the source model,
    meta-target batches from every source domain (no simulated shift).

  Each phi step minimises the cross-entropy of theta_t's logits over an
  episode of `episode_length` meta-target batches (one domain per episode;
  >1 matters only with `accumulate`), plus the optional Huber term, with
  AdamW (cosine decay, global-norm clipping) through `make_meta_train_step`
  (second order unless `first_order`). Every `eval_every` steps phi is
  scored with the same splits on the source domains' validation parts; the
  best phi (step 0, theta_t = theta_s, included) is returned.

  Returns:
    A `MetaTrainResult`: `meta` = phi; `variables` = the joint backbone.
  """
  cfg, kwargs = ctx.method_config, dict(ctx.method_kwargs)
  if cfg.backbone not in BACKBONES:
    raise ValueError(f'backbone must be one of {BACKBONES}: {cfg.backbone!r}')
  names = [d.name for d in ctx.source_domains]
  if cfg.backbone != 'source' and len(names) < 2:
    raise ValueError(
      f'generalizeformer: backbone={cfg.backbone!r} splits the source '
      f'domains into meta-source and meta-target, but there is one '
      f"({names}); use backbone='source'"
    )
  adapter = generalizeformer(ctx.apply_fn, **kwargs)
  phi = init_meta(
    ctx.variables,
    jax.random.fold_in(ctx.rng, 0),
    apply_fn=ctx.apply_fn,
    input_shape=ctx.input_shape,
    **kwargs,
  )
  train_parts = {d.name: d.source for d in ctx.source_domains}
  val_parts = {
    d.name: sources.materialize(d.source)
    for d in ctx.val_domains
    if len(d.source)
  }
  if cfg.backbone == 'meta_source':
    splits = [
      _Split(_canonical(_meta_source_backbone(ctx, cfg, t)), (t,))
      for t in names
    ]
  else:
    splits = [_Split(_canonical(ctx.variables), tuple(names))]
  tx = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(
      optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.steps, 1)),
      weight_decay=cfg.weight_decay,
    ),
  )
  train_step = meta_lib.make_meta_train_step(
    adapter,
    tx,
    first_order=cfg.first_order,
    remat=cfg.remat,
    loss_fn=_meta_loss,
  )
  step_jit = jax.jit(adapter.step)
  eval_key = jax.random.fold_in(ctx.rng, 2)

  def val_accuracy(phi, splits):
    correct, n = 0, 0
    for split in splits:
      for t in split.targets:
        if t not in val_parts:
          continue
        state = adapter.init(split.variables, eval_key)
        for batch in sources.padded_batches(val_parts[t], cfg.batch_size):
          state, out = step_jit(
            state, {'image': batch['image'], 'mask': batch['mask']}, meta=phi
          )
          hit = np.asarray(out.logits).argmax(-1) == batch['label']
          correct += int(hit[batch['mask']].sum())
          n += int(batch['mask'].sum())
    return correct / max(n, 1)

  def sample(r, targets):
    src = train_parts[targets[r.integers(len(targets))]]
    b = src[r.integers(0, len(src), cfg.episode_length * cfg.batch_size)]
    shape = (cfg.episode_length, cfg.batch_size)
    return {
      'image': b['image'].reshape(shape + b['image'].shape[1:]),
      'label': b['label'].reshape(shape),
    }

  joint = cfg.backbone == 'joint'
  if joint:
    backbone_tx, backbone_step = _backbone_trainer(ctx, cfg)
  train = {
    'meta_state': meta_lib.init_meta_train_state(
      phi, tx, jax.random.fold_in(ctx.rng, 1)
    ),
    'best': phi,
    'best_accuracy': np.float64(-1.0),
    'best_step': np.int64(0),
  }
  if joint:
    train['backbone'] = train['best_backbone'] = _canonical(ctx.variables)
    train['backbone_opt'] = backbone_tx.init(ctx.variables['params'])
  start = 0
  if ctx.checkpointer.latest_step() is not None:
    start = ctx.checkpointer.latest_step()
    train = ctx.checkpointer.restore(train)
    logging.info('generalizeformer: resuming meta-training at step %d', start)
  else:
    acc = val_accuracy(phi, splits) if val_parts else 0.0
    train['best_accuracy'] = np.float64(acc)
    logging.info('generalizeformer step 0: source-val accuracy %.4f', acc)
  mstate, t0, metrics = train['meta_state'], time.perf_counter(), {}
  for step in range(start, cfg.steps):
    r = np.random.default_rng([ctx.config.seed, 7, step])
    if joint:
      # The code cycles through the domains first, then draws at random.
      d = step if step < len(names) else int(r.integers(len(names)))
      b = train_parts[names[d]][
        r.integers(0, len(train_parts[names[d]]), cfg.backbone_batch_size)
      ]
      train['backbone'], train['backbone_opt'], _ = backbone_step(
        train['backbone'], train['backbone_opt'], b['image'], b['label']
      )
      split = _Split(
        train['backbone'], tuple(n for n in names if n != names[d])
      )
    else:
      split = splits[int(r.integers(len(splits)))]
    mstate, metrics = train_step(
      mstate, split.variables, sample(r, split.targets)
    )
    done = step + 1
    if ctx.log_every and done % ctx.log_every == 0:
      meta_lib.log_progress(
        'generalizeformer',
        done,
        cfg.steps,
        metrics,
        time.perf_counter() - t0,
        'lower the learning rate',
      )
    if done % cfg.eval_every == 0 or done == cfg.steps:
      now = splits if not joint else [_Split(train['backbone'], tuple(names))]
      acc = val_accuracy(mstate.meta, now) if val_parts else 0.0
      logging.info(
        'generalizeformer step %d: source-val accuracy %.4f', done, acc
      )
      if acc > train['best_accuracy'] or not val_parts:
        train.update(
          best=mstate.meta,
          best_accuracy=np.float64(acc),
          best_step=np.int64(done),
        )
        if joint:
          train['best_backbone'] = train['backbone']
      train['meta_state'] = mstate
      ctx.checkpointer.save(done, train)
  out_metrics = {
    'val_accuracy': float(train['best_accuracy']),
    'best_step': int(train['best_step']),
    'seconds': time.perf_counter() - t0,
    **{k: float(v) for k, v in metrics.items()},
  }
  return meta_lib.MetaTrainResult(
    meta=train['best'],
    variables=train['best_backbone'] if joint else None,
    metrics=out_metrics,
  )


def _meta_loss(
  meta, adapter, variables, episode, rng, *, first_order=False, remat=False
):
  """Cross-entropy of theta_t's logits (+ the optional Huber term)."""
  state = adapter.init(variables, rng)
  _, out = meta_lib.unroll(
    adapter,
    state,
    episode,
    meta=meta,
    remat=remat,
    first_order=first_order,
    train=True,
  )
  labels, mask = episode['label'], episode.get('mask')
  xent = losses.masked_mean(losses.cross_entropy(out.logits, labels), mask)
  aux = jnp.mean(out.metrics['aux_loss']) if 'aux_loss' in out.metrics else 0.0
  correct = (jnp.argmax(out.logits, -1) == labels).astype(jnp.float32)
  return xent + aux, {
    'loss': xent,
    'aux_loss': jnp.asarray(aux),
    'accuracy': losses.masked_mean(correct, mask),
    'delta_norm': jnp.mean(out.metrics['delta_norm']),
  }


def _canonical(variables):
  # Freshly trained and checkpoint-restored backbones can differ in weak
  # types; one abstract signature keeps the meta-train step compiled once.
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), variables)


def _meta_source_backbone(ctx, cfg, target: str):
  """The source recipe on every source domain but `target` (cached)."""
  from tta_jax.data import benchmarks
  from tta_jax.runners import common, pretrain

  # 0: the source model's own epochs. Backbones trained much less than the
  # source model teach phi to repair weak models, which hurts the source.
  epochs = cfg.backbone_epochs or ctx.config.pretrain.epochs
  others = [d for d in ctx.source_domains if d.name != target]
  val = [d.source for d in ctx.val_domains if d.name != target]
  bench = benchmarks.Benchmark(
    name=f'meta_source_without_{target}',
    domains=[],
    input_shape=tuple(ctx.input_shape),
    num_classes=ctx.num_classes,
    source_train=sources.ConcatSource([d.source for d in others]),
    source_val=sources.ConcatSource(val) if val else None,
  )
  config = ml_collections.ConfigDict(
    {
      'seed': ctx.config.seed,
      'model': ctx.config.model.to_dict(),
      'pretrain': {
        **ctx.config.pretrain.to_dict(),
        'epochs': epochs,
      },
    }
  )
  # A backbone is defined by its training domains, whose splits do not
  # depend on the held-out domain: with leave-one-domain-out workdirs
  # (WORKDIR/dg/<held_out>/) the cache is shared by all held-out domains
  # (held-out h, meta-target t and held-out t, meta-target h share one).
  workdir = ctx.checkpointer.directory.parents[1]
  root = workdir.parents[1] if workdir.parent.name == 'dg' else workdir
  directory = (
    root
    / 'meta_backbones'
    / f'{"+".join(sorted(d.name for d in others))}_e{epochs}'
  )
  module, _ = common.build_model(config.model, bench)
  if checkpoint.has_variables(directory):
    common.check_metadata(
      checkpoint.load_metadata(directory),
      common.model_metadata(config.model, bench),
      directory,
    )
    template = models.init_variables(
      module, bench.input_shape, jax.random.key(0)
    )
    return checkpoint.load_variables(directory, template)
  logging.info(
    'generalizeformer: training the meta-source backbone '
    'without %s (%d epochs)',
    target,
    epochs,
  )
  variables, metadata = pretrain.train(config, bench, directory)
  checkpoint.save_variables(directory, variables, metadata)
  return variables


def _backbone_trainer(ctx, cfg):
  """The 'joint' backbone's AdamW cross-entropy step (BN EMA as pretrain)."""
  from tta_jax.runners import pretrain

  tx = optax.adamw(cfg.backbone_learning_rate, weight_decay=5e-4)
  step = pretrain.supervised_step(
    ctx.apply_fn, tx, ctx.config.pretrain.bn_momentum
  )
  return tx, jax.jit(step)
