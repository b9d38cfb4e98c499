r"""Meta-TTT on CIFAR-10-C / CIFAR-100-C (severity 5), WideResNet-28-10.

For users with the data and a source checkpoint on disk (nothing is
downloaded); see configs/cifar10c.py for the data layouts and the
RobustBench checkpoint conversion. Meta-training reads the clean TFDS
CIFAR train split (`data.source_train_name`, array_record under
`--config.data.source_train_kwargs.data_dir`; model selection uses the
clean test split, `data.clean_kwargs`).

  python -m experiments.meta_train_main \
      --config=configs/meta_ttt_cifar.py:dataset=cifar10 --workdir=$WORKDIR \
      --config.source_ckpt=$SRC --config.data.loader_kwargs.data_dir=$DATA \
      --config.data.source_train_kwargs.data_dir=$TFDS \
      --config.data.clean_kwargs.data_dir=$TFDS
  python -m experiments.adapt_main \
      --config=configs/meta_ttt_cifar.py:dataset=cifar10 --workdir=$WORKDIR \
      --config.source_ckpt=$SRC --config.data.loader_kwargs.data_dir=$DATA

evaluates Meta-TTT beside source, BN and Tent (Tent's reference numbers
are in configs/cifar10c.py). `:dataset=cifar100` switches to CIFAR-100-C
(give a 100-class source checkpoint; `--config.model.name=resnet26` or
`resnet50` pick other backbones: `max_layers='last'` finds their last
BN, `models.LAST_BN`). `:ablations` adds the digits config's ablation
variants. `:small` shrinks the run for a smoke test.

Meta-training settings are the authors' `meta_sup.sh` (see
configs/meta_ttt_digits.py) with a CIFAR-sized iteration count and the
shift probability scaled to WRN-28's 16-channel stem (0.08; set
`--config.meta_train.meta_ttt.shift_p=0.02` for a 64-channel ResNet stem).
"""

from configs import cifar10c, common, meta_ttt_digits


def get_config(arg=None):
  arg = common.parse_arg(
    arg, dataset='cifar10', small=False, ablations=False, steps=5000
  )
  if arg.dataset not in ('cifar10', 'cifar100'):
    raise ValueError(f"dataset must be 'cifar10' or 'cifar100': {arg.dataset}")
  config = cifar10c.get_config('small' if arg.small else None)
  if arg.dataset == 'cifar100':
    config.data.name = 'cifar100_c'
    config.data.num_classes = 100
    config.data.clean_name = 'cifar100'
  config.data.source_train_name = config.data.clean_name
  config.methods = 'source,norm,tent,meta_ttt'
  config.meta_methods = 'meta_ttt'
  config.meta_train.meta_ttt = meta_ttt_digits.meta_train_config(
    steps=arg.steps,
    eval_every=max(arg.steps // 10, 1),
    val_examples=2000,
    shift_p=meta_ttt_digits.STEM16_SHIFT_P,  # WRN-28's stem: 16 channels
  )
  if arg.ablations:
    meta_ttt_digits.add_ablations(config)
  if arg.small:
    for name in config.meta_train:
      config.meta_train[name].update(
        steps=2, batch_size=16, eval_every=2, val_examples=32
      )
  return config
