"""Image data: the embedded digits, synthetic shifts and full-scale loaders.

- `digits`: the embedded MNIST / UCI digits (the small real benchmark).
- `corruptions`: ImageNet-C corruptions ported to JAX, the validation four,
  rotations and colour shifts, and lazy `Source` wrappers applying them.
- `full_scale`: full-scale test sets read lazily from disk (CIFAR-C,
  ImageNet and its variants, DomainNet, DomainBed folders), by
  `full_scale.load_domains(name, ...)`.
- `image_folder`, `tfds_sources`: the random-access readers beneath them
  (image files decoded with PIL; TFDS array_record data sources).
"""
