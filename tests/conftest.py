"""Test-session settings, applied before any test imports jax."""

import atexit
import os
import shutil
import tempfile

# Eight host devices, so the sharded paths run on CPU too.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402

# As in flax's tests: LLVM optimisation dominates compile time for the tiny
# models used here, and the tests check semantics, not speed.
jax.config.update('jax_disable_most_optimizations', True)

# XLA's persistent compilation cache, one per test session and shared by
# the xdist workers (they inherit the variable): every runner test builds
# its own jitted steps, so the same programs are compiled again and again,
# and a cache hit loads the executable instead. A hit needs the same
# program, compile options and devices, so it changes no result.
_CACHE_VAR = 'TTA_JAX_TEST_COMPILATION_CACHE'
if _CACHE_VAR not in os.environ:
  os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix='tta_jax_xla_cache_')
  atexit.register(shutil.rmtree, os.environ[_CACHE_VAR], ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_VAR])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.05)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
