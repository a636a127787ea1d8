"""Token reduction methods, one small unit each (CLCA Sec. 2.1; DESIGN.md Sec. 3).

Every method plugs into the ViT through one interface, a `Reducer` module per reduction location:

    reducer(tokens, qkv) -> tokens

`tokens` is a `Tokens` record (the features plus, per token, where it came from). A reducer with
`before_block = False` runs inside the block, after attention and before the MLP, and receives
that block's attention inputs `qkv = (q, k, v)`, each (B, heads, N, head_dim): attention ran on
all N tokens, the MLP runs only on the survivors (EViT, Top-K). A reducer with
`before_block = True` runs on the block's input and receives `qkv = None`.

The CLS token is always position 0 and is never removed. The keep rule differs per method in the
reference code; each reducer's docstring says which one it follows and why.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

METHODS = ('none', 'evit', 'topk')


@dataclass
class Tokens:
    """The token sequence that flows through the blocks, CLS first."""
    x: torch.Tensor    # (B, N, D) features
    idx: torch.Tensor  # (B, N) position in the input sequence: 0 = CLS, 1..P = patches, -1 = made here
                       # (a CLR carrier, an EViT fused token, a token recovered from the cache)

    def select(self, index: torch.Tensor) -> 'Tokens':
        """Keep the tokens at `index` (B, K), in that order."""
        x = self.x.gather(1, index.unsqueeze(-1).expand(-1, -1, self.x.shape[-1]))  # (B, K, D)
        return replace(self, x=x, idx=self.idx.gather(1, index))                     # (B, K)

    def append(self, extra: torch.Tensor) -> 'Tokens':
        """Append made tokens `extra` (B, M, D) at the end of the sequence."""
        made = self.idx.new_full(extra.shape[:2], -1)  # (B, M)
        return replace(self, x=torch.cat([self.x, extra], 1), idx=torch.cat([self.idx, made], 1))


def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the CLS query over all N keys, averaged over heads: (B, N).

    Only the CLS row of the attention matrix is computed, O(N*D) instead of O(N^2*D), so the block
    itself can use the fused attention kernel, which never exposes its probabilities.
    """
    logits = q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, 1, N)
    return logits.float().softmax(-1).mean(1).squeeze(1)                 # (B, N)


def evit(t: Tokens, cls_attn: torch.Tensor, keep: float, fuse: bool = True) -> Tokens:
    """EViT (Liang et al., ICLR 2022): keep the tokens the CLS token attends to most.

    Scores are the CLS attention probabilities (over all N keys, CLS included, then CLS's own entry
    is dropped, so they need not sum to 1). Keeps `ceil(keep * (N - 1))` of the *current* non-CLS
    tokens, in descending score order; with `fuse`, all other tokens are summed into one extra
    token weighted by their scores (a weighted sum, not an average), appended last. As in the
    reference code, nothing happens when the count rounds up to all tokens, and the rate applies to
    the current length (the EViT paper's own rule), not to a schedule over the patch count.
    `fuse=False` is Top-K, EViT's ablation without the fused token.
    """
    B, N, D = t.x.shape
    num_keep = math.ceil(keep * (N - 1))  # same float expression as the reference: same counts
    if num_keep >= N - 1:
        return t
    score = cls_attn[:, 1:]                                                   # (B, N-1)
    top = score.topk(num_keep, dim=1).indices                                 # (B, K) best first
    order = torch.cat([torch.zeros_like(top[:, :1]), top + 1], 1)             # (B, 1+K) CLS first
    kept = t.select(order)
    if not fuse:
        return kept
    dropped = score.scatter(1, top, 0.0).to(t.x.dtype)                        # (B, N-1) 0 where kept
    fused = dropped.unsqueeze(1) @ t.x[:, 1:]                                 # (B, 1, D)
    return kept.append(fused)


class Reducer(nn.Module):
    """One reduction location. Subclasses set `before_block` and implement forward(tokens, qkv)."""
    before_block = False


class EViT(Reducer):
    """EViT / Top-K at one location (see `evit`)."""

    def __init__(self, keep: float, fuse: bool):
        super().__init__()
        self.keep, self.fuse = keep, fuse

    def forward(self, t: Tokens, qkv) -> Tokens:
        q, k, _ = qkv
        return evit(t, cls_attention(q, k), self.keep, self.fuse)

    def extra_repr(self) -> str:
        return f'keep={self.keep}, fuse={self.fuse}'


def build_reducers(method: str, keep: tuple, num_loc: int) -> nn.ModuleList:
    """The reducers for `num_loc` locations (stage s = 0, 1, ...); empty when nothing is reduced.

    `keep` has one rate or one per location. All rates 1.0 means no reduction.
    """
    if method not in METHODS:
        raise ValueError(f"unknown reduction method {method!r}: choose one of {', '.join(METHODS)}")
    keeps = tuple(keep) * num_loc if len(keep) == 1 else tuple(keep)
    if method == 'none' or all(k == 1.0 for k in keeps):
        return nn.ModuleList()
    return nn.ModuleList(EViT(k, fuse=(method == 'evit')) for k in keeps)
