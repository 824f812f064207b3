"""Edge students: timm models and WideResNet-28-2, their checkpoints and data config.

A student is any timm model (MobileNetV3 by default) or ``wrn_28_2``, the WideResNet-28-2 of the
semi-supervised literature, which importing this module registers in timm's model registry so that
``timm.create_model("wrn_28_2", num_classes=C, checkpoint_path=...)`` works like for any timm model.
``Student`` exposes what CustomKD needs: the pooled pre-logits feature ``f_s`` and the linear head
``H_s`` with ``logits = H_s(f_s)``. Student weights files are found, read and loaded by ``weights.py``;
the customizer and projectors of CustomKD live in ``customizer.py``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from customkd_cache.errors import SpecError
from customkd_cache.files import ensure_dir, save_torch
from customkd_cache.models.weights import load_state_dict_into, read_state_dict, resolve_weights_file
from customkd_cache.specs import StudentSpec

# --- the student -------------------------------------------------------------------------------


class Student(nn.Module):
    """A timm classifier seen as encoder ``E_s`` (to the pooled pre-logits feature) and linear head ``H_s``.

    ``forward(x)`` with ``x`` (B, 3, H, W) float returns ``(logits, f_s)``: (B, num_classes) and
    (B, feature_dim), with ``logits == head()(f_s)`` exactly. The wrapped timm model is the whole
    inference graph: its ``state_dict`` is the student checkpoint.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        head = model.get_classifier()  # type: ignore[operator]
        if not isinstance(head, nn.Linear):
            raise SpecError(
                f"student.name: '{name}' has a {type(head).__name__} classifier, not a single Linear layer "
                "on a pooled feature; choose a timm model whose get_classifier() is nn.Linear"
            )
        self.model = model
        self.name = name
        self.feature_dim = head.in_features
        self.num_classes = head.out_features
        self.has_pre_activation = _has_head_activation(model)
        # the map from the pre-activation h_s to f_s (timm's act2), or the identity
        self.activation: nn.Module = model.act2 if self.has_pre_activation else nn.Identity()  # type: ignore[assignment]

    def features(self, x: Tensor) -> Tensor:
        """``f_s`` (B, feature_dim): timm's ``forward_head(forward_features(x), pre_logits=True)``."""
        return self.features_and_pre(x)[0]

    def features_and_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f_s, h_s)``: the pooled feature and its pre-activation, ``f_s == activation(h_s)``.

        For a MobileNetV3-style head (pool, 1x1 ``conv_head``, ``norm_head``, activation ``act2``)
        ``h_s`` is the head's output before ``act2``; for other students ``h_s`` is ``f_s``.
        """
        m = self.model
        x = m.forward_features(x)  # type: ignore[operator]
        if not self.has_pre_activation:
            f_s = m.forward_head(x, pre_logits=True)  # type: ignore[operator]
            return f_s, f_s
        h_s = m.flatten(m.norm_head(m.conv_head(m.global_pool(x))))  # type: ignore[operator]
        f_s = self.activate(h_s)
        if m.drop_rate > 0.0:  # type: ignore[operator]
            f_s = F.dropout(f_s, p=float(m.drop_rate), training=m.training)  # type: ignore[arg-type]
        return f_s, h_s

    def activate(self, h: Tensor) -> Tensor:
        """``activation(h)`` without touching ``h`` (timm's activations may work in place)."""
        return self.activation(h.clone()) if self.has_pre_activation else h

    def forward_parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits, f_s, h_s)`` in one pass (see ``features_and_pre``)."""
        f_s, h_s = self.features_and_pre(x)
        return self.head()(f_s), f_s, h_s

    def head(self) -> nn.Module:
        """``H_s``: the model's own classifier (``nn.Linear`` feature_dim -> num_classes), not a copy."""
        return self.model.get_classifier()  # type: ignore[operator]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, f_s, _ = self.forward_parts(x)
        return logits, f_s

    def timm_model(self) -> nn.Module:
        """The underlying timm model, whose ``state_dict`` is the student checkpoint."""
        return self.model


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's resolved input config of ``model``: ``input_size``, ``mean``, ``std``, ``interpolation``, ..."""
    return dict(timm.data.resolve_model_data_config(model))


def _has_head_activation(model: nn.Module) -> bool:
    """Whether ``model``'s head is pool, ``conv_head``, ``norm_head``, ``act2``, ``flatten`` (timm's
    MobileNetV3 family), so that the pre-activation of ``f_s`` can be read."""
    parts = ("global_pool", "conv_head", "norm_head", "act2", "flatten", "drop_rate")
    return all(hasattr(model, p) for p in parts) and not isinstance(model.act2, nn.Identity)


def create_student(spec: StudentSpec, *, num_classes: int, spec_dir: Path | None = None) -> Student:
    """A student from ``[student]``: random init (seed torch first) or the weights file ``spec.weights``.

    ``spec.weights`` is ``""`` (random init), a file path (relative paths resolve against ``spec_dir``,
    the train spec's directory) or ``"package:PKG/REL/PATH"``. The classifier of the weights is
    ignored when its shape differs from ``num_classes`` (fine-tuning to a new label set); every
    other tensor must load (see ``load_state_dict_into``). Raises ``SpecError`` for an unknown model
    name (naming the closest timm names) and ``WeightsError`` for weights that cannot be found or
    loaded.
    """
    if not timm.is_model(spec.name):
        raise SpecError(f"student.name: unknown model '{spec.name}'{_closest_models(spec.name)}")
    kwargs: dict[str, Any] = {}
    cfg = timm.models.get_pretrained_cfg(spec.name)
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = spec.input_size  # e.g. ViT students: position embeddings follow the input size
    model = timm.create_model(spec.name, num_classes=num_classes, **kwargs)
    if spec.weights:
        path = resolve_weights_file(
            spec.weights, spec_dir, field="student.weights", hint="or student.weights = '' for random init"
        )
        state = read_state_dict(path, field="student.weights")
        load_state_dict_into(model, state, by=spec.weights_keys, source=f"student.weights file {path}")
    return Student(model, spec.name)


def save_student_checkpoint(student: Student, path: Path) -> None:
    """Write the timm model's ``state_dict`` (no projectors, no optimizer) to ``path`` atomically.

    The file is written next to ``path`` and renamed over it (``files.save_torch``), so a reader never
    sees a partial file and a link at ``path`` is replaced, never written through. Raises
    ``OutputError`` (one line) when it cannot be written (a full disk).
    It loads with ``timm.create_model(student.name, num_classes=student.num_classes,
    checkpoint_path=path)`` (after ``import customkd_cache.models.students`` for ``wrn_28_2``).
    """
    path = Path(path)
    ensure_dir(path.parent)
    save_torch(path, student.timm_model().state_dict())  # never through a link planted at path


def _closest_models(name: str) -> str:
    """A ``" (closest timm names: a, b, c)"`` suffix, or a pointer to ``timm.list_models``."""
    matches = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    if matches:
        return f" (closest timm names: {', '.join(matches)})"
    return "; see timm.list_models() for valid names, or use wrn_28_2"


# --- WideResNet-28-2 ---------------------------------------------------------------------------


class _WideBlock(nn.Module):
    """Pre-activation basic block of the FixMatch WideResNet (google-research/fixmatch ``residual``).

    BN-LeakyReLU-conv3x3-BN-LeakyReLU-conv3x3 plus a shortcut (a 1x1 conv when the width changes).
    The shortcut takes the activated input only with ``activate_before_residual`` (the first block),
    else the raw input, as in the TensorFlow reference. (Common PyTorch ports instead feed the raw
    input to the first conv of width-changing blocks, leaving that block's first BN unused.)
    """

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool) -> None:
        super().__init__()
        self.bn1 = _bn2d(c_in)
        self.act1 = nn.LeakyReLU(0.1)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn2d(c_out)
        self.act2 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if c_in != c_out else None
        self.activate_before_residual = activate_before_residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(x))
        skip = out if self.activate_before_residual else x
        if self.shortcut is not None:
            skip = self.shortcut(skip)
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        return out + skip


def _bn2d(channels: int) -> nn.BatchNorm2d:
    # FixMatch's BN decay 0.999 is PyTorch momentum 0.001: slow running statistics suit the
    # small, mixed labeled/unlabeled batches of semi-supervised training.
    return nn.BatchNorm2d(channels, momentum=0.001)


class WideResNet(nn.Module):
    """WideResNet (Zagoruyko & Komodakis, BMVC 2016) for 32 px inputs, in the FixMatch variant.

    Depth ``6n + 4``, widths 16, 16k, 32k, 64k, strides 1, 2, 2; BatchNorm momentum 0.001, LeakyReLU
    0.1, a final BN-LeakyReLU, global average pooling and one Linear classifier. Kaiming-normal
    (fan_out) conv init and Xavier-normal classifier init as in FixMatch. Implements timm's model
    interface (``forward_features``, ``forward_head(pre_logits=...)``, ``get_classifier``,
    ``reset_classifier``); ``forward_features`` gives (B, 64k, H/4, W/4).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        if global_pool != "avg":
            raise ValueError(f"WideResNet supports global_pool='avg' only, got {global_pool!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = widths[3]
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        self.stem = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, stride=1, activate_before_residual=True)
        self.block2 = self._group(widths[1], widths[2], n, stride=2, activate_before_residual=False)
        self.block3 = self._group(widths[2], widths[3], n, stride=2, activate_before_residual=False)
        self.bn = _bn2d(widths[3])
        self.act = nn.LeakyReLU(0.1)
        self.fc: nn.Module = nn.Linear(widths[3], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @staticmethod
    def _group(
        c_in: int, c_out: int, n: int, *, stride: int, activate_before_residual: bool
    ) -> nn.Sequential:
        blocks = [_WideBlock(c_in, c_out, stride, activate_before_residual)]
        blocks += [_WideBlock(c_out, c_out, 1, False) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.act(self.bn(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"WideResNet supports global_pool='avg' only, got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


# timm reads the pretrained cfg of a registered model from the module global ``default_cfgs``. There
# are no released weights: the cfg carries the data config (32 px, CIFAR-100 statistics) that
# ``timm.data.resolve_model_data_config`` returns for this model.
default_cfgs = generate_default_cfgs(
    {
        "wrn_28_2": {
            "num_classes": 100,
            "input_size": (3, 32, 32),
            "pool_size": (8, 8),
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "mean": (0.5071, 0.4865, 0.4409),
            "std": (0.2673, 0.2564, 0.2762),
            "first_conv": "stem",
            "classifier": "fc",
        }
    }
)


@register_model
def wrn_28_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WideResNet-28-2 (about 1.47M parameters, 128-d pre-logits feature) for 32 px images."""
    return build_model_with_cfg(WideResNet, "wrn_28_2", pretrained, depth=28, widen_factor=2, **kwargs)
