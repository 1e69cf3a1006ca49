"""Config files: YAML loading, ``--set`` overrides, merging and validation (docs/design.md#config-files).

The original's format is kept: ``common`` (everything shared), ``all_tasks_datasets`` (one partial
dataset block per site, merged over ``common.dataset``), ``current_tasks.task_ids`` (training
order) and ``current_tasks.task_confs[id]`` (per-site overrides, merged over ``common``).
Unknown keys and wrong types are errors naming the file and the key.
"""

from __future__ import annotations

import copy
import difflib
import platform
import re
import types
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from relaylearn.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


#: seeds stay in numpy's range (0 .. 2^32-1) after a site adds its task id
MAX_SEED = 2**31 - 1
MAX_TASK_ID = 1_000_000
#: an epoch draws num_items × num_replica indices
MAX_NUM_REPLICA = 10_000
#: generated pairs of one privacy audit (held in memory with their distances to every real image)
MAX_AUDIT_PAIRS = 100_000

#: one Adam β: 0 ≤ β < 1
AdamBeta = Annotated[float, Field(ge=0, lt=1)]

#: validation context of a config whose site data is not read as it stands (``common`` before each
#: site's keys are merged over it, a bundle's shipped config): checks of options against the layout's data are skipped
PARTIAL = {"partial": True}


def _bare(annotation: Any) -> Any:
    """``annotation`` without ``Annotated[...]``'s bounds."""
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is (or holds, in a list or tuple) a boolean where ``annotation`` wants an
    int or float and takes no boolean: pydantic's lax mode would read ``true`` as 1."""
    annotation = _bare(annotation)
    members = [_bare(m) for m in get_args(annotation)] if get_origin(annotation) in (Union, types.UnionType) else [annotation]
    if isinstance(value, bool):
        return any(m in (int, float) for m in members) and not any(m in (bool, Any) or get_origin(m) is Literal for m in members)
    if isinstance(value, (list, tuple)):
        for member in members:
            origin, args = get_origin(member), get_args(member)
            if origin is list or (origin is tuple and args[-1:] == (Ellipsis,)):
                args = (args[0],) * len(value)
            elif origin is not tuple:
                continue
            if any(_bool_for_number(arg, item) for arg, item in zip(args, value)):
                return True
    return False


class Strict(BaseModel):
    """Unknown keys, non-finite numbers (``.inf``, ``.nan``) and booleans given for numbers are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if _bool_for_number(cls.model_fields[info.field_name].annotation, value):
            raise ValueError("Input should be a number, not a boolean")
        return value


# ----- schema ---------------------------------------------------------------------------------
#: the largest training resolution a config (or a bundle's recipe) may ask for, per side
MAX_IMAGE_SIDE = 4096


class DatasetKwargs(Strict):
    """One site's data. ``root_path``/``img_folder`` locate it; the rest is preprocessing."""

    root_path: Union[str, dict[str, str]] = Field("data/synth", description="Dataset root; may be a dict keyed by OS name (Linux/Windows/Darwin).")
    img_folder: Union[str, list[str], None] = Field(
        None,
        description="Site folder(s) under root_path; a list merges several folders into one site (an image, volume or study whose name occurs in more than one is named <folder>/<name>, all its slices alike).",
    )
    task_id: Optional[int] = Field(None, ge=0, le=MAX_TASK_ID, description="Integer id of the site (1-based, defines the relay order in the original).")
    task_name: Optional[str] = Field(
        None, description="Unique site name (pseudonymous name in bundles, conditioning key for the replay GAN); no '+' (it joins pooled sites, A+B)."
    )
    use_roi: bool = Field(True, description="DoFE layout: read images from the ROIs/ sub-folder.")
    img_size: tuple[int, int] = Field((64, 64), description="Training resolution (H, W) in pixels.")
    out_range: tuple[float, float] = Field((-1.0, 1.0), description="Intensity range images are scaled to.")
    num_classes: int = Field(3, ge=2, le=256, description="Number of label classes including background.")
    channels: int = Field(3, ge=1, le=64, description="Image channels (3 for RGB fundus).")
    num_replica: int = Field(1, ge=1, le=MAX_NUM_REPLICA, description=f"Each epoch visits every training image this many times (at most {MAX_NUM_REPLICA}).")
    augment: Union[str, dict[str, Any], None] = Field(
        None,
        description=(
            "Augmentation of REAL training images: none | light | original (the original never augments real data), or a mapping "
            "{strength, block_p, params, image_fill}; image_fill fills what a geometric transform moves into the frame: "
            "min (out_range minimum, mask class 0; default) | border | reflection (image and mask padded alike)."
        ),
    )
    # CT layouts (ct_nifti, ct_slices): one folder per site, split study-wise inside it
    train_ratio: float = Field(
        0.8, gt=0, lt=1, description="CT layouts: share of a site's studies used for training (study-wise split, fixed seed); the rest are tested."
    )
    split_seed: int = Field(1234, description="CT layouts: seed of the study shuffle before the train/test split.")
    hu_window: tuple[float, float] = Field((-160.0, 240.0), description="CT layouts: Hounsfield window mapped to out_range (values outside are clipped).")
    hu_min: float = Field(-160.0, description="ct_slices: 16-bit PNG slices store HU − hu_min (pixel 0 = hu_min HU).")
    neg_pos_ratio: Optional[int] = Field(
        None, ge=1, description="CT layouts, training only: k negative slices (no foreground) per positive slice, re-drawn every epoch."
    )
    drop_negative: bool = Field(False, description="CT layouts: drop slices without foreground (train and test).")
    add_bone_label: bool = Field(False, description="CT layouts: pixels above 150 HU become class 0 (other classes +1).")
    add_bg_label: bool = Field(
        False,
        description="CT layouts: pixels below −500 HU become class 0 (other classes +1); with ct_slices, hu_min must be below −500 (pixel 0 = hu_min HU).",
    )
    score_helper_classes: bool = Field(
        False,
        description=(
            "CT layouts with add_bone_label / add_bg_label: also score the classes those options put between class 0 and the tumour "
            "(soft tissue, bone) in Dice, R, ACC/BWT/forgetting, validation and replay fidelity, as the original code did; "
            "default: only the real foreground classes are scored."
        ),
    )
    val_fraction: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Share of the site's training images held out for validation (never trained on; whole studies where the layout has them); 0 = no validation part.",
    )
    val_seed: int = Field(0, description="Seed of the validation hold-out (the same images for every strategy, order and run seed).")

    @field_validator("img_size")
    @classmethod
    def _sensible_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= side <= MAX_IMAGE_SIDE for side in size):
            raise ValueError(f"each side must be between 1 and {MAX_IMAGE_SIDE} pixels")
        return size

    @field_validator("img_folder")
    @classmethod
    def _each_folder_once(cls, folders):
        if isinstance(folders, list) and len(set(folders)) != len(folders):
            raise ValueError("a folder is listed twice (its images would count twice)")
        return folders

    @field_validator("out_range", "hu_window")
    @classmethod
    def _increasing(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not bounds[0] < bounds[1]:
            raise ValueError("the lower bound must be below the upper one")
        return bounds


#: built-in data layouts (relaylearn.data.layouts); your own is named "package.module:Class"
DATA_LAYOUTS = ("fundus", "folder", "nifti", "ct_nifti", "ct_slices")


def _layout_name(name: str | None) -> str | None:
    """A built-in layout or a plug-in spelling; nothing is imported here (bundles are validated too)."""
    if name is not None and name not in DATA_LAYOUTS and ":" not in name:
        raise ValueError(f"unknown data layout '{name}' (known: {', '.join(DATA_LAYOUTS)}, or 'package.module:Class')")
    return name


class DatasetConfig(Strict):
    name: str = Field(
        "fundus", description="Data layout: fundus, folder, nifti, ct_nifti, ct_slices (docs/design.md#data-layouts), or your own as 'package.module:Class'."
    )
    kwargs: DatasetKwargs = DatasetKwargs()

    _known_layout = field_validator("name")(_layout_name)

    @model_validator(mode="after")
    def _air_fits_the_slices(self, info: ValidationInfo):
        """add_bg_label with ct_slices: a 16-bit slice holds HU − hu_min, so no pixel lies below hu_min."""
        k = self.kwargs
        if self.name == "ct_slices" and k.add_bg_label and not (info.context or {}).get("partial"):
            from relaylearn.data.ct import AIR_HU

            if k.hu_min >= AIR_HU:
                raise ValueError(
                    f"kwargs.add_bg_label: air (< {AIR_HU:g} HU) never occurs in ct_slices with kwargs.hu_min={k.hu_min:g} "
                    f"(a 16-bit slice holds HU − hu_min, nothing below hu_min); use slices written with hu_min below {AIR_HU:g}, or no add_bg_label"
                )
        return self

    @model_validator(mode="after")
    def _plain_site_name(self):
        """'+' joins the sites of a pooled result row (``A+B``, joint training) in matrix.json and the
        results CSVs, so a site named ``B+C`` would be read as two sites."""
        if "+" in self.site:
            source = "kwargs.task_name" if self.kwargs.task_name else "kwargs.img_folder (the site's name without a task_name)"
            raise ValueError(
                f"site name {self.site!r} from {source} contains '+', which joins the sites of a pooled result row (A+B); "
                "set kwargs.task_name to a name without '+'"
            )
        return self

    @property
    def root(self) -> str:
        root = self.kwargs.root_path
        if isinstance(root, dict):
            system = platform.system()
            if system not in root:
                raise ConfigError(f"dataset.kwargs.root_path has no entry for this OS '{system}'")
            return root[system]
        return root

    @property
    def site(self) -> str:
        k = self.kwargs
        if k.task_name:
            return k.task_name
        if isinstance(k.img_folder, str):
            return k.img_folder
        return f"task_{k.task_id}"


class NamedKwargs(Strict):
    name: str = Field(description="Strategy: relay, sequential, local, joint, ewc, si, lwf, owm (or your own).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Strategy options (see the per-strategy tables below).")


class UNetOptions(Strict):
    """``model.kwargs`` of the built-in ``unet`` (relaylearn.models.unet.UNetResNet18)."""

    in_channels: int = Field(None, ge=1, le=64, description="Image channels; must equal dataset.kwargs.channels (default: those).")
    num_classes: int = Field(None, ge=2, le=256, description="Output classes; must equal dataset.kwargs.num_classes (default: those).")
    bilinear: bool = Field(False, description="Decoder upsamples bilinearly (else with learned transposed convolutions).")
    pretrained_path: Optional[str] = Field(None, description="A LOCAL ImageNet ResNet-18 state dict (.safetensors or .pth) for the encoder; site 1 only.")


class ExpLogOptions(Strict):
    """``train.loss.kwargs`` of the ExpLog loss (the keyword arguments of relaylearn.losses.ExpLogLoss)."""

    soft_dice: bool = Field(True, description="Soft Dice; false: generalised Dice (class weights 1/volume²).")
    do_bg: bool = Field(False, description="Count the background class in the mean Dice.")
    batch_dice: bool = Field(True, description="Dice over the whole batch (else per image, then averaged).")
    ce_weight: Union[list[Annotated[float, Field(gt=0)]], Literal["auto"], None] = Field(
        "auto",
        description="Cross-entropy class weights, one per class (background first, each > 0); auto: 1.0 for the background and 2.0 for every other class; None: unweighted.",
    )
    gamma: float = Field(0.3, gt=0, le=10, description="Exponent of the Dice term (−ln Dice)^gamma, in (0, 10].")
    dice_weight: float = Field(0.8, ge=0, description="Weight of the Dice term.")
    ce_weight_total: float = Field(0.2, ge=0, description="Weight of the cross-entropy term.")
    smooth: float = Field(1.0, ge=0, description="Smoothing of the soft Dice (2tp + smooth) / (2tp + fp + fn + smooth).")

    @model_validator(mode="after")
    def _some_term(self):
        if self.dice_weight == 0 and self.ce_weight_total == 0:
            raise ValueError("dice_weight and ce_weight_total are both 0: the loss would be 0 and nothing would train")
        return self


def _given_options(options: type[BaseModel], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` validated by ``options``: the keys given, with their validated values."""
    return options.model_validate(kwargs).model_dump(exclude_unset=True)


class ModelConfig(Strict):
    name: str = Field("unet", description="Segmentation network: 'unet' (U-Net with a ResNet-18 encoder) or your own nn.Module as 'package.module:Class'.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the built-in unet (`unet` table below, checked when the config loads); your own model's are its constructor's keyword arguments.",
    )

    @field_validator("kwargs")
    @classmethod
    def _unet_options(cls, kwargs: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The built-in unet's options are typed; your own model takes its keyword arguments as given."""
        return _given_options(UNetOptions, kwargs) if info.data.get("name") == "unet" else kwargs


class OptimizerConfig(Strict):
    name: Literal["adam"] = Field("adam", description="Optimizer of the segmentation solver.")
    lr: float = Field(1e-3, gt=0, description="Learning rate.")
    betas: tuple[AdamBeta, AdamBeta] = Field((0.9, 0.999), description="Adam betas.")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")
    fused: Optional[bool] = Field(
        None, description="Use the fused Adam kernel (GPU and CPU; on the CPU about 3x faster optimizer steps); None = PyTorch's default."
    )


class LossConfig(Strict):
    name: Literal["explog"] = Field("explog", description="Segmentation loss: the original's ExpLog loss (soft Dice + weighted CE).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="ExpLogLoss options (`explog` options below; see relaylearn.losses).")

    @field_validator("kwargs")
    @classmethod
    def _explog_options(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return _given_options(ExpLogOptions, kwargs)


class LightningConfig(Strict):
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true"] = Field(
        "auto",
        description="Lightning strategy: auto, ddp or ddp_find_unused_parameters_true (the ones the engine's per-rank batches are made for). A strategy whose batch leaves some parameters unused (the relay: each G, D and solver step trains its own networks) runs ddp_find_unused_parameters_true where auto (several processes) or ddp would pick plain DDP, which stops at the first batch there.",
    )
    num_nodes: int = Field(1, ge=1, description="Machines per site for multi-node training (Lightning).")
    devices: Optional[int] = Field(
        None, ge=1, le=1024, description="Processes per machine when -g is not given or is cpu (e.g. 2 CPU processes for DDP on the CPU); None: 1."
    )


class TrainConfig(Strict):
    num_epochs: Optional[int] = Field(None, ge=1, description="Epochs per site (exactly one of num_epochs / num_mimgs / num_steps).")
    num_mimgs: Optional[float] = Field(None, gt=0, description="Millions of real training images drawn per site (the original's budget).")
    num_steps: Optional[int] = Field(None, ge=1, description="Batches per site (handy for tiny runs).")
    batch_size: int = Field(128, ge=1, description="Batch size per device.")
    precision: Literal["32", "bf16-mixed", "16-mixed", "32-true", "auto"] = Field(
        "32",
        description="Lightning precision; auto = bf16-mixed where the device computes bf16 natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), else 32.",
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        """``--set train.precision=32`` (and ``precision: 32`` in YAML) arrive as the number 32."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    gradient_clip: float = Field(
        0.0,
        ge=0,
        description="Before every optimizer step, scale that optimizer's gradients to at most this joint L2 norm (every network's optimizer, as the original's Lightning gradient_clip_val); 0 = none. Not with 16-mixed.",
    )
    checkpoint_every_n_steps: int = Field(200, ge=1, description="Local resume checkpoint interval in batches (never shipped).")
    log_every_n_steps: int = Field(10, ge=1, description="TensorBoard scalar cadence in batches.")
    channels_last: bool = Field(
        True, description="Run every network (solver, and the relay's GANs) in channels_last memory format (faster convolutions on CPUs and GPUs)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the solver before its first batch (state-dict names unchanged; the first batches are slow while it compiles; on the CPU TorchInductor needs a C++ compiler).",
    )
    lightning: LightningConfig = LightningConfig()

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in ("num_epochs", "num_mimgs", "num_steps") if getattr(self, k) is not None]
        if len(given) != 1:
            hint = f"; keep one, e.g. --set train.{given[0]}=null" if len(given) > 1 else ""
            raise ValueError(f"exactly one of num_epochs / num_mimgs / num_steps must be set (got {given or 'none'}){hint}")
        if self.gradient_clip > 0 and self.precision == "16-mixed":
            raise ValueError("gradient_clip does not work with precision 16-mixed (its gradients are loss-scaled); use bf16-mixed or 32")
        return self


class TestConfig(Strict):
    batch_size: int = Field(64, ge=1, description="Batch size for testing.")
    bootstrap: int = Field(5000, ge=100, description="Bootstrap resamples for the 95 % intervals.")
    replay_fidelity_samples: int = Field(
        256,
        ge=0,
        description="Generated pairs per earlier site and hop scored for replay fidelity (metrics/replay.json; runs that train all sites on one machine with a replaying strategy); 0: off.",
    )


class BundleConfig(Strict):
    include_metrics: bool = Field(False, description="Opt in: write this site's test metrics into the bundle.")
    include_counts: bool = Field(False, description="Opt in: write this site's image count into the bundle.")


class AuditConfig(Strict):
    after_each_hop: bool = Field(
        True,
        description="Relay runs: after each hop, audit what the generators (and shipped discriminators) reveal about every earlier site whose data is here (all of them when simulated on one machine; a hospital's own hop: itself), into metrics/privacy.json and metrics/privacy/ (closest-pair PNGs of training images: keep them at the site).",
    )
    n_generated: int = Field(1000, ge=2, le=MAX_AUDIT_PAIRS, description=f"Generated pairs per site for the per-hop audit (2 to {MAX_AUDIT_PAIRS}).")
    threshold: float = Field(0.6, ge=0.5, le=1.0, description="Membership-inference ROC AUC above which a check is flagged.")
    n_bootstrap: int = Field(
        1000,
        ge=0,
        description="Bootstrap resamples for the audit's 95 % intervals; 0: no intervals (a near-copy share above 5 % is then flagged, not its interval's lower bound).",
    )


class CommonConfig(Strict):
    random_seed: int = Field(1314, ge=0, le=MAX_SEED, description="Seed (0 to 2^31-1); site k uses random_seed + task_id.")
    dataset: DatasetConfig = DatasetConfig()
    strategy: NamedKwargs  # required: a forgotten strategy must not train the unprotected baseline silently
    model: ModelConfig = ModelConfig()
    train: TrainConfig
    test: TestConfig = TestConfig()
    bundle: BundleConfig = BundleConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="after")
    def _a_weight_per_class(self, info: ValidationInfo):
        """An explicit ``ce_weight`` has one entry per class of the site's data."""
        weights, classes = self.train.loss.kwargs.get("ce_weight"), self.dataset.kwargs.num_classes
        if isinstance(weights, list) and len(weights) != classes and not (info.context or {}).get("partial"):
            raise ValueError(
                f"train.loss.kwargs.ce_weight: {len(weights)} entries, but dataset.kwargs.num_classes is {classes} (one weight per class, background first)"
            )
        return self


class CheckpointSave(Strict):
    dir: str


class CheckpointConfig(Strict):
    load: Optional[str] = Field(None, description="Bundle of the previous site (path relative to the run folder, or absolute).")
    save: Optional[CheckpointSave] = None


class TaskConfig(CommonConfig):
    """A fully resolved per-site config."""

    checkpoint: CheckpointConfig = CheckpointConfig()

    @property
    def site_seed(self) -> int:
        """The seed this site trains with: ``random_seed + task_id``."""
        return self.random_seed + (self.dataset.kwargs.task_id or 0)


class CurrentTasks(Strict):
    task_ids: list[int] = Field(min_length=1)
    task_confs: dict[int, dict[str, Any]] = {}

    @field_validator("task_ids")
    @classmethod
    def _each_site_once(cls, ids: list[int]) -> list[int]:
        """A site listed twice would overwrite its own bundle (and make backward transfer meaningless)."""
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"task id {twice[0]} is listed twice (each site trains once per relay)")
        return ids


class PartialDataset(Strict):
    name: Optional[str] = None
    kwargs: dict[str, Any] = {}


class RawConfig(Strict):
    common: dict[str, Any]
    all_tasks_datasets: list[PartialDataset] = Field(min_length=1)
    current_tasks: CurrentTasks


class RunConfig(BaseModel):
    """What the runner needs: the resolved tasks in order and every test site."""

    name: str  # config name, e.g. "fundus/relay"
    path: Path
    raw: dict[str, Any]
    tasks: list[TaskConfig]
    test_datasets: list[DatasetConfig]
    #: key path under ``common`` → the ``--set`` item that wrote it (errors found later name the item)
    sets: dict[tuple[str, ...], str] = Field(default_factory=dict, exclude=True)

    @property
    def common(self) -> TaskConfig:
        return self.tasks[0]


# ----- keys of the original's config files that this version does not take ----------------------
#: accepted (so the original's files load) and dropped with a warning: they would change nothing here
IGNORED_KEYS: dict[tuple[str, ...], str] = {
    ("num_workers",): "sites are decoded into memory once, so loading needs no workers",
    ("train", "check_val_every_n_epoch"): "each site is validated once, at its end, on its validation part",
}
#: refused with a pointer to what does the job
UNSUPPORTED_KEYS: dict[tuple[str, ...], str] = {
    ("checkpoint", "resume"): "resume an interrupted run with 'relaylearn train --resume' (its last local checkpoint)",
    ("test", "save_predictions"): "write predicted masks with 'relaylearn predict'",
}


def _drop_legacy_keys(section: dict, where: str, path: Path, sets: dict | None = None) -> None:
    """Remove ``IGNORED_KEYS`` from a ``common`` or ``task_confs.<id>`` mapping (in place) with a
    warning; ConfigError for ``UNSUPPORTED_KEYS`` (naming the ``--set`` item of ``sets`` that wrote one)."""
    for keys, reason in {**IGNORED_KEYS, **UNSUPPORTED_KEYS}.items():
        node = section
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or keys[-1] not in node:
            continue
        key = f"{where}.{'.'.join(keys)}"
        if keys in UNSUPPORTED_KEYS:
            item = _set_origin(sets or {}, list(keys))
            raise ConfigError(f"{f'--set {item}' if item else key}: not supported by this version; {reason}", None if item else path)
        del node[keys[-1]]
        warnings.warn(f"{path}: {key} is ignored: {reason}", stacklevel=3)


# ----- helpers --------------------------------------------------------------------------------
def deep_merge(base: dict, override: dict) -> dict:
    """Recursive merge where ``override`` wins; dicts merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config_path(spec: str) -> tuple[str, Path]:
    """``-c`` takes a path or a name under configs/ without .yaml. Returns (name, path)."""
    spec = spec.lstrip("=")
    if not spec.strip():
        raise ConfigError("-c: the config name is empty (give a config path or a name under configs/)")
    if spec.endswith((".yaml", ".yml")):
        spec = spec.rsplit(".", 1)[0] if not Path(spec).is_file() else spec
    candidates = [Path(spec), Path(spec + ".yaml"), CONFIG_DIR / spec, CONFIG_DIR / (spec + ".yaml")]
    for cand in candidates:
        if cand.is_file():
            path = cand.resolve()
            try:
                name = str(path.relative_to(CONFIG_DIR).with_suffix(""))
            except ValueError:
                name = path.with_suffix("").name
            return name, path
    folder = next((cand for cand in candidates if cand.is_dir()), None)
    if folder is not None:
        raise ConfigError("is a folder, not a config file (give one of its .yaml files)", folder)
    raise ConfigError(f"config not found (looked for {spec}, {spec}.yaml and configs/{spec}.yaml)", spec)


def parse_set(items: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``KEY=VALUE`` overrides of the ``common`` section; values are YAML scalars."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.batch_size=16")
        key, value = item.split("=", 1)
        keys = key.strip().split(".")
        if keys[0] == "common":
            keys = keys[1:]
        if not keys or "" in keys:
            raise ConfigError(f"--set {item!r}: empty key{' segment' if keys else ''} (expected KEY=VALUE, e.g. train.batch_size=16)")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        out.append((keys, parsed))
    return out


def _apply_set(common: dict, keys: list[str], value: Any) -> None:
    node = common
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


#: how pydantic tags the error of each member of a union that a value matched none of (the last
#: element of the error's location): a type name, optionally with its parameters
_UNION_MEMBER_TAG = re.compile(r"[a-z_]+(\[.*\])?")
#: a union member's tag with parameters (``list[constrained-float]``): never a key, left out of the key's name
_TYPED_MEMBER_TAG = re.compile(r"[a-z_]+\[.*\]")


def _union_members(errors: list[dict]) -> list[dict]:
    """The first error and the errors of the other members of the same union, when the first
    error is one member's of a union (a value that matches no member gets one error per member)."""
    first = errors[0]
    tag = first["loc"][-1] if first["loc"] else None
    if not isinstance(tag, str) or not _UNION_MEMBER_TAG.fullmatch(tag) or first["type"] in ("extra_forbidden", "missing"):
        return [first]
    members = [e for e in errors if e["loc"][:-1] == first["loc"][:-1] and isinstance(e["loc"][-1], str) and _UNION_MEMBER_TAG.fullmatch(e["loc"][-1])]
    return members if len(members) > 1 else [first]


def _error_parts(exc: ValidationError) -> tuple[list[str], str]:
    """(key path, what is wrong) of a pydantic error's first problem."""
    errors = exc.errors()
    members = _union_members(errors)
    err = members[0]
    loc_parts = err["loc"][:-1] if len(members) > 1 else err["loc"]
    loc = [str(p) for p in loc_parts if not str(p).startswith("function-after") and not _TYPED_MEMBER_TAG.fullmatch(str(p))]
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")  # a validator's own message
    if len(members) > 1:  # "Input should be 'auto' or a valid boolean", not the first member's alone
        msg = " or ".join([members[0]["msg"].split(",")[0]] + [m["msg"].split(",")[0].removeprefix("Input should be ") for m in members[1:]])
    if err["type"] not in ("extra_forbidden", "missing") and "input" in err and not isinstance(err["input"], dict):
        msg += f" (got {err['input']!r})"
    return loc, msg


def _did_you_mean(model: type[BaseModel] | None, loc: list[str]) -> str:
    """`` (did you mean X?)`` for an unknown key ``loc`` of ``model`` close to a known one, else ''."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        annotation = field.annotation if field is not None else None
        model = next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is None or not loc:
        return ""
    close = difflib.get_close_matches(loc[-1], [f.alias or name for name, f in model.model_fields.items()], n=1)
    return f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)" if close else ""


def validation_message(exc: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> str:
    """A pydantic error as one line: the key under ``prefix`` and what is wrong with its value
    (for an unknown key of ``model``, the closest known key)."""
    loc, msg = _error_parts(exc)
    if msg == "unknown key":
        msg += _did_you_mean(model, loc)
    return f"{'.'.join([prefix, *loc]) if loc else prefix}: {msg}"


def _set_origin(sets: dict[tuple[str, ...], str], key: list[str]) -> str | None:
    """The last ``--set`` item that wrote ``key`` (or a key inside it, or the mapping holding it)."""
    found = None
    for keys, item in sets.items():
        if key and (list(keys[: len(key)]) == key or key[: len(keys)] == list(keys)):
            found = item
    return found


def validate_section(
    model: type[BaseModel], data: Any, prefix: str, path: Path, context: dict | None = None, sets: dict | None = None, base: tuple = ()
) -> Any:
    """``model`` validated from ``data``; ConfigError naming ``path`` and the key, or, when the
    key came from ``sets`` (``--set`` key path under ``common`` → item; ``data`` sits at ``base``),
    the ``--set`` item and not the file."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        loc, msg = _error_parts(exc)
        item = _set_origin(sets or {}, [*base, *loc]) if loc else None  # a check of the whole model: the file's keys take part
        if item is None:
            raise ConfigError(validation_message(exc, prefix, model), path) from None
        if msg == "unknown key":
            msg += _did_you_mean(model, loc)
        where = "" if tuple(base) + tuple(loc) in sets else f"{'.'.join(['common', *base, *loc])}: "  # a key the item did not name itself
        raise ConfigError(f"--set {item}: {where}{msg}") from None


class _NoDuplicateKeysLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML
    keeps the last one silently: a config edited in two places would train with half the edit)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file as plain data (UTF-8, no duplicate keys); ConfigError naming the file otherwise."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_NoDuplicateKeysLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:  # where and what, not the parser's state ("while scanning ...")
        mark, problem = exc.problem_mark or exc.context_mark, exc.problem or exc.context
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"cannot read YAML{where}: {problem}", path) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read YAML: {str(exc).splitlines()[0]}", path) from None


def load_config(spec: str, overrides: list[str] | None = None, data_root: str | None = None) -> RunConfig:
    """Load, override, merge and validate a config. Raises ConfigError naming file and key."""
    name, path = resolve_config_path(spec)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping with common / all_tasks_datasets / current_tasks", path)
    cfg = validate_section(RawConfig, raw, "config", path)
    common = copy.deepcopy(cfg.common)
    sets = {}  # key path → the --set item that wrote it: errors there name --set, not the file
    for (keys, value), item in zip(parse_set(overrides or []), overrides or []):
        _apply_set(common, keys, value)
        sets[tuple(keys)] = item
    _drop_legacy_keys(common, "common", path, sets)
    datasets = [d.model_dump(exclude_none=True) for d in cfg.all_tasks_datasets]
    task_confs = copy.deepcopy(cfg.current_tasks.task_confs)
    for task_id, conf in task_confs.items():
        _drop_legacy_keys(conf, f"current_tasks.task_confs.{task_id}", path)
    if data_root is not None:
        common.setdefault("dataset", {}).setdefault("kwargs", {})["root_path"] = str(data_root)
        for d in datasets:
            d.setdefault("kwargs", {})["root_path"] = str(data_root)
        for conf in task_confs.values():
            kw = conf.get("dataset", {}).get("kwargs", {})
            if "root_path" in kw:
                kw["root_path"] = str(data_root)
    validate_section(CommonConfig, common, "common", path, PARTIAL, sets)  # each site's keys are merged over it below

    test_datasets: list[DatasetConfig] = []
    by_id: dict[int, dict] = {}
    for i, partial in enumerate(datasets):
        merged = deep_merge(common.get("dataset", {}), partial)
        ds = validate_section(DatasetConfig, merged, f"all_tasks_datasets[{i}]", path, sets=sets, base=("dataset",))
        test_datasets.append(ds)
        if ds.kwargs.task_id is not None:
            if ds.kwargs.task_id in by_id:
                raise ConfigError(f"all_tasks_datasets[{i}].kwargs.task_id: duplicate id {ds.kwargs.task_id}", path)
            by_id[ds.kwargs.task_id] = merged
    names = [d.site for d in test_datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"all_tasks_datasets: site names must be unique (got {names})", path)

    tasks: list[TaskConfig] = []
    for task_id in cfg.current_tasks.task_ids:
        if task_id not in by_id:
            raise ConfigError(f"current_tasks.task_ids: no dataset in all_tasks_datasets has task_id {task_id}", path)
        extra = set(task_confs) - set(cfg.current_tasks.task_ids)
        if extra:
            raise ConfigError(f"current_tasks.task_confs: ids {sorted(extra)} are not in task_ids", path)
        task_override = deep_merge({"dataset": by_id[task_id]}, task_confs.get(task_id, {}))
        merged = deep_merge(common, task_override)
        tasks.append(validate_section(TaskConfig, merged, f"current_tasks.task_confs.{task_id}", path, sets=sets))
    return RunConfig(name=name, path=path, raw=raw, tasks=tasks, test_datasets=test_datasets, sets=sets)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# ----- configuration reference (README) -------------------------------------------------------------
def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]\)\]", r"\1", text)  # a bounded number: its type (bounds are in the description)
    for noise in ("relaylearn.config.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            rows.extend(_rows(sub, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        default_text = "required" if field.is_required() else repr(default if not isinstance(default, BaseModel) else default.model_dump())
        rows.append((f"{prefix}{name}", _type_name(ann), default_text, (field.description or "").replace("|", "\\|")))
    return rows


def config_reference_markdown() -> str:
    """The README's configuration reference, generated from the schema (a test keeps it current)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in _rows(CommonConfig, "common."):
        lines.append(f"| `{key}` | `{typ}` | `{default}` | {desc} |")
    lines.append("| `current_tasks.task_ids` | `list[int]` | required | Sites to train, in order (ids from `all_tasks_datasets`). |")
    lines.append("| `current_tasks.task_confs.<id>` | mapping | `{}` | Per-site overrides merged over `common` (e.g. `checkpoint.load`, `train.num_steps`). |")
    lines.append("| `current_tasks.task_confs.<id>.checkpoint.load` | `str` | `None` | Bundle the site starts from (relative to the run folder). |")
    lines.append(
        "| `all_tasks_datasets[i]` | mapping | required | One site each: `kwargs` merged over `common.dataset.kwargs`; every listed site is tested after each hop. |"
    )
    from relaylearn.strategies import available_strategies, get_strategy_class

    tables = [("Model `unet`", "common.model.kwargs", UNetOptions), ("Loss `explog`", "common.train.loss.kwargs", ExpLogOptions)]
    tables += [(f"Strategy `{name}`", "common.strategy.kwargs", get_strategy_class(name).Options) for name in available_strategies()]
    for title, where, options in tables:
        rows = _rows(options, "")
        if not rows:
            continue
        lines += ["", f"**{title}** (`{where}`)", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | `{t}` | `{d}` | {m} |" for k, t, d, m in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
