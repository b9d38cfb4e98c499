"""The command line of the experiment binaries.

`main(run)` is what `experiments/*_main.py` call: it defines `--config` (a
`get_config` file, overridable key by key) and `--workdir`, and turns every
mistake a user meets first (a missing or misspelt config file, an unknown
config key, a bad value, a workdir that is a file) into one line on stderr
and exit code 2, before any work; errors during the run keep their
tracebacks.
"""

import difflib
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from tta_jax.runners import configs

FLAGS = flags.FLAGS
USAGE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, OSError)


def fail(message: str) -> None:
  """One line on stderr, exit code 2."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _config_arg(argv) -> str | None:
  for a in argv:
    if a.startswith('--config='):
      return a.split('=', 1)[1]
  return None


def _load(source: str):
  """The config a `--config` value names (file[:argument])."""
  from ml_collections.config_flags import config_flags as impl

  return impl.ConfigFileFlagParser(name='config').parse(source)


def _keys_at(config, path: list[str]) -> list[str] | None:
  node = config
  for key in path:
    if not hasattr(node, 'keys') or key not in node:
      return None
    node = node[key]
  return sorted(node.keys()) if hasattr(node, 'keys') else None


def _explain(error: Exception, argv) -> str:
  """A one-line description of a flag-parsing error."""
  text = str(error).strip()
  missing = re.match(r"^[\\'\"]*([A-Za-z0-9_]+)[\\'\"]", text)
  overrides = [a for a in argv if a.startswith('--config.')]
  if isinstance(error, AttributeError | KeyError) and missing and overrides:
    key = missing.group(1)
    for arg in overrides:
      path = arg[len('--config.') :].split('=', 1)[0].split('.')
      if key in path:
        parent = path[: path.index(key)]
        keys = None
        source = _config_arg(argv)
        if source:
          try:
            keys = _keys_at(_load(source), parent)
          except Exception:  # noqa: BLE001 - only for the hint
            keys = None
        where = '.'.join(['config', *parent])
        hint = ''
        if keys:
          close = difflib.get_close_matches(key, keys, n=3)
          hint = f'; did you mean {close}?' if close else ''
          hint += f' (keys of {where}: {", ".join(keys)})'
        return f'unknown config key {key!r} in {arg.split("=")[0]}{hint}'
  first = next((line for line in text.splitlines() if line.strip()), text)
  if overrides and isinstance(error, ValueError | TypeError):
    return f'{first} (in {" ".join(overrides)})'
  return first


def quiet_libraries() -> None:
  """Keeps the libraries' chatter (JAX's TPU probe, orbax's per-save INFO
  lines) out of the output; `--verbose` brings it back."""
  import logging as std_logging

  from tta_jax._src import checkpoint

  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
  checkpoint.quiet_orbax()


def describe(config, prefix: str = 'config') -> str:
  """Every key of `config` with its value and, where the runner documents
  it, what it means (`--dry_run`)."""
  lines = []

  def walk(node, path):
    for key in node.keys():
      value = node[key]
      dotted = f'{path}.{key}'
      if hasattr(value, 'keys') and value.keys():
        walk(value, dotted)
        continue
      if hasattr(value, 'to_dict'):  # an empty ConfigDict
        value = value.to_dict()
      doc = configs.KEY_HELP.get(dotted[len(prefix) + 1 :], '')
      lines.append(f'{dotted} = {value!r}' + (f'    # {doc}' if doc else ''))

  walk(config, prefix)
  return '\n'.join(lines)


def _check_workdir(workdir: str) -> None:
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f'--workdir={workdir} is a file, not a folder')


def main(
  run: Callable[[Any, str], Any],
  check: Callable[[Any], list[str]] = configs.check,
) -> None:
  """Runs `run(config, workdir)` as an absl binary (see module docstring).

  `check(config)` validates the config before any work and returns the
  names of what will run.
  """
  config_flags.DEFINE_config_file(
    'config',
    None,
    'A get_config file, e.g. configs/default.py[:small].',
    lock_config=True,
  )
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
  flags.DEFINE_bool(
    'dry_run',
    False,
    'Print every config key with its value (and meaning), check the config, '
    'and exit without running.',
  )
  flags.DEFINE_bool(
    'verbose', False, "Also show the libraries' INFO lines (JAX, orbax)."
  )
  flags.mark_flags_as_required(['config', 'workdir'])

  def parse(argv):
    source = _config_arg(argv)
    if source is not None:
      path = pathlib.Path(source.split(':', 1)[0])
      if not path.is_file():
        fail(f'--config={source}: no config file {str(path)!r}')
    try:
      return FLAGS(argv)
    except flags.Error as e:
      cause = e.__cause__ or e.__context__
      while cause is not None and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
      if isinstance(cause, USAGE_ERRORS):
        fail(_explain(cause, argv))
      fail(' '.join(str(e).split()))
    except USAGE_ERRORS as e:
      fail(_explain(e, argv))

  def main_fn(argv):
    if len(argv) > 1:
      fail(f'unexpected arguments: {argv[1:]}')
    if not FLAGS.verbose:
      quiet_libraries()
    if FLAGS.dry_run:
      print(describe(FLAGS.config), flush=True)
    try:
      _check_workdir(FLAGS.workdir)
      names = check(FLAGS.config)
    except USAGE_ERRORS as e:
      fail(str(e).splitlines()[0] if str(e) else repr(e))
    if FLAGS.dry_run:
      print(f'The config is valid; methods: {", ".join(names)}', flush=True)
      return
    run(FLAGS.config, FLAGS.workdir)

  app.run(main_fn, flags_parser=parse)
