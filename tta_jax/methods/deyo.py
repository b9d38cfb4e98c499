"""DeYO: destroy your object, then trust the samples whose prediction falls."""

import math

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import base, grad_step, losses, params as params_lib


def patch_shuffle(images: jax.Array, patch_len: int, rng: jax.Array):
  """Cuts every image into a `patch_len` x `patch_len` grid of patches and
  shuffles them (an independent permutation per image). [B, H, W, C].

  Sides that are not multiples of `patch_len` are resized to the multiple
  below and back, as DeYO's `aug_type='patch'` does.
  """
  b, hh, ww, c = images.shape
  p = patch_len
  h, w = hh // p, ww // p
  x = images
  if (h * p, w * p) != (hh, ww):
    x = jax.image.resize(x, (b, h * p, w * p, c), 'bilinear')
  x = x.reshape(b, p, h, p, w, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, p * p, h, w, c)
  # One key per row: a row's permutation does not depend on the batch size.
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b))
  noise = jax.vmap(lambda k: jax.random.uniform(k, (p * p,)))(keys)
  perm = jnp.argsort(noise, axis=-1)
  x = jnp.take_along_axis(x, perm[:, :, None, None, None], axis=1)
  x = x.reshape(b, p, p, h, w, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, h * p, w * p, c)
  if (h * p, w * p) != (hh, ww):
    x = jax.image.resize(x, (b, hh, ww, c), 'bilinear')
  return x


def deyo(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  adapt: params_lib.MaskFn = params_lib.bn_affine,
  margin: float = 0.5,
  margin_e0: float = 0.4,
  plpd_threshold: float = 0.2,
  patch_len: int = 4,
  filter_ent: bool = True,
  filter_plpd: bool = True,
  reweight_ent: bool = True,
  reweight_plpd: bool = True,
) -> base.Adapter:
  """DeYO (Lee et al., ICLR 2024): entropy + PLPD filtering and weighting.

  Each step, with test-batch BN statistics:
    1. forward at theta; keep samples with entropy E < `margin` ln K;
    2. forward the kept samples' patch-shuffled copies x' (no gradient);
       PLPD = p(y_hat | x) - p(y_hat | x') for the prediction y_hat on x;
       keep those with PLPD > `plpd_threshold`;
    3. minimise the mean of E * (exp(E0 - E) + exp(PLPD)) over the kept
       samples, E0 = `margin_e0` ln K (weights held constant); when no
       sample is kept the optimizer does not step (`deyo.py`).
  The scored logits are the first forward's.

  Args:
    apply_fn: the model's `ApplyFn`.
    optimizer: the official ImageNet setting is SGD(2.5e-4, momentum 0.9)
      at batch 64 (ViT: 1e-3).
    adapt: mask of the adapted parameters (`deyo.py` skips ResNet's
      `layer4` and ViT-B's blocks 9-11 and final norm; pass such a mask).
    margin: tau_Ent as a fraction of ln K.
    margin_e0: Ent_0 as a fraction of ln K.
    plpd_threshold: tau_PLPD.
    patch_len: the patch grid is `patch_len` x `patch_len`.
    filter_ent, filter_plpd, reweight_ent, reweight_plpd: the official
      switches (all on by default).

  Returns:
    An `Adapter`; metrics `loss`, `n_reliable` (entropy filter), and
    `n_selected` (both filters).

  References:
    Lee et al., Entropy is not Enough for Test-Time Adaptation: From the
    Perspective of Disentangled Factors, ICLR 2024 (code: Jhyun17/DeYO).
  """
  if patch_len < 1:
    raise ValueError(f'deyo: patch_len must be >= 1, got {patch_len}')

  def init_fn(variables, rng):
    return grad_step.init_state(
      variables, rng, adapt=adapt, optimizer=optimizer, who='deyo'
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    parts = grad_step.split(state, adapt, meta)
    valid = losses.batch_mask(batch)
    shuffled = patch_shuffle(
      batch['image'], patch_len, jax.random.fold_in(state.rng, state.step)
    )

    def loss_fn(params):
      logits = grad_step.batch_forward(apply_fn, params, state, batch).logits
      entropy = losses.softmax_entropy(logits)
      log_k = math.log(logits.shape[-1])
      ent = jax.lax.stop_gradient(entropy)
      reliable = valid & (ent < margin * log_k) if filter_ent else valid
      # x' forward on the reliable rows only (their BN statistics).
      logits_x = apply_fn(
        jax.lax.stop_gradient(params),
        state.batch_stats,
        shuffled,
        use_batch_stats=True,
        mask=reliable,
      ).logits
      prob = jax.nn.softmax(jax.lax.stop_gradient(logits), -1)
      prob_x = jax.nn.softmax(jax.lax.stop_gradient(logits_x), -1)
      y_hat = jnp.argmax(prob, -1)[:, None]
      plpd = (
        jnp.take_along_axis(prob, y_hat, -1)
        - jnp.take_along_axis(prob_x, y_hat, -1)
      )[:, 0]
      selected = reliable & (plpd > plpd_threshold) if filter_plpd else reliable
      coeff = reweight_ent * jnp.exp(margin_e0 * log_k - ent)
      coeff = coeff + reweight_plpd * jnp.exp(plpd)
      if not (reweight_ent or reweight_plpd):
        coeff = jnp.ones_like(ent)
      loss = losses.masked_mean(entropy * coeff, selected)
      return loss, (logits, reliable, selected)

    out = grad_step.masked_grad_step(
      loss_fn, parts, optimizer, has_aux=True, first_order=first_order
    )
    loss, (logits, reliable, selected) = out.value
    # No selected sample: no optimizer step at all (momentum included).
    new_state = grad_step.commit(
      state, parts, out.trainable, out.opt_state, keep=jnp.any(selected)
    )
    metrics = {
      'loss': loss,
      'n_reliable': jnp.sum(reliable).astype(jnp.float32),
      'n_selected': jnp.sum(selected).astype(jnp.float32),
    }
    return new_state, base.StepOutput(logits, metrics)

  return base.adapter(init_fn, step_fn, adapt)
