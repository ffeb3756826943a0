"""RepOpt in your own training loop, on one page: data, a short hyper-search, scales, RepOptSGD.from_scales, training,
evaluation, BatchNorm folding and ONNX export. Only the public API: `repopt` and its library modules.

    python examples/own_training_loop.py            # repopt_vgg_tiny on the embedded digits, 5 + 10 epochs:
                                                    # 57 s, top-1 99.44 % (one thread of a shared 2-core CPU)
    python examples/own_training_loop.py --toy      # a few steps of each stage (seconds): what the tests run

What it leaves in --out: scales.safetensors (the searched scales), model.safetensors (the trained weights, which
examples/finetune_released_scales.py can start from) and model.onnx (the deployed plain network; needs the `export`
extra: pip install "repopt[export]").
"""
import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import repopt
from repopt.data import load_dataset
from repopt.quant import ExportDependencyError, evaluate_top1, export_onnx, fold_batchnorm
from repopt.search import hs_param_groups

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--arch", default="repopt_vgg_tiny", help="any name of repopt.models.list_models()")
parser.add_argument("--hs-epochs", type=int, default=5, help="epochs of the hyper-search")
parser.add_argument("--epochs", type=int, default=10, help="epochs of RepOpt training")
parser.add_argument("--out", type=Path, default=Path("runs/own_training_loop"))
parser.add_argument("--toy", action="store_true", help="1 epoch of 3 steps per stage: a smoke test in seconds")
args = parser.parse_args()
if args.toy:
    args.hs_epochs = args.epochs = 1
args.out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# The embedded digits (1437 train / 360 test images, served at 16x16), normalized and augmented on the device.
data = load_dataset("digits")
batch_size = 64
lr = 0.1 * batch_size / 256  # the paper's peak learning rate: 0.1 per 256 images


def train(model, optimizer, epochs):
    """Plain PyTorch: nothing here knows about RepOpt; the optimizer carries the branch structure."""
    steps = 3 if args.toy else data.steps_per_epoch(batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps)
    model.train()
    for epoch in range(epochs):
        for x, y in itertools.islice(data.train_batches(batch_size, epoch, seed=0), steps):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")


# The plain network RepOpt trains and deploys: 3x3 conv - BN - ReLU blocks (any conv-BN net of yours works too).
model = repopt.models.create(args.arch, mode="target", num_classes=data.num_classes)

# 1. Hyper-search: a copy whose convs carry trainable branch scales (3x3, 1x1, identity where shapes allow), trained
#    briefly; hs_param_groups keeps weight decay off the conv-branch scales, as the paper's search recipe does.
hs = repopt.to_hyper_search(model)
print(f"hyper-search, {args.hs_epochs} epoch(s)")
train(hs, torch.optim.SGD(hs_param_groups(hs, weight_decay=4e-5), lr=lr, momentum=0.9, nesterov=True),
      args.hs_epochs)
scales_file = args.out / "scales.safetensors"
repopt.save_scales(repopt.extract_scales(hs), scales_file)
print(f"scales -> {scales_file}")

# 2. RepOpt: the README's snippet. from_scales checks every scale vector against the model, applies the rule of
#    initialization once, and builds the per-conv gradient multipliers.
scales = repopt.load_scales(scales_file)  # or a released file: repopt.load_scales("RepOpt-VGG-B1-scales.pth")
optimizer = repopt.RepOptSGD.from_scales(model, scales, lr=lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
print(f"RepOpt training, {args.epochs} epoch(s)")
train(model, optimizer, args.epochs)
print(f"  the target convs' last update took the {optimizer.last_path!r} path")  # native C kernel, or pure torch
save_file(model.state_dict(), args.out / "model.safetensors")

# 3. Evaluate, then deploy: folding each BN into its conv leaves a plain conv-ReLU network computing the same function.
top1 = evaluate_top1(model, data.test_batches(256))
deployed = fold_batchnorm(model.eval())
deployed_top1 = evaluate_top1(deployed, data.test_batches(256))
print(f"RepOpt top-1 {top1:.2f} %, deployed (BN folded) top-1 {deployed_top1:.2f} %")

example = next(data.test_batches(1))[0]
try:
    onnx_file = export_onnx(deployed, example, args.out / "model.onnx", fold=False)  # already folded above
    print(f"exported -> {onnx_file}")
except ExportDependencyError as e:  # ONNX export is an optional extra
    print(f"not exported: {e}")
