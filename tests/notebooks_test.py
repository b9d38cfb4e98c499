"""The notebooks: valid, syntactically sound, and (slow) they run."""

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest
from absl.testing import absltest, parameterized

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))


def _code(path):
  nb = json.loads(path.read_text())
  assert nb['nbformat'] == 4
  return [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']


class NotebooksTest(parameterized.TestCase):
  def test_found(self):
    self.assertGreaterEqual(len(NOTEBOOKS), 2)

  @parameterized.parameters(*[(p.name,) for p in NOTEBOOKS])
  def test_cells_compile(self, name):
    for i, src in enumerate(_code(ROOT / 'notebooks' / name)):
      compile(src, f'{name}[{i}]', 'exec')


@pytest.mark.slow
class NotebooksRunTest(parameterized.TestCase):
  """Executes every code cell in order (minutes: `pytest -m slow`)."""

  @parameterized.parameters(*[(p.name,) for p in NOTEBOOKS])
  def test_runs(self, name):
    # IPython's display is replaced by print when IPython is absent.
    shim = textwrap.dedent("""
      import sys, types
      try:
        import IPython.display  # noqa: F401
      except ImportError:
        m = types.ModuleType('IPython.display')
        m.display = print
        m.Image = m.Markdown = lambda *a, **k: a
        ipython = types.ModuleType('IPython')
        ipython.get_ipython = lambda: None
        ipython.version_info = (9, 0)  # read by matplotlib
        ipython.display = m
        sys.modules['IPython'] = ipython
        sys.modules['IPython.display'] = m
    """)
    program = shim + '\n'.join(_code(ROOT / 'notebooks' / name))
    out = subprocess.run(
      [sys.executable, '-c', program],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=1800,
      check=False,
    )
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])


if __name__ == '__main__':
  absltest.main()
