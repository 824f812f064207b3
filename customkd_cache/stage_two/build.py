"""The student, the projectors its method needs and their optimizers; the learning-rate schedule and
the space of L_task's target."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from customkd_cache.errors import SpecError
from customkd_cache.models.customizer import Customizer, create_projector
from customkd_cache.models.students import Student, create_student
from customkd_cache.specs import TrainSpec
from customkd_cache.stage_two.losses import method_terms


@dataclass
class Models:
    student: Student
    student_projector: nn.Module | None  # P_s: d_s -> d_t (terms with gen)
    customizer: Customizer | None  # P_t: d_t -> d_s (terms with task)
    opt_b: torch.optim.Optimizer
    opt_a: torch.optim.Optimizer | None
    stage_a_head: nn.Module | None = None  # a separate teacher head (customkd.stage_a_head = separate)
    pre_activation: bool = False  # L_task in the student's pre-activation space (customkd.target_space)

    def _parts(self) -> dict[str, Any]:
        parts = {
            "student": self.student,
            "opt_b": self.opt_b,
            "student_projector": self.student_projector,
            "customizer": self.customizer,
            "opt_a": self.opt_a,
            "stage_a_head": self.stage_a_head,
        }
        return {k: v for k, v in parts.items() if v is not None}

    def modules(self) -> list[nn.Module]:
        """The student, projectors and separate stage-A head (the modules that train on the run's device)."""
        return [part for part in self._parts().values() if isinstance(part, nn.Module)]

    def to(self, device: torch.device) -> None:
        """Move every module in place (the optimizers keep their parameters); on CUDA the student's
        weights take the channels_last memory format (its inputs do too: ``stage_b.to_device``), which
        the GPU's convolution kernels run fastest in, under autocast above all."""
        for m in self.modules():
            m.to(device)
        if device.type == "cuda":
            self.student.to(memory_format=torch.channels_last)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self._parts().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self._parts().items():
            part.load_state_dict(state[name])


def build_models(spec: TrainSpec, *, spec_path: Path | None, num_classes: int, teacher_dim: int) -> Models:
    """The student and the projectors its method's terms need, with their optimizers.

    The student is created first from ``spec.seed``, so every method starts from the same student.
    """
    torch.manual_seed(spec.seed)
    student = create_student(
        spec.student, num_classes=num_classes, spec_dir=spec_path.parent if spec_path else None
    )
    terms, ck, o = method_terms(spec.method), spec.customkd, spec.optim
    ps = create_projector(student.feature_dim, teacher_dim, ck.projector) if "gen" in terms else None
    pt = (
        Customizer(create_projector(teacher_dim, student.feature_dim, ck.projector))
        if "task" in terms
        else None
    )
    params = list(student.parameters()) + (list(ps.parameters()) if ps is not None else [])
    opt_b = create_optimizer(o.optimizer, params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    opt_a, head_a = None, None
    if pt is not None:
        a_params = list(pt.parameters())
        if ck.stage_a_head == "separate":
            head_a = nn.Linear(student.feature_dim, num_classes)
            a_params += list(head_a.parameters())
        elif ck.head_learns_in_stage_a:
            a_params += list(student.head().parameters())
        opt_a = create_optimizer(
            ck.stage_a_optimizer,
            a_params,
            lr=ck.stage_a_lr,
            weight_decay=ck.stage_a_weight_decay,
            momentum=0.9,
        )
    pre = pt is not None and target_in_pre_activation(ck.target_space, student)
    return Models(student, ps, pt, opt_b, opt_a, head_a, pre)


def target_in_pre_activation(space: str, student: Student) -> bool:
    """Whether ``customkd.target_space`` puts L_task's target in the student's pre-activation space."""
    if space == "pre_activation" and not student.has_pre_activation:
        raise SpecError(
            f"customkd.target_space = 'pre_activation': student '{student.name}' has no activation after "
            "its pooled head (only MobileNetV3-style heads do); use 'auto' or 'features'"
        )
    return space != "features" and student.has_pre_activation


def to_feature_space(models: Models) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The map from the customizer's output to the student's head input (``None``: identity)."""
    return models.student.activate if models.pre_activation else None


def create_optimizer(
    kind: str, params: list[nn.Parameter], *, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """``adamw`` (decoupled weight decay) or ``sgd`` (Nesterov momentum when ``momentum`` > 0)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        nesterov = momentum > 0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    raise SpecError(f"optimizer: unknown '{kind}'; valid: adamw, sgd")


def lr_at(spec: TrainSpec, step: int, total: int) -> float:
    """Cosine (or constant) schedule with linear warm-up, per step."""
    o = spec.optim
    warm = o.warmup_epochs * total // max(o.epochs, 1)
    if step < warm:
        return o.lr * (step + 1) / warm
    if o.schedule == "constant":
        return o.lr
    t = (step - warm) / max(total - warm, 1)
    return 0.5 * o.lr * (1.0 + math.cos(math.pi * t))
