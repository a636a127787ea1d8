import pytest
import torch

import data
from model import create_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kw):
    """A 12-block ViT small enough for the CPU: 48 wide, 3 heads, 32 px images of 4 px patches (P = 64)."""
    args = dict(backbone='vit_tiny_patch16_224', num_classes=5, img_size=32, patch_size=4, embed_dim=48, num_heads=3)
    return create_model(**{**args, **kw})


def trace(model, images):
    """Run `model` and return, per block, the (input, output) Tokens records."""
    seen, hooks = [], [blk.register_forward_hook(lambda m, a, out: seen.append((a[0], out))) for blk in model.blocks]
    try:
        logits = model(images)
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


@pytest.fixture
def small_leaves(monkeypatch):
    """The embedded dataset at a tenth of its size (1000 train / 500 test images) for fast runs."""
    monkeypatch.setattr(data.Leaves, 'per_class', {'train': 100, 'test': 50})
