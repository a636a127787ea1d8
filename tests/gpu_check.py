"""The GPU check: a go/no-go for a new CUDA machine before a 50-epoch run, about 8 minutes on one H100.

    python tests/gpu_check.py                                      # every phase; writes under /tmp/clca-gpu-check
    python tests/gpu_check.py --phase speed --methods evit none tome   # one phase, more methods
    python tests/gpu_check.py --dry-run                            # every phase at toy size on the CPU
    python tests/gpu_check.py --phase loader --workers 1 --images 256   # the loader alone, on any machine

First the machine, in seconds and before anything compiles: torch's CUDA build against the driver, a C compiler
for Triton, free GPU memory, /dev/shm, the usable cores. Then each phase in a process of its own:
- tests: tests/test_gpu.py, its compiled-training test for --methods only (a toy model's training and evaluation
  graphs each), and torchrun (compiled under DDP, then resumed eager);
- speed: per method of --methods (default EViT at keep 0.1 with CLCA, and the unreduced ViT), ViT-B/16 at 448 px
  alone on synthetic tensors: one compiled model timed in bf16, then the same model eager in fp16 with a gradient
  scaler, the paper code's mode. One compile per method;
- loader: train.py's DataLoader on synthetic PNGs (the benchmark's format) at --side px, decoding them and reading
  the resized file, timed once the batches its workers had prefetched are gone;
- train: train.py with its defaults for 2 epochs on those images: the training and the evaluation graph compile,
  the first usually from the cache the speed phase filled; epoch 2's images/s.
Every row is printed and appended to <out>/results.md the moment it is measured. A phase that fails prints its
command and the last 30 lines of its stderr, and the check goes on; it exits with 1 if any phase failed.
"""
import argparse
import json
import math
import os
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
from eval import runtime_defaults, timed, training_step, usable_cores
from leaves import render_leaf
from model import create_model, gmacs

PHASES = ('tests', 'speed', 'loader', 'train')
CLASSES = 198  # the synthetic data poses as SoyAgeing
# the paper's model (random weights) on the GPU; for the dry run a 2-block toy reducing once: compiling is slow on a CPU
GPU = dict(device='cuda', backbone='vit_base_patch16_224', img=448, batch=32, side=1000, images=2048, depth=12,
           loc=(3, 6, 9))
DRY = dict(device='cpu', backbone='vit_tiny_patch8_224', img=32, batch=4, side=64, images=16, depth=2, loc=(0,))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Check and time the defaults on a CUDA GPU, phase by phase.')
    p.add_argument('--out', default='/tmp/clca-gpu-check', help='where the data, the runs and results.md go')
    p.add_argument('--phase', nargs='+', choices=PHASES, default=list(PHASES), help='the phases to run (default all)')
    p.add_argument('--methods', nargs='+', default=['evit', 'none'],
                   help='reductions to time and to compile in the tests (default evit none; a method is timed with '
                        'CLCA on, none without)')
    p.add_argument('--dry-run', action='store_true', help='toy sizes on the CPU, compiles included')
    p.add_argument('--side', type=int, help='side of the synthetic PNGs (default 1000; dry run 64)')
    p.add_argument('--images', type=int, help='training images (default 2048; dry run 16); a quarter as many test')
    p.add_argument('--workers', type=int, help="loader processes (default: train.py's on this machine)")
    p.add_argument('--phase-timeout', type=int, default=300, help='seconds before a phase counts as failed (300)')
    p.add_argument('--in-phase', choices=PHASES, help=argparse.SUPPRESS)  # how the check starts each phase
    return p.parse_args(argv)


def record(out: Path, phase: str, what: str, value: str):
    """Print one row of the results table and append it to results.md at once: nothing measured is lost."""
    row = f'| {phase} | {what} | {value} |'
    print(row, flush=True)
    with open(out / 'results.md', 'a') as f:
        f.write(row + '\n')


def environment(out: Path, size: dict):
    """The machine, before anything compiles."""
    record(out, 'machine', 'torch', f'{torch.__version__}, CUDA build {torch.version.cuda or "none"}')
    if size['device'] == 'cuda':
        driver = torch._C._cuda_getDriverVersion()  # e.g. 12040 for 12.4
        build = tuple(int(x) for x in torch.version.cuda.split('.')[:2])
        ok = (driver // 1000, driver % 1000 // 10) >= build
        record(out, 'machine', 'driver', f'CUDA {driver // 1000}.{driver % 1000 // 10}'
               + ('' if ok else f': older than the {torch.version.cuda} torch was built for; update the driver'))
        free, total = torch.cuda.mem_get_info()
        record(out, 'machine', 'GPU', f'{torch.cuda.get_device_name()}, {free / 2**30:.1f} of {total / 2**30:.1f} '
               'GiB free')
    compiler = shutil.which('cc') or shutil.which('gcc') or shutil.which('clang')
    record(out, 'machine', 'C compiler (Triton needs one)', compiler or 'none: torch.compile will fail; install gcc')
    shm = shutil.disk_usage('/dev/shm').free / 2**30 if os.path.isdir('/dev/shm') else float('nan')
    record(out, 'machine', '/dev/shm free', f'{shm:.2f} GiB')
    record(out, 'machine', 'usable cores', f'{usable_cores()} (os.cpu_count: {os.cpu_count()})')


def write_data(root: Path, side: int, count: int):
    """`count` training and count // 4 test images as PNG, in the CLCA authors' CSV layout (train_val.csv,
    test.csv). 16 drawings, copied: a copy decodes as slowly as a drawing."""
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


def speed(args, size: dict, out: Path):
    """Per method: GMACs, then images/s, compile seconds and peak memory of a training step of one compiled model in
    bf16, then of the same model eager in fp16 with a gradient scaler (the paper code's mode), and their ratio."""
    device = torch.device(size['device'])
    for method in args.methods:
        clca = dict(method=method, keep=0.1, clc=True, cla=True) if method != 'none' else {}
        model = create_model(size['backbone'], CLASSES, img_size=size['img'], depth=size['depth'], loc=size['loc'],
                             **clca)
        record(out, 'speed', f'{method}: GMACs', f'{gmacs(model):.2f}')
        model.to(device).train()
        torch._dynamo.reset()
        rates = {}
        for mode, amp, net in (('bf16 + compile', 'bf16', torch.compile(model)), ('fp16 eager (paper)', 'fp16', model)):
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            step = training_step(model, net, size['batch'], device, amp)
            rates[mode], warmup = timed(step, size['batch'], device)
            peak = f', peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB' if device.type == 'cuda' else ''
            graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
            record(out, 'speed', f'{method}: {mode}', f'{rates[mode]:.1f} images/s, warm-up {warmup:.0f} s{peak}; '
                   f'graphs compiled so far: {graphs}')
        ratio = rates['bf16 + compile'] / rates['fp16 eager (paper)']
        record(out, 'speed', f'{method}: bf16 + compile / fp16 eager', f'{ratio:.2f}x')


def loader_rate(root: Path, size: dict, workers: int, cache: bool, batches: int) -> float:
    """Images/s of train.py's training loader alone, from the moment the batches its workers prefetched before the
    clock started (2 each) have been taken: the rate they keep up, not a burst from a full queue."""
    dataset, _ = build_dataset('soyageing', 'train', size['img'], root, augment='weak',
                               cache_workers=workers if cache else None)
    loader = DataLoader(dataset, size['batch'], shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=size['device'] == 'cuda')
    it = iter(loader)
    for _ in range(1 + 2 * workers):  # the first batch, then whatever was queued behind it
        next(it)
    t0, seen = time.perf_counter(), 0
    for _, (images, _) in zip(range(batches), it):
        seen += len(images)
    return seen / (time.perf_counter() - t0)


def loader(args, size: dict, out: Path, workers: int):
    """Decoding the PNGs every epoch, and reading the file they were resized into once (`--cache`)."""
    batches = size['images'] // size['batch'] - 1 - 2 * workers
    if batches < 1:
        raise SystemExit(f'--images {size["images"]} make too few batches of {size["batch"]} to time {workers} workers')
    for cache in (False, True):
        rate = loader_rate(out / 'data', size, workers, cache, batches)
        record(out, 'loader', f'{"resized once" if cache else "decoding"}, {workers} workers, {size["side"]}-px PNG',
               f'{rate:.0f} images/s ({batches} batches timed)')


def train_run(args, size: dict, out: Path):
    """train.py with its defaults for 2 epochs: epoch 1's seconds (compiling included) and epoch 2's images/s."""
    cmd = [sys.executable, 'train.py', '--dataset', 'soyageing', '--data-dir', str(out / 'data'), '--epochs', '2',
           '--pretrained', 'none', '--out', str(out / 'train'), '--backbone', size['backbone'],
           '--img-size', str(size['img']), '--batch-size', str(size['batch']), '--device', size['device']]
    if args.workers is not None:
        cmd += ['--workers', str(args.workers)]
    shutil.rmtree(out / 'train', ignore_errors=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=args.phase_timeout)
    first, second = (json.loads(line) for line in (out / 'train' / 'log.jsonl').read_text().splitlines())
    record(out, 'train', 'train.py, epoch 1 (compiles)', f'{first["seconds"]:.0f} s, {first["images_per_s"]:.0f} '
           'images/s')
    record(out, 'train', 'train.py, epoch 2', f'{second["images_per_s"]:.0f} images/s')


def run_phase(args, size: dict, out: Path):
    """One phase, in this process (the check starts one per phase)."""
    torch.manual_seed(0)
    if args.in_phase == 'tests':
        # the compiled-training test for the methods asked for; the plain ViT compiles in the speed phase
        picked = ' or '.join(f'[{m}]' for m in args.methods if m != 'none') or 'nothing'
        cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_gpu.py', '-k',
               f'not dry_run and (not compiled_bf16 or {picked})']
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.phase_timeout)
        summary = (result.stdout.strip().splitlines() or ['no output'])[-1]
        record(out, 'tests', 'tests/test_gpu.py', summary)
        if result.returncode not in (0, 5):  # 5: nothing collected
            sys.stderr.write(result.stdout[-4000:])
            sys.exit(1)
    elif args.in_phase == 'speed':
        speed(args, size, out)
    elif args.in_phase == 'loader':  # train.py's loader processes on this machine, unless given
        machine = argparse.Namespace(amp='off', compile=False, workers=args.workers, method='evit')
        runtime_defaults(machine, torch.device(size['device']))
        loader(args, size, out, machine.workers)
    else:
        train_run(args, size, out)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    size = dict(DRY if args.dry_run else GPU, **{k: getattr(args, k) for k in ('side', 'images') if getattr(args, k)})
    if not (args.dry_run or torch.cuda.is_available()):  # the loader alone needs no GPU: time it on any machine
        if ([args.in_phase] if args.in_phase else args.phase) != ['loader']:
            sys.exit('error: no CUDA GPU here; run with --dry-run to check the script on the CPU, or --phase loader')
        size['device'] = 'cpu'
    if args.in_phase:
        return run_phase(args, size, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.md').write_text('| phase | what | measured |\n|---|---|---|\n')
    print('| phase | what | measured |\n|---|---|---|', flush=True)
    started, failed = time.perf_counter(), []
    environment(out, size)
    if {'loader', 'train'} & set(args.phase):
        write_data(out / 'data', size['side'], size['images'])
    given = ['--out', str(out), '--methods', *args.methods] + ['--dry-run'] * args.dry_run + [
        f'--{k.replace("_", "-")}={getattr(args, k)}' for k in ('side', 'images', 'workers', 'phase_timeout')
        if getattr(args, k) is not None]
    for phase in args.phase:
        cmd = [sys.executable, __file__, '--in-phase', phase, *given]
        t0 = time.perf_counter()
        try:  # the phase's rows stream to our stdout as it measures them
            result = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, timeout=args.phase_timeout)
            code, stderr = result.returncode and f'exit {result.returncode}', result.stderr
        except subprocess.TimeoutExpired as e:
            code, stderr = f'timed out after {args.phase_timeout} s', e.stderr or ''
            stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
        if code:
            failed.append(phase)
            tail = '\n'.join(stderr.strip().splitlines()[-30:])
            print(f'\nphase {phase} failed ({code}): {" ".join(cmd)}\n{tail}\n', file=sys.stderr, flush=True)
        record(out, phase, 'phase seconds', f'{time.perf_counter() - t0:.0f}' + (' (failed)' * bool(code)))
    record(out, 'check', 'seconds in all', f'{time.perf_counter() - started:.0f}'
           + (f'; failed: {" ".join(failed)}' if failed else ''))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
