"""Train a CLCA model with the paper's recipe, or the embedded demo's preset.

    python train.py                                  # embedded leaves, tiny ViT, ~4 1/3 min on a CPU (8 at first)
    python train.py --dataset soyageing --keep 0.1   # the paper's recipe: ViT-B/16, 448 px, EViT + CLCA
    torchrun --nproc_per_node 4 train.py --dataset soyageing   # the same on 4 GPUs (DDP)
    python train.py --resume runs/leaves/last.pt     # continue a run exactly where it stopped

Also the pieces eval.py shares: the model flags, the machine-dependent defaults, `evaluate`.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from data import AUGMENTATIONS, DATASETS, DatasetError, build_dataset
from model import ViT, backbone_config
from reduce import METHODS
from weights import CheckpointError, load_weights, open_checkpoint, pretrained_url, save_checkpoint

# Every default has one home here. The paper's recipe for real datasets, and a preset for the embedded
# leaves that fine-tunes a tiny ViT in about 4 1/3 minutes on a 2-core CPU:
PAPER = dict(backbone='vit_base_patch16_clip_224.laion2b', pretrained='auto', img_size=448, epochs=50,
             warmup_epochs=2, cooldown_epochs=5, batch_size=32, lr=1e-4)
# the demo fine-tunes, as the paper does, from a plain ViT pre-trained on leaf-species (made once, ~3 2/3 min), at
# the paper's lr: there EViT at keep 0.1 costs ~2 points, at 2e-4 or 5e-4 nothing (README: how the demo was chosen)
LEAVES = dict(backbone='vit_tiny_patch8_224', pretrained='auto', img_size=48, epochs=8, warmup_epochs=1,
              cooldown_epochs=1, batch_size=32, lr=1e-4, schedule='step')
SPECIES = dict(LEAVES, pretrained='none', epochs=5, lr=1e-3, method='none', clc=False, cla=False)
PRESETS = {'leaves': LEAVES, 'leaf-species': SPECIES}
# and the model both train: the paper's CLCA, EViT keeping 10 % at blocks 3, 6 and 9, cache and head on.
CLCA = dict(method='evit', keep=[0.1], loc=[3, 6, 9], clc=True, cla=True, num_clr=1)
MODEL_FLAGS = tuple(CLCA)  # the ModelConfig fields a flag can set, besides the backbone and image size
DEVICES = ('auto', 'cuda', 'mps', 'cpu')
# what may change when a run resumes on another machine: nothing that changes the math but the precision
RESUME_FLAGS = ('--resume', '--amp', '--compile', '--no-compile', '--workers', '--cache', '--no-cache', '--device')


def add_model_flags(p):
    """The flags that describe a model, shared by train.py, eval.py and explain.py (all default to None: the
    caller fills what is not given, from a preset or from a checkpoint)."""
    a = p.add_argument
    a('--backbone', help=f"timm ViT name with pretrained tag (default {PAPER['backbone']}, the backbone of the "
      "official README's training command; the paper's figures use deit3_base_patch16_224.fb_in1k)")
    a('--img-size', type=int, help='input size in pixels (paper: 448)')
    a('--method', choices=METHODS, help='token reduction method')
    a('--keep', type=float, nargs='+', help='keep rate, one or one per location')
    a('--loc', type=int, nargs='*', help='0-indexed blocks that reduce (--loc alone: none)')
    a('--clc', action=argparse.BooleanOptionalAction, help='cross-layer cache')
    a('--cla', action=argparse.BooleanOptionalAction, help='cross-layer aggregation head')
    a('--num-clr', type=int, help='CLR carrier tokens of the cache')


def model_fields(args) -> dict:
    """The ModelConfig fields the model flags set."""
    return {k: getattr(args, k) for k in ('img_size',) + MODEL_FLAGS if getattr(args, k) is not None}


def pick_device(name: str) -> torch.device:
    """--device: 'auto' takes CUDA, then Apple's MPS, then the CPU."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: Ampere and newer GPUs; CPUs with AMX tiles or
    AVX512-BF16 (Sapphire Rapids and later Xeons, Zen 4), where oneDNN runs bf16 matmuls natively.
    Elsewhere bf16 is emulated: slower than fp32 on a CPU, and not compiled by inductor on a GPU."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == 'cpu':
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def runtime_defaults(args, device: torch.device, train_width: int = 0):
    """Fill, where not given, the flags whose best value depends on the machine; called once per run.
    `train_width` is the model's width when it is to be trained (0: inference only).
    - Precision: bf16 where the hardware has it; but training on a CPU a model narrower than 384 stays
      fp32, because there autocast's casts cost more than its matmuls gain (an AMX Xeon trains ViT-Tiny
      1.1x slower in bf16, ViT-S 1.3x and ViT-B 1.7x faster). fp16 with loss scaling on older GPUs, fp32
      elsewhere (MPS included).
    - Compile: on CUDA, except for ATS, whose image-dependent token counts recompile the graph.
    - Workers: loading runs beside the model on a GPU, on this node's cores split over its processes; on a CPU
      or MPS the main process does it, and the model keeps the cores.
    - Cache: on CUDA every image is resized once and kept on disk (data.resize_once), so that the workers
      keep up with the GPU; the same pixels either way."""
    cuda = device.type == 'cuda'
    if args.amp is None:
        narrow = device.type == 'cpu' and 0 < train_width < 384
        args.amp = 'bf16' if native_bf16(device) and not narrow else 'fp16' if cuda else 'off'
    args.compile = cuda and getattr(args, 'method', None) != 'ats' if args.compile is None else args.compile
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))) if cuda else 0
    if hasattr(args, 'cache') and args.cache is None:
        args.cache = cuda


def autocast_args(amp: str, device: torch.device) -> dict:
    """torch.autocast's arguments for --amp."""
    return dict(device_type=device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16, enabled=amp != 'off')


def exit_with(error: Exception):
    """One line, no traceback; a DataLoader worker wraps the error in its traceback: keep the last line."""
    sys.exit('error: ' + re.sub(r'^[\w.]+Error: ', '', str(error).strip().splitlines()[-1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a ViT with token reduction and CLCA.')
    a = p.add_argument
    a('--dataset', default='leaves', choices=DATASETS, help='leaves (embedded, default), folder (any layout '
      'at --data-dir) or a UFG dataset')
    a('--data-dir', help='dataset folder (default data/<dataset>)')
    a('--pretrained', help="'auto' (download the backbone's weights; for leaves, pre-train on leaf-species "
      "once), a path or URL, or 'none' (from scratch)")
    add_model_flags(p)
    a('--norm', choices=('imagenet', 'backbone'), default='imagenet',
      help="input statistics: ImageNet's (as the paper's code) or the backbone's own")
    a('--aug', choices=AUGMENTATIONS, default='weak', help="training augmentation: 'weak' (random crop and "
      "flip, the paper's command line) or 'trivial' (plus TrivialAugmentWide, the paper's Cotton/SoyLocal configs)")
    a('--epochs', type=int, help='total epochs, cool-down included (paper: 50)')
    a('--warmup-epochs', type=int, help='linear warm-up epochs (paper: 2)')
    a('--cooldown-epochs', type=int, help='epochs at --min-lr after the cosine (paper: 5)')
    a('--batch-size', type=int, help='global batch size, split over the processes (paper: 32)')
    a('--lr', type=float, help='peak learning rate of AdamW (paper: 1e-4)')
    a('--schedule', choices=('epoch', 'step'), help="when the rate changes: once per epoch, as the paper's "
      "timm scheduler (default), or at every step (the demo's default: a smooth warm-up for short runs)")
    a('--min-lr', type=float, help='cosine floor and cool-down rate (default lr / 10)')
    a('--warmup-lr', type=float, help='warm-up start (default lr / 100)')
    a('--weight-decay', type=float, default=0.05, help='on weights with 2 or more dims only')
    a('--clip-grad', type=float, default=0.0, help='max gradient norm, 0 = off')
    a('--amp', choices=('bf16', 'fp16', 'off'), help='mixed precision (default: bf16 where the hardware has '
      'it, fp16 on older GPUs, off elsewhere; README: Speed)')
    a('--compile', action=argparse.BooleanOptionalAction, help='torch.compile (default on for CUDA, except ATS)')
    a('--workers', type=int, help="data loading processes per process (default: on CUDA this node's cores split "
      'over its processes, on a CPU or MPS 0: the main process loads)')
    a('--cache', action=argparse.BooleanOptionalAction, help='resize every image once and keep it on disk beside '
      'the images, so an epoch only crops, flips and normalises: the same pixels, faster (default on for CUDA)')
    a('--device', choices=DEVICES, default='auto', help='auto: CUDA, else Apple MPS, else the CPU')
    a('--seed', type=int, default=1, help='seed: the same seed gives the same run on a CPU')
    a('--out', help='output folder (default runs/<dataset>, numbered if taken)')
    a('--resume', help='checkpoint to continue from, with the flags it was started with')
    args = p.parse_args(argv)
    if (args.device == 'cuda' and not torch.cuda.is_available()) or \
            (args.device == 'mps' and not torch.backends.mps.is_available()):
        p.error(f'--device {args.device}: torch sees no such device here; use --device auto or cpu')
    if args.resume:  # the model and recipe come from the checkpoint; the machine's flags may change
        given = [x.split('=')[0] for x in (argv if argv is not None else sys.argv[1:]) if x.startswith('--')]
        fixed = [x for x in given if x not in RESUME_FLAGS]
        if fixed:
            p.error(f'--resume continues a run with the flags saved in its checkpoint: drop {" ".join(fixed)}')
        return args
    phases_set = {k for k in ('warmup_epochs', 'cooldown_epochs') if getattr(args, k) is not None}
    for key, value in {**CLCA, 'schedule': 'epoch', **PRESETS.get(args.dataset, PAPER)}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.warmup_lr = args.lr / 100 if args.warmup_lr is None else args.warmup_lr
    try:  # every model flag is checked here, before any data is read
        backbone_config(args.backbone, **model_fields(args))
    except ValueError as e:
        p.error(str(e))
    for name in ('epochs', 'batch_size'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be positive')
    world = int(os.environ.get('WORLD_SIZE', 1))
    if args.batch_size % world or (args.cla and args.batch_size // world < 2):
        p.error(f'--batch-size {args.batch_size} must split evenly over {world} processes, at least 2 images '
                'each (the CLA head uses BatchNorm)')
    if args.workers is not None and args.workers < 0:
        p.error('--workers must be 0 or more')
    for name in ('cooldown_epochs', 'warmup_epochs'):  # a short run shrinks the default phases, cool-down first,
        excess = args.warmup_epochs + args.cooldown_epochs - (args.epochs - 1)  # to leave a cosine epoch
        if excess > 0 and name not in phases_set:
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
    if args.out:
        return Path(args.out)
    base, n = Path('runs') / args.dataset, 1
    while (base.parent / (base.name + (f'-{n}' if n > 1 else ''))).exists():
        n += 1
    return base.parent / (base.name + (f'-{n}' if n > 1 else ''))


def setup_distributed(device: torch.device):
    """One code path for 1 or N processes: torchrun sets WORLD_SIZE, a plain run is world 1. Returns
    (rank, world, device), the device narrowed to this process's GPU."""
    if 'WORLD_SIZE' not in os.environ:
        return 0, 1, device
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one process. It depends on (seed, epoch, rank) only, so a resumed run draws
    what the uninterrupted one drew; rank 0 uses seed + epoch, so one process runs as it always did; other
    ranks are offset so that their crops, flips and reduction noise differ from rank 0's."""
    return seed + epoch + 1_000_003 * rank


def split_for_rank(dataset, rank: int, world: int):
    """Every world-th sample from `rank`: each image is evaluated exactly once over all processes."""
    return dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))


@torch.no_grad()
def evaluate(model, loader, device, amp: dict, world: int = 1) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy, summed over all processes."""
    model.eval()
    dtype = next(model.parameters()).dtype  # fp32 while training; eval.py may cast the model for inference
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        images = images.to(device, dtype, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(**amp):
            logits = model(images)[0].float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5 == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                               torch.nn.functional.cross_entropy(logits, labels, reduction='sum'),
                               torch.tensor(len(labels), device=device)]).double()
    if world > 1:
        dist.all_reduce(totals)
    return dict(top1=(100 * totals[0] / totals[3]).item(), top5=(100 * totals[1] / totals[3]).item(),
                test_loss=(totals[2] / totals[3]).item())


def demo_backbone(args, world) -> str:
    """`--pretrained auto` on leaves: a plain ViT trained on leaf-species, the demo's ImageNet. It is
    made on first use (finished, if an earlier run was stopped) and then reused; returns its path."""
    out = Path('runs') / f'leaf-species-{args.backbone}-{args.img_size}px'
    path = out / 'last.pt'
    saved = open_checkpoint(path) if path.exists() else None
    if saved is None or saved['epoch'] < saved['args']['epochs']:
        flags = ['--dataset', 'leaf-species', '--backbone', args.backbone, '--img-size', str(args.img_size),
                 '--seed', '0', '--out', str(out)]
        if world > 1:
            raise CheckpointError(f'{path} is not made yet: run python train.py {" ".join(flags)} once, '
                                  'on one process, then start torchrun again')
        print(f'pre-training the demo backbone on leaf-species first, once: {path}')
        train(parse_args(['--resume', str(path)] if saved else flags + ['--device', args.device]))
    return str(path)


def train(args):
    rank, world, device = setup_distributed(pick_device(args.device))
    ckpt, how = None, 'given' if args.amp else 'saved' if args.resume else 'auto'
    if args.resume:
        ckpt = open_checkpoint(args.resume)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get('args'), dict) or 'config' not in ckpt:
            raise CheckpointError(f'{args.resume} was not written by train.py: --resume continues its own runs only')
        # the saved recipe, and the saved precision unless --amp is given (it changes the trajectory);
        # compile, workers and device are this machine's
        ckpt['args'].setdefault('schedule', 'epoch')  # runs saved before --schedule existed
        machine = dict(amp=args.amp or ckpt['args']['amp'], compile=args.compile, workers=args.workers,
                       cache=args.cache, device=args.device, resume=args.resume)
        args = argparse.Namespace(**{**ckpt['args'], **machine})
    runtime_defaults(args, device, backbone_config(args.backbone, **model_fields(args)).embed_dim)
    amp = autocast_args(args.amp, device)
    say = print if rank == 0 else (lambda *a, **k: None)
    pretrained = args.pretrained  # resolved before seeding: making the demo backbone draws random numbers
    if pretrained == 'auto' and ckpt is None:
        pretrained = demo_backbone(args, world) if args.dataset == 'leaves' else pretrained_url(args.backbone)
    torch.manual_seed(args.seed)

    # 1. data: ImageNet statistics by default, as the paper's code does for every backbone. Under torchrun rank 0
    # resizes the images (and downloads the weights, below) first; the others then read its files
    if rank:
        dist.barrier()
    stats = backbone_config(args.backbone) if args.norm == 'backbone' else None
    mean, std = (stats.mean, stats.std) if stats else (None, None)
    cache = args.workers if args.cache else None
    train_set, num_classes = build_dataset(args.dataset, 'train', args.img_size, args.data_dir, mean, std, args.aug,
                                           cache)
    test_set, _ = build_dataset(args.dataset, 'test', args.img_size, args.data_dir, mean, std, cache_workers=cache)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    loader_gen = torch.Generator()
    kw = dict(num_workers=args.workers, pin_memory=device.type == 'cuda')
    train_loader = DataLoader(train_set, args.batch_size // world, sampler=sampler, drop_last=True,
                              generator=loader_gen, **kw)
    test_loader = DataLoader(split_for_rank(test_set, rank, world), args.batch_size // world, **kw)
    if len(train_loader) == 0:
        raise DatasetError(f'{len(train_set)} training images make no full batch of {args.batch_size}')

    # 2. model, optimizer, mixed precision
    model = ViT(backbone_config(args.backbone, num_classes=num_classes, **model_fields(args)))
    if pretrained != 'none' and ckpt is None:
        load_weights(model, pretrained, verbose=rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    distributed = dist.is_initialized()  # launched by torchrun, on 1 process or more
    if distributed and device.type == 'cuda':  # the CLA head's BatchNorm sees the global batch, as on one GPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        start = ckpt['epoch']
    net = torch.compile(model) if args.compile else model
    net = DDP(net, device_ids=[device.index] if device.type == 'cuda' else None) if distributed else net

    run_dir = Path(args.resume).parent if args.resume else out_dir(args) if rank == 0 else None
    if world > 1:  # rank 0 names the folder: the others would number theirs on their own
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    where = f'{device} x{world}'
    if distributed:
        where += f' ({dist.get_backend()}, SyncBatchNorm)' if device.type == 'cuda' else f' ({dist.get_backend()})'
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is not None and (run_dir / 'log.jsonl').exists():
            lines = (run_dir / 'log.jsonl').read_text().splitlines()
            (run_dir / 'log.jsonl').write_text(''.join(l + '\n' for l in lines if json.loads(l)['epoch'] <= start))
        (run_dir / 'config.json').write_text(json.dumps({**vars(args), 'model': vars(model.cfg)}, indent=2) + '\n')
        say(f'{args.dataset}: {len(train_set)} train / {len(test_set)} test images, {num_classes} classes; '
            f'{args.backbone} {args.method} keep {args.keep} clc={args.clc} cla={args.cla} on {where}, '
            f'precision {args.amp} ({how}), compile {args.compile}; writing to {run_dir}')

    # 3. the loop: train an epoch, evaluate, log, checkpoint
    metrics = {}
    for epoch in range(start, args.epochs):
        # the randomness of an epoch depends on (seed, epoch, rank) only, so a resumed run takes the same path
        torch.manual_seed(epoch_seed(args.seed, epoch, rank))
        loader_gen.manual_seed(epoch_seed(args.seed, epoch, rank))
        sampler.set_epoch(epoch)
        net.train()
        seen, loss_sum, correct, norms, t0 = 0, 0.0, 0, [], time.perf_counter()
        kept = f'the last good checkpoint is {run_dir / "last.pt"}' if epoch else 'no checkpoint was written'
        bar = tqdm(train_loader, desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, disable=rank != 0)
        for step, (images, labels) in enumerate(bar):
            lr = lr_at(epoch + (step / len(train_loader) if args.schedule == 'step' else 0), args)
            for group in optimizer.param_groups:
                group['lr'] = lr
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(**amp):
                logits, loss = net(images, labels)  # cross-entropy plus any loss the reduction adds
            check = loss.detach().clone()
            if world > 1:  # every process sees the same verdict, so all of them stop together
                dist.all_reduce(check)
            if not torch.isfinite(check):
                raise FloatingPointError(f'the loss became {check.item()} in epoch {epoch + 1}; {kept}: '
                                         'lower --lr, or set --clip-grad 1.0')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the norm is logged (and clipped) on the true gradients, whatever the loss scale
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or math.inf).item()
            if math.isfinite(norm):  # an fp16 step the scaler skips has no norm worth logging
                norms.append(norm)
            scaler.step(optimizer)
            scaler.update()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            speed = seen * world / (time.perf_counter() - t0)
            bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{lr:.1e}', img_s=f'{speed:.0f}')
        totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(totals)
        elapsed = time.perf_counter() - t0
        test = evaluate(net, test_loader, device, amp, world)
        if not math.isfinite(test['test_loss']):  # the weights broke in the last step: keep the last good file
            raise FloatingPointError(f'the test loss became {test["test_loss"]} after epoch {epoch + 1}; {kept}: '
                                     'lower --lr, or set --clip-grad 1.0')
        metrics = dict(epoch=epoch + 1, lr=lr, train_loss=(totals[0] / totals[2]).item(),
                       train_top1=(100 * totals[1] / totals[2]).item(), **test,
                       grad_norm_mean=sum(norms) / max(len(norms), 1), grad_norm_max=max(norms, default=0.0),
                       images_per_s=totals[2].item() / elapsed, seconds=elapsed)
        if rank == 0:  # log first: a resumed run drops log lines of epochs its checkpoint does not have
            with open(run_dir / 'log.jsonl', 'a') as f:
                f.write(json.dumps(metrics) + '\n')
            save_checkpoint(model, run_dir / 'last.pt', optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            epoch=epoch + 1, args=vars(args), metrics=metrics)
            say(f"epoch {epoch + 1:3d}/{args.epochs}  loss {metrics['train_loss']:.3f}  "
                f"train {metrics['train_top1']:5.1f}%  test {metrics['top1']:5.1f}% (top-5 {metrics['top5']:5.1f}%)  "
                f"lr {lr:.1e}  {metrics['images_per_s']:.0f} img/s  {elapsed:.0f} s")
    if distributed:
        dist.destroy_process_group()
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (DatasetError, CheckpointError, FloatingPointError) as e:
        exit_with(e)


if __name__ == '__main__':
    main()
