"""benchmarks/step_profile.py: operations land in the right categories."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
step_profile = pytest.importorskip('step_profile')

KERNELS = {(3, 3, 16, 32)}


@pytest.mark.parametrize(
  'op_name, shape, want',
  [
    (
      'jit(f)/jvp(DigitsCNN)/conv3/conv_general_dilated',
      (8, 14, 14, 32),
      'conv forward',
    ),
    (
      'jit(f)/transpose(jvp(DigitsCNN))/conv3/conv_general_dilated',
      (8, 14, 14, 16),
      'conv input-grad',
    ),
    (
      'jit(f)/transpose(jvp(DigitsCNN))/conv3/conv_general_dilated',
      (3, 3, 16, 32),
      'conv weight-grad',
    ),
    ('jit(f)/jvp(DigitsCNN)/bn2/reduce_sum', (16,), 'BN'),
    ('jit(f)/transpose(jvp(WideResNet))/block1_0/norm_1/mul', (8,), 'BN'),
    ('jit(f)/jvp(DigitsCNN)/reduce_window_max', (8, 7, 7, 32), 'max-pool'),
    ('jit(f)/optimizer/mul', (16,), 'optimizer'),
    (
      'jit(f)/jvp(DigitsCNN)/head/dot_general',
      (8, 10),
      'other model and loss ops',
    ),
    ('jit(f)/log_softmax', (8, 10), 'other model and loss ops'),
  ],
)
def test_classify_xla(op_name, shape, want):
  assert step_profile.classify_xla(op_name, shape, KERNELS) == want


@pytest.mark.parametrize(
  'chain, want',
  [
    (['aten::mkldnn_convolution', 'aten::convolution'], 'conv forward'),
    (
      [
        'aten::convolution_backward',
        'autograd::engine::evaluate_function: ConvolutionBackward0',
      ],
      'conv input-grad',
    ),
    (['aten::mul', 'aten::native_batch_norm_backward'], 'BN'),
    (['aten::add_', 'Optimizer.step#Adam.step'], 'optimizer'),
    (['aten::max_pool2d_with_indices'], 'max-pool'),
    (['aten::relu'], 'other model and loss ops'),
  ],
)
def test_classify_torch(chain, want):
  assert step_profile.classify_torch(chain) == want


def test_profiles_a_tent_step(tmp_path, capsys):
  argv = ['--methods=tent', '--batch_size=8', '--steps=2', '--warmup=1']
  if importlib.util.find_spec('torch') is None:
    argv.append('--no_torch')
  step_profile.main([*argv, f'--out={tmp_path / "profile"}'])
  (row,) = json.loads((tmp_path / 'profile.json').read_text())
  for side in ('jax', 'torch') if '--no_torch' not in argv else ('jax',):
    ms = row[side]['ms']
    assert set(ms) == set(step_profile.CATEGORIES)
    # Tent adapts BN affine parameters only: convolutions run forward and
    # backward (input gradients), never weight gradients.
    assert ms['conv forward'] > 0 and ms['conv input-grad'] > 0, ms
    assert ms['conv weight-grad'] is None and ms['BN'] > 0, ms
    assert row[side]['ops'] > 10
  assert '| conv forward |' in (tmp_path / 'profile.md').read_text()


def test_gaps_inside_a_step_go_to_the_operation_before_them():
  instructions = {
    'a': ('jit(f)/jvp(Net)/conv1/conv_general_dilated', (2, 4, 4, 8)),
    'b': ('jit(f)/jvp(Net)/bn1/mul', (2, 4, 4, 8)),
  }
  # Two steps of a, b; a returns before its work is done (gap 10 -> 50).
  ops = [(0, 10, 'a'), (50, 60, 'b'), (100, 110, 'a'), (150, 160, 'b')]
  got = step_profile.attribute_xla(ops, instructions, set())
  assert got == [
    ('conv forward', 50),
    ('BN', 10),  # the gap before the next step's first op is the host's
    ('conv forward', 50),
    ('BN', 10),
  ]
