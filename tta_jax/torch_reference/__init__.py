"""PyTorch reference implementations, for parity tests and speed comparisons.

- `methods`: Tent, EATA and SAR steps re-implemented after the official
  code (its quirks kept), and the digits CNN they run on (`from_flax`
  copies tta_jax weights into it).
- `models`: reference architectures (RobustBench WideResNet, TTT
  ResNetCifar, torchvision ResNet) whose state dicts have the keys of the
  released checkpoints.

torch is an optional extra (`INSTALL_HINT`). It is imported only when
`methods` or `models` is imported, never by this package itself, and
nothing else in tta_jax imports them: they are references to check and time
tta_jax against, not part of the library.
"""

# What the parity tests (`pytest -m torch`) and these references need, and
# how to get it: the `torch` extra of pyproject.toml. The CPU build is
# enough; on Linux, PyTorch's CPU-only wheel index keeps the download small.
INSTALL_HINT = (
  'the PyTorch parity tests need torch, the `torch` extra: from the '
  "checkout, pip install -e '.[test,torch]' (a CPU build is enough), then "
  'pytest -m torch'
)
