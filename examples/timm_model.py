"""A timm model trained by RepOpt, on one page: `repopt.to_target` turns timm's multi-branch RepVGG (or MobileOne,
RepGhostNet, ...) into its plain conv-BN form, a short hyper-search finds the branch scales, and RepOptSGD trains the
plain network as if it had its branches. Any conv -> BatchNorm timm net (resnet18, vgg11_bn, ...) works the same way.

    pip install timm
    python examples/timm_model.py                        # timm's repvgg_a0 on the embedded digits, 3 + 6 epochs:
                                                         # 128 s, top-1 98.61 % (one thread, shared 2-core CPU)
    python examples/timm_model.py --model mobileone_s0
    python examples/timm_model.py --toy                  # a few steps of each stage (seconds): what the tests run

Nothing downloads: the model is created with pretrained=False. What is equal to what: docs/timm.md.
"""
import argparse
import itertools
import sys
import warnings

try:
    import timm
except ImportError:  # before importing anything heavy: the one thing this page needs beyond repopt
    sys.exit("This example needs timm, which is not installed: pip install timm")
import torch
import torch.nn.functional as F

import repopt
from repopt.data import load_dataset
from repopt.quant import evaluate_top1
from repopt.search import hs_param_groups

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="repvgg_a0", help="a timm model name")
parser.add_argument("--hs-epochs", type=int, default=3, help="epochs of the hyper-search")
parser.add_argument("--epochs", type=int, default=6, help="epochs of RepOpt training")
parser.add_argument("--toy", action="store_true", help="1 epoch of 2 steps per stage: a smoke test in seconds")
args = parser.parse_args()
if args.toy:
    args.hs_epochs = args.epochs = 1
torch.manual_seed(0)

data = load_dataset("digits", image_size=32)  # 32x32: timm's nets halve the image five times
batch_size = 64
lr = 0.1 * batch_size / 256  # the paper's peak learning rate: 0.1 per 256 images


def train(model, optimizer, epochs):
    steps = 2 if args.toy else data.steps_per_epoch(batch_size)
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


# timm's multi-branch network -> its plain form: each block's principal conv and one BatchNorm, with the block's
# branch set (RepVGG: 3x3 + 1x1 + identity) kept on the block for the hyper-search and the optimizer.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e.g. the note that conv biases were folded into their BatchNorms
    target = repopt.to_target(timm.create_model(args.model, pretrained=False, num_classes=data.num_classes))
convs = repopt.models.target_convs(target)  # the convs RepOpt trains with multipliers
print(f"{args.model}: {len(convs)} target convs, e.g. {convs[0]}")

# Hyper-search: trainable scales on the branches the architecture's authors chose.
hs = repopt.to_hyper_search(target)
print(f"hyper-search, {args.hs_epochs} epoch(s)")
train(hs, torch.optim.SGD(hs_param_groups(hs, weight_decay=4e-5), lr=lr, momentum=0.9, nesterov=True),
      args.hs_epochs)
scales = repopt.extract_scales(hs)

# RepOpt: a plain 3x3 conv-BN-ReLU network, trained as its multi-branch block.
optimizer = repopt.RepOptSGD.from_scales(target, scales, lr=lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
print(f"RepOpt training, {args.epochs} epoch(s)")
train(target, optimizer, args.epochs)
print(f"RepOpt top-1 {evaluate_top1(target, data.test_batches(256)):.2f} %")
