"""``relaylearn export``: the segmentation solver of a bundle as ONNX or TorchScript.

Only the solver is exported (never the replay generators or discriminators), in eval mode:
input ``images`` float32 [N, C, H, W] in ``out_range`` at the training ``img_size`` (N is dynamic),
output ``logits`` float32 [N, num_classes, H, W]. The arg-max over dimension 1 is the class map.

What a consumer needs to feed the model — ``img_size``, ``out_range``, channels, class names, the
SHA-256 of the bundle it came from — is stored inside the file (ONNX ``metadata_props``, key
``relaylearn``; TorchScript extra file ``relaylearn.json``) and in a sidecar ``<out>.json``.

ONNX uses the TorchScript-based exporter (``dynamo=False``): the torch.export-based one needs
``onnxscript``, which relaylearn does not depend on. Files appear atomically, the model and its
sidecar as a pair; an existing ``--out`` or sidecar is refused unless ``overwrite`` is set. A
bundle whose ``img_size`` would not fit in this machine's memory for tracing is refused first
(exit code 3, :mod:`relaylearn.memory`).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from relaylearn import __version__
from relaylearn.assembly import LoadedModel, load_model
from relaylearn.errors import UserError
from relaylearn.files import atomic_write_all, check_output_file
from relaylearn.memory import out_of_memory_as_error, require_memory

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17
METADATA_KEY = "relaylearn"
TORCHSCRIPT_EXTRA_FILE = "relaylearn.json"
EXAMPLE_BATCH = 2  # images in the example input the solver is traced with (on the CPU)


def preprocessing(model: LoadedModel) -> str:
    """How training turned a file into the model's input, in words (as ``predict`` does it)."""
    resize = "bilinear antialiased resize to img_size, scaled to range"
    if model.hu is not None:
        hu_min, low, high = model.hu
        return (
            f"CT: Hounsfield units clipped to the window [{low:g}, {high:g}] and mapped to 0..1 (16-bit PNG slices hold HU - hu_min, "
            f"hu_min {hu_min:g} at the training site; volumes are cut into slices along their last axis), {resize}"
        )
    if model.layout.name == "nifti":
        return f"each volume scaled to 0..1 by its 0.5 and 99.5 percentiles (clipped) and cut into slices along its last axis, {resize}"
    return f"RGB or grey: 8-bit / 255, 16-bit grey / 65535, {resize}"


def export_metadata(model: LoadedModel, fmt: str) -> dict:
    """What a consumer needs to use the exported solver."""
    return {
        "producer": f"relaylearn {__version__}",
        "format": fmt,
        "input": {"name": "images", "dtype": "float32", "shape": ["N", model.channels, *model.img_size], "range": list(model.out_range),
                  "preprocessing": preprocessing(model)},
        "hu_window": None if model.hu is None else list(model.hu[1:]),
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", model.num_classes, *model.img_size]},
        "img_size": list(model.img_size),
        "out_range": list(model.out_range),
        "channels": model.channels,
        "num_classes": model.num_classes,
        "class_names": list(model.class_names),
        "mask_encoding": model.layout.mask_encoding(model.num_classes),
        "strategy": model.strategy,
        "bundle_sha256": model.bundle_sha256,
        "bundle_verified": model.verified,
        "bundle_signed_by": model.signed_by,
    }  # fmt: skip


def _example_input(model: LoadedModel, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    low, high = model.out_range
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, model.channels, *model.img_size, generator=g) * (high - low) + low


def _cpu_eval_copy(solver: nn.Module) -> nn.Module:
    return copy.deepcopy(solver).to("cpu").float().eval()


def onnx_bytes(model: LoadedModel) -> bytes:
    """The solver as an ONNX model (opset 17, dynamic batch) with metadata_props."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the 'onnx' package (pip install 'relaylearn[export]')") from None
    solver = _cpu_eval_copy(model.solver)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice and tracer warnings
        torch.onnx.export(
            solver,
            (_example_input(model),),
            buf,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    meta = export_metadata(model, "onnx")
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    for key in ("img_size", "out_range", "class_names", "bundle_sha256"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(meta[key])
    proto.producer_name, proto.producer_version = "relaylearn", __version__
    proto.doc_string = "relaylearn segmentation solver: images [N,C,H,W] -> logits [N,K,H,W]"
    return proto.SerializeToString()


def torchscript_bytes(model: LoadedModel) -> bytes:
    """The solver traced to TorchScript, with ``relaylearn.json`` as an extra file."""
    solver = _cpu_eval_copy(model.solver)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks in forward
        traced = torch.jit.trace(solver, (_example_input(model),), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf, _extra_files={TORCHSCRIPT_EXTRA_FILE: json.dumps(export_metadata(model, "torchscript"), sort_keys=True)})
    return buf.getvalue()


EXISTS_ERROR = "already exists; export never replaces a file unless asked: choose another --out, or pass --overwrite"


def check_export_out(out: Path, overwrite: bool = False) -> None:
    """``out`` and its sidecar ``<out>.json`` can be written: no folder there, a writable folder, and
    (unless ``overwrite``) no file yet. UserError naming the path otherwise (checked before the model is read)."""
    for path, option in ((out, "--out"), (sidecar_path(out), "the sidecar <out>.json")):
        check_output_file(path, None if overwrite else EXISTS_ERROR, option)


def sidecar_path(out: Path) -> Path:
    """The metadata file beside an exported model: ``<out>.json``."""
    return out.with_name(out.name + ".json")


def export_model(model: LoadedModel, fmt: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model``'s solver to ``out`` in ``fmt`` plus the sidecar ``<out>.json``: both new files
    (or, with ``overwrite``, replacing earlier ones), written as a pair or not at all."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    check_export_out(out, overwrite)
    with out_of_memory_as_error("tracing the model for export", model.img_size, EXAMPLE_BATCH):
        data = onnx_bytes(model) if fmt == "onnx" else torchscript_bytes(model)
    sidecar = (json.dumps(export_metadata(model, fmt), indent=2) + "\n").encode()
    atomic_write_all([(out, data), (sidecar_path(out), sidecar)], exists_error=None if overwrite else EXISTS_ERROR)
    return out


def run_export(
    bundle: str | Path,
    fmt: str,
    out: str | Path,
    trust: str | None = None,
    *,
    no_verify: bool = False,
    plugins: set[str] | tuple[str, ...] = (),
    overwrite: bool = False,
) -> Path:
    """``relaylearn export``: read and verify ``bundle`` (with ``trust``; else only with
    ``no_verify``, recorded as ``bundle_verified: false``); write its solver."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if Path(out).resolve() == Path(bundle).resolve():
        raise UserError("--out is the bundle itself; export to a new file name", out)
    check_export_out(Path(out), overwrite)
    model = load_model(bundle, trust, no_verify=no_verify, plugins=plugins)
    require_memory(model.img_size, EXAMPLE_BATCH, "cpu", bundle=bundle)  # the bundle's size: exit 3 before tracing
    return export_model(model, fmt, out, overwrite=overwrite)
