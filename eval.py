"""Run CLCA models: build one from flags or a checkpoint, evaluate it, measure what it costs. Also what
train.py and explain.py share: the model flags, the machine's defaults, `evaluate`, one-line errors.

    python eval.py --checkpoint runs/leaves/last.pt             # top-1 / top-5 on the test split
    python eval.py --checkpoint clca.pth --dataset soyageing    # a checkpoint of the paper's code
    python eval.py --cost --method evit --keep 0.1 --clc --cla  # params, GMACs, images/s, peak memory
    python eval.py --sweep --methods none evit topk --keeps 0.1 0.5 0.7   # cost table
    python eval.py --sweep --checkpoints runs/*/ > runs.md              # top-1 over seeds; plot.py draws it
"""
import sys

if sys.version_info < (3, 10):  # said in one line, before the first `str | None` below fails with a traceback
    sys.exit(f'error: this code needs Python 3.10 or newer, not {sys.version.split()[0]}: install a newer Python')

import argparse
import itertools
import json
import math
import os
import re
import resource
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data import DATASETS, DatasetError, Standardise, build_dataset
from model import CLCA, PAPER_BACKBONE, PAPER_SIZE, ViT, backbone_config, gmacs, tokens_per_stage
from reduce import METHODS, varies_in_length
from weights import CheckpointError, load_weights, model_config, num_classes_in, open_checkpoint, read_checkpoint

DEVICES = ('auto', 'cuda', 'mps', 'cpu')


def add_model_flags(p):
    """The flags that describe a model, shared by train.py, eval.py and explain.py. All default to None: the
    caller fills what is not given, from a preset or from a checkpoint."""
    a = p.add_argument
    a('--backbone', help=f'timm ViT name with pretrained tag (default {PAPER_BACKBONE}, the backbone of the '
      "official README's training command; the paper's figures use deit3_base_patch16_224.fb_in1k)")
    a('--img-size', type=int, help=f'input size in pixels (paper: {PAPER_SIZE})')
    a('--method', choices=('none', *METHODS), help='token reduction method')
    a('--keep', type=float, nargs='+', help='keep rate, one or one per location')
    a('--loc', type=int, nargs='*', help='0-indexed blocks that reduce (--loc alone: none)')
    a('--clc', action=argparse.BooleanOptionalAction, help='cross-layer cache')
    a('--cla', action=argparse.BooleanOptionalAction, help='cross-layer aggregation head')
    a('--num-clr', type=int, help='CLR carrier tokens of the cache')


def model_fields(args) -> dict:
    """The ModelConfig fields the model flags set."""
    return {k: getattr(args, k) for k in ('img_size', 'loc', 'num_clr', *CLCA) if getattr(args, k) is not None}


def pick_device(name: str) -> torch.device:
    """--device: 'auto' takes CUDA where torch sees it, else the CPU. Apple's MPS only when asked for: no Mac
    has run this code, so a Mac trains on its CPU, the path the tests cover, unless told `--device mps`."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    seen = {'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available(), 'cpu': True}
    if not seen[name]:
        raise SystemExit(f'error: --device {name}: torch sees no such device here; use --device auto or cpu')
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: Ampere and newer GPUs; CPUs with AMX tiles or
    AVX512-BF16 (Sapphire Rapids and later Xeons, Zen 4) whose AVX-512 kernels torch uses (not held to AVX2 by
    ATEN_CPU_CAPABILITY). Elsewhere bf16 is emulated: slower than fp32."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    units = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return device.type == 'cpu' and units and torch.backends.cpu.get_cpu_capability().startswith('AVX512')


def runtime_defaults(args, device: torch.device, train_width: int = 0):
    """Fill, where not given, the flags whose best value depends on the machine (docs/RESULTS.md: why).
    Precision: bf16 where the hardware has it, but fp32 to train a model narrower than 384 on a CPU
    (`train_width`), where autocast costs more than it saves; fp16 with loss scaling on older GPUs; else fp32.
    Compile: on CUDA, but not a method whose token counts vary per image (ATS: `varies_in_length`). Workers:
    on CUDA the `usable_cores` split over the node's processes, at most MAX_WORKERS each; else 0. The resize
    cache of training (`--cache`, data.resize_once): on CUDA, where loading must keep up with the model."""
    cuda = device.type == 'cuda'
    if args.amp is None and native_bf16(device) and not (device.type == 'cpu' and 0 < train_width < 384):
        args.amp = 'bf16'
    if args.amp is None:
        args.amp = 'fp16' if cuda else 'off'
    if args.compile is None:
        args.compile = cuda and not varies_in_length(args.method)
    if args.workers is None:
        per_process = usable_cores() // int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        args.workers = min(MAX_WORKERS, max(1, per_process)) if cuda else 0
    if getattr(args, 'cache', False) is None:  # train.py's flag only
        args.cache = cuda


MAX_WORKERS = 16  # loader processes per GPU: enough for images resized once; each costs memory and start-up


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity and a container's CPU quota (cgroup v2 cpu.max), not
    the host's count, which os.cpu_count() gives."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    try:
        quota, period = Path('/sys/fs/cgroup/cpu.max').read_text().split()
        return max(1, min(cores, math.ceil(int(quota) / int(period)))) if quota != 'max' else cores
    except (OSError, ValueError):
        return cores


def shm_warning(workers: int, batch: int, img_size: int) -> str | None:
    """One line when /dev/shm cannot hold the batches the loader workers of this node's
    processes prefetch (2 each, uint8), else None: Docker gives a container 64 MB, and a worker
    that runs out of it dies of a bus error."""
    need = int(os.environ.get('LOCAL_WORLD_SIZE', 1)) * workers * 2 * batch * 3 * img_size ** 2
    free = shutil.disk_usage('/dev/shm').free if workers and os.path.isdir('/dev/shm') else math.inf
    if free >= need:
        return None
    return (f'warning: /dev/shm has {free / 2**20:.0f} MiB free; {workers} loader workers prefetch about '
            f'{need / 2**20:.0f} MiB: give the container --shm-size {math.ceil(2 * need / 2**30)}g, or lower --workers')


# Precision: `amp` is always the flag's string, one of PRECISIONS; these turn it into what torch takes
PRECISIONS = ('bf16', 'fp16', 'off')


def amp_dtype(amp: str) -> torch.dtype:
    """The dtype an --amp precision computes in ('off': fp32)."""
    return {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp, torch.float32)


def autocast_args(amp: str, device: torch.device) -> dict:
    """torch.autocast's arguments for --amp, called `autocast` wherever they are passed on."""
    return dict(device_type=device.type, dtype=amp_dtype(amp), enabled=amp != 'off')


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler of --amp: fp16's narrow range loses small gradients unless the loss is scaled up
    first; bf16 and fp32 need no scaling, and get a scaler that passes everything through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=amp == 'fp16')


def one_line(error: Exception) -> str:
    """The message of `error`: of the traceback a DataLoader worker wraps it in, the last line, less the class."""
    return re.sub(r'^[\w.]+Error: ', '', str(error).strip().splitlines()[-1])


def exit_with(error: Exception):
    """One line, no traceback."""
    sys.exit(f'error: {one_line(error)}')


@torch.no_grad()
def evaluate(model, loader, standardise: Standardise, autocast: dict) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy under torch.autocast(**autocast), of the uint8
    batches of `loader`, standardised on the device, summed over all processes under torchrun. The sums stay
    on the device until the end: no batch waits for the host."""
    model.eval()
    device = standardise.mean.device
    totals, count = torch.zeros(3, device=device), 0  # correct@1, correct@5, loss sum; counts exact to 2^24
    for images, labels in loader:
        images = standardise(images)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(**autocast):
            logits = model(images)[0].float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5 == labels[:, None]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction='sum')
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), loss]).float()
        count += len(labels)
    totals = torch.cat([totals, totals.new_tensor([count])])
    if dist.is_initialized():
        dist.all_reduce(totals)
    correct1, correct5, loss, count = totals.tolist()
    return dict(top1=100 * correct1 / count, top5=100 * correct5 / count, test_loss=loss / count)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Evaluate and measure CLCA models.')
    a = p.add_argument
    a('--checkpoint', help="a checkpoint of train.py or of the paper's code")
    a('--dataset', choices=DATASETS, help="dataset (default: the checkpoint's, else leaves)")
    a('--data-dir', help='dataset folder (default data/<dataset>)')
    a('--split', choices=('train', 'test'), default='test')
    a('--cost', action='store_true', help='parameters, GMACs, images/s and peak memory instead of accuracy')
    a('--train', action='store_true', help='with --cost: time a training step as train.py takes it, not inference')
    a('--sweep', action='store_true', help='one table over --methods x --keeps (or over --checkpoints)')
    a('--methods', nargs='+', choices=('none', *METHODS), default=['none', 'evit', 'topk'])
    a('--keeps', type=float, nargs='+', default=[0.1, 0.25, 0.5, 0.7])
    a('--checkpoints', nargs='+', help='sweep over checkpoints (evaluated) or run folders (their logged top-1)')
    add_model_flags(p)  # they describe the model where no checkpoint does, and override its settings
    a('--num-classes', type=int)
    a('--batch-size', type=int, help='default 32 on CUDA, 4 on CPU')
    a('--amp', choices=PRECISIONS, help='precision (default: what the hardware runs fast)')
    a('--compile', action='store_true', help='time the torch.compile-d model')
    a('--workers', type=int, help='data loading processes (default: CUDA, the usable cores; else 0)')
    a('--device', choices=DEVICES, default='auto', help='auto: CUDA, else the CPU; mps only when asked (untried)')
    return p.parse_args(argv)


def build(args, checkpoint=None):
    """(model, loaded checkpoint or None): the model the checkpoint describes, with the model flags given
    on the command line on top; without a checkpoint, the flags alone on the paper's backbone and size."""
    raw = open_checkpoint(checkpoint) if checkpoint else None
    weights = read_checkpoint(raw) if raw is not None else None  # read once: the classes, then the weights
    classes = num_classes_in(weights.sd if weights is not None else {})
    cfg = model_config(raw, classes)
    if cfg is not None:
        cfg = replace(cfg, **model_fields(args))
    else:  # no checkpoint, or one that describes no model (a timm file): the flags say what to build
        fields = {'img_size': PAPER_SIZE, **model_fields(args)}
        cfg = backbone_config(args.backbone or PAPER_BACKBONE, num_classes=args.num_classes or classes, **fields)
    model = ViT(cfg)
    if weights is not None:
        missing, _ = load_weights(model, weights, verbose=False)
        if missing:  # a model flag that contradicts the checkpoint would leave these random
            raise CheckpointError(f'{checkpoint} has no weights for {", ".join(missing[:4])}: drop the model flags '
                                  'that differ from the settings it was trained with')
    return model, raw


def recorded_run(folder):
    """(model, saved record, top-1) of a finished train.py run, from config.json and its log's last line."""
    try:
        saved = json.loads((Path(folder) / 'config.json').read_text())
        last = json.loads((Path(folder) / 'log.jsonl').read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
        raise CheckpointError(f'{folder} holds no train.py run (config.json and log.jsonl): {e}') from None
    if last['epoch'] < saved['epochs']:
        raise CheckpointError(f'{folder} stopped after epoch {last["epoch"]} of {saved["epochs"]}: finish it with '
                              f'python train.py --resume {Path(folder) / "last.pt"}, or leave it out')
    raw = {'config': saved.pop('model'), 'args': saved}
    return ViT(model_config(raw)), raw, last['top1']


def eval_split(args, model, raw):
    """The split --split of --dataset, else of the dataset the checkpoint was trained on, with the
    normalisation it was trained with and no augmentation."""
    saved = raw.get('args') if isinstance(raw, dict) and isinstance(raw.get('args'), dict) else {}
    name = args.dataset or saved.get('dataset', 'leaves')
    data_dir = args.data_dir or (saved.get('data_dir') if name == saved.get('dataset') else None)
    stats = (model.cfg.mean, model.cfg.std) if saved.get('norm') == 'backbone' else (None, None)
    dataset, num_classes = build_dataset(name, args.split, model.cfg.img_size, data_dir, *stats)
    if num_classes != model.cfg.num_classes:
        raise DatasetError(f'{name} has {num_classes} classes but the model predicts {model.cfg.num_classes}: '
                           'pick the dataset the checkpoint was trained on')
    return dataset


def for_inference(model, amp: str, device):
    """The model in eval mode on `device`, cast once to --amp's dtype, as a deployed model runs (`cost`): with
    no fp32 master weights to keep, autocast's casting of every weight in every forward is waste."""
    return model.to(device, amp_dtype(amp)).eval()


def accuracy(model, dataset, args, device) -> dict:
    """Accuracy as train.py measures it after an epoch (fp32 weights, autocast at --amp): the two agree."""
    loader = DataLoader(dataset, args.batch_size, num_workers=args.workers, pin_memory=device.type == 'cuda')
    return evaluate(model.to(device), loader, Standardise.of(dataset, device), autocast_args(args.amp, device))


def timed(step, batch: int, device, warmup: int = 3, reps: int = 10) -> tuple:
    """(images/s, seconds of the warm-up) of `step()` on a batch of `batch` images: the median of `reps` timed
    runs after `warmup` untimed ones, in which torch.compile does its work."""
    times = []
    for _ in range(warmup + reps):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[warmup:]), sum(times[:warmup])


def inference_step(model, batch: int, device):
    """One forward of the model alone, on synthetic images in the weights' dtype."""
    size, dtype = model.cfg.img_size, next(model.parameters()).dtype
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    return torch.inference_mode()(lambda: model(images))


def training_step(model, net, batch: int, device, amp: str):
    """One training step of the model alone on synthetic images and labels: the very function train.py's loop
    calls (`train.train_step`), with `net` (the compiled model or the model), AdamW and --amp's scaler."""
    from train import train_step  # imported here, not at the top, because train.py imports this file
    images = torch.randn(batch, 3, model.cfg.img_size, model.cfg.img_size, device=device)
    labels = torch.randint(model.cfg.num_classes, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scaler, autocast = grad_scaler(amp, device), autocast_args(amp, device)
    return lambda: train_step(net, optimizer, scaler, images, labels, autocast)


def cost(model, args, device) -> dict:
    """Parameters (millions), GMACs, images/s, seconds of warm-up (compiling, with --compile) and peak memory
    (MiB; the process's on a CPU) of inference, cast once to --amp, or with --train of a training step."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    macs = gmacs(model)
    model = model.to(device).train() if args.train else for_inference(model, args.amp, device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    if args.compile:  # dynamo caches by code: after 8 models of one class, it would run the rest eager
        torch._dynamo.reset()
    net = torch.compile(model) if args.compile else model
    if args.train:
        step = training_step(model, net, args.batch_size, device, args.amp)
    else:
        step = inference_step(net, args.batch_size, device)
    ips, warmup = timed(step, args.batch_size, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's, on a CPU
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated()
    return dict(params_M=params, GMACs=macs, images_per_s=ips, warmup_s=warmup, peak_MiB=peak / 2**20)


# what a checkpoint's saved args may differ in and still be a repeat of the same run
NOT_THE_RUN = {'seed', 'out', 'resume', 'workers', 'cache', 'compile', 'device', 'data_dir', 'output_dir'}


def run_key(cfg, raw) -> str:
    """The run a checkpoint comes from, but for its seed and the machine: equal keys are repeats."""
    saved = raw.get('args') if isinstance(raw, dict) else None
    if isinstance(saved, argparse.Namespace):  # the paper's checkpoints
        saved = vars(saved)
    recipe = {k: v for k, v in (saved or {}).items() if k not in NOT_THE_RUN}
    return json.dumps([asdict(cfg), recipe], sort_keys=True, default=str)


def sweep(args, device):
    """Print one markdown table: a row per method x keep x CLCA, or per run of --checkpoints, where
    checkpoints that differ only in their seed (or the machine) share a row: top-1 as mean ± sample std over
    them, and their count. plot.py draws such a table."""
    groups = {}  # run key -> (the model of its first checkpoint, top-1 of each checkpoint)
    if args.checkpoints and model_fields(args) and any(Path(c).is_dir() for c in args.checkpoints):
        raise ValueError('a run folder reports the model it trained: drop the model flags, or pass last.pt files')
    for checkpoint in args.checkpoints or []:
        if Path(checkpoint).is_dir():
            model, raw, top1 = recorded_run(checkpoint)
        else:
            model, raw = build(args, checkpoint)
            top1 = accuracy(model, eval_split(args, model, raw), args, device)['top1']
        groups.setdefault(run_key(model.cfg, raw), (model, []))[1].append(top1)
    settings = [] if args.checkpoints else itertools.product(args.methods, args.keeps, (False, True))
    for method, keep, clca in settings:
        if method in METHODS or keep == args.keeps[0]:  # the plain ViT ('none') ignores the rate: one row
            flags = dict(method=method, keep=[keep], clc=clca, cla=clca)
            groups[len(groups)] = (build(argparse.Namespace(**{**vars(args), **flags}))[0], [])
    print('| method | keep | CLC | CLA | tokens per stage | GMACs | images/s | top-1 | seeds |\n|' + '---|' * 9)
    for model, tops in groups.values():
        cfg = model.cfg
        c = cost(model, args, device)
        keep = '/'.join(f'{k:g}' for k in cfg.keep) if cfg.method in METHODS else '1'
        top1 = '-'
        if tops:
            top1 = f'{statistics.mean(tops):.1f}' + (f' ± {statistics.stdev(tops):.1f}' if len(tops) > 1 else '')
        print(f"| {cfg.method} | {keep} | {'on' if cfg.clc else 'off'} | {'on' if cfg.cla else 'off'} | "
              f"{tokens_per_stage(cfg)} | {c['GMACs']:.3f} | {c['images_per_s']:.1f} | {top1} | {len(tops) or '-'} |",
              flush=True)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    args.batch_size = args.batch_size or (32 if device.type == 'cuda' else 4)
    runtime_defaults(args, device)
    try:
        if args.sweep:
            sweep(args, device)
            return
        if not (args.checkpoint or args.cost):
            raise ValueError('give --checkpoint to evaluate, or --cost / --sweep to measure a model from flags')
        model, raw = build(args, args.checkpoint)
        cfg = model.cfg
        print(f'{cfg.method} keep {cfg.keep} loc {cfg.loc} clc={cfg.clc} cla={cfg.cla} at {cfg.img_size} px; tokens '
              f'per stage {tokens_per_stage(cfg)}; precision {args.amp} on {device.type}')
        if args.cost:
            c = cost(model, args, device)
            what = 'training' if args.train else 'inference'
            print(f"{c['params_M']:.2f} M parameters, {c['GMACs']:.3f} GMACs, {c['images_per_s']:.2f} images/s of "
                  f"{what} (batch {args.batch_size}, {device.type}, amp {args.amp}, compile {args.compile}, warm-up "
                  f"{c['warmup_s']:.1f} s), peak memory {c['peak_MiB']:.0f} MiB")
        else:
            res = accuracy(model, eval_split(args, model, raw), args, device)
            print(f"{args.split} top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['test_loss']:.4f}")
    except (DatasetError, CheckpointError, ValueError, OSError) as e:
        exit_with(e)


if __name__ == '__main__':
    main()
