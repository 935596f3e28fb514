"""The model reader: every layer it takes, the ones it refuses (named by path), and parameter
counts equal to PyTorch's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from headroom_client import Headroom, job_from_torch
from headroom_client.model import UnsupportedModel, parameter_count

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_an_mlp_reads_as_the_job_headroom_describes() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 128), nn.GELU(), nn.Linear(128, 10))
    job = job_from_torch(model, [3, 32, 32], optimizer="adamw", precision="bf16-mixed",
                         dataset_size=50_000)
    assert job == {
        "model": {"input_shape": [3, 32, 32], "hidden_layers": [128], "num_classes": 10,
                  "activation": "gelu"},
        "optimizer": {"name": "adamw"},
        "precision": "bf16-mixed",
        "dataset_size": 50_000,
    }
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("activation,name", [(nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.Tanh, "tanh")])
def test_nested_sequentials_and_every_activation(activation: type[nn.Module], name: str) -> None:
    def block(inputs: int, outputs: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(inputs, outputs), activation())

    model = nn.Sequential(nn.Flatten(), block(784, 256), nn.Sequential(block(256, 64)), nn.Linear(64, 10))
    job = job_from_torch(model, [1, 28, 28], optimizer="sgd")
    assert job["model"]["hidden_layers"] == [256, 64]
    assert job["model"]["activation"] == name
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())
    flat = job_from_torch(nn.Sequential(nn.Linear(16, 4)), [16])
    assert flat["model"]["hidden_layers"] == [] and parameter_count(flat) == 68


def test_dropout_after_an_activation_makes_a_layer_list() -> None:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10),
    )
    job = job_from_torch(model, [1, 28, 28], optimizer="sgd")
    assert job["model"] == {
        "input_shape": [1, 28, 28],
        "num_classes": 10,
        "layers": [
            {"flatten": {}},
            {"linear": {"out_features": 512}}, {"relu": {}}, {"dropout": {"p": 0.2}},
            {"linear": {"out_features": 256}}, {"relu": {}},
            {"linear": {"out_features": 10}},
        ],
    }
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())


def test_torch_optimizers_are_read_with_their_learning_rate() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    cases = [
        (torch.optim.SGD(model.parameters(), lr=0.1), "sgd"),
        (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "sgd_momentum"),
        (torch.optim.Adam(model.parameters(), lr=0.002), "adam"),
        (torch.optim.AdamW(model.parameters(), lr=0.003), "adamw"),
    ]
    for optimizer, name in cases:
        spec = job_from_torch(model, [8], optimizer=optimizer)["optimizer"]
        assert spec["name"] == name
        assert spec["learning_rate"] == optimizer.param_groups[0]["lr"]
    with pytest.raises(UnsupportedModel, match="RMSprop"):
        job_from_torch(model, [8], optimizer=torch.optim.RMSprop(model.parameters()))


@pytest.mark.parametrize(
    "model,shape,said",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Dropout(0.5), nn.ReLU(), nn.Linear(64, 10)),
         [1, 28, 28], "model.2 (Dropout): headroom trains dropout right after a hidden layer's activation"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.5, inplace=True),
                       nn.Linear(64, 10)), [1, 28, 28], "model.3 (Dropout): in-place dropout"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(), nn.Dropout(),
                       nn.Linear(64, 10)), [1, 28, 28], "model.4 (Dropout)"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.BatchNorm1d(64),
                       nn.Linear(64, 10)), [1, 28, 28], "model.3 (BatchNorm1d)"),
        (nn.Sequential(nn.Conv2d(1, 6, (5, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(3744, 10)),
         [1, 28, 28], "model.0 (Conv2d): kernel_size=(5, 3): headroom's windows are square"),
        (nn.Sequential(nn.Conv2d(1, 6, 3, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(3456, 10)),
         [1, 28, 28], "model.0 (Conv2d): headroom's convolutions have no dilation"),
        (nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4056, 10)),
         [1, 28, 28], "model.0 (Conv2d): takes 3 channels where 1 arrive"),
        (nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6, momentum=None), nn.ReLU(),
                       nn.Flatten(), nn.Linear(4056, 10)), [1, 28, 28], "model.1 (BatchNorm2d): "),
        (nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
                       nn.Linear(1014, 10)), [1, 28, 28], "model.2 (MaxPool2d): headroom pools with ceil_mode"),
        (nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                       nn.Linear(24, 10)), [1, 28, 28], "model.2 (AdaptiveAvgPool2d)"),
        (nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Linear(26, 10)),
         [1, 28, 28], "model.2 (Linear): takes 26 features where [6, 26, 26] arrives"),
        (nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Upsample(scale_factor=2), nn.Flatten(),
                       nn.Linear(16224, 10)), [1, 28, 28], "model.2 (Upsample): headroom cannot describe"),
        (nn.Sequential(nn.Linear(784, 10)), [1, 28, 28], "needs an nn.Flatten() before it"),
        (nn.Sequential(nn.Flatten(), nn.Linear(100, 10)), [1, 28, 28], "takes 100 features where 784 arrive"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 10, bias=False)), [1, 28, 28], "have a bias"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(),
                       nn.Linear(32, 10)), [1, 28, 28], "model.4 (Tanh): headroom uses one activation"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU()), [1, 28, 28], "ends in a Linear"),
        (nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), [8], "model.1 (Linear): headroom puts an activation"),
    ],
)
def test_what_headroom_cannot_describe_is_named(model: nn.Module, shape: list[int], said: str) -> None:
    with pytest.raises(UnsupportedModel) as refused:
        job_from_torch(model, shape)
    assert said in str(refused.value)


def lenet5() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def batch_norm_cnn() -> nn.Sequential:
    def stage(inputs: int, outputs: int) -> nn.Sequential:
        conv = nn.Conv2d(inputs, outputs, 3, padding=1, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(outputs), nn.ReLU())

    return nn.Sequential(
        stage(3, 32), nn.MaxPool2d(2), stage(32, 64), nn.MaxPool2d(2), stage(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


@pytest.mark.parametrize(
    "model,shape,example",
    [
        (lenet5(), [1, 28, 28], "lenet5-mnist.json"),
        (batch_norm_cnn(), [3, 32, 32], "cifar10-cnn-bn.json"),
    ],
)
def test_image_models_read_as_the_shipped_examples(
    model: nn.Module, shape: list[int], example: str
) -> None:
    shipped = json.loads((EXAMPLES / example).read_text())
    job = job_from_torch(model, shape, optimizer="sgd_momentum")
    assert job["model"] == shipped["model"]
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())


def test_extra_parameters_are_caught_by_the_count() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    model.register_parameter("scale", nn.Parameter(torch.ones(3)))
    with pytest.raises(UnsupportedModel, match="has 7853 parameters where the job describes 7850"):
        job_from_torch(model, [1, 28, 28])


def test_the_job_read_is_one_the_server_takes(server: str) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    dropped = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    estimates = []
    for each in (model, dropped):
        job = job_from_torch(each, [4, 4], optimizer="sgd", search={"max": 1024})
        with Headroom(server) as client:
            estimates.append(client.estimate(job, memory_bytes=1 << 30)["estimates"][0]["estimate"])
    counted = sum(p.numel() for p in model.parameters())
    assert [e["parameter_count"] for e in estimates] == [counted, counted] == [676, 676]
    # Dropout's output and its one-byte mask cost every sample 32 x 5 bytes more.
    assert estimates[1]["bytes_per_sample"] > estimates[0]["bytes_per_sample"]
    image = job_from_torch(batch_norm_cnn(), [3, 32, 32], optimizer="sgd_momentum")
    with Headroom(server) as client:
        estimate = client.estimate(image, memory_bytes=1 << 30)["estimates"][0]["estimate"]
    assert estimate["parameter_count"] == 94_762
