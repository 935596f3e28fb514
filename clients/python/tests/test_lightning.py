"""The callback in a real ``lightning.Trainer(...).fit`` of two steps on the CPU: its datamodule
ends with the service's answer; with the service down the batch size is left alone."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from headroom_client import HeadroomBatchSize, HeadroomError


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.example_input_array = torch.zeros(2, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 2
        self.seen: list[int] = []

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        self.seen.append(self.batch_size)
        data = TensorDataset(torch.randn(64, 4, 4), torch.randint(0, 4, (64,)))
        return DataLoader(data, batch_size=min(self.batch_size, 64))


def fit(callback: HeadroomBatchSize) -> Data:
    data = Data()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(Classifier(), datamodule=data)
    return data


def test_the_datamodule_gets_the_recommended_batch_size(server: str) -> None:
    callback = HeadroomBatchSize(server, search={"max": 4096})
    data = fit(callback)
    assert callback.answer is not None
    assert data.batch_size == callback.answer.recommended_batch_size
    assert data.seen == [callback.answer.recommended_batch_size]


def test_a_target_batch_sets_the_micro_batch_and_accumulation(server: str) -> None:
    callback = HeadroomBatchSize(server, target_batch_size=8192, search={"max": 2048})
    data = Data()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(Classifier(), datamodule=data)
    assert callback.answer is not None and callback.answer.accumulation is not None
    advice = callback.answer.accumulation
    assert data.batch_size == advice["micro_batch_size"] <= 2048
    assert trainer.accumulate_grad_batches == advice["steps"]
    assert advice["micro_batch_size"] * advice["steps"] >= 8192


def test_with_the_service_down_the_batch_size_is_left_alone() -> None:
    with pytest.warns(UserWarning, match="headroom did not answer"):
        data = fit(HeadroomBatchSize("http://127.0.0.1:9"))
    assert data.batch_size == 2
    with pytest.raises(HeadroomError):
        fit(HeadroomBatchSize("http://127.0.0.1:9", strict=True))
