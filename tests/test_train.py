import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import eval as evaluation
import leaves
import train
from conftest import tiny_folder, toy
from model import ModelConfig, ViT, backbone_config

ROOT = Path(__file__).resolve().parents[1]
# a tiny, fast version of the embedded preset: 32 px leaves, 16 patches of 8 px
FAST = ['--pretrained', 'none', '--img-size', '32', '--batch-size', '50', '--workers', '0', '--warmup-epochs', '1', '--cooldown-epochs', '0']


pytestmark = pytest.mark.usefixtures('small_leaves')

def stop_after_epoch_1(monkeypatch, argv):
    """train.main(argv) until epoch 1 is saved; then the machine goes down (a KeyboardInterrupt)."""
    real_save = train.save_checkpoint

    def crash_after_saving(model, path, **state):
        real_save(model, path, **state)
        if state['epoch'] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, 'save_checkpoint', crash_after_saving)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(train, 'save_checkpoint', real_save)


def read_log(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


@pytest.mark.long
def test_two_epochs_on_the_embedded_data_write_a_checkpoint_a_log_and_the_config(tmp_path, capsys):
    metrics = train.main(FAST + ['--epochs', '2', '--out', str(tmp_path)])
    assert metrics == read_log(tmp_path)[-1] and metrics['epoch'] == 2
    assert f"test {metrics['top1']:5.1f}% (top-5 {metrics['top5']:5.1f}%)" in capsys.readouterr().out.splitlines()[-1]
    ckpt = torch.load(tmp_path / 'last.pt', weights_only=True)  # a plain dict, no pickled objects
    assert ckpt['epoch'] == 2 and ckpt['args']['dataset'] == 'leaves' and 'optimizer' in ckpt
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['keep'] == [0.1] and config['model']['clc'] and config['model']['cla']
    model = ViT(ModelConfig(**ckpt['config']))  # the checkpoint describes its model: rebuild it, load it strictly
    model.load_state_dict(ckpt['model'])
    assert (model.cfg.method, model.cfg.keep, model.cfg.img_size, model.cfg.num_classes) == ('evit', (0.1,), 32, 10)
    assert [m['epoch'] for m in read_log(tmp_path)] == [1, 2]


@pytest.mark.long
def test_dynamicvit_trains_with_its_ratio_loss_and_gradient_clipping(tmp_path, monkeypatch):
    extra, norms = [], []  # per step: the loss beyond the cross-entropy; the gradient norm before and after clipping
    real_forward, real_clip = ViT.forward, torch.nn.utils.clip_grad_norm_

    def forward(model, images, labels=None):
        logits, loss = real_forward(model, images, labels)
        if labels is not None and model.training:
            extra.append((loss - F.cross_entropy(logits.float(), labels)).item())
        return logits, loss

    def clip(parameters, max_norm, *a, **kw):
        parameters = list(parameters)
        before = real_clip(parameters, max_norm, *a, **kw)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        norms.append((before.item(), after.item(), max_norm))
        return before
    monkeypatch.setattr(ViT, 'forward', forward)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', clip)
    train.main(FAST + ['--epochs', '1', '--method', 'dynamicvit', '--keep', '0.5', '--clip-grad', '1.0',
                       '--out', str(tmp_path)])
    assert len(extra) == len(norms) == 20 and all(e > 1e-6 for e in extra)  # 1000 leaves, batch 50: the ratio loss
    assert all(m == 1.0 and a <= 1.0 + 1e-4 for _, a, m in norms) and max(b for b, _, _ in norms) > 1.0


def test_each_epoch_draws_a_new_order_and_a_resumed_run_draws_the_same_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 4, 'test': 1})  # 40 training images, 10 steps of 4
    drawn, real = [], leaves.Leaves.__getitem__

    def recorded(self, i):
        if self.split == 'train':
            drawn.append(i)
        return real(self, i)
    monkeypatch.setattr(leaves.Leaves, '__getitem__', recorded)
    args = FAST + ['--epochs', '3', '--batch-size', '4', '--seed', '3']
    train.main(args + ['--out', str(tmp_path / 'straight')])
    straight, drawn[:] = list(drawn), []
    epochs = [straight[k * 40:(k + 1) * 40] for k in range(3)]
    assert len(straight) == 120 and all(sorted(e) == list(range(40)) for e in epochs)  # each image once an epoch
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # shuffled anew every epoch
    stop_after_epoch_1(monkeypatch, args + ['--out', str(tmp_path / 'resumed')])
    train.main(['--resume', str(tmp_path / 'resumed' / 'last.pt')])
    assert drawn == straight  # epoch 1, then epochs 2 and 3 after the resume: the orders of the run that never stopped


def test_a_run_builds_its_model_settings_once_and_a_resumed_run_takes_them_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 4, 'test': 1})
    built, real = [], train.backbone_config
    monkeypatch.setattr(train, 'backbone_config', lambda *a, **kw: built.append(a) or real(*a, **kw))
    stop_after_epoch_1(monkeypatch, FAST + ['--epochs', '2', '--batch-size', '4', '--norm', 'backbone',
                                            '--out', str(tmp_path)])
    assert len(built) == 1  # the flags' check is the build: the data's statistics and the model read it
    saved = torch.load(tmp_path / 'last.pt', weights_only=True)  # the flags are saved, the settings beside them
    assert 'config' not in saved['args'] and saved['config']['mean'] == (0.5, 0.5, 0.5)
    train.main(['--resume', str(tmp_path / 'last.pt')])
    assert len(built) == 1 and read_log(tmp_path)[-1]['epoch'] == 2


@pytest.mark.long
def test_resume_continues_the_same_trajectory(tmp_path, monkeypatch):
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 30, 'test': 10})
    args = FAST + ['--epochs', '3', '--seed', '3', '--batch-size', '25']
    train.main(args + ['--out', str(tmp_path / 'straight')])
    stop_after_epoch_1(monkeypatch, args + ['--out', str(tmp_path / 'resumed')])
    train.main(['--resume', str(tmp_path / 'resumed' / 'last.pt')])
    a = torch.load(tmp_path / 'straight' / 'last.pt', weights_only=True)
    b = torch.load(tmp_path / 'resumed' / 'last.pt', weights_only=True)
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k  # bit for bit
    drop_time = lambda log: [{k: v for k, v in m.items() if k not in ('seconds', 'images_per_s')} for m in log]
    assert drop_time(read_log(tmp_path / 'straight')) == drop_time(read_log(tmp_path / 'resumed'))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_ce, calls = torch.nn.functional.cross_entropy, []

    def ce(logits, labels, **kw):
        calls.append(1)
        loss = real_ce(logits, labels, **kw)
        return loss * float('nan') if len(calls) > 30 else loss  # epoch 1: 20 steps, 10 test batches
    monkeypatch.setattr(torch.nn.functional, 'cross_entropy', ce)
    with pytest.raises(SystemExit, match='the loss became nan in epoch 2.*--clip-grad'):
        train.main(FAST + ['--epochs', '3', '--out', str(tmp_path)])
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['epoch'] == 1


@pytest.mark.parametrize('workers', [0, pytest.param(2, marks=pytest.mark.long)])
def test_an_image_that_breaks_mid_run_is_named_in_one_line_and_the_checkpoint_is_kept(tmp_path, monkeypatch, workers):
    data_dir = tiny_folder(tmp_path / 'data')
    broken, real_save, saved = data_dir / 'train' / 'c1' / '3.png', train.save_checkpoint, []

    def save_then_truncate(model, path, **state):  # the disk loses the end of one image after epoch 1 was saved
        real_save(model, path, **state)
        saved.append(path.read_bytes())
        broken.write_bytes(broken.read_bytes()[:80])
    monkeypatch.setattr(train, 'save_checkpoint', save_then_truncate)
    flags = ['--dataset', 'folder', '--data-dir', str(data_dir), '--backbone', 'vit_tiny_patch8_224', '--img-size', '32',
             '--pretrained', 'none', '--batch-size', '4', '--epochs', '3', '--workers', str(workers)]
    with pytest.raises(SystemExit) as stop:
        train.main(flags + ['--out', str(tmp_path / 'run')])
    message = str(stop.value)
    assert message.startswith(f'error: cannot read image {broken}') and '\n' not in message
    assert message.endswith(f'the last good checkpoint is {tmp_path / "run" / "last.pt"}')
    assert len(saved) == 1 and (tmp_path / 'run' / 'last.pt').read_bytes() == saved[0]  # epoch 1's, untouched


def test_the_host_reads_the_training_sums_a_fixed_number_of_times_however_many_steps(tmp_path, monkeypatch):
    """A GPU runs ahead of the host until our code reads a tensor's value: every SYNC_EVERY steps and at the epoch's
    end, not at every step. (AdamW reads its step counter, a CPU tensor, which makes a GPU wait for nothing.)"""
    reads, ours = [], {'train.py', 'eval.py', 'model.py', 'reduce.py'}

    def reading(real):
        def read(t, *a):
            if Path(sys._getframe(1).f_code.co_filename).name in ours:
                reads.append(real.__name__)
            return real(t, *a)
        return read
    for name in ('item', 'tolist', 'cpu', '__bool__', '__float__', '__int__', '__format__'):
        monkeypatch.setattr(torch.Tensor, name, reading(getattr(torch.Tensor, name)))
    counts = []
    for per_class in (4, 8):  # 10 and 20 steps of 4 images, both fewer than SYNC_EVERY; 5 and 10 test batches
        monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': per_class, 'test': per_class // 2})
        reads.clear()
        train.main(FAST + ['--epochs', '1', '--batch-size', '4', '--out', str(tmp_path / str(per_class))])
        counts.append(len(reads))
    assert train.SYNC_EVERY > 20 and counts[0] == counts[1] < 20


class Float64Made(TorchFunctionMode):
    """Names every torch call that returns a float64 tensor while the mode is on."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (out if isinstance(out, (tuple, list))
                                                                                   else [out])):
            self.calls.append(getattr(func, '__qualname__', repr(func)))
        return out


def test_training_and_evaluation_make_no_float64_tensor(tmp_path, monkeypatch):
    """Apple's MPS has no float64: one such tensor on the model's device stops a run in its first step there. On the
    CPU, every torch call of a training epoch and its evaluation (loader, step, optimizer, sums) is watched."""
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 4, 'test': 2})
    with Float64Made() as watch:
        train.main(FAST + ['--epochs', '1', '--batch-size', '4', '--out', str(tmp_path / 'run')])
    assert watch.calls == []
    with Float64Made() as watch:  # the watch sees what it is meant to catch
        torch.zeros(2).sum(dtype=torch.float64)
    assert len(watch.calls) == 1


def test_resuming_a_missing_corrupt_or_foreign_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='checkpoint not found'):
        train.main([f'--resume={tmp_path / "nope.pt"}'])
    (tmp_path / 'bad.pt').write_bytes(b'PK\x03\x04 garbage')
    with pytest.raises(SystemExit, match='not a readable PyTorch checkpoint'):
        train.main(['--resume', str(tmp_path / 'bad.pt')])
    torch.save({'model': {}}, tmp_path / 'timm.pt')
    with pytest.raises(SystemExit, match='was not written by train.py'):
        train.main(['--resume', str(tmp_path / 'timm.pt')])
    torch.save({'model': {}, 'args': {}, 'config': {'num_blocks': 12}}, tmp_path / 'other.pt')  # a setting we lack
    with pytest.raises(SystemExit, match=r"cannot build \(.*'num_blocks'\): was it written by another version"):
        train.main(['--resume', str(tmp_path / 'other.pt')])


def test_a_short_run_shrinks_the_default_warm_up_and_cool_down_but_refuses_given_ones(capsys):
    args = train.parse_args(['--dataset', 'cotton', '--data-dir', 'D', '--epochs', '1'])
    assert (args.epochs, args.warmup_epochs, args.cooldown_epochs) == (1, 0, 0)
    assert '--epochs 1: 0 warm-up and 0 cool-down epochs' in capsys.readouterr().out
    args = train.parse_args(['--dataset', 'cotton', '--epochs', '4', '--warmup-epochs', '3'])
    assert (args.warmup_epochs, args.cooldown_epochs) == (3, 0)  # the given value stays, the default gives way
    assert train.parse_args(['--dataset', 'cotton', '--epochs', '10']).cooldown_epochs == 5  # the paper's, fits
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset', 'cotton', '--epochs', '1', '--warmup-epochs', '2'])
    assert 'exceed --epochs' in capsys.readouterr().err


@pytest.mark.parametrize('argv,match', [
    (['--keep', '0'], 'keep'), (['--keep', '1.5'], 'keep'), (['--loc', '3', '12'], 'loc'),
    (['--img-size', '30'], 'multiple of patch_size'), (['--epochs', '0'], 'epochs'),
    (['--epochs', '3', '--warmup-epochs', '2', '--cooldown-epochs', '2'], 'exceed --epochs'),
    (['--resume', 'x.pt', '--lr', '1'], 'drop --lr'), (['--backbone', 'resnet50'], 'unknown backbone'),
    (['--batch-size', '1'], 'at least 2 images'),
])
def test_flags_are_checked_at_parse_time(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_defaults_are_the_paper_recipe_for_real_data():
    args = train.parse_args(['--dataset', 'soyageing'])
    assert (args.backbone, args.img_size, args.method, tuple(args.keep), args.clc, args.cla) == \
        ('vit_base_patch16_clip_224.laion2b', 448, 'evit', (0.1,), True, True)
    assert backbone_config(args.backbone, **evaluation.model_fields(args)).loc == (3, 6, 9)
    assert (args.lr, args.weight_decay, args.batch_size, args.epochs, args.min_lr, args.warmup_lr) == \
        (1e-4, 0.05, 32, 50, 1e-5, 1e-6)
    lrs = [train.lr_at(e, args) for e in range(50)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(0.5e-4 + 0.5e-6)
    assert all(a > b for a, b in zip(lrs[2:45], lrs[3:45]))  # the cosine falls ...
    assert lrs[44] > 1e-5 and lrs[45:] == [1e-5] * 5        # ... to the floor, then 5 cool-down epochs


def test_weight_decay_only_on_weight_matrices():
    model = toy(method='evit', keep=0.5, clc=True, cla=True)
    decay, rest = (set(map(id, g['params'])) for g in train.param_groups(model, 0.05))
    named = dict(model.named_parameters())
    for name in ('pos_embed', 'cls_token', 'clr', 'blocks.0.attn.qkv.bias', 'blocks.0.norm1.weight',
                 'ifa_head.0.0.weight'):
        assert id(named[name]) in rest, name
    for name in ('blocks.0.attn.qkv.weight', 'patch_embed.proj.weight', 'ifa_head.0.1.weight'):
        assert id(named[name]) in decay, name
    assert len(decay) + len(rest) == len(named)


def test_ddp_with_two_cpu_processes_matches_a_single_process_evaluation(tmp_path, capsys):
    data_dir = tiny_folder(tmp_path / 'data', test=3)  # 6 test images: each rank evaluates 3 of them
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    flags = ['--dataset', 'folder', '--data-dir', str(data_dir), '--backbone', 'vit_tiny_patch8_224', '--img-size', '32',
             '--pretrained', 'none', '--batch-size', '8', '--epochs', '1', '--cache', '--out', str(tmp_path / 'run')]
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          'train.py', *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count('epoch   1/1') == 1 and 'x2 (gloo)' in run.stdout  # only rank 0 talks
    assert len(list((data_dir / 'train' / '.resized').glob('*.u8'))) == 1  # rank 0 resized the images, once
    logged = read_log(tmp_path / 'run')[0]
    evaluation.main(['--checkpoint', str(tmp_path / 'run' / 'last.pt'), '--workers', '0', '--amp', 'off'])
    single = capsys.readouterr().out
    assert f"top-1 {logged['top1']:.2f}%" in single  # both processes' shares of the test set, summed


@pytest.mark.long
def test_bf16_training_on_a_cpu_is_finite_resumes_exactly_and_keeps_its_precision(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 10, 'test': 4})  # where bf16 is emulated, it is slow
    args = FAST + ['--epochs', '2', '--amp', 'bf16', '--method', 'none', '--no-clc', '--warmup-epochs', '0',
                   '--batch-size', '25']
    train.main(args + ['--out', str(tmp_path / 'straight')])
    losses = [m['train_loss'] for m in read_log(tmp_path / 'straight')]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    stop_after_epoch_1(monkeypatch, args + ['--out', str(tmp_path / 'resumed')])
    capsys.readouterr()
    train.main(['--resume', str(tmp_path / 'resumed' / 'last.pt'), '--workers', '0', '--no-compile', '--device', 'cpu'])
    assert 'precision bf16 (saved)' in capsys.readouterr().out  # not this machine's default
    a, b = (torch.load(tmp_path / run / 'last.pt', weights_only=True) for run in ('straight', 'resumed'))
    assert b['args']['amp'] == 'bf16' and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


@pytest.mark.long
def test_a_run_saved_without_fp16_resumes_with_amp_fp16(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 2, 'test': 1})
    stop_after_epoch_1(monkeypatch, FAST + ['--epochs', '2', '--amp', 'off', '--batch-size', '20',
                                            '--out', str(tmp_path)])
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['scaler'] == {}  # a disabled scaler saves nothing
    metrics = train.main(['--resume', str(tmp_path / 'last.pt'), '--amp', 'fp16'])
    assert metrics['epoch'] == 2 and 'precision fp16 (given)' in capsys.readouterr().out
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['scaler']['scale'] > 0  # the scaler ran


def _record_crops(rank, world, port, out, queue):
    """One torchrun-like process: train one epoch on 100 leaves and report the random crops it drew."""
    if world > 1:
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1',
                          MASTER_PORT=str(port))
    import torchvision.transforms as T
    import leaves
    leaves.Leaves.per_class = {'train': 10, 'test': 2}
    crops, real = [], T.RandomCrop.get_params
    T.RandomCrop.get_params = staticmethod(lambda *a: crops.append(real(*a)) or crops[-1])
    train.main(FAST + ['--epochs', '1', '--amp', 'off', '--out', str(out)])
    queue.put((rank, crops))


@pytest.mark.long
def test_each_rank_draws_its_own_augmentations_and_rank_0_those_of_one_process(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    procs = [ctx.Process(target=_record_crops, args=(r, 2, port, tmp_path / 'ddp', queue)) for r in range(2)]
    procs.append(ctx.Process(target=_record_crops, args=(0, 1, port, tmp_path / 'one', queue)))
    for p in procs[:2]:
        p.start()
    got = dict(queue.get(timeout=300) for _ in range(2))
    procs[2].start()
    single = queue.get(timeout=300)[1]
    for p in procs:
        p.join()
    assert len(got[0]) == len(got[1]) == 50  # 100 images: 2 steps of 25 per rank
    assert got[0] != got[1]                   # image k of each rank's batch gets its own crop
    assert got[0][:25] == single[:25]         # rank 0 draws what a single process draws


@pytest.mark.long
def test_the_schedule_can_follow_steps_within_an_epoch(tmp_path, monkeypatch):
    rates, real = [], train.lr_at
    monkeypatch.setattr(train, 'lr_at', lambda t, args: rates.append(t) or real(t, args))
    train.main(FAST + ['--epochs', '2', '--schedule', 'step', '--out', str(tmp_path)])
    assert rates[:3] == [0, 1 / 20, 2 / 20] and rates[-1] == 1 + 19 / 20  # 1000 images: 20 steps of 50
    args = train.parse_args(['--epochs', '4', '--warmup-epochs', '2', '--cooldown-epochs', '0', '--lr', '1e-3'])
    assert real(0.5, args) == pytest.approx(args.warmup_lr + 0.25 * (1e-3 - args.warmup_lr))  # mid warm-up


@pytest.mark.long
def test_gradient_norms_are_logged_and_finite(tmp_path):
    train.main(['--pretrained', 'none', '--img-size', '32', '--batch-size', '50', '--workers', '0', '--epochs', '2',
                '--warmup-epochs', '0', '--cooldown-epochs', '0', '--out', str(tmp_path)])
    log = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert len(log) == 2
    for m in log:
        assert math.isfinite(m['grad_norm_mean']) and math.isfinite(m['grad_norm_max'])
        assert 0 < m['grad_norm_mean'] <= m['grad_norm_max']


def test_the_demo_fine_tunes_a_backbone_it_pretrains_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(train.SPECIES, 'epochs', 2)
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 10, 'test': 5})
    flags = ['--epochs', '1', '--batch-size', '20', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--workers', '0']
    first = train.main(flags + ['--out', 'a'])
    backbone = tmp_path / 'runs' / 'leaf-species-vit_tiny_patch8_224-48px' / 'last.pt'
    saved = torch.load(backbone, weights_only=True)
    assert saved['epoch'] == saved['args']['epochs'] == 2 and saved['args']['method'] == 'none'
    out = capsys.readouterr().out
    assert 'pre-training the demo backbone' in out
    assert f'loaded 148 tensors from {backbone.relative_to(tmp_path)}' in out  # the fine-tuning starts from it
    stamp = backbone.stat().st_mtime_ns
    second = train.main(flags + ['--out', 'b'])
    assert backbone.stat().st_mtime_ns == stamp and 'pre-training' not in capsys.readouterr().out  # reused
    assert first == {**second, 'images_per_s': first['images_per_s'], 'seconds': first['seconds']}  # same seed, same run
    tuned = torch.load(tmp_path / 'a' / 'last.pt', weights_only=True)['model']['patch_embed.proj.weight']
    scratch = train.main(flags + ['--out', 'c', '--pretrained', 'none'])
    assert scratch['top1'] != first['top1'] or not torch.equal(
        tuned, torch.load(tmp_path / 'c' / 'last.pt', weights_only=True)['model']['patch_embed.proj.weight'])
