"""explain.py: the evidence masks, evidence recall, the token trace, the kept-patch picture, the two halves
of a class."""
import math

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import explain
from conftest import official_checkpoint, toy, trace
from data import build_dataset
from leaves import PALETTE, SPOT_RADIUS
from model import create_model

pytestmark = pytest.mark.usefixtures('small_leaves')


@pytest.mark.parametrize('size', [32, 64])
def test_evidence_masks_cover_the_rendered_spots(size):
    ds, _ = build_dataset('leaves', 'test', size)
    spot_area = math.pi * (SPOT_RADIUS * ds.size / 2) ** 2
    for i in range(10):  # one image of each class
        colour = (i % ds.num_classes) // 5  # yellow or red
        image = ds[i][0] / 255                                                # (3, S, S) in [0, 1]
        match = ((image - PALETTE[colour].view(3, 1, 1)).abs().amax(0) < 0.15).float()  # spot-coloured pixels
        per_patch = match.reshape(size // 8, 8, size // 8, 8).sum((1, 3)).flatten()  # (P,)
        evidence = explain.evidence(ds, i, size, 8)
        assert evidence.any()
        assert (per_patch[evidence] >= 1).all()                  # every evidence patch shows the spot colour
        assert evidence[per_patch >= 0.3 * spot_area].all()      # every patch with much spot colour is evidence


def test_recall_is_one_without_reduction():
    ds, _ = build_dataset('leaves', 'test', 32)
    model = create_model('vit_tiny_patch8_224', 10, img_size=32, method='none', embed_dim=48, num_heads=3)
    assert explain.evidence_recall(model, ds, 'cpu') == [(1.0, 0.0, 1.0)] * 3


def test_recall_counts_evidence_patches_alone_and_merged(monkeypatch):
    class Constructed:  # 2 images of 4 patches, evidence in patches {0, 1} and {2}
        masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
        mean, std = (0.5,) * 3, (0.5,) * 3

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 16, 16, dtype=torch.uint8), 0

        def render(self, i):  # a drawn dataset, whose evidence the generator knows
            raise AssertionError('the masks below stand in for the drawings')
    T = lambda rows: torch.tensor(rows, dtype=torch.bool)
    held = [torch.stack([T([[1, 1, 0, 0], [0, 0, 1, 1]]),     # location 1, image 1: 0 and 1 merged together
                         T([[0, 0, 1, 0], [1, 1, 0, 1]])]),    # image 2: 2 kept alone
            torch.stack([T([[0, 1, 1, 0], [0, 0, 0, 0]]),     # location 2, image 1: 1 merged with 2, 0 gone
                         T([[0, 0, 1, 1], [1, 0, 0, 0]])])]    # image 2: 2 merged with 3
    monkeypatch.setattr(explain, 'held_patches', lambda model, images: held)
    monkeypatch.setattr(explain, 'evidence', lambda dataset, i, img_size, patch: Constructed.masks[i])
    model = create_model('vit_tiny_patch8_224', 2, img_size=16, method='evit', keep=0.5, loc=(1, 2),
                         embed_dim=48, num_heads=3)
    (a1, m1, c1), (a2, m2, c2) = explain.evidence_recall(model, Constructed(), 'cpu')
    assert (a1, m1, c1) == (1.0, 0.0, 0.125)               # one single-patch token among 8 patches
    assert (a2, m2, c2) == (0.0, pytest.approx(2 / 3), 0.125)


@pytest.mark.parametrize('method', ['evit', 'tome', 'dpcknn', 'patchmerger', 'ats'])
def test_held_patches_follow_the_tokens(method):
    """A token that took a patch's place holds that patch; a selected token holds only it, a ToMe merge as
    many patches as its size, a DPC-KNN cluster its members (each patch in one cluster), a pooled token all."""
    # ToMe also merges the CLR carriers, which hold no patch but count in `size`: no cache for it here
    model = toy(method=method, keep=0.25, clc=method != 'tome', cla=True).eval()
    images = torch.randn(3, 3, 32, 32)
    torch.manual_seed(0)  # DPC-KNN breaks density ties with noise: the same noise in both runs
    held = explain.held_patches(model, images)
    torch.manual_seed(0)
    _, seen = trace(model, images)
    for s, i in enumerate(model.cfg.loc):
        t = seen[i][1]  # Tokens after block i
        assert held[s].shape == t.x.shape[:2] + (model.num_patches,)
        place = t.idx > 0  # (B, N) tokens in a patch's place
        assert held[s][place].gather(1, t.idx[place, None] - 1).all()
        count = held[s].sum(-1)  # (B, N) patches per token
        if method in ('evit', 'ats'):
            assert (count[place] == 1).all()
        if method == 'ats':
            assert not held[s][~t.valid].any()
        if method == 'tome':
            assert (count[place] == t.size[..., 0][place]).all()
        if method == 'dpcknn':
            assert (held[s].sum(1) <= 1).all()
        if method == 'patchmerger':
            assert held[s][:, 1:].all()


@pytest.mark.parametrize('method, clc', [('evit', True), ('evit', False), ('tome', True), ('patchmerger', True),
                                         ('none', True)])
def test_the_trace_counts_the_tokens_the_model_runs(method, clc):
    model = toy(method=method, keep=0.1, clc=clc, cla=True).eval()
    image = torch.randn(1, 3, 32, 32)
    rows = explain.trace(model, image)
    _, seen = trace(model, image)
    assert [sum(counts.values()) for _, counts, _, _ in rows] == [a.x.shape[1] for a, _ in seen]
    assert [len(alive) for _, _, alive, _ in rows] == [int((a.idx > 0).sum()) for a, _ in seen]
    cla_notes = [i for i, _, _, notes in rows if any('CLA' in n for n in notes)]
    assert cla_notes == (model.cla_layers if model.cfg.cla else [])
    for k, (_, _, _, notes) in enumerate(rows[:-1]):  # a recovery appends exactly what the next block receives extra
        appended = seen[k + 1][0].x.shape[1] - seen[k][1].x.shape[1]
        assert [int(n.split()[-1]) for n in notes if 'recovers' in n] == ([appended] if appended else [])
    assert any('recovers' in n for row in rows for n in row[3]) == clc


def test_factor_accuracy_scores_each_half_of_the_class_apart():
    """A model that always answers class 0 (yellow spots, the shortest leaf) gets the colour of half the
    balanced test set right, the length of a fifth, and a tenth of the classes."""
    class Always0(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, images):
            return torch.eye(10)[[0] * len(images)] + self.w, None  # (B, 10): class 0 wins
    dataset, _ = build_dataset('leaves', 'test', 16)
    split = dataset.factors(torch.tensor([0, 4, 5, 9]))
    assert split['spot colour'].tolist() == [0, 0, 1, 1] and split['length'].tolist() == [0, 4, 0, 4]
    shares = explain.factor_accuracy(Always0(), dataset, torch.device('cpu'))
    assert shares == {'spot colour': 50.0, 'length': 20.0, 'top-1': 10.0}
    species, _ = build_dataset('leaf-species', 'test', 16)
    assert list(species.factors(7)) == ['width', 'length'] and species.factors(7) == {'width': 1, 'length': 2}


def test_explain_prints_recall_and_trace_for_a_model_from_flags(capsys):
    flags = ['--dataset', 'leaves', '--backbone', 'vit_tiny_patch8_224', '--img-size', '32', '--num-classes', '10',
             '--method', 'evit', '--keep', '0.1', '--clc', '--cla']
    explain.main(flags + ['--recall'])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(':')[0] for line in lines[1:]] == ['after block 3', 'after block 6', 'after block 9']
    explain.main(flags + ['--trace', '0'])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [int(r.split()[0]) for r in rows] == list(range(12))
    assert int(rows[4].split()[1]) == 10  # block 4 enters with CLS, 2 kept, the fused token and 6 recovered
    explain.main(flags + ['--factors'])
    assert capsys.readouterr().out.splitlines()[1].startswith('spot colour ')


def test_visualize_writes_a_png_grid(tmp_path):
    official_checkpoint(tmp_path / 'clca.pth')
    explain.main(['--checkpoint', str(tmp_path / 'clca.pth'), '--dataset', 'leaves',
                  '--visualize', str(tmp_path / 'kept.png')])
    png = Image.open(tmp_path / 'kept.png')
    assert png.format == 'PNG'
    # columns: image + 3 locations; 6 images; 32 px scaled up 4x so that an 8-px patch is 32 screen pixels
    assert png.size == (4 * (128 + 2) + 2, explain.HEADING + 6 * (128 + 2) + 2)
    pixels = pil_to_tensor(png.convert('RGB'))  # (3, H, W)
    assert (pixels == torch.tensor([0, 255, 255]).view(3, 1, 1)).all(0).sum() > 100  # the evidence outlines, in cyan
    heading = pixels[:, :explain.HEADING].sum(0) < 3 * 128  # dark text on white, above every column
    assert all(heading[:, c * 130:(c + 1) * 130].sum() > 20 for c in range(4))


def test_visualize_on_an_older_pillow_is_one_line_saying_what_it_needs(monkeypatch, capsys):
    monkeypatch.setattr(explain.PIL, '__version__', '10.0.1')  # load_default() takes no size before 10.1
    with pytest.raises(SystemExit):
        explain.parse_args(['--visualize', 'kept.png'])
    assert 'error: --visualize needs Pillow 10.1 or newer, not 10.0.1' in capsys.readouterr().err
    monkeypatch.setattr(explain.PIL, '__version__', '10.1.0')
    assert explain.parse_args(['--visualize', 'kept.png']).visualize == 'kept.png'
