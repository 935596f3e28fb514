"""The callback in a real ``lightning.Trainer(...).fit`` of two steps on the CPU, asking about the
service's ``host`` device: its datamodule ends with the service's answer, never above the
dataset's length; on any failure the batch size is left alone with a warning (or, strict, an
error)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from headroom_client import HeadroomBatchSize, HeadroomError
from headroom_client.lightning import CannotAsk
from headroom_client.model import UnsupportedModel


class Classifier(pl.LightningModule):
    def __init__(self, *head: nn.Module) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), *head, nn.Linear(32, 4))
        self.example_input_array = torch.zeros(2, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Data(pl.LightningDataModule):
    def __init__(self, samples: int = 4096) -> None:
        super().__init__()
        self.batch_size = 2
        self.samples = samples
        self.seen: list[int] = []

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        self.seen.append(self.batch_size)
        data = TensorDataset(torch.randn(self.samples, 4, 4), torch.randint(0, 4, (self.samples,)))
        return DataLoader(data, batch_size=self.batch_size)


def fit(callback: HeadroomBatchSize, module: pl.LightningModule | None = None,
        data: Data | None = None) -> Data:
    data = data or Data()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(module or Classifier(), datamodule=data)
    return data


def test_the_datamodule_gets_the_recommended_batch_size(server: str) -> None:
    callback = HeadroomBatchSize(server, device="host", search={"max": 1024})
    data = fit(callback)
    assert callback.answer is not None
    assert data.batch_size == callback.answer.recommended_batch_size
    # The loop read the dataset's length with the old batch, then the fit used the new one.
    assert data.seen == [2, callback.answer.recommended_batch_size]


def test_the_answer_never_exceeds_the_dataset(server: str) -> None:
    callback = HeadroomBatchSize(server, device="host", search={"max": 4096})
    data = fit(callback, data=Data(samples=100))
    assert callback.answer is not None
    assert callback.answer.max_batch_size == 100
    assert data.batch_size == callback.answer.recommended_batch_size <= 100


def test_a_target_batch_sets_the_micro_batch_and_accumulation(server: str) -> None:
    callback = HeadroomBatchSize(server, device="host", target_batch_size=8192, search={"max": 2048})
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


class Unnamed(pl.LightningModule):
    """A LightningModule whose layers are its own attributes (no `model`)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(16, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))  # type: ignore[no-any-return]

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_lightning_module_itself_is_read_by_default(server: str) -> None:
    callback = HeadroomBatchSize(server, device="host", input_shape=[4, 4], search={"max": 512})
    data = fit(callback, Unnamed())
    assert callback.answer is not None
    assert data.batch_size == callback.answer.recommended_batch_size


def test_a_sample_s_shape_comes_from_the_first_batch_without_an_example(server: str) -> None:
    callback = HeadroomBatchSize(server, device="host", search={"max": 512})
    data = fit(callback, Unnamed())
    assert callback.answer is not None
    assert data.batch_size == callback.answer.recommended_batch_size


class Opaque(pl.LightningModule):
    """Trains on batches whose samples headroom cannot see (a dict without ``input_ids``)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(16, 4))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        return self.model(batch["pixels"].flatten(1)).sum()  # type: ignore[no-any-return]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class OpaqueData(Data):
    def train_dataloader(self) -> DataLoader[Any]:
        self.seen.append(self.batch_size)
        samples: Any = [{"pixels": torch.randn(4, 4)} for _ in range(self.samples)]
        return DataLoader(samples, batch_size=self.batch_size)


@pytest.mark.parametrize(
    "callback,module,said,raised",
    [
        (HeadroomBatchSize("http://127.0.0.1:9", device="host"), None, "127.0.0.1:9", HeadroomError),
        (HeadroomBatchSize("http://127.0.0.1:9", device="host"), Classifier(nn.Hardswish()),
         "model.model.3 (Hardswish): headroom cannot describe this module", UnsupportedModel),
        (HeadroomBatchSize("http://127.0.0.1:9"), None,
         "the trainer runs on cpu, and headroom answers for a GPU", CannotAsk),
        (HeadroomBatchSize("http://127.0.0.1:9", device="host", model_attr="net"), None,
         "no module `net` (model_attr=)", CannotAsk),
        (HeadroomBatchSize("http://127.0.0.1:9", device="host"), Opaque(),
         "give input_shape=, set the LightningModule's example_input_array", CannotAsk),
        (HeadroomBatchSize("http://127.0.0.1:9", device="host", batch_arg_name="micro"), None,
         "`micro` to set (batch_arg_name=)", CannotAsk),
    ],
)
def test_a_failure_warns_and_leaves_the_batch_alone(
    callback: HeadroomBatchSize, module: pl.LightningModule | None, said: str,
    raised: type[Exception],
) -> None:
    given = OpaqueData(samples=64) if isinstance(module, Opaque) else None
    with pytest.warns(UserWarning, match="the batch size is unchanged") as warned:
        data = fit(callback, module, given)
    assert data.batch_size == 2
    assert any(said in str(w.message) for w in warned), [str(w.message) for w in warned]
    callback.strict = True
    with pytest.raises(raised) as error:
        fit(callback, module, OpaqueData(samples=64) if isinstance(module, Opaque) else None)
    assert said in str(error.value)
