"""Results files: JSON, a markdown table (also printed), CSV, and a plot."""

import csv
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from tta_jax._src import checkpoint

_SHORT = {
  'gaussian_noise': 'gauss',
  'shot_noise': 'shot',
  'impulse_noise': 'impul',
  'defocus_blur': 'defoc',
  'glass_blur': 'glass',
  'motion_blur': 'motn',
  'zoom_blur': 'zoom',
  'snow': 'snow',
  'frost': 'frost',
  'fog': 'fog',
  'brightness': 'brit',
  'contrast': 'contr',
  'elastic_transform': 'elast',
  'pixelate': 'pixel',
  'jpeg_compression': 'jpeg',
  'uci_digits': 'UCI',
}


def _short(name: str) -> str:
  base, _, sev = name.partition('@')
  return _SHORT.get(base, base) + (f'@{sev}' if sev else '')


def _pct(x) -> str:
  return '' if x is None else f'{100 * x:.1f}'


def validation_ranking(results, val_acc, names) -> str:
  """`names` ranked by mean source-val accuracy, with held-out error.

  Only variants meta-trained and evaluated on every held-out domain are
  ranked; the selection reads the validation column alone.
  """
  doms, ms = results['domains'], results['methods']
  rows = []
  for n in names:
    acc = val_acc.get(n, {})
    if n not in ms or any(d not in acc for d in doms):
      continue
    rows.append((sum(acc[d] for d in doms) / len(doms), n))
  if not rows:
    return '(no variant meta-trained and evaluated on every held-out domain)'
  rows.sort(key=lambda r: -r[0])
  lines = [
    '## Variants ranked by source-domain validation accuracy\n',
    '| variant | source-val accuracy | held-out mean error | selected |',
    '|---|---|---|---|',
  ]
  for i, (acc, n) in enumerate(rows):
    lines.append(
      f'| {n} | {_pct(acc)} | {_pct(ms[n]["mean_error"])} | '
      f'{"yes" if i == 0 else ""} |'
    )
  return '\n'.join(lines)


def markdown_table(results: Mapping[str, Any]) -> str:
  """Error (%) per domain and method; mean error, ECE, speed, forgetting."""
  methods = results['methods']
  domains = results['domains']
  header = (
    ['method']
    + [_short(d) for d in domains]
    + ['mean err', 'mean ECE', 'ex/s', 'clean err before → after']
  )
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for name, m in methods.items():
    row = [name] + [_pct(m['domains'].get(d, {}).get('error')) for d in domains]
    mean = _pct(m['mean_error'])
    if 'mean_error_std' in m:
      mean += f' ± {100 * m["mean_error_std"]:.1f}'
    row += [mean, _pct(m['mean_ece']), f'{m["examples_per_second"]:.0f}']
    if 'clean_error_before' in m:
      row.append(
        f'{_pct(m["clean_error_before"])} → {_pct(m["clean_error_after"])}'
      )
    else:
      row.append('')
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def write_csv(results: Mapping[str, Any], path: pathlib.Path) -> None:
  fields = [
    'method',
    'domain',
    'error',
    'ece',
    'nll',
    'n',
    'seconds',
    'examples_per_second',
  ]
  with path.open('w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    w.writeheader()
    for name, m in results['methods'].items():
      for domain, d in m['domains'].items():
        w.writerow({'method': name, 'domain': domain, **d})


def plot(results: Mapping[str, Any], path: pathlib.Path) -> None:
  """Error per domain per method, as lines over the stream's domains."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  domains = results['domains']
  fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(domains) + 2), 4))
  for name, m in results['methods'].items():
    errs = [
      100 * m['domains'].get(d, {}).get('error', float('nan')) for d in domains
    ]
    ax.plot(range(len(domains)), errs, marker='o', ms=3, label=name)
  ax.set_xticks(range(len(domains)))
  ax.set_xticklabels([_short(d) for d in domains], rotation=60, ha='right')
  ax.set_ylabel('error (%)')
  cfg = results.get('config', {})
  ax.set_title(
    f'{cfg.get("data", {}).get("name", "")} · {cfg.get("setting", "")}'
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(
  results: Mapping[str, Any], workdir: pathlib.Path, name: str = 'results'
) -> str:
  """Writes NAME.{json,md,csv,png} into `workdir`; prints the table."""
  workdir = pathlib.Path(workdir)
  checkpoint.write_atomically(
    workdir / f'{name}.json', json.dumps(results, indent=2)
  )
  table = markdown_table(results)
  checkpoint.write_atomically(workdir / f'{name}.md', table + '\n')
  write_csv(results, workdir / f'{name}.csv')
  plot(results, workdir / f'{name}.png')
  print(table, flush=True)
  return table
