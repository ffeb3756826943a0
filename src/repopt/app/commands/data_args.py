"""Command-line arguments for `--recipe NAME` and the data loader (streamed image folders, augmentation), shared by
`repopt train`, `search` and `pipeline`, and the merge of a recipe preset with the flags given explicitly."""
from __future__ import annotations

# flag dest -> key in TrainConfig.data_options (passed to repopt.data.load_dataset)
DATA_FLAGS = {"loader": "loader", "augment": "augment", "eval_resize": "eval_resize", "workers": "workers",
              "skip_bad_images": "skip_bad", "random_erase": "random_erase", "mixup": "mixup", "cutmix": "cutmix"}


def add_recipe_argument(p) -> None:
    from ..recipes import PRESETS

    p.add_argument("--recipe", default=None, choices=sorted(PRESETS), metavar="NAME",
                   help="start from one of the paper's recipes (flags given explicitly override its values; the "
                        f"recipe is printed at the start of the run): {', '.join(PRESETS)}")


def add_data_arguments(g) -> None:
    from ...data.folder import LOADERS, MEMORY_POLICY
    from ...data.transforms import TRAIN_POLICIES

    g.add_argument("--loader", default=None, choices=LOADERS,
                   help="image folders: memory (decode once at the served size), stream (decode per epoch in worker "
                        "processes, full-resolution augmentation) or auto (default: stream when large or when a "
                        "streamed policy is asked for)")
    g.add_argument("--augment", default=None, choices=(MEMORY_POLICY, *TRAIN_POLICIES),
                   help="training augmentation of image folders: pad-crop-flip (in memory), rrc-flip "
                        "(RandomResizedCrop + flip, streamed default), raug15 (+ the paper's RandAugment policy), none")
    g.add_argument("--eval-resize", type=int, default=None, metavar="R",
                   help="streamed folders: shorter side before the centre crop at evaluation (default: the image "
                        "size, the paper's setting; 256 with --image-size 224 is the common variant)")
    g.add_argument("--workers", type=int, default=None,
                   help="streamed folders: decoding processes per rank (default: the CPUs per rank less one, max 8)")
    g.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="streamed folders: leave images that cannot be decoded out of their batch and count them in "
                        "the log (default: stop with the file's name)")
    g.add_argument("--random-erase", type=float, default=None, metavar="P",
                   help="random erasing probability per training image (default 0)")
    g.add_argument("--mixup", type=float, default=None, metavar="ALPHA", help="mixup alpha (default 0: off)")
    g.add_argument("--cutmix", type=float, default=None, metavar="ALPHA", help="cutmix alpha (default 0: off)")


def _classes(text: str) -> list[int]:
    import argparse

    from ...data import DataError
    from ...data.classes import parse_classes

    try:
        return list(parse_classes(text))
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_classes_argument(g) -> None:
    g.add_argument("--classes", type=_classes, default=None, metavar="LIST",
                   help="only these classes of the dataset, e.g. 0-4 or 5,7,9 (both splits, relabelled 0..k-1 in "
                        "this order; before --train-subset): the halves of a transfer experiment")


def data_options(args) -> dict:
    """The data flags given on the command line, as TrainConfig.data_options."""
    return {key: getattr(args, dest) for dest, key in DATA_FLAGS.items() if getattr(args, dest, None) is not None}
