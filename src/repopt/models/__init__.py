"""Model building blocks, the RepOpt-VGG family (configs as data) and RepOpt-GhostNet."""
from .blocks import CSLABlock, TargetBlock
from .csla_conv import CSLAConv2d
from .ghostnet import RepOptGhostNet
from .registry import create, list_models, register
from .repvgg_block import RepVGGBlock, reparameterize_model
from .vgg import CONFIGS, RepOptVGG, VGGConfig
from ..targets import target_convs  # the one definition, re-exported beside the models that declare theirs


__all__ = ["CSLAConv2d", "CSLABlock", "TargetBlock", "RepVGGBlock", "RepOptVGG", "RepOptGhostNet", "VGGConfig",
           "CONFIGS", "create", "list_models", "register", "reparameterize_model", "target_convs"]
