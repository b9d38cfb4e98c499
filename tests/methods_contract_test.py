"""The contract every registered method honours (optax `_common_test` style)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from tests import method_cases
from tta_jax import methods, testing as test_utils, unroll
from tta_jax._src import params as params_lib

NUM_STEPS = 3


def _build(case):
  _, apply_fn, variables = test_utils.tiny_bn_net(0)
  context = case.context(apply_fn, variables) if case.context else {}
  adapter = methods.from_config(case.name, case.config, apply_fn, **context)
  meta = case.meta(apply_fn, variables) if case.meta else None
  return adapter, variables, meta


def _stream(n=NUM_STEPS, batch_size=16):
  # Masked like a runner's batches, so that the padded and non-finite
  # checks below reuse the stream's compiled step.
  return [
    test_utils.fake_batch(
      i, batch_size, labels=False, mask=np.ones(batch_size, bool)
    )
    for i in range(n)
  ]


def _named(cases):
  return [
    dict(testcase_name=f'{i}_{c.name}', case=c) for i, c in enumerate(cases)
  ]


class ContractTest(parameterized.TestCase):
  def test_every_method_has_a_case(self):
    covered = {c.name for c in method_cases.CASES}
    self.assertEqual(set(methods.METHODS), covered)

  @parameterized.named_parameters(*_named(method_cases.CASES))
  def test_contract(self, case):
    """jit, finiteness, structure, frozen leaves, determinism, scan, padding,
    non-finite rows.

    One compiled `step` serves every check, to keep the suite fast.
    """
    adapter, variables, meta = _build(case)
    step = jax.jit(adapter.step)
    init = jax.jit(adapter.init)
    batches = _stream()

    def run(seed=0):
      state = init(variables, jax.random.key(seed))
      outs = []
      for batch in batches:
        state, out = step(state, batch, meta=meta)
        outs.append(out)
      return state, outs

    # jit, finite outputs, scalar metrics, a stable state structure.
    state0 = init(variables, jax.random.key(0))
    shapes0 = jax.eval_shape(lambda s: s, state0)
    state, outs = run()
    for out in outs:
      self.assertEqual(out.logits.shape, (16, test_utils.TINY_CLASSES))
      self.assertTrue(np.all(np.isfinite(out.logits)))
      for name, value in out.metrics.items():
        self.assertEqual(np.shape(value), (), name)
        self.assertTrue(np.all(np.isfinite(value)), name)
    self.assertEqual(jax.eval_shape(lambda s: s, state), shapes0)
    for leaf in jax.tree.leaves(state):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        self.assertTrue(np.all(np.isfinite(leaf)))
    self.assertEqual(int(state.step), NUM_STEPS)

    # The method declares what it adapts; every other leaf is bit-identical
    # and, where it adapts something, something moved.
    self.assertIsNotNone(adapter.adapted, 'the Adapter must declare `adapted`')
    params0 = variables['params']
    mask = adapter.adapted(params0, variables['batch_stats'])
    if case.adapted is not None:  # the declaration is the expected one
      self.assertEqual(
        params_lib.selected_paths(params0, mask),
        params_lib.selected_paths(
          params0, case.adapted(params0, variables['batch_stats'])
        ),
      )
    adapted0, frozen0 = params_lib.split(params0, mask)
    _, frozen = params_lib.split(state.params, mask)
    self.assertTrue(test_utils.trees_equal(frozen0, frozen))
    if adapted0 and case.moves:
      moved = not test_utils.trees_equal(params0, state.params)
      self.assertTrue(moved, 'no adapted parameter changed')

    # Deterministic given the rng.
    state_b, outs_b = run()
    for a, b in zip(outs, outs_b, strict=True):
      np.testing.assert_array_equal(a.logits, b.logits)
    self.assertTrue(test_utils.trees_equal(state, state_b))

    # No recompilation after the first step (the stream never retraces).
    self.assertEqual(step._cache_size(), 1)

    # lax.scan over the stream equals the Python loop (to float32 rounding:
    # XLA fuses a scanned step differently from a standalone one).
    scan_state, scan_out = jax.jit(
      lambda s, e: unroll(adapter, s, e, meta=meta)
    )(state0, test_utils.stack_batches(batches))
    np.testing.assert_allclose(
      scan_out.logits,
      np.stack([o.logits for o in outs]),
      rtol=1e-4,
      atol=1e-4,
    )
    test_utils.assert_trees_close(scan_state, state, rtol=1e-4, atol=1e-4)

    # A padded batch with a mask adapts exactly like the unpadded batch.
    s_pad = s_cut = state0
    for i, batch in enumerate(batches):
      pad = dict(batch)
      pad['image'] = batch['image'].copy()
      pad['image'][12:] = np.random.default_rng(i).normal(
        size=pad['image'][12:].shape
      )
      pad['mask'] = np.arange(16) < 12
      s_pad, o_pad = step(s_pad, pad, meta=meta)
      s_cut, o_cut = step(s_cut, {'image': batch['image'][:12]}, meta=meta)
      np.testing.assert_allclose(
        o_pad.logits[:12], o_cut.logits, rtol=2e-4, atol=2e-4
      )

    # NaN / Inf rows (valid or padding) act as padding, the state stays
    # finite, and later batches score as they do without the bad rows.
    bad = dict(batches[1], image=batches[1]['image'].copy())
    bad['image'][3, 0, 0, 0] = np.nan
    bad['image'][5] = np.inf
    bad['image'][14, 2, 2, 0] = -np.inf  # a padding row
    bad['mask'] = np.arange(16) != 14
    good = dict(batches[1], mask=~np.isin(np.arange(16), [3, 5, 14]))
    keep = good['mask']
    s, _ = step(state0, batches[0], meta=meta)
    s_bad, o_bad = step(s, bad, meta=meta)
    s_good, o_good = step(s, good, meta=meta)
    for leaf in jax.tree.leaves(s_bad):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        self.assertTrue(np.all(np.isfinite(leaf)))
    self.assertEqual(float(o_bad.metrics['invalid_rows']), 2.0)
    self.assertEqual(float(o_bad.metrics['skipped_update']), 0.0)
    np.testing.assert_allclose(
      o_bad.logits[keep], o_good.logits[keep], rtol=1e-5, atol=1e-6
    )
    _, after_bad = step(s_bad, batches[2], meta=meta)
    _, after_good = step(s_good, batches[2], meta=meta)
    np.testing.assert_allclose(
      after_bad.logits, after_good.logits, rtol=1e-5, atol=1e-6
    )

  @parameterized.named_parameters(
    *_named([c for c in method_cases.CASES if c.meta is not None])
  )
  def test_meta_gradient_finite_nonzero(self, case):
    adapter, variables, meta = _build(case)
    batches = test_utils.stack_batches(
      [test_utils.fake_batch(i, 16) for i in range(NUM_STEPS)]
    )

    def loss(meta):
      _, out = unroll(
        adapter,
        adapter.init(variables, jax.random.key(0)),
        {k: v for k, v in batches.items() if k != 'label'},
        meta=meta,
      )
      return jnp.mean(out.logits[..., 0])

    grads = jax.grad(loss)(meta)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    self.assertTrue(all(np.isfinite(norms)))
    self.assertGreater(sum(norms), 0.0)


if __name__ == '__main__':
  absltest.main()
