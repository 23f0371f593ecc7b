"""benchmarks/data_pipeline.py runs at toy sizes (it prints tables; nothing here is timed), and its
3D rows read the sources on the uncached and first cached epochs only."""

from __future__ import annotations

from benchmark_scripts import benchmark_script

import unimed.data.volume_pretrain


def test_both_tables_at_toy_sizes(capsys, monkeypatch) -> None:
    reads = []
    real = unimed.data.volume_pretrain.read_volume
    monkeypatch.setattr(unimed.data.volume_pretrain, "read_volume",
                        lambda path, **kw: reads.append(path) or real(path, **kw))
    with benchmark_script("data_pipeline") as script:
        script.main(["--images", "2", "--pngs", "2", "--batch-size", "2", "--volumes", "3",
                     "--ct-shape", "16", "32", "32"])
    out = capsys.readouterr().out
    for row in ("JPEG, full decode", "JPEG, draft decode", "JPEG, draft decode, data.image_cache",
                "16-bit PNG", "16-bit PNG, data.image_cache", "no cache", "cache, first epoch",
                "cache, later epochs"):
        assert row in out
    assert "a cache entry is 2.0 MB" in out  # 32 x 128 x 128 float32, the paper preset's input
    # One warm-up read, then each of the 3 volumes without a cache and on the first cached epoch.
    assert len(reads) == 1 + 3 + 3

