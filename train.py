"""Train a CLCA model with the paper's recipe, or the embedded demo's preset.

    python train.py                                  # the embedded leaves: a tiny ViT, fine on a laptop's CPU
    python train.py --dataset soyageing --keep 0.1   # the paper's recipe: ViT-B/16, 448 px, EViT + CLCA
    torchrun --nproc_per_node 4 train.py --dataset soyageing --keep 0.1   # the same on 4 GPUs (DDP)
    python train.py --resume runs/leaves/last.pt     # continue a run exactly where it stopped

Not here: building, evaluating and running a model on a machine (eval.py, which this file imports).
"""
import sys

if sys.version_info < (3, 10):  # said in one line, before the first `str | None` below fails with a traceback
    sys.exit(f'error: this code needs Python 3.10 or newer, not {sys.version.split()[0]}: install a newer Python')

import argparse
import itertools
import json
import math
import os
import time
from argparse import BooleanOptionalAction
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from data import AUGMENTATIONS, DATASETS, DatasetError, Standardise, build_dataset
from eval import (DEVICES, PRECISIONS, add_model_flags, autocast_args, evaluate, exit_with, grad_scaler,
                  model_fields, one_line, pick_device, runtime_defaults, shm_warning)
from model import CLCA, PAPER_BACKBONE, PAPER_SIZE, ViT, backbone_config
from weights import CheckpointError, load_weights, model_config, open_checkpoint, pretrained_url, save_checkpoint

# Every default has one home here: the paper's recipe for real data (its model: model.CLCA) ...
PAPER = dict(backbone=PAPER_BACKBONE, img_size=PAPER_SIZE, pretrained='auto', epochs=50, warmup_epochs=2,
             cooldown_epochs=5, batch_size=32, lr=1e-4, schedule='epoch')
# ... and the demo's: a leaf-species ViT (made once) fine-tuned at the paper's lr, stepped smoothly
LEAVES = dict(backbone='vit_tiny_patch8_224', img_size=48, pretrained='auto', epochs=8, warmup_epochs=1,
              cooldown_epochs=1, batch_size=32, lr=1e-4, schedule='step')
SPECIES = dict(LEAVES, pretrained='none', epochs=5, lr=1e-3, method='none', clc=False, cla=False)
PRESETS = {'leaves': LEAVES, 'leaf-species': SPECIES}
# the rest of the recipe, the same for every dataset
RECIPE = dict(dataset='leaves', norm='imagenet', aug='weak', weight_decay=0.05, clip_grad=0.0, seed=1, device='auto')
# what a resumed run may change: the machine, never the math (--amp does, and the run says so)
MACHINE = ('resume', 'amp', 'compile', 'workers', 'cache', 'device')
SYNC_EVERY = 25  # training steps between the host's reads of the running sums (progress bar, NaN check)


def parse_args(argv=None):
    """Every flag defaults to None here and is filled from the recipe, so that what was given can be told."""
    p = argparse.ArgumentParser(description='Train a ViT with token reduction and CLCA.')
    a = p.add_argument
    a('--dataset', choices=DATASETS, help='leaves (default), folder (any layout at --data-dir) or a UFG dataset')
    a('--data-dir', help='dataset folder (default data/<dataset>)')
    a('--pretrained', help="'auto' (the backbone's weights, downloaded; for leaves, pre-trained on leaf-species "
      "once), a path or URL, or 'none' (from scratch)")
    add_model_flags(p)
    a('--norm', choices=('imagenet', 'backbone'), help="input statistics: ImageNet's (default) or the backbone's")
    a('--aug', choices=AUGMENTATIONS, help="training augmentation: 'weak' (random crop and flip, default) or "
      "'trivial' (plus TrivialAugmentWide, one of the paper's configs for Cotton and SoyLocal)")
    a('--epochs', type=int, help='total epochs, cool-down included (paper: 50)')
    a('--warmup-epochs', type=int, help='linear warm-up epochs (paper: 2)')
    a('--cooldown-epochs', type=int, help='epochs at --min-lr after the cosine (paper: 5)')
    a('--batch-size', type=int, help='global batch size, split over the processes (paper: 32)')
    a('--lr', type=float, help='peak learning rate of AdamW (paper: 1e-4)')
    a('--schedule', choices=('epoch', 'step'), help="the rate changes once per epoch (the paper's) or at every step")
    a('--min-lr', type=float, help='cosine floor and cool-down rate (default lr / 10)')
    a('--warmup-lr', type=float, help='warm-up start (default lr / 100)')
    a('--weight-decay', type=float, help='on weights with 2 or more dims only (default 0.05)')
    a('--clip-grad', type=float, help='max gradient norm (default 0: off)')
    a('--amp', choices=PRECISIONS, help='mixed precision (default: what the hardware runs fast)')
    a('--compile', action=BooleanOptionalAction, help='torch.compile (default on for CUDA, except ATS)')
    a('--workers', type=int, help='loading processes per process (default: CUDA, usable cores per process; else 0)')
    a('--cache', action=BooleanOptionalAction, help='resize every image once and keep it on disk beside the '
      'images, so an epoch only crops, flips and normalises: the same pixels, faster (default on for CUDA)')
    a('--device', choices=DEVICES, help='auto (default): CUDA, else the CPU; mps only when asked (untried)')
    a('--seed', type=int, help='seed (default 1): the same seed gives the same run on a CPU')
    a('--out', help='output folder (default runs/<dataset>, numbered if taken)')
    a('--resume', help='checkpoint to continue from, with the flags it was started with')
    args = p.parse_args(argv)
    if args.device:
        pick_device(args.device)  # a device torch cannot see stops here, before any work
    if args.workers is not None and args.workers < 0:
        p.error('--workers must be 0 or more')
    if args.resume:  # the model and the recipe come from the checkpoint
        fixed = [f'--{k.replace("_", "-")}' for k, v in vars(args).items() if v is not None and k not in MACHINE]
        if fixed:
            p.error(f'--resume continues a run with the flags saved in its checkpoint: drop {" ".join(fixed)}')
        args.device = args.device or RECIPE['device']
        return args
    phases_given = {k for k in ('warmup_epochs', 'cooldown_epochs') if getattr(args, k) is not None}
    for key, value in {**RECIPE, **CLCA, **PRESETS.get(args.dataset or RECIPE['dataset'], PAPER)}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.warmup_lr is None:
        args.warmup_lr = args.lr / 100
    try:  # the model's settings, built once, here: every model flag is checked before any data is read
        args.config = backbone_config(args.backbone, **model_fields(args))
    except ValueError as e:
        p.error(str(e))
    for name in ('epochs', 'batch_size'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be positive')
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.batch_size % world or (args.cla and args.batch_size // world < 2):
        p.error(f'--batch-size {args.batch_size} must split evenly over {world} processes, at least 2 images '
                'each (the CLA head uses BatchNorm)')
    # a short run shrinks the default phases, cool-down first, to leave one epoch of the cosine
    for name in ('cooldown_epochs', 'warmup_epochs'):
        excess = args.warmup_epochs + args.cooldown_epochs - (args.epochs - 1)
        if excess > 0 and name not in phases_given:
            setattr(args, name, max(0, getattr(args, name) - excess))
            print(f'--epochs {args.epochs}: {args.warmup_epochs} warm-up and {args.cooldown_epochs} cool-down epochs')
    if args.warmup_epochs + args.cooldown_epochs > args.epochs:
        p.error('--warmup-epochs plus --cooldown-epochs exceed --epochs: lower them or raise --epochs')
    return args


def lr_at(epoch: float, args) -> float:
    """The paper's schedule at (fractional) epoch `epoch`: (1) linear warm-up from warmup_lr, (2) cosine
    from lr down to min_lr, (3) cool-down epochs at min_lr (timm's cosine scheduler; --schedule epoch
    calls it with whole epochs, as the paper's t_in_epochs does)."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr + epoch * (args.lr - args.warmup_lr) / args.warmup_epochs
    cosine = args.epochs - args.cooldown_epochs
    if epoch >= cosine:
        return args.min_lr
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * epoch / cosine))


def param_groups(model, weight_decay):
    """Weight decay on weights with 2 or more dims, except position embeddings, CLS and CLR tokens."""
    skip = {'pos_embed', 'cls_token', 'clr'}
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and n not in skip]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or n in skip)]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def out_dir(args) -> Path:
    """--out, else runs/<dataset>, numbered (runs/<dataset>-2, ...) if taken."""
    names = (Path('runs', args.dataset + (f'-{n}' if n > 1 else '')) for n in itertools.count(1))
    return Path(args.out) if args.out else next(path for path in names if not path.exists())


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one process, a function of (seed, epoch, rank) only: a resumed
    run draws what the uninterrupted one drew, and each rank its own crops, flips and noise
    (rank 0 those of a single process)."""
    return seed + epoch + 1_000_003 * rank


def demo_backbone(args) -> Path:
    """Where `--pretrained auto` finds the demo's backbone: a plain ViT trained on
    leaf-species, its ImageNet."""
    return Path('runs', f'leaf-species-{args.backbone}-{args.img_size}px', 'last.pt')


def make_demo_backbone(args):
    """Pre-train the demo's backbone on first use (or finish it, if that run was stopped), then reuse it."""
    path = demo_backbone(args)
    saved = open_checkpoint(path) if path.exists() else None
    if saved is not None and saved['epoch'] == saved['args']['epochs']:
        return
    flags = ['--dataset', 'leaf-species', '--backbone', args.backbone, '--img-size', str(args.img_size),
             '--seed', '0', '--out', str(path.parent)]
    if 'WORLD_SIZE' in os.environ:
        raise CheckpointError(f'{path} is not made yet: run python train.py {" ".join(flags)} once, on one '
                              'process, then start torchrun again')
    print(f'pre-training the demo backbone on leaf-species first, once: {path}')
    train(parse_args(['--resume', str(path)] if saved else flags + ['--device', args.device]))


def batches(loader, kept: str):
    """The batches of `loader`; an image that cannot be read (a truncated file) stops the run with its name
    and what `kept` says: the last checkpoint, written whole before the epoch began, is left as it was."""
    try:
        yield from loader
    except DatasetError as e:  # from a loader worker, the message ends with the worker's last traceback line
        raise DatasetError(f'{one_line(e)}; {kept}') from None


def train_step(net, optimizer, scaler, images, labels, autocast: dict, clip_grad: float = 0.0) -> tuple:
    """One step of the recipe, returning (logits, loss, gradient norm): the forward under autocast, the
    backward through the gradient scaler (a no-op but in fp16), the gradients clipped to `clip_grad` (0:
    not clipped, the norm measured all the same), AdamW. eval.py --cost --train times this very function."""
    with torch.autocast(**autocast):
        logits, loss = net(images, labels)  # cross-entropy plus any loss the reduction adds
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # the norm is logged (and clipped) on the true gradients, whatever the scale
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad or math.inf)
    scaler.step(optimizer)
    scaler.update()
    return logits, loss, norm


def train(args):
    """Train one model from `parse_args`' result (the flags and `config`, the model's settings built from them);
    returns the last epoch's metrics."""
    # 0. the machine. torchrun sets WORLD_SIZE: one code path for 1 or N processes
    distributed = 'WORLD_SIZE' in os.environ
    device = pick_device(args.device)
    if distributed:  # the start waits, for up to an hour, while each node resizes the images (SoyGene: 24k)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        start_wait = dist.new_group(backend='gloo', timeout=timedelta(minutes=60))  # other groups keep theirs
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    first_on_node = int(os.environ.get('LOCAL_RANK', 0)) == 0
    ckpt = None
    how = 'given' if args.amp else 'auto'  # where the precision comes from, said when the run starts
    if args.resume:
        ckpt = open_checkpoint(args.resume)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get('args'), dict) or 'config' not in ckpt:
            raise CheckpointError(f'{args.resume} was not written by train.py: --resume continues its own runs only')
        # the saved recipe (per-epoch schedule if saved before --schedule), its precision unless --amp is given
        machine = {k: getattr(args, k) for k in MACHINE if getattr(args, k) is not None or k != 'amp'}
        args = argparse.Namespace(**{'schedule': 'epoch', **ckpt['args'], **machine},
                                  config=model_config(ckpt))
        how = 'given' if how == 'given' else 'saved'
    cfg = args.config  # the model's settings; the data completes them with the number of classes
    runtime_defaults(args, device, cfg.embed_dim)
    recipe = {k: v for k, v in vars(args).items() if k != 'config'}  # the flags as run, saved with the model
    autocast, scaler = autocast_args(args.amp, device), grad_scaler(args.amp, device)
    torch.manual_seed(args.seed)

    # 1. data: ImageNet statistics by default, as the paper's code does for every backbone.
    # Under torchrun each node's first process resizes the images and fetches the weights, then
    # the rest read them (data.resize_once: atomic)
    if distributed and not first_on_node:
        dist.barrier(start_wait)
    mean, std = (cfg.mean, cfg.std) if args.norm == 'backbone' else (None, None)
    cache = args.workers if args.cache else None
    train_set, num_classes = build_dataset(args.dataset, 'train', args.img_size, args.data_dir, mean, std, args.aug,
                                           cache)
    test_set, _ = build_dataset(args.dataset, 'test', args.img_size, args.data_dir, mean, std, cache_workers=cache)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader_gen = torch.Generator()
    kw = dict(num_workers=args.workers, pin_memory=device.type == 'cuda')
    train_loader = DataLoader(train_set, args.batch_size // world, sampler=sampler, drop_last=True,
                              generator=loader_gen, **kw)
    # every world-th test image on each process: each is evaluated once over all of them
    test_loader = DataLoader(Subset(test_set, range(rank, len(test_set), world)), args.batch_size // world, **kw)
    if len(train_loader) == 0:
        raise DatasetError(f'{len(train_set)} training images make no full batch of {args.batch_size}')
    if first_on_node and (warning := shm_warning(args.workers, args.batch_size // world, args.img_size)):
        print(warning)

    # 2. model and optimizer
    model = ViT(replace(cfg, num_classes=num_classes))
    if args.pretrained != 'none' and ckpt is None:
        source = args.pretrained
        if source == 'auto':
            source = demo_backbone(args) if args.dataset == 'leaves' else pretrained_url(args.backbone)
        load_weights(model, source, verbose=rank == 0)
    if distributed and first_on_node:
        dist.barrier(start_wait)
    if distributed and device.type == 'cuda':  # the CLA head's BatchNorm sees the global batch, as on one GPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    standardise = Standardise.of(train_set, device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler']:  # empty if saved without fp16: a scaler switched on by --amp starts anew
            scaler.load_state_dict(ckpt['scaler'])
        start = ckpt['epoch']
    net = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None) if distributed else model
    if args.compile:  # after DDP, as PyTorch documents: the graph splits at DDP's buckets,
        net = torch.compile(net)  # so that their all-reduce overlaps the backward

    # 3. the run's folder, written by rank 0 only
    run_dir = Path(args.resume).parent if args.resume else out_dir(args)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / 'log.jsonl'
        if ckpt is not None and log.exists():  # drop what was logged after the checkpoint was written
            lines = [line for line in log.read_text().splitlines() if json.loads(line)['epoch'] <= start]
            log.write_text(''.join(line + '\n' for line in lines))
        (run_dir / 'config.json').write_text(json.dumps({**recipe, 'model': asdict(model.cfg)}, indent=2) + '\n')
        backend = f' ({dist.get_backend()}{", SyncBatchNorm" * (device.type == "cuda")})' if distributed else ''
        print(f'{args.dataset}: {len(train_set)} train / {len(test_set)} test images, {num_classes} classes, '
              f'{train_set.where}; {args.backbone} {args.method} keep {args.keep} clc={args.clc} cla={args.cla} on '
              f'{device} x{world}{backend}, precision {args.amp} ({how}), compile {args.compile}; writing to {run_dir}')

    # 4. the loop: train an epoch, evaluate, log, checkpoint
    metrics = {}
    for epoch in range(start, args.epochs):
        # the randomness of an epoch depends on (seed, epoch, rank) only, so a resumed run takes the same path
        torch.manual_seed(epoch_seed(args.seed, epoch, rank))
        loader_gen.manual_seed(epoch_seed(args.seed, epoch, rank))
        sampler.set_epoch(epoch)
        net.train()
        # running sums on the device, read by the host every SYNC_EVERY steps only, so that a GPU runs ahead
        # (fp16's gradient scaler still reads its overflow flag at every step)
        sums = torch.zeros(4, device=device)  # loss x images, correct, sum and count of finite gradient norms
        norm_max, broken = torch.zeros((), device=device), torch.zeros((), device=device)  # broken: NaN, inf
        seen, t0 = 0, time.perf_counter()
        kept = f'the last good checkpoint is {run_dir / "last.pt"}' if epoch else 'no checkpoint was written'
        bar = tqdm(batches(train_loader, kept), desc=f'epoch {epoch + 1}/{args.epochs}', total=len(train_loader),
                   leave=False, disable=rank != 0)
        for step, (images, labels) in enumerate(bar):
            lr = lr_at(epoch + (step / len(train_loader) if args.schedule == 'step' else 0), args)
            for group in optimizer.param_groups:
                group['lr'] = lr
            images = standardise(images)  # uint8 from the loader, float on the device
            labels = labels.to(device, non_blocking=True)
            logits, loss, norm = train_step(net, optimizer, scaler, images, labels, autocast, args.clip_grad)
            finite = torch.isfinite(norm)  # an fp16 step the scaler skips has no norm worth logging
            loss, norm = loss.detach().float(), norm.where(finite, 0)
            sums += torch.stack([loss * len(labels), (logits.argmax(-1) == labels).sum(), norm, finite])
            norm_max = torch.maximum(norm_max, norm)
            broken = torch.where(torch.isfinite(loss), broken, loss)
            seen += len(labels)
            if (step + 1) % SYNC_EVERY and step + 1 < len(train_loader):
                continue
            check = broken.clone()
            if distributed:  # every process sees the same verdict, so all of them stop together
                dist.all_reduce(check)
            if not math.isfinite(check.item()):  # before any checkpoint of this epoch is written
                raise FloatingPointError(f'the loss became {check.item()} in epoch {epoch + 1}; {kept}: '
                                         'lower --lr, or set --clip-grad 1.0')
            bar.set_postfix(loss=f'{sums[0].item() / seen:.3f}', lr=f'{lr:.1e}',
                            img_s=f'{seen * world / (time.perf_counter() - t0):.0f}')
        totals = torch.cat([sums[:2], sums.new_tensor([seen])])  # loss x images, correct, images
        if distributed:
            dist.all_reduce(totals)
        elapsed = time.perf_counter() - t0
        test = evaluate(net, batches(test_loader, kept), standardise, autocast)
        if not math.isfinite(test['test_loss']):  # the weights broke in the last step: keep the last good file
            raise FloatingPointError(f'the test loss became {test["test_loss"]} after epoch {epoch + 1}; {kept}: '
                                     'lower --lr, or set --clip-grad 1.0')
        (loss_sum, correct, images), (norm_sum, norms) = totals.tolist(), sums[2:].tolist()
        metrics = dict(epoch=epoch + 1, lr=lr, train_loss=loss_sum / images, train_top1=100 * correct / images, **test,
                       grad_norm_mean=norm_sum / max(norms, 1), grad_norm_max=norm_max.item(),
                       images_per_s=images / elapsed, seconds=elapsed)
        if rank == 0:  # log first: a resumed run drops log lines of epochs its checkpoint does not have
            with open(run_dir / 'log.jsonl', 'a') as f:
                f.write(json.dumps(metrics) + '\n')
            save_checkpoint(model, run_dir / 'last.pt', optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            epoch=epoch + 1, args=recipe, metrics=metrics)
            print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {metrics['train_loss']:.3f}  "
                  f"train {metrics['train_top1']:5.1f}%  test {metrics['top1']:5.1f}% (top-5 {metrics['top5']:5.1f}%)  "
                  f"lr {lr:.1e}  {metrics['images_per_s']:.0f} img/s  {elapsed:.0f} s")
    if distributed:
        dist.destroy_process_group()
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.dataset == 'leaves' and args.pretrained == 'auto':
            make_demo_backbone(args)
        return train(args)
    except (DatasetError, CheckpointError, FloatingPointError, OSError) as e:  # OSError: a disk, a permission
        exit_with(e)


if __name__ == '__main__':
    main()
