"""benchmarks/generative_adapter_speed.py on a tiny random LM: the FLOP
columns count every layer (XLA counts a loop body once, and the LM scans
its layers), and the rows are well formed. Timings are never checked."""

import argparse
import importlib.util
import pathlib

import numpy as np

_SCRIPT = (
  pathlib.Path(__file__).parents[1]
  / 'benchmarks'
  / 'generative_adapter_speed.py'
)


def _script():
  spec = importlib.util.spec_from_file_location('ga_speed', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_flops_count_every_layer():
  script = _script()
  args = argparse.Namespace(
    model='tiny', d_r=8, rank=2, window=32, query_tokens=8, new_tokens=2,
    repeats=1, lengths=[32, 64],
  )  # fmt: skip
  rows = script.run(args)
  config, *_ = script.load('tiny', 8, 2, 32)
  d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
  kv = config.num_kv_heads * config.head_size
  # Multiply-adds of the projections and the MLP, per token, all layers.
  per_token = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * f)
  for row in rows:
    tokens = row['n']  # whole windows: 32 and 64 are multiples of 32
    assert row['p_pre'] >= per_token * tokens, (row['p_pre'], per_token)
    # Encoding runs the same layers (plus the generator).
    assert row['ga_enc'] >= per_token * tokens, (row['ga_enc'], per_token)
    assert row['ga_ans'] >= per_token * (8 + 2)
    # Queries to break even: a number (below 1 when encoding costs less
    # than prefilling: from the first query), or inf (never); not NaN.
    assert np.isfinite(row['even']) or row['even'] == np.inf, row['even']
  # Prompting's answer reads a longer cache at 64 tokens than at 32.
  assert rows[1]['p_ans'] > rows[0]['p_ans']
  assert rows[1]['ga_ans'] == rows[0]['ga_ans']
  assert script._row(rows[0]).startswith('| 32 |')
