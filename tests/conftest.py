import argparse
from pathlib import Path

import pytest
import torch

import leaves
from model import create_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


FAMILIES = {'vit': 'vit_tiny_patch16_224', 'deit3': 'deit3_tiny_patch16_224', 'clip': 'vit_tiny_patch16_clip_224',
            'miil': 'vit_tiny_patch16_224_miil'}


def toy(family='vit', **kw):
    """A 12-block ViT small enough for the CPU: 48 wide, 3 heads, 32 px images of 4 px patches (P = 64),
    5 classes. `family` picks the architecture's quirks: 'vit', 'deit3' (no CLS position row,
    LayerScale), 'clip' (pre-norm) or 'miil' (no qkv bias)."""
    args = dict(backbone=FAMILIES[family], num_classes=5, img_size=32, patch_size=4, embed_dim=48, num_heads=3)
    return create_model(**{**args, **kw})


def trace(model, images):
    """Run `model` and return, per block, the (input, output) Tokens records."""
    seen, hooks = [], [blk.register_forward_hook(lambda m, a, out: seen.append((a[0], out))) for blk in model.blocks]
    try:
        logits, _ = model(images)
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


@pytest.fixture
def small_leaves(monkeypatch):
    """The embedded dataset at a tenth of its size (1000 train / 500 test images) for fast runs."""
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 100, 'test': 50})


def official_prefix(method: str) -> str:
    """What the paper's code calls the learned parts of the reduction stages."""
    return 'score_predictor' if method == 'dynamicvit' else 'cluster_layers'


def official_weights(model):
    """Random weights for `model`, named as the paper's code names them (`cluster_layers.*`, or
    `score_predictor.*` for DynamicViT), with LayerScale gains and BatchNorm variances kept away from 0."""
    sd = {k: torch.randn_like(v) * 0.3 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd |= {k: v + 1 for k, v in sd.items() if k.endswith('.gamma')}
    sd |= {k: v.abs() + 0.5 for k, v in sd.items() if k.endswith('running_var')}
    return {k.replace('reducers.', official_prefix(model.cfg.method) + '.'): v for k, v in sd.items()}


def official_file(path, sd, **args):
    """Save `sd` as the paper's training script does: its args Namespace, optimizer, scheduler, an unused
    1000-way head."""
    dim = sd['cls_token'].shape[-1]
    torch.save({'model': sd | {'head.weight': torch.randn(1000, dim), 'head.bias': torch.zeros(1000)},
                'optimizer': {'state': {}, 'param_groups': []}, 'lr_scheduler': {'last_epoch': 49}, 'epoch': 50,
                'scaler': {'scale': 65536.0}, 'args': argparse.Namespace(**args)}, path)


def official_checkpoint(path, keep=0.25):
    """A checkpoint as the paper's training script writes it, of a ViT-Tiny/8 at 32 px for the leaves."""
    sd = official_weights(create_model('vit_tiny_patch8_224', 10, img_size=32, method='evit', keep=keep, clc=True, cla=True))
    official_file(path, sd, model='evit_vit_tiny_patch8_224', input_size=32, keep_rate=[keep], reduction_loc=[3, 6, 9],
                  clc=True, num_clr=1, ifa_head=True, clc_include_gap=True, clc_recover_at_last=True, lr=1e-4, seed=1)
    return sd


def tiny_folder(root, train=8, test=2):
    """A folder dataset (layout c) of 2 classes with `train` and `test` images each, 40 x 40 pixels."""
    from PIL import Image
    for split, count in (('train', train), ('test', test)):
        for c in range(2):
            (root / split / f'c{c}').mkdir(parents=True)
            for i in range(count):
                Image.new('RGB', (40, 40), (100 * c, 10 * i, 50)).save(root / split / f'c{c}' / f'{i}.png')
    return root


def release(folder: Path, lines: dict, draw=None):
    """An unpacked release: anno/<split>.txt with '<file> <1-based label>' lines, the files under images/ (empty,
    unless `draw(path)` makes them)."""
    (folder / 'anno').mkdir(parents=True)
    (folder / 'images').mkdir()
    for split, rows in lines.items():
        (folder / 'anno' / f'{split}.txt').write_text(''.join(f'{name} {label}\n' for name, label in rows))
        for name, _ in rows:
            draw(folder / 'images' / name) if draw else (folder / 'images' / name).touch()


def open_clip_release(width=768, layers=12, patch=16, grid=14, text_width=512, text_layers=12, vocab=49408,
                      context=77, embed=512, seed=0) -> dict:
    """A CLIP model's state dict as open_clip saves it (a plain dict of tensors): random weights under its names and
    shapes, the text tower included. The defaults are ViT-B/16 at 224 px, the architecture of the paper's
    laion2b_s34b_b88k weights: an image tower 768 wide, 12 blocks, a 14 x 14 grid; a text tower 512 wide, 12 blocks,
    a 49,408-token vocabulary, 77 positions; both projected to 512."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02
    norm = lambda name, w: {f'{name}.weight': 1 + rand(w), f'{name}.bias': rand(w)}

    def tower(prefix, w, n):
        out = {}
        for i in range(n):
            b = f'{prefix}transformer.resblocks.{i}.'
            out |= norm(b + 'ln_1', w) | norm(b + 'ln_2', w)
            out |= {b + 'attn.in_proj_weight': rand(3 * w, w), b + 'attn.in_proj_bias': rand(3 * w),
                    b + 'attn.out_proj.weight': rand(w, w), b + 'attn.out_proj.bias': rand(w),
                    b + 'mlp.c_fc.weight': rand(4 * w, w), b + 'mlp.c_fc.bias': rand(4 * w),
                    b + 'mlp.c_proj.weight': rand(w, 4 * w), b + 'mlp.c_proj.bias': rand(w)}
        return out
    sd = {'positional_embedding': rand(context, text_width), 'text_projection': rand(text_width, embed),
          'logit_scale': torch.tensor(4.6052), 'visual.class_embedding': rand(width),
          'visual.positional_embedding': rand(1 + grid * grid, width), 'visual.proj': rand(width, embed),
          'visual.conv1.weight': rand(width, 3, patch, patch)}  # no bias: CLIP's patch convolution has none
    sd |= norm('visual.ln_pre', width) | tower('visual.', width, layers) | norm('visual.ln_post', width)
    sd |= tower('', text_width, text_layers) | {'token_embedding.weight': rand(vocab, text_width)}
    return sd | norm('ln_final', text_width)
