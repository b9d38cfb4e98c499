"""The import graph of tta_jax: no circles, and imports only run downward.

Floors, low to high: core (`tta_jax._src`) < models and data < methods (and
`tta_jax.testing`) < trainers < runners < experiments and benchmarks. A
module may import its own floor and the floors below it, never above; the
library never imports `configs`, `experiments`, `benchmarks` or `tests`;
benchmarks never import `tests`. Imports inside functions count.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOORS = {
  '_src': 0,
  'models': 1,
  'data': 1,
  'methods': 2,
  'testing': 2,
  'torch_reference': 2,
  'trainers': 3,
  'runners': 4,
}
TOP = 5  # experiments, benchmarks


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for folder in ('tta_jax', 'experiments', 'benchmarks'):
    for path in (ROOT / folder).rglob('*.py'):
      out[_module_name(path)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """Every module `name` imports (resolved to the longest known module)."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split('.')[: len(package.split('.')) - node.level + 1]
        module = '.'.join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ''
      for a in node.names:  # `from pkg import submodule` or a name
        sub = f'{module}.{a.name}'
        found.add(sub if sub in MODULES else module)
  out = set()
  for imported in found:
    parts = imported.split('.')
    while parts and '.'.join(parts) not in MODULES:
      parts.pop()
    if parts:
      out.add('.'.join(parts))
    elif imported.split('.')[0] in ('configs', 'tests', 'experiments'):
      out.add(imported.split('.')[0])
  out.discard(name)
  return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def floor(name: str) -> int | None:
  parts = name.split('.')
  if parts[0] in ('experiments', 'benchmarks'):
    return TOP
  if parts[0] != 'tta_jax' or len(parts) < 2:
    return None  # the package root re-exports the public API
  return FLOORS[parts[1]]


def test_every_library_package_has_a_floor():
  unknown = {
    n.split('.')[1]
    for n in MODULES
    if n.startswith('tta_jax.') and n.split('.')[1] not in FLOORS
  }
  assert not unknown, f'packages without a floor: {sorted(unknown)}'


def test_imports_only_run_downward():
  upward = []
  for name, imported in GRAPH.items():
    here = floor(name)
    for other in imported:
      if other in ('configs', 'tests', 'experiments'):
        if name.startswith('tta_jax') or other == 'tests':
          upward.append(f'{name} -> {other}')
        continue
      there = floor(other)
      if here is not None and there is not None and there > here:
        upward.append(f'{name} (floor {here}) -> {other} (floor {there})')
  assert not upward, 'imports against the floors:\n' + '\n'.join(upward)


def _cycles() -> list[list[str]]:
  """Strongly connected components of size > 1 (Tarjan), package
  `__init__` re-exports left out."""
  nodes = [n for n, p in MODULES.items() if p.name != '__init__.py']
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in GRAPH[v]:
      if w not in nodes:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in nodes:
    if v not in index:
      visit(v)
  return out


def test_no_circles():
  cycles = _cycles()
  assert not cycles, f'import circles: {cycles}'


@pytest.mark.parametrize(
  'source, expected',
  [
    ('from tta_jax.runners import adapt\n', {'tta_jax.runners.adapt'}),
    ('def f():\n  from tta_jax import trainers\n', {'tta_jax.trainers'}),
    ('import tests.method_cases\n', {'tests'}),
  ],
)
def test_the_parser_sees_imports(tmp_path, source, expected):
  # Inside functions too: a check that missed them could not fail.
  path = tmp_path / 'probe.py'
  path.write_text(source)
  assert _imports('tta_jax.methods.probe', path) == expected


def test_an_upward_import_is_caught(tmp_path):
  path = tmp_path / 'probe.py'
  path.write_text('def f():\n  from tta_jax.runners import adapt\n')
  imported = _imports('tta_jax.methods.probe', path)
  assert any(floor(o) > floor('tta_jax.methods.probe') for o in imported)
