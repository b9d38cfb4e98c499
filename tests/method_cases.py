"""One contract-test case per registered method (tests/methods_contract_test).

A new method must add its case here; `test_every_method_has_a_case` fails
otherwise. A case gives the method's config for `methods.from_config`, the
mask of the parameters it may change (None: none), and optional builders of
`context` and `meta` from the tiny net's variables.
"""

from typing import Any, NamedTuple

import jax.numpy as jnp

from tta_jax._src import params as params_lib, test_utils


class Case(NamedTuple):
  name: str
  config: dict[str, Any]
  adapted: Any = None  # expected `Adapter.adapted` (None: not checked)
  context: Any = None  # (apply_fn, variables) -> dict for from_config
  meta: Any = None  # (apply_fn, variables) -> meta pytree, if required
  moves: bool = True  # adapted params change within 3 steps on random data


ADAM = {'name': 'adam', 'learning_rate': 1e-2}
SGD = {'name': 'sgd', 'learning_rate': 5e-3}

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
]
