"""Datasets and transforms for the paper's recipe, and the embedded demo data.

- The five ultra-fine-grained leaf datasets of the UFG benchmark (Yu et al., ICCV 2021) from disk, in
  any of three layouts, detected automatically; `folder` reads any directory in one of them.
- `leaves`: embedded, procedural leaf "cultivars", each a leaf length and a spot colour: the class lives
  in the whole outline and in a handful of patches, and a reduction keeps only a few of them.
- `leaf-species`: the same generator labelled by leaf outline instead, with spots that mean nothing.
  It stands in for ImageNet: the demo fine-tunes a ViT pre-trained on it, whose early attention
  has learnt to look at the outline, not at the cultivars' spots, as an ImageNet ViT's has.
"""
import csv
import hashlib
import json
import math
import os
import re
import zlib
from pathlib import Path

import PIL
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from model import IMAGENET_MEAN, IMAGENET_STD

# name: (classes, image folder of the official CSV layout); the UFG benchmark's five leaf datasets
UFG = {'cotton': (80, 'cotton_square_new'), 'soylocal': (200, 'soybean200_square'),
       'soygene': (1110, 'images'), 'soyglobal': (1938, 'soybean2000'), 'soyageing': (198, '.')}
DATASETS = ('leaves', 'leaf-species', 'folder') + tuple(UFG)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


class DatasetError(ValueError):
    """Bad or missing data; the message says what is wrong and how to fix it."""


AUGMENTATIONS = ('weak', 'trivial')


def resize(img_size: int) -> T.Resize:
    """The deterministic half of the paper's transforms: a square bicubic resize to S/0.875 (448 -> 512),
    aspect ratio not kept, as in the reference."""
    big = int(img_size / 0.875)
    return T.Resize((big, big), interpolation=T.InterpolationMode.BICUBIC)


def transforms(img_size: int, augment, mean, std, resized: bool = False):
    """The paper's pipeline: `resize`, then a centre crop (`augment` None: evaluation) or a random crop and
    flip ('weak', the paper's published command line), followed by TrivialAugmentWide for 'trivial' (one of
    the paper's configs for its two smallest datasets, Cotton and SoyLocal). `resized`: the input is already
    resized, a uint8 tensor (3, S/0.875, S/0.875) from `resize_once`; the same random draws give the same pixels."""
    if augment not in (None, *AUGMENTATIONS):
        raise ValueError(f'unknown augmentation {augment!r}: choose one of {", ".join(AUGMENTATIONS)}')
    crop = [T.RandomCrop(img_size), T.RandomHorizontalFlip()] if augment else [T.CenterCrop(img_size)]
    crop += [T.TrivialAugmentWide()] if augment == 'trivial' else []
    if resized:  # the same arithmetic as ToTensor and Normalize, in place: one new tensor per image, not three
        return T.Compose([*crop, T.Lambda(to_unit), T.Normalize(mean, std, inplace=True)])
    return T.Compose([resize(img_size), *crop, T.ToTensor(), T.Normalize(mean, std)])


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 in [0, 1], divided by 255 as ToTensor divides."""
    return image.to(torch.float32).div_(255)


def read_image(path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert('RGB')
    except (OSError, ValueError) as e:
        raise DatasetError(f'cannot read image {path}: {e}') from None


class ImageList(Dataset):
    """(image path, 0-based label) pairs, read with PIL and converted to RGB; or, with `resized` (a file
    from `resize_once`), the same images already resized, memory-mapped from that file."""

    def __init__(self, samples, num_classes, transform, resized=None):
        self.samples, self.num_classes, self.transform, self.resized = samples, num_classes, transform, resized
        self.pixels = None  # the mapped file, (N, 3, side, side) uint8, opened on first use in each process

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if self.resized is None:
            return self.transform(read_image(self.samples[i][0])), self.samples[i][1]
        if self.pixels is None:
            side = int(re.match(r'(\d+)px', self.resized.name)[1])
            self.pixels = torch.from_file(str(self.resized), size=len(self) * side * side * 3, dtype=torch.uint8)
            self.pixels = self.pixels.view(len(self), 3, side, side)
        return self.transform(self.pixels[i]), self.samples[i][1]

    def __getstate__(self):  # a worker process maps the file itself
        return {**self.__dict__, 'pixels': None}


def resize_once(dataset: ImageList, img_size: int, workers: int) -> Path:
    """Decode and `resize` every image of `dataset` once into one uint8 file (N, 3, side, side) in a `.resized`
    folder beside the images, and return its path; an epoch then only crops, flips and normalises. The file's
    name holds a hash of everything its pixels depend on: each image's path, size in bytes and modification
    time, the side and PIL's version. A changed image, dataset or size gets a new file, never stale pixels."""
    side = int(img_size / 0.875)
    try:
        stamps = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in dataset.samples]
    except OSError as e:
        raise DatasetError(f'cannot read image {e.filename}: {e.strerror}') from None
    key = hashlib.sha256(json.dumps([stamps, side, PIL.__version__]).encode()).hexdigest()[:16]
    path = Path(os.path.commonpath([p.parent for p, _ in dataset.samples])) / '.resized' / f'{side}px-{key}.u8'
    if path.exists():
        return path
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # renamed when complete: no half-written file is used
        out = torch.from_file(str(tmp), shared=True, size=len(dataset) * side * side * 3, dtype=torch.uint8)
    except OSError as e:
        raise DatasetError(f'cannot write the resized images to {path.parent} ({e.strerror}): make it writable, '
                           'or train with --no-cache') from None
    out = out.view(len(dataset), 3, side, side)
    plain = ImageList(dataset.samples, dataset.num_classes, T.Compose([resize(img_size), T.PILToTensor()]))
    done = 0
    for images, _ in tqdm(DataLoader(plain, 32, num_workers=workers), desc=f'resizing {len(dataset)} images once'):
        out[done:done + len(images)] = images  # (B, 3, side, side)
        done += len(images)
    del out
    os.replace(tmp, path)
    return path


def find_samples(root: Path, split: str, image_dir: str = 'images'):
    """Samples of `split` ('train' or 'test') under `root` and the number of classes seen, from the
    first layout that is present: (a) the official code's CSVs, (b) the benchmark's anno/*.txt,
    (c) one folder per class."""
    csv_file = root / {'train': 'train_val.csv', 'test': 'test.csv'}[split]
    if csv_file.is_file():  # (a) columns class_id (0-based), dir (relative to the image folder)
        with open(csv_file, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(f)
            if not {'class_id', 'dir'} <= set(reader.fieldnames or ()):
                found = ','.join(reader.fieldnames or [])
                raise DatasetError(f'{csv_file}: expected columns class_id,dir, found {found}')
            rows = [(r['dir'], r['class_id']) for r in reader]
        samples = [(root / image_dir / d, _label(c, csv_file)) for d, c in rows]
    elif (root / 'anno' / f'{split}.txt').is_file():  # (b) lines "<image> <1-based label>"
        txt = root / 'anno' / f'{split}.txt'
        rows = [line.rsplit(maxsplit=1) for line in txt.read_text().splitlines() if line.strip()]
        if any(len(r) != 2 for r in rows):
            raise DatasetError(f'{txt}: every line must read "<image> <1-based label>"')
        samples = [(root / 'images' / name, _label(c, txt) - 1) for name, c in rows]
    elif (root / split).is_dir():  # (c) train/<class>/*.png, test/<class>/*.png; classes from train/
        classes = sorted(d.name for d in (root / 'train').iterdir() if d.is_dir()) if (root / 'train').is_dir() else []
        samples = []
        for d in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if d.name not in classes:
                raise DatasetError(f'{d}: class folder {d.name!r} is not among the train/ classes')
            samples += [(f, classes.index(d.name)) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        return samples, len(classes)
    else:
        raise DatasetError(
            f'no {split} split found in {root}: looked for train_val.csv/test.csv (the official CLCA code), '
            f'anno/{split}.txt with images/ (the UFG benchmark release) or {split}/<class>/ folders. '
            'Get the UFG benchmark (Yu et al., ICCV 2021) and lay it out one of these ways (README: Data).')
    return samples, 1 + max((label for _, label in samples), default=-1)


def _label(text, where) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f'{where}: label {text!r} is not an integer') from None


def build_dataset(name: str, split: str, img_size: int, data_dir=None, mean=None, std=None, augment=None,
                  cache_workers=None):
    """Returns (dataset, num_classes). `mean`/`std` default to ImageNet's (the reference's choice);
    `augment` is None (no augmentation) or one of AUGMENTATIONS (see `transforms`). With `cache_workers` (a
    number of loader processes) images are resized once (`resize_once`), except for TrivialAugment's, which
    stays on PIL images."""
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    tf = transforms(img_size, augment, mean, std)
    if name in ('leaves', 'leaf-species'):
        ds = Leaves(split, img_size, tf, task='species' if name == 'leaf-species' else 'cultivar')
        return ds, ds.num_classes
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    root = Path(data_dir or f'data/{name}')
    if not root.is_dir():
        raise DatasetError(f'dataset folder {root} does not exist: pass --data-dir, or put the {name} data there '
                           '(get it from the UFG benchmark, Yu et al., ICCV 2021; README: Data)')
    samples, seen = find_samples(root, split, UFG.get(name, (0, 'images'))[1])
    if name not in UFG and split != 'train':  # a folder's classes are those of its training split
        seen = max(seen, find_samples(root, 'train', 'images')[1])
    num_classes = UFG[name][0] if name in UFG else seen
    if not samples:
        raise DatasetError(f'the {split} split in {root} has no images')
    bad = [(p, c) for p, c in samples if not 0 <= c < num_classes]
    if bad:
        raise DatasetError(f'{bad[0][0]}: label {bad[0][1]} is outside 0..{num_classes - 1} '
                           f'({name} has {num_classes} classes)')
    dataset = ImageList(samples, num_classes, tf)
    if cache_workers is None or augment == 'trivial':
        return dataset, num_classes
    resized = resize_once(dataset, img_size, cache_workers)
    return ImageList(samples, num_classes, transforms(img_size, augment, mean, std, resized=True), resized), num_classes


# ---------------------------------------------------------------------------------------------
# The embedded dataset: synthetic leaf cultivars

SPOT_RADIUS = 0.12  # in the generator's [-1, 1] image coordinates: a spot is 12 % of the image wide
PALETTE = torch.tensor([[0.98, 0.86, 0.15], [0.85, 0.12, 0.10], [0.97, 0.97, 0.95],
                        [0.55, 0.20, 0.70], [0.98, 0.50, 0.05]])  # spot colours: yellow, red, white, purple, orange


class Leaves(Dataset):
    """Procedural leaves in a random pose, shade and background, with 1-3 small coloured spots (each
    12 % of the image wide, four fifths of an 8-px patch at 48 px) and 0-2 dark blight specks as distractors.

    task 'cultivar' (`leaves`): a class is the leaf's length (5 lengths) and its spots' colour (yellow or
    red); the leaf's width and the half the spots sit in (stalk or tip) are drawn at random. So a class
    lives in two places, as a UFG cultivar's does: in the outline, spread over the whole leaf, and in
    the few patches of its marks.
    task 'species' (`leaf-species`): a class is the leaf's outline (5 lengths x 2 widths); the spots'
    signature is drawn at random, so they carry no label.
    Both: `factors` splits a label in two; length index k is a leaf 0.5 + 0.1 k long (half its extent in [-1, 1]).
    Deterministic: image i of a split depends only on (seed, task, split, i).
    """

    per_class = {'train': 400, 'test': 300}  # images per class and split
    cache_bytes = 2**30  # keep a split's rendered images in memory when they fit in this

    num_classes = 10

    def __init__(self, split, img_size, transform, seed=0, task='cultivar'):
        self.split, self.size, self.transform, self.task = split, int(img_size / 0.875), transform, task
        self.img_size, self.seed, self.n = img_size, seed, self.num_classes * self.per_class[split]
        self.rendered = {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        label = i % self.num_classes
        img = self.rendered.get(i)
        if img is None:  # an image is the same every epoch: draw it once (35 MB for the demo's 4,000)
            img = self.render(i)[0]
            if self.n * img.numel() <= self.cache_bytes:
                self.rendered[i] = img
        return self.transform(to_pil_image(img)), label

    def factors(self, label) -> dict:
        """The two things class `label` (an int or a tensor of them) is made of, each as an index: for a
        cultivar the spots' colour and the leaf's length, for a species the leaf's width and length."""
        return {'spot colour' if self.task == 'cultivar' else 'width': label // 5, 'length': label % 5}

    def evidence(self, i, patch: int) -> torch.Tensor:
        """(P,) bool, patches in row-major order: where the class evidence of image i lies after the test
        transform (the centre crop), i.e. the patches that hold at least a fifth of a signature spot.
        For leaf-species these are the spots too, though there they carry no label."""
        cover = T.functional.center_crop(self.render(i)[1][None], [self.img_size])[0]  # (S, S) in [0, 1]
        side = self.img_size // patch
        cells = cover[:side * patch, :side * patch].reshape(side, patch, side, patch).sum((1, 3))  # (side, side)
        return cells.flatten() >= 0.2 * math.pi * (SPOT_RADIUS * self.size / 2) ** 2

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
