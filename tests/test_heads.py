"""The classifier head: init statistics, dropout, max-norm, and the recipe's validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transferkit.models.heads import ClassifierHead


def test_he_init_gives_variance_two_over_fan_in():
    torch.manual_seed(0)
    head = ClassifierHead(2048, 10, hidden_dims=(1024,), activation="elu")
    weight = head.hidden[0].weight
    assert head.init == "he"
    assert weight.mean().abs() < 1e-3
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.02)


@pytest.mark.parametrize(
    ("activation", "init", "variance"),
    [("selu", "lecun", lambda fi, fo: 1 / fi), ("tanh", "xavier", lambda fi, fo: 2 / (fi + fo))],
)
def test_each_activation_gets_its_matching_init(activation, init, variance):
    torch.manual_seed(0)
    head = ClassifierHead(1024, 3, hidden_dims=(512,), activation=activation)
    assert head.init == init
    assert head.hidden[0].weight.var().item() == pytest.approx(variance(1024, 512), rel=0.03)


def test_layer_order_is_linear_bn_activation_dropout():
    head = ClassifierHead(64, 3, hidden_dims=(32, 16), activation="leaky_relu", dropout=0.5)
    kinds = [type(m) for m in head.hidden]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout] * 2
    assert head.hidden[2].negative_slope == 0.01
    assert head.hidden[0].bias is None  # BatchNorm's shift makes it redundant


def test_dropout_is_off_in_eval_and_on_in_training():
    torch.manual_seed(0)
    head = ClassifierHead(64, 3, hidden_dims=(128,), dropout=0.5)
    x = torch.randn(16, 64)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    head.train()
    assert not torch.allclose(head(x), head(x))


def test_max_norm_holds_after_every_training_step():
    torch.manual_seed(0)
    head = ClassifierHead(32, 4, hidden_dims=(64,), max_norm=0.5, dropout=0.0)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)  # large steps push the norms up
    for _ in range(5):
        loss = nn.functional.cross_entropy(head(torch.randn(16, 32) * 5), torch.randint(0, 4, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        head.apply_max_norm()
        for layer in (head.hidden[0], head.fc):
            assert layer.weight.norm(dim=1).max().item() <= 0.5 + 1e-5


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match="unknown activation 'gelu'.*elu"):
        ClassifierHead(8, 2, activation="gelu")
    with pytest.raises(ValueError, match="unknown init 'orthogonal'"):
        ClassifierHead(8, 2, init="orthogonal")
    with pytest.raises(ValueError, match="dropout"):
        ClassifierHead(8, 2, dropout=1.5)
