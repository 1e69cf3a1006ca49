"""``-g``: GPU ids or ``cpu``; bad specs are one-line UserErrors."""

from __future__ import annotations

import pytest
import torch

from relaylearn.config import LightningConfig
from relaylearn.devices import inference_device, parse_devices
from relaylearn.errors import UserError


def test_cpu_and_bad_specs():
    assert parse_devices("cpu") == ("cpu", 1)
    assert parse_devices("=cpu", LightningConfig(devices=2)) == ("cpu", 2)
    assert inference_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="expected GPU ids"):
        parse_devices("x")
    with pytest.raises(UserError, match="no GPU id"):
        parse_devices(",")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            parse_devices("0")
        assert inference_device(None) == torch.device("cpu")
