"""Stream protocols: coverage, order, resets, padding, determinism."""

import numpy as np
from absl.testing import absltest, parameterized

from tta_jax.data import sources, streams


def _domains(sizes=(50, 50, 30), num_classes=5):
  out = []
  for d, n in enumerate(sizes):
    labels = np.arange(n) % num_classes
    images = np.full((n, 4, 4, 1), d, np.float32)
    images[:, 0, 0, 0] = np.arange(n)  # the example's index, readable
    out.append(sources.Domain(f'd{d}', sources.ArraySource(images, labels)))
  return out


def _examples(plan, domains):
  """(domain, index) of every valid example, in stream order."""
  out = []
  for sb in streams.iterate(plan, domains):
    m = sb.batch['mask']
    for d, i in zip(
      sb.batch['domain'][m],
      sb.batch['image'][m, 0, 0, 0].astype(int),
      strict=True,
    ):
      out.append((int(d), int(i)))
  return out


class StreamsTest(parameterized.TestCase):
  @parameterized.parameters(*streams.SETTINGS)
  def test_every_example_exactly_once(self, setting):
    domains = _domains()
    plan = streams.plan(setting, domains, batch_size=8, seed=0)
    seen = _examples(plan, domains)
    expected = {
      (d, i) for d, dom in enumerate(domains) for i in range(len(dom))
    }
    self.assertLen(seen, len(expected))
    self.assertEqual(set(seen), expected)
    self.assertEqual(plan.num_examples, len(expected))

  @parameterized.parameters(*streams.SETTINGS)
  def test_fixed_shapes_padding_and_labels(self, setting):
    domains = _domains()
    plan = streams.plan(setting, domains, batch_size=8, seed=0)
    batches = list(streams.iterate(plan, domains))
    self.assertLen(batches, plan.num_batches)
    for sb in batches:
      self.assertEqual(sb.batch['image'].shape, (8, 4, 4, 1))
      for key in ('label', 'mask', 'domain'):
        self.assertEqual(sb.batch[key].shape, (8,))
      m = sb.batch['mask']
      # Valid rows come first; labels match the examples read.
      self.assertTrue(np.all(m[: m.sum()]))
      idx = sb.batch['image'][m, 0, 0, 0].astype(int)
      np.testing.assert_array_equal(sb.batch['label'][m], idx % 5)

  def test_resets(self):
    domains = _domains()
    flags = {}
    for setting in ('reset_each_shift', 'continual', 'mixed_domains'):
      plan = streams.plan(setting, domains, batch_size=8)
      flags[setting] = [sb.reset for sb in streams.iterate(plan, domains)]
    # 50, 50, 30 examples -> 7, 7, 4 batches per domain.
    self.assertEqual(
      [i for i, r in enumerate(flags['reset_each_shift']) if r], [0, 7, 14]
    )
    self.assertEqual([i for i, r in enumerate(flags['continual']) if r], [0])
    self.assertEqual(
      [i for i, r in enumerate(flags['mixed_domains']) if r], [0]
    )

  def test_domain_order_and_no_mixing_within_batches(self):
    domains = _domains()
    for setting in ('continual', 'reset_each_shift', 'gradual'):
      plan = streams.plan(setting, domains, batch_size=8)
      order = []
      for sb in streams.iterate(plan, domains):
        doms = set(sb.batch['domain'][sb.batch['mask']].tolist())
        self.assertLen(doms, 1)
        order.append(doms.pop())
      self.assertEqual(order, sorted(order))
    plan = streams.plan('mixed_domains', domains, batch_size=8)
    mixed = [
      len(set(sb.batch['domain'][sb.batch['mask']].tolist()))
      for sb in streams.iterate(plan, domains)
    ]
    self.assertGreater(max(mixed), 1)

  def test_deterministic_and_seeded(self):
    domains = _domains()
    a = _examples(
      streams.plan('mixed_domains', domains, batch_size=8, seed=1), domains
    )
    b = _examples(
      streams.plan('mixed_domains', domains, batch_size=8, seed=1), domains
    )
    c = _examples(
      streams.plan('mixed_domains', domains, batch_size=8, seed=2), domains
    )
    self.assertEqual(a, b)
    self.assertNotEqual(a, c)

  def test_correlated_sorted_by_label(self):
    domains = _domains((60,))
    plan = streams.plan('correlated', domains, batch_size=8)
    labels = [i % 5 for _, i in _examples(plan, domains)]
    self.assertEqual(labels, sorted(labels))

  def test_dirichlet_is_correlated_and_delta_controls_it(self):
    labels = np.repeat(np.arange(10), 100)

    def switches(delta, seed):
      order = streams.dirichlet_order(
        labels, delta, np.random.default_rng(seed)
      )
      self.assertEqual(sorted(order.tolist()), list(range(1000)))
      return np.mean(labels[order][1:] != labels[order][:-1])

    iid = np.mean(
      labels[np.random.default_rng(0).permutation(1000)][1:]
      != labels[np.random.default_rng(0).permutation(1000)][:-1]
    )
    low = np.mean([switches(0.01, s) for s in range(3)])
    high = np.mean([switches(100.0, s) for s in range(3)])
    self.assertLess(low, 0.05)  # long runs of one class
    self.assertLess(low, high)
    self.assertGreater(iid, 0.8)

  def test_batch_size_one(self):
    domains = _domains((5, 3))
    plan = streams.plan('continual', domains, batch_size=1)
    batches = list(streams.iterate(plan, domains))
    self.assertLen(batches, 8)
    self.assertTrue(all(sb.batch['mask'].all() for sb in batches))

  def test_resume_from_start(self):
    domains = _domains()
    plan = streams.plan('continual', domains, batch_size=8)
    full = list(streams.iterate(plan, domains))
    tail = list(streams.iterate(plan, domains, start=5))
    self.assertEqual([sb.index for sb in tail], list(range(5, len(full))))
    np.testing.assert_array_equal(
      tail[0].batch['image'], full[5].batch['image']
    )

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, 'valid:'):
      streams.plan('episodic', _domains(), batch_size=8)
    empty = sources.Domain(
      'e',
      sources.ArraySource(np.zeros((0, 4, 4, 1), np.float32), np.zeros(0, int)),
    )
    with self.assertRaisesRegex(ValueError, 'no examples'):
      streams.plan('continual', [empty], batch_size=8)
    with self.assertRaisesRegex(ValueError, 'at least one domain'):
      streams.plan('continual', [], batch_size=8)
    with self.assertRaisesRegex(ValueError, 'batch_size'):
      streams.plan('continual', _domains(), batch_size=0)


if __name__ == '__main__':
  absltest.main()
