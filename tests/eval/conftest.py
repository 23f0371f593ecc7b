"""Fixtures of the evaluation tests: a tiny phantom world on disk and tiny encoders over it."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from eval_helpers import IMAGE_SIZE, TINY_MODEL
from transformers import BertConfig, BertModel, BertTokenizerFast

from unimed.data.config import DataConfig
from unimed.eval.config import EvalConfig
from unimed.eval.data import EvalData
from unimed.eval.encoders import Encoder, build_encoder
from unimed.eval.tasks import TaskContext
from unimed.phantom.config import PhantomConfig
from unimed.phantom.world import write_world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every downstream layout with a few dozen studies each, 64-px images."""
    root = tmp_path_factory.mktemp("world")
    cfg = PhantomConfig(
        root=str(root), image_size=IMAGE_SIZE, mimic_studies=40, padchest_studies=40,
        chexpert_studies=60, cxp500_studies=24, rsna_studies=48, siim_studies=48,
        covidx_studies=48, object_cxr_studies=48, pdc_studies=24, control_studies=24,
    )
    write_world(cfg, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT folder (model + letter-level WordPiece tokenizer) standing in for the MLM output."""
    path = tmp_path_factory.mktemp("tiny_text")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *string.digits]
    tokens += list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    tokens += ["no", "hay", "pleural", "effusion", "derram", "cardiomegaly", "neumotorax"]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})
    tokenizer.save_pretrained(str(path))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=96)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tiny_text_dir: Path) -> Encoder:
    """A randomly initialised tiny Med-UniC (ResNet-10t image encoder, 2-layer BERT)."""
    return build_encoder("tiny", "Tiny", TINY_MODEL, text_encoder=str(tiny_text_dir), seed=0,
                         max_length=48)


@pytest.fixture(scope="session")
def eval_data(tiny_world: Path) -> EvalData:
    """The tiny world read through the adapters, images cached across tests."""
    return EvalData(DataConfig(root=str(tiny_world), image_size=IMAGE_SIZE, resize_size=72,
                               progress=False))


@pytest.fixture()
def task_context(eval_data: EvalData, tmp_path: Path) -> TaskContext:
    """A context with few epochs, so a task runs in seconds."""
    return TaskContext(eval_data, EvalConfig(min_train_images=8), tmp_path)
