r"""MNIST -> rotated MNIST (the DomainBed Rotated-MNIST angles), embedded.

  python -m experiments.adapt_main --config=configs/rotated_digits.py \
      --workdir=/tmp/tta_rot --config.setting=continual

The source model is trained on upright digits (0 degrees); the stream visits
the test digits at 0, 15, ..., 75 degrees. `:small` shrinks the run.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, small=False)
  config = common.base_config()
  config.data.name = 'digits_rotated'
  config.data.rotations = (0, 15, 30, 45, 60, 75)
  config.methods = 'source,norm,tent'
  config.setting = 'continual'
  if arg.small:
    common.shrink(config)
    config.data.rotations = (0, 45, 75)
  return config
