"""Model building blocks and the RepOpt-VGG family."""
from .csla_conv import CSLAConv2d

__all__ = ["CSLAConv2d"]
