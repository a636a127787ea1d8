"""CLCA model: a ViT written from scratch, the cross-layer cache (CLC) and the cross-layer aggregation
head (CLA), and what the model costs: GMACs and tokens per stage (eval.py times it).

Paper: Rios et al., "Cross-Layer Cache Aggregation for Token Reduction in Ultra-Fine-Grained Image
Recognition", ICASSP 2025 (arXiv 2501.00243). Parameter names follow timm, so a timm checkpoint
loads as a plain key copy (weights.py); the CLA head is called `ifa_head` as in the paper's code for
the same reason. The token reduction methods live in reduce.py; this file meets them only through
`Tokens` and the one `Reducer` interface.
"""
import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from reduce import Tokens, build_reducers, varies_in_length

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ModelConfig:
    # backbone: a plain pre-norm ViT with timm's parameter names; the defaults are ViT-B/16
    img_size: int = 224            # input side in pixels, a multiple of patch_size
    patch_size: int = 16           # side of a square patch; P = (img_size / patch_size)^2 tokens
    embed_dim: int = 768           # D, the width of every token
    depth: int = 12                # number of transformer blocks
    num_heads: int = 12            # attention heads; D must divide evenly
    mlp_ratio: float = 4.0         # MLP hidden width = mlp_ratio * D
    qkv_bias: bool = True          # False for the IN21k-P (MIIL) weights
    no_embed_class: bool = False   # DeiT-3: pos_embed covers the patches only, CLS gets none
    init_values: float = 0.0       # LayerScale init (DeiT-3: 1e-6); 0 = no LayerScale
    pre_norm: bool = False         # CLIP: LayerNorm after the embedding, patch conv without bias
    norm_eps: float = 1e-6         # LayerNorm epsilon (CLIP: 1e-5)
    num_classes: int = 1000        # classifier outputs
    mean: tuple = IMAGENET_MEAN    # the backbone's pretraining statistics (data.py uses ImageNet's
    std: tuple = IMAGENET_STD      # by default, as the paper's code does)
    # CLCA, token reduction (reduce.py)
    method: str = 'none'           # 'none' or one of reduce.METHODS
    keep: tuple = (1.0,)           # keep rate, one for all locations or one per location
    loc: tuple = (3, 6, 9)         # 0-indexed blocks that reduce (and where CLC recovers, CLA reads)
    # CLCA, Cross-Layer Cache (CLC)
    clc: bool = False              # cache carrier tokens and re-insert them after each reduction
    num_clr: int = 1               # CLR carrier tokens appended to the input (paper: 1)
    clc_gap: bool = True           # also cache the mean of the surviving tokens (paper: on)
    clc_last: bool = True          # one more recovery at block depth - 2 (paper: on)
    # CLCA, Cross-Layer Aggregation (CLA) head
    cla: bool = False              # classify from the CLS of every location and the last block
    cla_filters: int = 2           # depthwise filters per channel in the CLA head (paper: 2)

    def __post_init__(self):
        self.keep = tuple(float(k) for k in (self.keep if isinstance(self.keep, (tuple, list)) else [self.keep]))
        self.loc = tuple(int(i) for i in self.loc)
        if self.img_size % self.patch_size:
            raise ValueError(f'img_size {self.img_size} is not a multiple of patch_size {self.patch_size}')
        if self.embed_dim % self.num_heads:
            raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}')
        if list(self.loc) != sorted(set(self.loc)) or any(not 0 <= i < self.depth for i in self.loc):
            raise ValueError(f'loc {self.loc} must be increasing block indices in 0..{self.depth - 1}')
        if any(not 0.0 < k <= 1.0 for k in self.keep):
            raise ValueError(f'keep {self.keep} must lie in (0, 1]')
        if len(self.keep) not in (1, len(self.loc)):
            raise ValueError(f'keep has {len(self.keep)} values: give one, or one per location in loc {self.loc}')
        if self.clc and not (self.num_clr > 0 or self.clc_gap):
            raise ValueError('the cross-layer cache needs something to carry: num_clr > 0 or clc_gap')
        if self.clc and not (self.loc or self.clc_last):
            raise ValueError('the cross-layer cache needs a recovery layer: a non-empty loc or clc_last')


SIZES = {'tiny': (192, 12, 3), 'small': (384, 12, 6), 'base': (768, 12, 12), 'large': (1024, 24, 16)}
# The paper's model: the backbone of its published training command at 448 px, and CLCA, turned on over
# ModelConfig's plain ViT: EViT keeping 10 % at its default locations, the cache (one CLR carrier), the head
PAPER_BACKBONE, PAPER_SIZE = 'vit_base_patch16_clip_224.laion2b', 448
CLCA = dict(method='evit', keep=(0.1,), clc=True, cla=True)


def backbone_config(name: str, **overrides) -> ModelConfig:
    """ModelConfig for a timm ViT name, e.g. 'deit3_base_patch16_224.fb_in1k' (the tag is optional)."""
    arch, _, tag = name.partition('.')
    m = re.fullmatch(r'(vit|deit|deit3)_(tiny|small|base|large)_patch(\d+)(_clip)?_\d+(_miil)?', arch)
    if m is None:
        raise ValueError(f'unknown backbone {name!r}: give a timm ViT name such as vit_base_patch16_224, '
                         'deit3_base_patch16_224 or vit_base_patch16_clip_224 (a .tag may follow)')
    family, size, patch, clip, miil = m.groups()
    dim, depth, heads = SIZES[size]
    cfg = dict(patch_size=int(patch), embed_dim=dim, depth=depth, num_heads=heads)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if family == 'deit3':
        cfg.update(no_embed_class=True, init_values=1e-6)
    if clip:
        cfg.update(pre_norm=True, norm_eps=1e-5)
        mean, std = CLIP_MEAN, CLIP_STD
    if miil:
        cfg.update(qkv_bias=False)
        mean, std = (0.0,) * 3, (1.0,) * 3
    elif family == 'vit' and not clip and (not tag or 'in21k' in tag or 'augreg' in tag):
        mean, std = (0.5,) * 3, (0.5,) * 3  # Google's ViT weights; MAE, DINO, MoCo v3 use ImageNet's
    return ModelConfig(**{**cfg, 'mean': mean, 'std': std, **overrides})


def resample_grid(pos: torch.Tensor, side: int, antialias: bool = True) -> torch.Tensor:
    """Position embeddings of a g x g patch grid on a side x side one, by bicubic resampling,
    (1, g*g, D) -> (1, side*side, D): how a checkpoint trained at 224 px runs at 448 (weights.load_weights).
    `antialias` picks the kernel even when upsampling (PIL's cubic, a = -0.5, on; a = -0.75 off), so the two
    differ at 14 -> 28."""
    g, D = math.isqrt(pos.shape[1]), pos.shape[2]
    if g == side:
        return pos
    grid = pos.float().reshape(1, g, g, D).permute(0, 3, 1, 2)                  # (1, D, g, g)
    grid = F.interpolate(grid, size=(side, side), mode='bicubic', antialias=antialias, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, side * side, D).to(pos.dtype)     # (1, side*side, D)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size, bias=not cfg.pre_norm)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, P, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x, attend=F.scaled_dot_product_attention):
        """Returns the attention output (B, N, D) and its inputs (q, k, v), each (B, H, N, D/H),
        which a reducer inside the block reads its scores from. `attend(q, k, v)` is how the tokens
        attend to each other: `Tokens.attend`, the fused kernel unless a reduction says otherwise."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                           # 3 x (B, H, N, D/H)
        out = attend(q, k, v)                                                    # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).reshape(B, N, D)), (q, k, v)


class Mlp(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block; `reducer` (reduce.py) shortens the sequence at its location."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ls = (lambda: LayerScale(cfg.embed_dim, cfg.init_values)) if cfg.init_values else nn.Identity
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = ls()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.ls2 = ls()

    def forward(self, t: Tokens, reducer=None) -> Tokens:
        if reducer is not None and reducer.before_block:
            t = reducer(t, None)
        out, qkv = self.attn(self.norm1(t.x), t.attend)
        t = replace(t, x=t.x + self.ls1(out))
        if reducer is not None and not reducer.before_block:
            t = reducer(t, qkv)  # attention saw all N tokens, the MLP sees the survivors only
        return replace(t, x=t.x + self.ls2(self.mlp(self.norm2(t.x))))


class ViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, P = cfg.embed_dim, (cfg.img_size // cfg.patch_size) ** 2
        self.num_patches = P
        self.num_clr = cfg.num_clr if cfg.clc else 0
        clr_rows = 0 if cfg.no_embed_class else self.num_clr  # CLR gets position rows where CLS does
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, (0 if cfg.no_embed_class else 1) + P + clr_rows, D))
        self.clr = nn.Parameter(torch.zeros(1, self.num_clr, D)) if self.num_clr else None
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.reducers = build_reducers(cfg)
        self.stage = {i: s for s, i in enumerate(cfg.loc)} if len(self.reducers) else {}
        # Cross-Layer Cache: recover after every reduction, and once more at depth - 2
        self.recovery = sorted(set(cfg.loc) | ({cfg.depth - 2} if cfg.clc_last else set()))
        # Cross-Layer Aggregation head: the CLS after each location and the last block: g = len(loc) + 1
        self.cla_layers = sorted(set(cfg.loc) | {cfg.depth - 1})
        if cfg.cla:  # nested exactly as in the paper's code, so that its checkpoints load as a key copy
            g, wide = len(self.cla_layers), cfg.cla_filters * D
            self.ifa_head = nn.Sequential(nn.Sequential(
                nn.BatchNorm1d(D),
                nn.Conv1d(D, wide, kernel_size=g, stride=g, groups=D),  # each channel mixes its g layers
                nn.BatchNorm1d(wide),
                nn.GELU(),
                nn.Conv1d(wide, cfg.num_classes, kernel_size=1),
            ), nn.Flatten(1))
        else:
            self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
            self.head = nn.Linear(D, cfg.num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """timm's ViT init, used when training from scratch; CLR starts as a copy of CLS."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.init_clr()

    @torch.no_grad()
    def init_clr(self):
        """Cross-Layer Cache: CLR carriers start as copies of the (pretrained) CLS token."""
        if self.clr is not None:
            self.clr.copy_(self.cls_token.expand_as(self.clr))

    def embed(self, images) -> Tokens:
        """[CLS, patches, CLR] plus position embeddings."""
        x = self.patch_embed(images)                      # (B, P, D)
        B = x.shape[0]
        cls = self.cls_token.expand(B, -1, -1)            # (B, 1, D)
        clr = [self.clr.expand(B, -1, -1)] if self.clr is not None else []
        if self.cfg.no_embed_class:
            x = torch.cat([cls, x + self.pos_embed, *clr], 1)
        else:
            x = torch.cat([cls, x, *clr], 1) + self.pos_embed
        idx = torch.arange(x.shape[1], device=x.device)
        idx[1 + self.num_patches:] = -1  # CLR tokens are made tokens
        return Tokens(x=self.norm_pre(x), idx=idx.expand(B, -1), protected=self.num_clr)

    def carriers(self, t: Tokens, survived: int):
        """Cross-Layer Cache: one cache entry, [GAP of positions 1..survived-1, the last num_clr tokens].
        `survived` is the length before the last recovery appended anything, so the GAP averages the
        tokens that survived the reductions (at first the patches), not the carriers recovered behind them."""
        parts = [t.mean(1, survived)] if self.cfg.clc_gap else []  # (B, 1, D); 0 if none survived
        if self.num_clr:
            parts.append(t.x[:, -self.num_clr:])           # (B, num_clr, D)
        return torch.cat(parts, 1)

    def forward(self, images, labels=None):
        """images (B, 3, S, S) -> (logits (B, num_classes), loss): the cross-entropy with `labels` plus
        any training loss a reduction adds (DynamicViT's ratio loss), or None without labels."""
        t = self.embed(images)
        cache, cls_feats = [], []
        survived = 1 + self.num_patches  # [CLS, patches]: the CLR carriers are not averaged
        for i, blk in enumerate(self.blocks):
            t = blk(t, self.reducers[self.stage[i]] if i in self.stage else None)
            if self.cfg.clc:
                if i in self.recovery:
                    # Recover: append every carrier cached since the last recovery, oldest first. The
                    # last token is now a recovered carrier that block i never saw; the reference
                    # caches that stale copy next, and so do we (the paper's figure shows it).
                    survived = t.x.shape[1]
                    if cache:
                        t = t.append(torch.cat(cache, 1))
                        cache = []
                if i < self.recovery[-1]:
                    cache.append(self.carriers(t, survived))
            if self.cfg.cla and i in self.cla_layers:
                cls_feats.append(t.x[:, 0])  # the raw residual stream, no LayerNorm
        logits = self.ifa_head(torch.stack(cls_feats, -1)) if self.cfg.cla else self.head(self.norm(t.x[:, 0]))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels) + t.loss
        return logits, loss


def create_model(backbone: str, num_classes: int, **fields) -> ViT:
    """A ViT for a timm name (e.g. 'deit3_base_patch16_224.fb_in1k'), initialised as timm does, with any other
    ModelConfig fields: a plain ViT unless they say otherwise, the paper's model with `**CLCA`.
    `weights.load_weights` loads pretrained or trained weights into it."""
    return ViT(backbone_config(backbone, num_classes=num_classes, **fields))


@torch.no_grad()
def gmacs(model: ViT) -> float:
    """Multiply-accumulates (billions) of a one-image forward: what the paper's cost tables call FLOPs.

    torch's flop counter sees matmuls and convolutions, attention included when SDPA runs as its
    math decomposition. Works on a model built on the meta device (no memory, no compute).
    """
    p = next(model.parameters())
    images = torch.randn(1, 3, model.cfg.img_size, model.cfg.img_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops() / 2e9


def tokens_per_stage(cfg) -> str:
    """Sequence length entering the first block and after each reduction location, e.g. 786>86>16>9,
    counted on the meta device (no memory, no compute). ATS keeps a number of tokens that depends on
    the image: its counts come from one random image and carry a '~'."""
    varies = varies_in_length(cfg.method)
    device = 'cpu' if varies else 'meta'
    with torch.device(device):
        model = ViT(cfg).eval()
    lengths = []
    for i in [0] + [i + 1 for i in cfg.loc if i + 1 < cfg.depth]:
        model.blocks[i].register_forward_pre_hook(lambda m, a: lengths.append(a[0].x.shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, cfg.img_size, cfg.img_size, device=device))
    return '~' * varies + '>'.join(map(str, lengths))

