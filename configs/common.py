"""Shared pieces of the benchmark configs."""

import ml_collections

from tta_jax.data import benchmarks
from tta_jax.data.images import corruptions

# The 15 ImageNet-C corruption families, in the standard order.
CORRUPTIONS = corruptions.CORRUPTIONS


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style `get_config` argument: `'small,severity=3'`.

  Bare words set booleans to True; `key=value` pairs are parsed with the
  type of the default. Unknown keys fail, listing the valid ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in (p.strip() for p in (arg or '').split(',') if p.strip()):
    key, _, value = part.partition('=')
    if key not in defaults:
      raise ValueError(
        f'unknown config argument {key!r}; valid: {sorted(defaults)}'
      )
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = type(default)(value)
  return out


def method_configs(*, imagenet: bool = False):
  """Every registered method at its paper's defaults, plus named variants.

  The keys of each entry are the factory's keyword arguments (plus
  `optimizer`), so `--config.method_configs.tent.steps=2` works. An entry
  with a `method` key is a variant of that registered method under another
  name (`norm_ema` is `norm` with a momentum), so variants and sweeps run
  side by side in one table.
  """
  adam = {'name': 'adam', 'learning_rate': 1e-3, 'b1': 0.9, 'b2': 0.999}
  sgd = {'name': 'sgd', 'learning_rate': 2.5e-4, 'momentum': 0.9}
  # CIFAR-scale defaults (Adam 1e-3) unless `imagenet` (SGD 2.5e-4, m 0.9).
  tent_opt = sgd if imagenet else adam
  return ml_collections.ConfigDict(
    {
      'source': {},
      # Nado et al.: test-batch statistics only (BN-1 of MD, Marsden &
      # Doebler's test-time-adaptation benchmark code).
      'norm': {'source_weight': 0.0},
      # Schneider et al.: source statistics as a prior of strength N.
      'norm_prior': {'method': 'norm', 'prior_strength': 16.0},
      # MD's BN-alpha (alpha 0.1 on the batch).
      'norm_alpha': {'method': 'norm', 'source_weight': 0.9},
      # BN-EMA: running statistics across the stream.
      'norm_ema': {'method': 'norm', 'momentum': 0.1},
      'tent': {'optimizer': dict(tent_opt), 'steps': 1},
      # EATA / ETA: MD's CIFAR settings (Adam 1e-3, d_margin 0.4, Fisher
      # alpha 1) or the paper's ImageNet ones (SGD 2.5e-4, 0.05, 2000).
      'eata': {
        'optimizer': dict(tent_opt),
        'margin_e0': 0.4,
        'd_margin': 0.05 if imagenet else 0.4,
        'fisher_alpha': 2000.0 if imagenet else 1.0,
      },
      'eta': {
        'optimizer': dict(tent_opt),
        'margin_e0': 0.4,
        'd_margin': 0.05 if imagenet else 0.4,
      },
      # SAR: rho 0.05, recovery at EMA entropy 0.2; MD CIFAR: Adam 1e-3.
      'sar': {
        'optimizer': dict(tent_opt),
        'margin_e0': 0.4,
        'rho': 0.05,
        'reset_constant': 0.2,
      },
      # CoTTA: MD's CIFAR settings (Adam 1e-3, AP 0.92, restore 0.01) or
      # the official ImageNet ones (SGD 0.01 Nesterov, AP 0.1, 0.001).
      'cotta': {
        'optimizer': (
          {
            'name': 'sgd',
            'learning_rate': 0.01,
            'momentum': 0.9,
            'nesterov': True,
          }
          if imagenet
          else dict(adam)
        ),
        'ema_momentum': 0.999,
        'restore_prob': 0.001 if imagenet else 0.01,
        'ap_threshold': 0.1 if imagenet else 0.92,
        'num_augmentations': 32,
        'symmetric_loss': imagenet,
        'augment_strength': 'imagenet' if imagenet else 'cifar',
      },
      # MEMO: marginal entropy over AugMix views of each test point, one SGD
      # step, episodic; CIFAR: 32 views, lr 0.005; ImageNet: 64, 2.5e-4.
      'memo': {
        'optimizer': {
          'name': 'sgd',
          'learning_rate': 2.5e-4 if imagenet else 0.005,
        },
        'num_augmentations': 64 if imagenet else 32,
        'source_weight': 0.9,
        'preaugment': 'resized_crop' if imagenet else 'crop',
      },
      # LAME: kNN affinity (k=5) on the penultimate features, output only.
      'lame': {'affinity': 'knn', 'knn': 5, 'bound_lambda': 1.0},
      # T3A: entropy-filtered supports (filter_k=100).
      't3a': {'filter_k': 100},
      # RoTTA (official rotta.yaml): Adam 1e-3, memory 64, update every 64.
      'rotta': {
        'optimizer': dict(adam),
        'memory_size': 64,
        'update_frequency': 64,
        'nu': 0.001,
        'alpha': 0.05,
        'augment_strength': 'imagenet' if imagenet else 'cifar',
      },
      # Meta-TTT (authors' meta_sup.sh): tau 0.8, GEM-T, one max step on
      # the last BN's bias then one min step on the other BN affine, SGD
      # 1e-2 each, learned alpha (needs its meta_train backbone, see
      # configs/meta_ttt_digits.py), episodic per batch.
      'meta_ttt': {
        'threshold': 0.8,
        'loss': 'gem_t',
        'max_lr': 1e-2,
        'min_lr': 1e-2,
        'steps': 1,
      },
      # GeneralizeFormer: the paper's 8-layer, 512-wide generator of BN
      # affine + classifier per batch, stateless; needs its meta-trained
      # generator (meta_train_main, see configs/generalizeformer_dg.py).
      'generalizeformer': {'generate': 'both', 'accumulate': False},
      # TPT: per image, 63 random resized crops + the image, the 10 % most
      # confident views, one AdamW step (lr 5e-3, torch's weight decay
      # 0.01) on the prompt context; needs a vision-language model (see
      # configs/vlm_digits.py).
      'tpt': {
        'optimizer': {
          'name': 'adamw',
          'learning_rate': 5e-3,
          'b1': 0.9,
          'b2': 0.999,
          'eps': 1e-8,
          'weight_decay': 0.01,
        },
        'n_views': 64,
        'selection_ratio': 0.1,
        'steps': 1,
        'flip': True,
        'crop_scale': (0.08, 1.0),
      },
      # MGG (MGTTA): FOA's loss (lambda 0.4) refined by the pre-trained
      # gradient generator, alpha 1e-3 (run.sh); needs its pre-training
      # (meta_train_main, see configs/mgg_digits.py). 'block_cls' is the
      # ViTs' per-block CLS features; BN convnets name their stages.
      'mgg': {
        'learning_rate': 1e-3,
        'fitness_lambda': 0.4,
        'features': ('block_cls',),
      },
      # STSS (TLLA's test stage, no backprop): TPT's 64 views, each scored
      # by its worst-case entropy under R = 16 prompt perturbations of
      # radius 0.5 (CLIP token-embedding units; R is not in the paper's
      # main text), the hard vote of the 6 flattest (s, likewise); needs
      # a vision-language model (see configs/vlm_digits.py).
      'stss': {
        'n_views': 64,
        'n_selected': 6,
        'n_perturbations': 16,
        'rho': 0.5,
        'sharpness_weight': 1.0,
        'vote': 'hard',
        'flip': True,
        'crop_scale': (0.08, 1.0),
      },
      # ZERO: the hard vote of TPT's 10 % most confident views (STSS at
      # rho' = 0).
      'zero': {
        'n_views': 64,
        'n_selected': 6,
        'vote': 'hard',
        'flip': True,
        'crop_scale': (0.08, 1.0),
      },
      # DeYO (official defaults): tau_Ent 0.5 ln K, Ent_0 0.4 ln K, PLPD
      # threshold 0.2, 4x4 patch shuffle.
      'deyo': {
        'optimizer': dict(tent_opt),
        'margin': 0.5,
        'margin_e0': 0.4,
        'plpd_threshold': 0.2,
        'patch_len': 4,
      },
    }
  )


def base_config() -> ml_collections.ConfigDict:
  """The fields every adaptation config has (their defaults here)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # model init and method rngs
  config.seeds = '0'  # stream-order seeds, comma-separated ('0,1,2')
  config.data = ml_collections.ConfigDict(
    {
      'name': 'digits_corrupted',
      'corruptions': CORRUPTIONS,
      'severity': 5,
      'corruption_seed': 0,
      'natural_shift': True,
      # 'val': the shifts act on the source-val digits (validation_stream).
      'target_split': 'test',
      'rotations': (0, 15, 30, 45, 60, 75),
      # Leave-one-domain-out benchmarks: the domains and which to hold out.
      'dg_domains': (
        'clean',
        'gaussian_noise',
        'defocus_blur',
        'fog',
        'contrast',
        'jpeg_compression',
      ),
      'held_out': 'all',
      'train_size': 3500,
      'val_size': 500,
      'test_size': 1000,
      'split_seed': 0,
      'max_examples_per_domain': 0,  # 0: all
      'num_classes': 10,
      'loader_kwargs': ml_collections.ConfigDict(),  # full-scale loaders
    }
  )
  config.model = ml_collections.ConfigDict({'name': 'digits_cnn', 'width': 16})
  # A directory written by pretrain_main; empty: WORKDIR/source.
  config.source_ckpt = ''
  config.pretrain = ml_collections.ConfigDict(
    {
      'epochs': 12,
      'batch_size': 128,
      'learning_rate': 3e-3,
      'weight_decay': 5e-4,
      'bn_momentum': 0.9,
      'max_translation': 2,
      # A checkpoint to start from (e.g. ImageNet weights converted by
      # experiments.convert_torch_main); '' trains from scratch.
      'init_ckpt': '',
    }
  )
  config.methods = 'source,norm,tent'  # comma-separated, compared side by side
  config.method_configs = method_configs()
  config.setting = 'continual'  # see tta_jax.data.streams.SETTINGS
  config.batch_size = 64
  config.dirichlet_delta = 0.0  # correlated settings: 0 sorts by label
  config.num_source_images = 500  # clean source examples (EATA's Fisher)
  config.clean_eval_examples = 1000  # forgetting check on the clean split
  config.parallel = ''  # '', 'domains' (episodic) or 'seeds': vmapped streams
  config.shard_batch = False  # shard each batch over all devices
  # Shard the vmapped streams of `parallel` over all devices (always on in
  # a run of several processes, see tta_jax.runners.distributed).
  config.shard_streams = False
  # Rows with NaN or Inf pixels: 'skip' masks them out of adaptation and
  # scores them as errors (counted in results.json); 'raise' stops the run.
  config.nonfinite = 'skip'
  # Meta-training (experiments.meta_train_main): which methods meta-learn,
  # and each one's settings (config.meta_train.<method>).
  config.meta_methods = ''
  config.meta_train = ml_collections.ConfigDict()
  config.results_name = 'results'  # WORKDIR/<results_name>.{json,md,...}
  config.checkpoint_every = 50  # batches; 0 disables stream checkpoints
  config.log_every = 50  # batches between trainers' progress lines
  # Progress of the adaptation runs: a line (or, on a terminal, a progress
  # bar) at least every this many seconds, with ETAs.
  config.progress_seconds = 10.0
  config.tensorboard = False  # per-batch metrics in WORKDIR/tensorboard
  return config


def validation_stream(config: ml_collections.ConfigDict) -> None:
  """The `validation` switch: select hyperparameters without the test set.

  The stream becomes the four held-out corruptions of Hendrycks &
  Dietterich (`VALIDATION_CORRUPTIONS`, severity 5) applied to the
  source-val digits (`benchmarks.use_validation_shifts`): neither the test
  digits nor the 15 test corruptions (nor the UCI digits) are seen. Results
  go to `WORKDIR/validation.*`, so the test results in the same WORKDIR
  are kept.
  """
  benchmarks.use_validation_shifts(config.data)
  config.results_name = 'validation'


def shrink(config: ml_collections.ConfigDict) -> None:
  """The `small` switch: short runs for tests that still mean something.

  The source model trains in well under a minute to a clean test error
  under 10 % (1,000 digits, 6 epochs of batch 32 at learning rate 1e-2,
  a width-8 CNN), so adaptation measurably helps on the small corruption
  stream and end-to-end tests can assert it.
  """
  config.data.corruptions = ('gaussian_noise', 'defocus_blur', 'contrast')
  config.data.train_size = 1000
  config.data.val_size = 100
  config.data.test_size = 100
  config.data.max_examples_per_domain = 100
  config.model.width = 8
  config.pretrain.epochs = 6
  config.pretrain.batch_size = 32
  config.pretrain.learning_rate = 1e-2
  config.batch_size = 32
  config.num_source_images = 64
  config.clean_eval_examples = 64
  config.checkpoint_every = 2
  config.log_every = 2
