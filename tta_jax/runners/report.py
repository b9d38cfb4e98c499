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


# Methods beyond the palette's 20 colours get evenly spaced hues.
_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '<', '>', 'h', 'p', '*')
# Tables with at least this many cells (methods x domains) also get a
# method x domain heatmap: lines stop being readable well before that.
HEATMAP_MIN_CELLS = 30


def _palette(n: int) -> list[str]:
  """`n` distinct colours: tab10, then tab20's light tones, then hues."""
  from matplotlib import colormaps, colors

  tab20 = [colors.to_hex(c) for c in colormaps['tab20'].colors]
  out = tab20[0::2] + tab20[1::2]
  extra = n - len(out)
  if extra > 0:
    hsv = colormaps['hsv']
    out += [colors.to_hex(hsv((i + 0.5) / extra)) for i in range(extra)]
  return out[:n]


def styles(names) -> dict[str, dict[str, Any]]:
  """A distinct colour and a marker per method; `source` is black, dashed.

  The same method keeps its style in every panel, so one legend serves
  the whole figure.
  """
  names = list(names)
  others = [n for n in names if n != 'source']
  colours = dict(zip(others, _palette(len(others)), strict=True))
  out = {}
  for i, n in enumerate(names):
    if n == 'source':
      out[n] = {'color': '#000000', 'marker': 'o', 'linestyle': '--'}
    else:
      out[n] = {
        'color': colours[n],
        'marker': _MARKERS[i % len(_MARKERS)],
        'linestyle': '-',
      }
  return out


def _title(results: Mapping[str, Any]) -> str:
  cfg = results.get('config', {})
  parts = [
    cfg.get('data', {}).get('name', ''),
    cfg.get('setting', ''),
  ]
  if results.get('protocol') == 'leave_one_domain_out':
    parts.append('leave one domain out')
  seeds = max(
    (m.get('num_seeds', 1) for m in results['methods'].values()), default=1
  )
  if seeds > 1:
    parts.append(f'{seeds} seeds (bars: ± std)')
  return ' · '.join(p for p in parts if p)


def _errors(m: Mapping[str, Any], domains, key: str = 'error') -> list[float]:
  nan = float('nan')
  return [100 * m['domains'].get(d, {}).get(key, nan) for d in domains]


def _per_domain(ax, results, style, lodo: bool) -> None:
  """Error per domain, one line per method, dodged so equal values show.

  Held-out domains (leave one domain out) are separate runs, not a stream:
  their points are not joined.
  """
  domains, methods = results['domains'], results['methods']
  n = len(methods)
  width = min(0.7 / max(n, 1), 0.08)
  for i, (name, m) in enumerate(methods.items()):
    x = [j + (i - (n - 1) / 2) * width for j in range(len(domains))]
    has_std = any('error_std' in m['domains'].get(d, {}) for d in domains)
    ax.errorbar(
      x,
      _errors(m, domains),
      yerr=_errors(m, domains, 'error_std') if has_std else None,
      label=name,
      ms=5,
      lw=1.2,
      elinewidth=0.8,
      capsize=0,
      **{**style[name], **({'linestyle': ''} if lodo else {})},
    )
  ax.set_xticks(range(len(domains)))
  ax.set_xticklabels([_short(d) for d in domains], rotation=45, ha='right')
  ax.set_xlim(-0.5, len(domains) - 0.5)
  for j in range(1, len(domains)):  # separate the domains
    ax.axvline(j - 0.5, color='0.85', lw=0.8, zorder=0)
  ax.set_ylabel('error (%)')
  ax.set_xlabel('held-out domain' if lodo else 'test domain (stream order)')
  ax.set_title('Error per domain', loc='left', fontsize=10)
  ax.grid(axis='y', alpha=0.3)


def _ranked(results) -> list[str]:
  ms = results['methods']
  return sorted(ms, key=lambda n: ms[n]['mean_error'])


def _span(values, pad_fraction: float = 0.12) -> tuple[float, float]:
  """Axis limits around `values` (never narrower than 1 point)."""
  lo, hi = min(values), max(values)
  pad = max(0.5, pad_fraction * (hi - lo))
  return lo - pad, hi + pad


def _mean_panel(ax, results, style, order, lodo: bool) -> None:
  """Mean error per method, best on top, with the std over seeds.

  Points, not bars: the axis is zoomed onto the methods' range, where a
  bar's length would no longer be its value.
  """
  ms = results['methods']
  means = [100 * ms[n]['mean_error'] for n in order]
  stds = [100 * ms[n].get('mean_error_std', 0.0) for n in order]
  for yi, (n, mean, std) in enumerate(zip(order, means, stds, strict=True)):
    st = style[n]
    ax.errorbar(
      [mean],
      [yi],
      xerr=[std] if std else None,
      marker=st['marker'],
      color=st['color'],
      ms=7,
      ls='',
      capsize=3,
    )
    text = f'{mean:.1f}' + (f' ± {std:.1f}' if std else '')
    ax.annotate(
      text,
      (mean + std, yi),
      xytext=(6, 0),
      textcoords='offset points',
      va='center',
      fontsize=8,
    )
  if 'source' in ms:
    ax.axvline(100 * ms['source']['mean_error'], color='k', ls='--', lw=0.8)
  ax.set_yticks(range(len(order)))
  ax.set_yticklabels(order, fontsize=8)
  ax.set_ylim(len(order) - 0.5, -0.5)
  lo, hi = _span(
    [m - s for m, s in zip(means, stds, strict=True)]
    + [m + s for m, s in zip(means, stds, strict=True)]
  )
  ax.set_xlim(lo, hi + 0.15 * (hi - lo))  # room for the values
  what = 'held-out domains' if lodo else 'domains'
  ax.set_title(
    f'Mean error over {what} (%), best first', loc='left', fontsize=10
  )
  ax.grid(axis='x', alpha=0.3)


def _forgetting_panel(ax, results, style, order, lodo: bool) -> None:
  """Clean (source-distribution) error before -> after adaptation."""
  ms = results['methods']
  shown = [n for n in order if 'clean_error_before' in ms[n]]
  lo, hi = float('inf'), float('-inf')
  for yi, n in enumerate(shown):
    before = 100 * ms[n]['clean_error_before']
    after = 100 * ms[n]['clean_error_after']
    lo, hi = min(lo, before, after), max(hi, before, after)
    c = style[n]['color']
    ax.plot([before], [yi], 'o', mfc='white', mec='0.4', ms=6)
    ax.annotate(
      '',
      xy=(after, yi),
      xytext=(before, yi),
      arrowprops={'arrowstyle': '->', 'color': c, 'lw': 1.5},
    )
    ax.plot([after], [yi], marker=style[n]['marker'], color=c, ms=6, ls='')
    if abs(after - before) >= 0.05:
      ax.text(
        after, yi - 0.3, f'{after - before:+.1f}', fontsize=7, ha='center'
      )
  ax.set_yticks(range(len(shown)))
  ax.set_yticklabels(shown, fontsize=8)
  ax.set_ylim(len(shown) - 0.5, -0.7)
  ax.set_xlim(*_span([lo, hi]))
  what = 'Source-domain' if lodo else 'Clean'
  ax.set_title(
    f'{what} error before (○) → after (%): forgetting',
    loc='left',
    fontsize=10,
  )
  ax.grid(axis='x', alpha=0.3)


def _heatmap(fig, ax, results, order) -> None:
  """Method x domain error (%), rows ranked by mean error, values shown."""
  import numpy as np

  domains, ms = results['domains'], results['methods']
  data = np.array(
    [_errors(ms[n], domains) + [100 * ms[n]['mean_error']] for n in order]
  )
  image = ax.imshow(data, cmap='viridis_r', aspect='auto')
  ax.set_xticks(range(len(domains) + 1))
  ax.set_xticklabels(
    [_short(d) for d in domains] + ['mean'], rotation=45, ha='right'
  )
  ax.set_yticks(range(len(order)))
  ax.set_yticklabels(order, fontsize=8)
  ax.axvline(len(domains) - 0.5, color='white', lw=2)
  if data.shape[1] <= 24:
    cut = np.nanmean(data)
    for (r, c), v in np.ndenumerate(data):
      if np.isfinite(v):
        colour = 'white' if v > cut else 'black'
        ax.text(c, r, f'{v:.1f}', ha='center', va='center', fontsize=7,
                color=colour)  # fmt: skip
  fig.colorbar(image, ax=ax, label='error (%)', shrink=0.9, pad=0.01)
  ax.set_title(
    'Error (%) per method and domain, best mean first', loc='left', fontsize=10
  )


def figure(results: Mapping[str, Any]):
  """The results figure (a matplotlib `Figure`); see `plot`."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  domains, ms = results['domains'], results['methods']
  if not ms:
    raise ValueError('results hold no methods to plot')
  lodo = results.get('protocol') == 'leave_one_domain_out'
  style = styles(ms)
  order = _ranked(results)
  forgetting = any('clean_error_before' in m for m in ms.values())
  heatmap = len(ms) * len(domains) >= HEATMAP_MIN_CELLS
  width = max(9.0, 0.55 * len(domains) + 6.0)
  rows_h = max(2.2, 0.28 * len(ms) + 0.8)
  heights = [4.0, rows_h] + ([rows_h + 0.6] if heatmap else [])
  fig = plt.figure(figsize=(width, sum(heights) + 0.8), layout='constrained')
  grid = fig.add_gridspec(len(heights), 2, height_ratios=heights)
  lines = fig.add_subplot(grid[0, :])
  _per_domain(lines, results, style, lodo)
  mean = fig.add_subplot(grid[1, 0] if forgetting else grid[1, :])
  _mean_panel(mean, results, style, order, lodo)
  if forgetting:
    _forgetting_panel(fig.add_subplot(grid[1, 1]), results, style, order, lodo)
  if heatmap:
    _heatmap(fig, fig.add_subplot(grid[2, :]), results, order)
  fig.legend(
    *lines.get_legend_handles_labels(),
    loc='outside right upper',
    title='method',
    fontsize=8,
    ncols=1 + len(ms) // 25,
  )
  fig.suptitle(_title(results), fontsize=11)
  return fig


def plot(results: Mapping[str, Any], path: pathlib.Path) -> None:
  """Writes the results figure to `path`.

  Panels: the error per domain (one line per method, a distinct colour and
  marker each, dodged sideways so equal values stay visible, error bars
  over seeds when there are several); the mean error per method, ranked;
  the clean error before -> after adaptation when it was measured
  (forgetting); and for large tables a method x domain heatmap. One legend,
  outside the data, names the methods for all panels.
  """
  import matplotlib.pyplot as plt

  fig = figure(results)
  fig.savefig(path, dpi=110)
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
