"""TOML specs validated into frozen, typed objects.

Two kinds of spec: a *cache spec* (stage one: dataset, teacher, views, store, run) and a *train spec*
(stage two: method, protocol, student, optimisation, and a reference to a cache spec). Unknown keys and
wrong types raise ``SpecError`` with one line naming the file, the dotted field and the closest valid
key. ``--set dotted.key=value`` overrides are merged into the TOML before validation, so they are
checked the same way.

Path rules: data paths (``dataset.root``, ``ssl.labeled_list``) resolve against ``CUSTOMKD_DATA_ROOT``
(default ``./data``); other file paths in a spec (``cache.spec``, weights files) resolve against the
directory of the spec file; absolute paths are used as they are. Stores live under
``CUSTOMKD_CACHE_ROOT`` (default ``./caches``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from customkd_cache.errors import SpecError, closest

FeatureKind = Literal["cls", "cls+mean_patch", "embed", "pooled"]
# What each ``teacher.precision`` may resolve to: the ``precision`` a store's identity records.
# "bf16-autocast": float32 weights, matmuls and convolutions in bfloat16 under ``torch.autocast``.
# "bf16" is what stores made before autocast record (weights and activations cast to bfloat16):
# they are still found by a spec asking for bf16, never made again.
PRECISIONS_RESOLVED: dict[str, tuple[str, ...]] = {
    "auto": ("fp32", "bf16-autocast"),
    "fp32": ("fp32",),
    "tf32": ("tf32", "fp32"),
    "bf16": ("bf16-autocast", "bf16"),
}
Method = Literal["student_only", "kd", "fitnet", "dkd", "logits", "customkd", "customkd+kd", "customkd+dkd"]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]


class _Spec(BaseModel):
    # no NaN or Inf in any float field: `lr = inf` is a typo, never a setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- shared sections ---------------------------------------------------------------------------


class DatasetSpec(_Spec):
    """Which images: a dataset in its real on-disk layout."""

    kind: str = Field(..., description="a dataset kind of customkd_cache.data.registry.KINDS")
    root: str = Field("", description="dataset root; relative roots resolve against CUSTOMKD_DATA_ROOT")
    splits: tuple[str, ...] = Field((), description="splits to use; empty = every split of the dataset")
    max_per_split: Union[int, dict[str, int]] = Field(
        0, description="keep the first N samples of each split (or {split = N}); 0 = all"
    )
    lists: tuple[str, ...] = Field((), description="list_file kind: list files `path label`, one split each")
    skip_list: str = Field("", description="file of sample ids to leave out (recorded in the manifest)")
    max_pixels: int = Field(
        64_000_000,
        ge=1,
        description="largest image (width x height) decoded; a larger one is refused naming the file, "
        "since a small compressed file can decode to gigabytes per worker",
    )

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, v: str) -> str:
        from customkd_cache.data.registry import KIND_NAMES  # imports nothing else: no cycle

        if v not in KIND_NAMES:
            valid = ", ".join(KIND_NAMES)
            raise ValueError(f"unknown dataset kind {v!r}{closest(v, KIND_NAMES)}; valid kinds: {valid}")
        return v

    @field_validator("max_per_split")
    @classmethod
    def _non_negative(cls, v: int | dict[str, int]) -> int | dict[str, int]:
        values = [v] if isinstance(v, int) else list(v.values())
        if any(x < 0 for x in values):
            raise ValueError("counts must be >= 0")
        return v

    def resolved_root(self) -> Path:
        from customkd_cache.data.registry import kind_info

        return data_path(self.root or kind_info(self.kind).default_root)


class RunSpec(_Spec):
    """How to run; never part of a cache's identity."""

    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default")


# --- cache spec --------------------------------------------------------------------------------


class TeacherSpec(_Spec):
    source: Literal["timm", "open_clip"] = "timm"
    name: str = Field(..., min_length=1)
    pretrained: str = Field("", description="open_clip pretrained tag, e.g. laion2b_s32b_b82k")
    weights: str = Field(
        "hub",
        description="'hub' (Hugging Face cache / open_clip tag), 'random' (explicit), a file, "
        "or 'package:PKG/REL/PATH' (a file shipped inside an installed Python package)",
    )
    weights_keys: Literal["by_name", "by_order"] = Field(
        "by_name", description="match state-dict keys by name, or by position when only names differ"
    )
    input_size: int = Field(224, ge=8, le=4096)
    feature: FeatureKind = "cls"
    precision: Literal["auto", "fp32", "tf32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast for a transformer teacher on a CUDA GPU with bf16 (Ampere or "
        "later), else fp32; fp32: float32 with TF32 off; tf32: float32 with TF32 matmuls and "
        "convolutions on a CUDA GPU that has them (else fp32); bf16: bf16 autocast on any device. "
        "The identity records what it resolved to (PRECISIONS_RESOLVED)",
    )
    init_seed: int = Field(0, description="torch seed for weights = 'random'")
    pos_embed_antialias: bool = Field(
        True,
        description="timm ViTs loaded from a file: antialias when resizing its position grid to input_size "
        "(timm's default); false = plain bicubic, as Hugging Face Dinov2Model (and its ONNX exports) do",
    )

    @model_validator(mode="after")
    def _feature_fits_source(self) -> TeacherSpec:
        if self.source == "open_clip" and self.feature != "embed":
            raise ValueError(f"open_clip teachers give feature = 'embed', not '{self.feature}'")
        if self.source == "open_clip" and not self.pos_embed_antialias:
            raise ValueError("pos_embed_antialias = false is for timm ViTs; open_clip resizes its own grid")
        if self.source == "timm" and self.feature == "embed":
            raise ValueError(
                "feature = 'embed' is for open_clip; timm teachers give cls, cls+mean_patch, pooled"
            )
        return self


class ViewsSpec(_Spec):
    num_views: int = Field(8, ge=1, le=1024, description="views per image; view 0 is the evaluation view")
    seed: int = Field(0, ge=0)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: bool = True
    eval_crop: float = Field(
        0.875, gt=0.0, le=1.0, description="view 0: centre square, this fraction of the short side"
    )

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"expected 0 < low <= high, got {list(v)}")
        return v


# The most rows a work unit may hold: one unit's arrays are in memory while it is computed (65536 rows
# x 8 views x 1024 dims in float16 are already 1 GiB), and a larger unit only delays the first resume point.
MAX_UNIT_ROWS = 65536


class StoreSpec(_Spec):
    dtype: Literal["float16", "float32", "int8"] = Field(
        "float16", description="int8: per-unit, per-dimension affine codes (about half of float16)"
    )
    unit_rows: int = Field(
        256,
        ge=1,
        le=MAX_UNIT_ROWS,
        description="rows per work unit (one chunk file per array, held in memory while it is computed)",
    )
    compressor: Literal["zstd", "none"] = "zstd"


class CacheSpec(_Spec):
    """Stage one: run ``teacher`` over ``dataset`` for ``views`` and write a store."""

    dataset: DatasetSpec
    teacher: TeacherSpec
    views: ViewsSpec = ViewsSpec()
    store: StoreSpec = StoreSpec()
    run: RunSpec = RunSpec()


# --- train spec --------------------------------------------------------------------------------


class CacheRef(_Spec):
    spec: str = Field("", description="cache spec file (relative to this spec's directory)")
    store: str = Field("", description="explicit store path; else found under CUSTOMKD_CACHE_ROOT")


class UdaSpec(_Spec):
    source: tuple[str, ...] = Field(..., min_length=1, description="labeled source split(s)")
    target: tuple[str, ...] = Field(..., min_length=1, description="unlabeled target split(s)")
    eval: tuple[str, ...] = Field((), description="evaluation split(s); empty = the target split(s)")
    val: tuple[str, ...] = Field(
        (), description="held-out labeled source split(s) for validation (val_accuracy); empty = none"
    )


class SslSpec(_Spec):
    train_split: str = "train"
    eval_split: str = "test"
    labeled_list: str = Field(
        ..., description="list file of labeled sample ids (see `customkd-cache labels`)"
    )
    labeled_sha256: str = Field("", description="expected sha256 of the list file; empty = not checked")
    unlabeled_list: str = Field(
        "", description="list file of the unlabeled pool; empty = the rest of train_split"
    )
    eval_list: str = Field("", description="list file of evaluation ids within eval_split; empty = all of it")
    val_list: str = Field(
        "",
        description="list file of held-out labeled ids within train_split for validation (never trained "
        "on); gives val_accuracy beside the test accuracy; empty = none",
    )


class StudentSpec(_Spec):
    name: str = "mobilenetv3_large_100"
    weights: str = Field("", description="local weights file (or 'package:...') for the init; empty = random")
    weights_keys: Literal["by_name", "by_order"] = "by_name"
    input_size: int = Field(224, ge=8, le=4096)
    in22k_head: bool = False


# Per-optimizer defaults of the stage-B learning rate and weight decay (used when the spec omits them).
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"lr": 3e-3, "weight_decay": 0.05},
    "sgd": {"lr": 0.05, "weight_decay": 5e-4},
}


# The largest batch a train spec may ask for: larger ones only exhaust memory (before any step runs).
MAX_BATCH = 65536


class OptimSpec(_Spec):
    """Stage B (the student and P_s): optimizer, schedule and batches."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(
        64, ge=2, le=MAX_BATCH, description="images per stage-B step (all ranks together)"
    )
    labeled_per_batch: float = Field(0.5, gt=0.0, le=1.0, description="labeled share of each stage-B batch")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description="adamw suits the feature-regression terms (their gradients are ~100x smaller than "
        "CE/KD under SGD); sgd is SGD with (Nesterov) momentum",
    )
    lr: float = Field(
        0.0, gt=0.0, allow_inf_nan=False, description="peak lr; default per optimizer: adamw 3e-3, sgd 0.05"
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    weight_decay: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="default per optimizer: adamw 0.05, sgd 5e-4"
    )
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    photometric: bool = Field(False, description="student-only colour jitter on top of the replayed view")

    @model_validator(mode="before")
    @classmethod
    def _optimizer_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = OPTIMIZER_DEFAULTS.get(str(data.get("optimizer", "adamw")), OPTIMIZER_DEFAULTS["adamw"])
        return {**defaults, **data}


class KdSpec(_Spec):
    temperature: float = Field(4.0, gt=0.0)
    weight: float = Field(
        1.0, ge=0.0, description="weight of the kd term, and of the logit L2 term of method = 'logits'"
    )


class DkdSpec(_Spec):
    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(8.0, ge=0.0)
    temperature: float = Field(4.0, gt=0.0)
    weight: float = Field(1.0, ge=0.0)
    warmup_epochs: int = Field(5, ge=0, description="DKD weight ramps linearly over these epochs")


class CustomKDSpec(_Spec):
    """CustomKD's two stages (docs/method.md): stage A customizes the teacher feature, stage B distils.

    Stage A trains ``P_t`` so that the student's head classifies ``P_t(f_t)``: its budget is counted
    in optimizer steps on labeled (row, view) pairs drawn with replacement, because a pass over a few
    labeled rows is a single step. The customized target is bounded (``target_bound``): minimizing CE
    through a fixed linear head otherwise grows ``||P_t(f_t)||`` without limit, and the MSE to it in
    stage B then vanishes or explodes.
    """

    lambda_gen: float = Field(
        1.0, ge=0.0, allow_inf_nan=False, description="weight of L_gen = MSE(P_s(f_s), f_t), task-general"
    )
    lambda_task: float = Field(
        1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="weight of L_task = MSE(f_s, stopgrad(P_t(f_t))), the customized task-specific term "
        "(the paper's lambda_spec)",
    )
    projector: Literal["linear", "mlp"] = Field("linear", description="form of P_t and P_s")
    standardize: bool = Field(True, description="standardize f_t with the training splits' per-dim mean/std")
    stage_a_head: Literal["student", "separate"] = Field(
        "student",
        description="student: the student's own head H_s classifies P_t(f_t) (the method); separate: a "
        "randomly initialized teacher head trained with P_t in stage A (the paper's ablation)",
    )
    head_learns_in_stage_a: bool = Field(
        False, description="with stage_a_head = student: update H_s in stage A too"
    )
    stage_a_steps: int = Field(50, ge=0, description="optimizer steps per stage-A cycle; 0 = no stage A")
    stage_a_batch_size: int = Field(
        64, ge=1, le=MAX_BATCH, description="labeled (row, view) pairs per stage-A step"
    )
    stage_a_optimizer: Literal["adamw", "sgd"] = "adamw"
    stage_a_lr: float = Field(1e-2, gt=0.0, allow_inf_nan=False)
    stage_a_weight_decay: float = Field(
        0.5,
        ge=0.0,
        allow_inf_nan=False,
        description="AdamW/SGD weight decay of P_t in stage A: keeps the customized teacher near what the "
        "frozen features support instead of fitting the few labels exactly (chosen on validation, "
        "docs/method.md)",
    )
    stage_a_ce_target: float = Field(
        0.0, ge=0.0, description="end a stage-A cycle early once a step's CE is below this; 0 = never"
    )
    stage_a_every: int = Field(
        1,
        ge=0,
        description="run stage A before every N-th stage-B epoch (1 = 1:1); 0 = once, before the first",
    )
    stage_a_per_epoch: int = Field(
        1, ge=1, description="stage-A cycles interleaved within each stage-B epoch that has stage A"
    )
    target_bound: Literal["student_rms", "fixed_rms", "none"] = Field(
        "fixed_rms",
        description="bound on the RMS of each P_t(f_t) row: fixed_rms = target_bound_scale itself; "
        "student_rms = target_bound_scale x the mean RMS of the student's features f_s on labeled images "
        "(measured before each stage-A cycle); none = unbounded",
    )
    target_bound_scale: float = Field(
        10.0, gt=0.0, allow_inf_nan=False, description="the bound (fixed_rms) or its factor (student_rms)"
    )
    target_space: Literal["auto", "features", "pre_activation"] = Field(
        "auto",
        description="where L_task compares the student with P_t(f_t): pre_activation = the student's head "
        "output before its last activation (MobileNetV3's conv_head), so every target is reachable, and "
        "stage A classifies activation(P_t(f_t)); features = f_s itself; auto = pre_activation where the "
        "student has one, else features",
    )
    task_loss: Literal["mse", "normalized", "logit_kl"] = Field(
        "logit_kl",
        description="form of L_task (default chosen on validation, docs/method.md): mse = "
        "MSE(f_s, P_t(f_t)) (the paper's); normalized = the MSE between "
        "the two rows each scaled to unit RMS (= 2 - 2 cos), so its pull does not depend on the target's "
        "norm; logit_kl = KD (kd.temperature) from H_s(P_t(f_t)), the customized teacher's logits, to "
        "the student's: only what the head reads of the target",
    )
    gen_loss: Literal["mse", "relational"] = Field(
        "mse",
        description="form of L_gen: mse = MSE(P_s(f_s), f_t) (the paper's); relational = the "
        "similarity-preserving loss (Tung & Mori, ICCV 2019) between the batch's row-normalized Gram "
        "matrices of P_s(f_s) and f_t: only how the images relate, not the teacher's coordinates",
    )
    fitnet_weight: float = Field(1.0, ge=0.0, description="weight of the fitnet baseline's MSE")


class ProbeSpec(_Spec):
    epochs: int = Field(50, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)


class TrainRunSpec(RunSpec):
    eval_every: int = Field(1, ge=1)
    features_in_ram: bool = Field(True, description="hold each split's features in RAM (else stream blocks)")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="cpu: DataLoader workers decode (JPEGs at the DCT scale the stored crop allows) and "
        "render each view; gpu: workers read the JPEG files' bytes, decoded in batches on the run's "
        "device (nvjpeg on CUDA) and cropped and resized there (other images as with cpu)",
    )
    dist_timeout_s: int = Field(
        1800, ge=1, description="under torchrun: seconds a rank waits in a collective before the run fails"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="stage two's forward passes and losses: bf16 autocast (losses in fp32), or fp32; "
        "auto = bf16 on a CUDA device that supports it, else fp32",
    )
    log_every: int = Field(
        50, ge=1, description="stage-B steps between reads of the running losses (and the non-finite check)"
    )


class TrainSpec(_Spec):
    """Stage two: train a student from a cache (or an online teacher) with one method."""

    method: Method = "customkd"
    protocol: Literal["uda", "ssl"]
    seed: int = Field(0, ge=0, lt=2**32, description="every random choice of the run derives from it")
    teacher_mode: Literal["cache", "online"] = "cache"
    train_views: Literal["random", "all", "eval"] = Field(
        "all",
        description="random: each epoch replays one of the random cached views (1..V-1) per image; "
        "all: one of every cached view, the evaluation view 0 included; eval: view 0 only (the "
        "fixed-teacher setting)",
    )
    dataset: DatasetSpec
    cache: CacheRef
    uda: Union[UdaSpec, None] = None
    ssl: Union[SslSpec, None] = None
    student: StudentSpec = StudentSpec()
    optim: OptimSpec = OptimSpec()
    kd: KdSpec = KdSpec()
    dkd: DkdSpec = DkdSpec()
    customkd: CustomKDSpec = CustomKDSpec()
    probe: ProbeSpec = ProbeSpec()
    run: TrainRunSpec = TrainRunSpec()

    @model_validator(mode="after")
    def _protocol_section(self) -> TrainSpec:
        if self.protocol == "uda" and self.uda is None:
            raise ValueError("protocol = 'uda' needs a [uda] section with source and target splits")
        if self.protocol == "ssl" and self.ssl is None:
            raise ValueError("protocol = 'ssl' needs an [ssl] section with labeled_list")
        if not self.cache.spec and not self.cache.store:
            raise ValueError("[cache] needs spec = 'path/to/cache_spec.toml' or store = 'path/to/store'")
        return self


# --- loading -----------------------------------------------------------------------------------

SpecT = TypeVar("SpecT", CacheSpec, TrainSpec)


def data_root() -> Path:
    return Path(os.environ.get("CUSTOMKD_DATA_ROOT", "data"))


def cache_root() -> Path:
    return Path(os.environ.get("CUSTOMKD_CACHE_ROOT", "caches"))


def data_path(path: str) -> Path:
    """A data path from a spec: absolute as is, relative against ``CUSTOMKD_DATA_ROOT``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_root() / p


def spec_relative_path(path: str, spec_file: Path | None) -> Path:
    """A non-data path from a spec: absolute as is, relative against the spec file's directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or spec_file is None:
        return p
    return spec_file.parent / p


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value); the value is parsed as TOML, else kept as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set run.batch_size=64")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [k.strip() for k in key.split(".")], value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with each ``--set`` applied (creates missing tables)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        set_dotted(out, keys, value, where=f"--set {item!r}")
    return out


def set_dotted(data: dict[str, Any], keys: list[str], value: Any, *, where: str) -> None:
    """``data[k0][k1]...[kn] = value`` in place, creating missing tables.

    Raises SpecError (prefixed by ``where``) when a key on the way holds a value, not a table.
    """
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise SpecError(f"{where}: '{k}' is a value, not a table")
        node = child
    node[keys[-1]] = value


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found (give the path of a .toml spec)")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start}); save the spec as UTF-8") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror or e})") from None


def spec_kind(data: dict[str, Any]) -> Literal["cache", "train"]:
    """A train spec has ``protocol`` (or ``method``/``student``); a cache spec has ``teacher``."""
    return "train" if {"protocol", "method", "student"} & data.keys() else "cache"


# Keys that were renamed: (table, old key) -> (new key, why). Refused with the new name, never mapped
# silently, because the meaning of the value changed with some of them (passes -> optimizer steps).
RENAMED_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("customkd", "lambda_spec"): ("lambda_task", "the task-specific loss term is L_task"),
    ("customkd", "stage_a_epochs"): ("stage_a_steps", "stage A's budget is counted in optimizer steps"),
    ("customkd", "stage_b_epochs"): ("stage_a_every", "stage A runs before every N-th stage-B epoch"),
}


def _refuse_renamed(data: dict[str, Any], source: str) -> None:
    for (table, old), (new, why) in RENAMED_KEYS.items():
        section = data.get(table)
        if isinstance(section, dict) and old in section:
            raise SpecError(f"{source}: {table}.{old}: renamed to {table}.{new} ({why}); use {table}.{new}")


def validate(model: type[SpecT], data: dict[str, Any], source: str) -> SpecT:
    _refuse_renamed(data, source)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(_one_line(e, model, source)) from None


def load_cache_spec(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> CacheSpec:
    path = Path(path)
    return validate(CacheSpec, apply_overrides(read_toml(path), overrides), str(path))


def load_train_spec(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> TrainSpec:
    path = Path(path)
    return validate(TrainSpec, apply_overrides(read_toml(path), overrides), str(path))


def load_any_spec(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> CacheSpec | TrainSpec:
    path = Path(path)
    data = apply_overrides(read_toml(path), overrides)
    if spec_kind(data) == "train":
        return validate(TrainSpec, data, str(path))
    return validate(CacheSpec, data, str(path))


def to_dict(spec: BaseModel) -> dict[str, Any]:
    """The resolved spec as plain JSON-able data (tuples become lists)."""
    return spec.model_dump(mode="json")


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON objects (resolved specs), sorted; a key
    present in one only differs; a whole value when not both dicts (``"(the whole spec)"`` at the
    top)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "(the whole spec)"]
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in old or key not in new:
            out.append(dotted)
        else:
            out += differing_keys(old[key], new[key], dotted)
    return out


# --- error messages ----------------------------------------------------------------------------


def _one_line(err: ValidationError, model: type[BaseModel], source: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    field = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        valid = _valid_keys(model, loc[:-1])
        msg = f"unknown key '{loc[-1]}'{closest(loc[-1], valid)}; valid keys here: {', '.join(valid)}"
    elif first["type"] == "missing":
        msg = "required field is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if (
            "input" in first
            and first["type"] not in ("value_error",)
            and not isinstance(first["input"], dict)
        ):
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" [and {more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {field}: {msg}{tail}"


def _valid_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """The field names of the (sub)model at ``path``."""
    current: Any = model
    for key in path:
        field = current.model_fields.get(key) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        current = _model_of(field.annotation)
        if current is None:
            return []
    return list(current.model_fields) if hasattr(current, "model_fields") else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
