"""RoTTA: RBN arithmetic, the CSTU bank, the update schedule, the weights."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from tta_jax import models, testing as test_utils
from tta_jax._src import augment, losses, memory_bank, params as params_lib
from tta_jax.methods import rotta as rotta_lib
from tta_jax.models.vision import layers

SHAPE = (4, 4, 1)


class _BNLinear(nn.Module):
  """BN straight on the pixels, then a linear head: stats are checkable."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, *, bn_mode=None, mask=None):
    x = layers.BatchNorm(name='bn')(x, bn_mode, mask)
    z = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, name='head')(z), {'pre_logits': z}


def _bn_linear():
  module = _BNLinear()
  variables = models.init_variables(module, SHAPE, jax.random.key(1))
  variables['batch_stats'] = {
    'bn': {'mean': jnp.array([0.3]), 'var': jnp.array([0.5])}
  }
  return models.make_apply_fn(module, SHAPE), variables


def _moments(x):
  x = np.asarray(x, np.float64)
  return x.mean(), x.var()


class OfficialCSTU:
  """List-based port of BIT-DA/RoTTA `core/utils/memory.py` (CSTU)."""

  def __init__(self, capacity, num_class, lambda_t=1.0, lambda_u=1.0):
    self.capacity, self.num_class = capacity, num_class
    self.per_class = capacity / num_class
    self.lambda_t, self.lambda_u = lambda_t, lambda_u
    self.data = [[] for _ in range(num_class)]  # [item id, unc, age]

  def score(self, age, unc):
    return self.lambda_t / (1 + math.exp(-age / self.capacity)) + (
      self.lambda_u * unc / math.log(self.num_class)
    )

  def add(self, item, cls, unc):
    if self._make_room(cls, self.score(0, unc)):
      self.data[cls].append([item, unc, 0])
    for items in self.data:
      for it in items:
        it[2] += 1

  def _make_room(self, cls, new_score):
    occupancy = sum(len(d) for d in self.data)
    if len(self.data[cls]) < self.per_class:
      if occupancy < self.capacity:
        return True
      most = max(len(d) for d in self.data)
      classes = [c for c in range(self.num_class) if len(self.data[c]) == most]
    else:
      classes = [cls]
    best = None
    for c in classes:
      for i, (_, unc, age) in enumerate(self.data[c]):
        s = self.score(age, unc)
        if best is None or s >= best[0]:
          best = (s, c, i)
    if best is None:
      return True
    if best[0] > new_score:
      self.data[best[1]].pop(best[2])
      return True
    return False

  def contents(self):
    return sorted(
      (int(it[0]), c, int(it[2])) for c, d in enumerate(self.data) for it in d
    )


def _bank_contents(memory):
  valid = np.asarray(memory.valid)
  ids = np.asarray(memory.images).reshape(len(valid), -1)[:, 0]
  return sorted(
    (int(round(i)), int(c), int(a))
    for i, c, a in zip(
      ids[valid],
      np.asarray(memory.labels)[valid],
      np.asarray(memory.age)[valid],
      strict=True,
    )
  )


class MemoryBankTest(absltest.TestCase):
  def _add_all(
    self, capacity, num_classes, labels, uncs, *, active=None, lambda_t=1.0
  ):
    memory = memory_bank.init(capacity, (1, 1, 1))
    add = jax.jit(
      lambda m, x, c, u, a: memory_bank.add(
        m, x, c, u, num_classes=num_classes, lambda_t=lambda_t, active=a
      )
    )
    for i, (c, u) in enumerate(zip(labels, uncs, strict=True)):
      a = True if active is None else bool(active[i])
      memory = add(memory, jnp.full((1, 1, 1), float(i)), c, u, a)
    return memory

  def test_hand_built_sequence(self):
    # Capacity 4, 3 classes: the quota is 4/3, so a class under quota holds
    # at most one item, and once the bank is full a newcomer of an
    # under-quota class evicts from the majority classes.
    labels = [0, 0, 1, 1, 2, 0]
    uncs = [0.1, 0.2, 0.9, 0.3, 0.05, 0.01]
    memory = self._add_all(4, 3, labels, uncs)
    # Items 0, 1 (class 0; the second still fits: one item is under 4/3),
    # 2, 3 (class 1) fill the bank. Item 4 (class 2) evicts the highest
    # score of the majority classes {0, 1}: item 2 (uncertainty 0.9).
    # Item 5 (class 0, at quota) evicts class 0's highest score, item 1.
    self.assertEqual(
      _bank_contents(memory), [(0, 0, 6), (3, 1, 3), (4, 2, 2), (5, 0, 1)]
    )

  def test_under_quota_newcomer_evicts_from_the_majority_classes_only(self):
    # Capacity 5, 3 classes (quota 5/3): after 0, 0, 1, 1, 2 the bank is
    # full with counts (2, 2, 1). A second class-2 sample is under quota and
    # evicts the best score of classes {0, 1} (item 0), not the higher score
    # of the very uncertain class-2 item 4.
    memory = self._add_all(
      5, 3, [0, 0, 1, 1, 2, 2], [0.1, 0.1, 0.1, 0.1, 1.0, 0.0]
    )
    self.assertEqual(
      _bank_contents(memory),
      [(1, 0, 5), (2, 1, 4), (3, 1, 3), (4, 2, 2), (5, 2, 1)],
    )

  def test_ties_go_to_the_highest_class_then_the_most_recent_item(self):
    # lambda_t = 0: equal uncertainties give equal scores.
    memory = self._add_all(
      4, 2, [0, 0, 1, 1, 0], [0.5] * 4 + [0.1], lambda_t=0.0
    )
    self.assertEqual([i for i, *_ in _bank_contents(memory)], [0, 2, 3, 4])
    memory = self._add_all(
      4, 3, [0, 0, 1, 1, 2], [0.5] * 4 + [0.1], lambda_t=0.0
    )
    self.assertEqual([i for i, *_ in _bank_contents(memory)], [0, 1, 2, 4])

  def test_rejects_a_newcomer_that_scores_higher(self):
    # Class 0 at quota (capacity 2, 2 classes): a very uncertain newcomer
    # scores above every stored item and is dropped; the ages still grow.
    memory = self._add_all(2, 2, [0, 1, 0], [0.0, 0.0, 0.69])
    self.assertEqual(_bank_contents(memory), [(0, 0, 3), (1, 1, 2)])

  def test_matches_the_official_list_implementation(self):
    rng = np.random.default_rng(0)
    labels = rng.choice(4, 150, p=[0.55, 0.25, 0.15, 0.05])
    uncs = rng.uniform(0, math.log(4), 150).astype(np.float32)
    memory = self._add_all(10, 4, labels, uncs)
    ref = OfficialCSTU(10, 4)
    for i, (c, u) in enumerate(zip(labels, uncs, strict=True)):
      ref.add(i, int(c), float(u))
    self.assertEqual(_bank_contents(memory), ref.contents())
    counts = np.bincount(np.asarray(memory.labels)[memory.valid], minlength=4)
    self.assertLessEqual(counts.max(), math.ceil(10 / 4))
    self.assertEqual(int(memory.valid.sum()), 10)

  def test_inactive_rows_change_nothing(self):
    labels, uncs = [0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4]
    memory = self._add_all(4, 3, labels, uncs, active=[1, 0, 1, 0])
    ref = self._add_all(4, 3, [0, 2], [0.1, 0.3])
    self.assertEqual(_bank_contents(memory), [(0, 0, 2), (2, 2, 1)])
    np.testing.assert_array_equal(memory.age, ref.age)
    np.testing.assert_array_equal(memory.labels, ref.labels)


class TimelinessTest(absltest.TestCase):
  def test_weights(self):
    ages = jnp.array([0, 32, 64, 640])
    expected = [
      np.exp(-a / 64) / (1 + np.exp(-a / 64)) for a in [0, 32, 64, 640]
    ]
    np.testing.assert_allclose(
      memory_bank.timeliness_weights(ages, 64), expected, rtol=1e-6
    )
    self.assertEqual(
      float(memory_bank.timeliness_weights(jnp.array(0), 8)), 0.5
    )


class RottaStepTest(absltest.TestCase):
  def test_one_update_by_hand(self):
    apply_fn, variables = _bn_linear()
    lr, alpha, nu = 1e-2, 0.05, 0.001
    adapter = rotta_lib.rotta(
      apply_fn,
      optax.adam(lr),
      input_shape=SHAPE,
      memory_size=8,
      update_frequency=8,
      nu=nu,
      alpha=alpha,
    )
    rng = jax.random.key(3)
    state = adapter.init(variables, rng)
    batch = test_utils.fake_batch(0, 8, shape=SHAPE, labels=False)
    new, out = jax.jit(adapter.step)(state, batch)
    src_mean, src_var = 0.3, 0.5

    # The scored logits: the (source) teacher in eval mode, before the update.
    expected = apply_fn(
      variables['params'], variables['batch_stats'], batch['image']
    )
    np.testing.assert_allclose(out.logits, expected.logits, rtol=1e-6)
    self.assertEqual(float(out.metrics['updates']), 1.0)

    memory = new.extra.memory
    valid = np.asarray(memory.valid)
    self.assertGreater(valid.sum(), 0)
    # Teacher RBN: (1 - alpha) source + alpha bank statistics (ddof 0).
    m, v = _moments(np.asarray(memory.images)[valid])
    np.testing.assert_allclose(
      new.batch_stats['bn']['mean'], [(1 - alpha) * src_mean + alpha * m], 1e-5
    )
    np.testing.assert_allclose(
      new.batch_stats['bn']['var'], [(1 - alpha) * src_var + alpha * v], 1e-5
    )
    # Student RBN: the same on the strong views (key: rng folded with the
    # number of samples seen when the update fires).
    strong = augment.cotta_augment(jax.random.fold_in(rng, 8), memory.images)
    m, v = _moments(np.asarray(strong)[valid])
    np.testing.assert_allclose(
      new.extra.student_stats['bn']['mean'],
      [(1 - alpha) * src_mean + alpha * m],
      1e-5,
    )
    np.testing.assert_allclose(
      new.extra.student_stats['bn']['var'],
      [(1 - alpha) * src_var + alpha * v],
      1e-5,
    )

    # Student: one Adam step on the timeliness-weighted soft cross-entropy.
    mask = params_lib.bn_affine(variables['params'], variables['batch_stats'])
    student0, frozen = params_lib.split(variables['params'], mask)
    rbn = layers.BNMode(source_weight=1 - alpha)
    target = apply_fn(
      variables['params'],
      variables['batch_stats'],
      memory.images,
      bn_mode=rbn,
      mask=memory.valid,
    ).logits
    weights = jax.nn.sigmoid(-np.asarray(memory.age) / 8.0)

    def loss(student):
      logits = apply_fn(
        params_lib.merge(student, frozen),
        variables['batch_stats'],
        strong,
        bn_mode=rbn,
        mask=memory.valid,
      ).logits
      ce = losses.soft_cross_entropy(logits, target)
      return jnp.sum(jnp.where(valid, weights * ce, 0.0)) / valid.sum()

    grads = jax.grad(loss)(student0)
    student = jax.tree.map(
      lambda p, g: p - lr * g / (jnp.abs(g) + 1e-8), student0, grads
    )
    test_utils.assert_trees_close(new.extra.student, student, 1e-5, 1e-6)
    # Teacher: EMA of the student on the adapted leaves; the rest untouched.
    teacher, teacher_frozen = params_lib.split(new.params, mask)
    test_utils.assert_trees_close(
      teacher,
      jax.tree.map(lambda t, s: (1 - nu) * t + nu * s, student0, student),
      1e-6,
      1e-7,
    )
    self.assertTrue(test_utils.trees_equal(teacher_frozen, frozen))

  def test_updates_fire_every_update_frequency_samples(self):
    apply_fn, variables = _bn_linear()
    adapter = rotta_lib.rotta(
      apply_fn,
      optax.adam(1e-3),
      input_shape=SHAPE,
      memory_size=6,
      update_frequency=4,
    )
    step = jax.jit(adapter.step)
    state = adapter.init(variables, jax.random.key(0))
    # Valid samples per batch: 6, 3, 6, 1, 6 -> totals 6, 9, 15, 16, 22:
    # updates at 4 | 8 | 12 | 16 | 20 -> 1, 1, 1, 1, 1; a batch of 2 after
    # 22 (24) fires once more, one of 1 after that (25) not at all.
    expected = [1, 1, 1, 1, 1, 1, 0]
    valid_counts = [6, 3, 6, 1, 6, 2, 1]
    seen = 0
    for i, (n_valid, n_updates) in enumerate(
      zip(valid_counts, expected, strict=True)
    ):
      batch = test_utils.fake_batch(i, 6, shape=SHAPE, labels=False)
      batch['mask'] = np.arange(6) < n_valid
      before = state
      state, out = step(state, batch)
      seen += n_valid
      self.assertEqual(int(state.extra.seen), seen)
      self.assertEqual(float(out.metrics['updates']), n_updates, i)
      moved = not test_utils.trees_equal(before.params, state.params)
      self.assertEqual(moved, n_updates > 0, i)

  def test_matches_a_sample_by_sample_reference(self):
    # Mid-batch updates (f = 4 in batches of 9) and padding: the step's
    # bookkeeping-then-updates order equals the official per-sample loop.
    apply_fn, variables = _bn_linear()
    lr, alpha, nu, size, freq = 1e-2, 0.05, 0.01, 6, 4
    rng = jax.random.key(5)
    masks = [np.ones(9, bool), np.arange(9) % 3 != 1, np.ones(9, bool)]
    batches = [
      dict(test_utils.fake_batch(i, 9, shape=SHAPE, labels=False), mask=m)
      for i, m in enumerate(masks)
    ]
    adapter = rotta_lib.rotta(
      apply_fn,
      optax.adam(lr),
      input_shape=SHAPE,
      memory_size=size,
      update_frequency=freq,
      nu=nu,
      alpha=alpha,
    )
    state = adapter.init(variables, rng)
    step = jax.jit(adapter.step)
    outs = []
    for batch in batches:
      state, out = step(state, batch)
      outs.append(out.logits)

    mask_tree = params_lib.bn_affine(
      variables['params'], variables['batch_stats']
    )
    student, frozen = params_lib.split(variables['params'], mask_tree)
    teacher, opt = student, optax.adam(lr)
    t_stats = s_stats = variables['batch_stats']
    opt_state = opt.init(student)
    rbn = layers.BNMode(source_weight=1 - alpha)

    @jax.jit
    def update(models, memory, seen):
      teacher, t_stats, student, s_stats, opt_state = models
      target = apply_fn(
        params_lib.merge(teacher, frozen),
        t_stats,
        memory.images,
        bn_mode=rbn,
        mask=memory.valid,
      )
      strong = augment.cotta_augment(
        jax.random.fold_in(rng, seen), memory.images
      )
      w = memory_bank.timeliness_weights(memory.age, size)

      def loss(student):
        o = apply_fn(
          params_lib.merge(student, frozen),
          s_stats,
          strong,
          bn_mode=rbn,
          mask=memory.valid,
        )
        ce = losses.soft_cross_entropy(o.logits, target.logits)
        return losses.masked_mean(ce * w, memory.valid), o.batch_stats

      (_, s_stats), g = jax.value_and_grad(loss, has_aux=True)(student)
      upd, opt_state = opt.update(g, opt_state, student)
      student = optax.apply_updates(student, upd)
      teacher = jax.tree.map(
        lambda t, s: (1 - nu) * t + nu * s, teacher, student
      )
      return teacher, target.batch_stats, student, s_stats, opt_state

    add = jax.jit(lambda m, x, c, u: memory_bank.add(m, x, c, u, num_classes=3))
    memory, seen, n_updates = memory_bank.init(size, SHAPE), 0, 0
    for batch, logits in zip(batches, outs, strict=True):
      ref = apply_fn(
        params_lib.merge(teacher, frozen), t_stats, batch['image']
      ).logits
      np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-6)
      p = jax.nn.softmax(ref)
      unc = -jnp.sum(p * jnp.log(p + 1e-6), -1)
      for i in np.flatnonzero(batch['mask']):
        memory = add(memory, batch['image'][i], jnp.argmax(ref[i]), unc[i])
        seen += 1
        if seen % freq == 0:
          n_updates += 1
          teacher, t_stats, student, s_stats, opt_state = update(
            (teacher, t_stats, student, s_stats, opt_state), memory, seen
          )
    self.assertEqual(n_updates, 6)
    test_utils.assert_trees_close(
      state.params, params_lib.merge(teacher, frozen), 1e-5, 1e-6
    )
    test_utils.assert_trees_close(state.batch_stats, t_stats, 1e-5, 1e-6)
    test_utils.assert_trees_close(state.extra.student, student, 1e-5, 1e-6)
    test_utils.assert_trees_close(state.extra.student_stats, s_stats, 1e-5)
    test_utils.assert_trees_close(state.extra.memory, memory, 1e-6, 1e-6)
    self.assertEqual(int(state.extra.seen), seen)

  def test_vmapped_streams_match_single_streams(self):
    # The runner vmaps streams; there the update's cond becomes a select.
    apply_fn, variables = _bn_linear()
    adapter = rotta_lib.rotta(
      apply_fn,
      optax.adam(1e-2),
      input_shape=SHAPE,
      memory_size=6,
      update_frequency=5,
    )
    batches = [
      [test_utils.fake_batch(10 * s + t, 6, shape=SHAPE, labels=False)
       for t in range(2)]
      for s in range(2)
    ]  # fmt: skip
    batches[1][0]['mask'] = np.arange(6) < 4  # stream 1 fires later
    batches[0][0]['mask'] = np.ones(6, bool)
    batches[1][1]['mask'] = batches[0][1]['mask'] = np.ones(6, bool)
    step = jax.jit(adapter.step)
    vstep = jax.jit(jax.vmap(adapter.step))
    singles = [adapter.init(variables, jax.random.key(s)) for s in range(2)]
    states = jax.tree.map(lambda *xs: jnp.stack(xs), *singles)
    for t in range(2):
      states, vout = vstep(
        states, test_utils.stack_batches([batches[s][t] for s in range(2)])
      )
      for s in range(2):
        singles[s], out = step(singles[s], batches[s][t])
        np.testing.assert_allclose(vout.logits[s], out.logits, 1e-5, 1e-6)
        np.testing.assert_array_equal(
          vout.metrics['updates'][s], out.metrics['updates']
        )
    for s in range(2):
      test_utils.assert_trees_close(
        jax.tree.map(lambda x, s=s: x[s], states), singles[s], 1e-5, 1e-6
      )

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'input_shape'):
      rotta_lib.rotta(None, optax.adam(1e-3))


if __name__ == '__main__':
  absltest.main()
