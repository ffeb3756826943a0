"""Fine-tuning a trained RepOpt network with released scales, on one page: load the checkpoint's weights, take the
multipliers from the scales file (the masks), and apply **no** rule of initialization: the weights are trained
already, and re-initializing them would throw the training away (`RepOptSGD.from_scales(..., reinit=False)`).

    python examples/finetune_released_scales.py --arch repopt_vgg_b1 \\
        --checkpoint B1_CHECKPOINT.pth --scales RepOpt-VGG-B1-scales.pth     # the released B1 weights and scales
    python examples/own_training_loop.py && python examples/finetune_released_scales.py --arch repopt_vgg_tiny \\
        --checkpoint runs/own_training_loop/model.safetensors --scales runs/own_training_loop/scales.safetensors
    python examples/finetune_released_scales.py --arch repopt_vgg_tiny --checkpoint CKPT --scales SCALES --toy

The checkpoint: a released RepOpt-VGG `.pth` (a `model` / `state_dict` wrapper and a `module.` prefix are accepted),
a repopt run, or any state dict that fits the model (`repopt.init_from`). A classifier of another size is replaced by
a fresh one for the new classes. The new task here is the embedded digits (--dataset picks another one of
repopt.data.DATASETS). The fine-tuned weights go to --out/model.safetensors.
"""
import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import repopt
from repopt.data import load_dataset
from repopt.quant import evaluate_top1

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--arch", required=True, help="the checkpoint's architecture, e.g. repopt_vgg_b1")
parser.add_argument("--checkpoint", required=True, type=Path, help="the trained weights")
parser.add_argument("--scales", required=True, type=Path, help="the scales file (released .pth or repopt's own)")
parser.add_argument("--dataset", default="digits", help="the new task: one of repopt.data.DATASETS")
parser.add_argument("--data-dir", help="where --dataset's files are (none for the embedded digits)")
parser.add_argument("--image-size", type=int, help="the side the images are served at (default: the dataset's)")
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
parser.add_argument("--toy", action="store_true", help="1 epoch of 3 steps: a smoke test in seconds")
args = parser.parse_args()
if args.toy:
    args.epochs = 1
torch.manual_seed(0)

data = load_dataset(args.dataset, args.data_dir, args.image_size)
batch_size = 64
# BiT-HyperRule's small-data fine-tuning optimizer, as `repopt train --recipe finetune` uses it (sources in
# src/repopt/app/recipes.py): 0.003 per 512 images, momentum 0.9, no weight decay, warmup over the first fifth
lr = 0.003 * batch_size / 512

# The plain target network, then the trained weights (a head of another size is replaced, and it says so).
model = repopt.models.create(args.arch, mode="target", num_classes=data.num_classes)
report = repopt.init_from(model, args.checkpoint, num_classes=data.num_classes)  # in place; refuses a bad key set
print(report.describe())
if report.head is not None:
    print(report.describe_head())
fresh_head = " (a fresh classifier: about chance)" if report.head is not None else ""
print(f"top-1 before fine-tuning {evaluate_top1(model, data.test_batches(256)):.2f} %{fresh_head}")

# The multipliers only: reinit=False keeps the trained kernels. from_scales still checks every scale vector against
# its conv and names the layer of a file that does not fit.
scales = repopt.load_scales(args.scales)
optimizer = repopt.RepOptSGD.from_scales(model, scales, reinit=False, lr=lr, momentum=0.9, weight_decay=0.0)
print(f"fine-tuning with the multipliers of {args.scales.name}, no rule of initialization")

steps = 3 if args.toy else data.steps_per_epoch(batch_size)
schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=args.epochs * steps, pct_start=0.2,
                                               cycle_momentum=False)  # warmup, then cosine
model.train()
for epoch in range(args.epochs):
    for x, y in itertools.islice(data.train_batches(batch_size, epoch, seed=0), steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"  epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}")

print(f"top-1 after fine-tuning {evaluate_top1(model, data.test_batches(256)):.2f} %")
args.out.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "model.safetensors")
print(f"fine-tuned weights -> {args.out / 'model.safetensors'}")
