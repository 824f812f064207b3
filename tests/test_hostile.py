"""Nothing is written through a link planted in a shared run, sweep or output folder.

Anyone who can write to a shared folder can plant a symbolic link where a command is about to write
(``metrics.jsonl -> ~victim/.bashrc``). For every path a command writes in such a folder, a link to a
victim file is planted there; after the command the victim is unchanged, and the command either
worked (the link replaced by the real file) or exited 2 with one line naming the link.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from customkd_cache import files
from customkd_cache.specs import load_cache_spec, load_train_spec
from customkd_cache.stage_one import extract
from customkd_cache.stage_two import train as train_module
from customkd_cache.testing import fakedata

REPO = Path(__file__).resolve().parents[1]
CACHE_SPEC = REPO / "cache_specs" / "smoke" / "officehome.toml"
TRAIN_SPEC = REPO / "pipelines" / "smoke" / "officehome.toml"
VICTIM = b"precious line\n" * 500


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[dict[str, Any]]:
    """A dataset, its smoke cache, a run killed after epoch 1 of 2 and a finished run."""
    base = tmp_path_factory.mktemp("hostile")
    root = fakedata.write_officehome(base / "OfficeHome", per_class=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("CUSTOMKD_CACHE_ROOT", str(base / "caches"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        mp.delenv(key, raising=False)
    sets = [f"dataset.root={root}", "optim.epochs=2", "probe.epochs=5", "method=kd", "run.threads=1"]
    extract.run_cache(
        load_cache_spec(CACHE_SPEC, sets[:1]), spec_path=CACHE_SPEC, shard=extract.Shard(), progress=False
    )
    spec = load_train_spec(TRAIN_SPEC, sets)
    one_epoch = train_module.train_one_epoch

    def killed_after_epoch_0(run: Any, epoch: int, *args: Any) -> None:
        if epoch > 0:
            raise Killed
        one_epoch(run, epoch, *args)

    mp.setattr(train_module, "train_one_epoch", killed_after_epoch_0)
    with pytest.raises(Killed):
        train_module.run_train(spec, spec_path=TRAIN_SPEC, out=base / "killed")
    mp.setattr(train_module, "train_one_epoch", one_epoch)
    finished = load_train_spec(TRAIN_SPEC, [*sets, "optim.epochs=1"])
    train_module.run_train(finished, spec_path=TRAIN_SPEC, out=base / "finished")
    yield {"base": base, "root": root, "sets": sets, "killed": base / "killed", "finished": base / "finished"}
    mp.undo()


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim" / "bashrc"
    path.parent.mkdir()
    path.write_bytes(VICTIM)
    return path


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the CLI in this process: (exit status, stderr); stdout is kept in ``cli.stdout``."""
    from customkd_cache.cli import main

    monkeypatch.setattr(sys, "argv", ["customkd-cache", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    cli.stdout = captured.out  # type: ignore[attr-defined]
    progress = re.compile(r"^(device: |(\S+: )?epoch \d+/\d+: )")  # what train prints as it goes
    return code, "".join(line for line in captured.err.splitlines(True) if not progress.match(line))


def train_args(world: dict[str, Any], out: Path, *extra: str) -> list[str]:
    sets = [x for s in world["sets"] for x in ("--set", s)]
    return ["train", "--spec", str(TRAIN_SPEC), *sets, "--out", str(out), *extra]


def plant(at: Path, victim: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.unlink(missing_ok=True)
    at.symlink_to(victim)


def links_below(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_symlink())


# Every path `train` writes in its run directory (old temporary names included: a link there must
# not matter either).
TRAIN_PATHS = [
    "metrics.jsonl",
    "results.json",
    "results.json.tmp",
    "spec.json",
    "spec.json.tmp",
    "caches.json.tmp",
    "checkpoints/last.pt",
    "checkpoints/last.tmp",
    "student_best.pth",
    "student_last.pth",
    ".student_last.pth.tmp-1",
]


@pytest.mark.parametrize("name", TRAIN_PATHS)
def test_train_resume_refuses_a_run_dir_with_a_planted_link(
    name: str,
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["killed"], run)
    plant(run / name, victim)
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--resume"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert name in err and "symbolic link" in err, err
    assert victim.read_bytes() == VICTIM


def test_train_resume_refuses_a_planted_checkpoints_folder(
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["killed"], run)
    shutil.copy(run / "checkpoints" / "last.pt", victim.parent / "last.pt")
    before = (victim.parent / "last.pt").read_bytes()
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(victim.parent)
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--resume"))
    assert code == 2 and "checkpoints" in err and "symbolic link" in err, err
    assert victim.read_bytes() == VICTIM and (victim.parent / "last.pt").read_bytes() == before


def test_links_planted_after_the_check_are_replaced_never_written_through(
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The second line of defence: with the run-directory check switched off (a link planted in the
    window between the check and the write), every write still replaces the link."""
    run = tmp_path / "run"
    shutil.copytree(world["killed"], run)
    for name in ["metrics.jsonl", "results.json", "caches.json", "student_last.pth", "student_best.pth"]:
        plant(run / name, victim)
    plant(run / "checkpoints" / "last.tmp", victim)
    monkeypatch.setattr(files, "check_no_links", lambda *a, **k: None)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("customkd_cache.") and hasattr(
            module, "check_no_links"
        ):
            monkeypatch.setattr(module, "check_no_links", lambda *a, **k: None)
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--resume"))
    assert victim.read_bytes() == VICTIM
    assert code == 0, err
    written = ["metrics.jsonl", "results.json", "caches.json", "student_last.pth", "checkpoints/last.pt"]
    assert not any((run / name).is_symlink() for name in written)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "results.json").read_text())["epochs"] == 2


def test_appending_to_metrics_refuses_a_link(tmp_path: Path, victim: Path) -> None:
    plant(tmp_path / "metrics.jsonl", victim)
    with pytest.raises(files.OutputError, match="metrics.jsonl is a symbolic link"):
        files.append_line(tmp_path / "metrics.jsonl", "{}")
    assert victim.read_bytes() == VICTIM


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["killed"], run)
    before = (run / "checkpoints" / "last.pt").read_bytes()

    def enospc(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1 vs 0")

    monkeypatch.setattr(torch, "save", enospc)
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--resume"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot write" in err and ("last.pt" in err or ".pth" in err), err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert [p.name for p in run.rglob("*") if p.name.endswith(".tmp")] == []


def test_train_out_under_a_file_is_refused_before_any_work(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setattr(train_module, "open_dataset", lambda *a, **k: pytest.fail("refused too late"))
    code, err = cli(monkeypatch, capsys, *train_args(world, afile / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "afile is a file, not a directory" in err, err


def test_a_refused_train_leaves_nothing_that_needs_resume(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store damaged after it was verified is refused while the run is prepared; the run
    directory is then still fresh, so the same command works once the store is repaired."""
    caches = tmp_path / "caches"
    shutil.copytree(world["base"] / "caches", caches)
    monkeypatch.setenv("CUSTOMKD_CACHE_ROOT", str(caches))
    chunk = next(p for p in sorted(caches.rglob("features/c/0/0/0")) if "/Art/" in str(p))
    good = chunk.read_bytes()
    chunk.write_bytes(bytes(b ^ 0xFF for b in good))
    run = tmp_path / "run"
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--set", "optim.epochs=1"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not run.exists() or list(run.iterdir()) == []
    chunk.write_bytes(good)
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--set", "optim.epochs=1"))
    assert code == 0, err


def test_resume_with_unreadable_metrics_is_one_line(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for damage in ("bytes", "directory"):
        run = tmp_path / damage
        shutil.copytree(world["killed"], run)
        (run / "metrics.jsonl").unlink()
        if damage == "bytes":
            (run / "metrics.jsonl").write_bytes(b"\x80\x04\x95\xff")
        else:
            (run / "metrics.jsonl").mkdir()
        code, err = cli(monkeypatch, capsys, *train_args(world, run, "--resume"))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "metrics.jsonl" in err, err


# --- forged or damaged checkpoints: refused before anything is written ---------------------------


def _first_tensor_key(sd: dict[str, Any]) -> str:
    return next(k for k, v in sd.items() if v.dim() >= 2)


def _wrong_shape(blob: dict[str, Any]) -> str:
    key = _first_tensor_key(blob["models"]["student"])
    t = blob["models"]["student"][key]
    blob["models"]["student"][key] = torch.zeros(t.shape[0] + 1, *t.shape[1:])
    return key


def _missing_key(blob: dict[str, Any]) -> str:
    key = _first_tensor_key(blob["models"]["student"])
    del blob["models"]["student"][key]
    return "missing"


def _unexpected_key(blob: dict[str, Any]) -> str:
    blob["models"]["student"]["planted.weight"] = torch.zeros(2)
    return "planted.weight"


def _optimizer_state_shape(blob: dict[str, Any]) -> str:
    state = blob["models"]["opt_b"]["state"]
    entry = next(v for v in state.values() if any(t.dim() > 0 for t in v.values()))
    key = next(k for k, t in entry.items() if t.dim() > 0)
    entry[key] = torch.zeros(3, 3, 3, 3, 3)
    return "models.opt_b"


def _optimizer_setting(blob: dict[str, Any]) -> str:
    blob["models"]["opt_b"]["param_groups"][0]["weight_decay"] = 7.0
    return "weight_decay"


def _set(key: str, value: Any, needle: str) -> Any:
    def change(blob: dict[str, Any]) -> str:
        blob["state"][key] = value
        return needle

    return change


# (name, change of the checkpoint -> a word the one error line holds)
CHECKPOINT_DAMAGE = [
    ("negative epoch", _set("epoch", -3, "state.epoch = -3")),
    ("epoch beyond the spec", _set("epoch", 999, "state.epoch = 999")),
    ("epoch as text", _set("epoch", "1", "state.epoch = '1'")),
    ("epoch as bool", _set("epoch", True, "state.epoch = True")),
    ("negative step", _set("step", -1, "state.step = -1")),
    ("history shorter than epoch", _set("history", [], "history holds 0 epoch(s)")),
    ("history of another epoch", _set("history", [{"epoch": 5}], "history[0] is epoch 5")),
    ("history not records", _set("history", "abc", "not a list of metrics records")),
    ("best accuracy above 1", _set("best_accuracy", 7.5, "best_accuracy = 7.5")),
    ("best epoch not in history", _set("best_epoch", 1, "state.best_epoch = 1")),
    ("best accuracy not in history", _set("best_accuracy", 0.125, "with accuracy 0.125")),
    ("unknown state field", _set("planted", 1, "unknown: ['planted']")),
    ("wrong tensor shape", _wrong_shape),
    ("missing tensor", _missing_key),
    ("unexpected tensor", _unexpected_key),
    ("optimizer state of another shape", _optimizer_state_shape),
    ("optimizer setting changed", _optimizer_setting),
]


@pytest.mark.parametrize("change", [c for _, c in CHECKPOINT_DAMAGE], ids=[n for n, _ in CHECKPOINT_DAMAGE])
def test_resume_refuses_a_checkpoint_that_does_not_fit_the_run(
    change: Any,
    world: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A forged or damaged ``last.pt`` (epoch, history, tensors) ends in one line naming the file and
    the fix; ``metrics.jsonl`` is left as it was and the run is not "finished"."""
    run = tmp_path / "run"
    shutil.copytree(world["killed"], run)
    ckpt = run / "checkpoints" / "last.pt"
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    needle = change(blob)
    torch.save(blob, ckpt)
    metrics = (run / "metrics.jsonl").read_bytes()
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--resume"))
    one_line(code, err, needle)
    assert f"remove {ckpt} to restart" in err, err
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert not (run / "results.json").exists()


@pytest.mark.parametrize("lines", ["", "{}\n", "not json\n", "changed"])
def test_resume_refuses_metrics_that_disagree_with_the_checkpoint(
    lines: str,
    world: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["killed"], run)
    metrics = run / "metrics.jsonl"
    if lines == "changed":
        record = json.loads(metrics.read_text().splitlines()[0])
        record["loss_total"] = record["loss_total"] + 1.0
        lines = json.dumps(record, sort_keys=True) + "\n"
    metrics.write_text(lines)
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--resume"))
    one_line(code, err, "metrics.jsonl")
    assert f"remove {run / 'checkpoints' / 'last.pt'} to restart" in err, err
    assert metrics.read_text() == lines
    assert not (run / "results.json").exists()


def test_resume_drops_only_the_lines_logged_after_the_checkpoint(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line logged after the last checkpoint (killed in between) is dropped; the run then ends as an
    uninterrupted one would, with one line per epoch."""
    run = tmp_path / "run"
    shutil.copytree(world["killed"], run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1, "loss_total": 0.5}\n')
    code, err = cli(monkeypatch, capsys, *train_args(world, run, "--resume"))
    assert code == 0, err
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


# --- sweep -------------------------------------------------------------------------------------


def sweep_args(world: dict[str, Any], out: Path) -> list[str]:
    sets = [x for s in world["sets"] if not s.startswith("seed") for x in ("--set", s)]
    return ["sweep", "--spec", str(TRAIN_SPEC), *sets, "--out", str(out), "--grid", "seed=0"]


def test_a_plain_sweep_rerun_never_writes_through_a_link_in_a_point(
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from customkd_cache.lab.sweep import plan_points

    out = tmp_path / "sweep"
    (planned,) = plan_points(
        spec_path=TRAIN_SPEC,
        out=out,
        grid=[("seed", [0])],
        overrides=world["sets"],
    )
    shutil.copytree(world["killed"], planned.point.run_dir)  # the same spec: a killed point
    plant(planned.point.run_dir / "metrics.jsonl", victim)
    code, err = cli(monkeypatch, capsys, *sweep_args(world, out))
    assert victim.read_bytes() == VICTIM
    assert code == 2 and "1 of 1 points failed" in err, err
    failed = json.loads((planned.point.run_dir / "failed.json").read_text())
    assert "metrics.jsonl -> " in failed["error"]


@pytest.mark.parametrize("name", ["sweep.json", ".sweep.json.tmp", "POINT"])
def test_sweep_refuses_or_replaces_links_in_its_folder(
    name: str,
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from customkd_cache.lab.sweep import plan_points

    out = tmp_path / "sweep"
    out.mkdir()
    (planned,) = plan_points(spec_path=TRAIN_SPEC, out=out, grid=[("seed", [0])], overrides=world["sets"])
    target = planned.point.run_dir if name == "POINT" else out / name
    if name == "POINT":
        target.symlink_to(victim.parent)
    else:
        plant(target, victim)

    def fake_train(spec: Any, *, spec_path: Path, out: Path, resume: bool = False) -> None:
        assert name == ".sweep.json.tmp", "a refused sweep must not train"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text('{"student_accuracy": 0.5}')

    monkeypatch.setattr(train_module, "run_train", fake_train)
    code, err = cli(monkeypatch, capsys, *sweep_args(world, out))
    assert victim.read_bytes() == VICTIM and sorted(p.name for p in victim.parent.iterdir()) == ["bashrc"]
    if name == ".sweep.json.tmp":  # the old fixed temporary name: no longer used, the sweep works
        assert code == 0 and not (out / "sweep.json").is_symlink(), err
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "symbolic link" in err + cli.stdout, err  # type: ignore[attr-defined]


def test_sweep_refuses_a_planted_claims_folder(
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / ".claims").symlink_to(victim.parent)
    code, err = cli(monkeypatch, capsys, *sweep_args(world, out))
    assert code == 2 and ".claims is a symbolic link" in err, err
    assert sorted(p.name for p in victim.parent.iterdir()) == ["bashrc"]


# --- labels, export, report --------------------------------------------------------------------


def test_labels_replace_links_never_write_through_them(
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shared = tmp_path / "shared"
    for name in (".labels.txt.tmp", "labels.txt"):
        plant(shared / name, victim)
    args = ["labels", "--spec", str(CACHE_SPEC), "--set", f"dataset.root={world['root']}"]
    code, err = cli(
        monkeypatch, capsys, *args, "--split", "Art", "--per-class", "1", "--out", str(shared / "labels.txt")
    )
    assert code == 0, err
    assert victim.read_bytes() == VICTIM
    assert (
        not (shared / "labels.txt").is_symlink()
        and len((shared / "labels.txt").read_text().splitlines()) == 65
    )


@pytest.mark.parametrize("name", ["export/export.json", "export/student.onnx", "export/.export.json.tmp"])
def test_export_replaces_links_never_writes_through_them(
    name: str,
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    shutil.copytree(world["finished"], run)
    plant(run / name, victim)
    code, err = cli(monkeypatch, capsys, "export", str(run), "--images", "4", "--runs", "1")
    assert victim.read_bytes() == VICTIM
    assert code == 0, err
    assert (
        not (run / "export" / "export.json").is_symlink()
        and not (run / "export" / "student.onnx").is_symlink()
    )


def test_export_refuses_a_planted_export_folder(
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["finished"], run)
    (run / "export").symlink_to(victim.parent)
    code, err = cli(monkeypatch, capsys, "export", str(run), "--images", "4", "--runs", "1")
    assert code == 2 and "export is a symbolic link" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in victim.parent.iterdir()) == ["bashrc"]


def test_report_out_replaces_links_never_writes_through_them(
    world: dict[str, Any],
    victim: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shared = tmp_path / "shared"
    for ext in (".md", ".json", ".png"):
        plant(shared / f"table{ext}", victim)
    code, err = cli(monkeypatch, capsys, "report", str(world["finished"]), "--out", str(shared / "table"))
    assert code == 0, err
    assert victim.read_bytes() == VICTIM
    assert links_below(shared) == [] and (shared / "table.png").read_bytes()[:4] == b"\x89PNG"


# --- malformed inputs: one line and exit 2, or it works ----------------------------------------


def one_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize(
    ("results", "needle"),
    [
        (b"\x80\x04K\x01.", "not valid JSON"),
        (b"{bad", "not valid JSON"),
        (b'{"student_accuracy": "abc"}', 'student_accuracy = "abc" is not a finite number'),
        (b'{"student_accuracy": [1]}', "student_accuracy = [1] is not a finite number"),
        (b'{"student_accuracy": NaN}', "student_accuracy = NaN is not a finite number"),
        (b'{"student_accuracy": true}', "student_accuracy = true is not a finite number"),
    ],
)
def test_report_on_a_malformed_results_json(
    results: bytes,
    needle: str,
    world: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good, bad = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    shutil.copytree(world["finished"], good)
    shutil.copytree(world["finished"], bad)
    (bad / "results.json").write_bytes(results)
    code, err = cli(monkeypatch, capsys, "report", str(tmp_path / "runs"))
    one_line(code, err, needle)
    assert "b/results.json" in err


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        (b"\xff\xfe{}\n", "not UTF-8 JSON lines"),
        (b'{"epoch": "x", "student_accuracy": 0.5}\n', 'line 1: epoch = "x" is not an epoch number'),
    ],
)
def test_report_on_a_malformed_metrics_jsonl(
    metrics: bytes,
    needle: str,
    world: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["finished"], run)
    (run / "metrics.jsonl").write_bytes(metrics)
    code, err = cli(monkeypatch, capsys, "report", str(run))
    one_line(code, err, needle)


def fake_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str = "") -> Path:
    """A finished 2-point sweep (seed=0,1) made with a stand-in for run_train."""
    from customkd_cache.errors import RunDirError
    from customkd_cache.lab.sweep import run_sweep
    from customkd_cache.specs import to_dict

    def fake_train(spec: Any, *, spec_path: Path, out: Path, resume: bool = False) -> None:
        if fail and spec.seed == 1:
            raise RunDirError(f"{out}: {fail}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(json.dumps(to_dict(spec)))
        (out / "results.json").write_text(json.dumps({"student_accuracy": 0.5 + spec.seed / 10}))

    monkeypatch.setattr(train_module, "run_train", fake_train)
    out = tmp_path / "sweep"
    run_sweep(spec_path=TRAIN_SPEC, out=out, grid=[("seed", [0, 1])], overrides=["dataset.root=/x"])
    return out


FAKE_SWEEP = ["--spec", str(TRAIN_SPEC), "--set", "dataset.root=/x", "--grid", "seed=0,1"]


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("entry", "point 'seed=0-"),
        ("directory", "sweep.json: is a directory"),
        ("failed", ""),
    ],
)
def test_sweep_and_report_on_a_damaged_sweep_folder(
    damage: str,
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = fake_sweep(tmp_path, monkeypatch)
    sweep_json = out / "sweep.json"
    if damage == "entry":
        data = json.loads(sweep_json.read_text())
        name = sorted(data["points"])[0]
        data["points"][name] = [1, 2]
        sweep_json.write_text(json.dumps(data))
    elif damage == "directory":
        sweep_json.unlink()
        sweep_json.mkdir()
    else:
        point = sorted(p for p in out.iterdir() if p.name.startswith("seed=0"))[0]
        (point / "results.json").unlink()
        (point / "failed.json").write_text("[1]")
    for command in ("sweep", "report"):
        args = [command, *FAKE_SWEEP, "--out", str(out)] if command == "sweep" else [command, str(out)]
        code, err = cli(monkeypatch, capsys, *args)
        if damage == "failed":  # a failed point with an unreadable record: named, the rest goes on
            assert "Traceback" not in err and code == (2 if command == "sweep" else 0), err
            assert command == "report" or "failed.json: not a failure record" in cli.stdout  # type: ignore[attr-defined]
        else:
            one_line(code, err, needle)


def test_a_damaged_results_json_is_not_counted_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = fake_sweep(tmp_path, monkeypatch)
    point = sorted(p for p in out.iterdir() if p.name.startswith("seed=1"))[0]
    (point / "results.json").write_bytes(b"\x80\x04K\x01.")
    code, err = cli(monkeypatch, capsys, "sweep", *FAKE_SWEEP, "--out", str(out))
    assert code == 2 and "1 of 2 points failed" in err, err
    assert "results.json: damaged" in cli.stdout and "--retry-failed" in cli.stdout  # type: ignore[attr-defined]
    code, err = cli(monkeypatch, capsys, "sweep", *FAKE_SWEEP, "--out", str(out), "--retry-failed")
    assert code == 0, err
    assert json.loads((point / "results.json").read_text()) == {"student_accuracy": 0.6}


def test_one_refused_point_does_not_stop_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from customkd_cache.lab.sweep import read_sweep

    out = fake_sweep(tmp_path, monkeypatch, fail="unreadable spec.json")
    points = read_sweep(out)["points"]
    assert sorted(p["status"] for p in points.values()) == ["done", "failed"]
    failed = next(p for p in points.values() if p["status"] == "failed")
    assert "unreadable spec.json" in failed["error"]
    code, err = cli(monkeypatch, capsys, "sweep", *FAKE_SWEEP, "--out", str(out))
    one_line(code, err, "1 of 2 points failed")


def test_sweep_refusals_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(train_module, "run_train", lambda *a, **k: pytest.fail("must not train"))
    afile = tmp_path / "afile"
    afile.write_text("")
    base = ["sweep", "--spec", str(TRAIN_SPEC), "--set", "dataset.root=/x"]
    cases = [
        (["--grid", "seed=0", "--out", str(afile)], {}, "afile is a file, not a directory"),
        (
            ["--grid", "student.weights=none/w.pth,''", "--out", str(tmp_path / "w")],
            {},
            "grid point student.weights=none/w.pth: student.weights = 'none/w.pth'",
        ),
        (["--grid", "seed=0", "--out", str(tmp_path / "r")], {"RANK": "abc"}, "RANK='abc'"),
        (["--grid", "seed=0", "--out", str(tmp_path / "r")], {"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        (["--grid", "seed=0", "--out", str(tmp_path / "r")], {"RANK": "5", "WORLD_SIZE": "2"}, "0 <= RANK"),
    ]
    for args, env, needle in cases:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            code, err = cli(monkeypatch, capsys, *base, *args)
        one_line(code, err, needle)
    assert not (tmp_path / "w").exists()


def test_cache_refuses_garbage_rank(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RANK", "abc")
    code, err = cli(monkeypatch, capsys, "cache", "--spec", str(CACHE_SPEC), "--dry-run")
    one_line(code, err, "RANK='abc'")


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RANK": "abc"}, "RANK='abc': not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0': the number of processes must be >= 1"),
        ({"WORLD_SIZE": "-2"}, "WORLD_SIZE='-2'"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK='2' with WORLD_SIZE='2': need 0 <= RANK < WORLD_SIZE"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1'"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x': not an integer"),
        ({"LOCAL_RANK": "3", "WORLD_SIZE": "2", "RANK": "1"}, "LOCAL_RANK='3' with WORLD_SIZE='2'"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 without MASTER_ADDR and MASTER_PORT"),
    ],
)
def test_train_refuses_garbage_rank_variables(
    env: dict[str, str],
    needle: str,
    world: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` that torchrun would never set: one line naming the
    variable and the fix, before anything is computed or written."""
    monkeypatch.setattr(train_module, "open_dataset", lambda *a, **k: pytest.fail("refused too late"))
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, err = cli(monkeypatch, capsys, *train_args(world, tmp_path / "run"))
    one_line(code, err, needle)
    assert "unset RANK, WORLD_SIZE and LOCAL_RANK to run as one process" in err, err
    assert not (tmp_path / "run").exists()


def test_a_point_name_over_255_bytes_is_shortened_with_its_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from customkd_cache.lab.sweep import run_sweep

    monkeypatch.setattr(train_module, "run_train", lambda *a, out, **k: out.mkdir(exist_ok=True))
    keys = "+".join(
        f"customkd.{k}"
        for k in ("lambda_gen", "lambda_task", "stage_a_lr", "stage_a_weight_decay", "target_bound_scale")
    )
    grid = [(keys, [0.123456789, 0.5]), ("optim.lr+customkd.stage_a_lr", [0.1234567890123])] * 1
    grid += [("optim.weight_decay+kd.temperature+probe.lr", [1.0])]
    points = run_sweep(spec_path=TRAIN_SPEC, out=tmp_path / "s", grid=grid, overrides=["dataset.root=/x"])
    names = [p.run_dir.name for p in points]
    assert len(set(names)) == 2 and all(len(n.encode()) <= 255 for n in names)
    assert all(p.run_dir.is_dir() for p in points)


def test_report_out_refusals(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, needle in (("", "give a file prefix"), ("/", "give a file prefix"), (f"{afile}/t", "is a file")):
        code, err = cli(monkeypatch, capsys, "report", str(world["finished"]), "--out", out)
        one_line(code, err, needle)


def test_export_refusals(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("code ran",))

    run = world["finished"]
    afile = tmp_path / "afile"
    afile.write_text("")
    cases: list[tuple[list[str], str]] = [
        ([str(run), "--images", "-60"], "--images -60"),
        ([str(run), "--runs", "0"], "--runs 0"),
        ([str(run), "--out", str(tmp_path)], "is a directory"),
        ([str(run), "--out", f"{afile}/m.onnx"], "afile is a file, not a directory"),
    ]
    for contents, needle in ((Evil(), "refused unloaded"), ([1, 2, 3], "not a state dict of tensors")):
        bad = tmp_path / f"bad{len(cases)}"
        shutil.copytree(run, bad)
        torch.save(contents, bad / "student_best.pth")
        cases.append(([str(bad)], needle))
    for args, needle in cases:
        code, err = cli(monkeypatch, capsys, "export", *args)
        one_line(code, err, needle)
        assert "code ran" not in cli.stdout  # type: ignore[attr-defined]


def test_labels_out_under_a_file(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    args = [
        "labels",
        "--spec",
        str(CACHE_SPEC),
        "--set",
        f"dataset.root={world['root']}",
        "--split",
        "Art",
        "--per-class",
        "1",
    ]
    code, err = cli(monkeypatch, capsys, *args, "--out", str(afile / "labels.txt"))
    one_line(code, err, "afile is a file, not a directory")


def test_a_wrong_labeled_list_never_echoes_lines_that_are_not_ids(tmp_path: Path) -> None:
    from customkd_cache.data import Sample, SplitManifest, labeled_indices
    from customkd_cache.errors import DatasetError

    split = SplitManifest("Art", tuple(Sample(f"Art/c{i}/0001.jpg", i, 10) for i in range(3)))
    shadow = ["root:$6$salt$hash:20228:0:99999:7:::", "daemon:*:20228:0:99999:7:::"]
    with pytest.raises(DatasetError) as info:
        labeled_indices(split, shadow)
    assert "root" not in str(info.value) and "daemon" not in str(info.value)
    assert "2 labeled id(s) not found (none of them looks like a sample id" in str(info.value)
    with pytest.raises(DatasetError, match="first: 'Art/c1/0002.jpg'"):
        labeled_indices(split, ["Art/c1/0002.jpg", *shadow])
