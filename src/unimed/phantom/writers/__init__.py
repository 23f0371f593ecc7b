"""Layout writers: one per dataset, each putting phantom studies on disk in the real dataset's layout.

See docs/LAYOUTS.md for the layouts (the contract shared with the adapters in `unimed.data.adapters`).
"""

from __future__ import annotations

from unimed.phantom.writers.base import LayoutWriter, ManifestEntry, Row, StudyResult
from unimed.phantom.writers.chexpert import ChexpertWriter, Cxp500Writer
from unimed.phantom.writers.covidx import CovidxWriter
from unimed.phantom.writers.mimic import MimicWriter
from unimed.phantom.writers.object_cxr import ObjectCxrWriter
from unimed.phantom.writers.padchest import PadchestWriter, PdcWriter
from unimed.phantom.writers.rsna import RsnaWriter
from unimed.phantom.writers.siim import SiimWriter
from unimed.registry import Registry

WRITERS: Registry[type[LayoutWriter]] = Registry("layout writer")
"""Writer classes by folder name under the phantom root."""

LAYOUTS: tuple[type[LayoutWriter], ...] = (
    MimicWriter,
    PadchestWriter,
    ChexpertWriter,
    Cxp500Writer,
    RsnaWriter,
    SiimWriter,
    CovidxWriter,
    ObjectCxrWriter,
    PdcWriter,
)
"""Every layout, in the order the world writes them."""

for _writer in LAYOUTS:
    WRITERS.register(_writer.folder)(_writer)

__all__ = ["LAYOUTS", "WRITERS", "LayoutWriter", "ManifestEntry", "Row", "StudyResult"]
