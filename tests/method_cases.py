"""One contract-test case per registered method (tests/methods_contract_test).

A new method must add its case here; `test_every_method_has_a_case` fails
otherwise. A case gives the method's config for `methods.from_config`, the
mask of the parameters it may change (None: none), and optional builders of
`context` and `meta` from the tiny net's variables.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax import testing as test_utils
from tta_jax._src import params as params_lib
from tta_jax.methods import generalizeformer, mgg


class Case(NamedTuple):
  name: str
  config: dict[str, Any]
  adapted: Any = None  # expected `Adapter.adapted` (None: not checked)
  context: Any = None  # (apply_fn, variables) -> dict for from_config
  meta: Any = None  # (apply_fn, variables) -> meta pytree, if required
  moves: bool = True  # adapted params change within 3 steps on random data


ADAM = {'name': 'adam', 'learning_rate': 1e-2}

SGD = {'name': 'sgd', 'learning_rate': 5e-3}

# A one-layer, 16-wide GeneralizeFormer generator with 8-wide tokens.
GF_TINY = {
  'num_layers': 1,
  'd_model': 16,
  'num_heads': 2,
  'ff_dim': 32,
  'token_width': 8,
}
# The official code's three generators, per-stream projections, row RMS.
GF_SPLIT = {
  **GF_TINY,
  'split_generators': True,
  'last_stage': '^bn4',
  'fusion': 'sum',
  'grad_norm': 'token_rms',
}


def _mgg_meta(apply_fn, variables):
  """MGG's meta: a random generator and source statistics of 64 images."""
  images = test_utils.fake_batch(100, 64, labels=False)['image']
  mean, std = mgg.source_statistics(
    apply_fn, variables, images, features=MGG_FEATURES
  )
  return mgg.init_meta(jax.random.key(0), mean, std)


MGG_FEATURES = ('stage1', 'stage2', 'stage3')


def _gf_meta(variables, kwargs, output_scale=0.0):
  """GeneralizeFormer's phi; a random output layer makes Delta non-zero."""
  phi = generalizeformer.init_meta(variables, jax.random.key(0), **kwargs)
  if not output_scale:
    return phi
  r = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: (
      x + output_scale * r.normal(size=x.shape).astype(x.dtype)
      if path[1].key == 'out'  # the generator's output layer
      else x
    ),
    phi,
  )


CASES = [
  Case('source', {}),
  Case('norm', {}),
  Case('norm', {'prior_strength': 16.0}),
  Case('norm', {'momentum': 0.1}),
  Case('tent', {'optimizer': ADAM}, params_lib.bn_affine),
  Case('tent', {'optimizer': ADAM, 'steps': 2}, params_lib.bn_affine),
  Case(
    'tent',
    {'optimizer': {**ADAM, 'inject': True}},
    params_lib.bn_affine,
    meta=lambda *_: {'log_learning_rate': jnp.log(1e-2)},
  ),
  Case(
    'eata',
    {
      'optimizer': ADAM,
      'margin_e0': 1.0,
      'd_margin': 1.01,
      'fisher_batch_size': 8,
    },
    params_lib.bn_affine,
    context=lambda apply_fn, variables: {
      'source_images': test_utils.fake_batch(7, 12, labels=False)['image']
    },
  ),
  Case(
    'eta',
    {'optimizer': ADAM, 'margin_e0': 0.97, 'd_margin': 0.995},
    params_lib.bn_affine,
  ),
  Case('sar', {'optimizer': ADAM, 'margin_e0': 0.97}, params_lib.bn_affine),
  Case(
    'sar',
    {'optimizer': {**ADAM, 'inject': True}, 'margin_e0': 1.0},
    params_lib.bn_affine,
    meta=lambda *_: {'log_learning_rate': jnp.log(1e-2)},
  ),
  Case(
    'cotta',
    {'optimizer': ADAM, 'num_augmentations': 2},
    params_lib.all_params,
  ),
  Case(
    'memo',
    {'optimizer': {**SGD, 'inject': True}, 'num_augmentations': 2},
    params_lib.no_params,
    meta=lambda *_: {'log_learning_rate': jnp.log(5e-3)},
  ),
  Case('lame', {}, params_lib.no_params),
  Case(
    'lame', {'affinity': 'rbf', 'force_symmetry': True}, params_lib.no_params
  ),
  Case('t3a', {'filter_k': 2}, params_lib.no_params),
  Case(
    'rotta',
    {'optimizer': ADAM, 'memory_size': 8, 'update_frequency': 5},
    params_lib.bn_affine,
    context=lambda *_: {'input_shape': test_utils.TINY_SHAPE},
  ),
  # Meta-TTT is episodic: its state's parameters never move. The tiny net
  # has no learned alpha (that needs meta-training), so alpha is fixed.
  Case('meta_ttt', {'alpha': 0.75}, params_lib.bn_affine, moves=False),
  Case(
    'meta_ttt',
    {'alpha': 0.5, 'groups': 'paper', 'loss': 'entropy', 'steps': 2},
    params_lib.bn_affine,
    moves=False,
  ),
  Case(
    'generalizeformer',
    GF_TINY,
    params_lib.no_params,
    meta=lambda _, v: _gf_meta(v, GF_TINY),
  ),
  Case(
    'generalizeformer',
    {**GF_SPLIT, 'accumulate': True, 'aux_tent_huber_weight': 1.0},
    generalizeformer.generation_mask(),
    meta=lambda _, v: _gf_meta(v, GF_SPLIT, output_scale=0.05),
  ),
  # TPT is episodic per image. The tiny net has no prompt context, so the
  # contract runs its episodes on the BN affine parameters.
  Case(
    'tpt',
    {
      'optimizer': {
        'name': 'adamw',
        'learning_rate': 5e-3,
        'weight_decay': 0.01,
      },
      'adapt': 'bn_affine',
      'n_views': 4,
      'flip': False,
    },
    params_lib.no_params,
    moves=False,
  ),
  Case(
    'mgg',
    {'features': MGG_FEATURES, 'learning_rate': 1e-2},
    mgg.norm_affine,
    meta=_mgg_meta,
  ),
  Case(
    'mgg',
    {'features': ('pre_logits',), 'generator': 'mlp', 'hidden': 4},
    mgg.norm_affine,
    meta=lambda apply_fn, v: {
      **_mgg_meta(apply_fn, v),
      'source_mean': jnp.zeros(16),
      'source_std': jnp.ones(16),
      'phi': mgg.init_meta(
        jax.random.key(1), jnp.zeros(1), jnp.ones(1), generator='mlp', hidden=4
      )['phi'],
    },
  ),
  # Loose filters: the tiny random net is never confident.
  Case(
    'deyo',
    {'optimizer': ADAM, 'margin': 1.0, 'plpd_threshold': -1.0},
    params_lib.bn_affine,
  ),
  Case(
    'deyo',
    {'optimizer': SGD, 'margin': 1.0, 'plpd_threshold': -1.0, 'patch_len': 3},
    params_lib.bn_affine,
  ),
]
