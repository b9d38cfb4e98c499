r"""ImageNet -> ImageNet-C (severity 5), ResNet-50 (torchvision V1 weights).

Needs the data and the source weights on disk (nothing is downloaded):
  * ImageNet-C, either Hendrycks' released folders (`--config.data.name=
    imagenet_c --config.data.loader_kwargs.data_dir=.../ImageNet-C`,
    optionally RobustBench's 5,000-image list) or the TFDS build
    (`imagenet2012_corrupted`);
  * torchvision's `resnet50-0676ba61.pth` (IMAGENET1K_V1) converted with
    `python -m experiments.convert_torch_main --checkpoint=... --model=resnet50
    --num_classes=1000 --input_shape=224,224,3 --out=$SRC`.

  python -m experiments.adapt_main --config=configs/imagenet_c.py \
      --workdir=$WORKDIR --config.source_ckpt=$SRC \
      --config.data.loader_kwargs.data_dir=$DATA \
      --config.methods=source,norm,tent,eata,sar

Reference (MD: Marsden & Doebler's test-time-adaptation benchmark,
continual, 5k list): source 82.0, BN 68.6, Tent
62.6, EATA 58.0, SAR 61.9 % error; (EATA README, reset per corruption, 50k):
Tent 57.4, ETA 51.9, EATA 52.2. The ImageNet defaults are SGD lr 2.5e-4,
momentum 0.9, batch 64.
"""

import ml_collections

from configs import common

SAR_ADAPT = 'bn_affine,!re:^layer4'


def get_config(arg=None):
  arg = common.parse_arg(arg, small=False)
  config = common.base_config()
  config.data.name = 'imagenet2012_corrupted'
  config.data.num_classes = 1000
  config.data.loader_kwargs = ml_collections.ConfigDict(
    {
      'data_dir': '',
      'severity': 5,
      'num_examples': 5000,
    }
  )
  config.model = ml_collections.ConfigDict({'name': 'resnet50'})
  config.source_ckpt = ''  # required: converted torchvision weights
  config.method_configs = common.method_configs(imagenet=True)
  # SAR and DeYO adapt every BN affine but the last stage's, as their
  # official code (and MD's) does on ResNets.
  for name in ('sar', 'deyo'):
    config.method_configs[name].adapt = SAR_ADAPT
  config.methods = 'source,norm,tent'
  config.setting = 'continual'
  config.batch_size = 64
  config.num_source_images = 2000
  config.clean_eval_examples = 0
  config.checkpoint_every = 50
  config.log_every = 20
  if arg.small:
    config.data.loader_kwargs.num_examples = 256
  return config
