"""A rehearsal of the command this repository exists for, at full size on a CPU: `python train.py --dataset soyageing
--keep 0.1`, every model and recipe flag at its default (CLIP ViT-B/16 at 448 px, EViT keeping 10 % at blocks 3, 6
and 9, the cache, the head, batch 32), on a SoyAgeing release laid out as it unpacks and an OpenCLIP file saved as
open_clip saves one. One training step, then the checkpoint evaluated, then the resized images reused."""
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import eval as evaluation
from conftest import open_clip_release, release
from data import build_dataset

ROOT = Path(__file__).resolve().parents[1]
SUBSETS = ('R1', 'R3', 'R4', 'R5', 'R6')
PER_SUBSET = {'train': 7, 'test': 1}  # 35 training images: one full batch of 32


def leaf_photo(path: Path):
    """A 1000 x 1000 RGB PNG, the size of the release's photographs: a plain field with a lighter disc, drawn from a
    seed its name gives."""
    g = torch.Generator().manual_seed(zlib.crc32(path.name.encode()))
    shade = torch.randint(40, 200, (3,), generator=g)
    x, y = torch.randint(300, 700, (2,), generator=g).tolist()
    img = Image.new('RGB', (1000, 1000), tuple(shade.tolist()))
    ImageDraw.Draw(img).ellipse((x - 150, y - 150, x + 150, y + 150), fill=tuple((shade + 50).tolist()))
    img.save(path)


def soyageing_release(root: Path):
    """SoyAgeing as its five archives unpack: SoyAgeing/SoyAgeing-R#/R#/{anno,images}, 1-based labels, names as
    released; cultivar k has label k + 1 in every subset."""
    for s, r in enumerate(SUBSETS):
        cultivars = {split: [(17 * i + s) % 198 for i in range(n)] for split, n in PER_SUBSET.items()}  # spread out
        lines = {split: [(f'yd{k:03d}_{r}_{i + 1}_{split}.png', k + 1) for i, k in enumerate(ks)]
                 for split, ks in cultivars.items()}
        release(root / 'SoyAgeing' / f'SoyAgeing-{r}' / r, lines, draw=leaf_photo)


@pytest.mark.long
def test_the_papers_command_on_a_soyageing_release_and_an_openclip_file(tmp_path, capsys):
    soyageing_release(tmp_path / 'data')
    weights = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(open_clip_release(), weights)  # about 600 MB, as the real file
    cmd = [sys.executable, 'train.py', '--dataset', 'soyageing', '--keep', '0.1', '--data-dir', str(tmp_path / 'data'),
           '--pretrained', str(weights), '--epochs', '1', '--cache', '--workers', '2', '--out', str(tmp_path / 'run')]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert ("soyageing: 35 train / 5 test images, 198 classes, the benchmark's release (anno/*.txt, images/) in "
            f"{tmp_path / 'data' / 'SoyAgeing'}: SoyAgeing-R1/R1, SoyAgeing-R3/R3, SoyAgeing-R4/R4") in out
    assert 'found 35 images of' in run.stderr and 'in subsets R1 R3 R4 R5 R6' in run.stderr  # not the full release
    assert 'resampled pos_embed grid 14x14 -> 28x28' in out and 'initialised CLR from the loaded CLS token' in out
    assert 'vit_base_patch16_clip_224.laion2b evit keep [0.1] clc=True cla=True' in out and 'epoch   1/1' in out
    ckpt = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    assert ckpt['config']['img_size'] == 448 and ckpt['config']['embed_dim'] == 768 and ckpt['args']['batch_size'] == 32
    assert ckpt['model']['pos_embed'].shape == (1, 1 + 784 + 1, 768)  # CLS, the 28 x 28 grid, one CLR row

    evaluation.main(['--checkpoint', str(tmp_path / 'run' / 'last.pt'), '--workers', '0'])  # its saved data and model
    assert re.search(r'test top-1 [\d.]+%', capsys.readouterr().out)

    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / 'data' / 'SoyAgeing' / '.resized').glob('*.u8')}
    assert len(cached) == 2  # the training and the test images, once each
    for split in ('train', 'test'):
        ds, _ = build_dataset('soyageing', split, 448, tmp_path / 'data', cache_workers=0)
        assert ds.resized in cached and ds.resized.stat().st_mtime_ns == cached[ds.resized]  # reused, not rebuilt
