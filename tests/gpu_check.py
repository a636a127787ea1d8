"""The GPU check: one command that shows the defaults work on a CUDA GPU, and how fast they are.

    python tests/gpu_check.py              # on a CUDA machine; writes under /tmp/clca-gpu-check
    python tests/gpu_check.py --dry-run    # tiny sizes on the CPU: tests/test_gpu.py runs it, so it cannot rot
    python tests/gpu_check.py --loader-only --side 1000 --workers 1   # the loader alone, on any machine

1. It writes synthetic data in the CSV layout of the paper's code: leaves drawn by leaves.render_leaf, saved as
   PNG (the benchmark's format) at --side pixels, copies of a few drawings (decoding costs the same).
2. It runs the GPU tests (tests/test_gpu.py).
3. For ViT-B/16 at 448 px it times the unreduced model and every method at keep 0.1 with CLCA, alone on
   synthetic tensors (eval.py --cost --train): training images/s with the defaults (bf16 autocast and
   torch.compile; ATS eager) and in the paper code's mode (fp16 with a gradient scaler, eager), the compile
   time and the peak memory.
4. It times the loader alone with train.py's default workers, decoding the PNGs and reading the resized cache.
5. It trains EViT + CLCA end to end with train.py on the synthetic data, 2 epochs; epoch 2's images/s.
6. It prints one table, with the GPU's name and the CPU's core count.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_pil_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import build_dataset
from eval import runtime_defaults
from leaves import render_leaf
from reduce import METHODS

CLASSES = 198  # the synthetic data poses as SoyAgeing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Check and time the defaults on a CUDA GPU.')
    p.add_argument('--out', default='/tmp/clca-gpu-check', help='where the synthetic data and the runs go')
    p.add_argument('--dry-run', action='store_true', help='tiny sizes on the CPU, no GPU tests')
    p.add_argument('--side', type=int, help='side of the synthetic images in pixels (default 1000; dry run 64)')
    p.add_argument('--images', type=int, help='training images (default 2048; dry run 16); a quarter as many test')
    p.add_argument('--loader-only', action='store_true', help='time only the loader, per --workers, train and test')
    p.add_argument('--workers', type=int, default=1, help='with --loader-only: loader processes (default 1)')
    return p.parse_args(argv)


def write_data(root: Path, side: int, count: int):
    """`count` training and count // 4 test images as PNG in the paper code's layout: train_val.csv and
    test.csv with the columns class_id,dir. 16 drawings, copied: a copy decodes as slowly as a drawing."""
    if root.exists():
        shutil.rmtree(root)
    (root / 'images').mkdir(parents=True)
    drawings = []
    for k in range(16):
        path = root / 'images' / f'drawing{k}.png'
        to_pil_image(render_leaf((k % 5, k % 2), side, f'gpu-check/{k}', outline=(0.7, 0.3))[0]).save(path)
        drawings.append(path)
    for split, n in (('train_val', count), ('test', count // 4)):
        rows = ['class_id,dir']
        for i in range(n):
            name = f'images/{split}{i}.png'
            shutil.copyfile(drawings[i % 16], root / name)
            rows.append(f'{i % CLASSES},{name}')
        (root / f'{split}.csv').write_text('\n'.join(rows) + '\n')


def model_speed(method: str, default: bool, size: dict) -> dict:
    """eval.py --cost --train in its own process (a fresh compiler, a fresh memory peak): images/s, warm-up
    seconds and peak memory of one training step, with the defaults or in the paper code's mode."""
    clca = ['--method', 'none', '--no-clc', '--no-cla'] if method == 'none' else ['--method', method, '--clc', '--cla']
    if size['device'] == 'cpu':
        mode = ['--amp', 'off']
    elif default:
        mode = ['--amp', 'bf16'] + ([] if method == 'ats' else ['--compile'])
    else:
        mode = ['--amp', 'fp16']
    cmd = [sys.executable, 'eval.py', '--cost', '--train', '--keep', '0.1', '--num-classes', str(CLASSES),
           '--backbone', size['backbone'], '--img-size', str(size['img']), '--batch-size', str(size['batch']),
           '--device', size['device'], *clca, *mode]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = re.search(r'([\d.]+) GMACs, ([\d.]+) images/s .* warm-up ([\d.]+) s\), peak memory (\d+) MiB', out)
    return dict(gmacs=float(found[1]), ips=float(found[2]), warmup=float(found[3]), peak=int(found[4]) / 1024)


def loader_speed(root: Path, size: dict, workers: int, cache: bool, split: str = 'train', batches: int = 20) -> float:
    """Images/s of the loader alone: train.py's DataLoader with `workers` processes, after one batch; the
    training transform (crop, flip) for 'train', the test transform (centre crop) for 'test'."""
    dataset, _ = build_dataset('soyageing', split, size['img'], root, augment='weak' if split == 'train' else None,
                               cache_workers=workers if cache else None)
    loader = DataLoader(dataset, size['batch'], shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=size['device'] == 'cuda')
    it = iter(loader)
    next(it)
    t0, seen = time.perf_counter(), 0
    for _, (images, _) in zip(range(batches), it):
        seen += len(images)
    return seen / (time.perf_counter() - t0)


def end_to_end(root: Path, out: Path, size: dict) -> float:
    """train.py with its defaults on the synthetic data for 2 epochs: the training images/s of epoch 2 (epoch 1
    compiles)."""
    cmd = [sys.executable, 'train.py', '--dataset', 'soyageing', '--data-dir', str(root), '--epochs', '2',
           '--pretrained', 'none', '--out', str(out), '--backbone', size['backbone'], '--img-size', str(size['img']),
           '--batch-size', str(size['batch']), '--device', size['device']]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads((out / 'log.jsonl').read_text().splitlines()[-1])['images_per_s']


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.dry_run:
        size = dict(device='cpu', backbone='vit_tiny_patch8_224', img=32, batch=4, side=args.side or 64,
                    images=args.images or 16)
    else:
        if not (torch.cuda.is_available() or args.loader_only):
            sys.exit('error: no CUDA GPU here; run with --dry-run to check the script on the CPU')
        size = dict(device='cuda' if torch.cuda.is_available() else 'cpu', backbone='vit_base_patch16_224', img=448,
                    batch=32, side=args.side or 1000, images=args.images or 2048)
    started = time.perf_counter()
    write_data(out / 'data', size['side'], size['images'])
    if args.loader_only:
        for split in ('train', 'test'):
            decoded, cached = (loader_speed(out / 'data', size, args.workers, cache, split) for cache in (False, True))
            print(f'{split} transform, {args.workers} workers, {size["side"]}-px PNG: {decoded:.1f} images/s decoding, '
                  f'{cached:.1f} images/s from the resized cache')
        return
    if not args.dry_run:
        subprocess.run([sys.executable, '-m', 'pytest', '-q', 'tests/test_gpu.py', '-k', 'not dry_run'], cwd=ROOT,
                       check=True)
    rows = []
    for method in METHODS:
        default, paper = model_speed(method, True, size), model_speed(method, False, size)
        rows.append(f"| {method} | {default['gmacs']:.2f} | {default['ips']:.0f} | {default['warmup']:.0f} | "
                    f"{default['peak']:.1f} | {paper['ips']:.0f} | {paper['peak']:.1f} | "
                    f"{default['ips'] / paper['ips']:.2f}x |")
    machine = argparse.Namespace(amp=None, compile=None, workers=None, method='evit')
    runtime_defaults(machine, torch.device(size['device']))  # train.py's loader processes on this machine
    workers = machine.workers
    decoded, cached = loader_speed(out / 'data', size, workers, False), loader_speed(out / 'data', size, workers, True)
    trained = end_to_end(out / 'data', out / 'train', size)
    where = torch.cuda.get_device_name() if size['device'] == 'cuda' else 'CPU (dry run)'
    print(f'\n{where}, {os.cpu_count()} CPU cores, torch {torch.__version__}; {size["backbone"]} at {size["img"]} px, '
          f'batch {size["batch"]}, keep 0.1, CLCA on (none: the plain ViT)\n')
    print('| method | GMACs | train img/s, bf16 + compile | compile s | peak GiB | train img/s, fp16 eager (paper) '
          '| peak GiB | speed-up |\n|---|---|---|---|---|---|---|---|')
    print('\n'.join(rows))
    print(f'\nloader alone, {workers} workers, {size["side"]}-px PNG: {decoded:.0f} images/s decoding, '
          f'{cached:.0f} images/s from the resized cache')
    print(f'train.py end to end (EViT + CLCA, defaults, epoch 2): {trained:.0f} images/s')
    print(f'the check took {time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    main()
