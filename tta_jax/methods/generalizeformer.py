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

phi is meta-trained (`tta_jax.trainers.generalizeformer`) on the source
domains only: per episode a meta-target batch from a domain the episode's
backbone was not trained on (the meta-source), and the supervised
cross-entropy of theta_t on it.

Where the official code departs from the paper, the paper
is followed and the code's behaviour is an option: `accumulate=True` (the
code adds Delta in place, so theta_t accumulates over the stream),
`aux_tent_huber_weight` (the code's only loss that reaches phi: a Huber
regression onto one AdamW Tent step), `split_generators=True` (the code's
three generators). The code's dropout at test time and its whole-test-set
Tent run before generation are not reproduced.
"""

import inspect
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax import models
from tta_jax._src import base, grad_step, losses, params as params_lib
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
    grad_norm: 'none' (default: raw gradients, as the official code feeds),
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
      statistics (a batch of one has no batch variance).
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
    return base.init_state(variables, rng)

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
    if bn_mode == 'batch':  # 1: too few rows, source statistics were used
      n = jnp.sum(losses.batch_mask(batch, batch['image'].shape[0]))
      metrics['source_bn_fallback'] = (n < min_batch_stats).astype(jnp.float32)
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
  return base.adapter(init_fn, step_fn, adapted)


class GeneratorInputs(NamedTuple):
  """What the generator reads for one batch: theta_s, z and g."""

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
    # Too few rows for batch statistics (a batch of one has no variance):
    # the source ones.
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

  grad_fn = grad_step.inner_value_and_grad(
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
