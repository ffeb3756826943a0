"""Model building blocks, the RepOpt-VGG family (configs as data) and RepOpt-GhostNet."""
from .blocks import CSLABlock, TargetBlock
from .csla_conv import CSLAConv2d
from .ghostnet import RepOptGhostNet
from .registry import create, list_models, register
from .repvgg_block import RepVGGBlock, reparameterize_model
from .vgg import CONFIGS, RepOptVGG, VGGConfig


def target_convs(model) -> list[str]:
    """The convs a model trains with branch scales: its own `target_conv_names()` when it has one (our models), else
    repopt.find_target_convs(model) (every kxk conv without bias that feeds a BatchNorm)."""
    if hasattr(model, "target_conv_names"):
        return list(model.target_conv_names())
    from ..targets import find_target_convs

    return find_target_convs(model)


__all__ = ["CSLAConv2d", "CSLABlock", "TargetBlock", "RepVGGBlock", "RepOptVGG", "RepOptGhostNet", "VGGConfig",
           "CONFIGS", "create", "list_models", "register", "reparameterize_model", "target_convs"]
