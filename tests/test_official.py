"""Each reduction method against the paper's code, re-written here independently in the reference's
own style (explicit attention, its token bookkeeping and count rules), eval mode, with CLC and CLA.
EViT has its own twin in test_model.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from model import load_weights

P, D, HEADS, DEPTH, LOC, NUM_CLR = 64, 48, 3, 12, (3, 6, 9), 1


def block_parts(sd, i):
    w = lambda n: sd[f'blocks.{i}.{n}']
    ln = lambda x, n: F.layer_norm(x, (D,), w(n + '.weight'), w(n + '.bias'), 1e-6)

    def attention(x, bias=None):
        B, N, _ = x.shape
        q, k, v = F.linear(ln(x, 'norm1'), w('attn.qkv.weight'), w('attn.qkv.bias')).reshape(
            B, N, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        logits = (q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1)
        attn = (logits if bias is None else logits + bias).softmax(-1)
        out = F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), w('attn.proj.weight'), w('attn.proj.bias'))
        return out, attn, k, v

    def mlp(x):
        return F.linear(F.gelu(F.linear(ln(x, 'norm2'), w('mlp.fc1.weight'), w('mlp.fc1.bias'))),
                        w('mlp.fc2.weight'), w('mlp.fc2.bias'))
    return attention, mlp


def tome_merge(x, size, metric, r):
    """The reference's bipartite soft matching with class token, then its size-weighted merge."""
    r = min(r, (metric.shape[1] - 1) // 2)
    if r <= 0:
        return x, size
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[..., ::2, :] @ m[..., 1::2, :].transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :].sort(dim=1)[0], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        return torch.cat([unm, dst.scatter_add(-2, dst_idx.expand(n, r, c), src)], dim=1)
    new_size = merge(size)
    return merge(x * size) / new_size, new_size


def reference_forward(sd, images, method, keep):
    B = images.shape[0]
    x = F.conv2d(images, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=4).flatten(2).transpose(1, 2)
    x = torch.cat([sd['cls_token'].expand(B, -1, -1), x, sd['clr'].expand(B, -1, -1)], 1) + sd['pos_embed']
    counts = [int(P * keep ** (s + 1)) for s in range(len(LOC))]
    prev, size, protected = P, None, NUM_CLR
    prev_decision = torch.ones(B, x.shape[1] - 1, 1)
    cache, cls_list, curr, recovery = [], [], x.shape[1] - NUM_CLR, list(LOC) + [DEPTH - 2]
    for i in range(DEPTH):
        attention, mlp = block_parts(sd, i)
        s = LOC.index(i) if i in LOC else None
        if s is not None and method in ('patchmerger', 'sit'):  # cluster_layers before the block
            c = f'cluster_layers.{s}.'
            if method == 'patchmerger':
                h = F.layer_norm(x[:, 1:], (D,), sd[c + 'norm.weight'], sd[c + 'norm.bias'], 1e-5)
                merged = (sd[c + 'queries'] @ h.transpose(-1, -2)).softmax(-1) @ h
            else:
                h = F.layer_norm(x[:, 1:], (D,), sd[c + 'weight.0.weight'], sd[c + 'weight.0.bias'], 1e-5)
                h = F.linear(F.gelu(F.linear(h, sd[c + 'weight.1.weight'], sd[c + 'weight.1.bias'])),
                             sd[c + 'weight.3.weight'], sd[c + 'weight.3.bias'])
                merged = torch.bmm(F.softmax(h * sd[c + 'scale'], dim=1).transpose(2, 1), x[:, 1:])
            x = torch.cat([x[:, :1], merged], 1)
        if s is not None and method == 'dpcknn':  # cluster_layers before the block; CLS and the suffix stay
            c, xs = f'cluster_layers.{s}.', x[:, 1:-protected]
            weight = F.linear(xs, sd[c + 'score.weight'], sd[c + 'score.bias']).exp()
            dist = torch.cdist(xs, xs) / D ** 0.5
            density = (-(dist.topk(k=5, dim=-1, largest=False)[0] ** 2).mean(dim=-1)).exp()
            density = density + torch.rand(density.shape) * 1e-6
            mask = (density[:, None, :] > density[:, :, None]).float()
            dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
            centres = ((dist * mask + dist_max * (1 - mask)).min(dim=-1)[0] * density).topk(k=counts[s], dim=-1)[1]
            cluster = torch.stack([dist[b][centres[b]] for b in range(B)]).argmin(dim=1)
            for b in range(B):
                cluster[b, centres[b]] = torch.arange(counts[s])
            flat = (cluster + torch.arange(B)[:, None] * counts[s]).reshape(-1)
            total = torch.zeros(B * counts[s], 1).index_add_(0, flat, weight.reshape(-1, 1)) + 1e-6
            norm = weight.reshape(-1, 1) / total[flat]
            merged = torch.zeros(B * counts[s], D).index_add_(0, flat, xs.reshape(-1, D) * norm).reshape(B, -1, D)
            x = torch.cat([x[:, :1], merged, x[:, -protected:]], 1)
        if s is not None and method == 'dynamicvit':  # score_predictor before the block, eval
            c = f'score_predictor.{s}.'
            h = F.gelu(F.linear(F.layer_norm(x[:, 1:], (D,), sd[c + 'in_conv.0.weight'], sd[c + 'in_conv.0.bias'], 1e-5),
                                sd[c + 'in_conv.1.weight'], sd[c + 'in_conv.1.bias']))
            glob = (h[:, :, D // 2:] * prev_decision).sum(1, keepdim=True) / prev_decision.sum(1, keepdim=True) + 1e-6
            h = torch.cat([h[:, :, :D // 2], glob.expand(-1, h.shape[1], -1)], -1)
            for j in (0, 2):
                h = F.gelu(F.linear(h, sd[c + f'out_conv.{j}.weight'], sd[c + f'out_conv.{j}.bias']))
            score = F.linear(h, sd[c + 'out_conv.4.weight'], sd[c + 'out_conv.4.bias']).log_softmax(-1)[:, :, 0]
            keep_policy = score.argsort(dim=1, descending=True)[:, :int((score.shape[1] - 1) * keep)]
            x = torch.cat([x[:, :1], torch.stack([x[b, 1:][keep_policy[b]] for b in range(B)])], 1)
            prev_decision = torch.stack([prev_decision[b][keep_policy[b]] for b in range(B)])
        bias = None if size is None else size.log()[:, None, None, :, 0]
        out, attn, k, v = attention(x, bias)
        if s is not None and method == 'ats':  # B = 1: no padding, nothing masked
            K = counts[s] + 1
            steps = torch.arange(1 / (2 * K), (2 * K - 1) / (2 * K), 2 / (2 * K))
            sig = (attn[:, :, 0, 1:] * v[:, :, 1:].norm(dim=-1)).sum(1)
            cdf = (sig / (sig.sum(-1, keepdim=True) + 1e-6)).cumsum(1)
            ids = torch.cdist(steps[None, :, None], cdf[:, :, None]).argmin(-1) + 1
            ids = F.pad(torch.unique(ids[0], sorted=True)[None], (1, 0), value=0)
            x = x[:, ids[0]] + attn[:, :, ids[0]].matmul(v).transpose(1, 2).reshape(B, -1, D).matmul(
                sd[f'blocks.{i}.attn.proj.weight'].T) + sd[f'blocks.{i}.attn.proj.bias']
        else:
            x = x + out
        if s is not None and method == 'tome':
            x, size = tome_merge(x, torch.ones_like(x[..., :1]) if size is None else size, k.mean(1), prev - counts[s])
            prev = counts[s]
        x = x + mlp(x)
        if i in recovery:
            curr = x.shape[1]
            carried = torch.cat(cache, 1)
            x, cache = torch.cat([x, carried], 1), []
            if size is not None:
                size = torch.cat([size, torch.ones(B, carried.shape[1], 1)], 1)
            prev_decision = torch.cat([prev_decision, torch.zeros(B, carried.shape[1], 1)], 1)
            protected += carried.shape[1]
        if i < recovery[-1]:
            cache.append(torch.cat([x[:, 1:curr].mean(1, keepdim=True), x[:, -NUM_CLR:]], 1))
        if i in LOC or i == DEPTH - 1:
            cls_list.append(x[:, 0])
    bn = lambda t, n: F.batch_norm(t, sd[n + 'running_mean'], sd[n + 'running_var'], sd[n + 'weight'], sd[n + 'bias'])
    h = F.conv1d(bn(torch.stack(cls_list, -1), 'ifa_head.0.0.'), sd['ifa_head.0.1.weight'], sd['ifa_head.0.1.bias'],
                 stride=len(cls_list), groups=D)
    h = F.gelu(bn(h, 'ifa_head.0.2.'))
    return F.conv1d(h, sd['ifa_head.0.4.weight'], sd['ifa_head.0.4.bias']).flatten(1)


@pytest.mark.parametrize('method,keep,batch', [('tome', 0.5, 2), ('ats', 0.5, 1), ('patchmerger', 0.3, 2),
                                               ('sit', 0.3, 2), ('dpcknn', 0.3, 2), ('dynamicvit', 0.5, 2)])
def test_official_checkpoints_give_the_official_outputs(method, keep, batch):
    ours = tiny(method=method, keep=keep, clc=True, cla=True).eval()
    sd = {k: torch.randn_like(v) * 0.3 if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    sd = sd | {k: v.abs() + 0.5 for k, v in sd.items() if k.endswith('running_var')}
    official = {k.replace('reducers.', 'score_predictor.' if method == 'dynamicvit' else 'cluster_layers.'): v
                for k, v in sd.items()}
    assert load_weights(ours, {'model': official}, verbose=False)[0] == []
    images = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(7)  # DPC-KNN's tie-breaking noise: the same draws on both sides
        mine = ours(images)
        torch.manual_seed(7)
        torch.testing.assert_close(mine, reference_forward(official, images, method, keep), atol=2e-4, rtol=2e-4)
