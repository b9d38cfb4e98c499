"""The results files: the figure's structure, and the tables unchanged.

The figure is checked by structure (panels, one distinct colour and marker
per method, the legend outside every panel, error bars when there are
seeds), not by pixels.
"""

import csv
import json

import matplotlib
import numpy as np
import pytest

from tta_jax.runners import report

matplotlib.use('Agg')

CORRUPTIONS = (
  'gaussian_noise,shot_noise,impulse_noise,defocus_blur,glass_blur,'
  'motion_blur,zoom_blur,snow,frost,fog,brightness,contrast,'
  'elastic_transform,pixelate,jpeg_compression,uci_digits'
).split(',')
# The twelve default baselines (configs/default.py BASELINES).
TWELVE = (
  'source,norm,norm_prior,norm_ema,tent,eata,eta,sar,cotta,lame,t3a,rotta'
).split(',')


def fake_results(
  methods=TWELVE,
  domains=CORRUPTIONS,
  *,
  seeds=1,
  clean=True,
  lodo=False,
):
  """A results dict shaped as `adapt.run` writes it (errors made up)."""
  rng = np.random.default_rng(0)
  base = rng.uniform(0.1, 0.6, len(domains))
  out = {
    'config': {'data': {'name': 'digits_corrupted'}, 'setting': 'continual'},
    'domains': list(domains),
    'methods': {},
  }
  if lodo:
    out['protocol'] = 'leave_one_domain_out'
  for i, name in enumerate(methods):
    # norm, Tent, EATA, ETA and SAR nearly tie, as they do on the digits.
    errs = np.clip(base - 0.1 * (name != 'source') - 0.001 * i, 0, 1)
    doms = {
      d: {
        'error': float(e),
        'ece': 0.1,
        'nll': 1.0,
        'n': 100,
        'seconds': 1.0,
        'examples_per_second': 100.0,
      }
      for d, e in zip(domains, errs, strict=True)
    }
    m = {
      'domains': doms,
      'mean_error': float(errs.mean()),
      'mean_ece': 0.1,
      'examples_per_second': 500.0,
      'num_seeds': seeds,
    }
    if seeds > 1:
      m['mean_error_std'] = 0.005
      for d in doms.values():
        d['error_std'] = 0.01
    if clean and name != 'source':
      m['clean_error_before'] = 0.05
      m['clean_error_after'] = 0.05 + 0.002 * i
    out['methods'][name] = m
  return out


@pytest.fixture(autouse=True)
def _close_figures():
  import matplotlib.pyplot as plt

  yield
  plt.close('all')


def _method_lines(ax):
  """{label: Line2D} of the per-domain panel's method lines."""
  return {c.get_label(): c.lines[0] for c in ax.containers}


def _panels(fig):
  """The axes that hold data (not the heatmap's colour bar)."""
  return [ax for ax in fig.axes if ax.get_label() != '<colorbar>']


def test_twelve_methods_distinct_colour_and_marker():
  fig = report.figure(fake_results())
  lines = _method_lines(fig.axes[0])
  assert sorted(lines) == sorted(TWELVE)
  colours = [matplotlib.colors.to_hex(ln.get_color()) for ln in lines.values()]
  assert len(set(colours)) == 12, colours
  assert lines['source'].get_linestyle() == '--'
  # Neighbouring methods (tied values) differ in marker too.
  markers = [lines[n].get_marker() for n in TWELVE[1:]]
  assert all(a != b for a, b in zip(markers, markers[1:], strict=False))


def test_colours_stay_distinct_beyond_the_palette():
  names = [f'm{i}' for i in range(45)]
  colours = [s['color'] for s in report.styles(names).values()]
  assert len(set(colours)) == 45


def test_legend_outside_every_panel():
  fig = report.figure(fake_results())
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  assert len(fig.legends) == 1
  legend = fig.legends[0].get_window_extent(renderer)
  assert [t.get_text() for t in fig.legends[0].get_texts()] == TWELVE
  for ax in fig.axes:
    assert ax.get_legend() is None
    assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_panels_of_a_large_table_with_clean_errors():
  fig = report.figure(fake_results())
  titles = [ax.get_title(loc='left') for ax in _panels(fig)]
  assert len(titles) == 4, titles
  assert titles[0].startswith('Error per domain')
  assert titles[1].startswith('Mean error')
  assert 'forgetting' in titles[2]
  assert titles[3].startswith('Error (%) per method and domain')
  heat = _panels(fig)[3].get_images()[0].get_array()
  assert heat.shape == (12, len(CORRUPTIONS) + 1)  # + the mean column
  # Rows are ranked by mean error, best first.
  assert list(heat[:, -1]) == sorted(heat[:, -1])


def test_without_clean_errors_no_forgetting_panel():
  fig = report.figure(fake_results(clean=False))
  titles = [ax.get_title(loc='left') for ax in _panels(fig)]
  assert len(titles) == 3
  assert not any('forgetting' in t for t in titles)


def test_small_table_has_no_heatmap():
  res = fake_results(TWELVE[:3], CORRUPTIONS[:2])
  fig = report.figure(res)
  assert len(_panels(fig)) == 3  # per domain, mean, forgetting
  assert not any(ax.get_images() for ax in fig.axes)


def test_seeds_give_error_bars():
  fig = report.figure(fake_results(seeds=3))
  per_domain, mean = fig.axes[0], fig.axes[1]
  assert per_domain.containers
  assert all(c.has_yerr for c in per_domain.containers)
  assert sum(c.has_xerr for c in mean.containers) == 12
  assert '3 seeds' in fig.get_suptitle()
  single = report.figure(fake_results())
  assert not any(c.has_yerr for c in single.axes[0].containers)
  assert not any(c.has_xerr for c in single.axes[1].containers)


def test_leave_one_domain_out():
  res = fake_results(TWELVE[:5], ['rot0', 'rot45', 'rot75'], lodo=True)
  fig = report.figure(res)
  ax = fig.axes[0]
  assert ax.get_xlabel() == 'held-out domain'
  # Held-out domains are separate runs: points, not joined lines.
  assert {ln.get_linestyle() for ln in _method_lines(ax).values()} == {'None'}
  assert 'leave one domain out' in fig.get_suptitle()
  assert 'Source-domain' in _panels(fig)[2].get_title(loc='left')


def test_missing_domain_entry_is_a_gap():
  res = fake_results(TWELVE[:2], CORRUPTIONS[:3])
  del res['methods']['norm']['domains'][CORRUPTIONS[1]]
  fig = report.figure(res)
  y = _method_lines(fig.axes[0])['norm'].get_ydata()
  assert np.isnan(y[1]) and np.isfinite(y[0])


def test_no_methods_is_an_error():
  with pytest.raises(ValueError, match='no methods'):
    report.figure({'domains': ['a'], 'methods': {}})


def test_write_keeps_its_files_and_tables(tmp_path, capsys):
  res = fake_results(['source', 'tent'], CORRUPTIONS[:2], seeds=2)
  for name, errs in (('source', (0.5, 0.25)), ('tent', (0.125, 0.375))):
    m = res['methods'][name]
    for d, e in zip(CORRUPTIONS[:2], errs, strict=True):
      m['domains'][d]['error'] = e
    m['mean_error'] = sum(errs) / 2
  table = report.write(res, tmp_path, 'results')
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    'results.csv',
    'results.json',
    'results.md',
    'results.png',
  ]
  assert json.loads((tmp_path / 'results.json').read_text()) == res
  assert (tmp_path / 'results.md').read_text() == table + '\n'
  assert table in capsys.readouterr().out
  assert table.splitlines() == [
    '| method | gauss | shot | mean err | mean ECE | ex/s '
    '| clean err before → after |',
    '|---|---|---|---|---|---|---|',
    '| source | 50.0 | 25.0 | 37.5 ± 0.5 | 10.0 | 500 |  |',
    '| tent | 12.5 | 37.5 | 25.0 ± 0.5 | 10.0 | 500 | 5.0 → 5.2 |',
  ]
  rows = list(csv.DictReader((tmp_path / 'results.csv').open()))
  assert [(r['method'], r['domain'], r['error']) for r in rows] == [
    ('source', 'gaussian_noise', '0.5'),
    ('source', 'shot_noise', '0.25'),
    ('tent', 'gaussian_noise', '0.125'),
    ('tent', 'shot_noise', '0.375'),
  ]
  assert (tmp_path / 'results.png').read_bytes()[:4] == b'\x89PNG'
