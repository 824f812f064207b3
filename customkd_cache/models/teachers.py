"""Teachers: timm and open_clip backbones behind one frozen-feature interface.

``create_teacher(spec)`` returns a ``Teacher`` whose ``features(x)`` maps a normalized image batch
``(B, 3, S, S) float32`` to one vector per image ``(B, D) float32``. Everything that changes those
vectors is in ``Teacher.identity()`` (it feeds the cache fingerprint): the model, a sha256 digest of
its weights, the preprocessing resolved *from the model*, the feature kind and the precision it
resolved to (``resolve_precision``: ``teacher.precision = "auto"`` is bf16 autocast for a transformer
on a CUDA GPU with bf16, fp32 elsewhere).

Weights never come from the network. ``teacher.weights`` is one of:

- ``"random"``: seeded random init (``torch.manual_seed(init_seed)`` right before the build), for
  tests and smoke runs; the digest is taken over the initialized tensors.
- a file path (relative paths resolve against the spec file's directory), loaded by name through
  the library's own loader (so timm resamples a ViT position embedding to ``input_size`` and converts
  original DINOv2 checkpoints), or by position with ``weights_keys = "by_order"``.
- ``"package:PKG/REL/PATH"``: a file shipped inside an installed Python package.
- ``"hub"``: the file the library would download, found in the local Hugging Face cache (or the
  torch-hub / open_clip URL cache); when it is absent, ``WeightsError`` says where it looked and how to
  fetch it, within seconds.

Files are located, hashed, read and loaded by position through ``weights.py``.
This is the only module that imports open_clip; it does so lazily, so stage two never pays for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from customkd_cache.data.views import INTERPOLATIONS
from customkd_cache.distributed import resolve_device
from customkd_cache.errors import TeacherError, WeightsError, closest, first_line
from customkd_cache.models.weights import (
    file_sha256,
    first_mismatch,
    load_state_dict_into,
    read_state_dict,
    resolve_weights_file,
)
from customkd_cache.specs import TeacherSpec

WeightsKind = Literal["random", "file", "package", "hub"]
ForwardFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]

# The safetensors files timm and open_clip look for on the Hugging Face Hub before these defaults.
_SAFE_ALTERNATIVES = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


@dataclass(frozen=True)
class Preprocess:
    """How the teacher expects its input, as resolved from the model itself.

    ``input_size`` is the square side fed to the network; ``mean``/``std`` normalize [0, 1] RGB;
    ``interpolation`` is a ``views.INTERPOLATIONS`` name; ``crop_pct`` is the library's own eval
    crop, recorded for provenance only (the views module decides every crop).
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    def to_json(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }


@dataclass(eq=False)
class Teacher:
    """A frozen backbone: ``module`` is in eval mode with ``requires_grad`` off.

    ``weights_digest`` is the sha256 of the weights file bytes, or for ``weights = "random"`` of the
    initialized state dict (names, dtypes, shapes and bytes, in order). ``weights_source`` is where
    the weights came from: a file path, ``hf-hub:<repo>/<file>``, ``url-cache:<url>`` or
    ``random-init(seed=N)``; it is provenance, not identity (the same bytes elsewhere are the same
    teacher). ``forward_fn(module, x)`` computes the feature kind; ``feature_dim`` was measured
    with one forward pass at build time.
    """

    spec: TeacherSpec
    module: torch.nn.Module
    preprocess: Preprocess
    feature_dim: int
    weights_digest: str
    weights_source: str
    forward_fn: ForwardFn = field(repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    spec_dir: Path | None = field(default=None, repr=False)
    channels_last: bool = False  # a convolutional network: run in channels-last memory format
    precision: str = "fp32"  # what ``spec.precision`` resolved to (``resolve_precision``)

    def identity(self) -> dict[str, Any]:
        """Everything that changes the features, as JSON-able data (no absolute paths)."""
        s = self.spec
        return {
            "source": s.source,
            "name": s.name,
            "pretrained": s.pretrained,
            "weights": weights_kind(s.weights),
            "weights_keys": s.weights_keys,
            "weights_digest": self.weights_digest,
            "input_size": s.input_size,
            "feature": s.feature,
            "precision": self.precision,
            "preprocess": self.preprocess.to_json(),
            "feature_dim": self.feature_dim,
            # Only when not the default, so the fingerprints of stores made before it existed hold.
            **({"pos_embed_antialias": False} if not s.pos_embed_antialias else {}),
        }

    def to(self, device: torch.device | str) -> Teacher:
        """Move the module to ``device`` (in place) and return this teacher.

        The precision stays the one resolved at build time (the identity must not change under a
        store being written); build the teacher on its device instead when that matters.
        """
        self.module.to(device)
        self.device = torch.device(device)
        return self

    @torch.inference_mode()
    def features(self, x: torch.Tensor, *, precision: str | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` normalized float32 images -> ``(B, feature_dim) float32`` on ``self.device``.

        Computed in ``self.precision`` (``precision``: another resolved precision, e.g. ``"fp32"``
        for the reference stage one compares bf16 with; the weights are float32 in every precision).
        """
        x = x.to(device=self.device, dtype=torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision_context(precision or self.precision, self.device):
            return self.forward_fn(self.module, x).float()


def check_teacher_name(spec: TeacherSpec) -> None:
    """Raise ``TeacherError`` (naming the closest valid name) when timm or open_clip has no model
    ``spec.name`` (or no such pretrained tag); builds nothing."""
    if spec.source == "timm":
        _check_timm_name(spec.name)
    else:
        _check_open_clip_name(spec)


def create_teacher(
    spec: TeacherSpec, *, spec_dir: Path | None = None, device: str | torch.device = "cpu"
) -> Teacher:
    """Build the teacher ``spec`` names, load its weights and move it to ``device``.

    Raises ``TeacherError`` for an unknown model or a feature kind the model cannot give, and
    ``WeightsError`` for weights that are missing or do not fit the model. Weights are located
    before the model is built, so a missing file fails in seconds.
    """
    _hub_offline()
    target = device if isinstance(device, torch.device) else resolve_device(device)
    check_teacher_name(spec)
    path, source = _locate_weights(spec, spec_dir)
    build = _build_timm if spec.source == "timm" else _build_open_clip
    with _seeded(spec.init_seed):
        module, preprocess, forward = build(spec, path)
    module.eval().requires_grad_(False)
    digest = file_sha256(path) if path is not None else state_digest(module)
    module.to(target)
    channels_last = is_convolutional(module)
    if channels_last:  # NHWC: about 1.5-2x the throughput of a CNN on a CPU, same features
        module.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    return Teacher(
        spec=spec,
        module=module,
        preprocess=preprocess,
        feature_dim=_probe_feature_dim(spec, module, preprocess, forward, device=target),
        weights_digest=digest,
        weights_source=source,
        forward_fn=forward,
        device=target,
        spec_dir=spec_dir,
        channels_last=channels_last,
        precision=resolve_precision(spec.precision, target, convolutional=channels_last),
    )


def is_convolutional(module: torch.nn.Module) -> bool:
    """Whether most of ``module``'s weights are in 2-d convolutions (a CNN, not a ViT whose only
    convolution is its patch embedding)."""
    conv = sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters())
    total = sum(p.numel() for p in module.parameters())
    return total > 0 and conv > total / 2


def resolve_precision(asked: str, device: torch.device, *, convolutional: bool) -> str:
    """``teacher.precision`` -> the precision the teacher runs in (and its identity records).

    - ``fp32``: float32, TF32 off (on CUDA both TF32 switches are turned off around each forward, so a
      process-wide ``torch.set_float32_matmul_precision`` does not change the features).
    - ``tf32``: float32 with TF32 matmuls and convolutions, on a CUDA GPU that has TF32 (compute
      capability 8 or later); anywhere else it computes fp32 and resolves to ``fp32``.
    - ``bf16``: ``bf16-autocast`` on every device (the CPU included): float32 weights, matmuls,
      convolutions and attention in bfloat16 under ``torch.autocast``, norms and softmax in float32.
    - ``auto``: ``bf16-autocast`` for a transformer (a teacher whose weights are mostly not in
      convolutions: ViT, DeiT, EVA, CLIP's ViT) on a CUDA GPU with native bf16 (compute capability 8
      or later), ``fp32`` otherwise: the CPU, CNNs and older GPUs keep float32.
    """
    if asked == "bf16":
        return "bf16-autocast"
    if asked == "fp32":
        return "fp32"
    modern = device.type == "cuda" and _cuda_major(device) >= 8
    if asked == "tf32":
        return "tf32" if modern else "fp32"
    if asked == "auto" and modern and not convolutional:
        return "bf16-autocast"
    return "fp32"


def _cuda_major(device: torch.device) -> int:
    """The compute capability's major number of a CUDA ``device`` (ROCm: 8, bf16 everywhere)."""
    if torch.version.hip:
        return 8
    return int(torch.cuda.get_device_properties(device).major)


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed forward pass in the resolved ``precision`` on ``device``: bf16 autocast for
    ``bf16-autocast``; on CUDA, TF32 on for ``tf32`` and off otherwise, restored on exit."""
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(_tf32(precision == "tf32"))
        if precision == "bf16-autocast":
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        yield


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuBLAS matmuls and cuDNN convolutions on or off, restored on exit (PyTorch's
    ``fp32_precision`` switches where they exist; ``allow_tf32`` before them: the two must not mix)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "conv"):
        switches: list[tuple[Any, str, Any]] = [
            (matmul, "fp32_precision", "tf32" if enabled else "ieee"),
            (conv.conv, "fp32_precision", "tf32" if enabled else "ieee"),
        ]
    else:
        switches = [(matmul, "allow_tf32", enabled), (conv, "allow_tf32", enabled)]
    before = [getattr(obj, name) for obj, name, _ in switches]
    try:
        for obj, name, value in switches:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(switches, before, strict=True):
            setattr(obj, name, value)


def fidelity_cosine(teacher: Teacher, x: torch.Tensor, *, batch_size: int = 64) -> dict[str, float]:
    """``{"mean", "min"}`` over the rows of ``x`` of the cosine between this teacher's features and
    its features in fp32 (the same float32 weights, run without autocast or TF32), ``batch_size``
    rows a pass.

    Both 1.0 for an fp32 teacher; stage one records them so a reader can see what bf16 cost.
    """
    if teacher.precision == "fp32":
        return {"mean": 1.0, "min": 1.0}
    chunks = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    a = torch.cat([teacher.features(c).cpu() for c in chunks]).double()
    b = torch.cat([teacher.features(c, precision="fp32").cpu() for c in chunks]).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).clamp(-1.0, 1.0)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def weights_kind(weights: str) -> WeightsKind:
    """``teacher.weights`` -> ``random``, ``hub``, ``package`` or ``file``."""
    if weights in ("random", "hub"):
        return weights  # type: ignore[return-value]
    return "package" if weights.startswith("package:") else "file"


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over the state dict: each name, dtype, shape and the raw bytes, in order."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- locating weights ------------------------------------------------------------------------


def _locate_weights(spec: TeacherSpec, spec_dir: Path | None) -> tuple[Path | None, str]:
    """The weights file (``None`` for random init) and its ``weights_source`` string."""
    kind = weights_kind(spec.weights)
    if kind == "random":
        return None, f"random-init(seed={spec.init_seed})"
    if kind == "hub":
        return _timm_hub_file(spec.name) if spec.source == "timm" else _open_clip_hub_file(spec)
    path = resolve_weights_file(
        spec.weights, spec_dir, field="teacher.weights", hint="or use teacher.weights = 'hub' or 'random'"
    )
    return path, str(path)


def _timm_hub_file(name: str) -> tuple[Path, str]:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    repo = (cfg.hf_hub_id or "") if cfg is not None else ""
    url = cfg.url if cfg is not None and isinstance(cfg.url, str) else ""
    if not repo and not url:
        raise TeacherError(
            f"teacher.name = {name!r}: timm has no pretrained weights for it; "
            "set teacher.weights = PATH to a local file, or 'random'"
        )
    filename = (cfg.hf_hub_filename if cfg is not None else None) or "pytorch_model.bin"
    # timm's own URL downloads land in torch hub's checkpoint directory.
    url_cache = Path(torch.hub.get_dir()) / "checkpoints"
    return _find_cached(name, repo, _hub_candidates(filename), url, url_cache)


def _open_clip_hub_file(spec: TeacherSpec) -> tuple[Path, str]:
    cfg = _open_clip_tag_cfg(spec)
    if not cfg:
        raise TeacherError(
            f"teacher.weights = 'hub' for open_clip model {spec.name!r} needs teacher.pretrained = TAG; "
            f"tags: {', '.join(_open_clip_tags(spec.name)) or '(none)'}"
        )
    hub = str(cfg.get("hf_hub", ""))
    # open_clip writes 'org/repo/' for the default file name and 'org/repo/file' otherwise.
    repo, filename = os.path.split(hub) if hub else ("", "")
    files = _hub_candidates(filename or "open_clip_pytorch_model.bin")
    # open_clip's own URL downloads land in ~/.cache/clip.
    url_cache = Path("~/.cache/clip").expanduser()
    return _find_cached(f"{spec.name}/{spec.pretrained}", repo, files, str(cfg.get("url", "")), url_cache)


def _hub_candidates(filename: str) -> tuple[str, ...]:
    """``filename`` preceded by the safetensors alternative that timm and open_clip try first."""
    safe = _SAFE_ALTERNATIVES.get(filename)
    if safe is None and filename.endswith((".bin", ".pth")):
        safe = filename[:-4] + ".safetensors"
    return (safe, filename) if safe else (filename,)


def _find_cached(what: str, repo: str, files: tuple[str, ...], url: str, url_cache: Path) -> tuple[Path, str]:
    """The first cached copy of ``repo``'s ``files`` in the Hugging Face cache, else of ``url``."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = _hf_cache_dir()
    repo_id, _, revision = repo.partition("@")
    for filename in files if repo_id else ():
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision or None)
        if isinstance(hit, str):
            return Path(hit), f"hf-hub:{repo_id}/{filename}"
    if url:
        cached = url_cache / os.path.basename(url)
        if cached.is_file():
            return cached, f"url-cache:{url}"
    looked = f"{repo_id}/{{{','.join(files)}}} in the Hugging Face cache {cache_dir}" if repo_id else ""
    if url:
        looked += f"{' and ' if looked else ''}{os.path.basename(url)} in {url_cache}"
    fetch = f"`hf download {repo_id} {files[0]}` (older huggingface_hub: huggingface-cli download)"
    raise WeightsError(
        f"teacher.weights = 'hub': weights for {what} are not cached on this machine (looked for {looked}); "
        f"download them on a connected machine with {fetch if repo_id else url} and copy the cache here, "
        "or set teacher.weights = PATH to a local weights file"
    )


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hub_offline() -> None:
    """Keep timm/open_clip hub code off the network unless the user chose otherwise.

    Weights are always located locally here; this guards the library code paths that still reach
    for the hub (e.g. an open_clip Hugging Face text tower's config), which otherwise retry for ~50 s
    before failing. huggingface_hub reads the variable at import, so its constant is set too.
    """
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True


# --- timm --------------------------------------------------------------------------------------


def _check_timm_name(name: str) -> None:
    import timm
    import timm.models

    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        raise TeacherError(
            f"teacher.name = {name!r}: not a timm model{closest(arch, timm.list_models())}; "
            f"list names with timm.list_models('*{arch.split('_')[0]}*')"
        )
    if tag:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            raise TeacherError(
                f"teacher.name = {name!r}: timm has no tag '{tag}' for {arch}{closest(tag, tags)}; "
                f"tags: {', '.join(tags) or '(none)'}"
            ) from None


def _build_timm(spec: TeacherSpec, path: Path | None) -> tuple[torch.nn.Module, Preprocess, ForwardFn]:
    import timm
    import timm.data
    import timm.models

    cfg = timm.models.get_pretrained_cfg(spec.name)
    kwargs: dict[str, Any] = {}
    # Fixed-size models (ViTs) get the position embedding for input_size; timm resamples
    # pretrained ones on load (DINOv2 ships at 518). Other models take any size as they are.
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = spec.input_size
    classifiers = _timm_classifiers(cfg)
    try:
        if path is None:
            model = timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs)
        elif spec.weights_keys == "by_order":
            model = timm.create_model(spec.name, pretrained=False, **kwargs)
            optional = tuple(f"{c}.{p}" for c in classifiers for p in ("weight", "bias"))
            state = read_state_dict(path, field="teacher.weights")
            load_state_dict_into(model, state, by="by_order", source=_source(path), optional_keys=optional)
            model.reset_classifier(0)  # type: ignore[operator]
        else:
            model = _timm_from_file(spec.name, path, classifiers, kwargs, antialias=spec.pos_embed_antialias)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        raise TeacherError(
            f"teacher.name = {spec.name!r} has a fixed input size that cannot be changed; "
            f"set teacher.input_size = {cfg.input_size[-1] if cfg else '(its native size)'}"
        ) from None
    forward = _timm_forward(model, spec)
    data = timm.data.resolve_model_data_config(model)
    preprocess = _preprocess(
        spec, data["mean"], data["std"], str(data["interpolation"]), float(data["crop_pct"])
    )
    return model, preprocess, forward


def _timm_classifiers(cfg: Any) -> tuple[str, ...]:
    names = cfg.classifier if cfg is not None else None
    if not names:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def _timm_from_file(
    name: str, path: Path, classifiers: tuple[str, ...], kwargs: dict[str, Any], *, antialias: bool = True
) -> torch.nn.Module:
    """timm's own loader (checkpoint conversion, position-embedding resampling), kept strict.

    timm loads non-strictly whenever the model's class count differs from the pretrained config's,
    which would leave misnamed tensors silently random. So the model is built with the class count
    the file has (0 when it has no classifier), which keeps the load strict, and the classifier is
    dropped afterwards. timm's loader resizes a ViT position grid bicubic *with* antialiasing; with
    ``antialias=False`` the grid is resized here first, plain bicubic (what Hugging Face Dinov2Model
    does at run time), and timm's loader then finds it at the right size.
    """
    import timm

    state = read_state_dict(path, mmap=True, field="teacher.weights")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    num_classes = next((shapes[f"{c}.weight"][0] for c in classifiers if f"{c}.weight" in shapes), 0)
    overlay: dict[str, Any] = {"file": str(path), "num_classes": num_classes}
    if not antialias:
        overlay = {"state_dict": _plain_resized_pos_embed(state, int(kwargs.get("img_size", 0)), path)}
        overlay["num_classes"] = num_classes
    try:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
        )
    except RuntimeError as e:
        raise WeightsError(
            f"{_source(path)} does not fit timm model {name}: {first_mismatch(e)} "
            "(use weights_keys = 'by_order' if only the names differ)"
        ) from None
    cfg_used = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg_used, dict):
        cfg_used.pop("state_dict", None)  # do not keep a second copy of the weights
    model.reset_classifier(0)  # type: ignore[operator]
    return model


def _plain_resized_pos_embed(
    state: dict[str, torch.Tensor], img_size: int, path: Path
) -> dict[str, torch.Tensor]:
    """``state`` with its ViT ``pos_embed`` grid resized to ``img_size`` bicubic without antialiasing.

    The class (and other prefix) positions are kept as they are; a grid already at the size is
    returned untouched. Raises ``TeacherError`` for weights that are not a ViT with a square grid.
    """
    import math

    from timm.layers import resample_abs_pos_embed

    pos, conv = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if pos is None or conv is None or pos.ndim != 3 or conv.ndim != 4 or img_size <= 0:
        raise TeacherError(
            f"teacher.pos_embed_antialias = false: {_source(path)} has no ViT 'pos_embed' and "
            "'patch_embed.proj.weight' (or the model has no fixed input size); set it to true"
        )
    tokens = int(pos.shape[1])
    old = next(
        (s for s in (math.isqrt(tokens - 1), math.isqrt(tokens)) if s > 0 and tokens - s * s in (0, 1)), 0
    )
    new = img_size // int(conv.shape[-1])
    if old == 0:
        raise TeacherError(
            f"teacher.pos_embed_antialias = false: {_source(path)} pos_embed has {tokens} tokens, not a "
            "square grid (plus a class position); set it to true"
        )
    if old == new:
        return state
    resized = resample_abs_pos_embed(
        pos.float(),
        new_size=[new, new],
        old_size=[old, old],
        num_prefix_tokens=tokens - old * old,
        interpolation="bicubic",
        antialias=False,
    )
    return {**state, "pos_embed": resized.to(pos.dtype)}


def _timm_forward(model: torch.nn.Module, spec: TeacherSpec) -> ForwardFn:
    if spec.feature == "pooled":
        return _pooled
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 0) < 1:
        raise TeacherError(
            f"teacher.feature = {spec.feature!r}: timm model {spec.name} has no class token; "
            "use feature = 'pooled'"
        )
    return _cls if spec.feature == "cls" else _cls_mean_patch


def _cls(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final-normed class token, ``forward_features(x)[:, 0]``."""
    return model.forward_features(x)[:, 0]  # type: ignore[operator]


def _cls_mean_patch(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[cls, mean of the patch tokens]``, skipping class and register tokens: ``(B, 2 * width)``."""
    tokens = model.forward_features(x)  # type: ignore[operator]
    patches = tokens[:, int(model.num_prefix_tokens) :]  # type: ignore[arg-type]
    return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=1)


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own pooled pre-logits feature, ``forward_head(forward_features(x), pre_logits=True)``."""
    return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]


# --- open_clip ---------------------------------------------------------------------------------


def _check_open_clip_name(spec: TeacherSpec) -> None:
    import open_clip

    models = open_clip.list_models()
    if spec.name not in models:
        raise TeacherError(
            f"teacher.name = {spec.name!r}: not an open_clip model{closest(spec.name, models)}; "
            "list names with open_clip.list_models()"
        )
    if spec.pretrained and not _open_clip_tag_cfg(spec):
        tags = _open_clip_tags(spec.name)
        raise TeacherError(
            f"teacher.pretrained = {spec.pretrained!r}: not an open_clip tag for {spec.name}"
            f"{closest(spec.pretrained, tags)}; tags: {', '.join(tags) or '(none)'}"
        )


def _open_clip_tag_cfg(spec: TeacherSpec) -> dict[str, Any]:
    import open_clip

    return dict(open_clip.get_pretrained_cfg(spec.name, spec.pretrained)) if spec.pretrained else {}


def _open_clip_tags(name: str) -> list[str]:
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(name))


def _build_open_clip(spec: TeacherSpec, path: Path | None) -> tuple[torch.nn.Module, Preprocess, ForwardFn]:
    """The full CLIP model (its weights file describes both towers); features use the image tower.

    A pretrained tag supplies its preprocessing and QuickGELU setting even when the weights come
    from a file, as open_clip does when it loads the tag itself. The image tower is built for
    ``spec.input_size`` (open_clip resizes a checkpoint's position embedding on load), so a model
    native to another size, e.g. ViT-L-14-336, runs at 336 only with ``teacher.input_size = 336``.
    """
    import open_clip

    tag = _open_clip_tag_cfg(spec)
    preprocess_cfg = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    by_name = path is not None and spec.weights_keys == "by_name"
    try:
        model = open_clip.create_model(
            spec.name,
            pretrained=str(path) if by_name else None,
            force_quick_gelu=bool(tag.get("quick_gelu", False)),
            force_image_size=spec.input_size,
            force_preprocess_cfg=preprocess_cfg or None,
            pretrained_image=False,
            pretrained_text=False,
        )
    except RuntimeError as e:
        if not by_name:
            raise
        raise WeightsError(
            f"{_source(path)} does not fit open_clip model {spec.name}: {first_mismatch(e)} "
            "(use weights_keys = 'by_order' if only the names differ)"
        ) from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        if not by_name:
            raise
        # open_clip reads the file with torch.load(weights_only=True): a pickle that would run code,
        # or one that is cut short, is refused there.
        raise WeightsError(
            f"teacher.weights: cannot read weights file {path} ({first_line(e)}); give a torch.save "
            "state dict (.pth/.pt/.bin) or a .safetensors file"
        ) from None
    if path is not None and not by_name:
        state = read_state_dict(path, field="teacher.weights")
        load_state_dict_into(model, state, by="by_order", source=_source(path), optional_keys=())
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    side = int(size if isinstance(size, int) else size[-1])
    if side != spec.input_size:
        raise TeacherError(f"open_clip model {spec.name} runs at {side}px; set teacher.input_size = {side}")
    # open_clip resizes the short side to the input size and centre-crops it whole: crop_pct 1.0.
    return model, _preprocess(spec, cfg["mean"], cfg["std"], str(cfg["interpolation"]), 1.0), _embed


def _embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``encode_image(x)``: the projected image embedding, *not* L2-normalized (CLIP normalizes it
    only inside its logits)."""
    out = model.encode_image(x)  # type: ignore[operator]
    # CoCa returns (pooled, tokens) from its image tower when it keeps the tokens.
    return out[0] if isinstance(out, tuple) else out


# --- shared ------------------------------------------------------------------------------------


def _preprocess(spec: TeacherSpec, mean: Any, std: Any, interpolation: str, crop_pct: float) -> Preprocess:
    if interpolation not in INTERPOLATIONS:
        raise TeacherError(
            f"{spec.source} model {spec.name} asks for {interpolation!r} interpolation; "
            f"supported: {', '.join(INTERPOLATIONS)}"
        )
    m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(m) != 3 or len(s) != 3:
        raise TeacherError(
            f"{spec.source} model {spec.name} is not an RGB model (mean {m}); pick an RGB teacher"
        )
    return Preprocess(spec.input_size, (m[0], m[1], m[2]), (s[0], s[1], s[2]), interpolation, crop_pct)


@torch.inference_mode()
def _probe_feature_dim(
    spec: TeacherSpec,
    module: torch.nn.Module,
    preprocess: Preprocess,
    forward: ForwardFn,
    *,
    device: torch.device,
) -> int:
    """Run one zero image through the network: the feature size, and an early check of its shape."""
    size = preprocess.input_size
    out = forward(module, torch.zeros(1, 3, size, size, device=device))
    if out.ndim != 2 or out.shape[0] != 1:
        raise TeacherError(
            f"teacher.feature = {spec.feature!r} on {spec.name} gives shape "
            f"{tuple(out.shape)}, not one vector per image; use feature = 'pooled'"
        )
    return int(out.shape[1])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for a build without disturbing the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _source(path: Path | None) -> str:
    """How load errors name a teacher weights file: the spec field and the absolute path."""
    return f"teacher.weights file {path}"
