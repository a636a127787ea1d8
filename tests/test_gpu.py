"""The first thing to run on a CUDA machine (skipped without one): every method gives the CPU's outputs on the
GPU, trains under the defaults (bf16 autocast and torch.compile) and stops compiling after its first epoch, and
torchrun trains and resumes with nccl and SyncBatchNorm. tests/gpu_check.py runs these and times the paper's
model; its CPU dry run is the one test here that runs everywhere."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_folder, toy
from data import Standardise
from reduce import METHODS, varies_in_length

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
# bf16 against fp32, as a share of the logits' norm: random weights give near-ties that bf16 may order
# otherwise, and DynamicViT's ranking of keep against drop flips most (calibrated on CPU bf16: 0.07 and 0.32)
BF16_TOLERANCE = {'dynamicvit': 0.5}


@cuda
@pytest.mark.parametrize('method', ['none', *METHODS])
@pytest.mark.parametrize('keep', [0.1, 0.5])
@pytest.mark.parametrize('clca', [False, True])
def test_gpu_fp32_gives_the_cpu_logits_and_bf16_stays_close(method, keep, clca, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)  # the patch embedding in true fp32
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    model = toy(method=method, keep=keep, clc=clca, cla=clca).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        cpu = model(images)[0]
        gpu = model.cuda()(images.cuda())[0].cpu()
        bf16 = model.to(torch.bfloat16)(images.cuda().bfloat16())[0].float().cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(bf16).all()
    assert (bf16 - cpu).norm() <= BF16_TOLERANCE.get(method, 0.15) * cpu.norm()


@cuda
def test_standardising_on_the_gpu_gives_the_cpus_bits():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    standardise = Standardise((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert torch.equal(standardise.cuda()(images).cpu(), standardise.cpu()(images))  # true division, on both


def counting_compiler():
    """(backend, graphs): torch.compile's default inductor backend, and the list of graphs it was handed."""
    graphs, inductor = [], torch._dynamo.lookup_backend('inductor')

    def backend(gm, example_inputs):
        graphs.append(gm)
        return inductor(gm, example_inputs)
    return backend, graphs


@cuda
@pytest.mark.parametrize('method', [m for m in ('none', *METHODS) if not varies_in_length(m)])  # the rest: never compiled
def test_compiled_bf16_training_learns_and_stops_compiling_after_one_epoch(method):
    torch._dynamo.reset()
    model = toy(method=method, keep=0.5, clc=True, cla=True).cuda()
    backend, graphs = counting_compiler()
    net = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(8, 3, 32, 32, device='cuda'), torch.arange(8, device='cuda') % 5
    tests = torch.randn(10, 3, 32, 32, device='cuda').split(8)  # a full batch, then a partial one of 2
    losses, compiled = [], []
    for epoch in range(3):
        net.train()
        for _ in range(5):
            with torch.autocast('cuda', torch.bfloat16):
                loss = net(images, labels)[1]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        net.eval()
        with torch.no_grad(), torch.autocast('cuda', torch.bfloat16):
            outputs = [net(batch)[0] for batch in tests]
        assert all(torch.isfinite(o).all() for o in outputs)
        compiled.append(len(graphs))
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert compiled[0] > 0 and compiled[1] == compiled[2] == compiled[0], compiled  # nothing new after epoch 1


CRASH_AFTER_EPOCH_1 = """import sys
import train
real = train.save_checkpoint
def save(model, path, **state):
    real(model, path, **state)
    if state['epoch'] == 1:
        sys.exit(3)  # the machine goes down right after epoch 1 was saved
train.save_checkpoint = save
train.main(sys.argv[1:])
"""


@cuda
def test_torchrun_on_one_gpu_trains_with_nccl_and_syncbatchnorm_and_resumes(tmp_path):
    (tmp_path / 'crash.py').write_text(CRASH_AFTER_EPOCH_1)
    data, out = tiny_folder(tmp_path / 'data'), tmp_path / 'run'
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1']
    flags = ['--dataset', 'folder', '--data-dir', str(data), '--backbone', 'vit_tiny_patch8_224', '--img-size', '32',
             '--pretrained', 'none', '--batch-size', '8', '--epochs', '2', '--workers', '2', '--out', str(out)]
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    first = subprocess.run(torchrun + [str(tmp_path / 'crash.py')] + flags, cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode != 0 and 'SyncBatchNorm' in first.stdout + first.stderr, first.stderr[-2000:]
    second = subprocess.run(torchrun + ['train.py', '--resume', str(out / 'last.pt'), '--no-compile'], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)  # compiled under DDP once is enough
    assert second.returncode == 0, second.stderr[-2000:]
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [m['epoch'] for m in log] == [1, 2] and all(math.isfinite(m['train_loss']) for m in log)
    assert '(saved)' in second.stdout and 'nccl' in second.stdout  # the precision it started with


@pytest.mark.long
def test_the_gpu_check_dry_runs_every_phase_on_a_cpu_and_keeps_its_rows_when_a_phase_fails(tmp_path):
    check = [sys.executable, 'tests/gpu_check.py', '--dry-run']
    run = subprocess.run(check + ['--out', str(tmp_path / 'all'), '--methods', 'evit', '--workers', '1'], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = (tmp_path / 'all' / 'results.md').read_text().splitlines()
    assert rows == [line for line in run.stdout.splitlines() if line.startswith('|')]  # every row printed is kept
    phases = [row.split('|')[1].strip() for row in rows[2:]]
    assert phases == sorted(phases, key=['machine', 'tests', 'speed', 'loader', 'train', 'check'].index)
    text = '\n'.join(rows)
    assert 'usable cores' in text and 'tests/test_gpu.py' in text and 'resized once, 1 workers' in text
    assert 'evit: bf16 + compile | ' in text and 'graphs compiled so far: 1' in text  # a real compile, on the CPU
    assert 'evit: fp16 eager (paper)' in text and 'train.py, epoch 2' in text and 'failed' not in text
    broken = subprocess.run(check + ['--out', str(tmp_path / 'broken'), '--phase', 'speed', 'loader', '--methods',
                                     'bogus'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert broken.returncode == 1
    assert 'phase speed failed' in broken.stderr and "unknown reduction method 'bogus'" in broken.stderr
    kept = (tmp_path / 'broken' / 'results.md').read_text()
    assert 'decoding, 0 workers' in kept and '| check | seconds in all |' in kept and 'failed: speed' in kept
