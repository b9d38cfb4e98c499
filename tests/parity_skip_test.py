"""Without torch, the parity tests skip and say how to install it."""

import pathlib
import subprocess
import sys
import textwrap

from tta_jax import torch_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every test file that needs the optional `torch` extra.
PARITY_FILES = (
  'tests/convert_test.py',
  'tests/end_to_end_benchmark_test.py',
  'tests/torch_parity_test.py',
  'tests/vlm_parity_test.py',
)


def test_parity_tests_skip_with_the_install_command():
  # `sys.modules['torch'] = None` makes `import torch` fail as if torch
  # were not installed, in a fresh interpreter running pytest.
  program = textwrap.dedent(f"""
    import sys
    sys.modules['torch'] = None
    import pytest
    sys.exit(pytest.main([
      '-q', '-rs', '-p', 'no:cacheprovider', '-p', 'no:xdist',
      *{PARITY_FILES!r},
    ]))
  """)
  out = subprocess.run(
    [sys.executable, '-c', program],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  text = out.stdout + out.stderr
  assert out.returncode == 5, text  # nothing ran: every file skipped
  assert text.count(torch_reference.INSTALL_HINT) == len(PARITY_FILES), text
  assert "pip install -e '.[test,torch]'" in torch_reference.INSTALL_HINT


def test_the_references_name_the_extra_when_torch_is_missing():
  program = textwrap.dedent("""
    import sys
    sys.modules['torch'] = None
    try:
      import tta_jax.torch_reference.methods
    except ModuleNotFoundError as e:
      print(e)
  """)
  out = subprocess.run(
    [sys.executable, '-c', program],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  assert torch_reference.INSTALL_HINT in out.stdout, out.stdout
