"""A Lightning callback that sets the batch size from headroom's answer, with the contract of
Lightning's ``BatchSizeFinder``: before the fit starts, it sets the attribute named
``batch_arg_name`` on the model or its datamodule (``lightning_setattr``), never above the
training set's length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr

from headroom_client.client import Headroom, TuneAnswer
from headroom_client.model import PRECISIONS, job_from_torch


class CannotAsk(ValueError):
    """The run gives headroom nothing to answer for; the message says what to pass."""


class HeadroomBatchSize(pl.Callback):
    """Asks the headroom service at ``url`` for the local GPU (by UUID) and sets the batch size.

    - ``model_attr``: the LightningModule's attribute holding the module to describe (default:
      the LightningModule itself); ``input_shape``: one sample's shape (default:
      ``example_input_array``'s, less the batch, else the training set's first batch's: a
      tensor, the first of a tuple, or a dict's ``input_ids``, so a language model's
      sequence length comes from its data).
    - ``device``: the service's device to ask about (``host``, ``cuda:0``...) instead of the
      trainer's GPU; a trainer on the CPU needs it, as headroom answers for a device.
    - ``use``: ``"recommended"`` (headroom's 80% rule) or ``"knee"`` (the throughput knee).
    - ``target_batch_size``: a global batch to reach; the micro batch and
      ``trainer.accumulate_grad_batches`` then come from headroom's accumulation advice over the
      trainer's world size.
    - The job's ``dataset_size`` is the training set's length (unless given), so the answer
      never exceeds it, as with ``BatchSizeFinder``.
    - On any failure (the service down or refusing, a model headroom cannot describe, a CPU
      trainer) it warns and leaves the batch size as it was, unless ``strict``, when it raises.

    The answer is kept in ``self.answer``.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        batch_arg_name: str = "batch_size",
        model_attr: str | None = None,
        input_shape: Sequence[int] | None = None,
        use: Literal["recommended", "knee"] = "recommended",
        target_batch_size: int | None = None,
        device: str | None = None,
        strict: bool = False,
        timeout: float = 3600.0,
        **job: Any,
    ) -> None:
        super().__init__()
        self.url = url
        self.token = token
        self.batch_arg_name = batch_arg_name
        self.model_attr = model_attr
        self.input_shape = input_shape
        self.use = use
        self.target_batch_size = target_batch_size
        self.device = device
        self.strict = strict
        self.timeout = timeout
        self.job = job
        self.answer: TuneAnswer | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if not lightning_hasattr(pl_module, self.batch_arg_name):
                raise CannotAsk(
                    f"neither the model nor its datamodule has `{self.batch_arg_name}` to set "
                    "(batch_arg_name=)"
                )
            self.answer = self._ask(trainer, pl_module)
        except Exception as error:  # strict or not, the caller decides; never a silent guess
            if self.strict:
                raise
            rank_zero_warn(f"headroom did not answer ({error}); the batch size is unchanged")
            return
        batch_size = self._batch_size(self.answer)
        lightning_setattr(pl_module, self.batch_arg_name, batch_size)
        # The loop built its dataloader with the old batch to read the dataset's length.
        trainer.fit_loop._combined_loader = None
        accumulation = self.answer.accumulation
        if self.target_batch_size is not None and accumulation is not None:
            trainer.accumulate_grad_batches = int(accumulation["steps"])
        rank_zero_info(
            f"headroom: {self.batch_arg_name} = {batch_size} (max {self.answer.max_batch_size}, "
            f"recommended {self.answer.recommended_batch_size}, knee "
            f"{self.answer.throughput_batch_size}, accumulate_grad_batches "
            f"{trainer.accumulate_grad_batches}{', cached' if self.answer.cached else ''})"
        )

    def _batch_size(self, answer: TuneAnswer) -> int:
        if self.target_batch_size is not None and answer.accumulation is not None:
            return int(answer.accumulation["micro_batch_size"])
        if self.use == "knee" and answer.throughput_batch_size:
            return int(answer.throughput_batch_size)
        return answer.recommended_batch_size

    def _ask(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TuneAnswer:
        gpu_uuid = _gpu_uuid(trainer)
        if gpu_uuid is None and self.device is None:
            raise CannotAsk(
                f"the trainer runs on {trainer.strategy.root_device.type}, and headroom answers for "
                "a GPU: train on one, or name the service's device to ask about (device=)"
            )
        job = job_from_torch(
            self._module(pl_module),
            self._input_shape(trainer, pl_module),
            optimizer=trainer.optimizers[0] if trainer.optimizers else "adam",
            precision=self._precision(trainer),
            **self.job,
        )
        if "dataset_size" not in job:
            length = _dataset_length(trainer)
            if length is not None:
                job["dataset_size"] = length
        if self.target_batch_size is not None:
            job["target_batch_size"] = self.target_batch_size
            job["world_size"] = trainer.world_size
        with Headroom(self.url, self.token) as client:
            return client.tune(job, device=self.device, gpu_uuid=gpu_uuid, timeout=self.timeout)

    def _module(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, torch.nn.Module):
            raise CannotAsk(f"the LightningModule has no module `{self.model_attr}` (model_attr=)")
        return model

    def _input_shape(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Sequence[int]:
        if self.input_shape is not None:
            return self.input_shape
        example = pl_module.example_input_array
        if isinstance(example, torch.Tensor):
            return list(example.shape[1:])
        shape = _first_batch_shape(trainer)
        if shape is not None:
            return shape
        raise CannotAsk(
            "one sample's shape is needed: give input_shape=, set the LightningModule's "
            "example_input_array, or train on batches of tensors (a tuple's first, or a dict's "
            "input_ids)"
        )

    @staticmethod
    def _precision(trainer: pl.Trainer) -> str:
        precision = str(trainer.precision)
        return precision if precision in PRECISIONS else "32-true"


def _training_data(trainer: pl.Trainer) -> Any:
    """The fit loop's training data (its ``CombinedLoader``), set up now as Lightning's
    ``BatchSizeFinder`` sets it up; ``None`` when there is none."""
    loop = trainer.fit_loop
    loop.setup_data()
    return loop._combined_loader


def _dataset_length(trainer: pl.Trainer) -> int | None:
    """The training set's length as Lightning's ``BatchSizeFinder`` reads it; ``None`` for
    iterable datasets."""
    combined = _training_data(trainer)
    if combined is None:
        return None
    try:
        return int(combined._dataset_length())
    except NotImplementedError:  # every dataset iterable
        return None


def _first_batch_shape(trainer: pl.Trainer) -> list[int] | None:
    """One sample's shape in the training set's first batch: the batch itself when a tensor,
    its first element when a tuple or list, its ``input_ids`` when a dict; ``None`` otherwise."""
    combined = _training_data(trainer)
    if combined is None:
        return None
    batch: Any = next(iter(combined), None)
    if isinstance(batch, tuple) and len(batch) == 3:  # (batch, batch_idx, dataloader_idx)
        batch = batch[0]
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch.get("input_ids")
    if isinstance(batch, torch.Tensor) and batch.dim() > 1:
        return list(batch.shape[1:])
    return None


def _gpu_uuid(trainer: pl.Trainer) -> str | None:
    """The UUID (``GPU-...``) of the GPU this process trains on; ``None`` off a GPU."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    uuid = torch.cuda.get_device_properties(device).uuid
    return f"GPU-{uuid}"
