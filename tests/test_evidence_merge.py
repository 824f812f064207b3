"""The teacher-scaling study merges runs of separate seeds into one report (evidence/teacher_scaling.py)."""

import json
from pathlib import Path

from evidence.teacher_scaling import merge


def _part(seeds_planned: list[int], seeds_run: list[int]) -> dict:
    runs = [{"method": "kd", "seed": s, "student_accuracy": 0.5 + s / 100} for s in seeds_run]
    return {
        "plan": {"unlabeled": 10, "test": 10, "views": 2, "seeds": seeds_planned, "epochs": 1},
        "student_only": [{"method": "student_only", "seed": s, "student_accuracy": 0.4} for s in seeds_run],
        "teachers": {"T": {"cache": {}, "runs": {"kd": runs, "customkd": runs}}},
        "command": f"part {seeds_planned}",
        "minutes": 1.0,
    }


def test_merge_names_only_the_seeds_that_finished(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_part([0, 1, 2], [0])))  # interrupted after seed 0
    b.write_text(json.dumps(_part([1, 2], [1, 2])))
    out = merge([a, b])
    assert out["plan"]["seeds"] == [0, 1, 2]
    assert [r["seed"] for r in out["teachers"]["T"]["runs"]["kd"]] == [0, 1, 2]
    assert out["part_commands"] == ["part [0, 1, 2]", "part [1, 2]"]
