"""timm models in repopt: `timm:NAME` architectures, released scales on timm's names, and timm's optimizer factory.

timm stays optional: nothing here imports it before a function needs it.

    model = repopt.integrations.timm.create("timm:repvgg_a0", mode="target", num_classes=10)
    # = repopt.to_target(timm.create_model("repvgg_a0", pretrained=False, num_classes=10))
    scales = repopt.integrations.timm.scales_for(repopt.load_scales("RepOpt-VGG-B1-scales.pth"), "timm:repvgg_b1")
    opt = repopt.integrations.timm.create_optimizer_v2(model, "sgd", scales=scales, lr=0.1, weight_decay=4e-5)
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

PREFIX = "timm:"
MODES = ("target", "hs", "repvgg")
# timm.create_model's options that read weights from disk or the hub
_FILE_OPTIONS = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}


class TimmError(ValueError):
    """timm is missing, or a timm model name or mode repopt cannot build."""


def is_timm_arch(arch: str) -> bool:
    return isinstance(arch, str) and arch.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError as e:  # timm, or torchvision under it
        raise TimmError(f"timm: architectures need timm, which cannot be imported here ({e}); pip install timm") \
            from None
    return timm


def check_arch(arch: str) -> None:
    """Raise TimmError unless `arch` names a model timm can build here."""
    name = arch[len(PREFIX):]
    if name not in _timm().list_models():
        raise TimmError(f"unknown timm model {name!r} (see timm.list_models())")


def _has_multi_branch_blocks(model: nn.Module) -> bool:
    from ..convert import CONVERTERS, _key

    return any(_key(m) in CONVERTERS for m in model.modules())


def has_multi_branch_form(arch: str) -> bool:
    """Does `timm:NAME` train multi-branch blocks repopt knows (and so has a RepVGG-style baseline)?"""
    import torch

    check_arch(arch)
    with torch.device("meta"):  # the module types only
        return _has_multi_branch_blocks(_timm().create_model(arch[len(PREFIX):], pretrained=False))


def create(arch: str, mode: str = "target", num_classes: int = 1000, **options: Any) -> nn.Module:
    """Build `timm:NAME` fresh (pretrained=False: nothing downloads, the pretrained config is ignored) in a repopt mode.

    mode: 'target' (`repopt.to_target`: the plain conv-BN network RepOpt trains), 'hs' (its hyper-search model) or
    'repvgg' (timm's own multi-branch training form: the structural re-parameterization baseline; only for families
    that have one). options: passed to timm.create_model (e.g. in_chans=1, drop_rate=0.1).
    """
    from ..convert import ConversionError, to_target
    from ..search import to_hyper_search

    check_arch(arch)
    if mode not in MODES:
        raise TimmError(f"{arch}: mode {mode!r} is not available for timm models; choose one of {', '.join(MODES)}")
    loading = sorted(_FILE_OPTIONS & set(options))  # options can come from a file's config (`repopt eval FILE`)
    if loading:
        raise TimmError(f"{arch}: option {loading[0]!r} would make timm load a file (timm unpickles checkpoints, "
                        f"which could run code); repopt builds timm models fresh (load weights with --init-from)")
    options = {**options, "pretrained": False, "num_classes": num_classes}
    model = _timm().create_model(arch[len(PREFIX):], **options)
    try:
        if mode == "repvgg":
            if not _has_multi_branch_blocks(model):
                raise TimmError(f"{arch} has no re-parameterizable multi-branch blocks, so it has no RepVGG-style "
                                f"baseline (train it with --method plain)")
        else:
            model = to_target(model)
            if mode == "hs":
                model = to_hyper_search(model)
    except ConversionError as e:
        raise TimmError(f"{arch}: {e}") from None
    model.arch = arch
    return model


# ---- released scales on timm's names ---------------------------------------------------------------------------------
_VGG_KEY = re.compile(r"^(?:stage0|stage(?P<stage>[1-9])\.(?P<block>\d+))\.(?P<part>[a-z_0-9]+)(?P<rest>(\..+)?)$")
# RepOpt-VGG block parts (RepVGG, target and HS/CSLA modes) -> timm byobnet RepVggBlock parts
_VGG_PARTS = {"conv_3x3": "conv_kxk.conv", "bn_3x3": "conv_kxk.bn", "conv_1x1": "conv_1x1.conv",
              "bn_1x1": "conv_1x1.bn", "bn_identity": "identity", "conv": "conv_kxk.conv", "bn": "conv_kxk.bn"}


def repvgg_name(name: str) -> str | None:
    """A RepOpt-VGG module or state-dict name -> timm's RepVGG name, or None when it is not one.

    timm's byobnet RepVGG (repvgg_a0 ... repvgg_b3) is RepOpt-VGG in RepVGG mode block for block: stage0 -> stem,
    stageK.i -> stages.{K-1}.i, conv_3x3/bn_3x3 -> conv_kxk.conv/.bn, conv_1x1/bn_1x1 -> conv_1x1.conv/.bn,
    bn_identity -> identity, linear -> head.fc; the target conv `stageK.i.conv` -> `stages.{K-1}.i.conv_kxk.conv`.
    """
    if name.startswith("linear."):
        return "head.fc." + name[len("linear."):]
    m = _VGG_KEY.match(name)
    if m is None or m.group("part") not in _VGG_PARTS:
        return None
    block = "stem" if m.group("stage") is None else f"stages.{int(m.group('stage')) - 1}.{m.group('block')}"
    return f"{block}.{_VGG_PARTS[m.group('part')]}{m.group('rest')}"


def scales_for(scales, arch: str):
    """`scales` keyed for the timm model `arch`: RepOpt-VGG names (released B1/B2/L1/L2 files, our own searches on
    repopt_vgg_*) become timm RepVGG names; names that already are the timm model's (RepOpt-GhostNet's
    `blocks.S.B.ghostN.cheap_operation.0` are also timm RepGhostNet's) stay. Validation is `Scales.bind`'s job."""
    from ..scales import Scales, as_scales

    scales = as_scales(scales)
    renamed = {repvgg_name(n) for n in scales}
    if None in renamed:  # not RepOpt-VGG names: keep them as they are
        return Scales({n: e for n, e in scales.items()}, {**scales.metadata, "arch": arch})
    return Scales({repvgg_name(n): e for n, e in scales.items()}, {**scales.metadata, "arch": arch})


# ---- timm's optimizer factory ------------------------------------------------------------------------------------------
def optimizer_registry():
    """A timm `OptimizerRegistry` (public class, separate from timm's default one) whose names build RepOpt optimizers:
    'sgd' / 'nesterov' (nesterov momentum, timm's default for 'sgd'), 'momentum' (plain momentum), 'adamw', 'lion'."""
    from timm.optim import OptimInfo, OptimizerRegistry

    from ..optim import RepOptAdamW, RepOptLion, RepOptSGD

    registry = OptimizerRegistry()
    for name, nesterov in (("sgd", True), ("nesterov", True), ("momentum", False)):
        registry.register(OptimInfo(name, RepOptSGD, "RepOpt SGD", has_eps=False, has_momentum=True,
                                    defaults={"nesterov": nesterov}))
    registry.register(OptimInfo("adamw", RepOptAdamW, "RepOpt AdamW (exact, MATH (4))", has_betas=True))
    registry.register(OptimInfo("lion", RepOptLion, "RepOpt Lion", has_eps=False, has_betas=True))
    return registry


def create_optimizer_v2(model: nn.Module, opt: str = "sgd", *, scales, reinit: bool = True,
                        identity_init: str | float = "searched", force_reinit: bool = False, strict: bool = True,
                        **kwargs: Any):
    """`timm.optim.create_optimizer_v2(model, opt, ...)` for RepOpt: the same arguments (lr, weight_decay, momentum,
    layer_decay, param_group_fn, filter_bias_and_bn, ...), timm's parameter groups, plus `scales`.

    timm's factory hands the optimizer class parameters only, so the multipliers must come from here: the scales are
    bound to `model` (strictly, naming the layer on a mismatch), the rule of initialization is applied once (as
    `RepOptSGD.from_scales` does), and the multipliers reach the RepOpt class through timm's keyword pass-through.
    opt: 'sgd', 'nesterov', 'momentum', 'adamw' or 'lion' ('lookahead_' in front works as in timm).

    Note timm's name rule: only what follows the LAST underscore names the optimizer ('repopt_sgd' is read as 'sgd'
    with a prefix). Registering a RepOpt class as 'repopt_sgd' in timm's own registry would therefore give torch's SGD
    without a word; use this function (or `optimizer_registry()`) instead.
    """
    from ..reinit import apply_rule_of_initialization
    from ..scales import as_scales

    _timm()
    bound = as_scales(scales).bind(model, strict=strict)
    if reinit:
        apply_rule_of_initialization(model, bound, identity_init=identity_init, force=force_reinit)
    mults = {conv.weight: bs for conv, bs in bound.values()}
    registry = optimizer_registry()
    name = opt.lower().split("_")[-1]
    if name not in registry.list_optimizers():
        raise TimmError(f"create_optimizer_v2: {opt!r} has no RepOpt form; choose one of "
                        f"{', '.join(registry.list_optimizers())}")
    return registry.create_optimizer(model, opt, grad_mults=mults, **kwargs)
