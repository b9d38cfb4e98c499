r"""CIFAR-10 -> CIFAR-10-C (severity 5), WideResNet-28-10 (RobustBench).

Needs the data and the source weights on disk (nothing is downloaded):
  * CIFAR-10-C as Hendrycks released it (`--config.data.name=cifar10_c
    --config.data.loader_kwargs.data_dir=.../CIFAR-10-C`), or the TFDS build
    (`cifar10_corrupted`, array_record, with `...loader_kwargs.data_dir`);
  * RobustBench's `Standard` WRN-28-10 converted once with
    `python -m experiments.convert_torch_main --checkpoint=Standard.pt
    --model=wide_resnet28_10 --num_classes=10 --input_shape=32,32,3
    --out=$SRC` and passed as `--config.source_ckpt=$SRC`.

  python -m experiments.adapt_main --config=configs/cifar10c.py \
      --workdir=$WORKDIR --config.source_ckpt=$SRC \
      --config.data.loader_kwargs.data_dir=$DATA \
      --config.methods=source,norm,tent --config.setting=reset_each_shift

Reference (DequanWang/tent, reset per corruption, bs 200): source 43.5,
BN 20.4, Tent 18.6 % error; continual (MD: Marsden & Doebler's
test-time-adaptation benchmark): Tent 20.0.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, small=False)
  config = common.base_config()
  config.data.name = 'cifar10_corrupted'
  config.data.num_classes = 10
  config.data.loader_kwargs = ml_collections.ConfigDict(
    {
      'data_dir': '',
      'severity': 5,
    }
  )
  config.data.clean_name = 'cifar10'  # forgetting check, if on disk
  config.data.clean_kwargs = ml_collections.ConfigDict({'data_dir': ''})
  # The labelled source split, for meta-training (configs/meta_ttt_cifar.py
  # sets it; '' for plain TTA, which never reads it).
  config.data.source_train_name = ''
  config.data.source_train_kwargs = ml_collections.ConfigDict(
    {'data_dir': '', 'split': 'train'}
  )
  config.model = ml_collections.ConfigDict({'name': 'wide_resnet28_10'})
  config.source_ckpt = ''  # required: a converted RobustBench checkpoint
  config.methods = 'source,norm,tent'
  config.setting = 'continual'
  config.batch_size = 200
  config.num_source_images = 2000
  config.clean_eval_examples = 10000
  config.checkpoint_every = 25
  config.log_every = 10
  if arg.small:
    config.data.max_examples_per_domain = 400
    config.clean_eval_examples = 400
  return config
