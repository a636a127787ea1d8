import argparse
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import toy, trace
from model import ModelConfig, create_model, gmacs
from weights import CheckpointError, load_weights, pretrained_url, read_checkpoint

IMAGES = lambda n=2: torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize('family', ['vit', 'deit3', 'clip', 'miil'])
@pytest.mark.parametrize('method', ['none', 'evit', 'topk', 'tome', 'ats', 'patchmerger', 'sit', 'dpcknn',
                                    'dynamicvit'])
@pytest.mark.parametrize('clc,cla', [(False, False), (True, False), (False, True), (True, True)])
def test_every_switch_combination_gives_logits_and_a_loss_in_both_modes(family, method, clc, cla):
    model = toy(family, method=method, keep=0.3, clc=clc, cla=cla)
    for training in (True, False):
        logits, loss = model.train(training)(IMAGES(), torch.tensor([0, 4]))  # one return shape everywhere
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert model(IMAGES())[1] is None  # no labels, no loss


def test_backbone_presets():
    cfg = create_model('deit3_base_patch16_224.fb_in1k', 3, clc=True, num_clr=2).cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.no_embed_class, cfg.init_values) == (768, 12, 12, True, 1e-6)
    deit3 = create_model('deit3_small_patch16_224', 3, img_size=64, clc=True, num_clr=2)
    assert deit3.pos_embed.shape == (1, 16, 384) and deit3.clr.shape == (1, 2, 384)  # CLR: no position rows
    vit = create_model('vit_small_patch32_224', 3, img_size=64, clc=True, num_clr=2)
    assert vit.pos_embed.shape == (1, 1 + 4 + 2, 384)  # CLS row, 2x2 grid, 2 CLR rows
    clip = create_model('vit_base_patch16_clip_224.laion2b', 3).cfg
    assert clip.pre_norm and clip.norm_eps == 1e-5 and clip.mean[0] == pytest.approx(0.4815, abs=1e-4)
    assert create_model('vit_base_patch16_224_miil.in21k', 3).blocks[0].attn.qkv.bias is None
    assert create_model('vit_base_patch16_224.orig_in21k', 3).cfg.mean == (0.5,) * 3
    assert create_model('vit_base_patch16_224.mae', 3).cfg.mean == (0.485, 0.456, 0.406)


def timm_keys(prefix_row=True, layerscale=False, pre_norm=False):
    """The parameter names and shapes of timm's ViT-B/16 (written out by hand from timm's files)."""
    D = 768
    keys = {'cls_token': (1, 1, D), 'pos_embed': (1, 196 + prefix_row, D), 'patch_embed.proj.weight': (D, 3, 16, 16),
            'norm.weight': (D,), 'norm.bias': (D,), 'head.weight': (1000, D), 'head.bias': (1000,)}
    if not pre_norm:
        keys['patch_embed.proj.bias'] = (D,)
    else:
        keys |= {'norm_pre.weight': (D,), 'norm_pre.bias': (D,)}
    for i in range(12):
        b = f'blocks.{i}.'
        keys |= {b + 'norm1.weight': (D,), b + 'norm1.bias': (D,), b + 'attn.qkv.weight': (3 * D, D),
                 b + 'attn.qkv.bias': (3 * D,), b + 'attn.proj.weight': (D, D), b + 'attn.proj.bias': (D,),
                 b + 'norm2.weight': (D,), b + 'norm2.bias': (D,), b + 'mlp.fc1.weight': (4 * D, D),
                 b + 'mlp.fc1.bias': (4 * D,), b + 'mlp.fc2.weight': (D, 4 * D), b + 'mlp.fc2.bias': (D,)}
        if layerscale:
            keys |= {b + 'ls1.gamma': (D,), b + 'ls2.gamma': (D,)}
    return keys


@pytest.mark.parametrize('backbone,kw', [('vit_base_patch16_224', {}), ('deit3_base_patch16_224', dict(prefix_row=False, layerscale=True)),
                                         ('vit_base_patch16_clip_224', dict(pre_norm=True))])
def test_parameter_names_and_shapes_are_timms(backbone, kw):
    with torch.device('meta'):
        model = create_model(backbone, 1000)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == timm_keys(**kw)


@pytest.mark.parametrize('kwargs,match', [
    (dict(backbone='resnet50'), 'unknown backbone'), (dict(img_size=30), 'multiple of patch_size'),
    (dict(keep=0.0), 'keep'), (dict(keep=1.5), 'keep'), (dict(loc=(3, 12)), 'loc'),
    (dict(loc=(6, 3)), 'loc'), (dict(keep=(0.5, 0.5)), 'one per location'),
    (dict(clc=True, num_clr=0, clc_gap=False), 'carry'), (dict(method='tome2'), 'unknown reduction'),
])
def test_bad_configuration_is_refused_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy(**kwargs)


def test_clc_recovers_plus_6_6_6_2_and_caches_gap_and_the_last_token():
    model = toy(method='evit', keep=0.5, clc=True).eval()
    with torch.no_grad():
        _, seen = trace(model, IMAGES())
    ins, outs = [s[0].x for s in seen], [s[1].x for s in seen]
    for i in range(11):  # the sequence only grows between blocks at the recovery layers 3, 6, 9, 10
        assert ins[i + 1].shape[1] - outs[i].shape[1] == {3: 6, 6: 6, 9: 6, 10: 2}.get(i, 0)
    gap = lambda x, n: x[:, 1:n].mean(1)
    # blocks 0-2: GAP over the 64 patches (CLS and CLR excluded), and the CLR token (last)
    want = torch.stack([f(outs[i]) for i in range(3) for f in (lambda x: gap(x, 65), lambda x: x[:, -1])], 1)
    torch.testing.assert_close(ins[4][:, -6:], want)
    # blocks 3-5: GAP over the tokens that survived block 3; the last token after the recovery at
    # block 3 is the carrier recovered from block 2's cache, a copy block 3 never processed
    n3 = outs[3].shape[1]
    want = torch.stack([gap(outs[3], n3), outs[2][:, -1], gap(outs[4], n3), outs[4][:, -1],
                        gap(outs[5], n3), outs[5][:, -1]], 1)
    torch.testing.assert_close(ins[7][:, -6:], want)
    n9 = outs[9].shape[1]
    torch.testing.assert_close(ins[11][:, -2:], torch.stack([gap(outs[9], n9), outs[8][:, -1]], 1))


def test_clc_without_reduction_only_lengthens_the_sequence():
    with torch.device('meta'):
        model = create_model('vit_base_patch16_224', 10, img_size=448, clc=True)
    _, seen = trace(model.eval(), torch.empty(1, 3, 448, 448, device='meta'))
    assert seen[0][0].x.shape[1] == 786 and seen[11][0].x.shape[1] == 806


def test_cla_reads_the_raw_cls_of_the_reduction_layers_and_the_last_block():
    model = toy(method='evit', keep=0.25, clc=True, cla=True).eval()
    got = []
    model.ifa_head.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    with torch.no_grad():
        _, seen = trace(model, IMAGES())
    want = torch.stack([seen[i][1].x[:, 0] for i in (3, 6, 9, 11)], -1)  # (B, D, 4)
    assert torch.equal(got[0], want)
    assert not hasattr(model, 'norm') and not hasattr(model, 'head')  # the final LayerNorm is unused


@pytest.mark.parametrize('method', ['evit', 'tome', 'ats', 'patchmerger', 'sit', 'dynamicvit'])
def test_batched_eval_equals_one_image_at_a_time(method):
    model = toy(method=method, keep=0.1, clc=True, cla=True).eval()
    images = IMAGES(4)
    with torch.no_grad():
        batched = model(images)[0]
        single = torch.cat([model(images[i:i + 1])[0] for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('family,method', [('vit', 'evit'), ('deit3', 'evit'), ('clip', 'evit'), ('vit', 'tome'),
                                           ('vit', 'patchmerger'), ('vit', 'sit'), ('vit', 'dpcknn'),
                                           ('vit', 'dynamicvit'), ('vit', 'ats')])
def test_a_training_step_reaches_every_trainable_parameter(family, method):
    model = toy(family, method=method, keep=0.25, clc=True, cla=True).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, loss = model(IMAGES(4), torch.tensor([0, 1, 2, 3]))  # DynamicViT's predictor learns from its ratio loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


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
    assert read_checkpoint(tmp_path / 'moco.pth.tar').keys() == sd.keys()
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


PAPER_GMACS = [  # the paper's cost of ViT-B/16 + EViT at loc (3, 6, 9), in GMACs: (size, keep, base, CLCA)
    (448, 1.0, 78.49, 79.48), (448, 0.7, 50.16, 50.85), (448, 0.5, 38.20, 38.76), (448, 0.25, 28.55, 28.98),
    (448, 0.1, 24.79, 25.17), (224, 1.0, 17.56, 18.36), (224, 0.1, 5.63, 5.96),
]


@pytest.mark.parametrize('size,keep,base,clca', PAPER_GMACS)
def test_gmacs_reproduce_the_paper_table(size, keep, base, clca):
    for on, want in ((False, base), (True, clca)):
        with torch.device('meta'):
            model = create_model('deit_base_patch16_224', 200, img_size=size, method='evit', keep=keep, clc=on, cla=on)
        assert gmacs(model) == pytest.approx(want, abs=0.01)


def test_config_keeps_a_single_rate_as_a_tuple():
    assert ModelConfig(keep=0.5).keep == (0.5,) and ModelConfig(keep=[0.5, 0.4, 0.3]).keep == (0.5, 0.4, 0.3)


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
