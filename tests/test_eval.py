import argparse
import json
import os
import re
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

import eval as evaluation
import leaves
import plot
import train
from conftest import official_checkpoint
from data import Standardise, build_dataset
from model import ViT, create_model, gmacs
from weights import load_weights, model_config, open_checkpoint

pytestmark = pytest.mark.usefixtures('small_leaves')

def test_an_official_checkpoint_is_evaluated_with_its_own_settings(tmp_path, capsys):
    sd = official_checkpoint(tmp_path / 'clca.pth')
    evaluation.main(['--checkpoint', str(tmp_path / 'clca.pth'), '--dataset', 'leaves', '--workers', '0', '--amp', 'off'])
    out = capsys.readouterr().out
    assert 'evit keep (0.25,) loc (3, 6, 9) clc=True cla=True at 32 px' in out
    reported = float(re.search(r'top-1 ([\d.]+)%', out).group(1))
    # the same number by hand: build the model, load the weights, count the hits
    model = create_model('vit_tiny_patch8_224', 10, img_size=32, method='evit', keep=0.25, clc=True, cla=True)
    load_weights(model, sd, verbose=False)
    dataset, _ = build_dataset('leaves', 'test', 32)
    standardise = Standardise(dataset.mean, dataset.std)
    with torch.no_grad():
        hits = sum((model.eval()(standardise(x))[0].argmax(1) == y).sum().item() for x, y in DataLoader(dataset, 100))
    assert reported == pytest.approx(100 * hits / len(dataset), abs=0.005)


def test_a_checkpoint_for_another_dataset_is_refused(tmp_path):
    official_checkpoint(tmp_path / 'clca.pth')
    (tmp_path / 'cotton' / 'anno').mkdir(parents=True)
    (tmp_path / 'cotton' / 'anno' / 'test.txt').write_text('x.png 1\n')
    (tmp_path / 'cotton' / 'images').mkdir()
    (tmp_path / 'cotton' / 'images' / 'x.png').touch()  # every listed image must be there
    with pytest.raises(SystemExit, match='cotton has 80 classes but the model predicts 10'):
        evaluation.main(['--checkpoint', str(tmp_path / 'clca.pth'), '--dataset', 'cotton',
                         '--data-dir', str(tmp_path / 'cotton')])


def test_cost_reports_gmacs_params_speed_and_memory(capsys):
    evaluation.main(['--cost', '--backbone', 'vit_tiny_patch8_224', '--img-size', '32', '--method', 'evit',
                     '--keep', '0.5', '--clc', '--cla', '--num-classes', '10', '--batch-size', '2'])
    out = capsys.readouterr().out
    model = create_model('vit_tiny_patch8_224', 10, img_size=32, method='evit', keep=0.5, clc=True, cla=True)
    assert f'{gmacs(model):.3f} GMACs' in out
    assert f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters' in out
    assert re.search(r'[\d.]+ images/s .* peak memory \d+ MiB', out)
    # [CLS, 16 patches, CLR]; block 3 keeps ceil(0.5 * 17) = 9, adds the fused token and 6 carriers: 17; ...
    assert 'tokens per stage 18>17>16>16' in out


def test_cost_times_the_model_in_eval_mode(capsys, monkeypatch):
    timed_modes, real_step = [], evaluation.inference_step

    def step(net, batch, device):
        timed_modes.append({m.training for m in net.modules()})
        return real_step(net, batch, device)
    monkeypatch.setattr(evaluation, 'inference_step', step)
    evaluation.main(['--cost', '--backbone', 'vit_tiny_patch8_224', '--img-size', '32', '--method', 'evit',
                     '--keep', '0.5', '--clc', '--cla', '--num-classes', '10', '--batch-size', '1'])
    assert timed_modes == [{False}]  # every module, the CLA head's BatchNorm included (it refuses a batch of 1 in training)
    assert 'images/s of inference (batch 1' in capsys.readouterr().out


def test_cost_times_the_training_step_train_py_runs(capsys, monkeypatch):
    evaluation.main(['--cost', '--train', '--backbone', 'vit_tiny_patch8_224', '--img-size', '32', '--method', 'evit',
                     '--keep', '0.5', '--clc', '--cla', '--num-classes', '10', '--batch-size', '2', '--amp', 'off'])
    assert re.search(r'[\d.]+ images/s of training \(batch 2, cpu, amp off, compile False, warm-up [\d.]+ s\)',
                     capsys.readouterr().out)
    model = create_model('vit_tiny_patch8_224', 10, img_size=32, method='evit', keep=0.5, clc=True, cla=True).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cpu, calls, run = torch.device('cpu'), [], train.train_step
    monkeypatch.setattr(train, 'train_step', lambda *a: calls.append(a) or run(*a))
    evaluation.training_step(model, model, 4, cpu, 'bf16')()  # forward, backward, AdamW
    assert len(calls) == 1 and calls[0][5] == evaluation.autocast_args('bf16', cpu)  # train.py's step, in bf16
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n != 'clr')
    assert [evaluation.grad_scaler(amp, cpu).is_enabled() for amp in ('fp16', 'bf16', 'off')] == [True, False, False]


def test_a_papers_checkpoint_describes_its_model_as_the_readme_reads_it(tmp_path):
    official_checkpoint(tmp_path / 'clca.pth')  # its saved arguments do not say the class count: the classifier does
    checkpoint = open_checkpoint(tmp_path / 'clca.pth')
    model = ViT(model_config(checkpoint))  # README's "Predict one image", with no class count given
    assert model.cfg.num_classes == 10 and load_weights(model, checkpoint, verbose=False) == ([], [])


def test_model_flags_that_contradict_a_checkpoint_are_refused(tmp_path):
    official_checkpoint(tmp_path / 'clca.pth')
    with pytest.raises(SystemExit, match='has no weights for .*drop the model flags'):
        evaluation.main(['--checkpoint', str(tmp_path / 'clca.pth'), '--no-cla', '--dataset', 'leaves'])


def test_sweep_prints_one_row_per_method_keep_and_clca(capsys):
    evaluation.main(['--sweep', '--methods', 'none', 'evit', 'topk', '--keeps', '0.25', '0.5',
                     '--backbone', 'vit_tiny_patch8_224', '--img-size', '64', '--batch-size', '2'])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ') and '---' not in line][1:]
    assert len(rows) == 2 + 2 * 2 * 2  # none (off/on) + evit and topk x 2 keeps x (off/on)
    gm = {tuple(c.strip() for c in r.split('|')[1:4]): float(r.split('|')[6]) for r in rows}  # method keep CLC
    assert gm[('evit', '0.25', 'off')] < gm[('evit', '0.5', 'off')] < gm[('none', '1', 'off')]
    assert gm[('topk', '0.25', 'off')] < gm[('evit', '0.25', 'off')] < gm[('evit', '0.25', 'on')]


def test_sweep_over_checkpoints_adds_their_accuracy(tmp_path, capsys):
    official_checkpoint(tmp_path / 'a.pth', keep=0.25)
    official_checkpoint(tmp_path / 'b.pth', keep=0.5)
    evaluation.main(['--sweep', '--checkpoints', str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth'),
                     '--dataset', 'leaves', '--batch-size', '100', '--workers', '0'])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| evit')]
    assert [r.split('|')[2].strip() for r in rows] == ['0.25', '0.5']
    for path, row in zip(('a.pth', 'b.pth'), rows):  # each checkpoint's top-1, as --checkpoint alone measures it
        evaluation.main(['--checkpoint', str(tmp_path / path), '--dataset', 'leaves', '--batch-size', '100',
                         '--workers', '0'])
        alone = float(re.search(r'top-1 ([\d.]+)%', capsys.readouterr().out).group(1))
        assert row.split('|')[8].strip() == f'{alone:.1f}'


def test_evaluate_counts_top1_and_top5():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[9., 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]), None
    loader = [(torch.zeros(3, 3, 1, 1, dtype=torch.uint8), torch.tensor([0, 0, 4]))]
    res = evaluation.evaluate(Fixed(), loader, Standardise((0,) * 3, (1,) * 3), dict(device_type='cpu', enabled=False))
    assert res['top1'] == pytest.approx(100 / 3) and res['top5'] == pytest.approx(200 / 3)


@pytest.mark.long
def test_sweep_compiles_every_row_afresh(capsys, monkeypatch):
    graphs, per_row, real_timed = [], [], evaluation.timed

    def counting_backend(gm, example_inputs):  # dynamo hands each graph it captured to the backend
        graphs.append(gm)
        return gm.forward

    def timed(*a, **k):
        before = len(graphs)
        result = real_timed(*a, **k)
        per_row.append(len(graphs) - before)
        return result
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model: real_compile(model, backend=counting_backend))
    monkeypatch.setattr(evaluation, 'timed', timed)
    monkeypatch.setattr(torch._dynamo.config, 'recompile_limit', 2)  # without a reset, row 3 on would run eager
    evaluation.main(['--sweep', '--compile', '--methods', 'none', 'evit', '--keeps', '0.5', '--backbone',
                     'vit_tiny_patch8_224', '--img-size', '32', '--batch-size', '2', '--loc', '1'])
    assert len(per_row) == 4 and all(n > 0 for n in per_row), per_row


def test_eval_py_scores_a_checkpoint_as_training_scored_it(tmp_path, capsys, monkeypatch):
    """eval.py evaluates as train.py does after each epoch, fp32 weights under autocast: the same top-1 and loss."""
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 10, 'test': 10})  # bf16 may be emulated: slow
    train.main(['--pretrained', 'none', '--img-size', '32', '--batch-size', '50', '--workers', '0', '--epochs', '1',
                '--amp', 'bf16', '--out', str(tmp_path)])
    logged = json.loads((tmp_path / 'log.jsonl').read_text())
    capsys.readouterr()
    evaluation.main(['--checkpoint', str(tmp_path / 'last.pt'), '--amp', 'bf16', '--batch-size', '50'])
    assert f"top-1 {logged['top1']:.2f}%  top-5 {logged['top5']:.2f}%  loss {logged['test_loss']:.4f}" in \
        capsys.readouterr().out


def seeded_checkpoints(tmp_path, runs):
    """train.py-style checkpoints of ViT-Tiny/8 at 32 px: one per (name, keep, lr, seed) in `runs`."""
    from weights import save_checkpoint
    paths = []
    for name, keep, lr, seed in runs:
        model = create_model('vit_tiny_patch8_224', 10, img_size=32, method='evit', keep=keep, clc=True, cla=True)
        save_checkpoint(model, tmp_path / f'{name}.pt', epoch=1, args=dict(dataset='leaves', lr=lr, seed=seed,
                                                                            out=str(tmp_path / name)))
        paths.append(str(tmp_path / f'{name}.pt'))
    return paths


def test_sweep_groups_checkpoints_that_differ_only_in_seed_into_a_table_plot_py_reads(tmp_path, capsys, monkeypatch):
    paths = seeded_checkpoints(tmp_path, [('a1', 0.25, 1e-3, 1), ('b', 0.5, 1e-3, 1), ('a2', 0.25, 1e-3, 2),
                                          ('a3', 0.25, 1e-3, 3), ('c', 0.25, 5e-4, 1)])
    top1 = dict(zip(paths, [80.0, 50.0, 82.0, 87.0, 60.0]))
    seen = iter(paths)  # the sweep evaluates the checkpoints in the order given
    monkeypatch.setattr(evaluation, 'accuracy', lambda *a: {'top1': top1[next(seen)]})
    evaluation.main(['--sweep', '--checkpoints', *paths, '--batch-size', '2'])
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split('|')[1:-1]] for line in out.splitlines() if line.startswith('| evit')]
    assert [(r[1], r[7], r[8]) for r in rows] == [('0.25', '83.0 ± 3.6', '3'), ('0.5', '50.0', '1'),
                                                  ('0.25', '60.0', '1')]  # another lr is another run
    (tmp_path / 'runs.md').write_text(out)  # what `eval.py --sweep ... > runs.md` writes
    drawn = plot.read_table(tmp_path / 'runs.md')
    assert [(r['keep'], r['mean'], r['std'], r['seeds'], r['clc'], r['cla']) for r in drawn] == [
        ('0.25', 83.0, 3.6, 3, True, True), ('0.5', 50.0, 0.0, 1, True, True), ('0.25', 60.0, 0.0, 1, True, True)]


@pytest.mark.long
def test_sweep_reads_finished_runs_from_their_own_folders(tmp_path, capsys, monkeypatch):
    """A run folder is tabulated from train.py's config.json and the last line of its log.jsonl: it is not
    re-evaluated, runs that differ only in the seed share a row, another lr is another row."""
    train.main(['--pretrained', 'none', '--img-size', '32', '--batch-size', '50', '--workers', '0', '--epochs', '2',
                '--warmup-epochs', '0', '--cooldown-epochs', '0', '--keep', '0.25', '--out', str(tmp_path / 'a1')])

    def copy(name, top1, **args):  # the same run with another seed or lr, and another accuracy
        shutil.copytree(tmp_path / 'a1', tmp_path / name)
        config = json.loads((tmp_path / name / 'config.json').read_text())
        (tmp_path / name / 'config.json').write_text(json.dumps({**config, 'out': str(tmp_path / name), **args}))
        log = [json.loads(line) for line in (tmp_path / name / 'log.jsonl').read_text().splitlines()]
        log[-1]['top1'] = top1
        (tmp_path / name / 'log.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in log))
        return str(tmp_path / name)
    first = json.loads((tmp_path / 'a1' / 'log.jsonl').read_text().splitlines()[-1])['top1']
    runs = [str(tmp_path / 'a1'), copy('a2', first + 2, seed=2), copy('a3', first + 7, seed=3), copy('b', 60.0, lr=5e-4)]
    monkeypatch.setattr(evaluation, 'accuracy', lambda *a: pytest.fail('a run folder is not re-evaluated'))
    evaluation.main(['--sweep', '--checkpoints', *runs, '--batch-size', '2'])
    rows = [[c.strip() for c in line.split('|')[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith('| evit')]
    assert [(r[1], r[7], r[8]) for r in rows] == [('0.25', '%.1f ± 3.6' % (first + 3), '3'), ('0.25', '60.0', '1')]
    log = (tmp_path / 'a3' / 'log.jsonl').read_text().splitlines()
    (tmp_path / 'a3' / 'log.jsonl').write_text(log[0] + '\n')  # a run stopped after epoch 1 of 2
    with pytest.raises(SystemExit, match='stopped after epoch 1 of 2: finish it with python train.py --resume'):
        evaluation.main(['--sweep', '--checkpoints', *runs])
    with pytest.raises(SystemExit, match='a run folder reports the model it trained'):
        evaluation.main(['--sweep', '--checkpoints', runs[0], '--keep', '0.5'])
    with pytest.raises(SystemExit, match='holds no train.py run'):
        evaluation.main(['--sweep', '--checkpoints', str(tmp_path)])


def machine_flags(**given):
    return argparse.Namespace(**{'amp': None, 'compile': None, 'workers': None, 'method': 'evit', **given})


@pytest.mark.parametrize('amx,avx512_bf16,expected', [(True, False, 'bf16'), (False, True, 'bf16'),
                                                      (False, False, 'off')])
def test_precision_on_a_cpu_follows_its_bf16_units(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    args = machine_flags()
    evaluation.runtime_defaults(args, torch.device('cpu'))  # inference
    assert (args.amp, args.compile, args.workers) == (expected, False, 0)
    for width, amp in ((768, expected), (192, 'off')):  # training: bf16 only pays on wide enough matrices
        args = machine_flags()
        evaluation.runtime_defaults(args, torch.device('cpu'), train_width=width)
        assert args.amp == amp
    for forced in ('off', 'fp16', 'bf16'):  # a given --amp wins over the hardware
        args = machine_flags(amp=forced)
        evaluation.runtime_defaults(args, torch.device('cpu'))
        assert args.amp == forced
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')  # ATEN_CPU_CAPABILITY=avx2
    args = machine_flags()
    evaluation.runtime_defaults(args, torch.device('cpu'), train_width=768)
    assert args.amp == 'off'  # the units are there, but torch's kernels do not use them


@pytest.mark.parametrize('native,method,expected', [(True, 'evit', ('bf16', True)), (False, 'evit', ('fp16', True)),
                                                    (True, 'ats', ('bf16', False))])
def test_precision_and_compile_on_a_gpu(monkeypatch, native, method, expected):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: native or including_emulation)
    args = machine_flags(method=method)
    evaluation.runtime_defaults(args, torch.device('cuda', 0))
    assert (args.amp, args.compile) == expected and args.workers >= 1
    args = machine_flags()
    evaluation.runtime_defaults(args, torch.device('mps'))
    assert (args.amp, args.compile, args.workers) == ('off', False, 0)


@pytest.mark.parametrize('cuda,mps', [(True, True), (False, True), (False, False)])
def test_device_auto_takes_cuda_else_the_cpu_and_mps_only_when_asked(monkeypatch, cuda, mps):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: mps)
    assert evaluation.pick_device('auto').type == ('cuda' if cuda else 'cpu')  # a Mac trains on its CPU by default
    assert evaluation.pick_device('cpu').type == 'cpu'
    for name, seen in (('mps', mps), ('cuda', cuda)):
        if seen:
            assert evaluation.pick_device(name).type == name
            continue
        with pytest.raises(SystemExit, match=f'--device {name}: torch sees no such device here'):
            evaluation.pick_device(name)
        with pytest.raises(SystemExit, match=f'--device {name}: torch sees no such device'):
            train.parse_args(['--device', name])  # refused before any work


def test_loader_workers_follow_the_usable_cores_and_a_small_dev_shm_is_said(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(6)), raising=False)  # a job's 6 of 64 cores
    monkeypatch.setattr(os, 'cpu_count', lambda: 64)
    monkeypatch.setattr(evaluation.Path, 'read_text', lambda self: 'max 100000')  # no CPU quota (cgroup v2 cpu.max)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    args = machine_flags(amp='bf16')
    evaluation.runtime_defaults(args, torch.device('cuda', 0))
    assert args.workers == 3  # 6 usable cores over 2 processes
    monkeypatch.setattr(evaluation.Path, 'read_text', lambda self: '200000 100000')  # a quota of 2 cores
    assert evaluation.usable_cores() == 2
    monkeypatch.setattr(evaluation.os.path, 'isdir', lambda path: True)
    monkeypatch.setattr(evaluation.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(64, 0, 64 * 2**20))
    warning = evaluation.shm_warning(16, 32, 448)  # Docker's 64 MB; 2 processes x 16 workers x 2 batches of 32 x 3 x 448²
    assert warning.count('\n') == 0 and '/dev/shm has 64 MiB free' in warning and 'about 1176 MiB' in warning
    assert evaluation.shm_warning(1, 8, 32) is None and evaluation.shm_warning(0, 32, 448) is None
