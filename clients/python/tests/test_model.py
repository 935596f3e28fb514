"""The model reader: every layer it takes, the ones it refuses (named by path), and parameter
counts equal to PyTorch's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import transformers
from torch import nn
from torch.nn import functional as F

from headroom_client import Headroom, HeadroomError, job_from_torch
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


class Block(nn.Module):
    """A basic residual block written as people write them: functional calls, `out += identity`
    and a downsampling shortcut when the shape changes."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.down = (
            nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))
            if stride != 1 or inputs != outputs else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        out += identity
        return F.relu(out)


class Net(nn.Module):
    """A subclass with its own forward, two residual blocks and torch.flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.silu(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(torch.flatten(x, 1))  # type: ignore[no-any-return]


def conv_bn(outputs: int, stride: int = 1, kernel: int = 3) -> list[dict[str, object]]:
    conv: dict[str, object] = {"out_channels": outputs, "kernel_size": kernel, "bias": False}
    conv.update({"stride": stride} if stride != 1 else {})
    conv.update({"padding": 1} if kernel == 3 else {})
    return [{"conv2d": conv}, {"batch_norm2d": {}}]


def test_a_subclass_with_residual_blocks_reads_from_its_graph() -> None:
    job = job_from_torch(Net(), [3, 32, 32], optimizer="sgd")
    body = [*conv_bn(16), {"relu": {"inplace": True}}, *conv_bn(16)]
    down = [*conv_bn(32, 2), {"relu": {"inplace": True}}, *conv_bn(32)]
    assert job["model"] == {
        "input_shape": [3, 32, 32],
        "num_classes": 10,
        "layers": [
            {"conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}},
            {"silu": {}},
            {"residual": {"layers": body, "inplace": True}},
            {"relu": {}},
            {"residual": {"layers": down, "shortcut": conv_bn(32, 2, 1), "inplace": True}},
            {"relu": {}},
            {"adaptive_avg_pool2d": {"output_size": 1}},
            {"flatten": {}},
            {"linear": {"out_features": 10}},
        ],
    }
    assert parameter_count(job) == sum(p.numel() for p in Net().parameters())


def test_every_module_headroom_has_reads_with_its_arguments() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8, eps=1e-3, momentum=0.01), nn.ReLU6(True),
        nn.Conv2d(8, 8, 3, groups=8, dilation=2, padding="same"), nn.LeakyReLU(0.2),
        nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.AvgPool2d(2, count_include_pad=False),
        nn.AdaptiveAvgPool2d((3, 2)), nn.Identity(), nn.Sigmoid(), nn.Flatten(),
        nn.Linear(48, 32, bias=False), nn.BatchNorm1d(32, affine=False), nn.GELU("tanh"),
        nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, 5),
    )
    job = job_from_torch(model, [3, 20, 20])
    assert job["model"]["layers"] == [
        {"conv2d": {"out_channels": 8, "kernel_size": 3}},
        {"batch_norm2d": {"eps": 1e-3, "momentum": 0.01}},
        {"relu6": {"inplace": True}},
        {"conv2d": {"out_channels": 8, "kernel_size": 3, "padding": 2, "dilation": 2, "groups": 8}},
        {"leaky_relu": {"negative_slope": 0.2}},
        {"max_pool2d": {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}},
        {"avg_pool2d": {"kernel_size": 2, "count_include_pad": False}},
        {"adaptive_avg_pool2d": {"output_size": [3, 2]}},
        {"identity": {}},
        {"sigmoid": {}},
        {"flatten": {}},
        {"linear": {"out_features": 32, "bias": False}},
        {"batch_norm1d": {"affine": False}},
        {"gelu": {"approximate": "tanh"}},
        {"dropout": {"p": 0.3}},
        {"tanh": {}},
        {"linear": {"out_features": 5}},
    ]
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())


class MeanOverPositions(nn.Module):
    """A classifier over a sequence: RMS norm, then the positions' mean into the head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(12, eps=1e-6)
        self.bare = nn.RMSNorm(12, elementwise_affine=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.bare(self.norm(x)).mean(dim=1)
        logits: torch.Tensor = self.head(pooled)
        return logits


def test_rms_norm_and_the_mean_over_positions_read() -> None:
    model = MeanOverPositions()
    job = job_from_torch(model, [8, 12])
    assert job["model"]["layers"] == [
        {"rms_norm": {"eps": 1e-6}},
        {"rms_norm": {"elementwise_affine": False}},
        {"mean_pool": {}},
        {"linear": {"out_features": 3}},
    ]
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())


class HuggingFaceNormed(nn.Module):
    """A classifier over a sequence behind Hugging Face's RMS norm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(12, eps=1e-5)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.norm(x).mean(dim=1))
        return logits


def test_hugging_face_s_rms_norm_reads_as_the_composite_norm() -> None:
    model = HuggingFaceNormed()
    job = job_from_torch(model, [8, 12])
    assert job["model"]["layers"] == [
        {"rms_norm": {"eps": 1e-5, "implementation": "composite"}},
        {"mean_pool": {}},
        {"linear": {"out_features": 3}},
    ]
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())


def test_layer_norm_and_linear_over_a_sequence_read() -> None:
    model = nn.Sequential(
        nn.LayerNorm(12), nn.Linear(12, 16), nn.GELU(), nn.LayerNorm(16, eps=1e-6, bias=False),
        nn.Linear(16, 16), nn.LayerNorm(16, elementwise_affine=False), nn.Flatten(), nn.Linear(128, 3),
    )
    job = job_from_torch(model, [8, 12])
    assert job["model"]["layers"] == [
        {"layer_norm": {}},
        {"linear": {"out_features": 16}},
        {"gelu": {}},
        {"layer_norm": {"eps": 1e-6, "bias": False}},
        {"linear": {"out_features": 16}},
        {"layer_norm": {"elementwise_affine": False}},
        {"flatten": {}},
        {"linear": {"out_features": 3}},
    ]
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())


class Gated(nn.Module):
    """A squeeze-and-excitation step: a product of two branches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid())
        self.head = nn.Linear(4 * 26 * 26, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.head((x * self.gate(x)).flatten(1))  # type: ignore[no-any-return]


class Branchy(nn.Module):
    """Reads its input twice without joining it back."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) + self.b(x) + y  # type: ignore[no-any-return]


class Flow(nn.Module):
    """Control flow on a value, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.a(-x)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "model,shape,said",
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.5, inplace=True),
                       nn.Linear(64, 10)), [1, 28, 28], "model.3 (Dropout): in-place dropout"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Hardswish(), nn.Linear(64, 10)),
         [1, 28, 28], "model.2 (Hardswish): headroom cannot describe this module; it reads Embedding"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm([26, 26]), nn.Flatten(), nn.Linear(2704, 10)),
         [1, 28, 28], "model.1 (LayerNorm): normalized_shape=(26, 26) over a [4, 26, 26] sample"),
        (nn.Sequential(nn.Conv2d(1, 6, (5, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(3744, 10)),
         [1, 28, 28], "model.0 (Conv2d): kernel_size=(5, 3): headroom's windows are square"),
        (nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4056, 10)),
         [1, 28, 28], "model.0 (Conv2d): PyTorch cannot run it on [1, 28, 28]"),
        (nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6, momentum=None), nn.ReLU(),
                       nn.Flatten(), nn.Linear(4056, 10)), [1, 28, 28], "model.1 (BatchNorm2d): "),
        (nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Linear(26, 10)),
         [1, 28, 28], "model (Sequential): ends in a [6, 26, 10] tensor; headroom's models end in one score"),
        (nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Upsample(scale_factor=2), nn.Flatten(),
                       nn.Linear(16224, 10)), [1, 28, 28], "model.2 (Upsample): headroom cannot describe"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.SiLU(inplace=True), nn.Linear(64, 10)),
         [1, 28, 28], "model.2 (SiLU): in-place silu"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 64)), [1, 28, 28], None),
        (Gated(), [3, 28, 28], "model (mul): combines 2 tensors; headroom's layers read one"),
        (Branchy(), [4], "its value is read outside the block it is in"),
        (Flow(), [4], "model (Flow): torch.fx cannot trace it"),
        (nn.Sequential(nn.Conv2d(1, 2, 3)), [1, 8, 8], "ends in a [2, 6, 6] tensor"),
    ],
)
def test_what_headroom_cannot_describe_is_named(model: nn.Module, shape: list[int], said: str | None) -> None:
    if said is None:  # a model that reads: the counterpart of the refusals
        assert job_from_torch(model, shape)["model"]["hidden_layers"] == []
        return
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


class TutorialLeNet(nn.Module):
    """LeNet-5 as PyTorch's tutorial writes it: functional pooling and a view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), (2, 2))
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(x)))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "model,shape,example",
    [
        (lenet5(), [1, 28, 28], "lenet5-mnist.json"),
        (TutorialLeNet(), [1, 28, 28], "lenet5-mnist.json"),
        (batch_norm_cnn(), [3, 32, 32], "cifar10-cnn-bn.json"),
    ],
)
def test_image_models_read_as_the_shipped_examples(
    server: str, model: nn.Module, shape: list[int], example: str
) -> None:
    shipped = json.loads((EXAMPLES / example).read_text())
    job = job_from_torch(model, shape, optimizer=shipped["optimizer"], precision=shipped["precision"])
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())
    # The same model in other words (AdaptiveAvgPool2d(1) and Flatten, or global_avg_pool2d).
    with Headroom(server) as client:
        read, written = (client.estimate(each, gpu="H100 80GB")["estimates"] for each in (job, shipped))
    assert read == written


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


class TinyLanguageModel(nn.Module):
    """Token ids through an embedding, a pre-norm block, and a head tied to the table."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(100, 16, padding_idx=0)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.final = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 100, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.lm_head(self.final(h))  # type: ignore[no-any-return]


def test_a_language_model_reads_over_tokens_with_its_tied_head(server: str) -> None:
    model = TinyLanguageModel()
    job = job_from_torch(model, [12], optimizer="adamw")
    assert job["model"]["tokens"] == {"sequence_length": 12, "vocab_size": 100}
    assert job["model"]["num_classes"] == 100
    assert job["model"]["layers"] == [
        {"embedding": {"embedding_dim": 16, "padding_idx": 0}},
        {"residual": {"layers": [{"layer_norm": {}}, {"linear": {"out_features": 32}}, {"gelu": {}},
                                 {"linear": {"out_features": 16}}]}},
        {"layer_norm": {}},
        {"linear": {"out_features": 100, "bias": False, "tied": True}},
    ]
    counted = sum(p.numel() for p in model.parameters())  # the shared table once
    assert parameter_count(job) == counted == 100 * 16 + 2 * 16 + 16 * 32 + 32 + 32 * 16 + 16 + 2 * 16
    with Headroom(server) as client:
        estimate = client.estimate(job, memory_bytes=1 << 30)["estimates"][0]["estimate"]
    assert estimate["parameter_count"] == counted
    assert estimate["recommended_tokens"] == 12 * estimate["recommended_batch_size"]


@pytest.mark.parametrize(
    "name,example",
    [
        ("resnet18", "resnet18-imagenet.json"),
        ("resnet50", "resnet50-imagenet.json"),
        ("vgg11_bn", "vgg11-bn-imagenet.json"),
        ("mobilenet_v2", "mobilenet-v2-imagenet.json"),
    ],
)
def test_torchvision_classifiers_read_as_the_shipped_examples(server: str, name: str, example: str) -> None:
    with torch.device("meta"):  # torchvision's own classes, with no weights allocated
        model = getattr(torchvision.models, name)()
    shipped = json.loads((EXAMPLES / example).read_text())
    job = job_from_torch(model, [3, 224, 224], optimizer=shipped["optimizer"],
                         precision=shipped["precision"], headroom=shipped["headroom"])
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())
    with Headroom(server) as client:
        read, written = (client.estimate(each, gpu="H100 80GB")["estimates"] for each in (job, shipped))
    assert read == written


def test_a_frozen_backbone_reads_as_frozen_layers(server: str) -> None:
    """A linear probe: torchvision's ResNet-18 with every parameter frozen but the new head's.
    Its stem and four stages are one ``frozen`` list (the parameter-free relu, pooling and
    flatten after them stay outside); the service trains the head's 5,130 parameters only."""
    with torch.device("meta"):
        model = torchvision.models.resnet18()
        model.requires_grad_(False)
        model.fc = nn.Linear(512, 10)
    job = job_from_torch(model, [3, 224, 224], optimizer="sgd_momentum")
    layers = job["model"]["layers"]
    assert [next(iter(layer)) for layer in layers] == ["frozen", "relu", "adaptive_avg_pool2d", "flatten", "linear"]
    assert parameter_count(job) == sum(p.numel() for p in model.parameters())
    with Headroom(server) as client:
        frozen, trained = (
            client.estimate(each, gpu="H100 80GB")["estimates"][0]["estimate"]
            for each in (job, job_from_torch(model.requires_grad_(True), [3, 224, 224], optimizer="sgd_momentum"))
        )
    assert frozen["trainable_parameter_count"] == 5_130
    assert trained["trainable_parameter_count"] == trained["parameter_count"] == frozen["parameter_count"]
    assert frozen["predicted_max_batch_size"] > trained["predicted_max_batch_size"]


def test_a_frozen_embedding_freezes_the_head_tied_to_it() -> None:
    model = TinyLanguageModel()
    model.wte.requires_grad_(False)
    model.norm.requires_grad_(False)
    layers = job_from_torch(model, [12])["model"]["layers"]
    assert layers[0] == {"frozen": {"layers": [{"embedding": {"embedding_dim": 16, "padding_idx": 0}}]}}
    # The block's norm is frozen, its linear layers are not: the block stays trained.
    assert layers[1]["residual"]["layers"][0] == {"frozen": {"layers": [{"layer_norm": {}}]}}
    assert layers[-1] == {"frozen": {"layers": [{"linear": {"out_features": 100, "bias": False, "tied": True}}]}}


def test_a_module_half_frozen_is_named() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    model[1].bias.requires_grad_(False)
    with pytest.raises(UnsupportedModel, match=r"model\.1 \(Linear\): freezes some of its parameters"):
        job_from_torch(model, [16])


def test_torchvision_vit_waits_for_transformers() -> None:
    with torch.device("meta"):
        model = torchvision.models.vit_b_16()
    with pytest.raises(UnsupportedModel, match=r"model \(class_token\): reads class_token directly"):
        job_from_torch(model, [3, 224, 224])


def test_hugging_face_models_read_from_their_configs(server: str) -> None:
    """A ``PreTrainedModel`` (built on the meta device: no weights) becomes its config, and the
    service's reading of it has PyTorch's parameter count, or the job is refused."""
    small: dict[str, Any] = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 100, "n_positions": 64}
    vit: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
           "image_size": 16, "patch_size": 4, "num_labels": 5}
    with torch.device("meta"):
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(**small))
        qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True))
        classifier = transformers.ViTForImageClassification(transformers.ViTConfig(**vit))
        headless = transformers.GPT2Model(transformers.GPT2Config(**small, tie_word_embeddings=False))
        eager = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**small, "attn_implementation": "eager"}))
    jobs = [(job_from_torch(gpt2, [16], optimizer="adamw"), gpt2),
            (job_from_torch(qwen2, [16]), qwen2),
            (job_from_torch(classifier, [3, 16, 16]), classifier)]
    assert jobs[0][0]["model"]["tokens"] == {"sequence_length": 16}
    assert jobs[0][0]["model"]["huggingface"]["model_type"] == "gpt2"
    with Headroom(server) as client:
        for job, model in jobs:
            estimate = client.estimate(job, memory_bytes=1 << 30)["estimates"][0]["estimate"]
            assert estimate["parameter_count"] == sum(p.numel() for p in model.parameters())
        # GPT2Model has no head: its config reads as the language model, whose untied head
        # the module does not have.
        with pytest.raises(HeadroomError, match="model.parameter_count"):
            client.estimate(job_from_torch(headless, [16]), memory_bytes=1 << 30)
        # The eager model materializes its scores: fewer sequences fit.
        eager_job = job_from_torch(eager, [16], optimizer="adamw")
        assert eager_job["model"]["huggingface"]["attn_implementation"] == "eager"
        fits = [client.estimate(job, memory_bytes=1 << 28)["estimates"][0]["estimate"]["predicted_max_batch_size"]
                for job in (jobs[0][0], eager_job)]
        assert fits[1] < fits[0], fits
    with pytest.raises(UnsupportedModel, match=r"reads images of \[3, 16, 16\]"):
        job_from_torch(classifier, [3, 32, 32])
    with pytest.raises(UnsupportedModel, match=r"\[sequence_length\]"):
        job_from_torch(gpt2, [4, 16])
    with torch.device("meta"):
        bert = transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModel, match="a Hugging Face 'bert' model"):
        job_from_torch(bert, [16])


def test_a_hugging_face_model_with_frozen_parameters_is_named() -> None:
    """Its config says nothing of what is frozen, so it is not read as if everything trained."""
    with torch.device("meta"):
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=100))
    gpt2.transformer.wpe.requires_grad_(False)
    with pytest.raises(UnsupportedModel, match=r"freezes 32768 of its parameters"):
        job_from_torch(gpt2, [16])


def test_a_peft_lora_model_and_gradient_checkpointing_are_read(server: str) -> None:
    """peft's LoRA around a Hugging Face model reads as its config with ``model.lora``, and the
    service counts the parameters peft counts; ``activation_checkpointing_enable()`` reads as
    ``model.gradient_checkpointing``, which fits more sequences, and a setting headroom does
    not read is named."""
    import peft

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
        adapted = peft.get_peft_model(
            transformers.LlamaForCausalLM(config),
            peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    base.activation_checkpointing_enable()
    trainable, total = adapted.get_nb_trainable_parameters()
    job = job_from_torch(adapted, [16])
    assert job["model"]["lora"] == {"r": 4, "lora_alpha": 16.0, "lora_dropout": 0.0,
                                    "target_modules": ["q_proj", "v_proj"]}
    checkpointed = job_from_torch(base, [16])
    assert checkpointed["model"]["gradient_checkpointing"] is True
    with Headroom(server) as client:
        estimate = client.estimate(job, memory_bytes=1 << 30)["estimates"][0]["estimate"]
        assert (estimate["parameter_count"], estimate["trainable_parameter_count"]) == (total, trainable)
        with torch.device("meta"):
            plain = job_from_torch(transformers.LlamaForCausalLM(config), [16])
        fits = [client.estimate(j, memory_bytes=1 << 26)["estimates"][0]["estimate"]["predicted_max_batch_size"]
                for j in (plain, checkpointed)]
        assert fits[1] > fits[0], fits
    adapted.get_parameter("base_model.model.model.norm.weight").requires_grad_(True)
    with pytest.raises(UnsupportedModel, match=r"trains base_model\.model\.model\.norm\.weight beside"):
        job_from_torch(adapted, [16])
    with torch.device("meta"):
        sparse = transformers.LlamaForCausalLM(config)
    sparse.activation_checkpointing_enable(every_n_layers=2)
    with pytest.raises(UnsupportedModel, match=r"checkpoints 1 of its 2 layers"):
        job_from_torch(sparse, [16])
    sparse.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(UnsupportedModel, match=r"use_reentrant=True"):
        job_from_torch(sparse, [16])

