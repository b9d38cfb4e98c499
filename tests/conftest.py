"""Test-session settings, applied before any test imports jax."""

import os

# Eight host devices, so the sharded paths run on CPU too.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

# As in flax's tests: LLVM optimisation dominates compile time for the tiny
# models used here, and the tests check semantics, not speed.
jax.config.update('jax_disable_most_optimizations', True)
