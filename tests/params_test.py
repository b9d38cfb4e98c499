"""Parameter masks and split/merge: properties on random trees."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from hypothesis import given, settings, strategies as st

from tta_jax import methods, testing as test_utils
from tta_jax._src import params as params_lib

_names = st.text('abcdefgh_0123', min_size=1, max_size=6)
_trees = st.recursive(
  st.builds(lambda n: np.arange(n, dtype=np.float32), st.integers(1, 4)),
  lambda children: st.dictionaries(_names, children, min_size=1, max_size=4),
  max_leaves=12,
).filter(lambda t: isinstance(t, dict))


class SplitMergeTest(absltest.TestCase):
  @settings(max_examples=60, deadline=None)
  @given(tree=_trees, data=st.data())
  def test_merge_inverts_split(self, tree, data):
    leaves = params_lib.paths(tree)
    chosen = data.draw(st.sets(st.sampled_from(leaves)))
    mask = params_lib.by_regex(*[f'^{p}$' for p in chosen] or ['^$never'])(
      tree, {}
    )
    a, b = params_lib.split(tree, mask)
    self.assertEqual(set(params_lib.paths(a)), chosen)
    self.assertEqual(set(params_lib.paths(b)), set(leaves) - chosen)
    self.assertTrue(test_utils.trees_equal(params_lib.merge(a, b), tree))
    self.assertTrue(test_utils.trees_equal(params_lib.merge(b, a), tree))

  def test_merge_rejects_overlap(self):
    with self.assertRaisesRegex(ValueError, 'overlapping'):
      params_lib.merge({'a': 1}, {'a': 2})

  def test_split_rejects_mismatched_mask(self):
    with self.assertRaisesRegex(ValueError, 'does not match'):
      params_lib.split({'a': 1, 'b': 2}, {'a': True})


class MaskTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    # Norm layers named without 'bn'; a non-norm module with a 'scale'.
    self.params = {
      'stem': {'kernel': jnp.ones(2)},
      'norm_proj': {
        'scale': jnp.ones(2),
        'bias': jnp.ones(2),
        'alpha': jnp.ones(2),
      },
      'block': {
        'n0': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
        'gate': {'scale': jnp.ones(2)},
      },
      'head': {'kernel': jnp.ones(2), 'bias': jnp.ones(2)},
    }
    self.stats = {
      'norm_proj': {'mean': 0, 'var': 1},
      'block': {'n0': {'mean': 0, 'var': 1}},
    }

  def selected(self, fn):
    return set(
      params_lib.selected_paths(self.params, fn(self.params, self.stats))
    )

  def test_bn_affine_is_structural(self):
    self.assertEqual(
      self.selected(params_lib.bn_affine),
      {'norm_proj/scale', 'norm_proj/bias', 'block/n0/scale', 'block/n0/bias'},
    )

  def test_classifier_union_difference(self):
    self.assertEqual(
      self.selected(params_lib.classifier()), {'head/kernel', 'head/bias'}
    )
    both = params_lib.union(params_lib.bn_affine, params_lib.classifier())
    self.assertLen(self.selected(both), 6)
    minus = params_lib.difference(both, params_lib.by_regex('^block/'))
    self.assertEqual(
      self.selected(minus),
      {'norm_proj/scale', 'norm_proj/bias', 'head/kernel', 'head/bias'},
    )
    inter = params_lib.intersection(
      params_lib.bn_affine, params_lib.by_regex('bias$')
    )
    self.assertEqual(self.selected(inter), {'norm_proj/bias', 'block/n0/bias'})

  def test_spec_parser(self):
    fn = methods.mask_from_spec('bn_affine,classifier,!re:^block/')
    self.assertLen(self.selected(fn), 4)
    self.assertEqual(
      self.selected(methods.mask_from_spec('all')),
      set(params_lib.paths(self.params)),
    )
    with self.assertRaisesRegex(ValueError, 'unknown mask term'):
      methods.mask_from_spec('batchnorm')
    with self.assertRaisesRegex(ValueError, 'includes nothing'):
      methods.mask_from_spec('!all')

  def test_empty_selection_fails_clearly(self):
    with self.assertRaisesRegex(ValueError, 'selects no parameters'):
      params_lib.split_by(
        params_lib.by_regex('nothing'), self.params, self.stats, who='x'
      )


if __name__ == '__main__':
  absltest.main()
