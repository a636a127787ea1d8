"""The embedded dataset: leaves drawn on the fly, so that the demo, the tests and a lab need no download.

- `leaves`: 10 leaf "cultivars", each a leaf length and a spot colour: a class lives in the whole outline and
  in a handful of patches, a small stand-in for cultivars told apart by a leaf's shape and its fine details.
- `leaf-species`: the same leaves labelled by outline alone; pre-training on it stands in for ImageNet.
The generator knows which pixels carry the class (`render_leaf`'s evidence): explain.py measures how much
of it each token reduction keeps. data.py's `build_dataset` serves both by name, like the datasets on disk.
"""
import math
import zlib

import torch
from torch.utils.data import Dataset

SPOT_RADIUS = 0.12  # in the generator's [-1, 1] image coordinates: a spot is 12 % of the image wide
PALETTE = torch.tensor([[0.98, 0.86, 0.15], [0.85, 0.12, 0.10], [0.97, 0.97, 0.95],
                        [0.55, 0.20, 0.70], [0.98, 0.50, 0.05]])  # spot colours: yellow, red, white, purple, orange


class Leaves(Dataset):
    """Drawn leaves in a random pose, shade and background, with 1-3 small coloured spots (12 % of the image
    wide) and 0-2 dark blight specks as distractors. Image i of a split depends on (seed, task, split, i) only.
    - 'cultivar' (`leaves`): a class is the leaf's length (5) and its spots' colour (yellow or red); the width
      and the spots' half (stalk or tip) are random: the class lives in the outline and a few spotted patches.
    - 'species' (`leaf-species`): a class is the outline (5 lengths x 2 widths); the spots are random.
    `factors` splits a label in two; length index k: a leaf 0.5 + 0.1 k long (half its extent in [-1, 1])."""

    per_class = {'train': 400, 'test': 300}  # images per class and split
    where = 'drawn on the fly by leaves.py'  # what train.py says it reads
    cache_bytes = 2**30  # keep a split's rendered images in memory when they fit in this

    num_classes = 10

    def __init__(self, split, size, transform, seed=0, task='cultivar'):
        self.split = split
        self.size = size  # the side images are drawn at; `transform` crops them to the model's input
        self.transform = transform
        self.seed = seed
        self.task = task
        self.n = self.num_classes * self.per_class[split]
        self.rendered = {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        label = i % self.num_classes
        img = self.rendered.get(i)
        if img is None:  # an image is the same every epoch: draw it once
            img = self.render(i)[0]
            if self.n * img.numel() <= self.cache_bytes:
                self.rendered[i] = img
        return self.transform(img), label

    def factors(self, label) -> dict:
        """The two things class `label` (an int or a tensor of them) is made of, each as an index: for a
        cultivar the spots' colour and the leaf's length, for a species the leaf's width and length."""
        return {'spot colour' if self.task == 'cultivar' else 'width': label // 5, 'length': label % 5}

    def render(self, i):
        """Image i as `render_leaf` draws it (before the transform): (image, evidence)."""
        key, part = f'{self.seed}/{self.split}/{i}', self.factors(i % self.num_classes)
        length = 0.5 + 0.1 * part['length']
        if self.task == 'cultivar':  # the class fixes length and spot colour; width and the spots' half are free
            g = torch.Generator().manual_seed(zlib.crc32(f'cultivar/{key}'.encode()))
            half, width = int(torch.randint(2, (), generator=g)), 0.2 + 0.2 * float(torch.rand((), generator=g))
            return render_leaf((part['spot colour'], half), self.size, key, outline=(length, width))
        g = torch.Generator().manual_seed(zlib.crc32(f'spots/{key}'.encode()))
        signature = (int(torch.randint(len(PALETTE), (), generator=g)), int(torch.randint(2, (), generator=g)))
        outline = (length, 0.2 + 0.2 * part['width'])  # (length, width): 5 x 2 species
        return render_leaf(signature, self.size, 'species/' + key, outline=outline)


def render_leaf(signature, size, key: str, outline):
    """A (3, size, size) uint8 image of a leaf of `outline` = (length, width), each jittered by up to 0.03,
    with 1-3 spots of the `signature` = (colour, half), and the (size, size) share of each pixel that
    the signature's spots cover (the class evidence)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))  # CPU generators keep 32 bits of a seed
    u = lambda lo, hi, n=(): lo + (hi - lo) * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing='ij')
    # pose: rotate the image grid into leaf coordinates a (along the midrib) and b (across it)
    theta, cx, cy = u(-0.45, 0.45), u(-0.08, 0.08), u(-0.08, 0.08)
    length, width = outline[0] + u(-0.03, 0.03), outline[1] + u(-0.03, 0.03)
    a = (xx - cx) * torch.sin(theta) - (yy - cy) * torch.cos(theta)  # tip points up, tilted by theta
    b = (xx - cx) * torch.cos(theta) + (yy - cy) * torch.sin(theta)
    s = (a + length) / (2 * length)                                  # 0 at the stalk, 1 at the tip
    half = width * torch.sin(math.pi * s.clamp(0, 1)).clamp(min=0) ** 0.8  # the leaf's half-width at s
    edge = 2.0 / size                                                # ~1 pixel of antialiasing
    leaf = ((half - b.abs()) / edge).clamp(0, 1) * ((s > 0) & (s < 1))
    # background: a smooth random tint plus pixel noise
    low = torch.nn.functional.interpolate(u(0.55, 0.85, (1, 3, 4, 4)), size=(size, size), mode='bilinear')[0]
    # leaf: a shaded green with a darker midrib and veins, the same for every cultivar
    green = torch.tensor([0.20, 0.55, 0.15]) + u(-0.06, 0.06, 3)
    shade = 1 - 0.25 * (b / width).abs()
    veins = ((s - 0.9 * b.abs()) * 9 % 1 < 0.07) | (b.abs() < 0.012)
    color = green[:, None, None] * (shade * (1 - 0.3 * veins))
    img = low * (1 - leaf) + color * leaf
    # spots: the cultivar's (colour, count, half) plus 0-2 dark blight specks
    colour, tip = signature
    count, blight = int(u(1, 4)), int(u(0, 3))
    evidence = torch.zeros(size, size)
    for j in range(count + blight):
        lo = (0.55 if tip else 0.15) if j < count else 0.1
        sj = u(lo, lo + (0.3 if j < count else 0.8))
        bj = u(-0.6, 0.6) * width * math.sin(math.pi * sj) ** 0.8
        dist = ((s - sj) * 2 * length) ** 2 + (b - bj) ** 2
        spot = ((SPOT_RADIUS - dist.sqrt()) / edge + 0.5).clamp(0, 1) * leaf
        evidence = torch.maximum(evidence, spot) if j < count else evidence * (1 - spot)  # blight hides a spot
        rgb = PALETTE[colour] if j < count else torch.tensor([0.25, 0.18, 0.08])
        img = img * (1 - spot) + rgb[:, None, None] * spot
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8), evidence
