"""Look inside a CLCA model: which patches each reduction keeps, how much of the class evidence survives
it, and what the token sequence holds block by block (the Cross-Layer Cache, token by token).

    python explain.py --checkpoint runs/leaves/last.pt --recall              # evidence kept, against chance
    python explain.py --checkpoint runs/leaves/last.pt --trace 0             # test image 0, block by block
    python explain.py --checkpoint runs/leaves/last.pt --visualize kept.png  # the patches that survive
    python explain.py --checkpoint runs/leaves/last.pt --factors             # which half of the class it gets wrong

The evidence comes from the leaves, whose generator knows where each class lives. A model is found as eval.py
finds it, from a checkpoint or from the model flags alone (random weights, --seed); everything runs in fp32.
"""
import sys

if sys.version_info < (3, 10):  # said in one line, before the first `str | None` below fails with a traceback
    sys.exit(f'error: this code needs Python 3.10 or newer, not {sys.version.split()[0]}: install a newer Python')

import argparse
import math
from collections import Counter
from dataclasses import replace

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import PIL
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from data import DATASETS, DatasetError, Standardise
from eval import DEVICES, add_model_flags, build, eval_split, exit_with, pick_device
from leaves import SPOT_RADIUS
from model import tokens_per_stage
from weights import CheckpointError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Look inside a CLCA model: recall of the class evidence, the token '
                                'trace, the kept patches.')
    a = p.add_argument
    a('--checkpoint', help="a checkpoint of train.py or of the paper's code")
    a('--dataset', choices=DATASETS, help="dataset (default: the checkpoint's, else leaves)")
    a('--data-dir', help='dataset folder (default data/<dataset>)')
    a('--split', choices=('train', 'test'), default='test')
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument('--recall', action='store_true', help='leaves: the evidence patches kept after each reduction')
    what.add_argument('--trace', type=int, metavar='I', help='print what the sequence of image I holds, block by block')
    what.add_argument('--visualize', metavar='PNG', help='write a grid of the patches that survive each reduction')
    what.add_argument('--factors', action='store_true', help="leaves: how often each half of the class is right")
    add_model_flags(p)  # they describe the model where no checkpoint does, and override its settings
    a('--num-classes', type=int)
    a('--seed', type=int, default=0, help='the random weights of a model built without a checkpoint')
    a('--device', choices=DEVICES, default='auto', help='auto: CUDA, else the CPU; mps only when asked (untried)')
    args = p.parse_args(argv)
    if args.visualize and tuple(map(int, PIL.__version__.split('.')[:2])) < (10, 1):  # load_default(size=): 10.1
        p.error(f'--visualize needs Pillow 10.1 or newer, not {PIL.__version__}: pip install -r requirements.txt')
    return args


def run_with_hooks(model, images, hooks):
    """Run `model` on `images` in eval mode without gradients, then remove `hooks`: the caller's recorders."""
    try:
        with torch.no_grad():
            return model.eval()(images)
    finally:
        for h in hooks:
            h.remove()


def evidence(dataset, i: int, img_size: int, patch: int) -> torch.Tensor:
    """(P,) bool, patches in row-major order: where the class evidence of image i of the leaves
    lies after the test transform (the centre crop to `img_size`), the patches that hold at
    least a fifth of one of its spots."""
    cover = T.functional.center_crop(dataset.render(i)[1][None], [img_size])[0]  # (S, S) in [0, 1]
    side = img_size // patch
    cells = cover[:side * patch, :side * patch].reshape(side, patch, side, patch).sum((1, 3))  # (side, side)
    return cells.flatten() >= 0.2 * math.pi * (SPOT_RADIUS * dataset.size / 2) ** 2


def alive_patches(model, images) -> list:
    """Run `model` on `images` (B, 3, S, S); per reduction location, (B, P) bool: the patches that still have
    a token of their own (a made token, idx -1, belongs to no patch; ToMe's merged token to its B partner)."""
    kept = []
    run_with_hooks(model, images, [model.blocks[i].register_forward_hook(lambda m, a, out: kept.append(out.idx.cpu()))
                                   for i in model.cfg.loc])
    # idx (B, N): positions in [CLS, patches], 0 = CLS, -1 = made; both land in column 0, which is cut off
    return [torch.zeros(len(images), 1 + model.num_patches).scatter_(1, idx.clamp(min=0), 1.0)[:, 1:].bool()
            for idx in kept]


def held_patches(model, images) -> list:
    """Run `model` on `images` (B, 3, S, S), tracing `Tokens.source`; per reduction location, (B, N, P) bool:
    the patches each token after it holds (ATS's padding holds none)."""
    held, P = [], model.num_patches

    def start(module, args):  # block 0's input: CLS and each patch hold themselves, the CLR carriers nothing
        t = args[0]
        eye = torch.eye(t.x.shape[1], 1 + P, dtype=torch.bool, device=t.x.device)  # (N, 1 + P)
        return (replace(t, source=eye.expand(len(t.x), -1, -1)),) + args[1:]

    def record(module, args, t):
        held.append(t.source[..., 1:].cpu() & (True if t.valid is None else t.valid[..., None].cpu()))
    run_with_hooks(model, images, [model.blocks[0].register_forward_pre_hook(start)]
                   + [model.blocks[i].register_forward_hook(record) for i in model.cfg.loc])
    return held


def evidence_recall(model, dataset, device, batch: int = 100) -> list:
    """Per reduction location, (alone, mixed, chance) over the evidence patches (`evidence`):
    - alone: the share held by a token that holds no other patch but evidence (a kept patch, a ToMe merge of
      two evidence patches);
    - mixed: the share held only by tokens that mix it with non-evidence patches (EViT's fused token, ToMe's
      and DPC-KNN's merges, every pooled token); the rest is gone;
    - chance: the share of all patches held by a token of their own, which is what a selection of the same
      number of patches made blind to the evidence would keep alone on average."""
    if not hasattr(dataset, 'render'):
        raise ValueError("--recall needs the generator's evidence masks: use --dataset leaves")
    standardise, p = Standardise.of(dataset, device), model.cfg.patch_size
    sums, total = torch.zeros(len(model.cfg.loc), 3), 0
    for start in range(0, len(dataset), batch):
        ids = range(start, min(start + batch, len(dataset)))
        images = standardise(torch.stack([dataset[i][0] for i in ids]))
        marks = torch.stack([evidence(dataset, i, model.cfg.img_size, p) for i in ids])    # (B, P)
        for s, src in enumerate(held_patches(model, images)):                            # src (B, N, P)
            mixing = (src & ~marks[:, None]).any(-1)                                     # (B, N) holds non-evidence
            alone = (src & (src.any(-1) & ~mixing)[..., None]).any(1) & marks           # (B, P)
            mixed = (src & mixing[..., None]).any(1) & marks & ~alone
            own = (src & (src.sum(-1) == 1)[..., None]).any(1)                           # (B, P)
            sums[s] += torch.tensor([alone.sum(), mixed.sum(), own.float().mean(1).sum()])
        total += int(marks.sum())
    return [(a / max(total, 1), m / max(total, 1), c / len(dataset)) for a, m, c in sums.tolist()]


@torch.no_grad()
def factor_accuracy(model, dataset, device, batch: int = 100) -> dict:
    """Leaves: the share (%) of images whose predicted class has the true value of each factor of the class
    (`Leaves.factors`), beside top-1, where both must be right. A reduction that loses the marks loses
    colour; one that loses the outline loses length."""
    if not hasattr(dataset, 'factors'):
        raise ValueError('--factors needs classes made of factors: use --dataset leaves')
    standardise, hits = Standardise.of(dataset, device), Counter()
    model.eval()
    for images, labels in DataLoader(dataset, batch):
        predicted = model(standardise(images))[0].argmax(-1).cpu()  # (B,)
        truth, guess = dataset.factors(labels), dataset.factors(predicted)
        hits.update({name: int((guess[name] == truth[name]).sum()) for name in truth})
        hits['top-1'] += int((predicted == labels).sum())
    return {name: 100 * n / len(dataset) for name, n in hits.items()}


HEADING = 22  # pixels of the column headings above the --visualize grid


def visualize(model, dataset, path, device, num_images=6, scale=4):
    """A PNG grid under column headings: per row one test image, then the image after each reduction location
    with the patches that no longer have a token of their own dimmed. Small images are scaled up `scale` times
    (nearest neighbour, so patches stay sharp); on leaves the evidence patches are outlined in cyan."""
    images = torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])  # uint8
    plain = images / 255
    S, p = model.cfg.img_size, model.cfg.patch_size
    scale = 1 if S >= 128 else scale  # large images need no enlarging
    up = lambda m: m.view(-1, 1, S // p, S // p).repeat_interleave(p * scale, 2).repeat_interleave(p * scale, 3)
    plain = plain.repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # (B, 3, S*scale, S*scale)
    kept = alive_patches(model, Standardise.of(dataset, device)(images))
    rows = [plain] + [plain * (0.25 + 0.75 * up(alive.float())) for alive in kept]
    if hasattr(dataset, 'render'):  # the leaves' generator knows where their evidence is
        inside = up(torch.stack([evidence(dataset, i, S, p) for i in range(len(images))]).float())  # (B, 1, H, W)
        grown, shrunk = F.max_pool2d(inside, 3, 1, 1), -F.max_pool2d(-inside, 3, 1, 1)  # dilated, eroded by 1 px
        edge = grown - shrunk  # 1 on both sides of each evidence region's border
        cyan = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1)
        rows = [r * (1 - edge) + cyan * edge for r in rows]
    grid = make_grid(torch.stack(rows, 1).flatten(0, 1), nrow=len(rows), padding=2, pad_value=1.0)  # image-major
    page = to_pil_image(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8))  # rounded as save_image rounds
    headed = Image.new('RGB', (page.width, page.height + HEADING), 'white')  # column headings on top
    headed.paste(page, (0, HEADING))
    draw, font = ImageDraw.Draw(headed), ImageFont.load_default(size=14)
    for c, title in enumerate(['input'] + [f'after block {i}' for i in model.cfg.loc]):
        draw.text(((c + 0.5) * page.width / len(rows) - draw.textlength(title, font) / 2, 3), title, 'black', font)
    headed.save(path)


def trace(model, image) -> list:
    """The Cross-Layer Cache, token by token: run one image (1, 3, S, S) and return, per block, what its
    sequence holds on the way in: (block, {kind: count}, [alive patches as (row, col)], what happens in the
    block). Kinds: CLS, patch, CLR (the carriers), cache (entries recovered from the cross-layer cache), and
    the tokens a reduction makes (EViT's fused token, ToMe's merged tokens, pooled clusters)."""
    side = model.cfg.img_size // model.cfg.patch_size
    kinds = ['CLS'] + ['patch'] * model.num_patches + ['CLR'] * model.num_clr  # one per token, in order
    rows = []

    def enter(i):
        def hook(module, args):
            t, appended = args[0], args[0].x.shape[1] - len(kinds)
            if appended:  # a recovery after the previous block appended cache entries
                kinds.extend(['cache'] * appended)
                rows[-1][3].append(f'then the cache recovers {appended}')
            alive = [divmod(j - 1, side) for j in t.idx[0].tolist() if j > 0]
            rows.append([i, Counter(kinds), alive, []])
        return hook

    def reduced(module, args, out):
        before, new = args[0], []
        for r in range(out.x.shape[1]):
            j, size = out.idx[0, r].item(), 1 if out.size is None else out.size[0, r].item()
            if out.valid is not None and not out.valid[0, r]:
                new.append('padding')
            elif j >= 0:
                new.append('CLS' if j == 0 else 'patch' if size == 1 else 'merged')
            else:  # a selected made token is an exact copy of an input row; anything else is new here
                same = (before.x[0] == out.x[0, r]).all(-1).nonzero()
                new.append(kinds[same[0].item()] if len(same) else module.made or 'made')
        kinds[:] = new
        rows[-1][3].append(f'{model.cfg.method} leaves {len(new)}: ' +
                           ', '.join(f'{n} {k}' for k, n in Counter(new).items()))

    run_with_hooks(model, image, [blk.register_forward_pre_hook(enter(i)) for i, blk in enumerate(model.blocks)]
                   + [r.register_forward_hook(reduced) for r in model.reducers])
    for row in rows:
        if model.cfg.cla and row[0] in model.cla_layers:
            row[3].append('the CLA head reads its CLS output')
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)  # a model built from flags alone: the same random weights for the same seed
    try:
        model, raw = build(args, args.checkpoint)
        model, cfg = model.to(device).eval(), model.cfg
        print(f'{cfg.method} keep {cfg.keep} loc {cfg.loc} clc={cfg.clc} cla={cfg.cla} at {cfg.img_size} px; '
              f'tokens per stage {tokens_per_stage(cfg)}; fp32 on {device.type}')
        dataset = eval_split(args, model, raw)
        if args.recall:
            for s, (alone, mixed, chance) in zip(cfg.loc, evidence_recall(model, dataset, device)):
                print(f'after block {s}: evidence recall {alone:.3f} (chance {chance:.3f}), '
                      f'merged with other patches {mixed:.3f}')
        elif args.trace is not None:
            rows = trace(model, Standardise.of(dataset, device)(dataset[args.trace][0][None]))
            kinds = list(dict.fromkeys(k for row in rows for k in row[1]))
            print('block  in  ' + ' '.join(f'{k:>6}' for k in kinds) + '  patches with a token')
            for i, counts, alive, notes in rows:
                where = f'all {len(alive)}' if len(alive) == model.num_patches else ' '.join(map(str, alive)) or '-'
                print(f'{i:5d} {sum(counts.values()):3d}  ' + ' '.join(f'{counts.get(k, 0):6d}' for k in kinds)
                      + f'  {where}' + ''.join(f'; {n}' for n in notes))
        elif args.factors:
            print('  '.join(f'{name} {share:.1f} %' for name, share in factor_accuracy(model, dataset, device).items()))
        else:
            visualize(model, dataset, args.visualize, device)
            print(f'wrote {args.visualize}')
    except (DatasetError, CheckpointError, ValueError, OSError) as e:
        exit_with(e)


if __name__ == '__main__':
    main()
