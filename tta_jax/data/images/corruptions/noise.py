"""Noise families: gaussian_noise, shot_noise, impulse_noise."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from tta_jax.data.images.corruptions._common import _pick

# Severity tables from make_cifar_c.py (CIFAR-10-C, 32 px).
_GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # noise std
_SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity
_IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # s&p amount


# ---------------------------------------------------------------------------
# Poisson sampling as numpy does it, on a fixed budget of uniforms.

# Multiplication-of-uniforms terms: P(Poisson(10) >= 32) < 1e-7.
_POISSON_TERMS, _POISSON_TRIES = 32, 6


def _poisson(lam, u):
  """Poisson(lam) samples as numpy draws them, from a fixed budget of
  uniforms u [..., 1 + 2 T] (jax.random.poisson's rejection loops are slow
  under vmap).

  lam < 10: numpy multiplies uniforms until the product drops below
  exp(-lam); the count has the Poisson law, drawn here by inversion of its
  CDF (the first _POISSON_TERMS terms) with u[..., 0]. lam >= 10: Hormann's
  PTRS, as numpy's `random_poisson_ptrs`, on T candidate pairs; the first
  accepted wins (all rejected, probability ~0.1^T: the nearest integer to
  lam).
  """
  # Inversion: pmf_j = exp(-lam) lam^j / j!, CDF by a triangular matmul
  # (cumulative scans are slow on CPU).
  j = np.arange(_POISSON_TERMS)
  lam_s = jnp.minimum(lam, 10.0)[..., None]
  log_pmf = -lam_s + j * jnp.log(jnp.maximum(lam_s, 1e-30))
  pmf = jnp.exp(
    log_pmf - jnp.asarray(scipy.special.gammaln(j + 1), jnp.float32)
  )
  cdf = jnp.dot(
    pmf, jnp.asarray(np.triu(np.ones((j.size, j.size))), jnp.float32)
  )
  k_small = jnp.sum(cdf <= u[..., :1], -1).astype(jnp.float32)

  pairs = u[..., 1:].reshape(u.shape[:-1] + (_POISSON_TRIES, 2))
  lam_l = jnp.maximum(lam, 10.0)[..., None]
  b = 0.931 + 2.53 * jnp.sqrt(lam_l)
  a = -0.059 + 0.02483 * b
  inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
  v_r = 0.9277 - 3.6224 / (b - 2)
  uu, v = pairs[..., 0] - 0.5, pairs[..., 1]
  us = jnp.maximum(0.5 - jnp.abs(uu), 1e-12)
  k = jnp.floor((2 * a / us + b) * uu + lam_l + 0.43)
  quick = (us >= 0.07) & (v <= v_r)
  reject = (k < 0) | ((us < 0.013) & (v > us))
  log_ratio = jnp.log(v) + jnp.log(inv_alpha) - jnp.log(a / (us * us) + b)
  log_pmf = -lam_l + k * jnp.log(lam_l) - jax.lax.lgamma(jnp.maximum(k, 0) + 1)
  accept = quick | (~reject & (log_ratio <= log_pmf))
  first = jnp.argmax(accept, -1)[..., None]
  k_large = jnp.take_along_axis(k, first, -1)[..., 0]
  k_large = jnp.where(accept.any(-1), k_large, jnp.round(lam_l[..., 0]))
  return jnp.where(lam < 10, k_small, k_large)


# ---------------------------------------------------------------------------
# The families: fn(x [H, W, C] float32, key, s) -> [H, W, C], s the
# traced severity - 1 (clipping to [0, 1] happens once, in `registry._apply`).


def _gaussian_noise(x, key, s):
  return x + _pick(_GAUSSIAN_NOISE, s) * jax.random.normal(key, x.shape)


def _shot_noise(x, key, s):
  c = _pick(_SHOT_NOISE, s)
  u = jax.random.uniform(key, x.shape + (1 + 2 * _POISSON_TRIES,))
  return _poisson(jnp.clip(x, 0, 1) * c, u) / c


def _impulse_noise(x, key, s):
  # skimage.util.random_noise(mode='s&p', salt_vs_pepper=0.5): every element
  # (channels independently) flips with probability `amount`, half to 1.
  c = _pick(_IMPULSE_NOISE, s)
  u = jax.random.uniform(key, x.shape)
  return jnp.where(u < c, (u < c / 2).astype(x.dtype), x)
