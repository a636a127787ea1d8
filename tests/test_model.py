import argparse

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import toy, trace
from eval import runtime_defaults
from model import ModelConfig, create_model, gmacs
from reduce import METHODS, varies_in_length

IMAGES = lambda n=2: torch.randn(n, 3, 32, 32)


@pytest.mark.parametrize('family', ['vit', 'deit3', 'clip', 'miil'])
@pytest.mark.parametrize('method', ['none', *METHODS])
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


@pytest.mark.long
@pytest.mark.parametrize('method,keep', [('none', 1.0)] + [(m, k) for m in METHODS  # a varying length breaks at any rate
                                                            for k in ((0.1,) if varies_in_length(m) else (0.1, 0.5))])
def test_every_method_compiles_without_graph_breaks_or_recompiles(method, keep):
    """torch.compile with the cheap aot_eager backend (dynamo's and autograd's tracing, no code generation) on a
    5-block toy, at keep 0.1, where the later stages of PatchMerger, SiT and DynamicViT keep no token, and at 0.5. A
    training step and an evaluation, twice: no graph break, and nothing compiled again in the second round. ATS,
    whose token counts vary per image, breaks the graph: it is the one method the defaults leave uncompiled."""
    torch._dynamo.reset()
    counters.clear()
    model = toy(method=method, keep=keep, clc=True, cla=True, depth=5, loc=(1, 2, 3))
    net = torch.compile(model, backend='aot_eager')
    images, labels = IMAGES(4), torch.randint(5, (4,))

    def step_and_evaluate():
        net.train()(images, labels)[1].backward()
        with torch.no_grad():
            net.eval()(images)
    net.train()(images, labels)
    breaks = sum(counters['graph_break'].values())
    defaults = argparse.Namespace(method=method, amp='off', compile=None, workers=0)
    runtime_defaults(defaults, torch.device('cuda'))
    assert defaults.compile == (breaks == 0), f'{method}: {breaks} graph breaks, compiled by default: {defaults.compile}'
    if breaks == 0:
        step_and_evaluate()
        with torch._dynamo.config.patch(error_on_recompile=True):
            step_and_evaluate()
