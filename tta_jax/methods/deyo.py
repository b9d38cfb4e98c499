"""DeYO: destroy your object, then trust the samples whose prediction falls."""

import math

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import base, losses, meta as meta_lib, params as params_lib


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
    trainable, _ = params_lib.split_by(
      adapt, variables['params'], variables['batch_stats'], who='deyo'
    )
    return base.AdaptState(
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=optimizer.init(trainable),
      rng=rng,
      step=jnp.zeros([], jnp.int32),
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    trainable, frozen = params_lib.split(
      state.params, adapt(state.params, state.batch_stats)
    )
    opt_state = meta_lib.inject_meta_hyperparams(state.opt_state, meta)
    valid = losses.batch_mask(batch)
    shuffled = patch_shuffle(
      batch['image'], patch_len, jax.random.fold_in(state.rng, state.step)
    )

    def forward(trainable, images, mask):
      return apply_fn(
        params_lib.merge(trainable, frozen),
        state.batch_stats,
        images,
        use_batch_stats=True,
        mask=mask,
      ).logits

    def loss_fn(trainable):
      logits = forward(trainable, batch['image'], batch.get('mask'))
      entropy = losses.softmax_entropy(logits)
      log_k = math.log(logits.shape[-1])
      ent = jax.lax.stop_gradient(entropy)
      reliable = valid & (ent < margin * log_k) if filter_ent else valid
      # x' forward on the reliable rows only (their BN statistics).
      logits_x = forward(jax.lax.stop_gradient(trainable), shuffled, reliable)
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

    grad_fn = meta_lib.inner_value_and_grad(
      loss_fn, has_aux=True, first_order=first_order
    )
    (loss, (logits, reliable, selected)), grads = grad_fn(trainable)
    updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    any_selected = jnp.any(selected)
    keep = lambda new, old: jax.tree.map(
      lambda a, b: jnp.where(any_selected, a, b), new, old
    )
    new_state = state._replace(
      params=params_lib.merge(keep(new_trainable, trainable), frozen),
      opt_state=keep(new_opt_state, opt_state),
      step=state.step + 1,
    )
    metrics = {
      'loss': loss,
      'n_reliable': jnp.sum(reliable).astype(jnp.float32),
      'n_selected': jnp.sum(selected).astype(jnp.float32),
    }
    return new_state, base.StepOutput(logits, metrics)

  return base.Adapter(init_fn, step_fn, adapt)
