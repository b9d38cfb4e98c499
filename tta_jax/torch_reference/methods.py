"""PyTorch reference implementations for the parity tests and step timings.

Re-implementations, written for the parity tests, of the official
algorithms, with the official code's quirks kept:

- Tent (`DequanWang/tent/tent.py`): one optimizer step per batch on the
  batch-mean softmax entropy; the returned logits are the pre-update ones.
- EATA / ETA (`mr-eggplant/EATA/eata.py`, Fisher from `main.py`): the first
  batch with reliable samples skips the redundancy filter and only sets the
  moving average; the step is skipped when no sample survives.
- SAR (`mr-eggplant/SAR/sar.py` + `sam.py`): SAM over the reliable samples;
  the EMA is computed on Python floats, and `SAR.forward` writes the EMA back
  after `reset()` cleared it (`clear_ema_on_reset=False` mirrors that).

Models are in train mode with BN running statistics disabled, so every BN
layer normalises with the current batch (biased variance), as ours does.
"""

import math

import numpy as np

from tta_jax.torch_reference import INSTALL_HINT

try:
  import torch
except ModuleNotFoundError as e:  # the optional `torch` extra
  raise ModuleNotFoundError(f'{e}: {INSTALL_HINT}', name=e.name) from e
import torch.nn.functional as F
from torch import nn


class DigitsNet(nn.Module):
  """`tta_jax.models.vision.digits.DigitsCNN` in PyTorch (NCHW)."""

  def __init__(self, num_classes: int = 10, width: int = 16):
    super().__init__()
    chans = [(1, width), (width, width), (width, 2 * width)]
    chans.append((2 * width, 4 * width))
    for i, (cin, cout) in enumerate(chans, start=1):
      setattr(self, f'conv{i}', nn.Conv2d(cin, cout, 3, padding=1, bias=False))
      setattr(self, f'bn{i}', nn.BatchNorm2d(cout, eps=1e-5))
    self.head = nn.Linear(4 * width, num_classes)

  def forward(self, x):
    x = (x - 0.5) / 0.5
    unit = lambda x, i: F.relu(
      getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x))
    )
    x = F.max_pool2d(unit(unit(x, 1), 2), 2)
    x = F.max_pool2d(unit(x, 3), 2)
    x = unit(x, 4)
    return self.head(x.mean(dim=(2, 3)))


def from_flax(params, num_classes: int, width: int) -> DigitsNet:
  """A `DigitsNet` holding the flax `params` (HWIO kernels -> OIHW)."""
  model = DigitsNet(num_classes, width)
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  with torch.no_grad():
    for i in range(1, 5):
      conv, bn = getattr(model, f'conv{i}'), getattr(model, f'bn{i}')
      conv.weight.copy_(t(params[f'conv{i}']['kernel']).permute(3, 2, 0, 1))
      bn.weight.copy_(t(params[f'bn{i}']['scale']))
      bn.bias.copy_(t(params[f'bn{i}']['bias']))
    model.head.weight.copy_(t(params['head']['kernel']).T)
    model.head.bias.copy_(t(params['head']['bias']))
  return model


def configure(model: nn.Module) -> list[torch.Tensor]:
  """Train mode, batch statistics only, grads on BN affine; returns them."""
  model.train()
  model.requires_grad_(False)
  params = []
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.track_running_stats = False
      m.running_mean = m.running_var = None
      m.requires_grad_(True)
      params += [m.weight, m.bias]
  return params


def bn_affine(model: nn.Module) -> dict[str, np.ndarray]:
  """{'bn1': {'scale', 'bias'}, ...} as numpy, to compare with flax."""
  return {
    f'bn{i}': {
      'scale': getattr(model, f'bn{i}').weight.detach().numpy().copy(),
      'bias': getattr(model, f'bn{i}').bias.detach().numpy().copy(),
    }
    for i in range(1, 5)
  }


def entropy(logits: torch.Tensor) -> torch.Tensor:
  return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


# ---------------------------------------------------------------- Tent


def tent_step(model, optimizer, x):
  logits = model(x)
  entropy(logits).mean(0).backward()
  optimizer.step()
  optimizer.zero_grad()
  return logits.detach()


# ---------------------------------------------------------------- EATA


def fishers(model, params, images, batch_size: int):
  """EATA's `main.py` Fisher: squared grads of the pseudo-label CE."""
  batches = torch.split(images, batch_size)
  total = [torch.zeros_like(p) for p in params]
  for x in batches:
    logits = model(x)
    F.cross_entropy(logits, logits.argmax(1)).backward()
    for acc, p in zip(total, params, strict=True):
      acc.add_(p.grad.detach() ** 2)
      p.grad = None
  anchors = [p.detach().clone() for p in params]
  return [f / len(batches) for f in total], anchors


class Eata:
  """One object per stream: the optimizer, m and the Fisher terms."""

  def __init__(
    self,
    model,
    params,
    optimizer,
    *,
    e_margin,
    d_margin,
    fisher=None,
    fisher_alpha=0.0,
  ):
    self.model, self.params, self.optimizer = model, params, optimizer
    self.e_margin, self.d_margin = e_margin, d_margin
    self.fisher, self.fisher_alpha = fisher, fisher_alpha
    self.probs = None  # m; None until a batch selects something

  def step(self, x):
    logits = self.model(x)
    ent = entropy(logits)
    reliable = torch.where(ent < self.e_margin)[0]
    ent, probs = ent[reliable], logits[reliable].softmax(1)
    if self.probs is not None:
      cos = F.cosine_similarity(self.probs[None], probs, dim=1)
      keep = torch.where(cos.abs() < self.d_margin)[0]
      ent, probs = ent[keep], probs[keep]
    n_selected = ent.shape[0]
    if n_selected:
      mean = probs.detach().mean(0)
      self.probs = (
        mean if self.probs is None else 0.9 * self.probs + (1 - 0.9) * mean
      )
    weight = 1 / torch.exp(ent.detach() - self.e_margin)
    loss = (ent * weight).mean(0)
    if self.fisher is not None:
      f_terms, anchors = self.fisher
      ewc = 0
      for f, p, a in zip(f_terms, self.params, anchors, strict=True):
        ewc += self.fisher_alpha * (f * (p - a) ** 2).sum()
      loss = loss + ewc
    if n_selected:
      loss.backward()
      self.optimizer.step()
    self.optimizer.zero_grad()
    return logits.detach(), len(reliable), n_selected


# ---------------------------------------------------------------- SAR


class Sar:
  """SAR with the SAM of `sam.py` (non-adaptive) around SGD.

  Model recovery restores the parameters; as in the official `sar.py`,
  whose `reset()` reloads SAM's own state only, the base optimizer's state
  (momentum) survives it unless `restore_optimizer`.
  """

  def __init__(
    self,
    model,
    params,
    optimizer,
    *,
    margin,
    rho=0.05,
    reset_constant=0.2,
    clear_ema_on_reset=False,
    restore_optimizer=False,
  ):
    self.model, self.params, self.optimizer = model, params, optimizer
    self.margin, self.rho = margin, rho
    self.reset_constant = reset_constant
    self.clear_ema_on_reset = clear_ema_on_reset
    self.restore_optimizer = restore_optimizer
    self.ema = None
    self.saved = (
      [p.detach().clone() for p in params],
      _clone_state(optimizer.state_dict()),
    )

  def step(self, x):
    self.optimizer.zero_grad()
    logits = self.model(x)
    ent = entropy(logits)
    reliable = torch.where(ent < self.margin)[0]
    ent[reliable].mean(0).backward()
    # SAM first step: climb to theta + rho g / (||g|| + 1e-12).
    with torch.no_grad():
      norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params]))
      scale = self.rho / (norm + 1e-12)
      old = [p.detach().clone() for p in self.params]
      for p in self.params:
        p.add_(p.grad * scale)
    self.optimizer.zero_grad()
    ent2 = entropy(self.model(x))[reliable]
    selected = torch.where(ent2 < self.margin)[0]
    loss2 = ent2[selected].mean(0)
    ema = self.ema
    if not math.isnan(loss2.item()):
      value = loss2.item()
      ema = value if ema is None else 0.9 * ema + (1 - 0.9) * value
    loss2.backward()
    # SAM second step: back to theta, then the base optimizer's step.
    with torch.no_grad():
      for p, o in zip(self.params, old, strict=True):
        p.copy_(o)
    self.optimizer.step()
    self.optimizer.zero_grad()
    recovered = ema is not None and ema < self.reset_constant
    if recovered:
      self._reset()
    if not (recovered and self.clear_ema_on_reset):
      self.ema = ema
    return logits.detach(), len(reliable), len(selected), recovered

  def _reset(self):
    params, opt_state = self.saved
    with torch.no_grad():
      for p, p0 in zip(self.params, params, strict=True):
        p.copy_(p0)
    if self.restore_optimizer:
      self.optimizer.load_state_dict(_clone_state(opt_state))
    self.ema = None


def _clone_state(state):
  if isinstance(state, torch.Tensor):
    return state.clone()
  if isinstance(state, dict):
    return {k: _clone_state(v) for k, v in state.items()}
  if isinstance(state, list):
    return [_clone_state(v) for v in state]
  return state


# ---------------------------------------------------------------- streams


def make_optimizer(params, spec) -> torch.optim.Optimizer:
  """The torch optimizer of an optax spec (`{'name': 'adam' | 'sgd', ...}`)."""
  spec = dict(spec)
  name = spec.pop('name')
  if name == 'adam':
    return torch.optim.Adam(
      params,
      lr=spec['learning_rate'],
      betas=(spec.get('b1', 0.9), spec.get('b2', 0.999)),
      eps=spec.get('eps', 1e-8),
    )
  if name == 'sgd':
    return torch.optim.SGD(
      params,
      lr=spec['learning_rate'],
      momentum=spec.get('momentum') or 0.0,
      nesterov=bool(spec.get('nesterov', False)),
    )
  raise ValueError(f'no PyTorch optimizer for {name!r}; valid: adam, sgd')


STREAM_METHODS = ('tent', 'eata', 'eta', 'sar')


class Stream:
  """Tent, EATA/ETA or SAR over a test stream, as the official code runs it.

  Built from the method's tta_jax config (the keys of
  `configs.common.method_configs()`: `optimizer`, `margin_e0` as a fraction
  of ln K, ...). `step(x)` adapts on the NCHW batch `x` and returns the
  logits the method scores. `reset()` is the official `reset()`: the model
  and optimizer states saved at construction are loaded back and the
  method's own state (EATA's m, SAR's EMA) is cleared. EATA's Fisher is
  computed once, from the source model, on `source_images` (NCHW) in
  batches of `fisher_batch_size`, and kept through resets.
  """

  def __init__(
    self, name, model, config, *, num_classes: int, source_images=None
  ):
    if name not in STREAM_METHODS:
      raise ValueError(
        f'no PyTorch reference stream for {name!r}; valid: {STREAM_METHODS}'
      )
    if config.get('steps', 1) != 1:
      raise ValueError(f'{name}: the reference takes one step per batch')
    self.name, self.model, self.config = name, model, dict(config)
    self.params = configure(model)
    self.optimizer = make_optimizer(self.params, config['optimizer'])
    self.e0 = config.get('margin_e0', 0.4) * math.log(num_classes)
    self.fisher = None
    alpha = config.get('fisher_alpha', 2000.0) if name == 'eata' else 0.0
    if alpha > 0:
      if source_images is None:
        raise ValueError('eata: fisher_alpha > 0 needs source_images')
      size = config.get('fisher_batch_size', 64)
      self.fisher = fishers(model, self.params, source_images, size)
      self.optimizer.zero_grad()
    self.fisher_alpha = alpha
    self._saved = (
      _clone_state(model.state_dict()),
      _clone_state(self.optimizer.state_dict()),
    )
    self._method = self._make()

  def _make(self):
    c = self.config
    if self.name == 'tent':
      return lambda x: tent_step(self.model, self.optimizer, x)
    if self.name in ('eata', 'eta'):
      return Eata(
        self.model,
        self.params,
        self.optimizer,
        e_margin=self.e0,
        d_margin=c.get('d_margin', 0.05),
        fisher=self.fisher,
        fisher_alpha=self.fisher_alpha,
      ).step
    return Sar(
      self.model,
      self.params,
      self.optimizer,
      margin=self.e0,
      rho=c.get('rho', 0.05),
      reset_constant=c.get('reset_constant', 0.2),
      clear_ema_on_reset=c.get('clear_ema_on_recovery', True),
      restore_optimizer=c.get('restore_optimizer_on_recovery', False),
    ).step

  def step(self, x) -> torch.Tensor:
    out = self._method(x)
    return out[0] if isinstance(out, tuple) else out

  def reset(self) -> None:
    model_state, optimizer_state = self._saved
    self.model.load_state_dict(model_state)
    self.optimizer.load_state_dict(_clone_state(optimizer_state))
    self._method = self._make()
