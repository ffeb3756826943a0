"""Proofs that gradient re-parameterization is exact, run as numerical experiments (tests and `repopt verify`).

Each case builds the explicit CSLA block (its own branch kernels, constant scales, trainable identity, one BN after the
sum) and trains it with the stock optimizer; next to it, the target conv + BN starts from the equivalent kernel and is
trained by the RepOpt optimizer on the same batches. After every step the CSLA block's equivalent kernel (MATH (1))
must equal the target kernel to float64 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .branches import IDENTITY, ConvGeometry
from .models.csla_conv import CSLAConv2d
from .optim import RepOptAdamW, RepOptLion, RepOptSGD

TOLERANCE = 1e-10

# Branch sets of the proofs: (label, conv branches, identity?, in_channels, out_channels, stride, groups)
BRANCH_SETS = {
    "3x3+1x1+identity": (("3x3", "1x1"), True, 6, 6, 1, 1),
    "3x3+1x1 stride 2": (("3x3", "1x1"), False, 4, 6, 2, 1),
    "3x3+3x3": (("3x3", "3x3_2"), False, 5, 5, 1, 1),
    "3x3+1x3+3x1": (("3x3", "1x3", "3x1"), True, 5, 5, 1, 1),
    "depthwise 3x3+identity": (("3x3",), True, 6, 6, 1, 6),
}

# Optimizer settings of the proofs: label -> (stock optimizer for the CSLA block, RepOpt optimizer, kwargs, extras)
OPTIMIZERS = {
    "sgd nesterov wd": (torch.optim.SGD, RepOptSGD,
                        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), {}),
    "sgd dampening cosine accum": (torch.optim.SGD, RepOptSGD,
                                   dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3),
                                   {"cosine": True, "accumulate": 2}),
    "sgd fused": (torch.optim.SGD, RepOptSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, fused=True), {}),
    "sgd no momentum": (torch.optim.SGD, RepOptSGD, dict(lr=0.05, weight_decay=1e-3), {}),
    # the cases above take RepOptSGD's default path (the native kernel on CPU where it builds); below, its eager block
    # path cut into one-row blocks (several scratch refills per step), its whole-tensor path and its compiled path;
    # "path" names the path a case proves, and the case fails when the optimizer took another one
    "sgd fused one-row blocks": (torch.optim.SGD, RepOptSGD,
                                 dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=True),
                                 {"repopt_kwargs": {"scratch_bytes": 1, "native": False}, "path": "blocks"}),
    "sgd foreach dampening one-row blocks": (torch.optim.SGD, RepOptSGD,
                                             dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3,
                                                  foreach=True),
                                             {"repopt_kwargs": {"scratch_bytes": 1, "native": False},
                                              "path": "blocks"}),
    "sgd no momentum one-row blocks": (torch.optim.SGD, RepOptSGD, dict(lr=0.05, weight_decay=1e-3),
                                       {"repopt_kwargs": {"scratch_bytes": 1, "native": False}, "path": "blocks"}),
    "sgd compiled nesterov": (torch.optim.SGD, RepOptSGD,
                              dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                              {"repopt_kwargs": {"compiled": True}, "path": "compiled"}),
    "sgd compiled dampening": (torch.optim.SGD, RepOptSGD,
                               dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3),
                               {"repopt_kwargs": {"compiled": True}, "path": "compiled"}),
    "sgd whole tensors": (torch.optim.SGD, RepOptSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                          {"repopt_kwargs": {"scratch_bytes": 0, "native": False}, "path": "whole"}),
    "adamw": (torch.optim.AdamW, RepOptAdamW, dict(lr=2e-3, weight_decay=0.05), {}),
    "adamw amsgrad": (torch.optim.AdamW, RepOptAdamW, dict(lr=2e-3, weight_decay=0.05, amsgrad=True), {}),
    "lion": (RepOptLion, RepOptLion, dict(lr=2e-4, weight_decay=0.1), {}),
    # the cases above take the native kernels on CPU where they build; their eager paths:
    "adamw eager": (torch.optim.AdamW, RepOptAdamW, dict(lr=2e-3, weight_decay=0.05),
                    {"repopt_kwargs": {"native": False}, "path": "eager"}),
    "lion eager": (RepOptLion, RepOptLion, dict(lr=2e-4, weight_decay=0.1),
                   {"repopt_kwargs": {"native": False}, "path": "eager"}),
    # the multi-tensor Triton kernels (the default for CUDA weights; on CPU tensors under TRITON_INTERPRET=1)
    "sgd triton": (torch.optim.SGD, RepOptSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                   {"repopt_kwargs": {"triton": True}, "path": "triton"}),
    "sgd triton dampening": (torch.optim.SGD, RepOptSGD, dict(lr=0.05, momentum=0.8, dampening=0.1,
                                                              weight_decay=1e-3),
                             {"repopt_kwargs": {"triton": True}, "path": "triton"}),
    "adamw triton amsgrad": (torch.optim.AdamW, RepOptAdamW, dict(lr=2e-3, weight_decay=0.05, amsgrad=True),
                             {"repopt_kwargs": {"triton": True}, "path": "triton"}),
    "lion triton": (RepOptLion, RepOptLion, dict(lr=2e-4, weight_decay=0.1),
                    {"repopt_kwargs": {"triton": True}, "path": "triton"}),
}


def expected_path(optimizer: str, device="cpu") -> str:
    """The path of the target weights that case `optimizer` claims to prove: named in its settings, else the
    optimizer's default on `device` (CPU: the native kernel where it builds; CUDA: Triton where it imports; else
    RepOptSGD's blocks or the others' eager path)."""
    from .optim import native, triton_kernels

    _, repopt_cls, _, extras = OPTIMIZERS[optimizer]
    device = torch.device(device)
    if "path" in extras:
        return extras["path"]
    if device.type == "cpu" and native.available():
        return "native"
    if device.type == "cuda" and triton_kernels.usable(device) is None:
        return "triton"
    return "blocks" if repopt_cls is RepOptSGD else "eager"


def unavailable(optimizer: str, device="cpu") -> str | None:
    """Why case `optimizer` cannot run on `device` here (None: it can): the Triton cases need triton (and, on CPU
    tensors, its interpreter)."""
    from .optim import triton_kernels

    if OPTIMIZERS[optimizer][3].get("path") == "triton":
        return triton_kernels.usable(torch.device(device))
    return None


@dataclass
class ProofResult:
    optimizer: str
    branches: str
    steps: int
    max_rel_err: float
    errors: list[float] = field(default_factory=list, repr=False)
    paths: list[str] = field(default_factory=list)  # the paths that updated the target weight, over all steps
    expected_path: str = ""

    @property
    def path_ok(self) -> bool:
        """Did every step take the path the case claims (the optimizer's record, not its settings)?"""
        return self.paths == [self.expected_path]

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= TOLERANCE and self.path_ok

    def as_dict(self) -> dict:
        return {"optimizer": self.optimizer, "branches": self.branches, "steps": self.steps,
                "max_rel_err": self.max_rel_err, "path": "+".join(self.paths), "expected_path": self.expected_path,
                "ok": self.ok}


def _scales(names, out_channels: int, gen: torch.Generator, negative: bool) -> dict:
    scales = {}
    for i, b in enumerate(names):
        s = 0.5 + torch.rand(out_channels, generator=gen, dtype=torch.float64)
        if negative and i < 2:
            s[i::3] *= -1  # some channels negative, as in the released scales
        scales[b] = s
    return scales


def build_pair(branch_set: str, seed: int = 0, negative: bool = True, zero_scales: bool = False):
    """The explicit CSLA block (+BN) and the target conv (+BN) at the equivalent starting point, in float64."""
    names, identity, cin, cout, stride, groups = BRANCH_SETS[branch_set]
    geometry = ConvGeometry(cout, cin, (3, 3), (stride, stride), (1, 1), (1, 1), groups)
    return build_pair_for(geometry, [*names, *[IDENTITY] * identity], seed, negative, zero_scales)


def build_pair_for(geometry: ConvGeometry, branches, seed: int = 0, negative: bool = True, zero_scales: bool = False):
    """build_pair for any conv geometry and branch set (e.g. a block of a real network: `repopt.to_target` declares
    the branch set of each of its convs)."""
    names, identity = [b for b in branches if b != IDENTITY], IDENTITY in branches
    cin, cout = geometry.in_channels, geometry.out_channels
    gen = torch.Generator().manual_seed(seed)
    scales = _scales(names, cout, gen, negative)
    if zero_scales:
        scales = {b: torch.zeros(cout, dtype=torch.float64) for b in names}
    torch.manual_seed(seed)
    csla_conv = CSLAConv2d(cin, cout, geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation,
                           geometry.groups, branches=scales, identity=identity, trainable_scales=False).double()
    for b, s in scales.items():  # keep the float64 scales exactly (the constructor stores float32)
        setattr(csla_conv, f"scale_{b}", s.clone())
    if identity:
        with torch.no_grad():
            csla_conv.identity.copy_(0.5 + torch.rand(cout, generator=gen, dtype=torch.float64))
    csla = nn.Sequential(csla_conv, nn.BatchNorm2d(cout)).double()
    target = nn.Sequential(csla_conv.to_target(), nn.BatchNorm2d(cout)).double()
    entry = dict(scales)
    if identity:
        entry[IDENTITY] = csla_conv.identity.detach().clone()
    return csla, target, {"0": entry}


def _batches(cin: int, n: int, gen: torch.Generator):
    return [(torch.randn(4, cin, 7, 7, generator=gen, dtype=torch.float64),
             torch.randn(4, 1, 1, 1, generator=gen, dtype=torch.float64)) for _ in range(n)]


def _loss(model: nn.Module, x, y, head):
    out = torch.relu(model(x))
    return ((out * head).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True) - y).square().mean()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def run_proof(optimizer: str, branch_set: str, steps: int = 200, seed: int = 0, device="cpu",
              pair=None) -> ProofResult:
    """pair: (csla, target, scales) from build_pair_for to prove another block than BRANCH_SETS[branch_set] (then
    branch_set is only its label)."""
    stock_cls, repopt_cls, kwargs, extras = OPTIMIZERS[optimizer]
    csla, target, scales = build_pair(branch_set, seed) if pair is None else pair
    csla, target = csla.to(device), target.to(device)
    cout, cin = csla[0].geometry.out_channels, csla[0].geometry.in_channels
    gen = torch.Generator().manual_seed(seed + 1)
    head = torch.randn(1, cout, 1, 1, generator=gen, dtype=torch.float64).to(device)
    batches = [(x.to(device), y.to(device)) for x, y in _batches(cin, 8, gen)]

    stock = stock_cls(csla.parameters(), **kwargs)
    rep = repopt_cls.from_scales(target, scales, reinit=False, params=list(target.parameters()), **kwargs,
                                 **extras.get("repopt_kwargs", {}))
    scheds = []
    if extras.get("cosine"):
        scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps) for o in (stock, rep)]
    accumulate = extras.get("accumulate", 1)

    errors, paths = [], set()
    for step in range(steps):
        for model, opt in ((csla, stock), (target, rep)):
            opt.zero_grad(set_to_none=True)
            for k in range(accumulate):
                x, y = batches[(step * accumulate + k) % len(batches)]
                (_loss(model, x, y, head) / accumulate).backward()
            opt.step()
        paths.update(rep.last_step_paths)
        for s in scheds:
            s.step()
        with torch.no_grad():
            errors.append(rel_err(target[0].weight, csla[0].equivalent_kernel()))
    return ProofResult(optimizer, branch_set, steps, max(errors), errors, sorted(paths),
                       expected_path(optimizer, device))


def run_all(steps: int = 200, seed: int = 0, progress: bool = False) -> list[ProofResult]:
    cases = [(o, b) for o in OPTIMIZERS for b in BRANCH_SETS]
    if progress:
        from tqdm import tqdm

        cases = tqdm(cases, desc="proofs", unit="case")
    return [run_proof(o, b, steps, seed) for o, b in cases]
