"""relaylearn/data/synth_ct.py: the NIfTI affine describes the arrays as written (the spine lies
posterior, the slices run head to feet), and the study count has an upper bound."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from relaylearn.data.synth_ct import write_synthetic_ct
from relaylearn.errors import DataError


def test_the_affine_puts_the_spine_behind_the_body_centre(tmp_path):
    write_synthetic_ct(tmp_path, size=32, seed=1, studies={"CT1": 2})
    image = nib.load(str(tmp_path / "CT1" / "image" / "ct1_000.nii.gz"))
    assert nib.aff2axcodes(image.affine) == ("P", "L", "I")  # rows front to back, slices head to feet
    hu = np.asanyarray(image.dataobj)
    bone = np.argwhere(hu > 400).mean(axis=0)  # the vertebra (700 HU)
    body = np.argwhere(hu > -500).mean(axis=0)
    to_world = lambda ijk: image.affine[:3, :3] @ ijk + image.affine[:3, 3]  # noqa: E731
    assert to_world(bone)[1] < to_world(body)[1] - 2  # RAS y: the spine is posterior
    assert np.allclose(np.abs(image.affine[:3, :3]).sum(axis=0), (10.0, 10.0, 2.5))  # spacing unchanged


def test_the_study_count_has_an_upper_bound(tmp_path, monkeypatch):
    """All studies' random streams are drawn up front (seconds and tens of MB per 100 000)."""
    import relaylearn.data.synth_ct as synth_ct

    monkeypatch.setattr(synth_ct, "_render_study", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rendered")))
    with pytest.raises(DataError, match=f"at most {synth_ct.MAX_STUDIES_PER_SITE} studies, got 10001"):
        write_synthetic_ct(tmp_path, size=16, studies={"CT1": 10_001})
    assert not any(tmp_path.iterdir())
