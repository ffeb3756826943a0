"""Small networks the tests share."""
import torch
from torch import nn


def conv_bn_net(trained_bn_affine: bool = True) -> nn.Module:
    """Two conv-BN-ReLU layers and a classifier (eval mode), with BatchNorm statistics away from their init so that
    folding them is not a no-op; `trained_bn_affine` moves the BN weights too."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            if trained_bn_affine:
                bn.weight.uniform_(0.5, 1.5)
    return m.eval()
