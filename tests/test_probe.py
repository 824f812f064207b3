"""The teacher probe on synthetic, linearly separable clusters."""

from __future__ import annotations

import pytest
import torch

from customkd_cache.specs import ProbeSpec
from customkd_cache.stage_two.probe import Probe, probe_accuracy, train_probe

NUM_CLASSES, DIM = 4, 16
SPEC = ProbeSpec(epochs=15, lr=0.05, weight_decay=1e-4, batch_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around fixed, well separated centres, offset and scaled like raw features."""
    centres = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(0)) * 4
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    features = centres[labels] + torch.randn(n, DIM, generator=g)
    return (features * 3 + 10).to(torch.float16), labels


def test_separable_clusters_are_learned_and_generalize() -> None:
    x, y = clusters(400, seed=1)
    probe = train_probe(x, y, num_classes=NUM_CLASSES, spec=SPEC, seed=0)
    assert probe_accuracy(probe, x, y) >= 0.99
    x_test, y_test = clusters(200, seed=2)
    assert probe_accuracy(probe, x_test, y_test) >= 0.95


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    x, y = clusters(200, seed=1)
    a, b, c = (train_probe(x, y, num_classes=NUM_CLASSES, spec=SPEC, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.linear.weight, b.linear.weight) and torch.equal(a.linear.bias, b.linear.bias)
    assert not torch.equal(a.linear.weight, c.linear.weight)


def test_standardization_is_inside_the_probe() -> None:
    x, y = clusters(200, seed=1)
    probe = train_probe(x, y, num_classes=NUM_CLASSES, spec=SPEC, seed=0)
    xf = x.float()
    assert torch.allclose(probe.mean, xf.mean(0)) and torch.allclose(probe.std, xf.std(0, correction=0))
    logits = probe.logits(x[:5])
    assert logits.shape == (5, NUM_CLASSES) and logits.dtype == torch.float32 and not logits.requires_grad
    expected = probe.linear((xf[:5] - probe.mean) / (probe.std + 1e-6))
    assert torch.allclose(logits, expected)


def test_given_statistics_are_used() -> None:
    x, y = clusters(200, seed=1)
    mean, std = torch.full((DIM,), 10.0), torch.full((DIM,), 12.0)
    probe = train_probe(x, y, num_classes=NUM_CLASSES, spec=SPEC, seed=0, mean=mean, std=std)
    assert torch.equal(probe.mean, mean) and torch.equal(probe.std, std)
    assert probe_accuracy(probe, x, y) >= 0.99


def test_to_device_copies() -> None:
    x, y = clusters(50, seed=1)
    probe = train_probe(x, y, num_classes=NUM_CLASSES, spec=ProbeSpec(epochs=1), seed=0)
    moved = probe.to("cpu")
    assert isinstance(moved, Probe) and moved.linear is not probe.linear
    assert torch.equal(moved.logits(x), probe.logits(x))


def test_bad_inputs() -> None:
    x, y = clusters(20, seed=1)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        train_probe(x, y + NUM_CLASSES, num_classes=NUM_CLASSES, spec=SPEC, seed=0)
    with pytest.raises(ValueError, match="labels"):
        train_probe(x, y[:5], num_classes=NUM_CLASSES, spec=SPEC, seed=0)
