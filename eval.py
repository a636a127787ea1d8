"""Evaluate, measure and look at CLCA models.

    python eval.py --checkpoint runs/leaves/last.pt             # top-1 / top-5 on the test split
    python eval.py --checkpoint clca.pth --dataset soyageing    # a checkpoint of the paper's code
    python eval.py --cost --method evit --keep 0.1 --clc --cla  # params, GMACs, images/s, peak memory
    python eval.py --sweep --methods none evit topk --keeps 0.1 0.5 0.7   # cost table (accuracy with --checkpoints)
    python eval.py --checkpoint runs/leaves/last.pt --visualize kept.png  # which patches survive
"""
import argparse
import itertools
import os
import re
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid, save_image

from data import DATASETS, DatasetError, build_dataset
from model import ViT, CheckpointError, create_model, load_weights, open_checkpoint, read_checkpoint
from reduce import METHODS

# the paper's code names a model '<method>_<timm name>' (e.g. evit_vit_base_patch16_clip_224.laion2b)
OFFICIAL_METHODS = {m: m for m in ('evit', 'topk', 'tome', 'ats', 'patchmerger', 'sit', 'dpcknn')} | {'dyvit': 'dynamicvit'}


def runtime_defaults(args, cuda: bool) -> dict:
    """Fill the device-dependent flags train.py and eval.py share; returns torch.autocast's arguments."""
    args.amp = args.amp or ('bf16' if cuda else 'off')
    args.workers = (min(8, os.cpu_count() or 1) if cuda else 0) if args.workers is None else args.workers
    return dict(device_type='cuda' if cuda else 'cpu', dtype=torch.float16 if args.amp == 'fp16' else torch.bfloat16,
                enabled=args.amp != 'off')


def exit_with(error: Exception):
    """One line, no traceback; a DataLoader worker wraps the error in its traceback: keep the last line."""
    sys.exit('error: ' + re.sub(r'^[\w.]+Error: ', '', str(error).strip().splitlines()[-1]))


def split_for_rank(dataset, rank: int, world: int):
    """Every world-th sample from `rank`: each image is evaluated exactly once over all processes."""
    return dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))


@torch.no_grad()
def evaluate(model, loader, device, amp: dict, world: int = 1) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy, summed over all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(**amp):
            logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5 == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                               torch.nn.functional.cross_entropy(logits, labels, reduction='sum'),
                               torch.tensor(len(labels), device=device)]).double()
    if world > 1:
        dist.all_reduce(totals)
    return dict(top1=(100 * totals[0] / totals[3]).item(), top5=(100 * totals[1] / totals[3]).item(),
                test_loss=(totals[2] / totals[3]).item())


def settings_of(raw: dict) -> dict:
    """create_model arguments stored in a checkpoint: this project's `args` dict, or the
    argparse.Namespace saved by the paper's code (model '<method>_<timm name>', input_size, ...)."""
    args = raw.get('args') if isinstance(raw, dict) else None
    if isinstance(args, dict):  # this project's
        return {k: args[k] for k in ('backbone', 'img_size', 'method', 'keep', 'loc', 'clc', 'cla', 'num_clr')}
    if isinstance(args, argparse.Namespace):  # the paper's
        a, out = vars(args), {}
        if 'model' in a:
            prefix, _, rest = a['model'].partition('_')
            out.update(method=OFFICIAL_METHODS[prefix], backbone=rest) if prefix in OFFICIAL_METHODS \
                else out.update(method='none', backbone=a['model'])
        for ours, theirs in (('img_size', 'input_size'), ('keep', 'keep_rate'), ('loc', 'reduction_loc'),
                             ('clc', 'clc'), ('cla', 'ifa_head'), ('num_clr', 'num_clr'),
                             ('clc_gap', 'clc_include_gap'), ('clc_last', 'clc_recover_at_last')):
            if a.get(theirs) is not None:
                out[ours] = a[theirs]
        return out
    return {}


def build(args, checkpoint=None):
    """The model described by the checkpoint (if any), with flags given on the command line on top."""
    settings, sd = {}, None
    if checkpoint:
        raw = open_checkpoint(checkpoint)
        settings, sd = settings_of(raw), read_checkpoint(raw)
    for key in ('backbone', 'img_size', 'method', 'keep', 'loc', 'clc', 'cla', 'num_clr'):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    num_classes = args.num_classes or next((sd[k].shape[0] for k in ('ifa_head.0.4.weight', 'head.weight')
                                            if sd and k in sd), 1000)
    settings.setdefault('backbone', 'vit_base_patch16_224')
    settings.setdefault('img_size', 448)
    model = create_model(num_classes=num_classes, **settings)
    if sd is not None:
        missing, _ = load_weights(model, sd, verbose=False)
        if missing:  # a model flag that contradicts the checkpoint would leave these random
            raise CheckpointError(f'{checkpoint} has no weights for {", ".join(missing[:4])}: drop the model flags '
                                  'that differ from the settings it was trained with')
    return model


@torch.inference_mode()
def speed(model, batch: int, device, amp: dict, warmup: int = 3, reps: int = 10) -> float:
    """Images per second of the model alone: synthetic input, warm-up, median over repeated runs."""
    images = torch.randn(batch, 3, model.cfg.img_size, model.cfg.img_size, device=device)
    times = []
    for i in range(warmup + reps):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(**amp):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[warmup:])


def tokens_per_stage(cfg) -> str:
    """Sequence length entering the first block and after each reduction location, e.g. 786>86>16>9,
    counted on the meta device (no memory, no compute). ATS keeps a number of tokens that depends on
    the image: its counts come from one random image and carry a '~'."""
    varies = cfg.method == 'ats'
    device = 'cpu' if varies else 'meta'
    with torch.device(device):
        model = ViT(cfg).eval()
    lengths = []
    for i in [0] + [i + 1 for i in cfg.loc if i + 1 < cfg.depth]:
        model.blocks[i].register_forward_pre_hook(lambda m, a: lengths.append(a[0].x.shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, cfg.img_size, cfg.img_size, device=device))
    return '~' * varies + '>'.join(map(str, lengths))


@torch.no_grad()
def gmacs(model) -> float:
    """Multiply-accumulates (billions) of a one-image forward: what the paper's cost tables call FLOPs.

    torch's flop counter sees matmuls and convolutions, attention included when SDPA runs as its
    math decomposition. Works on a model built on the meta device (no memory, no compute).
    """
    p = next(model.parameters())
    images = torch.randn(1, 3, model.cfg.img_size, model.cfg.img_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops() / 2e9


def cost_row(model, args, device, amp) -> dict:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    macs = gmacs(model)
    model.to(device).eval()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    ips = speed(torch.compile(model) if args.compile else model, args.batch_size, device, amp)
    peak = (torch.cuda.max_memory_allocated() if device.type == 'cuda'
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return dict(params_M=params, GMACs=macs, images_per_s=ips, peak_MiB=peak)


def visualize(model, dataset, path, device, num_images=8):
    """A PNG grid: per row one test image, then the image after each reduction location with the
    patches that no longer have a token of their own dimmed."""
    images = torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (dataset.transform.transforms[-1].mean,
                                                            dataset.transform.transforms[-1].std))
    plain = (images * std + mean).clamp(0, 1)
    kept = []
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, out: kept.append(out.idx.cpu())) for i in model.cfg.loc]
    with torch.no_grad():
        model.eval()(images.to(device))
    for h in hooks:
        h.remove()
    side, p = model.cfg.img_size // model.cfg.patch_size, model.cfg.patch_size
    rows = [plain]
    for idx in kept:  # idx (B, N): positions in [CLS, patches]; 0 = CLS, -1 = made tokens
        alive = torch.zeros(len(images), 1 + side * side).scatter_(1, idx.clamp(min=0), 1.0)[:, 1:]
        mask = alive.view(-1, 1, side, side).repeat_interleave(p, 2).repeat_interleave(p, 3)  # (B, 1, S, S)
        rows.append(plain * (0.25 + 0.75 * mask))
    grid = torch.stack(rows, 1).flatten(0, 1)  # image-major: original, loc 1, loc 2, ...
    save_image(make_grid(grid, nrow=len(rows), padding=2, pad_value=1.0), path)


def main(argv=None):
    p = argparse.ArgumentParser(description='Evaluate, measure and visualize CLCA models.')
    a = p.add_argument
    a('--checkpoint', help="a checkpoint of train.py or of the paper's code")
    a('--dataset', choices=DATASETS, help="dataset (default: the checkpoint's, else leaves)")
    a('--data-dir', help='dataset folder (default data/<dataset>)')
    a('--split', choices=('train', 'test'), default='test')
    a('--cost', action='store_true', help='parameters, GMACs, images/s and peak memory instead of accuracy')
    a('--sweep', action='store_true', help='one table over --methods x --keeps (or over --checkpoints)')
    a('--methods', nargs='+', choices=METHODS, default=['none', 'evit', 'topk'])
    a('--keeps', type=float, nargs='+', default=[0.1, 0.25, 0.5, 0.7])
    a('--checkpoints', nargs='+', help='sweep rows from checkpoints, with their accuracy')
    a('--visualize', metavar='PNG', help='write a grid of the patches that survive each reduction')
    # model flags: they describe the model when no checkpoint does, and override a checkpoint's settings
    a('--backbone')
    a('--img-size', type=int)
    a('--method', choices=METHODS)
    a('--keep', type=float, nargs='+')
    a('--loc', type=int, nargs='*')
    a('--clc', action=argparse.BooleanOptionalAction)
    a('--cla', action=argparse.BooleanOptionalAction)
    a('--num-clr', type=int)
    a('--num-classes', type=int)
    a('--batch-size', type=int, help='default 32 on CUDA, 4 on CPU')
    a('--amp', choices=('bf16', 'fp16', 'off'), help='default bf16 on CUDA, off on CPU')
    a('--compile', action='store_true', help='time the torch.compile-d model')
    a('--workers', type=int, help='data loading processes (default: min(8, cores) on CUDA, 0 on a CPU)')
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    args.batch_size = args.batch_size or (32 if cuda else 4)
    amp = runtime_defaults(args, cuda)
    try:
        run(args, device, amp)
    except (DatasetError, CheckpointError, ValueError) as e:
        exit_with(e)


def test_set(args, model, checkpoint=None):
    """The split to evaluate on: --dataset, else the dataset the checkpoint was trained on."""
    raw = open_checkpoint(checkpoint) if checkpoint else {}
    saved = raw.get('args') if isinstance(raw.get('args'), dict) else {}
    name = args.dataset or saved.get('dataset', 'leaves')
    data_dir = args.data_dir or (saved.get('data_dir') if name == saved.get('dataset') else None)
    stats = (model.cfg.mean, model.cfg.std) if saved.get('norm') == 'backbone' else (None, None)
    dataset, num_classes = build_dataset(name, args.split, model.cfg.img_size, data_dir, *stats)
    if num_classes != model.cfg.num_classes:
        raise DatasetError(f'{name} has {num_classes} classes but the model predicts {model.cfg.num_classes}: '
                           'pick the dataset the checkpoint was trained on')
    return dataset


def accuracy(model, dataset, args, device, amp) -> dict:
    loader = DataLoader(dataset, args.batch_size, num_workers=args.workers)
    return evaluate(model.to(device), loader, device, amp)


def run(args, device, amp):
    if args.sweep:
        rows = [(c, {}) for c in args.checkpoints] if args.checkpoints else \
            [(None, dict(method=m, keep=[k], clc=clca, cla=clca)) for m, k, clca in
             itertools.product(args.methods, args.keeps, (False, True)) if not (m == 'none' and k != args.keeps[0])]
        print('| method | keep | CLCA | tokens per stage | GMACs | images/s | top-1 |\n|---|---|---|---|---|---|---|')
        for checkpoint, flags in rows:
            model = build(argparse.Namespace(**{**vars(args), **flags}), checkpoint)
            top1 = f"{accuracy(model, test_set(args, model, checkpoint), args, device, amp)['top1']:.1f}" \
                if checkpoint else '-'
            c, cfg = cost_row(model, args, device, amp), model.cfg
            keep = '/'.join(f'{k:g}' for k in cfg.keep) if cfg.method != 'none' else '1'
            print(f"| {cfg.method} | {keep} | {'on' if cfg.clc and cfg.cla else 'off'} | {tokens_per_stage(cfg)} "
                  f"| {c['GMACs']:.3f} | {c['images_per_s']:.1f} | {top1} |", flush=True)
        return
    if not (args.checkpoint or args.cost):
        raise ValueError('give --checkpoint to evaluate, or --cost / --sweep to measure a model from flags')
    model = build(args, args.checkpoint)
    cfg = model.cfg
    print(f'{cfg.method} keep {cfg.keep} loc {cfg.loc} '
          f'clc={cfg.clc} cla={cfg.cla} at {cfg.img_size} px; tokens per stage {tokens_per_stage(cfg)}')
    if args.cost:
        c = cost_row(model, args, device, amp)
        print(f"{c['params_M']:.2f} M parameters, {c['GMACs']:.3f} GMACs, {c['images_per_s']:.2f} images/s "
              f"(batch {args.batch_size}, {device.type}, amp {args.amp}), peak memory {c['peak_MiB']:.0f} MiB"
              + (' (process RSS)' if device.type == 'cpu' else ''))
    elif args.visualize:
        visualize(model.to(device), test_set(args, model, args.checkpoint), args.visualize, device)
        print(f'wrote {args.visualize}')
    else:
        res = accuracy(model, test_set(args, model, args.checkpoint), args, device, amp)
        print(f"{args.split} top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['test_loss']:.4f}")


if __name__ == '__main__':
    main()
