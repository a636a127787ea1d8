"""What the repository teaches with: the generator's evidence masks, evidence recall, the cache trace,
the logged gradient norms, and the demo's pre-trained backbone."""
import json
import math

import pytest
import torch

import data
import eval as evaluation
import train
from conftest import toy, trace
from data import PALETTE, build_dataset
from model import create_model

pytestmark = pytest.mark.usefixtures('small_leaves')


@pytest.mark.parametrize('size', [32, 64])
def test_evidence_masks_cover_the_rendered_spots(size):
    ds, _ = build_dataset('leaves', 'test', size)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (ds.transform.transforms[-1].mean, ds.transform.transforms[-1].std))
    spot_area = math.pi * (data.SPOT_RADIUS * ds.size / 2) ** 2
    checked = 0
    for i in range(10):  # one image of each class
        colour = ds.signatures[i % ds.num_classes][0]
        if colour == 2:  # white spots can be mistaken for a pale background pixel: skip that class
            continue
        image = ds[i][0] * std + mean                                         # (3, S, S) in [0, 1]
        match = ((image - PALETTE[colour].view(3, 1, 1)).abs().amax(0) < 0.15).float()  # spot-coloured pixels
        per_patch = match.reshape(size // 8, 8, size // 8, 8).sum((1, 3)).flatten()  # (P,)
        evidence = ds.evidence(i, 8)
        assert evidence.any()
        assert (per_patch[evidence] >= 1).all()                  # every evidence patch shows the spot colour
        assert evidence[per_patch >= 0.3 * spot_area].all()      # every patch with much spot colour is evidence
        checked += 1
    assert checked >= 6


def test_recall_is_one_without_reduction():
    ds, _ = build_dataset('leaves', 'test', 32)
    model = create_model('vit_tiny_patch8_224', 10, img_size=32, method='none', embed_dim=48, num_heads=3)
    assert evaluation.evidence_recall(model, ds, 'cpu') == [(1.0, 1.0)] * 3


def test_recall_counts_evidence_patches_that_kept_a_token(monkeypatch):
    class Constructed:  # 2 images of 4 patches, evidence in patches {0, 1} and {2}
        masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 16, 16), 0

        def evidence(self, i, patch):
            return self.masks[i]
    kept = [torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool),   # after location 1: 2 of 3 found
            torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)]   # after location 2: none
    monkeypatch.setattr(evaluation, 'alive_patches', lambda model, images: kept)
    model = create_model('vit_tiny_patch8_224', 2, img_size=16, method='evit', keep=0.5, loc=(1, 2),
                         embed_dim=48, num_heads=3)
    (r1, c1), (r2, c2) = evaluation.evidence_recall(model, Constructed(), 'cpu')
    assert (r1, c1, r2, c2) == (pytest.approx(2 / 3), 0.5, 0.0, 0.125)


@pytest.mark.parametrize('method', ['evit', 'topk', 'tome', 'patchmerger', 'dynamicvit'])
def test_alive_patches_are_the_patch_tokens_the_model_keeps(method):
    model = toy(method=method, keep=0.25, clc=True, cla=True).eval()
    images = torch.randn(3, 3, 32, 32)
    alive = evaluation.alive_patches(model, images)
    _, seen = trace(model, images)
    for s, i in enumerate(model.cfg.loc):
        idx = seen[i][1].idx  # (B, N) after block i
        assert alive[s].sum(1).tolist() == [len(set(row.tolist()) - {0, -1}) for row in idx]


@pytest.mark.parametrize('method, clc', [('evit', True), ('evit', False), ('tome', True), ('patchmerger', True),
                                         ('none', True)])
def test_the_trace_counts_the_tokens_the_model_runs(method, clc):
    model = toy(method=method, keep=0.1, clc=clc, cla=True).eval()
    image = torch.randn(1, 3, 32, 32)
    rows = evaluation.trace(model, image)
    _, seen = trace(model, image)
    assert [sum(counts.values()) for _, counts, _, _ in rows] == [a.x.shape[1] for a, _ in seen]
    assert [len(alive) for _, _, alive, _ in rows] == [int((a.idx > 0).sum()) for a, _ in seen]
    cla_notes = [i for i, _, _, notes in rows if any('CLA' in n for n in notes)]
    assert cla_notes == (model.cla_layers if model.cfg.cla else [])
    for k, (_, _, _, notes) in enumerate(rows[:-1]):  # a recovery appends exactly what the next block receives extra
        appended = seen[k + 1][0].x.shape[1] - seen[k][1].x.shape[1]
        assert [int(n.split()[-1]) for n in notes if 'recovers' in n] == ([appended] if appended else [])
    assert any('recovers' in n for row in rows for n in row[3]) == clc


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
    monkeypatch.setattr(data.Leaves, 'per_class', {'train': 10, 'test': 5})
    flags = ['--epochs', '1', '--batch-size', '20', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--workers', '0']
    first = train.main(flags + ['--out', 'a'])
    backbone = tmp_path / 'runs' / 'leaf-species-vit_tiny_patch8_224-32px' / 'last.pt'
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
