"""Every config builds, and its model and methods instantiate (abstractly)."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from tta_jax import methods, models
from tta_jax._src import params as params_lib
from tta_jax.runners import adapt, configs

CONFIGS = sorted(
  p.stem
  for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py')
  if p.stem not in ('__init__', 'common')
)
# Input shapes of the full-scale benchmarks (their data is not here).
INPUT_SHAPES = {
  'cifar10c': (32, 32, 3),
  'imagenet_c': (224, 224, 3),
  'mgg_imagenet': (224, 224, 3),
  'vlm_imagenet': (224, 224, 3),
}


class ConfigsTest(parameterized.TestCase):
  def test_configs_found(self):
    self.assertContainsSubset(
      {'default', 'rotated_digits', 'cifar10c', 'imagenet_c'}, CONFIGS
    )

  @parameterized.parameters(*[(c, a) for c in CONFIGS for a in ('', 'small')])
  def test_builds_and_instantiates(self, name, arg):
    module = importlib.import_module(f'configs.{name}')
    config = module.get_config(arg)
    config.lock()
    with self.assertRaises((AttributeError, KeyError)):
      config.no_such_field = 1
    if config.get('runner') == 'lm':  # language-model configs: runners.lm
      from tta_jax.runners import lm

      self.assertNotEmpty(lm.validate_config(config))
      return
    names = adapt.validate_config(config)
    self.assertNotEmpty(names)
    shape = INPUT_SHAPES.get(name, (28, 28, 1))
    model = models.build(
      config.model.name,
      num_classes=config.data.num_classes,
      **{k: v for k, v in config.model.items() if k != 'name'},
    )
    x = jnp.zeros((2, *shape))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = {
      'params': variables['params'],
      'batch_stats': variables.get('batch_stats', {}),  # none in a ViT
    }
    apply_fn = models.make_apply_fn(model, shape)
    context = {
      'source_images': np.zeros((4, *shape), np.float32),
      'input_shape': shape,
    }
    for method in config.method_configs:
      adapter = methods.from_config(
        configs.resolve(config, method, methods.METHODS),
        configs.method_kwargs(config, method),
        apply_fn,
        **context,
      )
      del adapter  # building validates every key of the method's config

  def test_imagenet_sar_and_deyo_skip_the_last_stage(self):
    from configs import imagenet_c

    config = imagenet_c.get_config()
    model = models.build('resnet50', num_classes=1000)
    v = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3))
    )
    for name in ('sar', 'deyo'):
      mask = methods.mask_from_spec(config.method_configs[name].adapt)(
        v['params'], v['batch_stats']
      )
      selected = params_lib.selected_paths(v['params'], mask)
      self.assertContainsSubset({'layer3_5/bn3/scale', 'bn1/bias'}, selected)
      self.assertFalse([k for k in selected if 'layer4' in k], name)
      self.assertNotIn('layer3_5/conv1/kernel', selected)

  def test_every_registered_method_has_a_default_config(self):
    from configs import common

    self.assertContainsSubset(
      set(methods.METHODS), set(common.method_configs())
    )


if __name__ == '__main__':
  absltest.main()
