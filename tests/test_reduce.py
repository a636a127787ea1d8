import math

import pytest
import torch

from conftest import tiny, trace
from model import Attention, backbone_config
from reduce import Tokens, build_reducers, cls_attention, evit


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
    torch.testing.assert_close(cls_attention(q, k), attn[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)


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
    """Sequence length after each block, from the keep rule of DESIGN Sec. 3 and the recovery of Sec. 4."""
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
    model = tiny(method=method, keep=keep, loc=loc, cla=clc['clc'], **clc).eval()
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
    assert len(build_reducers('evit', (1.0,), 3)) == 0
    assert len(build_reducers('evit', (0.5,), 0)) == 0
    assert len(build_reducers('none', (0.5,), 3)) == 0
    assert len(build_reducers('topk', (0.5, 1.0), 2)) == 2
    t = Tokens(x=torch.randn(1, 9, 4), idx=torch.arange(9)[None])
    assert evit(t, torch.rand(1, 9), 1.0) is t
    model = tiny(method='evit', keep=(0.5, 1.0, 0.5)).eval()
    with torch.no_grad():
        _, seen = trace(model, torch.randn(1, 3, 32, 32))
    assert [seen[i][1].x.shape[1] for i in (3, 6, 9)] == [1 + 32 + 1, 1 + 32 + 1, 1 + 17 + 1]
    with pytest.raises(ValueError, match='unknown reduction method'):
        build_reducers('magic', (0.5,), 3)
