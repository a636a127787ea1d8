import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import toy, trace
from model import Attention, backbone_config
from reduce import METHODS, DecidedTokens, Tokens, build_reducers, cls_attention, evit, tome

ROOT = Path(__file__).resolve().parents[1]


def full_attention(q, k, v):
    """The textbook path: the whole N x N attention matrix, materialised."""
    attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, N, N)
    return attn, attn @ v


def test_cls_row_scores_and_fused_attention_match_the_full_matrix():
    attn_mod = Attention(backbone_config('vit_tiny_patch16_224', embed_dim=48, num_heads=3))
    x = torch.randn(2, 17, 48)
    out, (q, k, v) = attn_mod(x)
    attn, ref = full_attention(q, k, v)
    ref = attn_mod.proj(ref.transpose(1, 2).reshape(2, 17, 48))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_attention(q, k), attn[:, :, 0], atol=1e-6, rtol=1e-5)


def test_evit_keeps_the_top_scores_in_order_and_fuses_the_rest_by_score():
    B, N, D, keep = 3, 11, 8, 0.35
    x = torch.randn(B, N, D)
    t = Tokens(x=x, idx=torch.arange(N).expand(B, -1))
    score = torch.rand(B, N).softmax(-1)
    out = evit(t, score, keep)
    k = math.ceil(keep * (N - 1))
    assert out.x.shape == (B, 1 + k + 1, D)
    for b in range(B):
        order = sorted(range(1, N), key=lambda j: -score[b, j].item())
        kept, dropped = order[:k], order[k:]
        assert out.idx[b].tolist() == [0] + kept + [-1]
        torch.testing.assert_close(out.x[b, 1:1 + k], x[b, kept])
        fused = sum(score[b, j] * x[b, j] for j in dropped)  # a weighted sum, not an average
        torch.testing.assert_close(out.x[b, -1], fused, atol=1e-6, rtol=1e-5)
    topk = evit(t, score, keep, fuse=False)
    assert topk.x.shape == (B, 1 + k, D) and torch.equal(topk.x, out.x[:, :-1])


def test_evit_leaves_the_sequence_alone_when_the_count_rounds_up_to_everything():
    t = Tokens(x=torch.randn(1, 5, 4), idx=torch.arange(5)[None])
    assert evit(t, torch.rand(1, 5), 0.9) is t  # ceil(0.9 * 4) = 4: nothing to drop


def expected_lengths(num_tokens, keeps, fuse, loc, depth, clc=False, num_clr=0, gap=True, last=True):
    """Sequence length after each block, from EViT's keep rule and the cache's recoveries (+6, +6, +6, +2)."""
    n, out, pending = num_tokens, [], 0
    recovery = sorted(set(loc) | ({depth - 2} if last else set())) if clc else []
    for i in range(depth):
        if i in loc:
            k = math.ceil(keeps[loc.index(i)] * (n - 1))
            if k < n - 1:
                n = 1 + k + fuse
        if i in recovery:
            n, pending = n + pending, 0
        if clc and i < recovery[-1]:
            pending += gap + num_clr
        out.append(n)
    return out


@pytest.mark.parametrize('method,keep,loc', [
    ('evit', (0.1,), (3, 6, 9)), ('evit', (0.5,), (3, 6, 9)), ('topk', (0.7,), (3, 6, 9)),
    ('evit', (0.5, 0.9, 0.3), (2, 5, 8)), ('topk', (0.25,), (0, 11)),
])
@pytest.mark.parametrize('clc', [dict(clc=False), dict(clc=True), dict(clc=True, num_clr=2, clc_gap=False),
                                 dict(clc=True, num_clr=0, clc_last=False)])
def test_token_counts_follow_the_keep_rule_and_cls_survives(method, keep, loc, clc):
    model = toy(method=method, keep=keep, loc=loc, cla=clc['clc'], **clc).eval()
    with torch.no_grad():
        _, seen = trace(model, torch.randn(2, 3, 32, 32))
    keeps = keep * len(loc) if len(keep) == 1 else keep
    on, num_clr = clc['clc'], clc.get('num_clr', 1) * clc['clc']
    want = expected_lengths(1 + 64 + num_clr, keeps, method == 'evit', loc, 12, on, num_clr,
                            clc.get('clc_gap', True), clc.get('clc_last', True))
    # the length a block hands to the next one, CLC recovery included
    assert [seen[i + 1][0].x.shape[1] for i in range(11)] == want[:11]
    for _, out in seen:
        assert (out.idx[:, 0] == 0).all()  # CLS is position 0 after every block
        real = out.idx[out.idx > 0]
        assert (real <= 64).all() and out.idx.shape[1] == out.x.shape[1]
        for b in range(2):  # no patch is duplicated
            ids = out.idx[b][out.idx[b] > 0]
            assert ids.unique().numel() == ids.numel()


def test_keep_one_or_no_locations_means_no_reduction():
    cfg = lambda **kw: backbone_config('vit_tiny_patch16_224', img_size=32, patch_size=4, **kw)
    assert len(build_reducers(cfg(method='evit', keep=1.0))) == 0
    assert len(build_reducers(cfg(method='evit', keep=0.5, loc=()))) == 0
    assert len(build_reducers(cfg(method='none', keep=0.5))) == 0
    assert len(build_reducers(cfg(method='topk', keep=(0.5, 1.0), loc=(3, 6)))) == 2
    t = Tokens(x=torch.randn(1, 9, 4), idx=torch.arange(9)[None])
    assert evit(t, torch.rand(1, 9), 1.0) is t
    model = toy(method='evit', keep=(0.5, 1.0, 0.5)).eval()
    with torch.no_grad():
        _, seen = trace(model, torch.randn(1, 3, 32, 32))
    assert [seen[i][1].x.shape[1] for i in (3, 6, 9)] == [1 + 32 + 1, 1 + 32 + 1, 1 + 17 + 1]
    with pytest.raises(ValueError, match='unknown reduction method'):
        build_reducers(cfg(method='magic', keep=0.5))


def random_tokens(B, N, D, sizes=False):
    t = Tokens(x=torch.randn(B, N, D), idx=torch.arange(N).expand(B, -1).clone())
    return replace(t, size=torch.randint(1, 4, (B, N, 1)).float()) if sizes else t


def test_tome_with_r_zero_is_the_identity():
    t = random_tokens(2, 9, 4)
    assert tome(t, torch.randn(2, 9, 4), 0) is t


@pytest.mark.parametrize('sizes', [False, True])
def test_tome_keeps_cls_first_and_preserves_the_size_weighted_sum(sizes):
    B, N, D, r = 3, 12, 6, 4
    t = random_tokens(B, N, D, sizes)
    out = tome(t, torch.randn(B, N, D), r)
    size_in = t.size if sizes else torch.ones(B, N, 1)
    assert out.x.shape == (B, N - r, D) and out.size.shape == (B, N - r, 1)
    assert (out.idx[:, 0] == 0).all() and torch.equal(out.x[:, 0], t.x[:, 0]) and (out.size[:, 0] == size_in[:, 0]).all()
    torch.testing.assert_close(out.size.sum(1), size_in.sum(1))                      # no token lost
    torch.testing.assert_close((out.x * out.size).sum(1), (t.x * size_in).sum(1))    # mass preserved
    assert (out.idx[:, -(N // 2):] == t.idx[:, 1::2]).all()  # set B follows, in order


def test_tome_merges_the_most_similar_pair_into_its_partner():
    x = torch.randn(1, 7, 4)
    metric = torch.randn(1, 7, 4)
    metric[0, 4] = metric[0, 1] * 3  # A token 4 points exactly like B token 1: cosine 1, merged first
    out = tome(Tokens(x=x, idx=torch.arange(7)[None]), metric, 1)
    assert out.idx[0].tolist() == [0, 2, 6, 1, 3, 5]
    torch.testing.assert_close(out.x[0, 3], (x[0, 1] + x[0, 4]) / 2)
    assert out.size[0, :, 0].tolist() == [1, 1, 1, 2, 1, 1]


def test_tome_merges_at_most_half_per_layer():
    out = tome(random_tokens(1, 11, 4), torch.randn(1, 11, 4), 100)
    assert out.x.shape[1] == 11 - 5  # (N - 1) // 2 = 5


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    """log(size) in the logits: a token of size 2 weighs like two copies of itself."""
    attn_mod = Attention(backbone_config('vit_tiny_patch16_224', embed_dim=48, num_heads=3))
    x = torch.randn(1, 4, 48)
    t = replace(random_tokens(1, 4, 48), x=x, size=torch.tensor([[[1.], [2.], [1.], [3.]]]))
    out, _ = attn_mod(x, t.attend)
    dup, _ = attn_mod(x[:, [0, 1, 1, 2, 3, 3, 3]])
    torch.testing.assert_close(out, dup[:, [0, 1, 3, 4]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('keep', [0.1, 0.5, 0.7])
@pytest.mark.parametrize('clc', [False, True])
def test_tome_token_counts_follow_its_schedule_and_the_cap(keep, clc):
    model = toy(method='tome', keep=keep, clc=clc).eval()
    with torch.no_grad():
        _, seen = trace(model, torch.randn(2, 3, 32, 32))
    n, targets, before = 65 + clc, [int(64 * keep ** (s + 1)) for s in range(3)], 64
    for s, i in enumerate((3, 6, 9)):
        r = min(before - targets[s], (n - 1) // 2)  # a fixed r per stage, at most half the tokens
        n, before = n - r, targets[s]
        assert seen[i][1].x.shape[1] == n
        n += 6 * clc  # the recovered carriers
        assert (seen[i][1].idx[:, 0] == 0).all()


@pytest.mark.parametrize('method', ['patchmerger', 'sit'])
@pytest.mark.parametrize('clc', [False, True])
def test_pooling_methods_keep_cls_and_pool_into_the_scheduled_count(method, clc):
    model = toy(method=method, keep=0.1, clc=clc).eval()
    with torch.no_grad():
        _, seen = trace(model, torch.randn(2, 3, 32, 32))
    for s, i in enumerate((3, 6, 9)):
        k = int(64 * 0.1 ** (s + 1))  # 6, then 0 and 0: as in the reference, such a stage pools into nothing
        out = seen[i][1]  # the block pools its input first, then runs on [CLS, k pooled tokens]
        assert out.x.shape[1] == 1 + k and (out.idx[:, 0] == 0).all() and (out.idx[:, 1:] == -1).all()


def test_pooled_tokens_are_convex_combinations():
    from reduce import PatchMerger, SiT
    v = torch.randn(8)
    t = Tokens(x=torch.cat([torch.zeros(2, 1, 8), v.expand(2, 5, 8)], 1), idx=torch.arange(6).expand(2, -1))
    sit = SiT(8, 3)(t, None)
    torch.testing.assert_close(sit.x[:, 1:], v.expand(2, 3, 8))  # averages of equal tokens
    assert torch.equal(sit.x[:, 0], t.x[:, 0]) and sit.idx[:, 0].tolist() == [0, 0]  # CLS passes untouched
    pm = PatchMerger(8, 3)
    torch.testing.assert_close(pm(t, None).x[:, 1:], pm.norm(v).expand(2, 3, 8))  # of the normalised tokens


def test_dpc_knn_finds_separated_clusters_and_centres_join_their_own():
    from reduce import dpc_knn
    blobs = torch.tensor([[0., 0.], [10., 0.], [0., 10.]])
    x = (blobs.repeat_interleave(6, 0) + 0.1 * torch.randn(18, 2))[None]   # 3 blobs of 6 tokens
    assign, centres = dpc_knn(x, 3)
    groups = assign[0].view(3, 6)
    assert all(len(set(g.tolist())) == 1 for g in groups) and len(set(groups[:, 0].tolist())) == 3
    assert (assign[0, centres[0]] == torch.arange(3)).all()


def test_dpcknn_merges_the_patches_and_never_touches_the_protected_suffix():
    from reduce import DPCKNN
    B, D = 2, 8
    x = torch.randn(B, 1 + 10 + 3, D)
    t = Tokens(x=x, idx=torch.cat([torch.arange(11), torch.full((3,), -1)]).expand(B, -1), protected=3)
    out = DPCKNN(D, 4)(t, None)
    assert out.x.shape == (B, 1 + 4 + 3, D) and out.protected == 3
    assert torch.equal(out.x[:, 0], x[:, 0]) and torch.equal(out.x[:, -3:], x[:, -3:])
    assert (out.idx[:, 1:5] >= 1).all() and (out.idx[:, -3:] == -1).all()
    same = replace(t, x=torch.cat([x[:, :1], x[:, 1:2].expand(B, 10, D), x[:, -3:]], 1))
    torch.testing.assert_close(DPCKNN(D, 4)(same, None).x[:, 1:5], x[:, 1:2].expand(B, 4, D), atol=1e-4, rtol=1e-4)


def test_dpcknn_with_clc_protects_clr_and_every_recovered_token():
    model = toy(method='dpcknn', keep=0.25, clc=True).eval()
    with torch.no_grad():
        _, seen = trace(model, torch.randn(2, 3, 32, 32))
    for i, protected in ((3, 1), (6, 1 + 6), (9, 1 + 12)):  # CLR, then 6 more per recovery
        block_in, block_out = seen[i]
        assert block_in.protected == protected
        k = {3: 16, 6: 5, 9: 1}[i]  # int(64 * 0.25^(s+1)) = 16, 4, 1, and the reference's floor of 5 before the last
        assert block_out.x.shape[1] == 1 + k + protected


def test_dynamicvit_masked_attention_equals_attention_over_the_kept_tokens():
    attn_mod = Attention(backbone_config('vit_tiny_patch16_224', embed_dim=48, num_heads=3))
    x = torch.randn(2, 7, 48)
    decision = torch.tensor([1., 1, 0, 1, 0, 0, 1]).view(1, 7, 1).expand(2, -1, -1)
    t = DecidedTokens(x=x, idx=torch.arange(7).expand(2, -1), decision=decision, gated=True)
    masked, _ = attn_mod(x, t.attend)
    kept = [0, 1, 3, 6]
    alone, _ = attn_mod(x[:, kept])
    torch.testing.assert_close(masked[:, kept], alone, atol=1e-5, rtol=1e-4)
    dropped_alone, _ = attn_mod(x[:, [0, 1, 2, 3, 6]])  # a dropped token still attends to the kept ones and itself
    torch.testing.assert_close(masked[:, 2], dropped_alone[:, 2], atol=1e-5, rtol=1e-4)


def fixed_dynamicvit(monkeypatch, keep_scores):
    """DynamicViT with fixed keep log-probs and noise-free hard decisions."""
    from reduce import DynamicViT
    reducer = DynamicViT(8, target=0.5, num_patches=6, clc_rate=None, weight=2.0)
    logp = torch.stack([keep_scores, -keep_scores], -1).log_softmax(-1)
    monkeypatch.setattr(reducer, 'predict', lambda x, d: logp.expand(x.shape[0], -1, -1))
    monkeypatch.setattr(torch.nn.functional, 'gumbel_softmax',
                        lambda l, hard: torch.nn.functional.one_hot(l.argmax(-1), 2).to(l.dtype))
    return reducer


def test_dynamicvit_training_mask_and_eval_removal_keep_the_same_tokens(monkeypatch):
    scores = torch.tensor([2., -1, 3, -2, 1, -3])  # tokens 1, 3, 5 (positions after CLS) are kept
    reducer = fixed_dynamicvit(monkeypatch, scores)
    t = random_tokens(2, 7, 8)
    trained = reducer.train()(t, None)
    assert trained.x.shape == t.x.shape  # nothing removed in training
    masked = trained.decision[0, :, 0].nonzero().flatten().tolist()
    removed = reducer.eval()(t, None).idx[0].tolist()
    assert sorted(removed) == masked == [0, 1, 3, 5]
    assert trained.loss == pytest.approx(2.0 * (3 / 6 - 0.5) ** 2)


def test_dynamicvit_ratio_loss_is_the_squared_gap_to_the_target(monkeypatch):
    reducer = fixed_dynamicvit(monkeypatch, torch.tensor([1., 1, 1, 1, -1, -1]))  # keeps 4 of 6
    assert reducer.train()(random_tokens(3, 7, 8), None).loss == pytest.approx(2.0 * (4 / 6 - 0.5) ** 2)


@pytest.mark.parametrize('clc', [False, True])
def test_dynamicvit_eval_counts(clc):
    model = toy(method='dynamicvit', keep=0.5, clc=clc).eval()
    with torch.no_grad():
        _, seen = trace(model, torch.randn(2, 3, 32, 32))
    n = 65 + clc
    for s, i in enumerate((3, 6, 9)):
        k = int((n - 2) * 0.5) if clc else int(64 * 0.5 ** (s + 1))  # the reference's two rules
        assert seen[i][1].x.shape[1] == 1 + k
        n = 1 + k + 6 * clc


def ats_inputs(B, N, focus):
    """q, k, v with the CLS query attending (almost only) to the tokens in focus[b]; |v| = 1."""
    q = torch.zeros(B, 1, N, 4)
    q[:, :, 0, 0] = 30.0
    k = torch.zeros(B, 1, N, 4)
    for b, tokens in enumerate(focus):
        k[b, 0, tokens, 0] = torch.linspace(1.0, 0.95, len(tokens))  # unequal shares: no ties
    v = torch.nn.functional.normalize(torch.randn(B, 1, N, 4), dim=-1)
    return q, k, v


def test_ats_samples_by_inverse_transform_and_pads_per_image_counts():
    from reduce import ats
    B, N, K = 2, 9, 4
    t = random_tokens(B, N, 4)
    q, k, v = ats_inputs(B, N, [[3], [2, 5, 7]])  # image 0: all mass on token 3; image 1: spread over three
    out = ats(t, q, k, v, K)
    # the rule written out: cumulative significance, nearest token to each point (2i+1)/(2(K+1))
    want = []
    for b in range(B):
        attn = (q[b, 0, 0] @ k[b, 0].T * 0.5).softmax(-1)[1:]
        sig = attn * v[b, 0, 1:].norm(dim=-1)
        cdf = (sig / sig.sum()).cumsum(0).tolist()
        points = [(2 * i + 1) / (2 * (K + 1)) for i in range(K)]
        want.append([0] + sorted({1 + min(range(N - 1), key=lambda j: abs(cdf[j] - p)) for p in points}))
    width = max(map(len, want))
    assert len(want[0]) < len(want[1]) == width  # the images keep different numbers of tokens
    assert out.idx.tolist() == [w + [-1] * (width - len(w)) for w in want]
    assert out.valid.tolist() == [[True] * len(w) + [False] * (width - len(w)) for w in want]
    torch.testing.assert_close(out.x[0, len(want[0]):], t.x[0, :1].expand(width - len(want[0]), -1))  # CLS copies
    bias = out.attn_bias()
    assert bias.shape == (B, 1, 1, width) and torch.isinf(bias[0, 0, 0, len(want[0]):]).all() and (bias[1] == 0).all()


def test_ats_padding_is_invisible_to_attention_averages_and_sampling():
    from reduce import ats
    attn_mod = Attention(backbone_config('vit_tiny_patch16_224', embed_dim=48, num_heads=3))
    x = torch.randn(1, 6, 48)
    t = Tokens(x=x, idx=torch.arange(6)[None], valid=torch.tensor([[True, True, True, True, False, False]]))
    garbage = replace(t, x=torch.cat([x[:, :4], 100 * torch.randn(1, 2, 48)], 1))
    a, _ = attn_mod(t.x, t.attend)
    b, _ = attn_mod(garbage.x, garbage.attend)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # valid tokens never see the padding
    torch.testing.assert_close(t.mean(1, 6), x[:, 1:4].mean(1, keepdim=True))
    q, k, v = ats_inputs(1, 6, [[4, 5]])  # all CLS attention on the padding: it still cannot be sampled
    assert set(ats(t, q, k, v, 3).idx[0].tolist()) <= {-1, 0, 1, 2, 3}


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('training', [False, True])
def test_cls_is_never_removed_by_any_method(method, training):
    model = toy(method=method, keep=0.1, clc=True, cla=True).train(training)
    _, seen = trace(model, torch.randn(2, 3, 32, 32))
    for block_in, block_out in seen:
        assert (block_out.idx[:, 0] == 0).all() and (block_in.idx[:, 0] == 0).all()


def test_ats_uses_the_reference_sample_points_rounding_included():
    from reduce import ats
    B, N = 1, 400
    t = random_tokens(B, N, 4)
    q, k, v = ats_inputs(B, N, [list(range(1, N))])  # spread evenly: every point finds its own token
    assert ats(t, q, k, v, 32).x.shape[1] == 1 + 32
    assert ats(t, q, k, v, 196).x.shape[1] == 1 + 197  # the reference's arange yields one extra point here


def test_the_readme_reduction_registers_trains_and_keeps_cls_first(tmp_path, monkeypatch, small_leaves):
    """The README's example, as written, defined outside the project's files: it becomes a --method and trains."""
    import reduce
    import train
    from test_train import FAST  # a tiny run of the embedded data
    source = re.search(r'## Add your own reduction\n.*?```python\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)[1]
    monkeypatch.setitem(reduce.METHODS, 'random', None)  # removed again after the test
    exec(compile(source, 'random_keep.py', 'exec'), {'__name__': 'random_keep'})
    assert reduce.METHODS['random'].__name__ == 'RandomKeep'
    for clc in (False, True):
        model = toy(method='random', keep=0.3, clc=clc, cla=clc).train()
        _, seen = trace(model, torch.randn(2, 3, 32, 32))
        assert all((out.idx[:, 0] == 0).all() for _, out in seen)  # CLS first after every block
        assert seen[3][1].x.shape[1] < seen[3][0].x.shape[1]  # block 3 reduced: ceil(0.3 * (N - 1)) + CLS (+ cache)
        model(torch.randn(2, 3, 32, 32), torch.randint(5, (2,)))[1].backward()  # a training step's backward
        assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith('blocks.11'))
    metrics = train.main(FAST + ['--epochs', '1', '--method', 'random', '--out', str(tmp_path)])
    assert metrics['epoch'] == 1 and train.parse_args(['--method', 'random']).method == 'random'


@pytest.mark.parametrize('method', METHODS)
def test_each_method_builds_its_own_registered_reducer_at_every_location(method):
    reducers = toy(method=method, keep=0.5, clc=True, cla=True).reducers
    assert len(reducers) == 3 and all(type(r) is METHODS[method] for r in reducers)
