"""RepOpt with DistributedDataParallel under torchrun, on one page. Against a single-process loop three lines change,
marked "DDP (1/3)" to "(3/3)": join the process group, wrap the model, give each rank its share of every batch.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --toy   # 2 CPU processes (gloo), seconds
    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py         # 10 epochs: 27 s, top-1 99.17 %
    python examples/ddp_torchrun.py --toy                                     # one process: the same script

(`--standalone`: torchrun picks a free port. On GPUs the same command uses nccl, one GPU per process; not run here:
this project's machines have none. The 27 s: wall time on its shared 2-core CPU.) Nothing else changes, because DDP averages the gradients before
`step()` and RepOpt's multiplier is a constant elementwise product: it commutes with the average, so every rank takes
the same step. Each rank prints a hash of its parameters at the end: they are identical.
"""
import argparse
import hashlib
import itertools
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import repopt
from repopt.data import load_dataset
from repopt.quant import evaluate_top1

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--arch", default="repopt_vgg_tiny", help="any name of repopt.models.list_models()")
parser.add_argument("--scales", help="a scales file (searched, or released); default: the hyper-search's start")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=64, help="the global batch, split over the ranks")
parser.add_argument("--toy", action="store_true", help="1 epoch of 3 steps: a smoke test in seconds")
args = parser.parse_args()
if args.toy:
    args.epochs = 1

distributed = "LOCAL_RANK" in os.environ  # torchrun sets it; plain `python` runs one process
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
    torch.device("cpu")
if distributed:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # DDP (1/3)
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
if args.batch_size % world:
    sys.exit(f"--batch-size {args.batch_size} must be divisible by the {world} processes, which split it")
torch.manual_seed(0)  # the same model on every rank (DDP also broadcasts rank 0's weights when it wraps it)

data = load_dataset("digits")
per_rank = args.batch_size // world
lr = 0.1 * args.batch_size / 256  # the paper's 0.1 per 256 images, of the global batch

model = repopt.models.create(args.arch, mode="target", num_classes=data.num_classes).to(device)
scales = repopt.load_scales(args.scales) if args.scales else repopt.extract_scales(repopt.to_hyper_search(model))
# from_scales before wrapping: the rule of initialization writes the model's own weights, which DDP then shares
optimizer = repopt.RepOptSGD.from_scales(model, scales, lr=lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
net = DistributedDataParallel(model) if distributed else model  # DDP (2/3)

steps = 3 if args.toy else data.steps_per_epoch(per_rank, world)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps)
net.train()
for epoch in range(args.epochs):
    # DDP (3/3): rank r gets the r-th slice of each global batch (the same permutation and augmentation everywhere)
    batches = data.train_batches(per_rank, epoch, seed=0, device=device, rank=rank, world_size=world)
    for x, y in itertools.islice(batches, steps):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        optimizer.step()
        schedule.step()
    if rank == 0:
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} (rank 0's share)")

digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
print(f"rank {rank}/{world}: parameters sha256 {digest[:16]}", flush=True)
if rank == 0:  # BatchNorm statistics are rank 0's own (DDP broadcasts them before each forward)
    print(f"top-1 {evaluate_top1(model, data.test_batches(256, device=device)):.2f} %")
if distributed:
    dist.destroy_process_group()
