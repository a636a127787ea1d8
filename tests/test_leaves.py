"""leaves.py: the embedded dataset is deterministic, balanced, drawn at any size, and its classes are what
its docstring says they are."""
import torch

from data import build_dataset, resize, transforms
from leaves import PALETTE, Leaves


def test_the_embedded_leaves_are_deterministic_balanced_and_any_size():
    tf = transforms(48, None, resized=True)  # the leaves are drawn at the resized side
    a, b = Leaves('train', 54, tf), Leaves('train', 54, tf)
    assert len(a) == 4000 and a.num_classes == 10 and len(Leaves('test', 54, tf)) == 3000
    assert a.render(7)[0].shape == (3, 54, 54) and a[7][0].shape == (3, 48, 48)
    assert torch.equal(a[7][0], b[7][0]) and a[7][1] == 7 and a[17][1] == 7
    assert not torch.equal(a[7][0], Leaves('test', 54, tf)[7][0])
    assert not torch.equal(a[7][0], Leaves('train', 54, tf, seed=1)[7][0])
    assert Leaves('train', 114, transforms(100, 'weak', resized=True))[0][0].shape == (3, 100, 100)


def test_build_dataset_draws_the_leaves_at_the_side_the_paper_resizes_to():
    for name in ('leaves', 'leaf-species'):
        ds, num_classes = build_dataset(name, 'test', 48)
        assert ds.size == resize(48).size[0] == 54 and num_classes == 10 and ds[0][0].shape == (3, 48, 48)
    assert build_dataset('leaf-species', 'test', 48)[0].task == 'species'


def test_a_cultivar_is_a_leaf_length_and_a_spot_colour():
    """Class c has spots of colour c // 5 (yellow, red) and a leaf of length class c % 5: over 40 images per
    length (the width is random), a longer class covers more of the image."""
    ds = Leaves('train', 54, transforms(48, None, resized=True))
    area = torch.zeros(5)
    for i in range(200):
        img, evidence = ds.render(i)                        # (3, S, S) uint8, (S, S) spot cover
        img, c = img.float() / 255, i % 10
        if (evidence > 0.99).any():                         # pixels fully inside a visible spot
            assert (img[:, evidence > 0.99].mean(1) - PALETTE[c // 5]).abs().max() < 0.15
        r, g, b = img
        area[c % 5] += ((r < 0.4) & (b < 0.4) & (g > r)).sum()  # leaf pixels: green, darker than any background
    assert (area[1:] > area[:-1]).all()
