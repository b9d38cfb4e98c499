"""Error vs updates (`runners.curves`): reading off when a target is reached."""

import json

import numpy as np
import pytest

from tta_jax.runners import curves


def test_updates_to_target_uses_the_running_mean():
  curve = [0.9, 0.1, 0.9, 0.5, 0.4, 0.3, 0.3]
  # The 3-batch means are 0.63, 0.5, 0.6, 0.4, 0.33: one good batch alone
  # (k = 2) does not count; the mean of batches 4-6 first reaches 0.4.
  assert curves.updates_to_target(curve, 0.4) == 6
  assert curves.updates_to_target(curve, 0.1) is None


def test_write_curves_targets_sars_final_error(tmp_path):
  data = {'sar': [0.5, 0.4, 0.3, 0.3, 0.3], 'mgg': [0.4, 0.3, 0.2, 0.2, 0.2]}
  out = curves.write_curves(tmp_path, data, stem='x')
  assert out['sar_final_error'] == pytest.approx(0.3)
  assert out['updates'] == {'sar': 5, 'mgg': 3}
  assert json.loads((tmp_path / 'x.json').read_text())['updates'] == {
    'sar': 5,
    'mgg': 3,
  }
  assert (tmp_path / 'x.png').stat().st_size > 0


def test_write_curves_without_sar_has_no_target(tmp_path):
  out = curves.write_curves(tmp_path, {'tent': list(np.linspace(1, 0, 5))})
  assert out['sar_final_error'] is None and out['updates'] == {}
