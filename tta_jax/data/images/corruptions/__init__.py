"""Image shifts for the embedded benchmark: ImageNet-C corruptions, rotations.

The 15 corruption families of ImageNet-C (Hendrycks & Dietterich, ICLR 2019),
ported to JAX for small images: 28x28 grayscale digits first, 32x32 RGB, and
any larger [H, W] (H, W >= 8). Each family is a deterministic function of
(image, severity, key); `corrupt_indexed` keys every example by its global
index, so an example's corrupted pixels never depend on how it was batched.
Everything runs under `jit`; the family name is static, while the severity
is traced (tables stacked over the five severities), so one compiled
program per (family, image shape) serves every severity, and a batch may
mix severities per example.

Constants come from Hendrycks' CIFAR-10-C generator
(`hendrycks/robustness`, `ImageNet-C/create_c/make_cifar_c.py`, written for
32 px images), cited below as `make_cifar_c.py`. Sizes that file writes as
fractions of the image (elastic) or of its side (pixelate) scale with the
image; sizes it writes in pixels (blur radii, motion length, frost crop)
stay in pixels, so they suit 28-32 px images and are milder, relative to
the image, on larger ones.

Where the reference uses a tool unavailable here (ImageMagick, a JPEG codec,
frost photographs), a JAX substitute takes its place ("sub"):

| family            | make_cifar_c.py            | here                |
| ----------------- | -------------------------- | ------------------- |
| gaussian_noise    | x + N(0, c)                | same                |
| shot_noise        | numpy Poisson(x c) / c     | same samplers       |
| impulse_noise     | skimage s&p, per element   | same                |
| defocus_blur      | cv2 disk kernel            | same kernels        |
| glass_blur        | blur, pixel "swaps", blur  | same (see below)    |
| motion_blur       | ImageMagick motion blur    | sub: its kernel     |
| zoom_blur         | scipy zoom, averaged       | same, matrices      |
| snow              | ImageMagick-blurred flakes | sub: as motion      |
| frost             | 5 frost photographs        | sub: procedural     |
| fog               | diamond-square fractal     | same recursion      |
| brightness        | HSV value + c              | same, closed form   |
| contrast          | (x - mean) c + mean        | same                |
| elastic_transform | cv2 affine + scipy warp    | jax map_coordinates |
| pixelate          | PIL BOX resize, down/up    | same, PIL's weights |
| jpeg_compression  | PIL JPEG, quality q        | sub: DCT quantiser  |

In detail:

* shot_noise: numpy's two exact Poisson samplers (multiplication of
  uniforms below lam = 10, whose count is drawn here by CDF inversion, and
  Hormann's PTRS above) on a fixed budget of uniforms, because
  jax.random.poisson's rejection loops are slow under vmap. Truncation and
  all-rejected probabilities are below 1e-6.
* glass_blur: the reference "swaps" each pixel with a random up/left
  neighbour, bottom-right to top-left. On its [H, W, 3] arrays the tuple
  swap of two numpy views is a copy (numpy/numpy#14428), and neighbours are
  visited later, so a pass is a parallel gather: out[p] = in[p + d_p]. That
  is what CIFAR-10-C contains, and what is computed (for C = 1 as well).
* motion_blur / snow: ImageMagick's `MotionBlurImage(radius, sigma, angle)`
  averages `2 ceil(radius) + 1` pixels along the ray at `angle` with
  one-sided weights `exp(-i^2 / 2 sigma^2)` and edge-replicated borders;
  offsets are rounded as ImageMagick does (`ceil(i cos(angle) - 0.5)`).
  The PNG round trips (uint8) are dropped.
* frost: the reference blends `c0 x + c1 frost` with a random 32 px crop of
  one of five frost photographs scaled by 0.2, unavailable offline. The
  texture is synthesised instead: a plasma-fractal haze plus crystal
  needles (sparse random seeds, denser where the haze is bright, drawn out
  into tapered lines along six random orientations), lightly blurred, with
  a pale-blue tint for RGB; mean ~0.5. It looks like frost on glass; it is
  not the photographs' distribution.
* jpeg_compression: the reference saves a PIL JPEG at quality
  `[80, 65, 58, 50, 40]`. Here: libjpeg's quality scaling of the standard
  (Annex K) tables; a grayscale image is one luminance plane; RGB goes to
  JFIF YCbCr with 4:2:0 chroma (PIL's default), the chroma table and
  libjpeg's "fancy" (triangle) upsampling. Each plane is edge-padded to
  whole blocks, 8x8 orthonormal DCT, quantised (round half away from zero),
  dequantised and inverted; samples are rounded to 8 bits. Float DCT and
  no entropy coding (lossless anyway): the mean absolute difference from
  PIL's output is ~0.2 (gray) and ~1 (RGB) grey levels, single pixels
  differ more where a coefficient sits on a rounding edge.
* brightness: skimage's RGB->HSV->RGB round trip with V += c equals
  scaling RGB by V'/V (V = max channel; a black pixel becomes grey V'),
  which is what is computed; on one channel it is the intensity plus c.

Randomness: `corrupt_indexed(images, name, severity, seed, indices)` gives
example i the key `fold_in(fold_in(PRNGKey(seed), corruption_id),
indices[i])`, with `corruption_id = ALL_CORRUPTIONS.index(name)`. The key does
not depend on the severity, so the severities of one seed share their
noise. Families that draw no randomness: DETERMINISTIC_CORRUPTIONS.

Quirks of the CIFAR-10-C constants, kept (the mean pixel distance from the
clean image does not grow with the severity everywhere):
* motion_blur 3 and 4, (radius, sigma) = (6, 2) and (8, 2): the weights
  beyond i = 6 are below 1e-9, so the two severities coincide.
* glass_blur 1-3 are one displacement pass with increasing blur (which
  pulls back toward the clean image), 4-5 two passes.
* frost 3-5 lower the image weight (0.9, 0.85, 0.75) about as fast as they
  raise the texture weight (0.4, 0.4, 0.45).
* elastic_transform: the random affine jitter shrinks (0.08 to 0.03 of the
  size) while the elastic field grows and roughens: smaller but local
  displacements, so the mean distance falls with the severity.

The four validation corruptions (`VALIDATION_CORRUPTIONS`, the "extra"
set of the same paper, for selecting models and hyperparameters without
touching the 15): speckle_noise (x + x N(0, c)) and gaussian_blur
(skimage's Gaussian) as in make_cifar_c.py; saturate by the closed form of
skimage's HSV round trip (on one channel: through RGB and back to luma, so
a grey digit is only dimmed, by the tint of hue 0, at severities 4-5);
spatter's mud (severities 4-5) as written there, in luma on one channel.
Spatter's water (severities 1-3: cv2 Canny edges, distance transform and
histogram equalisation) is not ported: those severities raise ValueError.

Besides corruptions: `rotate` and `ROTATIONS` (DomainBed's Rotated MNIST
domains), `to_rgb` and `color_shift` (a coloured variant of digits), and
lazy `Source` wrappers (`corrupted_source`, `rotated_source`,
`color_shifted_source`) for the benchmark's streams.

Layout: `registry` (the names, severities, `corrupt`, `corrupt_indexed`,
`corrupted_source`); one module per family group, `noise`, `blur`,
`weather`, `digital` and `extra` (the validation four); `geometric`
(rotations, colour shifts and their sources); `_common` (the matrices,
traced helpers, checks and keys they share). Import from the package.
"""

# Private names are re-exported for the tests, which check them against the
# reference constants and implementations.
from tta_jax.data.images.corruptions._common import (
  _LUMA as _LUMA,
  CORRUPTION_SEVERITIES,
  MIN_SIZE,
  _clipped_zoom_matrix as _clipped_zoom_matrix,
  _gaussian_matrix as _gaussian_matrix,
  _magick_weights as _magick_weights,
  _motion_blur_magick as _motion_blur_magick,
)
from tta_jax.data.images.corruptions.blur import (
  _GLASS_BLUR as _GLASS_BLUR,
  _glass_blur as _glass_blur,
)
from tta_jax.data.images.corruptions.digital import (
  _BRIGHTNESS as _BRIGHTNESS,
  _JPEG_QUALITY as _JPEG_QUALITY,
  _PIXELATE as _PIXELATE,
)
from tta_jax.data.images.corruptions.extra import (
  _GAUSSIAN_BLUR as _GAUSSIAN_BLUR,
  _MUD as _MUD,
  _SATURATE as _SATURATE,
  _SPATTER as _SPATTER,
)
from tta_jax.data.images.corruptions.geometric import (
  COLOR_SHIFT_ID,
  COLOR_SHIFT_SEVERITIES,
  ROTATIONS,
  color_shift,
  color_shifted_source,
  rotate,
  rotated_source,
  to_rgb,
)
from tta_jax.data.images.corruptions.noise import _poisson as _poisson
from tta_jax.data.images.corruptions.registry import (
  ALL_CORRUPTIONS,
  CORRUPTIONS,
  DETERMINISTIC_CORRUPTIONS,
  VALIDATION_CORRUPTIONS,
  _apply as _apply,
  corrupt,
  corrupt_indexed,
  corrupted_source,
)
from tta_jax.data.images.corruptions.weather import (
  _diamond_square as _diamond_square,
  _noise_levels as _noise_levels,
  _plasma_fractal as _plasma_fractal,
)

__all__ = [
  'ALL_CORRUPTIONS',
  'COLOR_SHIFT_ID',
  'COLOR_SHIFT_SEVERITIES',
  'CORRUPTIONS',
  'CORRUPTION_SEVERITIES',
  'DETERMINISTIC_CORRUPTIONS',
  'MIN_SIZE',
  'ROTATIONS',
  'VALIDATION_CORRUPTIONS',
  'color_shift',
  'color_shifted_source',
  'corrupt',
  'corrupt_indexed',
  'corrupted_source',
  'rotate',
  'rotated_source',
  'to_rgb',
]
