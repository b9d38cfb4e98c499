r"""MGG (MGTTA) with ViT-B/16 on ImageNet-C / -R / -Sketch / -A (paper scale).

Needs the data and timm's `vit_base_patch16_224` weights (augreg, mean =
std = 0.5) on disk, converted once (nothing is downloaded):

  python -m experiments.convert_torch_main --checkpoint=vit_b16.pth \
      --model=vit_base_patch16_224 --num_classes=1000 \
      --input_shape=224,224,3 --out=$SRC
  python -m experiments.meta_train_main --config=configs/mgg_imagenet.py \
      --workdir=$WORKDIR --config.source_ckpt=$SRC \
      --config.data.loader_kwargs.data_dir=$IMAGENET_C
  python -m experiments.adapt_main --config=configs/mgg_imagenet.py:dataset=r \
      --workdir=$WORKDIR --config.source_ckpt=$SRC \
      --config.data.loader_kwargs.data_dir=$IMAGENET_R

`dataset`: c (15 corruptions, severity 5, reset per corruption, the full
50,000 images each as the paper; `num_examples=5000` for RobustBench's
subset), r, sketch, a (R and A score their 200 classes). Every method
adapts all 25 LayerNorms (38,400 scalars) with batch 64; Tent, SAR and DeYO
use SGD 1e-3, momentum 0.9 (`main.py`: ViT-B at batch 64), SAR's and DeYO's
margins are fractions of ln 1000 (or ln 200). MGG's pre-training learns on
128 images of ImageNet-C's four extra corruptions (speckle_noise, spatter,
gaussian_blur, saturate, severity 5), disjoint from the 15 test ones; the
trainer reads them from `TrainContext.shifted_domains`. One pre-trained MGG
serves all four datasets (the paper's README): pre-train in one workdir,
then adapt each dataset in that workdir. FOA's lambda is 0.4 (0.2 for
ImageNet-R, a code comment in MGTTA).

Paper (README, accuracy %): NoAdapt 55.5 / 59.5 / 44.5 / 0.1, Tent 59.6 /
63.9 / 49.1 / 52.9, SAR 62.7 / 63.3 / 48.7 / 52.5, DeYO 68.2 / 66.1 /
52.2 / 54.1, MGTTA 71.3 / 70.2 / 53.3 / 56.7 (C / R / Sketch / A).
"""

import ml_collections

from configs import common, mgg_digits

DATASETS = {
  'c': 'imagenet_c',
  'r': 'imagenet_r',
  'sketch': 'imagenet_sketch',
  'a': 'imagenet_a',
}
# timm ViT-B/16's LayerNorm affines (blocks.*.norm1/2 and the final norm).
LAYER_NORMS = mgg_digits.LAYER_NORMS


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset='c', small=False)
  if arg.dataset not in DATASETS:
    raise ValueError(f'dataset must be one of {sorted(DATASETS)}')
  config = common.base_config()
  config.data.name = DATASETS[arg.dataset]
  config.data.num_classes = 1000
  config.data.loader_kwargs = ml_collections.ConfigDict({'data_dir': ''})
  if arg.dataset == 'c':
    config.data.loader_kwargs.severity = 5
  config.model = ml_collections.ConfigDict({'name': 'vit_base_patch16_224'})
  config.source_ckpt = ''  # required: converted timm weights
  config.method_configs = common.method_configs(imagenet=True)
  sgd = {'name': 'sgd', 'learning_rate': 1e-3, 'momentum': 0.9}
  for name in ('tent', 'sar', 'deyo'):
    config.method_configs[name].optimizer = dict(sgd)
    config.method_configs[name].adapt = LAYER_NORMS
  config.method_configs.mgg.features = ('block_cls',)
  if arg.dataset == 'r':
    config.method_configs.mgg.fitness_lambda = 0.2
  config.methods = 'source,tent,sar,deyo,mgg'
  config.meta_methods = 'mgg'
  config.meta_train.mgg = mgg_digits.trainer_config(
    reset_params_each_epoch=False,  # the paper's own run
    stats_images=50000,  # the clean validation set, as the code's fallback
  )
  config.setting = 'reset_each_shift'
  config.seeds = '2020'
  config.batch_size = 64
  config.num_source_images = 2000
  config.clean_eval_examples = 0
  config.checkpoint_every = 50
  config.log_every = 20
  if arg.small:
    config.data.loader_kwargs.num_examples = 256
    config.meta_train.mgg.update(epochs=1, stats_images=256)
  return config
