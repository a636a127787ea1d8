"""Every reduction method against the paper's code (arkel23/CLCA), eval mode, with and without CLCA.

`reference_forward` is our own formulation of what that code computes, written to be checked by
eye rather than to be fast: explicit attention matrices, per-image loops over tokens where the
reference gathers and scatters, and the reference's own count rules. One skeleton (embedding,
blocks, cache, heads) and one hook per method: `BEFORE` runs before a reduction block, `INSIDE`
replaces the attention residual of a reduction block.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import official_file, official_prefix, official_weights, toy
from reduce import METHODS
from weights import load_weights

P, D, HEADS, DEPTH, LOC, NUM_CLR, PATCH = 64, 48, 3, 12, (3, 6, 9), 1, 4


def linear(x, sd, name):
    return F.linear(x, sd[name + '.weight'], sd.get(name + '.bias'))


def layer_norm(x, sd, name, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), sd[name + '.weight'], sd[name + '.bias'], eps)


# --- hooks inside a reduction block: (state, stage, x, attention probabilities, keys, values, attend) -> x
# `attend(rows)` turns rows of the attention matrix (B, H, n, N) into the block's residual update (B, n, D).

def evit_inside(fuse):
    def inside(st, s, x, attn, k, v, attend):
        x = x + attend(attn)
        B, N, _ = x.shape
        left = math.ceil(st.keep * (N - 1))
        if left == N - 1:  # the reference leaves the block alone when nothing would go
            return x
        score = attn[:, :, 0, 1:].mean(1)  # CLS attention to each non-CLS token, heads averaged: (B, N-1)
        rows = []
        for b in range(B):
            ranked = sorted(range(N - 1), key=lambda j: -score[b, j].item())
            kept, dropped = ranked[:left], ranked[left:]
            row = [x[b, 0]] + [x[b, 1 + j] for j in kept]
            if fuse:  # one token: the score-weighted sum of everything dropped
                row.append(sum(score[b, j] * x[b, 1 + j] for j in dropped))
            rows.append(torch.stack(row))
        return torch.stack(rows)
    return inside


def ats_inside(st, s, x, attn, k, v, attend):
    """One image at a time only: the reference pads a batch its own way (see reduce.ats)."""
    assert x.shape[0] == 1
    n = st.counts[s] + 1  # the reference's sample count, and its own float arange of points
    points = torch.arange(1 / (2 * n), (2 * n - 1) / (2 * n), 2 / (2 * n)).tolist()
    significance = (attn[0, :, 0, 1:] * v[0, :, 1:].norm(dim=-1)).sum(0)  # (N-1,)
    cdf = (significance / (significance.sum() + 1e-6)).cumsum(0)
    rows = [0] + sorted({1 + int((cdf - p).abs().argmin()) for p in points})
    return x[:, rows] + attend(attn[:, :, rows])  # only the sampled rows of attention go on


def tome_inside(st, s, x, attn, k, v, attend):
    x = x + attend(attn)
    B, N, _ = x.shape
    before = P if s == 0 else st.counts[s - 1]
    r = min(before - st.counts[s], (N - 1) // 2)  # a fixed number per stage, at most half
    size = torch.ones(B, N, 1) if st.size is None else st.size
    metric = F.normalize(k.mean(1), dim=-1)  # keys averaged over heads: (B, N, hd)
    out_x, out_size = [], []
    for b in range(B):
        a_set, b_set = list(range(0, N, 2)), list(range(1, N, 2))
        partner = {}  # A token -> (cosine to its most similar B token, that B token)
        for a in a_set[1:]:  # CLS (position 0, in A) never merges
            sims = [float(metric[b, a] @ metric[b, j]) for j in b_set]
            partner[a] = (max(sims), b_set[sims.index(max(sims))])
        merged = sorted(partner, key=lambda a: -partner[a][0])[:r]
        mass = {j: x[b, j] * size[b, j] for j in b_set}
        weight = {j: size[b, j] for j in b_set}
        for a in merged:
            j = partner[a][1]
            mass[j], weight[j] = mass[j] + x[b, a] * size[b, a], weight[j] + size[b, a]
        rest = [a for a in a_set if a not in merged]
        out_x.append(torch.stack([x[b, a] for a in rest] + [mass[j] / weight[j] for j in b_set]))
        out_size.append(torch.stack([size[b, a] for a in rest] + [weight[j] for j in b_set]))
    st.size = torch.stack(out_size)
    return torch.stack(out_x)


INSIDE = {'evit': evit_inside(True), 'topk': evit_inside(False), 'ats': ats_inside, 'tome': tome_inside}


# --- hooks before a reduction block: (state, stage, x, weights of the stage) -> x

def patchmerger_before(st, s, x, w):
    h = layer_norm(x[:, 1:], w, 'norm', 1e-5)                      # everything but CLS, CLR included
    weights = (w['queries'] @ h.transpose(1, 2)).softmax(-1)        # (B, K, N-1), K may be 0
    return torch.cat([x[:, :1], weights @ h], 1)


def sit_before(st, s, x, w):
    h = linear(F.gelu(linear(layer_norm(x[:, 1:], w, 'weight.0', 1e-5), w, 'weight.1')), w, 'weight.3')
    weights = (h * w['scale']).softmax(1)                           # (B, N-1, K): over the tokens
    return torch.cat([x[:, :1], weights.transpose(1, 2) @ x[:, 1:]], 1)


def dpcknn_before(st, s, x, w):
    B, N, _ = x.shape
    xs = x[:, 1:N - st.protected]  # the CLR carrier and recovered tokens stay out
    M = xs.shape[1]
    K = max(st.counts[s], 1 if s == len(LOC) - 1 else 5)  # the reference's floors
    noise = torch.rand(B, M) * 1e-6  # the same draws as the model's tie-breaking noise
    weight = linear(xs, w, 'score').exp()[..., 0]                   # (B, M)
    merged = []
    for b in range(B):
        dist = torch.cdist(xs[b], xs[b]) / D ** 0.5
        near = [sorted(dist[i].tolist())[:5] for i in range(M)]  # the 5 nearest, itself included
        density = [math.exp(-sum(d ** 2 for d in near[i]) / len(near[i])) + noise[b, i].item() for i in range(M)]
        far = dist.max().item()
        delta = [min([dist[i, j].item() for j in range(M) if density[j] > density[i]], default=far) for i in range(M)]
        centres = sorted(range(M), key=lambda i: -delta[i] * density[i])[:K]
        cluster = [centres.index(i) if i in centres else min(range(K), key=lambda c: dist[centres[c], i].item())
                   for i in range(M)]
        total = [sum(weight[b, i] for i in range(M) if cluster[i] == c) + 1e-6 for c in range(K)]
        merged.append(torch.stack([sum(xs[b, i] * weight[b, i] / total[c] for i in range(M) if cluster[i] == c)
                                   for c in range(K)]))
    return torch.cat([x[:, :1], torch.stack(merged), x[:, N - st.protected:]], 1)


def dynamicvit_before(st, s, x, w):
    B, N, _ = x.shape
    h = F.gelu(linear(layer_norm(x[:, 1:], w, 'in_conv.0', 1e-5), w, 'in_conv.1'))
    local, glob = h[..., :D // 2], h[..., D // 2:]
    # when every earlier token was dropped the reference divides 0 by 0 here and ranks NaNs; both sides floor it
    glob = (glob * st.decision).sum(1, keepdim=True) / st.decision.sum(1, keepdim=True).clamp(min=1e-6) + 1e-6
    h = torch.cat([local, glob.expand_as(local)], -1)
    h = F.gelu(linear(F.gelu(linear(h, w, 'out_conv.0')), w, 'out_conv.2'))
    score = linear(h, w, 'out_conv.4').log_softmax(-1)[..., 0]     # (B, N-1) log-probability of keep
    count = int((N - 2) * st.keep) if st.clc else int(P * st.keep ** (s + 1))
    kept = [sorted(range(N - 1), key=lambda j: -score[b, j].item())[:count] for b in range(B)]
    st.decision = torch.stack([st.decision[b, kept[b]] for b in range(B)])
    return torch.cat([x[:, :1], torch.stack([x[b, 1:][kept[b]] for b in range(B)])], 1)


BEFORE = {'patchmerger': patchmerger_before, 'sit': sit_before, 'dpcknn': dpcknn_before,
          'dynamicvit': dynamicvit_before}


def block(sd, i, x, st, inside):
    p = f'blocks.{i}.'
    gain = lambda name, t: t * sd[p + name] if p + name in sd else t  # LayerScale, where the backbone has it
    B, N, _ = x.shape
    q, k, v = linear(layer_norm(x, sd, p + 'norm1'), sd, p + 'attn.qkv').reshape(B, N, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5         # (B, H, N, N)
    if st.size is not None:  # ToMe's proportional attention
        logits = logits + st.size.log()[:, None, None, :, 0]
    attn = logits.softmax(-1)
    attend = lambda rows: gain('ls1.gamma', linear((rows @ v).transpose(1, 2).reshape(B, rows.shape[2], D), sd, p + 'attn.proj'))
    x = inside(st, LOC.index(i), x, attn, k, v, attend) if inside else x + attend(attn)
    return x + gain('ls2.gamma', linear(F.gelu(linear(layer_norm(x, sd, p + 'norm2'), sd, p + 'mlp.fc1')), sd, p + 'mlp.fc2'))


def reference_forward(sd, images, method, keep, clc, cla, empty_mean='nan'):
    """Logits of the paper's model. `empty_mean='zero'` averages no tokens into 0 instead of NaN."""
    B = images.shape[0]
    x = F.conv2d(images, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=PATCH).flatten(2).transpose(1, 2)
    cls, clr = [sd['cls_token'].expand(B, -1, -1)], [sd['clr'].expand(B, -1, -1)] if clc else []
    if sd['pos_embed'].shape[1] == P:  # DeiT-3: no position rows for CLS and CLR
        x = torch.cat(cls + [x + sd['pos_embed']] + clr, 1)
    else:
        x = torch.cat(cls + [x] + clr, 1) + sd['pos_embed']
    st = SimpleNamespace(keep=keep, clc=clc, counts=[int(P * keep ** (s + 1)) for s in range(len(LOC))],
                         size=None, protected=NUM_CLR if clc else 0, decision=torch.ones(B, x.shape[1] - 1, 1))
    cache, cls_list, curr, recovery = [], [], x.shape[1] - (NUM_CLR if clc else 0), LOC + (DEPTH - 2,)
    for i in range(DEPTH):
        if i in LOC and method in BEFORE:
            prefix = f'{official_prefix(method)}.{LOC.index(i)}.'
            x = BEFORE[method](st, LOC.index(i), x, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        x = block(sd, i, x, st, INSIDE.get(method) if i in LOC else None)
        if clc and i in recovery:  # re-insert the carriers cached since the last recovery
            curr, carried = x.shape[1], torch.cat(cache, 1)
            x, cache = torch.cat([x, carried], 1), []
            st.protected += carried.shape[1]
            st.decision = torch.cat([st.decision, torch.zeros(B, carried.shape[1], 1)], 1)
            if st.size is not None:
                st.size = torch.cat([st.size, torch.ones(B, carried.shape[1], 1)], 1)
        if clc and i < recovery[-1]:  # cache [mean of the tokens that survived, the last token]
            gap = x[:, 1:curr].mean(1, keepdim=True)
            if curr == 1 and empty_mean == 'zero':
                gap = torch.zeros(B, 1, D)
            cache.append(torch.cat([gap, x[:, -NUM_CLR:]], 1))
        if i in LOC or i == DEPTH - 1:
            cls_list.append(x[:, 0])
    if not cla:
        return linear(layer_norm(x[:, 0], sd, 'norm'), sd, 'head')
    bn = lambda t, n: F.batch_norm(t, sd[n + 'running_mean'], sd[n + 'running_var'], sd[n + 'weight'], sd[n + 'bias'])
    h = F.conv1d(bn(torch.stack(cls_list, -1), 'ifa_head.0.0.'), sd['ifa_head.0.1.weight'], sd['ifa_head.0.1.bias'],
                 stride=len(cls_list), groups=D)
    return F.conv1d(F.gelu(bn(h, 'ifa_head.0.2.')), sd['ifa_head.0.4.weight'], sd['ifa_head.0.4.bias']).flatten(1)


# In these settings some stage keeps no token before a recovery, and the reference's cache averages
# that empty set into NaN logits; ours takes the mean of nothing as 0.
EMPTY_BEFORE_RECOVERY = {('ats', 0.1), ('patchmerger', 0.1), ('sit', 0.1), ('dynamicvit', 0.1)}


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('keep', [0.1, 0.25, 0.5])
@pytest.mark.parametrize('clca', [False, True])
def test_official_checkpoints_give_the_official_outputs(method, keep, clca):
    sd = official_weights(toy(method=method, keep=keep, clc=clca, cla=clca))
    ours = toy(method=method, keep=keep, clc=clca, cla=clca).eval()
    assert load_weights(ours, {'model': sd}, verbose=False) == ([], [])  # zero-size stages (K = 0) included
    images = torch.randn(1 if method == 'ats' else 2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(7)  # DPC-KNN's tie-breaking noise: the same draws on both sides
        mine, _ = ours(images)
        torch.manual_seed(7)
        theirs = reference_forward(sd, images, method, keep, clca, clca)
        torch.manual_seed(7)
        zero_mean = reference_forward(sd, images, method, keep, clca, clca, empty_mean='zero')
    assert torch.isfinite(theirs).all() == (not clca or (method, keep) not in EMPTY_BEFORE_RECOVERY)
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine, zero_mean if clca else theirs, atol=2e-4, rtol=2e-4)
    if torch.isfinite(theirs).all():
        torch.testing.assert_close(zero_mean, theirs)  # the rule changes nothing where the reference is finite


@pytest.mark.parametrize('family', ['vit', 'deit3'])
def test_an_official_training_checkpoint_loads_and_gives_the_official_outputs(tmp_path, family):
    """The whole file the paper's training script writes, LayerScale and DeiT-3's position rows included."""
    sd = official_weights(toy(family, method='evit', keep=0.3, clc=True, cla=True))
    official_file(tmp_path / 'official.pth', sd, model='evit_vit_tiny', keep_rate=[0.3], clc=True)
    model = toy(family, method='evit', keep=0.3, clc=True, cla=True).eval()
    assert load_weights(model, tmp_path / 'official.pth', verbose=False) == ([], [])  # the unused head is dropped
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images)[0], reference_forward(sd, images, 'evit', 0.3, True, True),
                                   atol=1e-4, rtol=1e-4)
