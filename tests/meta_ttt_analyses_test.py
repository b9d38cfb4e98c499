"""Meta-TTT's analysis tables, from stored results."""

import json
import pathlib
import tempfile

from absl.testing import absltest

from experiments import meta_ttt_analyses


def _results(errors: dict[str, float]) -> dict:
  return {'methods': {n: {'mean_error': e} for n, e in errors.items()}}


class ShiftSelectionTest(absltest.TestCase):
  def test_pick_is_the_lowest_validation_error(self):
    workdir = pathlib.Path(tempfile.mkdtemp())
    meta = workdir / 'meta' / 'meta_ttt'
    meta.mkdir(parents=True)
    (meta / 'metadata.json').write_text(
      json.dumps({'settings': {'meta_train': {'shift_p': 0.08}}})
    )
    validation = _results(
      {'tent': 0.01, 'meta_ttt': 0.05, 'meta_ttt_shift_0p5': 0.04,
       'meta_ttt_shift_0p02': 0.06}
    )  # fmt: skip
    test = _results({'meta_ttt': 0.18, 'meta_ttt_shift_0p5': 0.2})
    table = meta_ttt_analyses.shift_selection(validation, test, workdir)
    lines = table.splitlines()[2:]
    self.assertEqual([line.split(' |')[0] for line in lines],
                     ['| 0.02', '| 0.08', '| 0.5 (pick)'])  # fmt: skip
    self.assertIn('| 5.00 | 18.00 |', lines[1])
    self.assertIn('| 6.00 |  |', lines[0])  # no test run for that variant
    self.assertNotIn('tent', table)
    self.assertIsNone(
      meta_ttt_analyses.shift_selection(_results({'meta_ttt': 0.1}), None,
                                        workdir)
    )  # fmt: skip


if __name__ == '__main__':
  absltest.main()
