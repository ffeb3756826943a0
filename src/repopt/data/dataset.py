"""An image dataset held in memory as uint8, served as normalized float batches with seeded augmentation on the device.

The whole train set sits on the training device once; each epoch draws one permutation and one set of augmentation
parameters (crop offsets, flips) for every image from a CPU generator seeded by (seed, epoch). Ranks of a distributed
run slice the same global batches, so their concatenation is exactly what a single process would see.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]
STATISTICS_CHUNK_VALUES = 1 << 22  # pixel values per chunk of the mean/std pass (32 MiB as float64)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash rather than add, so (seed, epoch) pairs never collide and nearby seeds give unrelated streams.
    digest = hashlib.sha256(f"repopt.data/{int(seed)}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _shard(lo: int, hi: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's part of [lo, hi), split like torch.tensor_split: sizes differ by at most one, earlier ranks larger."""
    q, r = divmod(hi - lo, world_size)
    start = lo + rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def _resolve_device(device) -> torch.device:
    # "cuda" and "cuda:0" must share one cached copy of the data.
    return torch.empty(0, device=device).device


class Dataset:
    """Train and test images (uint8, N x C x H x W, C in {1, 3}, H == W) with integer labels.

    ``image_size`` is the side the batches are served at (bilinear resize when it differs from the stored side);
    ``mean`` / ``std`` are per-channel in [0, 1] units and default to statistics of the served train set.
    ``flip`` enables random horizontal flips; ``crop_padding`` is the padding of the random crop (default size / 8).
    """

    in_channels = 3

    def __init__(self, name: str, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, class_names: Sequence[str], *,
                 image_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, flip: bool = True, crop_padding: int | None = None,
                 source: str = ""):
        self.name = name
        self.source = source or name
        self.class_names = tuple(str(c) for c in class_names)
        self.num_classes = len(self.class_names)
        self.train_images, self.train_labels = self._check("train", train_images, train_labels)
        self.test_images, self.test_labels = self._check("test", test_images, test_labels)
        if self.train_images.shape[-1] != self.test_images.shape[-1]:
            raise DataError(f"{self.source}: train images are {self.train_images.shape[-1]} px wide but test images "
                            f"are {self.test_images.shape[-1]} px; both splits must share one size.")
        self.stored_size = int(self.train_images.shape[-1])
        self.image_size = int(image_size or self.stored_size)
        if self.image_size < 1:
            raise DataError(f"image_size must be a positive number of pixels, not {image_size}.")
        self.flip = bool(flip)
        self.crop_padding = int(round(self.image_size / 8) if crop_padding is None else crop_padding)
        if mean is None or std is None:
            m, s = self._train_statistics()
            mean = m if mean is None else mean
            std = s if std is None else std
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(f"{self.source}: mean and std need 3 values each and std must be positive, "
                            f"got mean={self.mean}, std={self.std}.")
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- construction helpers -------------------------------------------------------------------------------------
    def _check(self, split: str, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"{self.source}: {split} images must be a uint8 tensor of shape (N, 1 or 3, S, S), "
                            f"got {shape}.")
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() != images.shape[0]:
            raise DataError(f"{self.source}: {images.shape[0]} {split} images but {labels.numel()} labels.")
        if images.shape[0] == 0:
            raise DataError(f"{self.source}: the {split} split holds no images.")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(f"{self.source}: {split} labels must lie in [0, {self.num_classes}) for "
                            f"{self.num_classes} classes, found {int(labels.min())}..{int(labels.max())}.")
        if images.shape[1] == 1:  # grayscale: serve three identical channels so RGB nets run unchanged
            images = images.expand(-1, 3, -1, -1)
        return images.contiguous(), labels

    def _train_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        total = torch.zeros(3, dtype=torch.float64)
        total_sq = torch.zeros(3, dtype=torch.float64)
        # chunks of at most STATISTICS_CHUNK_VALUES values, one float64 copy each (squared in place): 1024 images
        # of 128 px at a time took four float copies of 0.2-0.4 GB each, more than the whole uint8 set of 10,000
        per_chunk = max(1, STATISTICS_CHUNK_VALUES // (3 * max(self.stored_size, self.image_size) ** 2))
        for chunk in self.train_images.split(per_chunk):
            x = self._resize(chunk.float()).double().div_(255)
            total += x.sum((0, 2, 3))
            total_sq += x.square_().sum((0, 2, 3))
        count = self.num_train * self.image_size ** 2
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1 / 255)  # a flat channel stays finite
        return tuple(mean.tolist()), tuple(std.tolist())

    # -- sizes ----------------------------------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])

    def steps_per_epoch(self, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
        """Batches each rank yields per epoch (the same on every rank)."""
        if int(batch_size) < 1 or int(world_size) < 1:
            raise DataError(f"batch_size and world_size must be at least 1, got {batch_size} and {world_size}.")
        global_batch = batch_size * world_size
        full, tail = divmod(self.num_train, global_batch)
        # a partial last batch is kept only if every rank gets at least one image of it
        steps = full + (1 if not drop_last and tail >= world_size else 0)
        if steps == 0:
            raise DataError(f"{self.name}: a global batch of {global_batch} images ({batch_size} x {world_size} "
                            f"ranks) is larger than the {self.num_train} training images; use a smaller batch size.")
        return steps

    # -- serving --------------------------------------------------------------------------------------------------
    def _on_device(self, device) -> dict[str, torch.Tensor]:
        device = _resolve_device(device)
        if device not in self._cache:
            mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
            self._cache[device] = {
                "train_x": self.train_images.to(device), "train_y": self.train_labels.to(device),
                "test_x": self.test_images.to(device), "test_y": self.test_labels.to(device),
                # normalize as x * scale + shift, with x in 0..255
                "scale": 1 / (255 * std), "shift": -mean / std,
            }
        return self._cache[device]

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.image_size:
            return x
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                             antialias=x.shape[-1] > self.image_size)

    def _crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # Zero-pad (black, before normalization, as torchvision's RandomCrop does), then pick one window per image
        # with two gathers (rows, then columns): faster than one 4-index advanced-indexing gather.
        p, (b, c, s, _) = self.crop_padding, x.shape
        padded = F.pad(x, (p, p, p, p))
        ar = torch.arange(s, device=x.device)
        rows = (offsets[:, 0:1] + ar)[:, None, :, None].expand(b, c, s, s + 2 * p)
        cols = (offsets[:, 1:2] + ar)[:, None, None, :].expand(b, c, s, s)
        return padded.gather(2, rows).gather(3, cols)

    def _serve(self, dev: dict[str, torch.Tensor], images: torch.Tensor, offsets=None, flips=None) -> torch.Tensor:
        x = self._resize(images.float())
        if offsets is not None:
            x = self._crop(x, offsets)
        if flips is not None:
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        return (x * dev["scale"] + dev["shift"]).contiguous()

    def train_batches(self, batch_size: int, epoch: int, seed: int = 0, device="cpu", augment: bool = True,
                      rank: int = 0, world_size: int = 1, drop_last: bool = True) -> Iterator[Batch]:
        """Shuffled, augmented training batches for one epoch: x float32 (B, 3, S, S) normalized, y int64 (B,).

        Deterministic given (seed, epoch), on any device. ``batch_size`` is per rank: global batch i holds
        ``batch_size * world_size`` images of one permutation and rank r gets its r-th slice, so concatenating batch i
        over ranks gives the single-process batch i of size ``batch_size * world_size``, augmentation included.
        With ``drop_last=False`` the partial last global batch is split as evenly as ranks allow, and dropped when it
        holds fewer images than there are ranks (no rank may go without a batch).
        """
        if not 0 <= rank < world_size:
            raise DataError(f"rank must lie in [0, world_size={world_size}), got {rank}.")
        steps = self.steps_per_epoch(batch_size, world_size, drop_last)
        return self._train_iter(batch_size * world_size, steps, epoch, seed, device, augment, rank, world_size)

    def _train_iter(self, global_batch, steps, epoch, seed, device, augment, rank, world_size) -> Iterator[Batch]:
        dev = self._on_device(device)
        n = self.num_train
        # Everything random is drawn on the CPU, for all n positions at once, in a fixed order: the stream then
        # does not depend on the device, the rank, the batch size or the augmentation switches.
        g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        perm = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        perm = perm.to(dev["train_x"].device)
        offsets = offsets.to(perm.device) if augment and self.crop_padding > 0 else None
        flips = flips.to(perm.device) if augment and self.flip else None
        for i in range(steps):
            lo, hi = _shard(i * global_batch, min((i + 1) * global_batch, n), rank, world_size)
            idx = perm[lo:hi]
            x = self._serve(dev, dev["train_x"][idx],
                            None if offsets is None else offsets[lo:hi],
                            None if flips is None else flips[lo:hi])
            yield x, dev["train_y"][idx]

    def test_batches(self, batch_size: int, device="cpu", rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Test images in their stored order, without augmentation; the last batch may be smaller. With several
        ranks, rank r gets its contiguous share (sum the counts over ranks for the whole set)."""
        if int(batch_size) < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        return self._test_iter(batch_size, device, *_shard(0, self.num_test, rank, world_size))

    def _test_iter(self, batch_size, device, start, stop) -> Iterator[Batch]:
        dev = self._on_device(device)
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield self._serve(dev, dev["test_x"][lo:hi]), dev["test_y"][lo:hi]

    def calibration_batches(self, n_batches: int, batch_size: int, device="cpu") -> list[Batch]:
        """A few shuffled train batches without augmentation (fixed seed), e.g. for INT8 calibration."""
        batches = self.train_batches(batch_size, epoch=0, seed=0, device=device, augment=False, drop_last=False)
        return list(itertools.islice(batches, max(int(n_batches), 0)))

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, classes={self.num_classes}, train={self.num_train}, test={self.num_test}, "
                f"image_size={self.image_size}, flip={self.flip}, crop_padding={self.crop_padding})")
