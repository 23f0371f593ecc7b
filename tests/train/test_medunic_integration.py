"""The loop with the real tiny Med-UniC model, its loss and the real data pipeline on tiny PNGs."""

import json
import math

import pytest
import torch

from train_helpers import make_tokenizer, tiny_cfg, write_records
from unimed.data.config import DataConfig
from unimed.data.pretrain import build_pretrain_dataset, build_pretrain_loader
from unimed.methods import create_method
from unimed.models.config import (
    ImageTowerConfig,
    MedUniCConfig,
    MedUniCProjectorConfig,
    TextTowerConfig,
)
from unimed.train.distributed import DistInfo
from unimed.train.loop import train

MODEL = MedUniCConfig(
    image=ImageTowerConfig(encoder="vit_tiny_patch8_64"),
    text=TextTowerConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                         frozen_layers=1),
    projector=MedUniCProjectorConfig(embed_dim=16, ctr_dim=16, hidden_dim=16),
)
DATA = DataConfig(image_size=16, resize_size=20, max_length=8, num_workers=0)


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core machine intra-op threads fight each other: one thread runs this test
    ~20x faster (0.8 s vs 18 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(out_dir, records, tok, cfg, *, seed=0, resume=False):
    torch.manual_seed(seed)
    method = create_method(MODEL, vocab_size=len(tok))
    loader = build_pretrain_loader(build_pretrain_dataset(records, tok, DATA, seed=5), DATA,
                                   batch_size=4)
    return train(method, loader, cfg, out_dir, DistInfo(), resume=resume, progress=False)


def test_medunic_resume_matches_uninterrupted_run(tmp_path):
    """Two steps, stopped after the first and resumed: text dropout, BatchNorm and the data
    position all have to come back from the checkpoint."""
    tokenizer = make_tokenizer(tmp_path)
    records = write_records(tmp_path, 8)
    cfg = tiny_cfg(lr=1e-3, epochs=1)
    full = _run(tmp_path / "full", records, tokenizer, cfg)
    assert len(full.losses) == 2 and all(math.isfinite(v) for v in full.losses)
    row = full.history[0]
    assert {"cvl_loss", "ssv_loss", "tf_loss", "tt_loss"} <= set(row)
    assert row["loss"] == pytest.approx(
        row["cvl_loss"] + row["ssv_loss"] + row["tf_loss"] + row["tt_loss"], rel=1e-5)

    first = _run(tmp_path / "cut", records, tokenizer, tiny_cfg(lr=1e-3, epochs=1, max_steps=1))
    rest = _run(tmp_path / "cut", records, tokenizer, cfg, seed=7, resume=True)
    assert first.losses + rest.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
    logged = (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2]
