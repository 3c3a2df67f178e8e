"""BatchNorm folding for inference: same function, fewer layers, the original left as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BACKBONE
from timm.layers import BatchNormAct2d
from torch import nn

from transferkit import TransferClassifier
from transferkit.inference import FoldingError, count_batchnorm, fold_batchnorm


def test_folding_the_pretrained_model_keeps_its_predictions():
    torch.manual_seed(0)
    model = TransferClassifier(num_classes=2, pretrained="bundled").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
    folded = fold_batchnorm(model, x[:1])
    assert count_batchnorm(model) == 50 and count_batchnorm(folded) == 0  # 49 in the backbone, 1 in the head
    with torch.no_grad():
        torch.testing.assert_close(folded(x), before, atol=1e-4, rtol=1e-4)  # a batch it was not traced on
        torch.testing.assert_close(model(x), before)  # the original is untouched


def test_folding_keeps_the_activation_of_a_fused_batchnorm_act_layer():
    torch.manual_seed(0)
    model = TransferClassifier(
        num_classes=3, backbone=TINY_BACKBONE, pretrained=False, head={"activation": "leaky_relu"}
    )
    # give BatchNorm non-trivial statistics, as training would
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    folded = fold_batchnorm(model, x)
    assert count_batchnorm(folded) == 0
    with_act = [m.act for m in model.backbone.modules() if isinstance(m, BatchNormAct2d)]
    kept = [m[1] for m in folded.backbone.modules() if isinstance(m, nn.Sequential) and len(m) == 2]
    assert len(with_act) > 0 and [type(a) for a in kept] == [type(a) for a in with_act]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output also feeds the residual: not foldable


def test_a_fold_that_would_change_the_output_is_refused():
    model = _Branchy().eval()
    model.bn.running_mean.fill_(0.5), model.bn.running_var.fill_(4.0)
    with pytest.raises(FoldingError, match="changed the output"):
        fold_batchnorm(model, torch.randn(1, 3, 8, 8))


def test_test_time_augmentation_averages_its_views_and_leaves_the_model_as_it_was(tmp_path):
    import numpy as np
    from PIL import Image

    from transferkit.data.augment import build_eval_transform
    from transferkit.inference import predict_images

    torch.manual_seed(0)
    model = TransferClassifier(
        num_classes=2, backbone=TINY_BACKBONE, pretrained=False, head={"dropout": 0.3}
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        mirrored = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
        torch.testing.assert_close(model.predict_proba(x, tta="hflip"), mirrored)
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    transform = build_eval_transform(32, (0.5,) * 3, (0.5,) * 3)
    (row,) = predict_images(model, transform, [path], tta="d4", mc_dropout=4)
    assert row["error"] == "" and len(row["probs"]) == 2 and row["uncertainty"] >= 0
    assert (
        model.settings.prediction.tta == "none" and not model.training
    )  # another TTA for one call changed nothing
