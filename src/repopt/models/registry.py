"""Model names -> builders: `repopt.models.create(name, mode=..., num_classes=...)` and `list_models()`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .ghostnet import MODES as GHOSTNET_MODES, RepOptGhostNet
from .vgg import CONFIGS, MODES as VGG_MODES, RepOptVGG

@dataclass(frozen=True)
class ModelInfo:
    """One registered architecture, as data (the way timm keeps its default_cfgs).

    image_size: the input size it is made for (the paper's ImageNet models 224; the CPU presets 32 or 28); a run
        uses its dataset's size unless --image-size says otherwise.
    scales_file: the name of the released hyper-search scales file that fits it (../shared/official-scales,
        published with the paper's reference code), where there is one.
    paper_top1 / paper_source: the paper's ImageNet top-1 (%) for RepOpt training of this model, and where it is
        stated; None where the paper gives none.
    """

    name: str
    builder: Callable[..., nn.Module]
    modes: tuple[str, ...]
    image_size: int
    description: str
    scales_file: str | None = None
    paper_top1: float | None = None
    paper_source: str | None = None


_MODELS: dict[str, ModelInfo] = {}


def register(name: str, builder: Callable[..., nn.Module], modes: tuple[str, ...] = VGG_MODES,
             image_size: int = 224, description: str = "", **metadata) -> None:
    """Add a builder `builder(mode=..., num_classes=..., **options) -> nn.Module` under `name`; `modes`: the modes
    it builds; `metadata`: the other fields of ModelInfo."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = ModelInfo(name, builder, tuple(modes), image_size, description, **metadata)


def model_info(name: str) -> ModelInfo:
    """The metadata of a registered model (ValueError naming the known ones otherwise)."""
    check_name(name)
    if name not in _MODELS:
        raise ValueError(f"{name!r} is a timm model: repopt keeps no metadata for it (see timm's own)")
    return _MODELS[name]


def list_models() -> list[str]:
    """The registered names; any `timm:NAME` timm can build is accepted too (repopt.integrations.timm)."""
    return sorted(_MODELS)


def supported_modes(name: str) -> tuple[str, ...]:
    """The modes `create(name, mode=...)` builds: 'repvgg' only for a model with a multi-branch training form."""
    from ..integrations import timm as timm_models

    check_name(name)
    if timm_models.is_timm_arch(name):
        return tuple(m for m in timm_models.MODES if m != "repvgg" or timm_models.has_multi_branch_form(name))
    return _MODELS[name].modes


def check_name(name: str) -> None:
    """Raise ValueError unless `name` is a registered model or a `timm:NAME` that timm (installed) can build."""
    from ..integrations import timm as timm_models

    if timm_models.is_timm_arch(name):
        timm_models.check_arch(name)
    elif name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())} (or timm:NAME with timm "
                         f"installed)")


def create(name: str, mode: str = "target", num_classes: int = 1000, scales=None, **options) -> nn.Module:
    """Build a registered model, or `timm:NAME` (timm installed; repopt.integrations.timm.create: modes target, hs,
    repvgg).

    mode: 'target' (conv-BN-ReLU, what RepOpt trains), 'hs' (trainable branch scales), 'csla' (constant conv-branch
    scales, trainable identity) or 'repvgg' (structural re-parameterization baseline; VGG family only).
    scales: for 'hs'/'csla', a repopt.Scales (or path) whose values replace the initial scales.
    options: passed to the builder, e.g. strides=(1, 1, 2, 2, 2) or in_channels=1 for RepOpt-VGG.
    """
    from ..integrations import timm as timm_models

    check_name(name)
    if timm_models.is_timm_arch(name):
        model = timm_models.create(name, mode=mode, num_classes=num_classes, **options)
    else:
        model = _MODELS[name].builder(mode=mode, num_classes=num_classes, **options)
    if scales is not None:
        if mode not in ("hs", "csla"):
            raise ValueError(f"scales= only applies to modes 'hs' and 'csla' (got mode {mode!r}); a target model "
                             f"takes its scales through the optimizer (RepOptSGD.from_scales)")
        from .csla_conv import set_scales

        set_scales(model, scales)
    return model


def _vgg(name: str):
    def build(mode: str = "target", num_classes: int = 1000, **options) -> nn.Module:
        return RepOptVGG(CONFIGS[name], mode=mode, num_classes=num_classes, arch=name, **options)
    return build


def _ghostnet_0_5x(mode: str = "target", num_classes: int = 1000, **options) -> nn.Module:
    return RepOptGhostNet(0.5, mode, num_classes, arch="repopt_ghostnet_0_5x", **options)


# The paper's Table 2: ImageNet top-1 of RepOpt-VGG trained at batch 32 (RepVGG's figures beside them there).
_TABLE2 = "the paper's Table 2 (ImageNet, batch 32)"

register("repopt_vgg_a0", _vgg("repopt_vgg_a0"), description="RepVGG-A0's widths, 22 layers; the CLI's default")
register("repopt_vgg_a1", _vgg("repopt_vgg_a1"), description="RepVGG-A1's widths, 22 layers")
register("repopt_vgg_a2", _vgg("repopt_vgg_a2"), description="RepVGG-A2's widths, 22 layers")
register("repopt_vgg_b0", _vgg("repopt_vgg_b0"), description="RepVGG-B0's widths, 28 layers")
register("repopt_vgg_b1", _vgg("repopt_vgg_b1"), description="RepVGG-B1's widths, 28 layers",
         scales_file="RepOpt-VGG-B1-scales.pth", paper_top1=78.47, paper_source=_TABLE2)
register("repopt_vgg_b2", _vgg("repopt_vgg_b2"), description="RepVGG-B2's widths, 28 layers",
         scales_file="RepOpt-VGG-B2-scales.pth", paper_top1=79.36, paper_source=_TABLE2)
register("repopt_vgg_b3", _vgg("repopt_vgg_b3"), description="RepVGG-B3's widths, 28 layers")
register("repopt_vgg_l1", _vgg("repopt_vgg_l1"), description="B1's widths, 48 layers",
         scales_file="RepOpt-VGG-L1-scales.pth", paper_top1=79.46, paper_source=_TABLE2)
register("repopt_vgg_l2", _vgg("repopt_vgg_l2"), description="B2's widths, 48 layers",
         scales_file="RepOpt-VGG-L2-scales.pth", paper_top1=80.29, paper_source=_TABLE2)
register("repopt_vgg_l0", _vgg("repopt_vgg_l0"), image_size=28,
         description="CPU preset: 48 layers at half of B0's widths (not in the paper)")
register("repopt_vgg_tiny", _vgg("repopt_vgg_tiny"), image_size=32, description="CPU preset, 7 layers")
register("repopt_vgg_small", _vgg("repopt_vgg_small"), image_size=32, description="CPU preset, 10 layers")
register("repopt_ghostnet_0_5x", _ghostnet_0_5x, GHOSTNET_MODES,
         description="RepOpt-GhostNet 0.5x: depthwise target convs (no multi-branch training form here)",
         scales_file="RepOptGhostNet_0_5x_scales.pth")
