"""Gradient health and the non-finite loss guard, on real data (scikit-learn's 8x8 digits) and real Trainer runs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY_BACKBONE, quiet_trainer, run_cli
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferkit import GradientHealth, NonFiniteLossError, TransferClassifier, diagnose

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """1797 images of 8x8 pixels flattened to 64 features, standardised per pixel; labels 0-9."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool = True) -> DataLoader:
    return DataLoader(
        TensorDataset(x, y), batch_size=64, shuffle=shuffle, generator=torch.Generator().manual_seed(0)
    )


class DigitsMLP(L.LightningModule):
    """``depth`` Linear layers of width ``width`` on the 64 digit pixels, trained with SGD.

    ``init``: ``normal`` = N(0, 1) weights, ``xavier`` = Glorot normal, ``he`` = Kaiming normal; biases 0.
    """

    def __init__(
        self,
        activation: str,
        init: str,
        batch_norm: bool = False,
        depth: int = 12,
        width: int = 100,
        lr: float = 0.1,
        lr_jump: tuple[int, float] | None = None,
    ) -> None:
        super().__init__()
        act = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}[activation]
        layers: list[nn.Module] = []
        fan_in = 64
        for index in range(depth):
            linear = nn.Linear(fan_in, width if index < depth - 1 else 10)
            if init == "normal":
                nn.init.normal_(linear.weight, 0.0, 1.0)
            elif init == "xavier":
                nn.init.xavier_normal_(linear.weight)
            else:
                nn.init.kaiming_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            if index < depth - 1:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(width))
                layers.append(act())
            fan_in = width
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.lr_jump = (
            lr_jump  # (epoch, factor): the learning rate is multiplied by factor from that epoch on
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.lr_jump is None:
            return optimizer
        epoch, factor = self.lr_jump
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: factor if e >= epoch else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def _diagnose(model: L.LightningModule, digits, batches: int = 5):
    torch.manual_seed(0)
    return diagnose(model, _loader(*digits), batches=batches, accelerator="cpu")


# --- the verdicts ------------------------------------------------------------------------------------


def test_sigmoid_with_unit_normal_init_is_flagged_vanishing_its_lower_layers_saturated(digits):
    torch.manual_seed(0)
    report = _diagnose(DigitsMLP("sigmoid", "normal"), digits)
    print(report.table())
    hidden, top = report.layers[:-1], report.layers[-1]
    assert len(report.layers) == 12 and [r.name for r in report.layers] == [f"net.{2 * i}" for i in range(12)]
    assert report.verdict == "vanishing"
    # N(0, 1) weights on 100 inputs: pre-activations of std ~5, so sigmoid outputs pile up at 0 and 1,
    # where the sigmoid passes back almost no gradient
    assert all(r.verdict == "vanishing" for r in hidden), report.table()
    assert all(r.activation == "Sigmoid" and r.saturated > 0.3 for r in hidden)
    assert all(any(reason.startswith("saturated") for reason in r.reasons) for r in hidden)
    # and the gradient shrinks on its way down to the input
    assert hidden[0].rel_grad < hidden[-1].rel_grad / 2
    assert top.verdict == "healthy" and top.rel_grad == pytest.approx(1.0)
    assert "Xavier" in report.summary


def test_he_init_elu_and_batchnorm_at_the_same_depth_is_healthy(digits):
    torch.manual_seed(0)
    report = _diagnose(DigitsMLP("elu", "he", batch_norm=True), digits)
    print(report.table())
    assert len(report.layers) == 12
    assert report.verdict == "healthy"
    assert [r.verdict for r in report.layers] == ["healthy"] * 12
    hidden = report.layers[:-1]
    assert all(r.activation == "ELU" and r.dead == 0.0 for r in hidden)  # BatchNorm centres every unit
    assert all(0.1 < r.rel_grad < 10 for r in report.layers)  # gradients keep their size through depth
    assert all(0 < r.update_ratio < 0.1 for r in report.layers)


@pytest.mark.parametrize(
    ("activation", "init", "batch_norm", "expected"),
    [
        ("sigmoid", "xavier", False, "vanishing"),  # Glorot & Bengio: sigmoid's slope of 1/4 per layer
        ("tanh", "normal", False, "vanishing"),  # N(0, 1) weights drive tanh to +-1: saturated
        ("relu", "normal", False, "exploding"),  # activations grow ~7x per layer, and so do the updates
        ("tanh", "xavier", False, "healthy"),  # the init made for it
    ],
)
def test_the_verdict_follows_the_cause(digits, activation, init, batch_norm, expected):
    torch.manual_seed(0)
    report = _diagnose(DigitsMLP(activation, init, batch_norm), digits)
    assert report.verdict == expected, report.table()
    if (activation, init) == ("tanh", "normal"):
        # vanishing through saturation: most units pinned at +-1
        assert all(r.saturated > 0.5 for r in report.layers[:-1]), report.table()
    if (activation, init) == ("sigmoid", "xavier"):
        # the classic picture: orders of magnitude less gradient at the input end, nothing saturated
        assert report.layers[0].rel_grad < 1e-4 and all(r.saturated < 0.05 for r in report.layers[:-1])
        assert report.layers[0].verdict == "vanishing"


@pytest.mark.slow
def test_diagnose_leaves_the_model_unchanged(digits):
    torch.manual_seed(0)
    model = DigitsMLP("elu", "he", batch_norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _diagnose(model, digits, batches=3)
    assert report.batches == 3 and all(r.update_ratio > 0 for r in report.layers)  # the copy did train
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- the callback ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_gradient_health_removes_its_hooks_records_every_n_epochs_and_resumes(digits, tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP("elu", "he", batch_norm=True, depth=4)
    health = GradientHealth(batches=2, every_n_epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    loader = _loader(*digits)
    quiet_trainer(tmp_path, max_epochs=3, callbacks=[health, checkpoint]).fit(model, loader)
    assert [r.epoch for r in health.reports] == [0, 2]
    assert all(r.batches == 2 and len(r.layers) == 4 for r in health.reports)
    # no hook left behind: training after the recording runs as if the callback were not there
    assert not health.recording
    assert all(not m._forward_hooks for m in model.modules())

    resumed = GradientHealth(batches=2, every_n_epochs=2)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True
    )  # the same one, as a resume has it
    trainer = quiet_trainer(tmp_path, max_epochs=5, callbacks=[resumed, checkpoint])
    trainer.fit(
        DigitsMLP("elu", "he", batch_norm=True, depth=4), loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert [r.epoch for r in resumed.reports] == [0, 2, 4]  # the first two came back from the checkpoint
    assert resumed.reports[1].to_dict() == health.reports[1].to_dict()


# --- the non-finite loss guard -----------------------------------------------------------------------


def _accuracy(model: nn.Module, digits) -> float:
    x, y = digits
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


@pytest.mark.slow
def test_a_learning_rate_blow_up_stops_training_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    # epoch 0 trains at lr 0.1; from epoch 1 the learning rate is a million times too high
    def run(trainer_class, folder):
        torch.manual_seed(0)
        model = DigitsMLP("elu", "he", depth=3, lr=0.1, lr_jump=(1, 1e6))
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        trainer = trainer_class(
            accelerator="cpu",
            max_epochs=3,
            callbacks=[checkpoint],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, _loader(*digits))
        return model, tmp_path / folder / "last.ckpt"

    from transferkit import Trainer

    with pytest.raises(NonFiniteLossError) as caught:
        run(Trainer, "guarded")
    error = caught.value
    message = str(error)
    print(message)
    assert error.epoch == 1 and error.learning_rates == {"group 0": pytest.approx(1e5)}
    assert f"at epoch 1, step {error.step}" in message and "1.00e+05" in message
    assert "learning rate too high" in message
    for hint in (
        "model.optimizer.lr",
        "trainer.gradient_clip_val",
        "check the inputs",
        "python -m transferkit diagnose",
    ):
        assert hint in message

    saved = torch.load(tmp_path / "guarded" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0  # the checkpoint of the good epoch was not replaced
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    restored = DigitsMLP("elu", "he", depth=3)
    restored.load_state_dict(saved["state_dict"])
    assert _accuracy(restored, digits) > 0.8  # ten classes: it is a model that learned, not just finite

    # without the guard, Lightning trains on through the NaNs and the last checkpoint holds them
    model, last = run(L.Trainer, "unguarded")
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    unguarded = torch.load(last, weights_only=True)
    assert not all(torch.isfinite(v).all() for v in unguarded["state_dict"].values())


def test_a_non_finite_input_is_named_as_the_cause_before_any_weight_changes(digits, tmp_path):
    x, y = digits
    x = x.clone()
    x[70, 10] = float("inf")  # in the second batch of 64
    torch.manual_seed(0)
    model = DigitsMLP("elu", "he", depth=3)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit(model, _loader(x, y, shuffle=False))
    message = str(caught.value)
    assert caught.value.epoch == 0 and caught.value.step == 1 and "(batch 1 of the epoch)" in message
    assert "bad input values: this batch holds 1 non-finite values" in message
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # diagnose reports it rather than failing
    report = diagnose(
        DigitsMLP("elu", "he", depth=3), _loader(x, y, shuffle=False), batches=5, accelerator="cpu"
    )
    assert report.verdict == "exploding" and "bad input values" in report.error
    assert report.batches == 1 and "training stopped" in report.summary


# --- the command -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_diagnose_command_prints_the_table_and_writes_png_and_json(stripes_folder, tmp_path):
    run_dir = tmp_path / "run"
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 3, "accelerator": "cpu", "default_root_dir": str(run_dir)},
        "model": {"backbone": TINY_BACKBONE, "pretrained": False},
        "data": {
            "source": "folder",
            "root": str(stripes_folder),
            "pipeline": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "loader": {"num_workers": 0, "batch_size": 16},
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli(
        "diagnose", "--config", str(tmp_path / "recipe.yaml"), "--batches", "3", env={"COLUMNS": "200"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)

    model = TransferClassifier(num_classes=2, backbone=TINY_BACKBONE, pretrained=False)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    data = json.loads((run_dir / "gradient_health.json").read_text())
    assert [row["name"] for row in data["layers"]] == layers  # one row per layer, input to output
    assert (
        data["batches"] == 3 and data["verdict"] == "healthy"
    )  # a small He-initialised net with BN trains well
    assert all(row["grad_norm"] > 0 and row["act_std"] > 0 for row in data["layers"])

    lines = result.stdout.splitlines()
    assert "grad norm" in lines[0] and "verdict" in lines[0]
    rows = [line for line in lines if line.split() and line.split()[0].isdigit() and len(line.split()) > 10]
    assert [row.split()[1] for row in rows] == layers
    assert f"verdict: {data['verdict']}" in result.stdout
    assert str(run_dir / "gradient_health.png") in result.stdout

    with Image.open(run_dir / "gradient_health.png") as image:
        image.verify()
    with Image.open(run_dir / "gradient_health.png") as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 600
