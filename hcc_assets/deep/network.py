"""The study's classifier: a MedicalNet-layout 3D ResNet trunk with a new 128-unit layer and one output.

Only layer4, the 128-unit layer and the output train; conv1..layer3 are frozen and always in eval
mode, which is what lets training run on cached layer3 activations (see `frozen_features`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, cast

import torch
from monai.networks.nets import ResNet, resnet10, resnet18, resnet34, resnet50
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

Depth = Literal[10, 18, 34, 50]
HeadActivation = Literal["relu", "none"]
TrunkLayout = Literal["monai", "medicalnet"]

SEEDED_RANDOM_INIT = "seeded-random (no MedicalNet checkpoint)"

# MedicalNet's pretrained shortcut per depth (its README and MONAI's get_medicalnet_pretrained_resnet_args):
# "B" is a 1x1 conv without bias; "A" is parameter-free zero padding, so its bias flag never matters.
_MEDICALNET_TRUNKS = {
    10: (resnet10, "B", False),
    18: (resnet18, "A", True),
    34: (resnet34, "A", True),
    50: (resnet50, "B", False),
}
# Modules of the MONAI ResNet that stay frozen, in forward order (the `act` module is shared).
FROZEN_TRUNK_MODULES = ("conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3")
# Keys a MedicalNet file carries that are not part of the trunk: its segmentation decoder.
_IGNORED_CHECKPOINT_PREFIXES = ("conv_seg.",)


def build_trunk(depth: Depth = 50, layout: TrunkLayout = "monai") -> ResNet:
    """A MONAI 3D ResNet with MedicalNet's parameter names and shapes, 1 input channel, no fc.

    conv1's stride is not in the state dict, so a wrong value would load MedicalNet weights silently:
    it is pinned to MedicalNet's 2 here. `layout="medicalnet"` additionally reproduces MedicalNet's
    own forward pass (layer3/layer4 with stride 1 and dilation 2/4, the layout its weights were
    trained in); MONAI's layout (strided layer3/layer4) is the default and ~60x cheaper in layer4.
    """
    if depth not in _MEDICALNET_TRUNKS:
        raise ValueError(f"depth must be one of {sorted(_MEDICALNET_TRUNKS)}, got {depth}")
    constructor, shortcut_type, bias_downsample = _MEDICALNET_TRUNKS[depth]
    trunk = constructor(
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type=shortcut_type,
        bias_downsample=bias_downsample,
        feed_forward=False,
    )
    if layout == "medicalnet":
        _dilate_like_medicalnet(trunk)
    elif layout != "monai":
        raise ValueError(f"layout must be 'monai' or 'medicalnet', got {layout!r}")
    return trunk


def _dilate_like_medicalnet(trunk: ResNet) -> None:
    """MedicalNet's layer3/layer4: stride 1, 3x3x3 convs dilated 2 and 4 (weight shapes unchanged)."""
    for layer, dilation in ((trunk.layer3, 2), (trunk.layer4, 4)):
        # Sequential yields plain Modules; these are MONAI's blocks, whose `downsample` may be a partial.
        for block in cast(Iterable[ResNetBlock | ResNetBottleneck], layer):
            for conv in block.modules():
                if isinstance(conv, nn.Conv3d):
                    conv.stride = (1, 1, 1)
                    if conv.kernel_size == (3, 3, 3):
                        conv.dilation = conv.padding = (dilation,) * 3
            shortcut = block.downsample
            if isinstance(shortcut, functools.partial):  # shortcut "A": pooling with a baked-in stride
                block.downsample = functools.partial(shortcut.func, **{**shortcut.keywords, "stride": 1})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles), as torch reports
    it; torch offers only private queries for this, and a torch without them counts as no. (The
    segmentation package asks the same; domain packages do not import each other.)"""
    queries = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(query() for query in queries if query is not None)


class HCCResNet(nn.Module):
    """3D ResNet trunk -> global average pool -> Linear(features, 128) -> activation -> Linear(128, 1).

    The study says only "a new fully connected layer with 128 units before the output". Without a
    nonlinearity the two linear layers would collapse into one linear map, so a ReLU follows the
    128-unit layer by default; the deep embedding is that layer's output after the activation
    (ReLU can leave units at zero, which the study's constant-feature filter is there to drop).
    """

    def __init__(
        self,
        depth: Depth = 50,
        embedding_dim: int = 128,
        head_activation: HeadActivation = "relu",
        layout: TrunkLayout = "monai",
    ) -> None:
        super().__init__()
        self.trunk = build_trunk(depth, layout)
        trunk_features = 2048 if depth >= 50 else 512
        self.embedding = nn.Linear(trunk_features, embedding_dim)
        self.activation = nn.ReLU() if head_activation == "relu" else nn.Identity()
        self.output = nn.Linear(embedding_dim, 1)
        self.init_description = SEEDED_RANDOM_INIT
        self.bfloat16_on_cpu = False  # see use_bfloat16_on_cpu
        self.architecture = dict(
            depth=depth, embedding_dim=embedding_dim, head_activation=head_activation, layout=layout
        )
        for parameter in self.frozen_parameters():
            parameter.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        return [getattr(self.trunk, name) for name in FROZEN_TRUNK_MODULES]

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.frozen_modules() for p in module.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.trunk.layer4.parameters(), *self.embedding.parameters(), *self.output.parameters()]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of everything training can change (layer4 incl. BatchNorm statistics, head)."""
        return {
            key: value.detach().clone()
            for key, value in self.state_dict().items()
            if key.startswith(("trunk.layer4.", "embedding.", "output."))
        }

    def train(self, mode: bool = True) -> HCCResNet:
        # The frozen part stays in eval mode (BatchNorm uses its pretrained statistics), also on the
        # naive path, so cached and full-forward training compute the same thing.
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def use_bfloat16_on_cpu(self, enabled: bool) -> None:
        """Compute the frozen trunk (conv1..layer3) in bfloat16 on channels-last volumes when it runs
        on a CPU with bfloat16 instructions (AVX512-BF16 or AMX): 8 volumes 128x128x64 in 1.4 s
        instead of 3.4 s on 2 cores. Only the frozen, forward-only part: its results are the same
        on every run, while bfloat16 weight gradients in layer4 were not (oneDNN, 2 of 2 repeated
        trainings differed), so layer4 and the head always train and run in float32."""
        self.bfloat16_on_cpu = enabled and cpu_has_native_bf16()
        layout = torch.channels_last_3d if self.bfloat16_on_cpu else torch.contiguous_format
        for module in self.frozen_modules():
            module.to(memory_format=layout)

    def frozen_features(self, volumes: torch.Tensor) -> torch.Tensor:
        """conv1..layer3: the activations the trunk cache stores, float32. Input (N, 1, X, Y, Z)."""
        trunk = self.trunk
        in_bf16 = self.bfloat16_on_cpu and volumes.device.type == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=in_bf16):
            if in_bf16:
                volumes = volumes.contiguous(memory_format=torch.channels_last_3d)
            x = trunk.act(trunk.bn1(trunk.conv1(volumes)))
            x = trunk.maxpool(x)
            x = trunk.layer3(trunk.layer2(trunk.layer1(x)))
        return x.to(torch.float32, memory_format=torch.contiguous_format) if in_bf16 else x

    def head(self, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """layer4 -> pool -> 128-unit layer -> output, from `frozen_features`: (logits (N,), embedding (N, 128))."""
        pooled = self.trunk.avgpool(self.trunk.layer4(frozen)).flatten(1)
        embedding = self.activation(self.embedding(pooled))
        return self.output(embedding).squeeze(1), embedding

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        """Logits, shape (N,)."""
        return self.head(self.frozen_features(volumes))[0]


def build_classifier(
    depth: Depth = 50,
    embedding_dim: int = 128,
    head_activation: HeadActivation = "relu",
    layout: TrunkLayout = "monai",
    seed: int = 0,
    medicalnet_checkpoint: str | Path | None = None,
) -> HCCResNet:
    """The classifier, initialized from `seed` (without touching the caller's RNG), then the
    MedicalNet trunk weights when a checkpoint is given (the head stays seeded-random)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HCCResNet(depth, embedding_dim, head_activation, layout)
    if medicalnet_checkpoint is not None:
        load_medicalnet_checkpoint(model, medicalnet_checkpoint)
    return model


class CheckpointMismatchError(ValueError):
    """A MedicalNet file does not fit the trunk (other depth, shortcut type or a foreign file)."""


def _listing(title: str, keys: list[str], limit: int) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{title} ({len(keys)}): {', '.join(keys[:limit])}{more}"


def load_medicalnet_checkpoint(model: HCCResNet, path: str | Path, max_listed: int = 10) -> str:
    """Load MedicalNet trunk weights (`{"state_dict": {"module.<name>": tensor}}`) strictly.

    The segmentation decoder (`conv_seg.*`) is ignored and our new head is left as initialized; any
    other missing or unexpected key, or any shape mismatch, raises CheckpointMismatchError naming
    the keys. A missing BatchNorm `num_batches_tracked` counter is tolerated: it is not a weight
    (files from before PyTorch 0.4.1 lack it). Returns and records `medicalnet:<sha256 of the file>`.
    """
    path = Path(path)
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    stored = torch.load(path, map_location="cpu", weights_only=True)
    stored = stored.get("state_dict", stored) if isinstance(stored, dict) else stored
    if not isinstance(stored, dict):
        raise CheckpointMismatchError(f"{path.name}: expected a state dict, found {type(stored).__name__}")
    weights = {
        key.removeprefix("module."): value
        for key, value in stored.items()
        if not key.removeprefix("module.").startswith(_IGNORED_CHECKPOINT_PREFIXES)
    }
    expected = model.trunk.state_dict()
    missing = [k for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [
        f"{k} file {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    found = {"missing trunk keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched}
    problems = [_listing(title, keys, max_listed) for title, keys in found.items() if keys]
    if problems:
        fit = f"a depth-{model.architecture['depth']} MedicalNet trunk"
        raise CheckpointMismatchError(f"{path.name} does not fit {fit}: " + "; ".join(problems))
    weights.update({k: v for k, v in expected.items() if k not in weights})  # the tolerated counters
    model.trunk.load_state_dict(weights, strict=True)
    model.init_description = f"medicalnet:{digest}"
    return model.init_description
