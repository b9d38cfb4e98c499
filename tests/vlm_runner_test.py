"""configs/vlm_digits.py through the runners: LiT source, CoOp, five rows."""

import json

import pytest

from configs import vlm_digits
from tta_jax.models import vlm
from tta_jax.runners import adapt, train


# Compiles LiT, CoOp and two TPT steps: minutes on 2 CPU cores.
@pytest.mark.slow
def test_small_config_trains_then_adapts(tmp_path):
  if not vlm.bert.available():
    pytest.skip(f'all-MiniLM-L6-v2 missing: {vlm.bert.INSTALL_HINT}')
  config = vlm_digits.get_config('small')
  train.run(config, tmp_path)
  source = json.loads((tmp_path / 'source/metadata.json').read_text())
  assert source['trainer'] == 'lit'
  assert (tmp_path / 'meta/coop/backbone/metadata.json').exists()
  adapt.run(config, tmp_path)
  results = json.loads((tmp_path / 'results.json').read_text())
  rows = vlm_digits.ROWS.split(',')
  assert list(results['methods']) == rows
  for name in rows:
    r = results['methods'][name]
    assert 0.0 <= r['mean_error'] <= 1.0
    assert all('seconds' in d for d in r['domains'].values())
  # The rotated stream reuses the trained models in the same workdir.
  adapt.run(vlm_digits.get_config('small,rotated'), tmp_path)
  rotated = json.loads((tmp_path / 'rotated.json').read_text())
  assert list(rotated['domains']) == ['rot30', 'rot60']
