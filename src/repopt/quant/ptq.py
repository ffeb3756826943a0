"""INT8 post-training quantization and QAT on CPU with torchao's PT2E flow, lowered to real x86 int8 kernels.

    torch.export -> prepare_pt2e / prepare_qat_pt2e (X86InductorQuantizer) -> calibrate or fine-tune
    -> convert_pt2e -> lower_pt2e_quantized_to_x86 (oneDNN qconv/qlinear)

Without the lowering step the converted graph runs reference quantize/dequantize ops and is slower than fp32.
torchao is the optional `quant` extra and is imported only when a function here needs it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._extras import MissingExtraError, quiet, require
from .fold import fold_batchnorm


class QuantDependencyError(MissingExtraError):
    """torchao (the `quant` extra) is not installed."""


@functools.cache
def _torchao() -> SimpleNamespace:
    # On a CPU-only torch torchao's CUDA extension files cannot load and each one logs a warning; skip them.
    if torch.version.cuda is None:
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    with quiet("torchao", "torch.utils._pytree"):
        mods = [require(f"torchao.quantization.pt2e{sub}", "quant", "INT8 quantization", QuantDependencyError)
                for sub in ("", ".quantize_pt2e", ".lowering", ".quantizer.x86_inductor_quantizer")]
    pt2e, quantize_pt2e, lowering, xiq = mods
    return SimpleNamespace(pt2e=pt2e, qp=quantize_pt2e, xiq=xiq, lower=lowering.lower_pt2e_quantized_to_x86)


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI int8 dot products (without them u8*s8 products can saturate: use reduce_range)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
    except OSError:  # not Linux: torch only tells us the vector ISA; AVX512-era CPUs mostly have VNNI
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@dataclass(frozen=True)
class QuantSettings:
    """How a model is quantized. Every field lands in the output JSON through `to_dict()`.

    per_channel: one weight scale per output channel (True) or one per tensor (False). Per-tensor weights are run by
        the same per-channel int8 kernel with all channel scales equal, so both settings get real int8 kernels.
    reduce_range: activations use 7 bits (0..127). None = auto: True when the CPU lacks VNNI, as oneDNN advises.
    activation_observer: "histogram" (torchao's x86 default, minimizes quantization error) or "minmax".
    calib_batches: at most this many batches are read from the calibration iterable.
    is_qat: set by `quantize_qat`; `quantize_ptq` refuses it.
    qat_epochs, qat_lr, qat_momentum, qat_weight_decay: the QAT fine-tune (SGD) on the BN-folded model.
    qat_freeze_observers: fraction of QAT steps after which the quantization ranges stop moving (needs len()).
    """

    per_channel: bool = True
    reduce_range: bool | None = None
    activation_observer: str = "histogram"
    calib_batches: int = 32
    is_qat: bool = False
    qat_epochs: int = 1
    qat_lr: float = 1e-4
    qat_momentum: float = 0.9
    qat_weight_decay: float = 0.0
    qat_freeze_observers: float = 0.5

    def __post_init__(self):
        if self.activation_observer not in ("histogram", "minmax"):
            raise ValueError(f"activation_observer must be 'histogram' or 'minmax', not {self.activation_observer!r}")
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches must be at least 1, not {self.calib_batches}")

    def resolved(self) -> "QuantSettings":
        """A copy with `reduce_range` decided for this CPU."""
        if self.reduce_range is not None:
            return self
        return dataclasses.replace(self, reduce_range=not cpu_has_vnni())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self.resolved())
        if self.is_qat:  # QAT fake-quant tracks moving-average ranges whatever the PTQ observer setting says
            d["activation_observer"] = "moving-average minmax (QAT)"
            del d["calib_batches"]  # QAT reads its ranges off the fine-tune batches
        else:
            d = {k: v for k, v in d.items() if not k.startswith("qat_")}
        d.update(quantizer="torchao X86InductorQuantizer (PT2E), lowered to oneDNN int8",
                 weights="int8 symmetric", activations="uint8 affine per tensor", cpu_vnni=cpu_has_vnni(),
                 torch=torch.__version__)
        try:  # the version without paying torchao's import time
            d["torchao"] = importlib.metadata.version("torchao")
        except importlib.metadata.PackageNotFoundError:
            d["torchao"] = None
        return d


@functools.cache
def _shared_scale_observers():
    """Weight observers with per-channel layout but one scale for all channels (per-tensor quantization): the x86
    lowering only matches per-channel weight quantization, so per-tensor weights would otherwise stay in fp32."""
    obs = _torchao().pt2e

    class SharedScaleMixin:
        def calculate_qparams(self):
            lo = self.min_val.min().expand_as(self.min_val)
            hi = self.max_val.max().expand_as(self.max_val)
            return self._calculate_qparams(lo, hi)

    class SharedScaleMinMax(SharedScaleMixin, obs.PerChannelMinMaxObserver):
        pass

    class SharedScaleMovingAverage(SharedScaleMixin, obs.MovingAveragePerChannelMinMaxObserver):
        pass

    return SharedScaleMinMax, SharedScaleMovingAverage


def _quantizer(s: QuantSettings):
    ao = _torchao()
    config = ao.xiq.get_default_x86_inductor_quantization_config(is_qat=s.is_qat, reduce_range=s.reduce_range)
    act, weight = config.input_activation, config.weight
    if s.activation_observer == "minmax" and not s.is_qat:  # QAT's fake-quant always tracks a moving min/max
        ctr = ao.pt2e.MinMaxObserver.with_args(eps=2 ** -12)
        act = dataclasses.replace(act, observer_or_fake_quant_ctr=ctr)
    if not s.per_channel:
        shared_minmax, shared_moving = _shared_scale_observers()
        if s.is_qat:
            ctr = ao.pt2e.FakeQuantize.with_args(observer=shared_moving, eps=2 ** -12)
        else:
            ctr = shared_minmax.with_args(eps=2 ** -12)
        weight = dataclasses.replace(weight, observer_or_fake_quant_ctr=ctr)
    config = dataclasses.replace(config, input_activation=act, output_activation=act, weight=weight)
    return ao.xiq.X86InductorQuantizer().set_global(config)


class Int8Model(nn.Module):
    """A lowered int8 graph plus the settings that made it.

    The lowered graph is specialised to one batch size (the first calibration batch); other batch sizes are run in
    chunks of that size, the last one zero-padded (samples are independent in eval mode). `converted` is the
    quantized program before lowering (reference quantize / dequantize ops, int8 weights as plain tensors): unlike
    the lowered graph, it can be saved (`repopt.quant.save_int8_program`).
    """

    def __init__(self, graph: nn.Module, batch_size: int, settings: QuantSettings, images_seen: int = 0,
                 converted: nn.Module | None = None, input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.graph = graph
        self.batch_size = batch_size
        self.settings = settings
        self.images_seen = images_seen  # calibration images (PTQ) or fine-tune images, all epochs (QAT)
        self.input_shape = input_shape  # (C, H, W) of one image
        object.__setattr__(self, "converted", converted)  # not a submodule: kept out of modules() / state_dict()
        self.training = False

    def forward(self, x: Tensor) -> Tensor:
        n, b = x.shape[0], self.batch_size
        if n == b:
            return self.graph(x)
        outs = []
        for chunk in x.split(b):
            k = chunk.shape[0]
            if k < b:
                chunk = torch.cat([chunk, chunk.new_zeros((b - k,) + chunk.shape[1:])])
            outs.append(self.graph(chunk)[:k])
        return torch.cat(outs)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("an Int8Model is for inference only; fine-tune with quantize_qat instead")
        return self  # exported graphs refuse .eval(); they are eval-only already

    def report(self) -> dict:
        """The settings plus what actually happened, for the output JSON."""
        return {**self.settings.to_dict(), "images_seen": self.images_seen, "int8_batch_size": self.batch_size,
                "int8_ops": self.quantized_ops()}

    def quantized_ops(self) -> dict[str, int]:
        """Counts of int8 kernels in the lowered graph, e.g. {'onednn.qconv_pointwise.default': 4, ...}."""
        counts: dict[str, int] = {}
        for node in self.graph.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("onednn.q"):
                counts[str(node.target)] = counts.get(str(node.target), 0) + 1
        return counts


def _inputs(batches: Iterable, limit: int | None = None):
    for i, b in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield b[0] if isinstance(b, (tuple, list)) else b


def dynamic_batch(example: Tensor) -> tuple[tuple[Tensor], tuple[dict]]:
    """(args, dynamic_shapes) for torch.export with a dynamic batch dimension. A batch of 1 is doubled for tracing:
    export specializes a size-1 dimension to the constant 1, which would refuse every other batch size."""
    if example.shape[0] == 1:
        example = example.expand(2, *example.shape[1:])
    return (example,), ({0: torch.export.Dim("batch", min=1)},)


def _export(model: nn.Module, example: Tensor) -> nn.Module:
    # A dynamic batch lets calibration / QAT batches of any size through (e.g. a DataLoader's last batch).
    args, shapes = dynamic_batch(example)
    return torch.export.export(model, args, dynamic_shapes=shapes).module()


def _lower(prepared: nn.Module, example: Tensor, settings: QuantSettings, images_seen: int) -> Int8Model:
    ao = _torchao()
    with quiet(categories=(DeprecationWarning, FutureWarning, UserWarning)):
        converted = ao.qp.convert_pt2e(prepared)
        with torch.no_grad():
            graph = ao.lower(converted, (example,))
    return Int8Model(graph, example.shape[0], settings, images_seen, converted, tuple(example.shape[1:]))


def quantize_ptq(model: nn.Module, calib_batches: Iterable, settings: QuantSettings | None = None) -> Int8Model:
    """Post-training INT8 quantization of an fp32 model for x86 CPUs.

    `model` is folded (conv+BN -> conv) on a copy and quantized in eval mode; `calib_batches` yields input tensors or
    (input, label) pairs, of which the first `settings.calib_batches` are used. Returns the lowered int8 model.
    """
    s = (settings or QuantSettings()).resolved()
    if s.is_qat:
        raise ValueError("QuantSettings(is_qat=True) is for quantize_qat, not quantize_ptq")
    ao = _torchao()
    deployed = fold_batchnorm(model).eval()
    it = _inputs(calib_batches, s.calib_batches)
    example = next(it, None)
    if example is None:
        raise ValueError("quantize_ptq needs at least one calibration batch")
    with torch.no_grad(), quiet():
        prepared = ao.qp.prepare_pt2e(_export(deployed, example), _quantizer(s))
        prepared(example)
        seen = example.shape[0]
        for x in it:
            prepared(x)
            seen += x.shape[0]
    return _lower(prepared, example, s, seen)


def quantize_qat(model: nn.Module, train_batches: Iterable, settings: QuantSettings | None = None, *,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Int8Model:
    """Quantization-aware fine-tune (PT2E QAT, SGD) of an fp32 model on (input, label) batches, then INT8 lowering.

    BN is folded before QAT, i.e. its statistics stay frozen during the fine-tune: that is what QAT recipes do late in
    training anyway, and it spares torchao's conv-BN QAT folding at convert time (~30 s of pattern tracing on a
    2-core CPU). `train_batches` is iterated `settings.qat_epochs` times (a list or a DataLoader, not a generator).
    """
    s = dataclasses.replace(settings or QuantSettings(), is_qat=True).resolved()
    ao = _torchao()
    deployed = fold_batchnorm(model).train()
    batches = iter(train_batches)
    if batches is train_batches and s.qat_epochs > 1:
        raise ValueError("quantize_qat with qat_epochs > 1 needs re-iterable batches (a list or a DataLoader)")
    first = next(batches, None)
    if first is None:
        raise ValueError("quantize_qat needs at least one training batch")
    example = first[0]
    with quiet():
        prepared = ao.qp.prepare_qat_pt2e(_export(deployed, example), _quantizer(s))
    opt = torch.optim.SGD(prepared.parameters(), lr=s.qat_lr, momentum=s.qat_momentum,
                          weight_decay=s.qat_weight_decay)
    total = s.qat_epochs * len(train_batches) if hasattr(train_batches, "__len__") else None
    freeze_at = int(total * s.qat_freeze_observers) if total else None
    step = seen = 0
    for epoch in range(s.qat_epochs):
        for x, y in (_chain_first(first, batches) if epoch == 0 else train_batches):
            if step == freeze_at:
                prepared.apply(ao.pt2e.disable_observer)
            loss = loss_fn(prepared(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += x.shape[0]
    ao.pt2e.move_exported_model_to_eval(prepared)
    return _lower(prepared, example, s, seen)


def _chain_first(first, rest):
    yield first
    yield from rest


@torch.no_grad()
def evaluate_top1(model: nn.Module, batches: Iterable) -> float:
    """Top-1 accuracy in percent over (input, label) batches. Puts an ordinary module in eval mode first."""
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    if total == 0:
        raise ValueError("evaluate_top1 got no batches")
    return 100.0 * correct / total


@torch.no_grad()
def time_per_batch_ms(model: nn.Module, x: Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass on `x`, in milliseconds, after `warmup` untimed passes."""
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)
