"""Token reduction methods, one small unit each (the reduction CLCA plugs into).

Every method plugs into the ViT through one interface, a `Reducer` module per reduction location:

    reducer(tokens, qkv) -> tokens

`tokens` is a `Tokens` record (the features plus, per token, where it came from). A reducer with
`before_block = False` runs inside the block, after attention and before the MLP, and receives
that block's attention inputs `qkv = (q, k, v)`, each (B, heads, N, head_dim): attention ran on
all N tokens, the MLP runs only on the survivors (EViT, Top-K, ToMe, ATS). A reducer with
`before_block = True` runs on the block's input and receives `qkv = None` (PatchMerger, SiT,
DPC-KNN, DynamicViT).

A method is a `Reducer` subclass registered in `METHODS`; the rest of the code reads its traits
(class attributes, see `Reducer`), never its name. A method that changes more of the ViT than
the token count does it through the tokens, never through model.py: ToMe's proportional
attention and ATS's padding through `Tokens.attn_bias`, DynamicViT's gated attention through
`DecidedTokens.attend`, its ratio loss through `Tokens.loss`.

The CLS token is always position 0 and is never removed. The keep rule differs per method in the
reference code; each reducer's docstring says which one it follows and why.
"""
import math
import warnings
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class Tokens:
    """The token sequence that flows through the blocks, CLS first.

    A reduction makes a new record with `select` (keep some rows), `append` (add made tokens at the end)
    or `dataclasses.replace` (anything else); every field it does not touch carries over.
    """
    x: torch.Tensor    # (B, N, D) features
    idx: torch.Tensor  # (B, N) position in the input sequence: 0 = CLS, 1..P = patches, -1 = made here
                       # (a CLR carrier, a fused, pooled or recovered token, ATS's padding)
    size: Optional[torch.Tensor] = None   # (B, N, 1) input tokens merged into each token (ToMe), else None
    protected: int = 0  # length of the suffix of appended tokens (CLR carriers, tokens recovered from the
                        # cache, EViT's fused token) that DPC-KNN leaves alone
    valid: Optional[torch.Tensor] = None  # (B, N) bool, False on ATS's padding, else None
    loss: torch.Tensor | float = 0.0      # training loss reductions add to the cross-entropy (DynamicViT's)
    source: Optional[torch.Tensor] = None  # (B, N, 1 + P) bool: the inputs each token holds, if traced

    def select(self, index: torch.Tensor) -> 'Tokens':
        """Keep the tokens at `index` (B, K), in that order. The result has no protected suffix: a
        selection reorders the tokens, so the kept ones are ordinary tokens from here on."""
        x = self.x.gather(1, index.unsqueeze(-1).expand(-1, -1, self.x.shape[-1]))  # (B, K, D)
        size = None if self.size is None else self.size.gather(1, index.unsqueeze(-1))  # (B, K, 1)
        valid = None if self.valid is None else self.valid.gather(1, index)              # (B, K)
        source = None if self.source is None else self.source.gather(
            1, index.unsqueeze(-1).expand(-1, -1, self.source.shape[-1]))                  # (B, K, 1 + P)
        return replace(self, x=x, idx=self.idx.gather(1, index), size=size, valid=valid, protected=0, source=source)

    def append(self, extra: torch.Tensor, source: Optional[torch.Tensor] = None) -> 'Tokens':
        """Append made tokens `extra` (B, M, D) at the end, into the protected suffix; each one is a single
        token (size 1) and never padding, and holds the input tokens `source` (B, M, 1 + P), else none."""
        B, M, _ = extra.shape
        source = None if self.source is None else torch.cat(  # (B, N + M, 1 + P)
            [self.source, self.source.new_zeros(B, M, self.source.shape[-1]) if source is None else source], 1)
        size = None if self.size is None else torch.cat([self.size, self.size.new_ones(B, M, 1)], 1)
        valid = None if self.valid is None else F.pad(self.valid, (0, M), value=True)
        idx = torch.cat([self.idx, self.idx.new_full((B, M), -1)], 1)                  # (B, N + M)
        return replace(self, x=torch.cat([self.x, extra], 1), idx=idx, size=size, valid=valid,
                       protected=self.protected + M, source=source)

    def attn_bias(self) -> Optional[torch.Tensor]:
        """Added to the attention logits, (B, 1, 1, N) or None: log(size), ToMe's proportional
        attention, and -inf on ATS's padding, which no token may attend to."""
        if self.valid is not None:
            return torch.zeros_like(self.valid, dtype=self.x.dtype).masked_fill(~self.valid, -math.inf)[:, None, None]
        return None if self.size is None else self.size.log().to(self.x.dtype).transpose(1, 2).unsqueeze(1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """How these tokens attend to each other: q, k, v (B, H, N, hd) -> (B, H, N, hd). The fused
        kernel, with `attn_bias`; DynamicViT's training tokens override it."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_bias())

    def mean(self, start: int, end: int) -> torch.Tensor:
        """Mean of the tokens at positions start..end-1, padding left out: (B, 1, D)."""
        x = self.x[:, start:end]
        if x.shape[1] == 0:  # the reference's mean of no tokens is NaN, which spreads to the logits: 0 here
            return self.x.new_zeros(x.shape[0], 1, x.shape[2])
        if self.valid is None:
            return x.mean(1, keepdim=True)
        valid = self.valid[:, start:end, None].to(x.dtype)                              # (B, M, 1)
        return (x * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)


def cls_attention(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention probabilities of the CLS query over all N keys, per head: (B, H, N).

    Only the CLS row of the attention matrix is computed, O(N*D) instead of O(N^2*D), so the block
    itself can use the fused attention kernel, which never exposes its probabilities.
    """
    logits = q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, 1, N)
    if bias is not None:
        logits = logits + bias                                           # (B, 1, 1, N) broadcast
    return logits.float().softmax(-1).squeeze(2)                         # (B, H, N)


def evit(t: Tokens, cls_attn: torch.Tensor, keep: float, fuse: bool = True) -> Tokens:
    """EViT (Liang et al., ICLR 2022): keep the tokens the CLS token attends to most.

    t: N tokens; cls_attn (B, N): CLS attention probabilities over all N keys (heads averaged);
    keep: a rate. Returns [CLS, the ceil(keep * (N - 1)) best-scored tokens in descending score order,
    and with `fuse` one extra token, the score-weighted sum of all the others]. `fuse=False` is
    Top-K, EViT's ablation without the fused token.

    Follows the reference code in:
    - the rate applies to the current non-CLS tokens (EViT's own rule), not to a schedule over patches;
    - nothing happens when the count rounds up to all tokens;
    - the fused token is a weighted sum, not an average (the scores of the dropped tokens need not sum to 1).
    """
    B, N, D = t.x.shape
    num_kept = math.ceil(keep * (N - 1))  # same float expression as the reference: same counts
    if num_kept >= N - 1:
        return t
    score = cls_attn[:, 1:]                                                   # (B, N-1)
    top = score.topk(num_kept, dim=1).indices                                 # (B, K) best first
    survivors = t.select(torch.cat([top.new_zeros(B, 1), top + 1], 1))        # (B, 1+K) rows, CLS first
    if not fuse:
        return survivors
    dropped = score.scatter(1, top, 0.0).to(t.x.dtype)                        # (B, N-1) 0 where kept
    held = None if t.source is None else (t.source[:, 1:] & (dropped > 0)[..., None]).any(1, keepdim=True)
    return survivors.append(dropped.unsqueeze(1) @ t.x[:, 1:], held)          # fused: (B, 1, D)


def tome(t: Tokens, metric: torch.Tensor, r: int) -> Tokens:
    """ToMe (Bolya et al., ICLR 2023): merge the r most redundant tokens by bipartite soft matching.

    t: N tokens; metric (B, N, C): what similarity is measured on (the keys, heads averaged); r: how
    many tokens to merge away. Returns N - r tokens [unmerged A in position order, all of B], CLS first,
    with `size` counting the input tokens in each. Tokens alternate into sets A (even positions, CLS
    among them) and B (odd); each A token's best B partner is its most similar by cosine; the r A
    tokens with the best matches are merged into their partners by a size-weighted average. CLS never
    merges; a merged token keeps its B partner's `idx`. Builds the (N/2 x N/2) similarity matrix.

    Follows the reference code in:
    - at most (N - 1) // 2 tokens go per call, so below keep 0.5 ToMe removes fewer tokens than its
      schedule asks and stays costlier than EViT.
    Differs from the paper:
    - the similarity is computed in fp32 (in bf16 many cosines tie).
    """
    B, N, D = t.x.shape
    r = min(r, (N - 1) // 2)
    if r <= 0:
        return t
    with torch.no_grad():
        m = metric.float() / metric.float().norm(dim=-1, keepdim=True)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)        # (B, Na, Nb) cosine similarity A -> B
        scores[:, 0] = -math.inf                                  # CLS (A's first token) stays
        best, partner = scores.max(-1)                            # (B, Na)
        order = best.argsort(-1, descending=True)                 # (B, Na) most redundant first
        unmerged = order[:, r:].sort(-1).values                   # (B, Na - r) back in position order
        src, dst = order[:, :r], partner.gather(1, order[:, :r])  # (B, r) A rows into B rows
    size = t.size if t.size is not None else t.x.new_ones(B, N, 1)

    def merge(v):  # v (B, N, C) -> (B, N - r, C): sums, so sizes and size-weighted features add up
        a, b = v[:, ::2], v[:, 1::2]
        stay = a.gather(1, unmerged.unsqueeze(-1).expand(-1, -1, v.shape[-1]))  # (B, Na - r, C)
        moved = a.gather(1, src.unsqueeze(-1).expand(-1, -1, v.shape[-1]))      # (B, r, C)
        return torch.cat([stay, b.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, v.shape[-1]), moved)], 1)

    new_size = merge(size)
    idx = torch.cat([t.idx[:, ::2].gather(1, unmerged), t.idx[:, 1::2]], 1)  # (B, N - r)
    source = None if t.source is None else merge(t.source.float()) > 0     # a merged token holds both
    return replace(t, x=merge(t.x * size) / new_size, idx=idx, size=new_size, protected=0, source=source)


class Reducer(nn.Module):
    """One reduction location: forward(tokens, qkv) -> tokens. Its traits, read instead of the method's name:
    - `before_block`: it runs on the block's input (qkv None), else after attention, before the MLP;
    - `varies_in_length`: the images of a batch keep different numbers of tokens (padded), which
      torch.compile would recompile for: such a method runs eager;
    - `made`: what its new tokens are, named in explain.py's trace (None: it makes none)."""
    before_block = False
    varies_in_length = False
    made = None

    @classmethod
    def stages(cls, cfg, keeps: tuple, schedule: list) -> list:
        """One reducer per location of `cfg.loc`. keeps: the rate of each location. schedule: P patches, then
        the tokens a schedule over patches aims at after each location, int(P * keep_0 * ... * keep_s)."""
        return [cls(keep) for keep in keeps]


class EViT(Reducer):
    """EViT at one location (see `evit`): the rate applies to the current tokens."""
    made, fuse = 'fused', True

    def __init__(self, keep: float):
        super().__init__()
        self.keep = keep

    def forward(self, t: Tokens, qkv) -> Tokens:
        q, k, _ = qkv
        return evit(t, cls_attention(q, k, t.attn_bias()).mean(1), self.keep, self.fuse)  # heads averaged

    def extra_repr(self) -> str:
        return f'keep={self.keep}, fuse={self.fuse}'


class TopK(EViT):
    """Top-K: EViT without its fused token (EViT's own ablation)."""
    made, fuse = None, False


class ToMe(Reducer):
    """ToMe at one location: merges a fixed r tokens (see `tome`). Its other change to the ViT,
    proportional attention (log(size) added to the logits), travels with the tokens: `Tokens.attn_bias`."""
    made = 'merged'

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    @classmethod
    def stages(cls, cfg, keeps, schedule):  # a fixed count merged per stage, whatever CLC adds
        return [cls(before - after) for before, after in zip(schedule, schedule[1:])]

    def forward(self, t: Tokens, qkv) -> Tokens:
        return tome(t, qkv[1].mean(1), self.r)  # keys averaged over heads: (B, N, D/H)

    def extra_repr(self) -> str:
        return f'r={self.r}'


def ats(t: Tokens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_samples: int) -> Tokens:
    """Adaptive Token Sampling (Fayyaz et al., ECCV 2022), inside a block.

    t: N tokens; q, k, v (B, H, N, hd): the block's attention inputs; num_samples: K. Returns CLS and
    at most K sampled tokens in position order, padded per batch (`valid`). The significance of token
    j is the sum over heads of (CLS attention to j) * ||v_j||, normalised to sum 1; its cumulative sum
    is inverted at fixed points (each point takes the token whose cumulative score is nearest), and
    points that land on the same token collapse, so images keep different numbers of tokens. The
    batch is padded to its largest count with copies of CLS; the block's attention ran on all rows,
    only the sampled rows go on.

    Follows the reference code in:
    - the points (2i + 1) / (2(K + 1)) come from its float `arange`, which gives K points and, at some K
      (196, 268, 384: paper settings at 448 px), one more; K = 0 gives none, and only CLS goes on.
    Differs from the reference code:
    - padding is never sampled and is left out of cache averages (the reference shifts its cumulative
      score by 0.1 and averages it in), so a batch gives the outputs of its images one at a time.
    """
    B, H, N, _ = q.shape
    cls_attn = cls_attention(q, k, t.attn_bias())[:, :, 1:]                                # (B, H, N-1)
    score = (cls_attn * v[:, :, 1:].float().norm(dim=-1)).sum(1)                           # (B, N-1)
    cdf = (score / (score.sum(-1, keepdim=True) + 1e-6)).cumsum(-1)
    if t.valid is not None:
        cdf = cdf.masked_fill(~t.valid[:, 1:], math.inf)
    n = num_samples + 1  # the reference's sample count
    points = torch.arange(1 / (2 * n), (2 * n - 1) / (2 * n), 2 / (2 * n), device=q.device)  # (K,), rarely K+1
    if len(points) and N > 1:
        picked = (cdf[:, None, :] - points[None, :, None]).abs().argmin(-1) + 1           # (B, K) positions
    else:  # no point to sample (K rounds to 0), or nothing left but CLS: only CLS goes on
        picked = torch.zeros(B, 0, dtype=torch.long, device=q.device)
    sampled = torch.zeros(B, N, dtype=torch.bool, device=q.device).scatter_(1, picked, True)
    sampled[:, 0] = True                                                                   # CLS
    counts = sampled.sum(1)                                                                # (B,)
    width = int(counts.max())
    order = (~sampled * N + torch.arange(N, device=q.device)).argsort(1)[:, :width]       # sampled first, in order
    valid = torch.arange(width, device=q.device) < counts[:, None]                         # (B, width)
    out = t.select(order.masked_fill(~valid, 0))                                           # padding: CLS copies
    return replace(out, idx=out.idx.masked_fill(~valid, -1), valid=valid)


class ATS(Reducer):
    """ATS at one location (see `ats`). Its padding travels with the tokens: `Tokens.valid`."""
    varies_in_length = True

    def __init__(self, num_samples: int):
        super().__init__()
        self.num_samples = num_samples

    @classmethod
    def stages(cls, cfg, keeps, schedule):  # K sample points (none when K rounds to 0); duplicates collapse
        return [cls(k) for k in schedule[1:]]

    def forward(self, t: Tokens, qkv) -> Tokens:
        return ats(t, *qkv, self.num_samples)

    def extra_repr(self) -> str:
        return f'num_samples={self.num_samples}'


def pooled(t: Tokens, merged: torch.Tensor) -> Tokens:
    """[CLS, merged tokens]: the output of the methods that pool every non-CLS token into K new ones."""
    idx = F.pad(t.idx[:, :1], (0, merged.shape[1]), value=-1)
    source = None if t.source is None else torch.cat(  # soft weights: each pooled token holds a bit of every input
        [t.source[:, :1], t.source[:, 1:].any(1, keepdim=True).expand(-1, merged.shape[1], -1)], 1)
    return replace(t, x=torch.cat([t.x[:, :1], merged], 1), idx=idx, size=None, valid=None, protected=0, source=source)


class Pooling(Reducer):
    """A reducer before a block that turns the tokens into K new ones, K the schedule's target at its location
    (PatchMerger, SiT, DPC-KNN): built as `cls(width, K)`."""
    before_block, made = True, 'pooled'

    @classmethod
    def stages(cls, cfg, keeps, schedule):
        return [cls(cfg.embed_dim, k) for k in schedule[1:]]


class PatchMerger(Pooling):
    """PatchMerger (Renggli et al., 2022) before a block: K learned queries attend over the
    LayerNorm-ed non-CLS tokens (softmax over the tokens, no 1/sqrt(D) scaling) and the K weighted
    averages of those normalised tokens replace them.

    Follows the reference code in:
    - queries start from a standard normal, the LayerNorm has torch's default eps (1e-5);
    - everything but CLS is pooled, the CLR carrier and recovered cache tokens included;
    - K may be 0 (queries (0, D)): then only CLS goes on (448 px, keep 0.1: int(784 * 0.001) at the third).
    """

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(k, dim))

    def forward(self, t: Tokens, qkv) -> Tokens:
        x = self.norm(t.x[:, 1:])                                   # (B, N-1, D)
        attn = (self.queries @ x.transpose(1, 2)).softmax(-1)       # (B, K, N-1)
        return pooled(t, attn @ x)                                  # (B, 1+K, D)


class SiT(Pooling):
    """Token slimming (SiT, Zong et al., 2022) before a block: an MLP (LayerNorm, D -> D/2, GELU,
    D/2 -> K) gives every non-CLS token K logits; a softmax over the tokens, after a learned scale,
    turns them into K weighted averages that replace the tokens.

    Follows the reference code in:
    - the slimming module alone, without the SiT paper's token-recycling distillation;
    - K may be 0: then only CLS goes on.
    """

    def __init__(self, dim: int, k: int):
        super().__init__()
        with warnings.catch_warnings():  # k = 0 (a stage that pools into nothing) makes an empty Linear
            warnings.filterwarnings('ignore', 'Initializing zero-element tensors')
            self.weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, k))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))

    def forward(self, t: Tokens, qkv) -> Tokens:
        x = t.x[:, 1:]                                                          # (B, N-1, D)
        weights = (self.weight(x) * self.scale).softmax(1).transpose(1, 2)     # (B, K, N-1)
        return pooled(t, weights @ x)                                           # (B, 1+K, D)


@torch.no_grad()
def dpc_knn(x: torch.Tensor, num_centers: int, k: int = 5):
    """Density-peaks clustering with k nearest neighbours (TCFormer, Zeng et al., CVPR 2022).

    x (B, N, C) -> (assignment (B, N) of each token to a cluster 0..K-1, centres (B, K) as token
    indices). Density = exp(-mean squared distance to the k nearest tokens, itself included); delta =
    distance to the nearest denser token (the largest distance for the densest); centres = top K of
    density * delta; every token joins its nearest centre. Builds the full (N x N) distance matrix.

    Follows the reference code in:
    - distances divided by sqrt(C); 1e-6 uniform noise on the density against ties (global RNG).
    Differs from the reference code:
    - k shrinks to N when fewer tokens are left (the reference fails there).
    """
    B, N, C = x.shape
    dist = torch.cdist(x.float(), x.float()) / C ** 0.5                           # (B, N, N)
    near = dist.topk(min(k, N), dim=-1, largest=False).values                     # (B, N, k)
    density = (-(near ** 2).mean(-1)).exp()
    density = density + torch.rand_like(density) * 1e-6                           # (B, N)
    denser = density[:, None, :] > density[:, :, None]                            # (B, N, N) j denser than i
    farthest = dist.flatten(1).max(-1).values[:, None, None]
    delta = torch.where(denser, dist, farthest).min(-1).values                    # (B, N)
    centres = (delta * density).topk(num_centers, dim=-1).indices                 # (B, K)
    assign = dist.gather(1, centres.unsqueeze(-1).expand(-1, -1, N)).argmin(1)    # (B, N) nearest centre
    assign.scatter_(1, centres, torch.arange(num_centers, device=x.device).expand(B, -1))  # centres: own cluster
    return assign, centres


class DPCKNN(Pooling):
    """DPC-KNN token clustering (TCFormer's clustering and merging) before a block: the patch tokens
    are clustered by `dpc_knn` into K clusters and each cluster becomes one token, the average of its
    members weighted by exp(a learned score, Linear D -> 1), normalised per cluster. CLS stays first; a
    merged token takes its centre's `idx`.

    Follows the reference code in:
    - the protected suffix (the CLR carriers and every token recovered from the cache) is neither
      clustered nor merged and stays last;
    - K is at least 5 before the last stage (its k-NN needs 5 tokens) and at least 1 at it.
    """

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.k = k
        self.score = nn.Linear(dim, 1)

    @classmethod
    def stages(cls, cfg, keeps, schedule):  # the reference's floors: 5 clusters, but 1 at the last stage
        floors = [5] * (len(keeps) - 1) + [1]
        return [cls(cfg.embed_dim, max(k, floor)) for k, floor in zip(schedule[1:], floors)]

    def forward(self, t: Tokens, qkv) -> Tokens:
        end = t.x.shape[1] - t.protected
        x = t.x[:, 1:end]                                                          # (B, M, D) clustered
        B, M, D = x.shape
        assign, centres = dpc_knn(x, min(self.k, M))
        K = centres.shape[1]
        weight = self.score(x).exp()                                               # (B, M, 1)
        total = weight.new_zeros(B, K, 1).scatter_add(1, assign.unsqueeze(-1), weight) + 1e-6
        weight = weight / total.gather(1, assign.unsqueeze(-1))                    # sums to 1 per cluster
        merged = x.new_zeros(B, K, D).scatter_add(1, assign.unsqueeze(-1).expand(-1, -1, D), x * weight)
        idx = torch.cat([t.idx[:, :1], t.idx[:, 1:end].gather(1, centres), t.idx[:, end:]], 1)
        if t.source is not None:  # a cluster token holds its members
            held = t.source[:, 1:end].float()                                      # (B, M, 1 + P)
            held = held.new_zeros(B, K, held.shape[-1]).scatter_add(1, assign.unsqueeze(-1).expand_as(held), held)
            t = replace(t, source=torch.cat([t.source[:, :1], held > 0, t.source[:, end:]], 1))
        return replace(t, x=torch.cat([t.x[:, :1], merged, t.x[:, end:]], 1), idx=idx)


@dataclass
class DecidedTokens(Tokens):
    """Tokens that carry DynamicViT's keep decisions, (B, N, 1): 1 kept, 0 dropped.

    Modifications of Tokens:
    - `select` and `append` keep the decisions in step (an appended token gets `later`);
    - `attend` in training (`gated`): a token attends only to kept tokens and to itself.
    """
    decision: Optional[torch.Tensor] = None
    later: float = 1.0    # decision of tokens recovered from the cache later: the reference counts them
                          # as kept in training and as dropped in the pooling of its eval-time predictor
    gated: bool = False   # training: nothing is removed, attention is masked instead

    def select(self, index: torch.Tensor) -> 'DecidedTokens':
        out = super().select(index)
        return replace(out, decision=self.decision.gather(1, index.unsqueeze(-1)))     # (B, K, 1)

    def append(self, extra: torch.Tensor, source: Optional[torch.Tensor] = None) -> 'DecidedTokens':
        out = super().append(extra, source)
        return replace(out, decision=F.pad(self.decision, (0, 0, 0, extra.shape[1]), value=self.later))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return super().attend(q, k, v)
        # The mask multiplies the exponentials (not -inf on the logits) so that the straight-through decisions
        # get gradients, and eps keeps rows finite; this is the only N x N attention matrix in the project.
        N = q.shape[2]
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5                        # (B, H, N, N)
        gate = self.decision.view(-1, 1, 1, N)
        gate = gate + (1 - gate) * torch.eye(N, device=q.device, dtype=gate.dtype)    # each token sees itself
        attn = (logits - logits.amax(-1, keepdim=True)).float().exp() * gate.float()
        return ((attn + 1e-6 / N) / (attn.sum(-1, keepdim=True) + 1e-6)).to(v.dtype) @ v


class DynamicViT(Reducer):
    """DynamicViT (Rao et al., NeurIPS 2021) before a block: a predictor scores keep / drop for every
    non-CLS token.

    t: N tokens -> DecidedTokens. The predictor: LayerNorm -> Linear D->D -> GELU; the first half of the
    channels stays per token, the second half becomes the mean over the currently kept tokens; then
    Linear D->D/2 -> GELU -> D/2->D/4 -> GELU -> D/4->2 -> log-softmax. Training: hard Gumbel-softmax
    decisions, multiplied by the earlier ones; nothing is removed, later attention reaches kept tokens
    only, and the ratio loss weight * mean over images of (kept fraction - target)^2 is added to
    `tokens.loss`. Eval: the top-scoring tokens are really kept and the rest removed.

    Follows the reference code in:
    - eval counts: int(P * target) without CLC; with CLC int((N - 2) * keep of the first stage) of the current N;
      a count of 0 keeps only CLS;
    - the kept fraction counts every non-CLS token, CLR and recovered carriers included;
    - recovered tokens count as kept in training and as dropped in the eval-time pooling (`DecidedTokens.later`);
    - the cache's average covers dropped tokens in training (they are still in the sequence), not at eval;
    - no distillation losses (the DynamicViT paper has them, the CLCA code does not).
    Differs from the reference code:
    - the pooling's denominator is floored at 1e-6: with every token dropped the reference divides 0 by 0.
    """
    before_block = True

    def __init__(self, dim: int, target: float, num_patches: int, clc_rate: Optional[float], weight: float):
        super().__init__()
        self.target, self.num_patches, self.clc_rate, self.weight = target, num_patches, clc_rate, weight
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    @classmethod
    def stages(cls, cfg, keeps, schedule):  # training aims at keep^(s+1); eval counts as the reference does
        return [cls(cfg.embed_dim, math.prod(keeps[:s + 1]), schedule[0], keeps[0] if cfg.clc else None,
                    2.0 / len(keeps)) for s in range(len(keeps))]

    def predict(self, x: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
        """x (B, M, D), decision (B, M, 1) -> log-probabilities (B, M, 2) of [keep, drop]."""
        h = self.in_conv(x)
        local, glob = h.chunk(2, dim=-1)                                                   # 2 x (B, M, D/2)
        kept = decision.sum(1, keepdim=True).clamp(min=1e-6)
        glob = (glob * decision).sum(1, keepdim=True) / kept + 1e-6                        # (B, 1, D/2)
        return self.out_conv(torch.cat([local, glob.expand_as(local)], -1))

    def forward(self, t: Tokens, qkv) -> DecidedTokens:
        B, N, _ = t.x.shape
        if not isinstance(t, DecidedTokens):  # the first stage: every token is kept so far
            t = DecidedTokens(**{f.name: getattr(t, f.name) for f in fields(t)}, decision=t.x.new_ones(B, N, 1),
                              later=float(self.training), gated=self.training)
        logp = self.predict(t.x[:, 1:], t.decision[:, 1:])                                 # (B, N-1, 2)
        if self.training:
            decision = F.gumbel_softmax(logp, hard=True)[..., :1] * t.decision[:, 1:]      # (B, N-1, 1)
            ratio_loss = ((decision.flatten(1).mean(1) - self.target) ** 2).mean()
            return replace(t, decision=torch.cat([t.decision[:, :1], decision], 1),
                           loss=t.loss + self.weight * ratio_loss)
        count = int((N - 2) * self.clc_rate) if self.clc_rate else int(self.num_patches * self.target)
        top = logp[..., 0].argsort(1, descending=True)[:, :count]                         # (B, K) best first
        return t.select(torch.cat([top.new_zeros(B, 1), top + 1], 1))


# Every method, by the name --method takes. A method added here (a Reducer subclass) is built, trained,
# compiled, traced and plotted with no other change; 'none' is the plain ViT.
METHODS = {'evit': EViT, 'topk': TopK, 'tome': ToMe, 'ats': ATS, 'patchmerger': PatchMerger, 'sit': SiT,
           'dpcknn': DPCKNN, 'dynamicvit': DynamicViT}


def build_reducers(cfg) -> nn.ModuleList:
    """The reducers of a model config, one per location in `loc` (stage s = 0, 1, ...), built by its method's
    `Reducer.stages`; empty when nothing is reduced. `keep` has one rate or one per location; all 1.0 reduce
    nothing. A single rate gives the schedule int(P * keep^(s+1)), as in the reference."""
    if cfg.method != 'none' and cfg.method not in METHODS:
        raise ValueError(f"unknown reduction method {cfg.method!r}: choose one of none, {', '.join(METHODS)}")
    num_loc, num_patches = len(cfg.loc), (cfg.img_size // cfg.patch_size) ** 2
    keeps = tuple(cfg.keep) * num_loc if len(cfg.keep) == 1 else tuple(cfg.keep)
    if cfg.method == 'none' or all(k == 1.0 for k in keeps):
        return nn.ModuleList()
    schedule = [num_patches] + [int(num_patches * math.prod(keeps[:s + 1])) for s in range(num_loc)]
    return nn.ModuleList(METHODS[cfg.method].stages(cfg, keeps, schedule))


def varies_in_length(method: str) -> bool:
    """Whether `method` (a --method name) keeps a different number of tokens per image."""
    return method in METHODS and METHODS[method].varies_in_length
