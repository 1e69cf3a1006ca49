"""Site datasets (DoFE fundus, generic folder, NIfTI, CT studies), the synthetic benchmarks and augmentation.

Names are imported lazily, so ``relaylearn data synth`` does not pay for importing torch / kornia.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SiteData": "relaylearn.data.layouts",
    "load_site": "relaylearn.data.layouts",
    "write_synthetic_benchmark": "relaylearn.data.synth",
    "preview_grid": "relaylearn.data.synth",
    "SegmentationAugment": "relaylearn.data.augment",
    "load_ct_site": "relaylearn.data.ct",
    "write_synthetic_ct": "relaylearn.data.synth_ct",
    "validation_split": "relaylearn.data.split",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from relaylearn.data.augment import SegmentationAugment
    from relaylearn.data.ct import load_ct_site
    from relaylearn.data.layouts import SiteData, load_site
    from relaylearn.data.split import validation_split
    from relaylearn.data.synth import preview_grid, write_synthetic_benchmark
    from relaylearn.data.synth_ct import write_synthetic_ct


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'relaylearn.data' has no attribute '{name}'")
