"""CLIP at ImageNet scale: the packaged class names and templates, the
checkpoint converter (`models.vlm.clip_convert`, behind
experiments/convert_clip_main.py) on random CLIPs in OpenAI's layout, and
`configs/vlm_imagenet.py`'s 200-class masks."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import vlm_imagenet
from tta_jax import models
from tta_jax.data import benchmarks
from tta_jax.data.images import full_scale
from tta_jax.models import vlm
from tta_jax.models.vlm import clip_convert, clip_import, imagenet
from tta_jax.runners import artifacts


def test_class_names_and_templates():
  names = imagenet.classnames()
  assert len(names) == 1000
  assert names[:3] == ('tench', 'goldfish', 'great white shark')
  assert names[-1] == 'toilet paper'
  wnids = imagenet.wnids()
  assert list(wnids) == sorted(wnids) and len(set(wnids)) == 1000
  templates = imagenet.templates()
  assert len(templates) == 80 and templates[0] == 'a bad photo of a {}.'
  for subset in (full_scale.IMAGENET_A_WNIDS, full_scale.IMAGENET_R_WNIDS):
    idx = imagenet.subset_indices(subset)
    assert len(idx) == 200 and np.all(np.diff(idx) > 0)
    assert imagenet.classnames(subset) == tuple(names[i] for i in idx)
  # ImageNet-A's first class in label order: n01498041, the stingray.
  assert imagenet.classnames(full_scale.IMAGENET_A_WNIDS)[0] == 'stingray'
  with pytest.raises(ValueError, match='not ImageNet-1k wnids'):
    imagenet.subset_indices(['n00000000'])


def test_wnids_are_tfds_label_order():
  from tta_jax.data.images import tfds_sources

  assert list(imagenet.wnids()) == tfds_sources.imagenet_wnids()


def test_named_lists_in_the_model():
  module = vlm.clip_classifier(
    classnames='imagenet',
    prompt='ensemble',
    templates='imagenet',
    arch_overrides=vlm_imagenet.SMALL_ARCHS['ViT-B/16'],
  )
  assert np.asarray(module.class_ids).shape[:2] == (80, 1000)
  with pytest.raises(ValueError, match='unknown classnames'):
    vlm.clip_classifier(classnames='imagenet21k')


def _block(rng, prefix, w):
  return {
    f'{prefix}.ln_1.weight': 1 + 0.1 * rng.normal(size=w),
    f'{prefix}.ln_1.bias': 0.1 * rng.normal(size=w),
    f'{prefix}.attn.in_proj_weight': rng.normal(size=(3 * w, w)) / w**0.5,
    f'{prefix}.attn.in_proj_bias': 0.1 * rng.normal(size=3 * w),
    f'{prefix}.attn.out_proj.weight': rng.normal(size=(w, w)) / w**0.5,
    f'{prefix}.attn.out_proj.bias': 0.1 * rng.normal(size=w),
    f'{prefix}.ln_2.weight': 1 + 0.1 * rng.normal(size=w),
    f'{prefix}.ln_2.bias': 0.1 * rng.normal(size=w),
    f'{prefix}.mlp.c_fc.weight': rng.normal(size=(4 * w, w)) / w**0.5,
    f'{prefix}.mlp.c_fc.bias': 0.1 * rng.normal(size=4 * w),
    f'{prefix}.mlp.c_proj.weight': rng.normal(size=(w, 4 * w)) / (2 * w**0.5),
    f'{prefix}.mlp.c_proj.bias': 0.1 * rng.normal(size=w),
  }


def _bn(rng, prefix, c):
  return {
    f'{prefix}.weight': 1 + 0.1 * rng.normal(size=c),
    f'{prefix}.bias': 0.1 * rng.normal(size=c),
    f'{prefix}.running_mean': 0.1 * rng.normal(size=c),
    f'{prefix}.running_var': rng.uniform(0.5, 2.0, size=c),
    f'{prefix}.num_batches_tracked': np.zeros(()),
  }


def random_clip_state(a: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """A random CLIP state dict in OpenAI's layout for architecture `a`
  (`vlm_imagenet.SMALL_ARCHS`-style)."""
  rng = np.random.default_rng(seed)
  tw, e = a['text_width'], a['embed_dim']
  s = {
    'token_embedding.weight': 0.02 * rng.normal(size=(a['vocab_size'], tw)),
    'positional_embedding': 0.01 * rng.normal(size=(a['context_length'], tw)),
    'ln_final.weight': np.ones(tw),
    'ln_final.bias': np.zeros(tw),
    'text_projection': rng.normal(size=(tw, e)) / tw**0.5,
    'logit_scale': np.asarray(np.log(50.0)),
  }
  for i in range(a['text_layers']):
    s.update(_block(rng, f'transformer.resblocks.{i}', tw))
  w = a['vision_width']
  if a['patch_size'] is not None:
    p, grid = a['patch_size'], a['image_size'] // a['patch_size']
    s.update(
      {
        'visual.conv1.weight': rng.normal(size=(w, 3, p, p)) / (3 * p * p),
        'visual.class_embedding': rng.normal(size=w) / w**0.5,
        'visual.positional_embedding': rng.normal(size=(grid**2 + 1, w))
        / w**0.5,
        'visual.ln_pre.weight': np.ones(w),
        'visual.ln_pre.bias': np.zeros(w),
        'visual.ln_post.weight': np.ones(w),
        'visual.ln_post.bias': np.zeros(w),
        'visual.proj': rng.normal(size=(w, e)) / w**0.5,
      }
    )
    for i in range(a['vision_layers']):
      s.update(_block(rng, f'visual.transformer.resblocks.{i}', w))
  else:
    half = w // 2
    for i, (cin, cout) in enumerate(((3, half), (half, half), (half, w)), 1):
      s[f'visual.conv{i}.weight'] = rng.normal(size=(cout, cin, 3, 3)) / 3
      s.update(_bn(rng, f'visual.bn{i}', cout))
    cin = w
    for stage, blocks in enumerate(a['vision_layers']):
      planes = w * 2**stage
      for j in range(blocks):
        pre = f'visual.layer{stage + 1}.{j}'
        s[f'{pre}.conv1.weight'] = rng.normal(size=(planes, cin, 1, 1)) / cin
        s[f'{pre}.conv2.weight'] = rng.normal(size=(planes, planes, 3, 3)) / 9
        s[f'{pre}.conv3.weight'] = rng.normal(size=(4 * planes, planes, 1, 1))
        for k, c in ((1, planes), (2, planes), (3, 4 * planes)):
          s.update(_bn(rng, f'{pre}.bn{k}', c))
        if j == 0:
          s[f'{pre}.downsample.0.weight'] = rng.normal(
            size=(4 * planes, cin, 1, 1)
          )
          s.update(_bn(rng, f'{pre}.downsample.1', 4 * planes))
        cin = 4 * planes
    spatial = a['image_size'] // 32
    s['visual.attnpool.positional_embedding'] = (
      rng.normal(size=(spatial**2 + 1, cin)) / cin**0.5
    )
    for n in ('q_proj', 'k_proj', 'v_proj'):
      s[f'visual.attnpool.{n}.weight'] = rng.normal(size=(cin, cin)) / cin**0.5
      s[f'visual.attnpool.{n}.bias'] = 0.1 * rng.normal(size=cin)
    s['visual.attnpool.c_proj.weight'] = rng.normal(size=(e, cin)) / cin**0.5
    s['visual.attnpool.c_proj.bias'] = 0.1 * rng.normal(size=e)
  return {k: np.asarray(v, np.float32) for k, v in s.items()}


def _fake_benchmark(config):
  return benchmarks.Benchmark('fake', [], (224, 224, 3), 1000)


@pytest.mark.parametrize('arch', ['vit_b16', 'rn50'])
def test_converted_checkpoint_is_the_configs_source(tmp_path, arch):
  from safetensors.numpy import save_file

  config = vlm_imagenet.get_config(f'arch={arch},small')
  a = vlm_imagenet.SMALL_ARCHS[config.model.arch]
  path = tmp_path / 'clip.safetensors'
  save_file(random_clip_state(a), str(path))
  out = tmp_path / 'src'
  metadata = clip_convert.convert(path, out)
  assert metadata['model']['arch'] == config.model.arch
  assert metadata['num_classes'] == 1000
  with pytest.raises(ValueError, match='holds a checkpoint'):
    clip_convert.convert(path, out)

  # What the runner does with --config.source_ckpt=out.
  config.source_ckpt = str(out)
  bench = _fake_benchmark(config)
  module, apply_fn = artifacts.build_model(config.model, bench)
  variables, _ = artifacts.load_source(config, tmp_path / 'wd', bench, module)
  # The same variables as importing the checkpoint directly (whose logits
  # match open_clip's: tests/vlm_parity_test.py).
  _, ref_vars = clip_import.load(path, imagenet.classnames())
  jax.tree.map(
    np.testing.assert_array_equal,
    variables,
    {'batch_stats': {}, **ref_vars},
  )
  # The context starts as "a photo of a" under the checkpoint's embedding.
  ids = jnp.asarray(module.ctx_init)
  np.testing.assert_allclose(
    variables['params']['prompt']['ctx'],
    variables['params']['text']['token_embedding']['embedding'][ids],
  )

  # A config for another architecture refuses it.
  other = vlm_imagenet.get_config('arch=vit_b16')
  other.source_ckpt = str(out)
  module, _ = artifacts.build_model(other.model, bench)
  with pytest.raises(ValueError, match='trained with model='):
    artifacts.load_source(other, tmp_path / 'wd', bench, module)


def test_published_sizes_are_named():
  from tta_jax.models.vlm import clip

  for name, a in clip.ARCHS.items():
    config = clip_convert.model_config(dict(a), 'imagenet', True)
    assert config == {
      'name': 'vlm_clip',
      'arch': name,
      'classnames': 'imagenet',
      'quick_gelu': True,
    }
    assert {k: v for k, v in config.items() if k != 'name'}.items() <= {
      **vlm_imagenet.get_config(
        'arch=' + {'ViT-B/16': 'vit_b16', 'RN50': 'rn50'}[name]
      ).model.to_dict()
    }.items()


def _fake_folder(root: pathlib.Path, wnids, per_class=1):
  for i, w in enumerate(wnids):
    (root / w).mkdir(parents=True)
    for j in range(per_class):
      img = np.full((8, 10, 3), (i * 7 + j) % 256, np.uint8)
      Image.fromarray(img).save(root / w / f'{j}.png')


@pytest.mark.parametrize(
  'dataset,wnids',
  [('a', full_scale.IMAGENET_A_WNIDS), ('r', full_scale.IMAGENET_R_WNIDS)],
)
def test_200_class_mask(tmp_path, dataset, wnids):
  _fake_folder(tmp_path / 'data', wnids)
  config = vlm_imagenet.get_config(f'dataset={dataset},small')
  config.data.loader_kwargs.folder = str(tmp_path / 'data')
  config.data.max_examples_per_domain = 0
  config.data.clean_name = config.data.source_train_name = ''  # not here
  bench = benchmarks.build(config.data, config.setting)
  subset = imagenet.subset_indices(wnids)
  np.testing.assert_array_equal(bench.class_subset, subset)
  assert bench.num_classes == 1000
  (domain,) = bench.domains
  labels = domain.source[np.arange(len(domain.source))]['label']
  np.testing.assert_array_equal(np.sort(labels), np.arange(200))

  if dataset != 'a':
    return  # the logits' mask is the same code for both
  module, full_fn = artifacts.build_model(config.model, bench)
  variables = models.init_variables(module, (224, 224, 3), jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2, 224, 224, 3))
  full = jax.jit(full_fn)(variables['params'], variables['batch_stats'], x)
  full = full.logits
  apply_fn, v = artifacts.model_variant(config, 'zero_shot', variables, bench)
  logits = jax.jit(apply_fn)(v['params'], v['batch_stats'], x).logits
  np.testing.assert_allclose(logits, full[:, subset], rtol=1e-6)
  text, _ = jax.eval_shape(apply_fn.class_head, v['params'])
  assert text.shape[0] == 200


def test_v2_folder_labels(tmp_path):
  root = tmp_path / 'v2'
  _fake_folder(root, ['0', '7', '999'])
  (domain,) = full_scale.load_domains(
    'imagenet_v2', folder=str(root), image_size=32, resize_size=32
  )
  batch = domain.source[np.arange(3)]
  assert sorted(batch['label'].tolist()) == [0, 7, 999]
  assert batch['image'].shape == (3, 32, 32, 3)
  bad = tmp_path / 'bad'
  _fake_folder(bad, ['n01440764'])
  with pytest.raises(ValueError, match='label indices'):
    full_scale.load_domains('imagenet_v2', folder=str(bad))


def test_bad_arguments():
  with pytest.raises(ValueError, match='dataset must be'):
    vlm_imagenet.get_config('dataset=c')
  with pytest.raises(ValueError, match='arch must be'):
    vlm_imagenet.get_config('arch=vit_l14')
