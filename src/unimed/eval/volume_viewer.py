"""Volume viewer: a few test volumes of each 3D dataset with the finding outlined (a dataset figure).

One PNG per 3D dataset of the run, drawn once per evaluation (it shows the data, not an encoder):
a row per test case, a few axial slices across the finding's slice range and one slice outside it,
HU-windowed, in the radiological view (anterior up, the patient's right on the left). The outline
is the best the dataset allows:

* a nodule with world coordinates (LUNA16's annotation, the phantom's ground truth) is a circle of
  its diameter around its centre, mapped to voxels through the volume's affine (RAS, so LUNA16's
  LPS coordinates are already converted by the adapter);
* a diffuse finding (ground glass, consolidation, effusion, pneumothorax) is the contour of its
  lesion mask, which the deterministic phantom generator draws again from ``manifest-ct.json``
  (passed in as `regenerate` by the command line: the evaluation layer never imports the phantom);
  the regenerated volume must equal the file on disk, else the mask is not trusted;
* BCV organs are the contours of the volume's label map;
* otherwise the finding's slices get a coloured frame and the row says why.

Slices and findings come from the phantom's ``phantom_findings.csv`` where it exists; on real data
only annotated nodules and label maps can be shown.
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse

from unimed.data.adapters import SHARED_FOLDERS, dataset_folder
from unimed.data.adapters.bcv import BCV_ORGANS
from unimed.data.errors import DataError
from unimed.data.records import Record
from unimed.data.volumes import SLICE_WINDOW, Volume, read_volume
from unimed.eval.checks import display_name
from unimed.eval.config import EvalConfig
from unimed.eval.errors import EvalError
from unimed.eval.tasks import TaskContext
from unimed.eval.volumes import FINDING_CLASSES, GROUND_TRUTH_FILE, TruthRow, read_ground_truth

log = logging.getLogger(__name__)

FIGURE_NAME = "volume_viewer_{dataset}.png"
SPLIT = "test"
CASES = 3
SLICES_INSIDE = 4
OUTSIDE_GAP = 2
"""The slice outside a finding lies this many slices beyond its range where the volume allows."""
ORGANS = "organs"
ABDOMEN_WINDOW = (-160.0, 240.0)
"""HU window of the organ rows (soft tissue); chest findings use the eval's lung window."""
OUTLINE_COLOUR = "#ff3b30"
FRAME_COLOUR = "#ff9f0a"
ORGAN_COLOURS = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
                 "#bcf60c", "#f032e6", "#fabebe", "#008080", "#e6beff", "#9a6324")
"""Contour colour of BCV label 1, 2, ... (distinct hues, none grey)."""
VOLUME_DATASETS = {"volume_probe": "probe_datasets", "volume_retrieval": "retrieval_datasets",
                   "slice_localisation": "localisation_datasets", "slice_selection": "selection_datasets"}


@dataclasses.dataclass(frozen=True)
class Finding:
    """A finding of one volume to show. `slices` are RAS z indices (0 the most inferior); empty when
    they come from the volume itself (an organ label map, an annotated nodule on real data). A nodule
    may carry its centre in RAS world mm and its diameter."""

    name: str
    slices: tuple[int, ...] = ()
    centre_mm: tuple[float, float, float] | None = None
    diameter_mm: float | None = None


@dataclasses.dataclass(frozen=True)
class Regenerated:
    """A volume generated again by the program that wrote it: `hu` (X, Y, Z) in the RAS voxel order
    of :func:`read_volume`, `affine` voxel -> RAS mm, and (X, Y, Z) lesion masks by finding name."""

    hu: np.ndarray
    affine: np.ndarray
    masks: dict[str, np.ndarray]


Regenerate = Callable[[Path, str], Regenerated | None]
"""(dataset folder, volume path under it) -> the volume generated again, None when it is not one
the generator wrote; a FileNotFoundError or ValueError when its settings cannot be read."""


@dataclasses.dataclass(frozen=True)
class Circle:
    """A nodule's outline on a volume's voxel grid: continuous centre (i, j, k) and the semi-axes
    along i and j in voxels (a circle in mm, an ellipse where the pixels are not square)."""

    centre: tuple[float, float, float]
    radii: tuple[float, float]


@dataclasses.dataclass
class Panel:
    """One slice of a row: its index, the windowed image (X, Y) in [0, 1], whether it holds the
    finding, and the (X, Y) mask or label map to contour on it (None: nothing to contour)."""

    index: int
    image: np.ndarray
    inside: bool
    contour: np.ndarray | None = None


@dataclasses.dataclass
class CaseRow:
    """One case of the figure: the volume's path under the dataset folder, what its panel titles
    say, its panels, and how the finding is outlined ("circle", "mask", "labels" or "frame",
    explained by `note`)."""

    dataset: str
    key: str
    case: str
    finding: str
    panels: list[Panel]
    outline: str
    note: str
    aspect: float = 1.0
    circle: Circle | None = None
    organs: tuple[int, ...] = ()


def volume_datasets(cfg: EvalConfig, tasks: Sequence[str]) -> list[str]:
    """The 3D datasets the run's volume tasks read, in config order, each once; a dataset read from
    another's folder (LUNA16's candidates) as that dataset, whose volumes it crops."""
    return list(dict.fromkeys(SHARED_FOLDERS.get(name, name) for task in tasks if task in VOLUME_DATASETS
                              for name in getattr(cfg.volume, VOLUME_DATASETS[task])))


def nodule_circle(volume: Volume, centre_mm: Sequence[float], diameter_mm: float) -> Circle:
    """The circle of a nodule given in RAS world mm, on the volume's voxel grid."""
    i, j, k = volume.world_to_voxel(centre_mm)
    sx, sy, _ = volume.spacing
    return Circle((float(i), float(j), float(k)), (diameter_mm / 2 / sx, diameter_mm / 2 / sy))


def sphere_slices(volume: Volume, centre_mm: Sequence[float], diameter_mm: float) -> tuple[int, ...]:
    """The axial slices whose slab a sphere cuts (an annotated nodule without slice ground truth)."""
    k = volume.world_to_voxel(centre_mm)[2]
    reach = diameter_mm / 2 / volume.spacing[2] + 0.5
    return tuple(z for z in range(volume.array.shape[2]) if abs(z - k) < reach)


def pick_slices(held: Sequence[int], depth: int, inside: int = SLICES_INSIDE
                ) -> tuple[list[int], int | None]:
    """Up to `inside` slices spread evenly over the finding's slices, and one slice outside their
    range (`OUTSIDE_GAP` beyond it where the volume allows; None when the finding spans it)."""
    held = sorted(set(held))
    chosen = sorted({held[round(p)] for p in np.linspace(0, len(held) - 1, min(inside, len(held)))})
    lo, hi = held[0], held[-1]
    outside = [k for k in range(depth) if k < lo or k > hi]
    if not outside:
        return chosen, None
    return chosen, min(outside, key=lambda k: (abs(max(lo - k, k - hi) - OUTSIDE_GAP), k))


def pick_cases(cases: Sequence[tuple[Record, list[Finding]]], count: int = CASES
               ) -> list[tuple[Record, Finding]]:
    """Up to `count` (volume, finding) pairs, each volume once, cycling through the finding kinds
    (the most frequent first) so the figure shows as many kinds as it can; volumes in record order."""
    kinds = Counter(finding.name for _, findings in cases for finding in findings)
    order = sorted(kinds, key=lambda name: (-kinds[name], name))
    picked: list[tuple[Record, Finding]] = []
    used: set[int] = set()
    while len(picked) < count:
        before = len(picked)
        for kind in order[:count - len(picked)]:
            hit = next(((i, f) for i, (_, findings) in enumerate(cases) if i not in used
                        for f in findings if f.name == kind), None)
            if hit is not None:
                used.add(hit[0])
                picked.append((cases[hit[0]][0], hit[1]))
        if len(picked) == before:
            break
    return picked


def record_findings(record: Record, truth: Sequence[TruthRow]) -> list[Finding]:
    """What can be shown of one volume: its ground-truth findings (a nodule's centre taken from the
    record's own annotation where it has one, e.g. LUNA16's), else its annotated nodules; plus its
    organs when it has a label map."""
    findings = []
    for row in truth:
        if row.finding not in FINDING_CLASSES or not row.slices:
            continue
        centre, diameter = row.centre_mm, row.diameter_mm
        if row.finding == "nodule" and record.points:
            point = min(record.points, key=lambda p: 0.0 if centre is None
                        else float(np.linalg.norm(np.subtract((p.x, p.y, p.z), centre))))
            centre, diameter = (point.x, point.y, point.z), point.diameter_mm
        findings.append(Finding(row.finding, row.slices, centre, diameter))
    if not truth:
        findings += [Finding("nodule", (), (p.x, p.y, p.z), p.diameter_mm) for p in record.points]
    if record.mask_path is not None:
        findings.append(Finding(ORGANS))
    return findings


def case_name(record: Record) -> str:
    """The record's patient / study ids, long ids (series UIDs) cut to their last 8 characters."""
    ids = [record.study_id] if record.patient_id == record.study_id else [record.patient_id,
                                                                          record.study_id]
    return "/".join(i if len(i) <= 14 else "…" + i[-8:] for i in ids)


def same_volume(hu: np.ndarray, volume: Volume) -> bool:
    """Whether regenerated (X, Y, Z) HU are the file on disk, compared as stored: exact HU, or the
    8-bit grey values of a folder of slice images (CC-CCII)."""
    hu = hu.astype(np.float32)
    if hu.shape != volume.array.shape:
        return False
    if not volume.path.is_dir():
        return bool(np.array_equal(hu, volume.array))
    low, high = SLICE_WINDOW

    def grey(array: np.ndarray) -> np.ndarray:
        return np.rint(np.clip((array - low) / (high - low) * 255.0, 0, 255))

    return bool(np.array_equal(grey(hu), grey(volume.array)))


def trusted_regeneration(regenerate: Regenerate | None, folder: Path, key: str, volume: Volume
                         ) -> tuple[Regenerated | None, str]:
    """The volume generated again, and "" when it equals the file; else None and why not."""
    if regenerate is None:
        return None, "no generator to draw the lesion mask again"
    try:
        again = regenerate(folder, key)
    except (FileNotFoundError, ValueError) as err:
        return None, str(err).splitlines()[0]
    if again is None:
        return None, f"{key} is not a volume the phantom wrote"
    if not same_volume(again.hu, volume):
        return None, "the regenerated phantom volume differs from the file"
    return again, ""


def _window(volume: Volume, k: int, window: tuple[float, float]) -> np.ndarray:
    """Axial slice `k` (X, Y) mapped from the HU `window` to [0, 1]."""
    low, high = window
    return np.clip((volume.array[:, :, k] - low) / (high - low), 0.0, 1.0)


def _panels(volume: Volume, held: Sequence[int], window: tuple[float, float],
            contour: np.ndarray | None) -> list[Panel]:
    """The chosen slices inside the finding's range, then the one outside it."""
    inside, outside = pick_slices(held, volume.array.shape[2])
    chosen = [(k, True) for k in inside] + ([(outside, False)] if outside is not None else [])
    return [Panel(k, _window(volume, k, window), flag,
                  None if contour is None else contour[:, :, k]) for k, flag in chosen]


def case_row(dataset: str, folder: Path, record: Record, finding: Finding,
             window: tuple[float, float], regenerate: Regenerate | None = None) -> CaseRow:
    """One figure row: the volume read, the slices chosen, the finding's outline worked out."""
    volume = read_volume(record.image_path)
    sx, sy, _ = volume.spacing
    key = Path(record.image_path).relative_to(folder).as_posix()
    row = CaseRow(dataset, key, case_name(record), finding.name, [], "frame", "", aspect=sy / sx)
    if finding.name == ORGANS:
        labels = read_volume(record.mask_path, labels=True).array.astype(np.int16)
        if labels.shape != volume.array.shape:
            raise DataError(f"label map is {labels.shape}, its volume {volume.array.shape}",
                            record.mask_path)
        held = [int(k) for k in np.flatnonzero(labels.any(axis=(0, 1)))]
        row.panels = _panels(volume, held, ABDOMEN_WINDOW, labels)
        row.outline, row.note = "labels", "contours: organ label map (abdomen window)"
        row.organs = tuple(int(v) for v in np.unique(labels) if v > 0)
        return row
    located = None if Path(record.image_path).is_dir() else volume  # slice images: no world frame
    again, why = None, ""
    if finding.centre_mm is None or located is None:
        again, why = trusted_regeneration(regenerate, folder, key, volume)
        if again is not None and located is None:
            located = Volume(volume.array, again.affine, volume.path)
    if finding.centre_mm is not None and finding.diameter_mm and located is not None:
        held = finding.slices or sphere_slices(located, finding.centre_mm, finding.diameter_mm)
        row.panels = _panels(volume, held, window, None)
        row.circle = nodule_circle(located, finding.centre_mm, finding.diameter_mm)
        row.outline = "circle"
        row.note = f"circle: {finding.diameter_mm:g} mm nodule, world centre mapped to voxels"
        return row
    mask = again.masks.get(finding.name) if again is not None else None
    if mask is not None:
        row.panels = _panels(volume, finding.slices, window, mask)
        row.outline = "mask"
        row.note = "contour: lesion mask of the regenerated phantom (equal to the file)"
        return row
    row.panels = _panels(volume, finding.slices, window, None)
    row.note = f"frame: the finding's slices ({why or 'no lesion mask'})"
    return row


def _finding_label(name: str) -> str:
    return "organs" if name == ORGANS else FINDING_CLASSES.get(name, name)


def _organ_colour(value: int) -> str:
    return ORGAN_COLOURS[(value - 1) % len(ORGAN_COLOURS)]


def _draw_panel(ax: Axes, row: CaseRow, panel: Panel) -> None:
    """One slice with its title and, on the slices that hold the finding, its outline."""
    ax.imshow(panel.image.T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", aspect=row.aspect,
              interpolation="nearest")
    ax.invert_xaxis()  # the patient's right on the viewer's left
    where = "" if panel.inside else " (outside)"
    ax.set_title(f"{display_name(row.dataset)} · slice {panel.index}{where}\n{row.case}\n"
                 f"{_finding_label(row.finding)}", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    if panel.inside and row.outline == "circle" and row.circle is not None:
        (i, j, _), (ri, rj) = row.circle.centre, row.circle.radii
        ax.add_patch(Ellipse((i, j), 2 * ri, 2 * rj, fill=False, edgecolor=OUTLINE_COLOUR,
                             linewidth=1.2))
    elif panel.contour is not None and row.outline == "mask" and panel.contour.any():
        ax.contour(panel.contour.T.astype(np.float32), levels=[0.5], colors=OUTLINE_COLOUR,
                   linewidths=1.0)
    elif panel.contour is not None and row.outline == "labels":
        for value in row.organs:
            if (panel.contour == value).any():
                ax.contour((panel.contour == value).T.astype(np.float32), levels=[0.5],
                           linewidths=0.8, colors=_organ_colour(value))
    elif panel.inside and row.outline == "frame":
        for spine in ax.spines.values():
            spine.set_edgecolor(FRAME_COLOUR)
            spine.set_linewidth(2.5)


def plot_viewer(rows: Sequence[CaseRow], path: Path) -> None:
    """The rows as a grid of axial slices, each row's outline explained on its left."""
    columns = max(len(row.panels) for row in rows)
    fig = Figure(figsize=(2.3 * columns, 2.6 * len(rows)))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for row, ax_row in zip(rows, axes):
        for ax, panel in zip(ax_row, row.panels):
            _draw_panel(ax, row, panel)
        for ax in ax_row[len(row.panels):]:
            ax.set_axis_off()
        ax_row[0].set_ylabel(textwrap.fill(row.note, 34), fontsize=6)
    organs = sorted({value for row in rows for value in row.organs})
    if organs:
        handles = [Line2D([], [], color=_organ_colour(v),
                          label=BCV_ORGANS.get(v, str(v)).replace("_", " ")) for v in organs]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7,
                   frameon=False)
    fig.tight_layout(rect=(0.0, 0.05 if organs else 0.0, 1.0, 1.0))
    fig.savefig(path, dpi=90)


def dataset_cases(ctx: TaskContext, dataset: str, folder: Path) -> list[tuple[Record, Finding]]:
    """The test cases the dataset's figure shows (none: nothing to show)."""
    truth_path = folder / GROUND_TRUTH_FILE
    truth: dict[str, list[TruthRow]] = {}
    for row in read_ground_truth(truth_path) if truth_path.is_file() else []:
        truth.setdefault(row.key, []).append(row)
    records = ctx.data.require(dataset, SPLIT)
    cases = [(r, record_findings(r, truth.get(Path(r.image_path).relative_to(folder).as_posix(), [])))
             for r in records]
    return pick_cases([(record, findings) for record, findings in cases if findings])


def write_viewer(ctx: TaskContext, dataset: str, regenerate: Regenerate | None = None
                 ) -> tuple[str | None, list[dict[str, Any]], str]:
    """(figure file relative to ``ctx.out_dir``, the cases shown, "") for one dataset, or (None, [],
    why there is no figure)."""
    folder = dataset_folder(dataset, ctx.data.cfg.root)
    if not folder.is_dir():
        return None, [], f"no folder {folder}"
    picked = dataset_cases(ctx, dataset, folder)
    if not picked:
        return None, [], "no test volume with a finding, an annotated nodule or a label map"
    rows = [case_row(dataset, folder, record, finding, ctx.cfg.volume.window, regenerate)
            for record, finding in picked]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.out_dir / FIGURE_NAME.format(dataset=dataset)
    plot_viewer(rows, path)
    cases = [{"volume": row.key, "finding": row.finding,
              "slices": [p.index for p in row.panels if p.inside],
              "outside": next((p.index for p in row.panels if not p.inside), None),
              "outline": row.outline, "note": row.note} for row in rows]
    return str(path.relative_to(ctx.out_dir)), cases, ""


def write_volume_viewers(ctx: TaskContext, datasets: Sequence[str],
                         regenerate: Regenerate | None = None) -> dict[str, Any]:
    """{"figures": {dataset: file}, "cases": {dataset: [...]}, "skipped": {dataset: why}}: the viewer
    figure of every dataset that has something to show, lesion masks drawn again by `regenerate`.
    A dataset that is absent, has nothing to show or fails to read is skipped with one line saying
    why (a figure never stops the run)."""
    out: dict[str, Any] = {"figures": {}, "cases": {}, "skipped": {}}
    for dataset in datasets:
        try:
            name, cases, why = write_viewer(ctx, dataset, regenerate)
        except (DataError, EvalError) as err:
            out["skipped"][dataset] = str(err)
            log.warning("volume viewer: no figure for %s: %s", dataset, err)
            continue
        if name is None:
            out["skipped"][dataset] = why
            log.info("volume viewer: no figure for %s: %s", dataset, why)
        else:
            out["figures"][dataset], out["cases"][dataset] = name, cases
    return out
