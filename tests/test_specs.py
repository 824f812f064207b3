"""Spec contracts: strict validation with one-line errors, --set overrides, path rules, shipped specs,
and cache identity (what changes the fingerprint and what does not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from customkd_cache import specs
from customkd_cache.catalog import canonical_json
from customkd_cache.errors import SpecError
from customkd_cache.stage_one.extract import Shard, plan_cache

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "cache_specs").rglob("*.toml")) + sorted((REPO / "pipelines").rglob("*.toml"))
MINIMAL = {"dataset": {"kind": "officehome"}, "teacher": {"name": "test_vit"}}


def test_shipped_specs_are_valid() -> None:
    assert len(SHIPPED) >= 20
    for path in SHIPPED:
        spec = specs.load_any_spec(path)
        if isinstance(spec, specs.TrainSpec) and spec.cache.spec:
            assert specs.spec_relative_path(spec.cache.spec, path).is_file(), path


def test_twelve_officehome_tasks() -> None:
    tasks = {
        (s.uda.source, s.uda.target)
        for s in map(specs.load_train_spec, (REPO / "pipelines/officehome").glob("*"))
        if s.uda is not None
    }
    assert len(tasks) == 12


class TestStrictness:
    def test_unknown_nested_key_names_path_and_suggestion(self) -> None:
        with pytest.raises(SpecError) as e:
            specs.validate(specs.CacheSpec, {**MINIMAL, "views": {"num_veiws": 3}}, "f.toml")
        msg = str(e.value)
        assert msg.startswith("f.toml: views.num_veiws: unknown key 'num_veiws' (did you mean 'num_views'?)")
        assert "\n" not in msg

    def test_wrong_type_names_field_and_value(self) -> None:
        with pytest.raises(SpecError, match=r"run\.batch_size: .*'many'"):
            specs.validate(specs.CacheSpec, {**MINIMAL, "run": {"batch_size": "many"}}, "f.toml")

    def test_closed_choice(self) -> None:
        with pytest.raises(SpecError, match="teacher.feature"):
            specs.validate(specs.CacheSpec, {**MINIMAL, "teacher": {"name": "x", "feature": "avg"}}, "f.toml")

    def test_frozen(self) -> None:
        spec = specs.validate(specs.CacheSpec, MINIMAL, "f.toml")
        with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
            spec.views.num_views = 3  # type: ignore[misc]

    def test_protocol_needs_its_section(self) -> None:
        data = {"protocol": "ssl", "dataset": {"kind": "cifar100"}, "cache": {"spec": "x.toml"}}
        with pytest.raises(SpecError, match=r"\[ssl\]"):
            specs.validate(specs.TrainSpec, data, "t.toml")


class TestOverrides:
    def test_values_parse_as_toml_and_bare_words_as_strings(self) -> None:
        out = specs.apply_overrides(
            MINIMAL, ["run.batch_size=8", "dataset.root=/a b/c", "views.scale=[0.5, 1.0]"]
        )
        assert out["run"]["batch_size"] == 8
        assert out["dataset"]["root"] == "/a b/c"
        assert out["views"]["scale"] == [0.5, 1.0]
        assert MINIMAL["dataset"] == {"kind": "officehome"}  # the input is not changed

    def test_overrides_are_validated_like_the_file(self) -> None:
        with pytest.raises(SpecError, match="teacher.nmae"):
            specs.validate(specs.CacheSpec, specs.apply_overrides(MINIMAL, ["teacher.nmae=x"]), "f.toml")

    @pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
    def test_no_infinite_or_nan_floats(self, value: str) -> None:
        with pytest.raises(SpecError, match="optim.lr"):
            specs.load_train_spec(REPO / "pipelines/smoke/officehome.toml", [f"optim.lr={value}"])

    @pytest.mark.parametrize(
        "item",
        [
            "seed=-1",
            f"seed={2**63}",
            f"seed={2**32}",
            "optim.batch_size=100000000",
            "customkd.stage_a_batch_size=100000000",
            "probe.batch_size=100000000",
        ],
    )
    def test_seeds_and_batch_sizes_are_bounded(self, item: str) -> None:
        """Out of range: one line naming the field, before anything is allocated or seeded."""
        with pytest.raises(SpecError, match=item.split("=")[0].replace(".", r"\.")):
            specs.load_train_spec(REPO / "pipelines/smoke/officehome.toml", [item])

    def test_malformed_override(self) -> None:
        with pytest.raises(SpecError, match="KEY=VALUE"):
            specs.apply_overrides(MINIMAL, ["run.batch_size"])


class TestPaths:
    def test_data_paths_resolve_against_data_root(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CUSTOMKD_DATA_ROOT", "/datasets")
        spec = specs.DatasetSpec(kind="officehome", root="oh")
        assert spec.resolved_root() == Path("/datasets/oh")
        assert specs.DatasetSpec(kind="officehome", root="/abs").resolved_root() == Path("/abs")

    def test_spec_paths_resolve_against_the_spec_file(self) -> None:
        assert specs.spec_relative_path("../c.toml", Path("/x/p/t.toml")) == Path("/x/p/../c.toml")


class TestCli:
    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "customkd_cache", *args], capture_output=True, text=True)

    def test_unknown_top_level_key_exits_2_with_one_line(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.toml"
        bad.write_text("surprise = 1\n" + (REPO / "cache_specs/smoke/officehome.toml").read_text())
        proc = self.run("check", str(bad))
        assert proc.returncode == 2
        assert (
            proc.stderr.strip().count("\n") == 0
            and "surprise" in proc.stderr
            and "Traceback" not in proc.stderr
        )

    def test_a_spec_that_is_not_utf8_exits_2_with_one_line(self, tmp_path: Path) -> None:
        bad = tmp_path / "latin1.toml"
        bad.write_bytes('method = "\u00e9"\n'.encode("latin-1"))
        proc = self.run("check", str(bad))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert (
            proc.stderr.strip().count("\n") == 0 and "latin1.toml" in proc.stderr and "UTF-8" in proc.stderr
        )

    def test_check_names_an_unknown_teacher(self) -> None:
        proc = self.run(
            "check", str(REPO / "cache_specs/smoke/officehome.toml"), "--set", "teacher.name=test_vitt"
        )
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
        assert "test_vitt" in proc.stderr and "did you mean" in proc.stderr

    def test_check_prints_the_resolved_spec(self) -> None:
        proc = self.run("check", str(REPO / "pipelines/smoke/officehome.toml"), "--set", "method=kd")
        assert (
            proc.returncode == 0 and '"method": "kd"' in proc.stdout and '"lambda_task": 1.0' in proc.stdout
        )

    def test_help_lists_the_commands(self) -> None:
        out = self.run("--help").stdout
        for command in ("cache", "train", "check", "info", "ls", "verify", "labels"):
            assert command in out


class TestFingerprint:
    def test_canonical_json_is_order_free(self) -> None:
        assert canonical_json({"b": 1, "a": [1.5, "é"]}) == canonical_json({"a": [1.5, "é"], "b": 1})

    def test_identity_ignores_run_settings_and_follows_values(self, officehome_root: Path) -> None:
        def fp(*overrides: str) -> str:
            base = [
                f"dataset.root={officehome_root}",
                "teacher.name=test_vit",
                "teacher.weights=random",
                "teacher.input_size=32",
            ]
            spec = specs.validate(specs.CacheSpec, specs.apply_overrides(MINIMAL, [*base, *overrides]), "f")
            return plan_cache(spec, spec_path=None, shard=Shard()).fingerprint

        ref = fp()
        assert fp("run.batch_size=3", "run.num_workers=0", "run.device=cpu") == ref
        for change in (
            "views.seed=1",
            "views.num_views=2",
            "store.dtype=float32",
            "teacher.init_seed=1",
            "teacher.feature=cls+mean_patch",
            "dataset.splits=['Art']",
            "teacher.input_size=48",
        ):
            assert fp(change) != ref, change


@pytest.mark.parametrize(
    "override",
    [
        "views.num_views=1000000000",
        "teacher.input_size=1000000",
        "teacher.input_size=4097",
        "store.unit_rows=0",
        "store.unit_rows=-5",
        "store.unit_rows=65537",
        "store.unit_rows=4611686018427387904",
        "store.unit_rows=1e9",
    ],
)
def test_absurd_sizes_are_refused_by_the_spec(override: str) -> None:
    with pytest.raises(SpecError) as info:
        specs.validate(specs.CacheSpec, specs.apply_overrides(MINIMAL, [override]), "x.toml")
    assert override.split("=")[0] in str(info.value) and "\n" not in str(info.value)
