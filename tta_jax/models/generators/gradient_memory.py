"""MGG's coordinate-wise update generators: the gradient memory layer (GML).

A learned optimiser reads, for every adapted scalar on its own, a small
feature vector x (MGG: the Adam-style pair [m~, g~]) and writes an update
direction u in (-1, 1). One network, about 164 weights, serves all
coordinates (`jax.vmap` over them); each coordinate carries its own memory,
a TTT-Linear fast-weight layer W in R^{d x d}, b in R^d (d = 8), which one
gradient step of a self-supervised reconstruction loss writes and a query
then reads (Sun et al.'s TTT-Linear with mini-batch 1, as MGTTA uses it):

  q, k, v = x W_Q, x W_K, x W_V                       # R^d each
  eta = inner_lr * sigmoid(x . w_eta + b_eta) / d * max(0, 1 + s_tok)
  G = d/dZ 1/2 ||LN_ttt(Z) - (v - k)||^2  at Z = k W + b   (closed form)
  W' = W - eta k^T G,   b' = b - eta G                 # memorise
  h = q + LN_ttt(q W' + b')                            # read
  u = tanh(LN_post(h) W_O)

This is the primal form; TTT's dual form `q W - eta (q . k) G + b - eta G`
is the same number for mini-batch 1. LN_ttt and LN_post use eps 1e-6 and
the biased variance. The memory starts from the learned W_0, b_0 at every
domain start. Parameter names follow the official `TTTMGG` checkpoint
(`q_proj`, `learnable_ttt_lr_weight`, `learnable_token_idx`, `W1`, `b1`,
...).

`GradientMlp` is the ablation without memory: an MLP of the same width in
place of the memory read.

References:
  Deng et al., Learning to Generate Gradients for Test-Time Adaptation via
  Test-Time Training Layers, AAAI 2025 (arXiv 2412.16901; code
  keikeiqi/MGTTA). Sun et al., Learning to (Learn at Test Time): RNNs with
  Expressive Hidden States, 2024 (TTT-Linear).
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_TORCH_LINEAR = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class Memory(NamedTuple):
  """Per-coordinate fast weights: w [N, d, d], b [N, d] (empty for MLPs)."""

  w: jax.Array
  b: jax.Array


def layer_norm(z, scale, bias, eps: float = 1e-6):
  """LayerNorm over the last axis (biased variance), as `ln_fwd`."""
  mu = jnp.mean(z, -1, keepdims=True)
  var = jnp.mean(jnp.square(z - mu), -1, keepdims=True)
  return scale * (z - mu) / jnp.sqrt(var + eps) + bias


def ln_l2_grad(z, target, scale, bias, eps: float = 1e-6):
  """d/dz of 1/2 ||LN(z) - target||^2, in closed form (TTT's fused backward).

  With x_hat = (z - mu) / std and gy = (LN(z) - target) * scale:
  dz = (D gy - sum(gy) - x_hat sum(gy x_hat)) / (D std).
  """
  d = z.shape[-1]
  mu = jnp.mean(z, -1, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(z - mu), -1, keepdims=True) + eps)
  x_hat = (z - mu) / std
  gy = (scale * x_hat + bias - target) * scale
  return (
    d * gy
    - jnp.sum(gy, -1, keepdims=True)
    - x_hat * jnp.sum(gy * x_hat, -1, keepdims=True)
  ) / (d * std)


def gml_step(p, x, w, b, *, inner_lr: float = 1.0, eps: float = 1e-6):
  """One GML step for ONE coordinate: `(u, w', b')`.

  Args:
    p: the layer's parameters (see `GradientMemory`).
    x: [F] input features.
    w, b: [d, d] and [d], this coordinate's memory.
    inner_lr: TTT's base inner learning rate.
    eps: the LayerNorms' epsilon.

  Returns:
    The scalar update direction u in (-1, 1) and the written memory.
  """
  d = w.shape[-1]
  q, k, v = x @ p['q_proj'], x @ p['k_proj'], x @ p['v_proj']
  gate = x @ p['learnable_ttt_lr_weight'] + p['learnable_ttt_lr_bias']
  gate = jax.nn.sigmoid(gate)
  eta = inner_lr * gate / d * jnp.maximum(0.0, 1.0 + p['learnable_token_idx'])
  grad_z = ln_l2_grad(
    k @ w + b, v - k, p['ttt_norm_weight'], p['ttt_norm_bias'], eps
  )
  w_new = w - eta * jnp.outer(k, grad_z)
  b_new = b - eta * grad_z
  h = q + layer_norm(
    q @ w_new + b_new, p['ttt_norm_weight'], p['ttt_norm_bias'], eps
  )
  h = layer_norm(h, p['post_norm_weight'], p['post_norm_bias'], eps)
  return jnp.tanh(h @ p['o_proj'])[0], w_new, b_new


class GradientMemory(nn.Module):
  """The coordinate-wise gradient memory layer (TTT-Linear, primal form).

  `apply({'params': phi}, x, memory)` maps x [N, F] and a `Memory` to
  (u [N], memory'); `apply(..., n, method='initial_memory')` tiles the
  learned W_0, b_0 over n coordinates.

  Attributes:
    hidden: d, the memory width (MGTTA: 8).
    inner_lr: TTT's base inner learning rate (1.0).
    eps: LayerNorm epsilon (1e-6).
  """

  hidden: int = 8
  inner_lr: float = 1.0
  eps: float = 1e-6

  def setup(self):
    d = self.hidden
    normal = nn.initializers.normal(0.02)
    self.p = {
      'q_proj': self.param('q_proj', _TORCH_LINEAR, (2, d)),
      'k_proj': self.param('k_proj', _TORCH_LINEAR, (2, d)),
      'v_proj': self.param('v_proj', _TORCH_LINEAR, (2, d)),
      'o_proj': self.param('o_proj', _TORCH_LINEAR, (d, 1)),
      'learnable_ttt_lr_weight': self.param(
        'learnable_ttt_lr_weight', normal, (2,)
      ),
      'learnable_ttt_lr_bias': self.param(
        'learnable_ttt_lr_bias', nn.initializers.zeros, ()
      ),
      'learnable_token_idx': self.param(
        'learnable_token_idx', nn.initializers.zeros, ()
      ),
      'ttt_norm_weight': self.param(
        'ttt_norm_weight', nn.initializers.ones, (d,)
      ),
      'ttt_norm_bias': self.param('ttt_norm_bias', nn.initializers.zeros, (d,)),
      'post_norm_weight': self.param(
        'post_norm_weight', nn.initializers.ones, (d,)
      ),
      'post_norm_bias': self.param(
        'post_norm_bias', nn.initializers.zeros, (d,)
      ),
    }
    self.w1 = self.param('W1', normal, (d, d))
    self.b1 = self.param('b1', nn.initializers.zeros, (d,))

  def __call__(self, x: jax.Array, memory: Memory) -> tuple[jax.Array, Memory]:
    _check_inputs(x, memory, self.hidden)
    step = lambda xi, wi, bi: gml_step(
      self.p, xi, wi, bi, inner_lr=self.inner_lr, eps=self.eps
    )
    u, w, b = jax.vmap(step)(x, memory.w, memory.b)
    return u, Memory(w, b)

  def initial_memory(self, n: int) -> Memory:
    return Memory(
      jnp.broadcast_to(self.w1, (n, *self.w1.shape)),
      jnp.broadcast_to(self.b1, (n, *self.b1.shape)),
    )

  def empty_memory(self, n: int, dtype=jnp.float32) -> Memory:
    """Zeros of the memory's shapes (needs no parameters)."""
    d = self.hidden
    return Memory(jnp.zeros((n, d, d), dtype), jnp.zeros((n, d), dtype))


class GradientMlp(nn.Module):
  """The memory-less ablation: a coordinate-wise MLP of the same width.

  The GML's read `h = q + LN(q W' + b')` with a static hidden layer in place
  of the written memory: h = q + LN(Dense(GELU(q))), q = Dense(x), then the
  same LN_post, W_O and tanh (128 weights at d = 8, the GML has 164).
  """

  hidden: int = 8
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, memory: Memory) -> tuple[jax.Array, Memory]:
    _check_inputs(x, memory, 0)
    dense = lambda n, name, bias=True: nn.Dense(
      n, use_bias=bias, kernel_init=_TORCH_LINEAR, name=name
    )
    q = dense(self.hidden, 'q_proj', False)(x)
    z = dense(self.hidden, 'hidden')(nn.gelu(q))
    h = q + nn.LayerNorm(epsilon=self.eps, name='hidden_norm')(z)
    h = nn.LayerNorm(epsilon=self.eps, name='post_norm')(h)
    return jnp.tanh(dense(1, 'o_proj', False)(h))[:, 0], memory

  def initial_memory(self, n: int) -> Memory:
    return self.empty_memory(n)

  def empty_memory(self, n: int, dtype=jnp.float32) -> Memory:
    return Memory(jnp.zeros((n, 0, 0), dtype), jnp.zeros((n, 0), dtype))


GENERATORS: dict[str, Any] = {'gml': GradientMemory, 'mlp': GradientMlp}


def build(name: str = 'gml', **kwargs) -> nn.Module:
  """A registered generator (`'gml'`, `'mlp'`)."""
  if name not in GENERATORS:
    raise ValueError(f'unknown generator {name!r}; valid: {sorted(GENERATORS)}')
  return GENERATORS[name](**kwargs)


def _check_inputs(x, memory, hidden: int) -> None:
  if x.ndim != 2:
    raise ValueError(f'generator inputs must be [N, F], got {x.shape}')
  n = x.shape[0]
  want = ((n, hidden, hidden), (n, hidden))
  got = (memory.w.shape, memory.b.shape)
  if got != want:
    raise ValueError(
      f'generator memory has shapes {got}, inputs of {n} coordinates need '
      f'{want}'
    )
