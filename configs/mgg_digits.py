r"""MGG (MGTTA) on the embedded corruption benchmark (MNIST -> MNIST-C + UCI).

Pre-trains MGG on 128 unlabelled images of the validation stream's shifts
(the four held-out corruptions of the source-val digits, disjoint from the
15 test corruptions and the test digits), then compares it with source, BN
adaptation, Tent and SAR in the paper's reset-per-domain setting:

  python -m experiments.meta_train_main --config=configs/mgg_digits.py \
      --workdir=$WORKDIR
  python -m experiments.adapt_main --config=configs/mgg_digits.py \
      --workdir=$WORKDIR

`:model=vit` runs everything on the small digits ViT (MGG adapts every
LayerNorm, as the paper's ViT-B/16; Tent and SAR adapt the same
LayerNorms); the default is the digits CNN (every BN affine). `:analyses`
adds the paper's analyses as variants (`experiments.mgg_analyses` turns
them into tables and the update-count plot): pre-training on 32 / 512
images, the memory-layer ablation (an MLP of the same width), alpha at
test 5e-3 beside 1e-3, and DeYO. `:sweep` adds MGG at other alphas (the
same pre-trained MGG) and Tent / SAR at other learning rates, to select on
the validation stream (`:sweep,validation=true`). `:small` shrinks
everything for tests.
"""

import ml_collections

from configs import common, default

# Every LayerNorm affine of a timm-layout ViT (`norm1`, `norm2`, `norm`).
LAYER_NORMS = r're:(^|/)norm[^/]*/(scale|bias)$'
FEATURES = {
  'cnn': ('stage1', 'stage2', 'stage3'),  # pooled stage outputs
  'vit': ('block_cls',),  # each block's normalised CLS token (MGTTA)
}


# Selected on the validation stream (`:sweep,validation=true`): MGG's alpha at
# test, and Tent's / SAR's Adam learning rate, beside the paper's defaults.
ALPHAS = (1e-3, 5e-3, 1e-2, 3e-2)
LRS = (1e-3, 5e-3, 1e-2)


def _tag(x: float) -> str:
  """0.005 -> '0p005' (config field names cannot hold dots)."""
  return f'{x:g}'.replace('.', 'p')


def trainer_config(**overrides) -> ml_collections.ConfigDict:
  """`config.meta_train.mgg`: MGTTA's pre-training (see trainers/mgg.py)."""
  config = ml_collections.ConfigDict(
    {
      'epochs': 40,
      'batch_size': 2,
      'num_images': 128,
      'learning_rate': 1e-2,  # Adam on phi
      'train_lr': 1e-4,  # alpha during pre-training
      # True: restart the adapted parameters every epoch (recommended);
      # False: the paper's parity mode (they drift across all 40 epochs).
      'reset_params_each_epoch': True,
      'stats_images': 1000,  # clean source-train images
      'val_batch_size': 64,
      'val_examples': 0,
      'eval_every': 1,
    }
  )
  config.update(overrides)
  return config


def add_mgg_variant(config, name, method=None, trainer=None) -> None:
  """An `mgg` variant with its own pre-training (`trainer` overrides)."""
  config.method_configs[name] = {
    **config.method_configs.mgg.to_dict(),
    'method': 'mgg',
    **(method or {}),
  }
  config.methods += f',{name}'
  if trainer is not None:
    variant = config.meta_train.mgg.copy_and_resolve_references()
    variant.update(trainer)
    config.meta_train[name] = variant
    config.meta_methods += f',{name}'


def get_config(arg=None):
  arg = common.parse_arg(
    arg,
    small=False,
    model='cnn',
    analyses=False,
    sweep=False,
    validation=False,
  )
  if arg.model not in FEATURES:
    raise ValueError(f'model must be one of {sorted(FEATURES)}: {arg.model!r}')
  config = default.get_config('small' if arg.small else None)
  config.setting = 'reset_each_shift'  # the paper: reset per corruption
  config.seeds = '0,1,2'
  config.methods = 'source,norm,tent,sar,mgg'
  config.meta_methods = 'mgg'
  config.meta_train.mgg = trainer_config()
  config.method_configs.mgg.features = FEATURES[arg.model]
  if arg.model == 'vit':
    config.model = ml_collections.ConfigDict({'name': 'digits_vit'})
    config.pretrain.epochs = 40  # a ViT from scratch needs longer
    # No BN statistics: norm would only reproduce the source model.
    config.methods = ','.join(
      m for m in config.methods.split(',') if m != 'norm'
    )
    for name in ('tent', 'sar', 'deyo'):
      config.method_configs[name].adapt = LAYER_NORMS
  if arg.analyses:
    for n in (32, 512):
      add_mgg_variant(config, f'mgg_{n}_images', {}, {'num_images': n})
    add_mgg_variant(config, 'mgg_mlp', {'generator': 'mlp'}, {})
    add_mgg_variant(
      config, 'mgg_parity', {}, {'reset_params_each_epoch': False}
    )
    add_mgg_variant(
      config, 'mgg_alpha_0p005', {'learning_rate': 5e-3, 'meta_from': 'mgg'}
    )
    config.methods += ',deyo'
  if arg.sweep:  # the same pre-trained MGG at other alphas; Tent/SAR lrs
    for a in ALPHAS:
      name = f'mgg_alpha_{_tag(a)}'
      if name not in config.method_configs:
        add_mgg_variant(config, name, {'learning_rate': a, 'meta_from': 'mgg'})
    for lr in LRS:
      for base in ('tent', 'sar'):
        config.method_configs[f'{base}_lr_{_tag(lr)}'] = {
          **config.method_configs[base].to_dict(),
          'method': base,
          'optimizer': {
            **config.method_configs[base].optimizer,
            'learning_rate': lr,
          },
        }
        config.methods += f',{base}_lr_{_tag(lr)}'
  if arg.small:
    config.data.corruptions = ('gaussian_noise', 'defocus_blur')
    config.data.natural_shift = False
    config.model.width = 8 if arg.model == 'cnn' else 16
    config.pretrain.epochs = 2
    config.seeds = '0'
    for name in config.meta_train:
      config.meta_train[name].update(
        epochs=2, num_images=8, stats_images=64, val_examples=32
      )
  if arg.validation:
    common.validation_stream(config)
  return config
