"""Run CLCA models: build one from flags or a checkpoint, evaluate it, measure what it costs. Also what
train.py and explain.py share: the model flags, the machine's defaults, `evaluate`, one-line errors.

    python eval.py --checkpoint runs/leaves/last.pt             # top-1 / top-5 on the test split
    python eval.py --checkpoint clca.pth --dataset soyageing    # a checkpoint of the paper's code
    python eval.py --cost --method evit --keep 0.1 --clc --cla  # params, GMACs, images/s, peak memory
    python eval.py --sweep --methods none evit topk --keeps 0.1 0.5 0.7   # cost table
    python eval.py --sweep --checkpoints runs/*/ --plot acc.svg            # accuracy over seeds, and a plot
"""
import argparse
import itertools
import json
import math
import os
import re
import resource
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data import DATASETS, DatasetError, build_dataset
from model import (CLCA, PAPER_BACKBONE, PAPER_SIZE, ViT, backbone_config, gmacs, inference_step, timed,
                   tokens_per_stage, training_step)
from reduce import METHODS
from weights import CheckpointError, load_weights, model_config, num_classes_in, open_checkpoint, read_checkpoint

DEVICES = ('auto', 'cuda', 'mps', 'cpu')


def add_model_flags(p):
    """The flags that describe a model, shared by train.py, eval.py and explain.py. All default to None: the
    caller fills what is not given, from a preset or from a checkpoint."""
    a = p.add_argument
    a('--backbone', help=f'timm ViT name with pretrained tag (default {PAPER_BACKBONE}, the backbone of the '
      "official README's training command; the paper's figures use deit3_base_patch16_224.fb_in1k)")
    a('--img-size', type=int, help=f'input size in pixels (paper: {PAPER_SIZE})')
    a('--method', choices=METHODS, help='token reduction method')
    a('--keep', type=float, nargs='+', help='keep rate, one or one per location')
    a('--loc', type=int, nargs='*', help='0-indexed blocks that reduce (--loc alone: none)')
    a('--clc', action=argparse.BooleanOptionalAction, help='cross-layer cache')
    a('--cla', action=argparse.BooleanOptionalAction, help='cross-layer aggregation head')
    a('--num-clr', type=int, help='CLR carrier tokens of the cache')


def model_fields(args) -> dict:
    """The ModelConfig fields the model flags set."""
    return {k: getattr(args, k) for k in ('img_size', 'loc', 'num_clr', *CLCA) if getattr(args, k) is not None}


def pick_device(name: str) -> torch.device:
    """--device: 'auto' takes CUDA, then Apple's MPS, then the CPU."""
    if name == 'auto' and torch.cuda.is_available():
        return torch.device('cuda')
    if name == 'auto':
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: Ampere and newer GPUs; CPUs with AMX tiles or
    AVX512-BF16 (Sapphire Rapids and later Xeons, Zen 4). Elsewhere bf16 is emulated: slower than fp32."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == 'cpu' and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def runtime_defaults(args, device: torch.device, train_width: int = 0):
    """Fill, where not given, the flags whose best value depends on the machine (docs/RESULTS.md: why). Precision:
    bf16 where the hardware has it, but fp32 to train a model narrower than 384 on a CPU (`train_width`), where
    autocast costs more than it saves; fp16 with loss scaling on older GPUs; else fp32. Compile: on CUDA, but not
    ATS, whose token counts vary. Workers: on CUDA the node's cores split over its processes; else 0. The resize
    cache of training (`--cache`, data.resize_once): on CUDA, where loading must keep up with the model."""
    cuda = device.type == 'cuda'
    if args.amp is None and native_bf16(device) and not (device.type == 'cpu' and 0 < train_width < 384):
        args.amp = 'bf16'
    if args.amp is None:
        args.amp = 'fp16' if cuda else 'off'
    if args.compile is None:
        args.compile = cuda and args.method != 'ats'
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))) if cuda else 0
    if getattr(args, 'cache', False) is None:  # train.py's flag only
        args.cache = cuda


def autocast_args(amp: str, device: torch.device) -> dict:
    """torch.autocast's arguments for --amp."""
    return dict(device_type=device.type, dtype=torch.float16 if amp == 'fp16' else torch.bfloat16, enabled=amp != 'off')


def exit_with(error: Exception):
    """One line, no traceback; a DataLoader worker wraps the error in its traceback: keep the last line."""
    sys.exit('error: ' + re.sub(r'^[\w.]+Error: ', '', str(error).strip().splitlines()[-1]))


@torch.no_grad()
def evaluate(model, loader, device, amp: dict) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy, summed over all processes under torchrun."""
    model.eval()
    dtype = next(model.parameters()).dtype  # fp32 while training; `for_inference` casts the model
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
    if dist.is_initialized():
        dist.all_reduce(totals)
    return dict(top1=(100 * totals[0] / totals[3]).item(), top5=(100 * totals[1] / totals[3]).item(),
                test_loss=(totals[2] / totals[3]).item())


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
    a('--methods', nargs='+', choices=METHODS, default=['none', 'evit', 'topk'])
    a('--keeps', type=float, nargs='+', default=[0.1, 0.25, 0.5, 0.7])
    a('--checkpoints', nargs='+', help='sweep over checkpoints (evaluated) or run folders (their logged top-1)')
    a('--plot', metavar='SVG', help='with --sweep --checkpoints or --table: draw top-1 against GMACs')
    a('--table', metavar='MD', help='with --plot: draw the first sweep table in this markdown file')
    add_model_flags(p)  # they describe the model when no checkpoint does, and override a checkpoint's settings
    a('--num-classes', type=int)
    a('--batch-size', type=int, help='default 32 on CUDA, 4 on CPU')
    a('--amp', choices=('bf16', 'fp16', 'off'), help='precision (default: what the hardware runs fast)')
    a('--compile', action='store_true', help='time the torch.compile-d model')
    a('--workers', type=int, help='data loading processes (default: the cores on CUDA, 0 on a CPU)')
    a('--device', choices=DEVICES, default='auto', help='auto: CUDA, else Apple MPS, else the CPU')
    return p.parse_args(argv)


def build(args, checkpoint=None):
    """(model, loaded checkpoint or None): the model the checkpoint describes, with the model flags given
    on the command line on top; without a checkpoint, the flags alone on the paper's backbone and size."""
    raw = open_checkpoint(checkpoint) if checkpoint else None
    cfg = model_config(raw)
    if cfg is not None:
        cfg = replace(cfg, **model_fields(args))
    else:  # no checkpoint, or one that describes no model (a timm file): the flags say what to build
        num_classes = args.num_classes or num_classes_in(read_checkpoint(raw) if raw is not None else {})
        fields = {'img_size': PAPER_SIZE, **model_fields(args)}
        cfg = backbone_config(args.backbone or PAPER_BACKBONE, num_classes=num_classes, **fields)
    model = ViT(cfg)
    if raw is not None:
        missing, _ = load_weights(model, raw, verbose=False)
        if missing:  # a model flag that contradicts the checkpoint would leave these random
            raise CheckpointError(f'{checkpoint} has no weights for {", ".join(missing[:4])}: drop the model flags '
                                  'that differ from the settings it was trained with')
    return model, raw


def recorded_run(folder):
    """(model, saved record, top-1) of a finished train.py run, from config.json and its log's last line alone."""
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
    """The model in eval mode on `device`, cast once to the --amp precision: with no fp32 master weights to
    keep, autocast's casting of every weight in every forward is waste. Inputs follow the weights' dtype."""
    return model.to(device, {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp, torch.float32)).eval()


def accuracy(model, dataset, args, device) -> dict:
    loader = DataLoader(dataset, args.batch_size, num_workers=args.workers)
    return evaluate(for_inference(model, args.amp, device), loader, device, autocast_args('off', device))


def cost(model, args, device) -> dict:
    """Parameters (millions), GMACs, images/s, seconds of warm-up (compiling, with --compile) and peak memory
    (MiB; the process's on a CPU) of inference, cast once to --amp, or with --train of a training step."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    macs = gmacs(model)
    model = model.to(device).train() if args.train else for_inference(model, args.amp, device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    if args.compile:  # dynamo keys its cache by code: after 8 models of one class, it would run the rest eager
        torch._dynamo.reset()
    net = torch.compile(model) if args.compile else model
    if args.train:
        step = training_step(model, net, args.batch_size, device, autocast_args(args.amp, device))
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


def sweep(args, device) -> list:
    """One markdown table: a row per method x keep x CLCA, or per run of --checkpoints, where checkpoints that
    differ only in their seed (or the machine) share a row: top-1 as mean ± sample std over them, and their
    count. Returns the rows that have a top-1 (for --plot)."""
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
        if method != 'none' or keep == args.keeps[0]:  # 'none' ignores the rate: one row each
            flags = dict(method=method, keep=[keep], clc=clca, cla=clca)
            groups[len(groups)] = (build(argparse.Namespace(**{**vars(args), **flags}))[0], [])
    print('| method | keep | CLC | CLA | tokens per stage | GMACs | images/s | top-1 | seeds |\n|' + '---|' * 9)
    rows = []
    for model, tops in groups.values():
        cfg = model.cfg
        c = cost(model, args, device)
        keep = '/'.join(f'{k:g}' for k in cfg.keep) if cfg.method != 'none' else '1'
        top1 = '-'
        if tops:
            std = statistics.stdev(tops) if len(tops) > 1 else 0.0
            rows.append(dict(method=cfg.method, keep=keep, clc=cfg.clc, cla=cfg.cla, gmacs=c['GMACs'],
                             mean=statistics.mean(tops), std=std, seeds=len(tops)))
            top1 = f"{rows[-1]['mean']:.1f}" + (f' ± {std:.1f}' if len(tops) > 1 else '')
        print(f"| {cfg.method} | {keep} | {'on' if cfg.clc else 'off'} | {'on' if cfg.cla else 'off'} | "
              f"{tokens_per_stage(cfg)} | {c['GMACs']:.3f} | {c['images_per_s']:.1f} | {top1} | {len(tops) or '-'} |",
              flush=True)
    return rows


def read_table(path) -> list:
    """The rows of the first markdown table in `path` with the columns method, keep, CLC, CLA, GMACs, top-1 and
    seeds, as --sweep prints them (other columns are ignored): a table measured before, to draw again."""
    rows, header = [], None
    for line in Path(path).read_text().splitlines():
        cells = [c.strip().strip('*') for c in line.strip().strip('|').split('|')]
        if header is None and {'method', 'keep', 'CLC', 'CLA', 'GMACs', 'top-1', 'seeds'} <= set(cells):
            header = cells
        elif header is not None and not line.startswith('|'):
            break
        elif header is not None and not set(line) <= set('|-: '):  # a row, not the rule under the header
            row = dict(zip(header, cells))
            top1 = re.match(r'([\d.]+)(?: ± ([\d.]+))?', row['top-1'])
            rows.append(dict(method=row['method'], keep=row['keep'], clc=row['CLC'] == 'on', cla=row['CLA'] == 'on',
                             gmacs=float(row['GMACs']), mean=float(top1[1]), std=float(top1[2] or 0),
                             seeds=int(row['seeds'])))
    if not rows:
        raise ValueError(f'{path} has no table with the columns method, keep, CLC, CLA, GMACs, top-1 and seeds')
    return rows


def nice_ticks(lo: float, hi: float, most: int = 6) -> list:
    """Round tick values, steps of 1, 2 or 5 x 10^k, from at or below `lo` to at or above `hi`."""
    unit = 10 ** math.floor(math.log10((hi - lo) / most))
    step = next(unit * m for m in (1, 2, 5, 10) if (hi - lo) / (unit * m) <= most)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(math.ceil(round((hi - first) / step, 6)) + 1)]


def plot(rows, path):
    """Top-1 against GMACs as an SVG (no plotting library), drawn like the paper's figure: a colour per method,
    a marker per CLC/CLA setting (hollow: neither), a line joining the keep rates of each method and setting,
    the keep rate beside each point where it overlaps nothing, error bars of one standard deviation."""
    W, H, L, T, B, R = 680, 440, 60, 40, 50, 150  # canvas; left, top, bottom and right (legend) margins, in pixels
    xs = nice_ticks(min(r['gmacs'] for r in rows), max(r['gmacs'] for r in rows))
    ys = nice_ticks(min(r['mean'] - r['std'] for r in rows), max(r['mean'] + r['std'] for r in rows))
    px = lambda x: L + (x - xs[0]) / (xs[-1] - xs[0]) * (W - L - R)
    py = lambda y: H - B - (y - ys[0]) / (ys[-1] - ys[0]) * (H - B - T)
    colours = dict(zip(METHODS, '#444 #1f77b4 #17becf #ff7f0e #2ca02c #9467bd #8c564b #e377c2 #d62728'.split()))
    square = [(-5, -5), (5, -5), (5, 5), (-5, 5)]
    shapes = {(False, False): ('base', square), (True, True): ('CLCA', square),
              (True, False): ('CLC only', [(0, -6), (6, 5), (-6, 5)]),
              (False, True): ('CLA only', [(0, -6), (6, 0), (0, 6), (-6, 0)])}
    marker = lambda key, x, y, colour: (
        f'<polygon points="{" ".join(f"{x + a:.1f},{y + b:.1f}" for a, b in shapes[key][1])}" '
        f'fill="{"white" if key == (False, False) else colour}" stroke="{colour}" stroke-width="2"/>')
    seeds = sorted({r['seeds'] for r in rows})
    span = f'{seeds[0]}–{seeds[-1]}' if len(seeds) > 1 else f'{seeds[0]}'
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">'
           f'<rect width="{W}" height="{H}" fill="white"/>', f'<text x="{(L + W - R) / 2}" y="22" text-anchor="middle" '
           f'font-size="14">Test top-1 against cost (mean and one std over {span} seeds)</text>']
    for x in xs:  # light gridlines and round tick values
        out += [f'<line x1="{px(x):.1f}" y1="{T}" x2="{px(x):.1f}" y2="{H - B}" stroke="#e4e4e4"/>',
                f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x:g}</text>']
    for y in ys:
        out += [f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#e4e4e4"/>',
                f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>']
    out += [f'<path d="M{L},{T} V{H - B} H{W - R}" fill="none" stroke="black"/>',
            f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">GMACs per image</text>',
            f'<text transform="translate(16,{(H - B + T) / 2}) rotate(-90)" text-anchor="middle">test top-1 (%)</text>']
    points = [(px(r['gmacs']), py(r['mean'])) for r in rows]
    for method, clc, cla in dict.fromkeys((r['method'], r['clc'], r['cla']) for r in rows):
        line = sorted(p for r, p in zip(rows, points) if (r['method'], r['clc'], r['cla']) == (method, clc, cla))
        dashes = '' if clc or cla else ' stroke-dasharray="4 3"'  # base runs dashed
        if len(line) > 1:
            out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in line)}" fill="none" '
                       f'stroke="{colours[method]}" stroke-opacity="0.6"{dashes}/>')
    taken = [(x - 7, y - 7, x + 7, y + 7) for x, y in points]  # boxes of markers and of labels placed so far
    for r, (x, y) in zip(rows, points):
        colour = colours[r['method']]
        out += [f'<line x1="{x:.1f}" y1="{py(r["mean"] - r["std"]):.1f}" x2="{x:.1f}" '
                f'y2="{py(r["mean"] + r["std"]):.1f}" stroke="{colour}"/>', marker((r['clc'], r['cla']), x, y, colour)]
        w = 7 * len(r['keep'])  # about 7 px per character at 12 px
        for dx, dy in ((9, -4), (9, 9), (-9 - w, -4), (-9 - w, 9), (-w / 2, -20), (-w / 2, 12)):
            box = (x + dx, y + dy - 5, x + dx + w, y + dy + 8)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
        if r['method'] != 'none':  # which has no keep rate to name
            taken.append(box)
            out.append(f'<text x="{box[0]:.1f}" y="{box[3] - 2:.1f}" fill="{colour}">{r["keep"]}</text>')
    legend = [(m, colours[m], None) for m in dict.fromkeys(r['method'] for r in rows)]
    legend += [(shapes[k][0], '#444', k) for k in dict.fromkeys((r['clc'], r['cla']) for r in rows)]
    for i, (label, colour, key) in enumerate(legend):
        x, y = W - R + 20, T + 10 + 20 * i
        bar = f'<rect x="{x - 6}" y="{y - 2}" width="12" height="4" fill="{colour}"/>'
        out += [marker(key, x, y, colour) if key else bar, f'<text x="{x + 14}" y="{y + 4}">{label}</text>']
    Path(path).write_text('\n'.join(out + ['</svg>']) + '\n')


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    args.batch_size = args.batch_size or (32 if device.type == 'cuda' else 4)
    runtime_defaults(args, device)
    try:
        if args.plot and not ((args.sweep and args.checkpoints or args.table) and args.plot.endswith('.svg')):
            raise ValueError('--plot FILE.svg goes with --sweep --checkpoints, or with --table FILE.md')
        if args.table and not args.plot:
            raise ValueError('--table FILE.md goes with --plot FILE.svg: it only redraws a table')
        if args.sweep or args.table:
            rows = read_table(args.table) if args.table else sweep(args, device)
            if args.plot:
                plot(rows, args.plot)
                print(f'wrote {args.plot}')
            return rows
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
    except (DatasetError, CheckpointError, ValueError) as e:
        exit_with(e)


if __name__ == '__main__':
    main()
