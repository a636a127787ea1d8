import argparse
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import open_clip_release, toy
from model import create_model
from weights import CheckpointError, load_weights, pretrained_url, read_checkpoint


def timm_state_dict(backbone, img_size, num_classes=1000):
    """A state dict shaped like timm's file for `backbone` at `img_size`, with random values."""
    src = create_model(backbone, num_classes, img_size=img_size, embed_dim=48, num_heads=3, depth=2, loc=())
    return {k: torch.randn_like(v) for k, v in src.state_dict().items()}


def test_a_224_timm_checkpoint_loads_into_a_448_clca_model(capsys):
    sd = timm_state_dict('vit_tiny_patch16_224', 224)
    model = create_model('vit_tiny_patch16_224', 7, img_size=448, method='evit', keep=0.1, clc=True, cla=True,
                         embed_dim=48, num_heads=3, depth=2, loc=(0,))
    own_clr_rows = model.pos_embed[:, 1 + 784:].detach().clone()
    missing, unexpected = load_weights(model, sd)
    assert all(k.startswith('ifa_head.') for k in missing) and 'blocks.1.mlp.fc2.weight' not in missing
    assert sorted(unexpected) == ['norm.bias', 'norm.weight']  # a CLA model has no final LayerNorm
    assert 'dropped head.weight' in capsys.readouterr().out
    pos = model.pos_embed.detach()
    assert torch.equal(pos[:, :1], sd['pos_embed'][:, :1])  # CLS row copied as is
    grid = sd['pos_embed'][:, 1:].reshape(1, 14, 14, 48).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(28, 28), mode='bicubic', antialias=True, align_corners=False)
    torch.testing.assert_close(pos[:, 1:785], grid.permute(0, 2, 3, 1).reshape(1, 784, 48))
    assert torch.equal(pos[:, 785:], own_clr_rows)  # new CLR position rows keep their init
    assert torch.equal(model.clr.detach(), sd['cls_token'])  # CLR starts as the loaded CLS
    assert torch.equal(model.blocks[1].mlp.fc2.weight.detach(), sd['blocks.1.mlp.fc2.weight'])


def test_official_containers_and_prefixes_are_unwrapped(tmp_path):
    sd = timm_state_dict('deit3_small_patch16_224', 32)
    moco = {'state_dict': {f'module.base_encoder.{k}': v for k, v in sd.items()}
            | {'module.momentum_encoder.cls_token': torch.zeros(1)}, 'epoch': 300}
    torch.save(moco, tmp_path / 'moco.pth.tar')
    assert read_checkpoint(tmp_path / 'moco.pth.tar').sd.keys() == sd.keys()
    model = create_model('deit3_small_patch16_224', 1000, img_size=64, embed_dim=48, num_heads=3, depth=2, loc=())
    assert load_weights(model, str(tmp_path / 'moco.pth.tar'), verbose=False) == ([], [])
    torch.testing.assert_close(model.blocks[0].ls1.gamma.detach(), sd['blocks.0.ls1.gamma'])


def test_bad_checkpoints_are_refused_with_a_clear_message(tmp_path, monkeypatch):
    model = toy(depth=2, loc=(0,))
    with pytest.raises(ValueError, match='does not fit this model'):
        load_weights(model, timm_state_dict('vit_small_patch8_224', 32) | {
            'blocks.0.attn.qkv.weight': torch.zeros(12, 48)})
    with pytest.raises(ValueError, match='no square grid'):  # a DeiT-3 file into a class-embedded ViT
        load_weights(model, timm_state_dict('deit3_small_patch16_224', 224))
    with pytest.raises(CheckpointError, match='checkpoint not found'):
        load_weights(model, tmp_path / 'nope.pth')
    torch.save({'model': {}, 'cfg': argparse.ArgumentParser}, tmp_path / 'evil.pth')
    with pytest.raises(ValueError, match='holds a argparse.ArgumentParser object.*refusing it'):
        load_weights(model, tmp_path / 'evil.pth')
    (tmp_path / 'noise.pth').write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match='noise.pth is not a PyTorch checkpoint'):
        load_weights(model, tmp_path / 'noise.pth')
    (tmp_path / 'w.safetensors').write_bytes(b'')
    monkeypatch.setitem(sys.modules, 'safetensors', None)
    with pytest.raises(ImportError, match='pip install safetensors'):
        load_weights(model, tmp_path / 'w.safetensors')


def test_pretrained_tags_point_at_timm_files():
    assert pretrained_url('deit_base_patch16_224.fb_in1k') == \
        'https://huggingface.co/timm/deit_base_patch16_224.fb_in1k/resolve/main/pytorch_model.bin'
    with pytest.raises(CheckpointError, match='no pretrained tag'):
        pretrained_url('deit_base_patch16_224')


@pytest.mark.parametrize('method,prefix', [('patchmerger', 'cluster_layers'), ('sit', 'cluster_layers'),
                                           ('dpcknn', 'cluster_layers'), ('dynamicvit', 'score_predictor')])
def test_official_names_of_learned_reductions_load(method, prefix):
    src = toy(method=method, keep=0.25, clc=True, cla=True)
    sd = {k.replace('reducers.', f'{prefix}.'): torch.randn_like(v) if v.is_floating_point() else v
          for k, v in src.state_dict().items()}
    model = toy(method=method, keep=0.25, clc=True, cla=True)
    assert load_weights(model, {'model': sd}, verbose=False) == ([], [])
    torch.testing.assert_close(model.reducers[1].state_dict(), {k.split('.', 2)[2]: v for k, v in sd.items()
                                                                if k.startswith(f'{prefix}.1.')})


def open_clip_file(model) -> dict:
    """`model`'s weights as OpenCLIP's release names a CLIP image tower ('visual.*'), beside a text tower, the
    projection into the text space and the logit scale, which a ViT classifier has no use for."""
    sd = model.state_dict()
    out = {'visual.conv1.weight': sd['patch_embed.proj.weight'], 'visual.class_embedding': sd['cls_token'][0, 0],
           'visual.positional_embedding': sd['pos_embed'][0], 'visual.proj': torch.randn(48, 16),
           'logit_scale': torch.ones(()), 'token_embedding.weight': torch.randn(10, 48),
           'transformer.resblocks.0.attn.in_proj_weight': torch.randn(144, 48), 'ln_final.weight': torch.ones(48)}
    for ours, theirs in (('norm_pre', 'ln_pre'), ('norm', 'ln_post')):
        out |= {f'visual.{theirs}.{p}': sd[f'{ours}.{p}'] for p in ('weight', 'bias')}
    layer = {'norm1': 'ln_1', 'attn.qkv': 'attn.in_proj', 'attn.proj': 'attn.out_proj', 'norm2': 'ln_2',
             'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj'}
    for i in range(model.cfg.depth):
        for ours, theirs in layer.items():
            joint = '_' if theirs == 'attn.in_proj' else '.'  # OpenCLIP's fused projection: in_proj_weight
            out |= {f'visual.transformer.resblocks.{i}.{theirs}{joint}{p}': sd[f'blocks.{i}.{ours}.{p}']
                    for p in ('weight', 'bias')}
    return out


def test_openclip_weights_load_under_timm_names():
    clip = toy('clip')
    for p in clip.parameters():  # every tensor distinct, so that a swapped name cannot pass
        torch.nn.init.normal_(p)
    model = toy('clip')
    missing, unexpected = load_weights(model, open_clip_file(clip), verbose=False)
    assert (sorted(missing), unexpected) == (['head.bias', 'head.weight'], [])  # the classifier is the model's own
    for name, value in clip.state_dict().items():
        if not name.startswith('head.'):
            assert torch.equal(model.state_dict()[name], value), name
    assert pretrained_url('vit_base_patch16_clip_224.laion2b') == ('https://huggingface.co/laion/'
                                                                  'CLIP-ViT-B-16-laion2B-s34B-b88K/resolve/main/open_clip_pytorch_model.bin')


def test_an_openclip_grid_is_resampled_to_448_as_the_papers_timm_does():
    """timm 0.9.12, the paper's, resizes an OpenCLIP file's grid with plain bicubic F.interpolate (no antialiasing),
    other files' with antialiasing: at 14 -> 28 the two kernels differ."""
    sd = open_clip_release(width=48, layers=2, text_width=32, text_layers=1, vocab=100, embed=16)
    model = create_model('vit_tiny_patch16_clip_224', 7, img_size=448, embed_dim=48, num_heads=3, depth=2, loc=(0,),
                         method='evit', keep=0.1, clc=True, cla=True)
    load_weights(model, sd, verbose=False)
    pos = sd['visual.positional_embedding'][None]                               # (1, 1 + 196, 48)
    grid = pos[:, 1:].reshape(1, 14, 14, 48).permute(0, 3, 1, 2)                # (1, 48, 14, 14)
    paper = F.interpolate(grid, size=(28, 28), mode='bicubic', align_corners=False)
    paper = paper.permute(0, 2, 3, 1).reshape(1, 784, 48)                       # (1, 784, 48)
    assert torch.equal(model.pos_embed[:, :1].detach(), pos[:, :1])  # the CLS row as it is
    assert torch.equal(model.pos_embed[:, 1:785].detach(), paper)
    smooth = F.interpolate(grid, size=(28, 28), mode='bicubic', antialias=True, align_corners=False)
    assert (smooth.permute(0, 2, 3, 1).reshape(1, 784, 48) - paper).abs().max() > 1e-3  # the test can tell them apart
    timm_file = create_model('vit_tiny_patch16_clip_224', 7, img_size=448, embed_dim=48, num_heads=3, depth=2, loc=(0,))
    load_weights(timm_file, read_checkpoint(sd).sd, verbose=False)  # the same weights under timm's names
    assert torch.equal(timm_file.pos_embed[:, 1:].detach(), smooth.permute(0, 2, 3, 1).reshape(1, 784, 48))
    load_weights(timm_file, read_checkpoint(sd), verbose=False)  # read once and passed on, as eval.py's build does
    assert torch.equal(timm_file.pos_embed[:, 1:].detach(), paper)
