r"""GeneralizeFormer, leave-one-domain-out on rotated digits (offline, CPU).

Each of the six Rotated-MNIST domains (0, 15, ..., 75 degrees; DomainBed's
angles, on the 5,000 embedded MNIST digits) is held out in turn; the other
five are the labelled source domains. Meta-training trains the source model
and GeneralizeFormer's generator on the sources only; adaptation evaluates
it beside Source, BN adaptation, Tent and T3A on the held-out domain.

  python -m experiments.meta_train_main \
      --config=configs/generalizeformer_dg.py --workdir=$WORKDIR
  python -m experiments.adapt_main \
      --config=configs/generalizeformer_dg.py --workdir=$WORKDIR

Arguments (comma-separated, e.g. `:ablations` or `:shift=corrupted`):
  small: a seconds-long run for tests (3 domains, 1 held out, a one-layer
    generator).
  ablations: also the paper's ablations as method variants, each with its
    own meta-trained generator: without gradients, without features,
    without meta-learning, BN only, classifier only (same WORKDIR: what is
    done is reused).
  shift=corrupted: the corruption domains instead (clean MNIST and five
    corruption families at severity 5).
  sweep: also the hyperparameter variants of `SWEEP`, each meta-trained;
    `experiments.generalizeformer_analyses` ranks them by their
    source-domain validation accuracy (the meta-trainer's model-selection
    score on the source domains' validation parts), never by held-out
    error.

Deviations from the paper's sizes (CPU budget): the digits CNN is 8 wide,
and the generator has 2 layers, d_model 128, 2 heads, FF 256 and 32-wide
tokens (the CNN's widest BN layer and its feature are 32 wide) instead of 8
layers of 512 over 512-wide tokens; the factory
defaults stay the paper's. `configs/generalizeformer_pacs.py` runs the
paper's generator on ResNet-18/50 over PACS, VLCS, Office-Home,
TerraIncognita and DomainNet.
"""

import ml_collections

from configs import common

# The digits-scale generator (see the module docstring). Gradients are
# divided by their joint RMS (the factory default is the code's raw
# gradients): raw entropy gradients (~1e-3) are invisible beside theta_s
# and z to an input projection trained at lr 1e-4.
DIGITS_GENERATOR = {
  'num_layers': 2,
  'd_model': 128,
  'num_heads': 2,
  'ff_dim': 256,
  'token_width': 32,
  'grad_norm': 'global_rms',
}

# The paper's ablations: variant name -> (adapter kwargs, trainer overrides).
ABLATIONS = {
  'generalizeformer_no_grads': ({'use_grads': False}, {}),
  'generalizeformer_no_features': ({'use_features': False}, {}),
  'generalizeformer_no_meta': ({}, {'backbone': 'source'}),
  'generalizeformer_bn': ({'generate': 'bn'}, {}),
  'generalizeformer_classifier': ({'generate': 'classifier'}, {}),
}

# Hyperparameter variants (`:sweep`), one change each from the defaults:
# variant name -> (adapter kwargs, trainer overrides).
SWEEP = {
  'generalizeformer_steps2000': ({}, {'steps': 2000, 'eval_every': 250}),
  'generalizeformer_lr3x': ({}, {'learning_rate': 3e-4}),
  'generalizeformer_dropout0': ({'dropout': 0.0}, {}),
  'generalizeformer_raw_grads': ({'grad_norm': 'none'}, {}),
  'generalizeformer_layers4': ({'num_layers': 4}, {}),
}


def meta_train_config(**overrides) -> ml_collections.ConfigDict:
  """The meta-trainer's settings (`generalizeformer.meta_train`).

  backbone: 'meta_source' (one backbone per source domain, trained on the
    others: episodes adapt it to the domain it never saw), 'joint' (the
    official code's alternating loop) or 'source' (no meta-learning).
  """
  cfg = {
    'backbone': 'meta_source',
    # Meta-source backbones ('meta_source'); 0: config.pretrain.epochs. On
    # rotated digits, 3-epoch backbones (56-63 % val error vs the source
    # model's 16 %) gave a phi that raised held-out and source error.
    'backbone_epochs': 0,
    'backbone_learning_rate': 1e-4,  # 'joint': AdamW, the code's fc lr
    'backbone_batch_size': 128,  # 'joint'
    'steps': 600,
    'batch_size': 64,  # meta-target batch = the test batch size
    'episode_length': 1,  # batches per episode (> 1 for accumulate=True)
    # AdamW from 1e-4: the code's 1e-2 only ever trained a Huber target,
    # and the cross-entropy through the generated parameters diverges at it.
    'learning_rate': 1e-4,
    'weight_decay': 5e-4,
    'grad_clip': 1.0,
    'first_order': False,
    'remat': False,
    'eval_every': 100,  # source-validation model selection
  }
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def add_generalizeformer(
  config, generator, trainer, *, ablations=False, sweep=False
):
  """Adds `generalizeformer` (and the ablation / sweep variants)."""
  names = ['generalizeformer']
  config.method_configs.generalizeformer = dict(generator)
  config.meta_train.generalizeformer = trainer
  variants = {**(ABLATIONS if ablations else {}), **(SWEEP if sweep else {})}
  for name, (kwargs, overrides) in variants.items():
    config.method_configs[name] = {
      'method': 'generalizeformer',
      **generator,
      **kwargs,
    }
    variant = trainer.copy_and_resolve_references()
    variant.update(overrides)
    config.meta_train[name] = variant
    names.append(name)
  config.meta_methods = ','.join(names)
  return names


def get_config(arg=None):
  arg = common.parse_arg(
    arg, small=False, ablations=False, sweep=False, shift='rotated'
  )
  config = common.base_config()
  if arg.shift == 'rotated':
    config.data.name = 'digits_rotated_dg'
    config.data.rotations = (0, 15, 30, 45, 60, 75)
  elif arg.shift == 'corrupted':
    config.data.name = 'digits_corrupted_dg'
    config.data.severity = 5
  else:
    raise ValueError(f'shift must be rotated or corrupted, got {arg.shift!r}')
  config.data.held_out = 'all'
  config.model.name = 'digits_cnn'
  # Width 8 (the spine's digits CNN has 16): every meta-training step runs
  # the backbone four times; this keeps the whole run on 2 CPU cores.
  config.model.width = 8
  config.batch_size = 64
  config.setting = 'continual'  # one held-out domain per stream
  trainer = meta_train_config()
  generator = dict(DIGITS_GENERATOR)
  if arg.small:
    common.shrink(config)
    config.data.rotations = (0, 45, 75)
    config.data.dg_domains = ('clean', 'gaussian_noise', 'contrast')
    config.data.held_out = 'rot75' if arg.shift == 'rotated' else 'contrast'
    config.pretrain.epochs = 1
    trainer = meta_train_config(
      backbone_epochs=1, steps=4, eval_every=2, batch_size=32
    )
    generator.update(num_layers=1, d_model=32, ff_dim=64)
  names = add_generalizeformer(
    config, generator, trainer, ablations=arg.ablations, sweep=arg.sweep
  )
  if arg.small and 'generalizeformer_steps2000' in config.meta_train:
    config.meta_train.generalizeformer_steps2000.update(steps=8, eval_every=4)
  config.methods = ','.join(['source', 'norm', 'tent', 't3a', *names])
  return config
