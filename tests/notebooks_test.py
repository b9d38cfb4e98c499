"""The notebooks: valid, self-installing, and (slow) they run.

The slow run executes every notebook with the working directory outside
the checkout, so `tta_jax` and `configs` must come from the installed
package, as in Colab or any other kernel.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import pytest
from absl.testing import absltest, parameterized

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))


def _code(path):
  nb = json.loads(path.read_text())
  assert nb['nbformat'] == 4
  return [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']


def _setup_cell() -> str:
  return _code(NOTEBOOKS[0])[0]


class NotebooksTest(parameterized.TestCase):
  def test_found(self):
    names = {p.name for p in NOTEBOOKS}
    # The API, the runner, one per landed seed paper, bring your own model.
    self.assertContainsSubset(
      {
        '01_functional_api.ipynb',
        '02_benchmark.ipynb',
        '03_meta_ttt.ipynb',
        '04_generalizeformer.ipynb',
        '05_bring_your_own_model.ipynb',
        '06_mgg.ipynb',
        '07_tlla.ipynb',
        '08_generative_adapter.ipynb',
      },
      names,
    )

  @parameterized.named_parameters(*[(p.stem, p.name) for p in NOTEBOOKS])
  def test_cells_compile(self, name):
    for i, src in enumerate(_code(ROOT / 'notebooks' / name)):
      compile(src, f'{name}[{i}]', 'exec')

  @parameterized.named_parameters(*[(p.stem, p.name) for p in NOTEBOOKS])
  def test_first_code_cell_is_the_setup_cell(self, name):
    self.assertEqual(_code(ROOT / 'notebooks' / name)[0], _setup_cell())
    self.assertIn('TTA_JAX_SOURCE', _setup_cell())


def _run_setup(monkeypatch, cwd, importable: bool) -> list[list[str]]:
  """Runs the setup cell in `cwd`; returns the pip commands it ran."""
  calls = []
  real_find_spec = importlib.util.find_spec

  def find_spec(name, *args, **kwargs):
    if name == 'tta_jax' and not importable:
      return None
    return real_find_spec(name, *args, **kwargs)

  monkeypatch.setattr(importlib.util, 'find_spec', find_spec)
  monkeypatch.setattr(subprocess, 'check_call', calls.append)
  monkeypatch.chdir(cwd)
  exec(compile(_setup_cell(), 'setup', 'exec'), {})
  return calls


def test_setup_installs_the_enclosing_checkout(monkeypatch):
  calls = _run_setup(monkeypatch, ROOT / 'notebooks', importable=False)
  assert calls == [[sys.executable, '-m', 'pip', 'install', '-q', str(ROOT)]]


def test_setup_installs_the_source_outside_a_checkout(monkeypatch, tmp_path):
  calls = _run_setup(monkeypatch, tmp_path, importable=False)
  assert calls == [[sys.executable, '-m', 'pip', 'install', '-q', 'tta_jax']]


def test_setup_does_nothing_when_tta_jax_imports(monkeypatch, tmp_path):
  assert _run_setup(monkeypatch, tmp_path, importable=True) == []


@pytest.mark.slow
class NotebooksRunTest(parameterized.TestCase):
  """Executes every code cell in order (minutes: `pytest -m slow`)."""

  @parameterized.named_parameters(*[(p.stem, p.name) for p in NOTEBOOKS])
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
      import matplotlib
      matplotlib.use('Agg')
    """)
    program = shim + '\n'.join(_code(ROOT / 'notebooks' / name))
    # Outside the checkout: the current directory puts no `tta_jax` or
    # `configs` on the path; the installed package must provide them.
    with tempfile.TemporaryDirectory() as cwd:
      out = subprocess.run(
        [sys.executable, '-c', program],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
      )
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    print(out.stdout[-3000:])


if __name__ == '__main__':
  absltest.main()
