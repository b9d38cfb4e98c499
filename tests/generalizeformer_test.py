"""GeneralizeFormer: token layout, identity at init, meta-gradients, e2e."""

import json
import pathlib
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from flax import traverse_util
from PIL import Image

from configs import generalizeformer_dg, generalizeformer_pacs
from tta_jax import models, testing as test_utils
from tta_jax._src import checkpoint, losses, params as params_lib
from tta_jax.data import benchmarks
from tta_jax.methods import generalizeformer as gf
from tta_jax.models.generators import generalizeformer as generator_lib
from tta_jax.runners import adapt, artifacts, report, train
from tta_jax.trainers import generalizeformer as gf_trainer

# A one-layer, 16-wide generator over 8-wide tokens (the tiny net's BN
# layers are 4, 4, 8 and 16 wide; its classifier rows 16).
TINY = {
  'num_layers': 1,
  'd_model': 16,
  'num_heads': 2,
  'ff_dim': 32,
  'token_width': 8,
  'grad_norm': 'global_rms',
}


def _net(dtype=jnp.float32):
  _, apply_fn, variables = test_utils.tiny_bn_net(0)
  return apply_fn, jax.tree.map(lambda x: jnp.asarray(x, dtype), variables)


def _theta(variables, generate='both'):
  mask = gf.generation_mask(generate)(
    variables['params'], variables['batch_stats']
  )
  return params_lib.split(variables['params'], mask)[0]


def _perturb_output(phi, scale, seed=0):
  """phi with a random output layer, so that Delta is not zero."""
  r = np.random.default_rng(seed)

  def fn(path, x):
    if any(getattr(p, 'key', None) == 'out' for p in path):
      return x + scale * r.normal(size=x.shape).astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(fn, phi)


def _paths(tree):
  return sorted('/'.join(k) for k in traverse_util.flatten_dict(tree))


def _vdot(a, b):
  return sum(
    float(jnp.vdot(x, y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


class GeneratorTest(absltest.TestCase):
  def test_resnet_token_counts(self):
    # Spec A.2/A.4: ResNet-18 gives 34 BN tokens (17 BN layers, downsample
    # BNs skipped) + K classifier rows; ResNet-50 chunks vectors by 512.
    for name, bn_tokens, head_tokens in (
      ('resnet18', 34, 7),
      ('resnet50', 128, 4 * 7),
    ):
      module = models.build(name, num_classes=7)
      variables = jax.eval_shape(
        lambda m=module: models.init_variables(
          m, (32, 32, 3), jax.random.key(0)
        )
      )
      theta = _theta(variables)
      self.assertNotIn('downsample', ' '.join(_paths(theta)))
      specs = generator_lib.leaf_specs(theta, 512)
      kinds = [generator_lib.TYPES[s.kind] for s in specs]
      self.assertEqual(
        sum(
          s.num_tokens
          for s, k in zip(specs, kinds, strict=True)
          if k != 'head_kernel'
        ),
        bn_tokens,
      )
      self.assertEqual(
        sum(
          s.num_tokens
          for s, k in zip(specs, kinds, strict=True)
          if k == 'head_kernel'
        ),
        head_tokens,
      )
      self.assertNotIn('head_bias', kinds)

  def test_generation_masks(self):
    _, variables = _net()
    self.assertEqual(_paths(_theta(variables, 'classifier')), ['head/kernel'])
    bn = [f'bn{i}/{p}' for i in range(1, 5) for p in ('bias', 'scale')]
    self.assertEqual(_paths(_theta(variables, 'bn')), bn)
    self.assertEqual(_paths(_theta(variables)), sorted(bn + ['head/kernel']))
    self.assertEqual(
      _paths(_theta(variables, 'all')), _paths(variables['params'])
    )
    with self.assertRaisesRegex(ValueError, 'generate must be one of'):
      gf.generation_mask('convs')

  def test_tokens_round_trip_and_pads_are_inert(self):
    _, variables = _net()
    theta = _theta(variables)
    specs = generator_lib.leaf_specs(theta, 8)
    # bn1..bn3 vectors: one token each; bn4 (16): two; head [16, 5]: five
    # rows of two tokens.
    self.assertEqual(sum(s.num_tokens for s in specs), 2 * 3 + 2 * 2 + 10)
    tokens = generator_lib.to_tokens(theta, specs, 8)
    self.assertEqual(tokens.shape, (20, 8))
    self.assertTrue(
      test_utils.trees_equal(generator_lib.from_tokens(tokens, specs, 8), theta)
    )
    # Classifier rows are the kernel's columns (one row per class).
    head = [s for s in specs if s.path == ('head', 'kernel')][0]
    start = sum(s.num_tokens for s in specs[: specs.index(head)])
    np.testing.assert_array_equal(
      tokens[start : start + 2].reshape(-1), theta['head']['kernel'][:, 0]
    )
    # Pads are zero, and whatever they hold is dropped.
    bn1 = specs.index([s for s in specs if s.path == ('bn1', 'scale')][0])
    bn1_start = sum(s.num_tokens for s in specs[:bn1])
    np.testing.assert_array_equal(tokens[bn1_start, 4:], 0.0)
    noisy = tokens.at[bn1_start, 4:].set(7.0)
    self.assertTrue(
      test_utils.trees_equal(generator_lib.from_tokens(noisy, specs, 8), theta)
    )

  def test_structure_and_identity_at_init(self):
    _, variables = _net()
    theta = _theta(variables)
    r = np.random.default_rng(0)
    z = jnp.asarray(r.normal(size=16), jnp.float32)
    g = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape)), theta)
    for kwargs, groups in (
      (TINY, ['generator']),
      (
        {**TINY, 'split_generators': True, 'last_stage': '^bn4'},
        [
          'generator_classifier',
          'generator_last_stage',
          'generator_layers',
        ],
      ),
    ):
      phi = gf.init_meta(variables, jax.random.key(1), **kwargs)
      self.assertEqual(sorted(phi), groups)
      for group in groups:
        out = phi[group]['out']
        self.assertEqual(out['kernel'].shape, (16, 8))
        self.assertFalse(np.any(out['kernel']) or np.any(out['bias']))
      module = generator_lib.ParamGenerator(
        **{k: v for k, v in kwargs.items() if k in gf._ARCH}
      )
      generate = generator_lib.make_generate(module)
      # Zero output layer: theta_t = theta_s bit for bit, any z and g.
      theta_t = generate(phi, theta, z, g)
      self.assertTrue(test_utils.trees_equal(theta_t, theta))
      self.assertTrue(
        test_utils.trees_equal(
          generate(phi, theta, 3 * z, g, jax.random.key(2)), theta
        )
      )
      # A random one: same structure, shapes and dtypes, other values.
      moved = generate(_perturb_output(phi, 0.1), theta, z, g)
      self.assertEqual(jax.tree.structure(moved), jax.tree.structure(theta))
      for a, b in zip(
        jax.tree.leaves(moved), jax.tree.leaves(theta), strict=True
      ):
        self.assertEqual((a.shape, a.dtype), (b.shape, b.dtype))
        self.assertFalse(np.allclose(a, b))


class AdapterTest(absltest.TestCase):
  def test_identity_at_init_is_batch_norm_and_bs1_uses_source_stats(self):
    apply_fn, variables = _net()
    adapter = gf.generalizeformer(apply_fn, **TINY)
    phi = gf.init_meta(variables, jax.random.key(0), **TINY)
    step = jax.jit(adapter.step)
    state = adapter.init(variables, jax.random.key(0))
    batch = test_utils.fake_batch(0, 16, labels=False)
    state1, out = step(state, batch, meta=phi)
    expected = apply_fn(
      variables['params'],
      variables['batch_stats'],
      batch['image'],
      bn_mode=models.BNMode(source_weight=0.0),
    ).logits
    np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-6)
    self.assertEqual(float(out.metrics['delta_norm']), 0.0)
    self.assertEqual(float(out.metrics['source_bn_fallback']), 0.0)
    self.assertTrue(test_utils.trees_equal(state1.params, variables['params']))
    # One valid row (no batch variance): source statistics, and it says so.
    one = test_utils.fake_batch(1, 4, labels=False, mask=[1, 0, 0, 0])
    _, out = step(state, one, meta=phi)
    source = apply_fn(
      variables['params'], variables['batch_stats'], one['image'][:1]
    ).logits
    np.testing.assert_allclose(out.logits[:1], source, rtol=1e-5, atol=1e-6)
    self.assertEqual(float(out.metrics['source_bn_fallback']), 1.0)

  def test_stateless_unless_accumulate(self):
    apply_fn, variables = _net()
    phi = _perturb_output(
      gf.init_meta(variables, jax.random.key(0), **TINY), 0.05
    )
    b1, b2 = (test_utils.fake_batch(i, 16, labels=False) for i in (1, 2))
    for accumulate in (False, True):
      adapter = gf.generalizeformer(apply_fn, accumulate=accumulate, **TINY)
      step = jax.jit(adapter.step)
      fresh = adapter.init(variables, jax.random.key(0))
      after_b1, out1 = step(fresh, b1, meta=phi)
      self.assertGreater(float(out1.metrics['delta_norm']), 0.0)
      _, direct = step(fresh, b2, meta=phi)
      _, second = step(after_b1, b2, meta=phi)
      same = np.allclose(direct.logits, second.logits, rtol=1e-6, atol=1e-6)
      self.assertEqual(same, not accumulate)
      unchanged = test_utils.trees_equal(after_b1.params, variables['params'])
      self.assertEqual(unchanged, not accumulate)

  def test_gradient_input_matches_finite_differences(self):
    with jax.enable_x64(True):
      apply_fn, variables = _net(jnp.float64)
      batch = test_utils.fake_batch(3, 12, labels=False)
      batch = {
        'image': jnp.asarray(batch['image'], jnp.float64),
        'mask': jnp.arange(12) < 10,
      }
      mask_fn = gf.generation_mask('both')
      inputs, forward = gf.generator_inputs(
        apply_fn,
        variables['params'],
        variables['batch_stats'],
        batch,
        mask_fn,
      )

      @jax.jit
      def entropy(theta):
        logits = forward(theta).logits
        return losses.masked_mean(losses.softmax_entropy(logits), batch['mask'])

      theta = inputs.theta_s
      np.testing.assert_allclose(inputs.entropy, entropy(theta), rtol=1e-12)
      r = np.random.default_rng(0)
      v = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape)), theta)
      eps = 1e-5
      fd = (
        entropy(jax.tree.map(lambda t, d: t + eps * d, theta, v))
        - entropy(jax.tree.map(lambda t, d: t - eps * d, theta, v))
      ) / (2 * eps)
      np.testing.assert_allclose(_vdot(inputs.grads, v), fd, rtol=1e-6)
      # z: the mean pooled feature of the valid rows only.
      feats = apply_fn(
        variables['params'],
        variables['batch_stats'],
        batch['image'],
        bn_mode=models.BNMode(source_weight=0.0),
        mask=batch['mask'],
      ).features['pre_logits']
      np.testing.assert_allclose(
        inputs.features, feats[:10].mean(0), rtol=1e-10
      )


class JointBackboneTest(absltest.TestCase):
  def test_joint_backbone_step_fits_a_batch(self):
    # backbone='joint' (the official code's alternating loop) trains the
    # backbone with the source recipe's step.
    apply_fn, variables = _net()
    ctx = types.SimpleNamespace(
      apply_fn=apply_fn, source_recipe={'bn_momentum': 0.9}
    )
    cfg = types.SimpleNamespace(backbone_learning_rate=1e-2)
    tx, step = gf_trainer._backbone_trainer(ctx, cfg)
    batch = test_utils.fake_batch(0, 16)
    opt_state = tx.init(variables['params'])
    losses_seen = []
    for _ in range(20):
      variables, opt_state, loss = step(
        variables, opt_state, batch['image'], batch['label']
      )
      losses_seen.append(float(loss))
    self.assertLess(losses_seen[-1], 0.5 * losses_seen[0])


class MetaGradientTest(absltest.TestCase):
  def test_meta_gradient_is_second_order_and_matches_finite_differences(self):
    # accumulate=True over a two-batch episode: the second batch's
    # gradient input is taken at theta_t of the first, so it depends on
    # phi and first-order meta-gradients differ from the true ones.
    with jax.enable_x64(True):
      apply_fn, variables = _net(jnp.float64)
      kwargs = {**TINY, 'accumulate': True}
      adapter = gf.generalizeformer(apply_fn, **kwargs)
      phi = jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float64),
        gf.init_meta(variables, jax.random.key(0), **kwargs),
      )
      episode = test_utils.stack_batches(
        [test_utils.fake_batch(i, 8) for i in (5, 6)]
      )
      episode['image'] = jnp.asarray(episode['image'], jnp.float64)
      rng = jax.random.key(3)

      def loss(phi, first_order=False):
        return gf_trainer._meta_loss(
          phi, adapter, variables, episode, rng, first_order=first_order
        )[0]

      # One compiled program gives both the values and the gradients.
      value_and_grad = jax.jit(jax.value_and_grad(loss))
      grad = lambda p: value_and_grad(p)[1]
      value = lambda p: value_and_grad(p)[0]
      grad_fo = jax.jit(jax.grad(lambda p: loss(p, True)))
      # At init only the zero output layer gets a gradient (the rest is
      # multiplied by it); it reaches phi (the official code's CE did not).
      g0 = grad(phi)
      out = g0['generator']['out']
      self.assertGreater(float(jnp.linalg.norm(out['kernel'])), 0.0)
      phi = _perturb_output(phi, 0.05)
      g = grad(phi)
      for path, leaf in traverse_util.flatten_dict(g).items():
        self.assertTrue(np.all(np.isfinite(leaf)), path)
      nonzero = [
        float(jnp.linalg.norm(leaf)) > 0
        for leaf in traverse_util.flatten_dict(g).values()
      ]
      self.assertGreater(np.mean(nonzero), 0.9)
      g_fo = grad_fo(phi)
      r = np.random.default_rng(1)
      for _ in range(2):
        v = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape)), phi)
        eps = 1e-6
        fd = (
          value(jax.tree.map(lambda t, d: t + eps * d, phi, v))
          - value(jax.tree.map(lambda t, d: t - eps * d, phi, v))
        ) / (2 * eps)
        np.testing.assert_allclose(_vdot(g, v), fd, rtol=1e-5, atol=1e-9)
        self.assertGreater(abs(_vdot(g_fo, v) - fd), 1e-4 * abs(fd))


# Pretrains a source model and two meta-source backbones, then meta-trains
# and adapts: ~100 s of CPU on 2 cores, too slow for the default suite (run
# with `-m slow`).
@pytest.mark.slow
class EndToEndTest(absltest.TestCase):
  def test_small_meta_train_then_adapt(self):
    config = generalizeformer_dg.get_config('small')
    self.assertEqual(config.methods, 'source,norm,tent,t3a,generalizeformer')
    config.methods = 'norm,generalizeformer'  # the others: compile time
    workdir = pathlib.Path(tempfile.mkdtemp())
    train.run(config, workdir)
    held = workdir / 'dg' / 'rot75'
    metadata = json.loads(
      (held / 'meta' / 'generalizeformer' / 'metadata.json').read_text()
    )
    self.assertBetween(metadata['metrics']['val_accuracy'], 0.0, 1.0)
    # One meta-source backbone per source domain, trained without it.
    self.assertLen(list((workdir / 'meta_backbones').iterdir()), 2)
    phi = artifacts.load_meta(held / 'meta' / 'generalizeformer')
    self.assertIn('generator', phi)
    adapt.run(config, workdir)
    results = json.loads((workdir / 'results.json').read_text())
    self.assertEqual(results['protocol'], 'leave_one_domain_out')
    self.assertEqual(results['domains'], ['rot75'])
    self.assertEqual(list(results['methods']), ['norm', 'generalizeformer'])
    for m in results['methods'].values():
      self.assertBetween(m['mean_error'], 0.0, 1.0)
    # theta_s is never changed: no forgetting.
    ours = results['methods']['generalizeformer']
    self.assertEqual(ours['forgetting'], 0.0)

  def test_pacs_config_on_a_generated_tree(self):
    # configs/generalizeformer_pacs.py end to end: ResNet-18 warm-started
    # from a (random) "ImageNet" checkpoint with another head, meta-source
    # backbones, phi, evaluation; 32x32 images to keep it to minutes.
    root = pathlib.Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for d in ('art_painting', 'cartoon', 'photo', 'sketch'):
      for c in ('dog', 'guitar'):
        (root / d / c).mkdir(parents=True)
        for i in range(8):
          pixels = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
          Image.fromarray(pixels).save(root / d / c / f'{i}.png')
    init = root / 'imagenet_r18'
    module = models.build('resnet18', num_classes=5)
    checkpoint.save_variables(
      init,
      models.init_variables(module, (32, 32, 3), jax.random.key(1)),
      {
        'model': {'name': 'resnet18'},
        'num_classes': 5,
        'input_shape': [32, 32, 3],
      },
    )
    config = generalizeformer_pacs.get_config('small')
    config.data.loader_kwargs.update(data_dir=str(root), image_size=32)
    config.data.held_out = 'sketch'
    config.pretrain.init_ckpt = str(init)
    config.methods = 'source,generalizeformer'
    workdir = root / 'work'
    train.run(config, workdir)
    self.assertLen(list((workdir / 'meta_backbones').iterdir()), 3)
    adapt.run(config, workdir)
    results = json.loads((workdir / 'results.json').read_text())
    self.assertEqual(results['domains'], ['sketch'])
    ours = results['methods']['generalizeformer']
    self.assertBetween(ours['mean_error'], 0.0, 1.0)
    self.assertEqual(ours['forgetting'], 0.0)


class ConfigTest(absltest.TestCase):
  def test_corrupted_domain_generalisation_benchmark(self):
    config = generalizeformer_dg.get_config('small,shift=corrupted')
    ((held, bench),) = benchmarks.targets(config.data, config.setting)
    self.assertEqual(held, 'contrast')
    train, val = bench.meta_source_domains()
    self.assertEqual([d.name for d in train], ['clean', 'gaussian_noise'])
    self.assertLen(val, 2)
    clean = train[0].source[np.arange(64)]['image']
    noisy = train[1].source[np.arange(64)]['image']
    target = bench.domains[0].source[np.arange(64)]['image']
    self.assertEqual(clean.shape, (64, 28, 28, 1))
    # Noise roughens neighbouring pixels; contrast shrinks the spread.
    tv = [np.abs(np.diff(x, axis=2)).mean() for x in (clean, noisy)]
    self.assertGreater(tv[1], 1.4 * tv[0])
    self.assertLess(target.std(), 0.5 * clean.std())
    with self.assertRaisesRegex(ValueError, 'shift must be'):
      generalizeformer_dg.get_config('shift=blur')

  def test_sweep_variants_change_one_setting_each(self):
    base = generalizeformer_dg.get_config()
    config = generalizeformer_dg.get_config('sweep')
    names = adapt.validate_config(config)
    self.assertEqual(
      config.meta_methods.split(','),
      ['generalizeformer', *generalizeformer_dg.SWEEP],
    )
    self.assertContainsSubset(generalizeformer_dg.SWEEP, names)
    default_gen = base.method_configs.generalizeformer.to_dict()
    default_tr = base.meta_train.generalizeformer.to_dict()
    for name, (kwargs, overrides) in generalizeformer_dg.SWEEP.items():
      gen = config.method_configs[name].to_dict()
      self.assertEqual(gen.pop('method'), 'generalizeformer')
      self.assertEqual(gen, {**default_gen, **kwargs})
      self.assertEqual(
        config.meta_train[name].to_dict(), {**default_tr, **overrides}
      )
    small = generalizeformer_dg.get_config('small,sweep')
    self.assertLess(small.meta_train.generalizeformer_steps2000.steps, 100)

  def test_sweep_table_ranks_by_validation_only(self):
    results = {
      'domains': ['a', 'b'],
      'methods': {
        'generalizeformer': {'mean_error': 0.30},
        'generalizeformer_lr3x': {'mean_error': 0.10},
        'generalizeformer_dropout0': {'mean_error': 0.20},
        'generalizeformer_layers4': {'mean_error': 0.05},
      },
    }
    val = {
      'generalizeformer': {'a': 0.8, 'b': 0.9},
      'generalizeformer_lr3x': {'a': 0.7, 'b': 0.7},
      'generalizeformer_dropout0': {'a': 0.9, 'b': 0.9},
      # Not meta-trained on every held-out domain: not ranked.
      'generalizeformer_layers4': {'a': 0.99},
    }
    table = report.validation_ranking(
      results, val, ['generalizeformer', *generalizeformer_dg.SWEEP]
    )
    rows = [r for r in table.splitlines() if r.startswith('| generalize')]
    self.assertEqual(
      [r.split(' | ')[0][2:] for r in rows],
      [
        'generalizeformer_dropout0',
        'generalizeformer',
        'generalizeformer_lr3x',
      ],
    )
    self.assertTrue(rows[0].endswith('| yes |'))
    self.assertIn('| 90.0 | 20.0 |', rows[0])
    self.assertIn('no variant', report.validation_ranking(results, {}, ['x']))

  def test_validation_accuracies_read_the_meta_trainers_metadata(self):
    config = generalizeformer_dg.get_config('small,sweep')
    workdir = pathlib.Path(tempfile.mkdtemp())
    meta = workdir / 'dg' / 'rot75' / 'meta'
    for name, acc in (
      ('generalizeformer', 0.8),
      ('generalizeformer_lr3x', 0.7),
    ):
      (meta / name).mkdir(parents=True)
      (meta / name / 'metadata.json').write_text(
        json.dumps({'metrics': {'val_accuracy': acc, 'best_step': 2}})
      )
    # A trainer without a validation score, and one not in meta_methods.
    (meta / 'generalizeformer_layers4').mkdir()
    (meta / 'generalizeformer_layers4' / 'metadata.json').write_text(
      json.dumps({'metrics': {}})
    )
    (meta / 'stray').mkdir()
    (meta / 'stray' / 'metadata.json').write_text(
      json.dumps({'metrics': {'val_accuracy': 1.0}})
    )
    self.assertEqual(
      train.validation_accuracies(config, workdir),
      {
        'generalizeformer': {'rot75': 0.8},
        'generalizeformer_lr3x': {'rot75': 0.7},
      },
    )

  def test_paper_dataset_configs_build(self):
    for dataset, k in generalizeformer_pacs.NUM_CLASSES.items():
      for arg in (f'dataset={dataset}', f'dataset={dataset},ablations=true'):
        config = generalizeformer_pacs.get_config(arg)
        self.assertEqual(config.data.num_classes, k)
        names = adapt.validate_config(config)
        self.assertIn('generalizeformer', names)
    config = generalizeformer_pacs.get_config('model=resnet50,ablations=true')
    self.assertEqual(config.model.name, 'resnet50')
    self.assertIn('generalizeformer_no_grads', config.meta_methods)
    # The paper's generator: the factory defaults, gradients RMS-normalised.
    self.assertEqual(
      config.method_configs.generalizeformer.to_dict(),
      {'grad_norm': 'global_rms'},
    )
    with self.assertRaisesRegex(ValueError, 'dataset must be one of'):
      generalizeformer_pacs.get_config('dataset=mnist')


if __name__ == '__main__':
  absltest.main()
