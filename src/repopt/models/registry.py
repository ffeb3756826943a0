"""Model names -> builders: `repopt.models.create(name, mode=..., num_classes=...)` and `list_models()`."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .ghostnet import MODES as GHOSTNET_MODES, RepOptGhostNet
from .vgg import CONFIGS, MODES as VGG_MODES, RepOptVGG

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_MODES: dict[str, tuple[str, ...]] = {}


def register(name: str, builder: Callable[..., nn.Module], modes: tuple[str, ...] = VGG_MODES) -> None:
    """Add a builder `builder(mode=..., num_classes=..., **options) -> nn.Module` under `name`; `modes`: the modes
    it builds."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = builder
    _MODES[name] = tuple(modes)


def list_models() -> list[str]:
    """The registered names; any `timm:NAME` timm can build is accepted too (repopt.integrations.timm)."""
    return sorted(_REGISTRY)


def supported_modes(name: str) -> tuple[str, ...]:
    """The modes `create(name, mode=...)` builds: 'repvgg' only for a model with a multi-branch training form."""
    from ..integrations import timm as timm_models

    check_name(name)
    if timm_models.is_timm_arch(name):
        return tuple(m for m in timm_models.MODES if m != "repvgg" or timm_models.has_multi_branch_form(name))
    return _MODES[name]


def check_name(name: str) -> None:
    """Raise ValueError unless `name` is a registered model or a `timm:NAME` that timm (installed) can build."""
    from ..integrations import timm as timm_models

    if timm_models.is_timm_arch(name):
        timm_models.check_arch(name)
    elif name not in _REGISTRY:
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
        model = _REGISTRY[name](mode=mode, num_classes=num_classes, **options)
    if scales is not None:
        if mode not in ("hs", "csla"):
            raise ValueError(f"scales= only applies to modes 'hs' and 'csla' (got mode {mode!r}); a target model "
                             f"takes its scales through the optimizer (RepOptSGD.from_scales)")
        from .csla_conv import set_scales

        set_scales(model, scales)
    return model


def _vgg_builder(name: str):
    def build(mode: str = "target", num_classes: int = 1000, **options) -> nn.Module:
        return RepOptVGG(CONFIGS[name], mode=mode, num_classes=num_classes, arch=name, **options)
    return build


for _name in CONFIGS:
    register(_name, _vgg_builder(_name))


def _ghostnet_0_5x(mode: str = "target", num_classes: int = 1000, **options) -> nn.Module:
    return RepOptGhostNet(0.5, mode, num_classes, arch="repopt_ghostnet_0_5x", **options)


register("repopt_ghostnet_0_5x", _ghostnet_0_5x, GHOSTNET_MODES)
