"""benchmarks/eval_speed.py's table of the feature cache's passes."""

from __future__ import annotations

from benchmark_scripts import benchmark_script

from unimed.eval.features import FeaturePass


def test_the_passes_table_lists_the_longest_first_and_their_share_of_the_tasks() -> None:
    passes = [FeaturePass("unimedi", "images", "cxp500/test", 2.0),
              FeaturePass("unimedi", "volumes", "luna16-candidates/train", 10.0),
              FeaturePass("unimedi", "texts", "147 texts", 3.0)]
    with benchmark_script("eval_speed") as script:
        rows = script.passes_rows(passes, task_seconds=60.0)
    assert rows == [["volumes", "luna16-candidates/train", "10.0", "17%"],
                    ["texts", "147 texts", "3.0", "5%"],
                    ["images", "cxp500/test", "2.0", "3%"],
                    ["all passes", "3", "15.0", "25%"]]
