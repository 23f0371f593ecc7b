"""The trained model outside its run: `unimed.load`, `unimed export`, `unimed classify` / `embed`,
on one tiny run (phantom -> vocab -> MLM -> pre-training -> zero-shot evaluation) shared by the module."""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import unimed
from test_cli import TINY, TINY_PRIOR, _tiny_english_bert
from unimed.cli import main
from unimed.config import load_run_config
from unimed.errors import ConfigError
from unimed.eval.prompts import load_prompts
from unimed.phantom.writers.dicom import dicom_ids, write_dicom
from unimed.train.checkpoint import checkpoint_config, find_checkpoint

TEXTS = ["small left pleural effusion", "no acute cardiopulmonary process", "derrame pleural"]
CLASSES = ["pleural effusion", "pneumonia"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A pre-trained and zero-shot-evaluated tiny run folder, launched as a user launches one: from
    its project folder, with relative paths. Every test here then reads it from another working
    directory (the repository's), as a notebook or a script elsewhere would."""
    root = tmp_path_factory.mktemp("pretrained")
    cfg = {**TINY, "run": {**TINY["run"], "output_dir": "runs"},
           "phantom": {**TINY["phantom"], "root": "world"}, "data": {**TINY["data"], "root": "world"}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    _tiny_english_bert(root / "english_bert")
    launched_from = Path.cwd()
    os.chdir(root)
    try:
        for stage in ("phantom", "vocab", "mlm", "pretrain"):
            assert main([stage, "tiny.yaml", "vocab.base_model=english_bert", "--quiet"]) == 0
        assert main(["evaluate", "runs/tiny", "--tasks", "zero_shot", "eval.baselines=[]", "--quiet"]) == 0
    finally:
        os.chdir(launched_from)
    return root / "runs" / "tiny"


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """A folder with one PNG, one JPEG (in a sub-folder) and one DICOM chest image, plus a text file."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    pixels = [rng.integers(0, 256, (80, 70), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(pixels[0]).save(folder / "a.png")
    Image.fromarray(pixels[1]).save(folder / "sub" / "b.jpg", quality=95)
    write_dicom(folder / "c.dcm", pixels[2], dicom_ids(0, "test", "p1", "s1", "i1"), view="PA",
                sex="F", age=50)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run_encoder(run: Path):
    """The checkpoint's Encoder exactly as `unimed evaluate` builds it."""
    from unimed.commands.evaluate import build_encoders

    checkpoint = find_checkpoint(run)
    return build_encoders(load_run_config(checkpoint_config(checkpoint)), checkpoint, ())[0]


def _eval_pixels(files: list[Path], cfg) -> torch.Tensor:
    """Images decoded and resized as the zero-shot evaluation does."""
    from unimed.data.images import load_image
    from unimed.data.transforms import eval_transform

    transform = eval_transform(cfg.data.image_size, cfg.data.resize_size)
    return torch.stack([transform(load_image(f)) for f in files])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_export_round_trip_gives_the_run_encoders_embeddings(tiny_run: Path, images: Path, tmp_path: Path):
    out = tmp_path / "exported"
    assert main(["export", str(tiny_run), str(out), "--quiet"]) == 0
    for name in ("model.safetensors", "config.yaml", "text_encoder/config.json", "tokenizer",
                 "prompts/en.yaml", "prompts/es.yaml", "preprocess.json", "README.md"):
        assert (out / name).exists(), name
    assert not list((out / "text_encoder").glob("*.safetensors"))  # text weights live in the model's
    # safetensors creates its files 0o600 (safetensors#782): the weights are readable like the rest.
    assert _mode(out / "model.safetensors") == _mode(out / "config.yaml")
    card = (out / "README.md").read_text()
    assert "Zero-shot" in card and "mimic-cxr" in card and "| --- |" in card
    assert "- exported with: unimed " in card and "Evaluated with: unimed " in card
    assert "other weights" not in card  # the run was evaluated on the checkpoint exported
    assert json.loads((out / "preprocess.json").read_text())["image_size"] == TINY["data"]["image_size"]
    # The run trained on its own MLM output: the export does not name that folder of this machine.
    assert yaml.safe_load((out / "config.yaml").read_text())["method"]["text"]["encoder"] is None

    reference = _run_encoder(tiny_run)
    files = sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg", ".dcm"))
    cfg = load_run_config(checkpoint_config(find_checkpoint(tiny_run)))
    want_image = reference.image_features(_eval_pixels(files, cfg), normalize=True)
    want_text = reference.text_features(TEXTS, normalize=True)
    for source in (out, tiny_run):
        model = unimed.load(source)
        assert model.device == torch.device("cpu") and not model.model.training
        assert repr(model) == (
            f"Pretrained(method='medunic', image={TINY['method']['image']['encoder']!r}, "
            f"image_size={TINY['data']['image_size']}, languages=('en', 'es'), device='cpu')")
        torch.testing.assert_close(model.encode_image(files), want_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(TEXTS), want_text, rtol=1e-5, atol=1e-5)

    # Zero-shot by hand: cosine to "{disease}" minus cosine to the negative prompt, the
    # probability a two-way softmax of the two at the model's temperature.
    result = unimed.load(out).zero_shot(files, CLASSES, "es")
    prompts = load_prompts("es", stemming=cfg.eval.prompt_stemming)
    temperature = float(reference.temperature)
    for c, name in enumerate(CLASSES):
        pos, neg = reference.text_features([prompts.positive(name), prompts.negative(name)],
                                           normalize=True)
        for i in range(len(files)):
            a, b = float(want_image[i] @ pos), float(want_image[i] @ neg)
            assert result.scores[i, c] == pytest.approx(a - b, abs=1e-5)
            softmax = np.exp(a / temperature) / (np.exp(a / temperature) + np.exp(b / temperature))
            assert result.probabilities[i, c] == pytest.approx(softmax, abs=1e-5)
    one = unimed.load(out).zero_shot(files, CLASSES[1], "es")  # one class, not its letters
    assert one.classes == (CLASSES[1],)
    np.testing.assert_allclose(one.scores[:, 0], result.scores[:, 1], atol=1e-6)


def test_text_in_a_language_is_embedded_as_its_training_reports_were_written(tiny_run: Path):
    """The phantom's Spanish reports are distributed stemmed (as PadChest's are), so raw Spanish
    text tokenizes into other pieces than the model trained on; with ``language="es"`` it is
    written as they were, as the zero-shot prompts are."""
    model = unimed.load(tiny_run)
    raw = ["Derrame pleural izquierdo.", "No se observa neumotórax."]
    prepared = [model.prompts("es").prepare(text) for text in raw]
    assert prepared == ["derram pleural izquierd.", "no se observ neumotorax."]
    torch.testing.assert_close(model.encode_text(raw, language="es"), model.encode_text(prepared))
    torch.testing.assert_close(model.encode_text(raw, language="ES"), model.encode_text(prepared))  # any case
    torch.testing.assert_close(model.encode_text(raw, language="es-ES"), model.encode_text(prepared))
    tokenize = model.encoder.tokenizer.tokenize
    assert [tokenize(t) for t in raw] != [tokenize(t) for t in prepared]  # as given: other input ids
    with pytest.raises(ConfigError, match="unknown language 'xx'"):
        model.encode_text(raw, language="xx")
    with pytest.raises(ValueError, match=r"^texts are strings; item 1 is None$"):
        model.encode_text(["derrame", None], language="es")
    for given, kind in ((5, "int"), (b"derrame", "bytes"), (None, "NoneType")):
        with pytest.raises(ValueError, match=rf"^texts are a string or a sequence of strings, not {kind}$"):
            model.encode_text(given)
    # A dict's keys were embedded, a set's texts in an order that matched no input.
    for given, kind in (({"derrame": 1}, "dict"), ({"derrame", "edema"}, "set")):
        with pytest.raises(ValueError, match=rf"^texts are a string or a sequence of strings, not {kind} \("):
            model.encode_text(given)
    for blank in ("", " \n\t", "\u200b", "\ufeff\xa0", " . "):  # zero-width and no-break spaces passed
        with pytest.raises(ValueError, match=rf"^texts hold words; item 1 is {re.escape(repr(blank))} \(a "):
            model.encode_text(["derrame", blank])


def test_every_image_input_kind_gives_the_same_embedding(tiny_run: Path, images: Path):
    from unimed.data.images import load_image

    model = unimed.load(tiny_run)
    path = images / "a.png"
    grey = load_image(path)
    inputs = [path, str(path), Image.open(path), grey, torch.from_numpy(grey),
              np.asarray(Image.open(path)), torch.from_numpy(grey).expand(3, -1, -1),
              Image.fromarray(grey)]  # a float ("F") PIL image: "L" would round it to 0 / 1
    got = torch.cat([model.encode_image(item) for item in inputs])
    assert got.shape == (len(inputs), TINY["method"]["projector"]["embed_dim"])
    torch.testing.assert_close(got, got[:1].expand_as(got), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(inputs)))


def test_paths_under_the_home_folder_may_start_with_a_tilde(tiny_run: Path, images: Path, monkeypatch):
    import nibabel as nib

    volume = images / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), -1000, np.int16), np.eye(4)), str(volume))
    monkeypatch.setenv("HOME", str(tiny_run.parent))
    model = unimed.load(f"~/{tiny_run.name}")
    monkeypatch.setenv("HOME", str(images))
    torch.testing.assert_close(model.encode_image("~/a.png"), model.encode_image(images / "a.png"))
    torch.testing.assert_close(model.encode_volume("~/ct.nii.gz"), model.encode_volume(volume))


def test_encode_volume_gives_the_3d_evaluations_volume_embeddings(tiny_run: Path, tmp_path: Path):
    """A CT volume (NIfTI, and a folder of slice images) embeds as the 3D evaluation embeds the
    same volume of a records table: the evaluation's feature cache is the reference."""
    import nibabel as nib

    from unimed.eval.data import EvalData
    from unimed.eval.features import FeatureCache

    folder = tmp_path / "data" / "ct"
    (folder / "scan").mkdir(parents=True)
    rng = np.random.default_rng(0)
    hu = np.clip(rng.normal(-500, 400, (20, 18, 7)), -1000, 400).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 4.0, 1.0])), str(folder / "a.nii.gz"))
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "scan" / f"{k:04d}.png")
    (folder / "records.csv").write_text("volume,patient_id,split\na.nii.gz,p1,test\nscan,p2,test\n",
                                        encoding="utf-8")
    model = unimed.load(tiny_run)
    cfg = model.config
    data = EvalData(dataclasses.replace(cfg.data, root=str(tmp_path / "data")))
    want = FeatureCache().volumes(model.encoder, data, "ct", "test", space="projected",
                                  slices=cfg.eval.volume.slices, window=cfg.eval.volume.window,
                                  batch_size=4)
    got = model.encode_volume([folder / "a.nii.gz", str(folder / "scan")], normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    one = model.encode_volume(folder / "a.nii.gz")
    torch.testing.assert_close(one, torch.nn.functional.normalize(want[:1], dim=-1), rtol=1e-5, atol=1e-5)

    # Zero-shot on CT: the cosine to the positive prompt minus the cosine to the negative one.
    result = model.zero_shot_volume([folder / "a.nii.gz", folder / "scan"], CLASSES, "es")
    prompts = model.prompts("es")
    for c, name in enumerate(CLASSES):
        pos, neg = model.encode_text([prompts.positive(name), prompts.negative(name)])
        expected = (torch.nn.functional.normalize(want, dim=-1) @ (pos - neg)).numpy()
        np.testing.assert_allclose(result.scores[:, c], expected, atol=1e-5)
        np.testing.assert_allclose(result.probabilities[:, c],
                                   1 / (1 + np.exp(-expected / float(model.encoder.temperature))), atol=1e-5)

    # The command line: a folder of volumes (a file and a slice folder), and a folder that is one.
    (folder / "records.csv").rename(tmp_path / "records.csv")  # leave only the volumes in it
    out = tmp_path / "ct.npy"
    assert main(["embed", str(tiny_run), str(folder), "--volumes", "--out", str(out), "--quiet"]) == 0
    np.testing.assert_allclose(np.load(out), torch.nn.functional.normalize(want, dim=-1).numpy(), atol=1e-5)
    assert [r["file"] for r in csv.DictReader(out.with_suffix(".csv").open())] == ["a.nii.gz", "scan"]
    args = ["--volumes", "--out", str(out), "--quiet"]
    assert main(["embed", str(tiny_run), str(folder / "scan"), *args]) == 0
    unit = torch.nn.functional.normalize(want, dim=-1).numpy()
    np.testing.assert_allclose(np.load(out), unit[1:], atol=1e-5)
    assert [r["file"] for r in csv.DictReader(out.with_suffix(".csv").open())] == ["scan"]
    scores = tmp_path / "ct_scores.csv"  # not ct.csv, the embeddings' listing: that is refused
    assert main(["classify", str(tiny_run), str(folder), "--volumes", "--classes", ",".join(CLASSES),
                 "--language", "es", "--out", str(scores), "--quiet"]) == 0
    rows = list(csv.DictReader(scores.open()))
    assert [r["file"] for r in rows] == ["a.nii.gz", "scan"]
    for c, name in enumerate(CLASSES):
        for column, want in ((f"score({name})", result.scores), (f"p({name})", result.probabilities)):
            np.testing.assert_allclose([float(r[column]) for r in rows], want[:, c], atol=1e-5)


@pytest.mark.parametrize("make, expected", [
    (lambda grey: grey * 255, r"image 1: float pixels must lie in \[0, 1\], these span 0 \.\. 255 "),
    (lambda grey: np.where(grey > 0.5, np.nan, grey), "image 1: its pixels include NaN or infinite values"),
    (lambda grey: np.stack([grey] * 3, axis=-1), r"image 1: an image array must be \(H, W\) grey or "
                                                 r"\(C, H, W\) with C = 1 or 3, got shape \(\d+, \d+, 3\)"),
    # np.array of Python ints is int64: scaled by int64's maximum it was a black image, without a word.
    (lambda grey: np.rint(grey * 4095).astype(np.int64), r"image 1: a int64 array; pass uint8 or uint16 "),
    (lambda grey: torch.from_numpy(np.rint(grey * 4095).astype(np.int32)), r"image 1: a int32 array; "),
    (lambda grey: grey[:0], r"image 1: it is empty, shape \(0, \d+\)$"),
    # Raw errors from numpy's isfinite or from deep in torch; a complex image lost its imaginary part.
    (lambda grey: grey.astype(object), r"image 1: a object array; pass real pixels"),
    (lambda grey: grey.astype(np.complex64), r"image 1: a complex64 array; pass real pixels"),
    (lambda grey: np.float32(0.5), r"image 1: an image array must be \(H, W\) .* got shape \(\)$"),
])
def test_an_image_array_the_model_cannot_read_as_given_is_named(tiny_run: Path, images: Path, make, expected):
    """Not an embedding of clipped, black or NaN pixels, nor an error from deep in the resize."""
    from unimed.data.images import load_image

    grey = load_image(images / "a.png")
    grey = (grey - grey.min()) / (grey.max() - grey.min())  # spans 0 .. 1 exactly
    with pytest.raises(ValueError, match=expected):
        unimed.load(tiny_run).encode_image([grey, make(grey)])


def test_uint8_uint16_and_boolean_arrays_read_as_their_grey_values(tiny_run: Path):
    model = unimed.load(tiny_run)
    levels = np.random.default_rng(5).integers(0, 256, (70, 80))
    grey = (levels / 255).astype(np.float32)
    want = model.preprocess(grey)
    torch.testing.assert_close(model.preprocess(levels.astype(np.uint8)), want)
    torch.testing.assert_close(model.preprocess(torch.from_numpy(levels.astype(np.uint8))), want)
    torch.testing.assert_close(model.preprocess((levels * 257).astype(np.uint16)), want)
    twelve_bit = np.random.default_rng(6).integers(0, 4096, (70, 80))  # pydicom's pixel_array of a CR
    torch.testing.assert_close(model.preprocess(twelve_bit.astype(np.uint16)),
                               model.preprocess((twelve_bit / 4095).astype(np.float32)))
    mask = levels > 127
    torch.testing.assert_close(model.preprocess(mask), model.preprocess(mask.astype(np.float32)))
    # A flipped view (negative strides) and a bfloat16 tensor were errors from deep in torch.
    torch.testing.assert_close(model.preprocess(grey[::-1]), model.preprocess(grey[::-1].copy()))
    half = torch.from_numpy(grey).bfloat16()
    torch.testing.assert_close(model.preprocess(half), model.preprocess(half.float()))


def test_classify_and_embed_write_what_the_python_api_gives(tiny_run: Path, images: Path,
                                                             tmp_path: Path, capsys):
    model = unimed.load(tiny_run)
    files = [images / "a.png", images / "c.dcm", images / "sub" / "b.jpg"]  # sorted relative paths
    scores = tmp_path / "scores.csv"
    args = ["classify", str(tiny_run), str(images), "--classes", ",".join(CLASSES),
            "--language", "en", "--out", str(scores), "--quiet"]
    assert main(args) == 0
    rows = list(csv.DictReader(scores.open()))
    assert [r["file"] for r in rows] == ["a.png", "c.dcm", "sub/b.jpg"]
    expected = model.zero_shot(files, CLASSES, "en")
    for i, row in enumerate(rows):
        for c, name in enumerate(CLASSES):
            assert float(row[f"p({name})"]) == pytest.approx(expected.probabilities[i, c], abs=1e-5)
            assert float(row[f"score({name})"]) == pytest.approx(expected.scores[i, c], abs=1e-5)

    want = model.encode_image(files).numpy()
    assert main(["embed", str(tiny_run), str(images), "--out", str(tmp_path / "e.npy"), "--quiet"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want, atol=1e-5)
    names = list(csv.DictReader((tmp_path / "e.csv").open()))
    assert [(int(r["row"]), r["file"]) for r in names] == [(0, "a.png"), (1, "c.dcm"), (2, "sub/b.jpg")]
    single = tmp_path / "one.safetensors"
    assert main(["embed", str(tiny_run), str(files[1]), "--out", str(single), "--quiet"]) == 0
    np.testing.assert_allclose(load_file(single)["embeddings"].numpy(), want[1:2], atol=1e-5)
    assert _mode(single) == _mode(single.with_suffix(".csv"))


def test_a_listing_beside_the_output_replaces_only_an_earlier_listing(tiny_run: Path, images: Path,
                                                                       tmp_path: Path, capsys):
    """embed's `<out>.csv` and `<out>.skipped.csv` overwrite an earlier run's listings, never a file
    of the user's own that happens to have their name: that is one line, before any image is read."""
    mine = tmp_path / "e.csv"
    mine.write_text("patient,finding\n1,effusion\n", encoding="utf-8")
    out = tmp_path / "e.npy"
    _fails_in_one_line(capsys, ["embed", str(tiny_run), str(images), "--out", str(out), "--quiet"],
                       f"--out: {mine} exists and was not written by unimed")
    assert mine.read_text(encoding="utf-8") == "patient,finding\n1,effusion\n" and not out.exists()
    mine.write_bytes(b"\xff\xfe\x00binary")
    _fails_in_one_line(capsys, ["embed", str(tiny_run), str(images), "--out", str(out), "--quiet"],
                       f"--out: {mine} exists and was not written by unimed")
    mine.unlink()
    assert main(["embed", str(tiny_run), str(images), "--out", str(out), "--quiet"]) == 0
    assert main(["embed", str(tiny_run), str(images), "--out", str(out), "--quiet"]) == 0  # its own: replaced
    assert len(list(csv.DictReader(mine.open()))) == 3

    notes = tmp_path / "scores.skipped.csv"
    notes.write_text("my notes\n", encoding="utf-8")
    for args in (["embed", str(tiny_run), str(images), "--out", str(tmp_path / "scores.npy")],
                 ["classify", str(tiny_run), str(images), "--classes", "pneumonia", "--out",
                  str(tmp_path / "scores.csv")]):
        _fails_in_one_line(capsys, [*args, "--on-error", "skip", "--quiet"],
                           f"--on-error skip: {notes} exists and was not written by unimed")
        assert notes.read_text(encoding="utf-8") == "my notes\n"
    notes.unlink()
    # The output itself: a table of the user's at classify's --out, an array without embed's
    # listing beside it, were overwritten without a word.
    precious = tmp_path / "precious.csv"
    precious.write_text("my precious table\n", encoding="utf-8")
    _fails_in_one_line(capsys, ["classify", str(tiny_run), str(images), "--classes", "pneumonia", "--out",
                                str(precious), "--quiet"],
                       f"--out: {precious} exists and was not written by unimed classify")
    assert precious.read_text(encoding="utf-8") == "my precious table\n"
    array = tmp_path / "mine.npy"
    np.save(array, np.arange(3))
    _fails_in_one_line(capsys, ["embed", str(tiny_run), str(images), "--out", str(array), "--quiet"],
                       f"--out: {array} exists without the listing mine.csv that unimed embed writes")
    np.testing.assert_array_equal(np.load(array), np.arange(3))
    assert main(["classify", str(tiny_run), str(images), "--classes", "pneumonia", "--out",
                 str(tmp_path / "scores.csv"), "--on-error", "skip", "--quiet"]) == 0
    assert main(["classify", str(tiny_run), str(images), "--classes", "pneumonia", "--out",
                 str(tmp_path / "scores.csv"), "--on-error", "skip", "--quiet"]) == 0
    assert list(csv.DictReader(notes.open())) == []


def test_a_folder_lists_its_tiffs_and_float_tiffs_embed_as_their_pixels(tiny_run: Path, images: Path):
    from unimed.commands.inference import list_images
    from unimed.data.images import load_image

    grey = load_image(images / "a.png")
    Image.fromarray(grey).save(images / "sub" / "d.tiff")
    assert [p.relative_to(images).as_posix() for p in list_images(images)] == [
        "a.png", "c.dcm", "sub/b.jpg", "sub/d.tiff"]
    model = unimed.load(tiny_run)
    torch.testing.assert_close(model.encode_image(images / "sub" / "d.tiff"), model.encode_image(grey))


def test_dicom_files_named_without_a_suffix_are_found_and_read(tiny_run: Path, images: Path):
    """Hospital exports name DICOM files by instance UID or "IM0001": listed by their 'DICM' prefix
    and read as DICOM; a DICOMDIR index and other files are not listed, nor hidden ones (a Mac's
    '._' resource forks, which `classify` stopped at as unreadable images)."""
    from unimed.commands.inference import list_images, list_volumes

    export = images / "export" / "S1"
    export.mkdir(parents=True)
    shutil.copy(images / "c.dcm", export / "1.2.840.113619.2.55.3.5")
    shutil.copy(images / "c.dcm", export / "IM0001")
    shutil.copy(images / "c.dcm", images / "export" / "DICOMDIR")
    (export / "log.1").write_text("not an image")
    (images / "sub" / "._b.jpg").write_bytes(b"\x00\x05\x16\x07 a Mac's resource fork")
    (images / ".ipynb_checkpoints").mkdir()
    shutil.copy(images / "a.png", images / ".ipynb_checkpoints" / "a.png")
    assert [p.relative_to(images).as_posix() for p in list_images(images)] == [
        "a.png", "c.dcm", "export/S1/1.2.840.113619.2.55.3.5", "export/S1/IM0001", "sub/b.jpg"]
    scans = images / "scans"
    (scans / ".ipynb_checkpoints").mkdir(parents=True)
    for name in ("ct.nii.gz", "._ct.nii.gz"):
        (scans / name).write_bytes(b"")
    assert list_volumes(scans) == [scans / "ct.nii.gz"]
    model = unimed.load(tiny_run)
    torch.testing.assert_close(model.encode_image([export / "IM0001", export / "1.2.840.113619.2.55.3.5"]),
                               model.encode_image([images / "c.dcm"] * 2))


def test_images_in_linked_folders_are_listed_once(tmp_path: Path):
    """A folder of images often links its sub-folders in from elsewhere (a NAS share per hospital);
    Python's rglob does not enter a linked folder, so `embed` / `classify` left their images out
    without a word. A link back up (a cycle) is entered once."""
    from unimed.commands.inference import list_images

    shared = tmp_path / "nas" / "hospital-a"
    (shared / "2024").mkdir(parents=True)
    (tmp_path / "images" / "local").mkdir(parents=True)
    for path in (shared / "a.png", shared / "2024" / "b.png", tmp_path / "images" / "local" / "c.png"):
        path.write_bytes(b"")
    (tmp_path / "images" / "hospital-a").symlink_to(shared, target_is_directory=True)
    (shared / "2024" / "up").symlink_to(tmp_path / "images", target_is_directory=True)  # a cycle
    assert [p.relative_to(tmp_path / "images").as_posix() for p in list_images(tmp_path / "images")] == [
        "hospital-a/2024/b.png", "hospital-a/a.png", "local/c.png"]


def test_a_folder_of_volumes_leaves_out_sub_folders_without_a_file(tmp_path: Path, caplog):
    """A folder of volumes lists its volume files and the sub-folders that hold files (a DICOM
    series, slice images); an empty sub-folder (left by an extraction, or an output folder), which
    stopped `embed --volumes` as an unreadable series, is left out and named in a warning."""
    from unimed.commands.inference import list_volumes

    scans = tmp_path / "scans"
    for folder, name in (("slices", "0000.png"), ("series", "IM0001"), ("empty/inner", None)):
        (scans / folder).mkdir(parents=True)
        if name:
            (scans / folder / name).write_bytes(b"")
    (scans / "hidden-only").mkdir()
    (scans / "hidden-only" / ".DS_Store").write_bytes(b"")
    (scans / "ct.nii.gz").write_bytes(b"")
    (scans / "UP.MHA").write_bytes(b"")  # an upper-case name was left out of the listing without a word
    with caplog.at_level(logging.WARNING):
        listed = list_volumes(scans)
    assert listed == [scans / "UP.MHA", scans / "ct.nii.gz", scans / "series", scans / "slices"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{scans}: 2 sub-folder(s) hold no file, left out: empty, hidden-only"]


def test_preprocessed_input_gives_what_the_files_give(tiny_run: Path, images: Path, tmp_path: Path):
    """`preprocess` / `preprocess_volume` then ``preprocessed=True`` (the reading done elsewhere, in
    a DataLoader's workers say) is the same as passing the files; anything else is named."""
    import nibabel as nib

    model = unimed.load(tiny_run)
    files = [images / "a.png", images / "sub" / "b.jpg"]
    pixels = model.preprocess(files)
    torch.testing.assert_close(model.encode_image(pixels, preprocessed=True), model.encode_image(files))
    np.testing.assert_array_equal(model.zero_shot(pixels, CLASSES, preprocessed=True).scores,
                                  model.zero_shot(files, CLASSES).scores)
    rng = np.random.default_rng(1)
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(-1000, 400, (20, 18, 7)).astype(np.int16), np.eye(4)), str(volume))
    stacks = model.preprocess_volume([volume, volume])
    torch.testing.assert_close(model.encode_volume(stacks, preprocessed=True),
                               model.encode_volume([volume] * 2))
    np.testing.assert_array_equal(model.zero_shot_volume(stacks, CLASSES, preprocessed=True).scores,
                                  model.zero_shot_volume([volume] * 2, CLASSES).scores)
    side = model.image_size
    with pytest.raises(ValueError, match=rf"takes the float tensor of shape \(N, 3, {side}, {side}\), "
                                         rf"N >= 1, that preprocess\(\) returns, got a torch.float32 tensor "
                                         rf"of shape \(2, 1, "):
        model.encode_image(pixels[:, :1], preprocessed=True)
    with pytest.raises(ValueError, match=rf"got a torch.float32 tensor of shape \(0, 3, {side}, {side}\)"):
        model.zero_shot(pixels[:0], CLASSES, preprocessed=True)
    with pytest.raises(ValueError, match="that preprocess_volume\\(\\) returns, got a list"):
        model.encode_volume([volume], preprocessed=True)
    # float64 was a RuntimeError from inside the model; NaN pixels were scored as NaN
    torch.testing.assert_close(model.encode_image(pixels.double(), preprocessed=True),
                               model.encode_image(pixels, preprocessed=True))
    broken = pixels.clone()
    broken[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"preprocessed=True: the tensor holds NaN or infinite values "
                                         r"\(item 1\)"):
        model.zero_shot(broken, CLASSES, preprocessed=True)


@pytest.mark.parametrize("call, what", [
    (lambda model: model.encode_image([]), "images"),
    (lambda model: model.zero_shot([], CLASSES), "images"),
    (lambda model: model.preprocess([]), "images"),
    (lambda model: model.encode_volume([]), "volumes"),
    (lambda model: model.zero_shot_volume([], CLASSES), "volumes"),
    (lambda model: model.encode_text([]), "texts"),
])
def test_an_empty_list_is_named_not_an_empty_result_of_another_shape(tiny_run: Path, call, what):
    """Not a (0,) tensor where (N, D) is promised, nor a shape error from inside the model."""
    with pytest.raises(ValueError, match=rf"^no {what} given \(an empty list\)$"):
        call(unimed.load(tiny_run))


@pytest.mark.parametrize("classes, expected", [
    ([], "give at least one class name"),
    (["pneumonia", " "], "class names are non-empty strings, got ' '"),
    (["pneumonia", None], "class names are non-empty strings, got None"),
    (["Edema", "pneumonia", "edema"], "class 'edema' is given twice (as 'Edema' and 'edema'"),
    (None, "give a class name or a list of them, got None"),  # a TypeError from tuple(None)
    ({"edema": 1}, "give a class name or a list of them, got {'edema': 1}"),  # its keys were the classes
])
def test_class_names_that_would_give_no_or_a_doubled_column_are_named(tiny_run: Path, images: Path,
                                                                       classes, expected):
    """Not a result with two columns of one class, nor an error from inside the prompt lookup."""
    model = unimed.load(tiny_run)
    for call in (model.zero_shot, model.zero_shot_volume):
        with pytest.raises(ConfigError, match=re.escape(f"zero-shot: {expected}")):
            call(images / "a.png", classes)


@pytest.mark.parametrize("device, expected", [
    (None, "device 'None' is not a torch device name"),  # a TypeError from torch.device
    ("meta", "device 'meta' holds no data, only shapes (use cpu or cuda)"),  # loaded, then a traceback
])
def test_a_device_the_model_cannot_run_on_is_named_at_load(tiny_run: Path, device, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        unimed.load(tiny_run, device=device)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_a_batch_size_that_is_not_a_whole_number_above_zero_is_named(tiny_run: Path, images: Path,
                                                                       batch_size):
    """batch_size=-1 gave an empty (0,) tensor where (N, D) is promised, 0 and 2.5 errors from
    inside range()."""
    import nibabel as nib

    model = unimed.load(tiny_run)
    volume = images.parent / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), -1000, np.int16), np.eye(4)), str(volume))
    for call in (lambda: model.encode_image(images / "a.png", batch_size=batch_size),
                 lambda: model.zero_shot(images / "a.png", CLASSES, batch_size=batch_size),
                 lambda: model.encode_text(TEXTS, batch_size=batch_size),
                 lambda: model.encode_volume(volume, batch_size=batch_size),
                 lambda: model.zero_shot_volume(volume, CLASSES, batch_size=batch_size)):
        with pytest.raises(ValueError, match=rf"^batch_size is a whole number >= 1, got {batch_size!r}$"):
            call()


def test_unreadable_files_are_skipped_and_listed_when_asked(tiny_run: Path, images: Path, tmp_path: Path,
                                                             capsys):
    """With ``--on-error skip`` a bad file among good ones is left out of the output and listed with
    its reason; the rows of the others are the Python API's, read in worker processes or not; a
    folder of bad files only is one line."""
    model = unimed.load(tiny_run)
    good = [images / "a.png", images / "c.dcm", images / "sub" / "b.jpg"]
    (images / "sub" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    want = model.zero_shot(good, CLASSES, "en")
    scores = tmp_path / "scores.csv"
    for workers in ("0", "2"):
        capsys.readouterr()
        assert main(["classify", str(tiny_run), str(images), "--classes", ",".join(CLASSES), "--out",
                     str(scores), "--on-error", "skip", "--workers", workers, "--quiet"]) == 0
        assert "skipped 1 of 4 image(s) that could not be read" in capsys.readouterr().out
        rows = list(csv.DictReader(scores.open()))
        assert [r["file"] for r in rows] == ["a.png", "c.dcm", "sub/b.jpg"]
        np.testing.assert_allclose([[float(r[f"score({c})"]) for c in CLASSES] for r in rows], want.scores,
                                   atol=1e-5)
        listed = list(csv.DictReader((tmp_path / "scores.skipped.csv").open()))
        assert [(r["file"], r["reason"]) for r in listed] == [("sub/bad.png", "unreadable image")]
        assert listed[0]["error"].startswith("cannot read image")

    embeddings = tmp_path / "e.npy"
    assert main(["embed", str(tiny_run), str(images), "--out", str(embeddings), "--on-error", "skip",
                 "--workers", "1", "--quiet"]) == 0
    np.testing.assert_allclose(np.load(embeddings), model.encode_image(good).numpy(), atol=1e-5)
    names = list(csv.DictReader(embeddings.with_suffix(".csv").open()))
    assert [(int(r["row"]), r["file"]) for r in names] == [(0, "a.png"), (1, "c.dcm"), (2, "sub/b.jpg")]
    assert [r["file"] for r in csv.DictReader((tmp_path / "e.skipped.csv").open())] == ["sub/bad.png"]

    never = tmp_path / "never.csv"
    _fails_in_one_line(capsys, ["classify", str(tiny_run), str(images), "--classes", "pneumonia",
                                "--out", str(never), "--quiet"], "sub/bad.png: cannot read image")
    assert not never.exists()  # no empty output left by the check that the folder is writable
    _fails_in_one_line(capsys, ["embed", str(tiny_run), str(images / "sub" / "bad.png"), "--out",
                                str(embeddings), "--on-error", "skip", "--quiet"],
                       "none of the 1 image(s) could be read (each is listed in")
    _fails_in_one_line(capsys, ["embed", str(tiny_run), str(images), "--out", str(embeddings),
                                "--workers", "-1", "--quiet"], "--workers -1: give 0 or more processes")


@pytest.mark.parametrize("case, expected", [
    ("missing", "image folder or file not found"),
    ("empty", "no images"),
    ("unreadable", "bad.png: cannot read image"),
    ("language", "unknown language 'xx'"),
    ("override", "uses the model's own config"),
    ("device", "device 'cuda:99'"),
    ("device name", "device 'gpu' is not a torch device name"),
    ("device meta", "device 'meta' holds no data, only shapes (use cpu or cuda)"),  # was a traceback
    ("out", "notes.txt is a file, not a folder"),
    ("no model", "no checkpoint at"),
    ("classes", "--classes: class 'pneumonia' is given twice (as 'Pneumonia' and 'pneumonia'"),
])
def test_inference_errors_are_one_line(tiny_run: Path, images: Path, tmp_path: Path, capsys,
                                       case: str, expected: str):
    folder, model, extra, out, classes = images, tiny_run, [], tmp_path / "s.csv", "pneumonia"
    if case == "missing":
        folder = tmp_path / "nowhere"
    elif case == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
        (folder / "readme.txt").write_text("no images here")
    elif case == "unreadable":
        (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif case == "language":
        extra = ["--language", "xx"]
    elif case == "override":
        extra = ["train.lr=1"]
    elif case.startswith("device"):
        extra = ["--device", {"device name": "gpu", "device meta": "meta"}.get(case, "cuda:99")]
    elif case == "out":
        out = images / "notes.txt" / "s.csv"
    elif case == "classes":
        classes = "Pneumonia,effusion,pneumonia"
    else:
        model = tmp_path / "nowhere"
    _fails_in_one_line(capsys, ["classify", str(model), str(folder), "--classes", classes,
                                "--out", str(out), *extra, "--quiet"], expected)


def test_the_mlm_stages_text_encoder_is_named_as_such_where_a_model_is_expected(tiny_run: Path, capsys):
    """`unimed.load` / `unimed evaluate` of the MLM output said "missing or incomplete: no state.pt"
    (of the folder) or, of its checkpoints, that the weights were "trained under other method
    settings"."""
    mlm = tiny_run / "mlm"
    for path in (mlm, mlm / "checkpoints", next((mlm / "checkpoints").glob("step_*"))):
        with pytest.raises(ConfigError, match=rf"^no checkpoint at {re.escape(str(path))}: "
                                              rf"{re.escape(str(mlm))} is a text encoder \(a transformers "):
            unimed.load(path)
    _fails_in_one_line(capsys, ["evaluate", str(mlm), "--quiet"],
                       f"give the run folder ({tiny_run}) or its pretrain/checkpoints")
    latest = tiny_run / "pretrain" / "checkpoints" / "latest"  # the pointer file: its checkpoint
    torch.testing.assert_close(unimed.load(latest).encode_text(TEXTS),
                               unimed.load(tiny_run).encode_text(TEXTS))


def test_every_dataset_missing_under_the_data_root_is_named_at_once(tiny_run: Path, tmp_path: Path, capsys,
                                                                    monkeypatch):
    """Not the first one only, after the workers started: a root holding few of the defaults took
    one run per missing dataset to find them all."""
    root = tmp_path / "mine"
    root.mkdir()
    shutil.copytree(tiny_run.parent.parent / "world" / "cxp500", root / "cxp500")
    _fails_in_one_line(capsys, ["evaluate", str(tiny_run), f"data.root={root}", "--tasks",
                                "zero_shot,linear_probe,modality_gap", "--quiet"],
                       f"7 dataset(s) the tasks read are not under data.root {root}: pdc (zero_shot); "
                       "chexpert (linear_probe); rsna (linear_probe); covidx (linear_probe); mimic-cxr "
                       "(modality_gap); padchest (modality_gap); bimcv-covid19 (modality_gap). Point "
                       "data.root at them, or name other datasets in the tasks' eval.<task> settings")
    monkeypatch.chdir(tmp_path)  # a relative root is named where it was looked for, too
    _fails_in_one_line(capsys, ["evaluate", str(tiny_run), "data.root=mine", "--tasks", "zero_shot",
                                "--quiet"],
                       f"1 dataset(s) the tasks read are not under data.root mine ({root}): pdc (zero_shot)")


def _fails_in_one_line(capsys, args: list[str], expected: str) -> None:
    """The command `args` exits 2 with one `unimed:` line holding `expected`, and no traceback."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("unimed:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err


@pytest.mark.parametrize("command", ["embed", "classify"])
@pytest.mark.parametrize("case, expected", [
    ("missing", "nowhere: volume folder or file not found"),
    ("empty", "empty: empty folder: no volume in it, and not a volume itself"),
    ("not a volume", "a.png: not a volume: expected .nii, .nii.gz, .mhd, .mha or a folder"),
    ("unreadable", "scan/0000.png: cannot read slice image"),
])
def test_volume_inference_errors_are_one_line(tiny_run: Path, images: Path, tmp_path: Path, capsys,
                                              case: str, expected: str, command: str):
    path = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty", "not a volume": images / "a.png",
            "unreadable": tmp_path / "scan"}[case]
    if case in ("empty", "unreadable"):
        path.mkdir()
    if case == "unreadable":
        (path / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    extra = ["--out", str(tmp_path / "v.npy")] if command == "embed" else [
        "--out", str(tmp_path / "v.csv"), "--classes", "pneumonia"]
    _fails_in_one_line(capsys, [command, str(tiny_run), str(path), "--volumes", *extra, "--quiet"], expected)


def test_a_run_evaluated_from_another_folder_reads_and_writes_its_own(tiny_run: Path, tmp_path: Path,
                                                                       monkeypatch):
    """The run was launched from its project folder with relative paths (data root, run folder);
    evaluated from elsewhere it reads that project's data and writes into the run folder itself."""
    metrics = tiny_run / "metrics.json"
    before = metrics.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(tiny_run), "--tasks", "zero_shot", "eval.baselines=[]", "--quiet"]) == 0
    assert not (tmp_path / "runs").exists() and metrics.stat().st_mtime_ns > before
    saved = yaml.safe_load((tiny_run / "eval" / "config.yaml").read_text())
    assert saved["data"]["root"] == str(tiny_run.parents[1] / "world")
    assert json.loads(metrics.read_text())["data_root"] == str(tiny_run.parents[1] / "world")


def test_a_renamed_run_evaluates_into_itself_not_into_its_old_name(tiny_run: Path, images: Path):
    """A copy of the run under another name reads its own MLM output, and its evaluation writes
    into the copy, leaving the folder at the old name (here the original run) untouched."""
    renamed = tiny_run.parent / "tiny_v1"
    shutil.copytree(tiny_run, renamed)
    try:
        (renamed / "mlm" / "config.json").rename(renamed / "mlm" / "config.json.bak")
        with pytest.raises(ConfigError, match=str(renamed / "mlm")):
            unimed.load(renamed)  # its own MLM output, missing, not the original run's
        (renamed / "mlm" / "config.json.bak").rename(renamed / "mlm" / "config.json")
        files = sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg", ".dcm"))
        torch.testing.assert_close(unimed.load(renamed).encode_image(files),
                                   unimed.load(tiny_run).encode_image(files))
        original = (tiny_run / "metrics.json").stat().st_mtime_ns
        (renamed / "metrics.json").unlink()
        assert main(["evaluate", str(renamed), "--tasks", "zero_shot", "eval.baselines=[]", "--quiet"]) == 0
        assert (renamed / "metrics.json").is_file()
        assert (tiny_run / "metrics.json").stat().st_mtime_ns == original
    finally:
        shutil.rmtree(renamed)


def test_evaluating_a_run_again_keeps_its_previous_evaluation(tiny_run: Path):
    """A second evaluation (here of one task, without baselines) does not replace the first in
    place: metrics.json, bootstrap.npz, report.html and eval/ move to previous_evaluations/<its
    creation time>/, and `unimed ablate`'s table is carried into the new metrics.json."""
    run = tiny_run.parent / "tiny_again"
    shutil.copytree(tiny_run, run)
    try:
        first = json.loads((run / "metrics.json").read_text())
        first["ablation"] = {"rows": [], "seeds": [0]}
        (run / "metrics.json").write_text(json.dumps(first))
        kept = {name: (run / name).read_bytes() for name in ("bootstrap.npz", "report.html")}
        assert main(["evaluate", str(run), "--tasks", "zero_shot", "eval.baselines=[]", "--quiet"]) == 0
        history = run / "previous_evaluations" / first["created"].replace(":", "-")
        assert json.loads((history / "metrics.json").read_text()) == first
        assert {name: (history / name).read_bytes() for name in kept} == kept
        assert (history / "eval" / "config.yaml").is_file() and (run / "eval" / "config.yaml").is_file()
        second = json.loads((run / "metrics.json").read_text())
        assert second["ablation"] == first["ablation"] and list(second["encoders"]) == ["medunic"]
        # An evaluation that fails leaves the run's evaluation as it was.
        names = ("metrics.json", "bootstrap.npz", "report.html")
        before = {name: (run / name).read_bytes() for name in names}
        listed = sorted((run / "previous_evaluations").iterdir())
        assert main(["evaluate", str(run), "--tasks", "zero_shot", "eval.zero_shot.datasets=[absent]",
                     "--quiet"]) == 2
        assert {name: (run / name).read_bytes() for name in before} == before
        assert sorted((run / "previous_evaluations").iterdir()) == listed
    finally:
        shutil.rmtree(run)


def test_sigterm_during_an_evaluation_stops_its_workers_and_puts_the_previous_one_back(
        tiny_run: Path, monkeypatch, capsys):
    """SIGTERM (a cluster's time limit, `kill`) ends `unimed evaluate` as Ctrl-C does: its worker
    processes stopped rather than left running, the run's previous evaluation back in place, one
    line and the shell's 143; without it the command died where it stood and its workers ran on."""
    import multiprocessing
    import signal
    import time

    from unimed.eval.tasks import TASKS

    run = tiny_run.parent / "tiny_terminated"
    shutil.copytree(tiny_run, run)
    command = os.getpid()

    def terminated(encoder, ctx):  # in a worker: the signal reaches the command, as `kill` sends it
        os.kill(command, signal.SIGTERM)
        time.sleep(60)

    def busy(encoder, ctx):
        time.sleep(60)

    monkeypatch.setitem(TASKS._items, "zero_shot", terminated)
    monkeypatch.setitem(TASKS._items, "gradcam", busy)
    try:
        names = ("metrics.json", "bootstrap.npz", "report.html")
        before = {name: (run / name).read_bytes() for name in names}
        history = run / "previous_evaluations"
        listed = sorted(history.iterdir()) if history.exists() else None  # earlier tests' evaluations
        children = set(multiprocessing.active_children())
        start = time.monotonic()
        capsys.readouterr()
        assert main(["evaluate", str(run), "--tasks", "zero_shot,gradcam", "eval.baselines=[]",
                     "eval.workers=2", "--quiet"]) == 143
        assert time.monotonic() - start < 30  # the workers' sleeping jobs were not waited for
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == "unimed: terminated: unimed evaluate stopped by SIGTERM"
        assert "Traceback" not in "\n".join(err)
        assert set(multiprocessing.active_children()) == children
        assert {name: (run / name).read_bytes() for name in before} == before
        assert (sorted(history.iterdir()) if history.exists() else None) == listed
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command put it back
    finally:
        shutil.rmtree(run)


def test_a_damaged_export_or_checkpoint_is_refused_not_read_as_nan_weights(tiny_run: Path, images: Path,
                                                                          tmp_path: Path, capsys):
    """An export wrote no checksum, so 64 KB of its weights overwritten with 0xff bytes classified
    an image as "nan,nan,..." with exit 0; a checkpoint whose checksums.json was gone evaluated to
    NaN AUCs with exit 0."""
    out = tmp_path / "exported"
    assert main(["export", str(tiny_run), str(out), "--quiet"]) == 0
    weights = out / "model.safetensors"
    sums = json.loads((out / "checksums.json").read_text())
    assert sums == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    data = bytearray(weights.read_bytes())
    data[-4096:] = b"\xff" * 4096  # the last tensor's values, the header intact: NaN floats
    weights.write_bytes(bytes(data))
    image = str(sorted(p for p in images.rglob("*") if p.suffix in (".png", ".jpg"))[0])
    argv = ["classify", str(out), image, "--out", str(tmp_path / "c.csv"), "--classes", "Edema", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"unimed: checkpoint error: {weights} is truncated or corrupt: its SHA-256 differs "
                   "from the one in checksums.json"]
    (out / "checksums.json").unlink()  # an export written before checksums: the values are read
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(
        rf"unimed: checkpoint error: the weights in {weights} hold NaN or infinite values \(\d+ "
        r"tensor\(s\), e\.g\. [\w.]+\): the file is corrupt, or was saved from a run that diverged",
        err[0]), err
    assert not (tmp_path / "c.csv").exists()


def test_an_export_with_a_bad_preprocess_file_or_without_its_marker_is_named(tiny_run: Path, tmp_path: Path,
                                                                            capsys):
    """preprocess.json's "image_size": "big" was a ValueError traceback from int(); a folder that
    lost unimed_export.json was read as a checkpoint "missing or incomplete: no state.pt"."""
    out = tmp_path / "exported"
    assert main(["export", str(tiny_run), str(out), "--quiet"]) == 0
    preprocess = json.loads((out / "preprocess.json").read_text())
    for value in ("big", 0, 1.5, None, True):
        (out / "preprocess.json").write_text(json.dumps({**preprocess, "image_size": value}))
        with pytest.raises(ConfigError) as err:
            unimed.load(out)
        assert str(err.value) == (f"{out / 'preprocess.json'}: image_size must be a side in pixels (an "
                                  f"integer >= 1), got {value!r}")
    (out / "preprocess.json").write_text(json.dumps(preprocess))
    assert unimed.load(out).image_size == preprocess["image_size"]
    (out / "unimed_export.json").unlink()
    message = (f"{out} holds an exported model's preprocess.json but no unimed_export.json, which says "
               "what the folder is: copy it from the export, or export the run again")
    with pytest.raises(ConfigError) as err:
        unimed.load(out)
    assert str(err.value) == message
    capsys.readouterr()
    assert main(["evaluate", str(out), "--tasks", "zero_shot", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"unimed: config error: {message}"]


def test_export_refuses_a_non_empty_folder(tiny_run: Path, tmp_path: Path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_run), str(tmp_path / "taken"), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("content", ['{"encoders": {', '["x"]'])
def test_export_of_a_run_with_damaged_metrics_writes_its_card_without_them(tiny_run: Path, tmp_path: Path,
                                                                           caplog, content: str):
    """A truncated metrics.json (or one that is not an object) was a traceback from the model card,
    after the weights, config and tokenizer had been written: a half export that a rerun refused."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "metrics.json").write_text(content)
    with caplog.at_level("WARNING"):
        assert main(["export", str(run), str(tmp_path / "out"), "--quiet"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "The run's `metrics.json` could not be read; run `unimed evaluate` on it." in card
    assert f"the model card has no evaluation tables: {run / 'metrics.json'}" in caplog.text
    unimed.load(tmp_path / "out")


def test_an_export_that_fails_midway_leaves_no_partial_folder(tiny_run: Path, tmp_path: Path, monkeypatch,
                                                              capsys):
    """The folder appears whole or not at all: a disk that filled while the tokenizer was written
    left weights and config that a rerun refused as "not empty"."""
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("unimed.pretrained.copy_corpus_stemming", full_disk)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        assert main(["export", str(tiny_run), str(out), "--quiet"]) == 2
        assert "cannot write the export folder" in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no partial folder beside them
    monkeypatch.undo()
    assert main(["export", str(tiny_run), str(tmp_path / "empty"), "--quiet"]) == 0
    unimed.load(tmp_path / "empty")


def test_an_exported_model_evaluates_as_its_run_does(tiny_run: Path, tmp_path: Path, capsys):
    """`unimed evaluate EXPORT`: the run's zero-shot numbers to the digit, from the prompts the
    export ships with, written into the export (not the training machine's run folder), alone (the
    baselines need the run's MLM-only text encoder); run.output_dir / run.name still choose."""
    out = tmp_path / "exported"
    assert main(["export", str(tiny_run), str(out), "--quiet"]) == 0
    run_files = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    assert main(["evaluate", str(out), "--tasks", "zero_shot", "--quiet"]) == 0
    assert f"metrics: {out.resolve() / 'metrics.json'}" in capsys.readouterr().out

    def zero_shot(path: Path) -> dict:
        metrics = json.loads(path.read_text())
        assert list(metrics["encoders"]) == ["medunic"]
        return metrics["encoders"]["medunic"]["tasks"]["zero_shot"]

    assert zero_shot(out / "metrics.json") == zero_shot(tiny_run / "metrics.json")
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")} == run_files  # the run is untouched
    assert unimed.load(out).encode_text(TEXTS).shape[0] == len(TEXTS)  # still a loadable export

    elsewhere = tmp_path / "results"
    assert main(["evaluate", str(out), "--tasks", "zero_shot", f"run.output_dir={elsewhere}", "run.name=ex",
                 "--quiet"]) == 0
    assert zero_shot(elsewhere / "ex" / "metrics.json") == zero_shot(tiny_run / "metrics.json")
    _fails_in_one_line(capsys, ["evaluate", str(out), f"data.root={tmp_path / 'nowhere'}", "--quiet"],
                       f"data.root {tmp_path / 'nowhere'} is not a folder here")

    # An override of how texts are read applies to the export as to its run.
    short = ["--tasks", "zero_shot", "data.max_length=4", f"run.output_dir={elsewhere}", "--quiet"]
    assert main(["evaluate", str(tiny_run), *short, "eval.baselines=[]", "run.name=run4"]) == 0
    assert main(["evaluate", str(out), *short, "run.name=export4"]) == 0
    truncated, whole = zero_shot(elsewhere / "run4" / "metrics.json"), zero_shot(tiny_run / "metrics.json")
    assert zero_shot(elsewhere / "export4" / "metrics.json") == truncated != whole

    # The model's own settings are its own: an override of them was ignored without a word.
    _fails_in_one_line(capsys, ["evaluate", str(out), "method.image.encoder=resnet18",
                                "method.projector.embed_dim=8", "--quiet"],
                       "an exported model is evaluated as it was exported: method.image.encoder=resnet18 "
                       "(the model's: vit_tiny_patch8_64); method.projector.embed_dim=8 (the model's: 32); "
                       "remove the method.* override")


def test_a_run_evaluated_into_another_folder_keeps_its_text_encoder(tiny_run: Path, tmp_path: Path):
    """The tiny run pre-trained on its own MLM output (no method.text.encoder): evaluated with
    run.output_dir / run.name pointing elsewhere, it still reads that encoder (and its baselines
    the MLM-only one), instead of looking for an MLM stage in the new folder."""
    elsewhere = tmp_path / "results"
    assert main(["evaluate", str(tiny_run), "--tasks", "zero_shot", "eval.baselines=[init]",
                 f"run.output_dir={elsewhere}", "run.name=copy", "--quiet"]) == 0
    got = json.loads((elsewhere / "copy" / "metrics.json").read_text())["encoders"]
    want = json.loads((tiny_run / "metrics.json").read_text())["encoders"]
    assert list(got) == ["medunic", "init"]
    assert got["medunic"]["tasks"]["zero_shot"] == want["medunic"]["tasks"]["zero_shot"]


def test_a_checkpoint_before_its_runs_last_step_is_said_so_where_it_is_used(tiny_run: Path, tmp_path: Path,
                                                                            capsys):
    """A run stopped early (its checkpoint records the step its run trains to) is evaluated and
    exported as asked, and each says so: the evaluation's summary, metrics.json, the export's card."""
    import hashlib

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    step = find_checkpoint(run)
    state = torch.load(step / "state.pt", weights_only=True)
    assert state["last_step"] == state["step"] == 2  # the tiny run finished
    state["last_step"] = 12
    torch.save(state, step / "state.pt")
    sums = json.loads((step / "checksums.json").read_text())
    sums["state.pt"] = hashlib.sha256((step / "state.pt").read_bytes()).hexdigest()
    (step / "checksums.json").write_text(json.dumps(sums))

    line = f"checkpoint {step} is step 2 of the 12 its run trains: training stopped early or is still running"
    world = tiny_run.parents[1] / "world"
    assert main(["evaluate", str(run), "--tasks", "zero_shot", "eval.baselines=[]", f"data.root={world}",
                 "--quiet"]) == 0
    assert f"NOTE: {line}" in capsys.readouterr().out
    notes = json.loads((run / "metrics.json").read_text())["unfinished"]
    assert [note.split(" (")[0] for note in notes] == [line]
    assert main(["export", str(run), str(tmp_path / "exported"), "--quiet"]) == 0
    assert "That is step 2 of the 12 its run trains: training did not finish." in (
        tmp_path / "exported" / "README.md").read_text()
    assert main(["export", str(tiny_run), str(tmp_path / "finished"), "--quiet"]) == 0
    assert "did not finish" not in (tmp_path / "finished" / "README.md").read_text()


def test_an_export_whose_run_was_evaluated_on_other_weights_says_so(tiny_run: Path, tmp_path: Path):
    """The card showed the run's tables as the exported model's even where they were measured on
    another checkpoint (the run trained on, or evaluated at an earlier step)."""
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    earlier = "runs/tiny/pretrain/checkpoints/step_00000001"
    metrics["weights"]["medunic"] = {"path": earlier, "sha256": "0" * 64}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["export", str(run), str(tmp_path / "exported"), "--quiet"]) == 0
    card = (tmp_path / "exported" / "README.md").read_text()
    assert (f"**These tables were measured on other weights** (`{earlier}`) than the exported "
            f"checkpoint `{find_checkpoint(run).name}`") in card
    del metrics["weights"]  # an evaluation from before the weights were recorded: a caution
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["export", str(run), str(tmp_path / "older"), "--quiet"]) == 0
    card = (tmp_path / "older" / "README.md").read_text()
    assert ("The run's evaluation does not record which weights it measured (its checkpoint: "
            f"`{metrics['checkpoint']}`)") in card and "other weights" not in card


def test_nothing_touches_the_network(tiny_run: Path, images: Path, tmp_path: Path, monkeypatch):
    attempts: list[object] = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with pytest.raises(OSError, match="network access attempted"):  # the guard itself works
        socket.create_connection(("127.0.0.1", 9))
    attempts.clear()

    out = tmp_path / "exported"
    assert main(["export", str(tiny_run), str(out), "--quiet"]) == 0
    model = unimed.load(out)
    model.zero_shot(images / "a.png", CLASSES, "es")
    model.encode_text(TEXTS)
    assert main(["classify", str(out), str(images), "--classes", "pneumonia",
                 "--out", str(tmp_path / "s.csv"), "--quiet"]) == 0
    assert main(["embed", str(out), str(images), "--out", str(tmp_path / "e.npy"), "--quiet"]) == 0
    assert attempts == []



def test_preset_encoders_read_each_run_with_the_presets_data(tiny_run: Path):
    from unimed.commands.evaluate import preset_encoders

    checkpoint = find_checkpoint(tiny_run)
    run_cfg = load_run_config(checkpoint_config(checkpoint))
    preset = load_run_config(checkpoint_config(checkpoint), ["data.max_length=40", "method.image.encoder=resnet18"])
    trained, random = preset_encoders(preset, [tiny_run], ("random",))
    assert (trained.name, random.name) == (run_cfg.method.name, "random")
    assert trained.max_length == random.max_length == 40 != run_cfg.data.max_length
    assert random.model.cfg.image.encoder == "resnet18" != trained.model.cfg.image.encoder
    own = _run_encoder(tiny_run)
    for (name, mine), theirs in zip(trained.model.state_dict().items(), own.model.state_dict().values()):
        assert torch.equal(mine, theirs), name
    # two runs of one method: each its own name, so neither reads the other's cached features
    first, second, init = preset_encoders(preset, [tiny_run, tiny_run], ("init",))
    name = run_cfg.method.name
    assert (first.name, second.name, init.name) == (f"{name}_1", f"{name}_2", "init")
    assert first.label.endswith(" 1") and second.label.endswith(" 2")


def test_preset_encoders_without_baselines_need_no_mlm_output_of_the_preset(tiny_run: Path):
    """The settings-choice benchmarks with no baselines evaluate trained runs only: the preset's
    own run folder (its MLM output, the baselines' text encoder) need not exist."""
    from unimed.commands.evaluate import preset_encoders

    preset = load_run_config(checkpoint_config(find_checkpoint(tiny_run)),
                         ["run.name=never_trained", "method.text.encoder=null"])
    assert not (preset.run.dir / "mlm").exists()
    (trained,) = preset_encoders(preset, [tiny_run], ())
    assert trained.name == load_run_config(checkpoint_config(find_checkpoint(tiny_run))).method.name
    with pytest.raises(ConfigError, match="no text encoder"):
        preset_encoders(preset, [tiny_run], ("init",))


def _warm_start(tiny_run: Path, out: Path, source: Path, *overrides: str) -> int:
    """`unimed pretrain` of a new run `out/warm` of the tiny preset, with the tiny run's MLM text
    encoder, started from `source` (`train.init_from`) for one step at a learning rate that moves
    no weight measurably."""
    root = tiny_run.parent.parent
    return main(["pretrain", str(root / "tiny.yaml"), f"run.output_dir={out}", "run.name=warm",
                 f"data.root={root / 'world'}", f"method.text.encoder={tiny_run / 'mlm'}",
                 f"train.init_from={source}", "train.lr=1e-30", "train.max_steps=1", *overrides,
                 "--quiet"])


def _assert_started_from(file: Path, expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    """The weights in `file` are `expected` one step (that moved no weight) later: the batch norms'
    running statistics moved by the step's batch, their count of batches on from the source's."""
    got = load_file(file)
    assert expected and all(prefix + name in got for name in expected)
    counts = [name for name in expected if name.endswith("num_batches_tracked")]
    assert counts
    for name, tensor in expected.items():
        if name in counts:
            assert int(got[prefix + name]) > int(tensor) > 0, name
        elif not name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(got[prefix + name], tensor, atol=1e-6, rtol=0, msg=name)


def test_a_warm_started_run_starts_from_the_checkpoints_weights_under_a_fresh_schedule(
        tiny_run: Path, tmp_path: Path):
    from unimed.train.checkpoint import WEIGHTS_FILE, training_progress

    assert _warm_start(tiny_run, tmp_path, tiny_run) == 0
    source = find_checkpoint(tiny_run)
    warm = find_checkpoint(tmp_path / "warm")
    _assert_started_from(warm / WEIGHTS_FILE, load_file(source / WEIGHTS_FILE))
    assert training_progress(warm)[0] == 1 and training_progress(source)[0] > 1
    saved = load_run_config(checkpoint_config(warm))
    assert Path(saved.train.init_from) == tiny_run


def test_a_run_warm_started_from_an_export_loads_its_model_and_resumes_without_it(
        tiny_run: Path, tmp_path: Path, monkeypatch):
    """The export's model, every tensor, the method told so (UniMedI's teacher then starts as the
    student: tests/train/test_methods.py); a resume continues from the run's own checkpoint, so
    the source may have gone meanwhile."""
    from unimed.methods.base import Method
    from unimed.train.checkpoint import WEIGHTS_FILE

    exported = tmp_path / "exported"
    assert main(["export", str(tiny_run), str(exported), "--quiet"]) == 0
    told = []
    monkeypatch.setattr(Method, "start_from_model", lambda self: told.append(type(self).__name__))
    assert _warm_start(tiny_run, tmp_path, exported) == 0
    assert told == ["MedUniCMethod"]
    model = load_file(exported / WEIGHTS_FILE)
    _assert_started_from(find_checkpoint(tmp_path / "warm") / WEIGHTS_FILE, model, prefix="model.")
    exported.rename(tmp_path / "gone")
    assert _warm_start(tiny_run, tmp_path, exported, "train.max_steps=2", "--resume") == 0
    assert find_checkpoint(tmp_path / "warm").name.endswith("2")


def test_a_warm_start_the_run_cannot_take_is_one_line_before_any_step(tiny_run: Path, tmp_path: Path,
                                                                       capsys):
    from unimed.train.checkpoint import checkpoints

    kept = tiny_run / "pretrain" / "tokenizer"
    cases = [
        ([f"method.text.encoder={tiny_run.parent.parent / 'english_bert'}"],
         f"was trained with the tokenizer in {kept}, and this run's"),
        (["method.projector.embed_dim=16"],
         "its weights do not fit this run's model (8 tensors of another shape"),
        ([f"train.init_from={tmp_path / 'nothing'}"],
         f"train.init_from={tmp_path / 'nothing'}: no checkpoint at"),
    ]
    for overrides, expected in cases:
        assert _warm_start(tiny_run, tmp_path, tiny_run, *overrides) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
        assert not checkpoints(tmp_path / "warm" / "pretrain" / "checkpoints")
    prior = yaml.safe_load((tiny_run.parent.parent / "tiny.yaml").read_text())
    prior["method"] = TINY_PRIOR["method"]
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(prior))
    assert main(["pretrain", str(tmp_path / "prior.yaml"), f"run.output_dir={tmp_path}",
                 f"data.root={tiny_run.parent.parent / 'world'}", f"method.text.encoder={tiny_run / 'mlm'}",
                 f"train.init_from={tiny_run}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_run} holds a medunic model and this run trains prior" in err and err.count("\n") == 1, err
    exported = tmp_path / "exported"
    assert main(["export", str(tiny_run), str(exported), "--quiet"]) == 0
    weights = exported / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert _warm_start(tiny_run, tmp_path, exported) == 2
    err = capsys.readouterr().err
    assert f"cannot load weights from {weights}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("workers", [1, 2])
def test_an_evaluation_that_stopped_goes_on_where_it_stopped(tiny_run: Path, workers: int, monkeypatch,
                                                             capsys):
    """A task that fails in the last job (a crash, a preempted job) used to cost the whole
    evaluation; run again, it now takes the finished jobs (their metrics, replicates and figures)
    from evaluation_jobs/ and runs the rest: the same numbers as an evaluation never stopped. A
    store kept under another config is not read; the store goes once the evaluation is written."""
    import time

    from unimed.eval.errors import EvalError
    from unimed.eval.tasks import TASKS

    runs = {name: tiny_run.parent / f"tiny_{name}_{workers}" for name in ("whole", "stopped")}
    for run in runs.values():
        shutil.copytree(tiny_run, run)
    args = ["--tasks", "zero_shot,gradcam,retrieval,bias", "eval.baselines=[random]",
            f"eval.workers={workers}", "--quiet"]
    try:
        assert main(["evaluate", str(runs["whole"]), *args]) == 0
        whole = json.loads((runs["whole"] / "metrics.json").read_text())
        bias, calls = TASKS.get("bias"), []
        store = runs["stopped"] / "evaluation_jobs"

        def kept() -> list[Path]:
            return [p for p in store.iterdir() if not p.name.startswith(".")] if store.exists() else []

        def fails_last(encoder, ctx):  # the random encoder's bias audit, once every other job ended
            if encoder.name != "random":
                return bias(encoder, ctx)
            for _ in range(600):
                if len(kept()) == 5:
                    break
                time.sleep(0.1)
            raise EvalError("the bias audit failed")

        monkeypatch.setitem(TASKS._items, "bias", fails_last)
        assert main(["evaluate", str(runs["stopped"]), *args]) == 2
        assert len(kept()) == 5
        monkeypatch.setitem(TASKS._items, "bias", bias)
        for task in ("zero_shot", "gradcam"):  # finished for both encoders: must not run again
            monkeypatch.setitem(TASKS._items, task, lambda encoder, ctx: calls.append(encoder.name))
        assert main(["evaluate", str(runs["stopped"]), *args]) == 0
        assert calls == [] and not store.exists()
        resumed = json.loads((runs["stopped"] / "metrics.json").read_text())
        for metrics in (whole, resumed):
            for entry in metrics["encoders"].values():
                del entry["seconds"]
        assert resumed["encoders"] == whole["encoders"] and resumed["splits"] == whole["splits"]
        figures = [f for e in whole["encoders"].values() for f in e["tasks"]["gradcam"]["figures"].values()]
        assert figures and all((runs["stopped"] / "eval" / f).is_file() for f in figures)
        saved = dict(np.load(runs["stopped"] / "bootstrap.npz"))
        with np.load(runs["whole"] / "bootstrap.npz") as expected:
            assert sorted(saved) == sorted(expected.files)
            assert all(np.array_equal(saved[k], expected[k], equal_nan=True) for k in expected.files)
    finally:
        for run in runs.values():
            shutil.rmtree(run)
