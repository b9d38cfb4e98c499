"""Data: stream protocols and benchmarks at the top, datasets by modality.

- `sources`: the random-access `Source` protocol, `Domain`, array sources.
- `streams`: the test-time stream protocols built from domains.
- `benchmarks`: the config -> benchmark factory (domains and streams of a
  run's `config.data`).
- `images/`: image datasets and shifts (embedded digits, corruptions,
  full-scale loaders).
"""
