"""Datasets and transforms for the paper's recipe.

- The UFG benchmark's five leaf datasets (Yu et al., ICCV 2021) from disk in any of three layouts, found by
  themselves; `folder` reads any directory in one of them. Images may be resized once and kept (`resize_once`).
- `leaves` and `leaf-species`, the embedded data drawn by leaves.py, by the same `build_dataset`.
"""
import csv
import hashlib
import json
import math
import os
from pathlib import Path

import PIL
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from leaves import Leaves
from model import IMAGENET_MEAN, IMAGENET_STD

# name: (classes, image folder of the official CSV layout); the UFG benchmark's five leaf datasets
UFG = {'cotton': (80, 'cotton_square_new'), 'soylocal': (200, 'soybean200_square'),
       'soygene': (1110, 'images'), 'soyglobal': (1938, 'soybean2000'), 'soyageing': (198, '.')}
DATASETS = ('leaves', 'leaf-species', 'folder') + tuple(UFG)
AUGMENTATIONS = ('weak', 'trivial')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


class DatasetError(ValueError):
    """Bad or missing data; the message says what is wrong and how to fix it."""


def resize(img_size: int) -> T.Resize:
    """The same for every epoch: a square bicubic resize to S/0.875 (448 -> 512), aspect ratio not kept."""
    big = int(img_size / 0.875)
    return T.Resize((big, big), interpolation=T.InterpolationMode.BICUBIC)


def transforms(img_size: int, augment, mean, std, resized: bool = False):
    """The paper's pipeline: `resize`, then a centre crop (`augment` None: evaluation) or a random crop and flip
    ('weak', its published command line), then TrivialAugmentWide for 'trivial' (a config of its for Cotton and
    SoyLocal). `resized`: the input is already resized, uint8 (3, S/0.875, S/0.875); the same draws, same pixels."""
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


class ImageList(Dataset):
    """(image path, 0-based label) pairs, read with PIL and converted to RGB; or, with `resized` (a file
    from `resize_once`), the same images already resized, memory-mapped from that file."""

    def __init__(self, samples, num_classes, transform, resized=None):
        self.samples = samples
        self.num_classes = num_classes
        self.transform = transform
        self.resized = resized
        self.pixels = None  # the mapped file, (N, 3, side, side) uint8, opened on first use in each process

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        if self.resized is not None:
            if self.pixels is None:
                pixels = torch.from_file(str(self.resized), size=self.resized.stat().st_size, dtype=torch.uint8)
                side = math.isqrt(len(pixels) // (3 * len(self)))
                self.pixels = pixels.view(len(self), 3, side, side)
            return self.transform(self.pixels[i]), label
        try:
            with Image.open(path) as img:
                img = img.convert('RGB')
        except (OSError, ValueError) as e:
            raise DatasetError(f'cannot read image {path}: {e}') from None
        return self.transform(img), label


def resize_once(samples, img_size: int, workers: int) -> Path:
    """Decode and `resize` the images of `samples` once into one uint8 file (N, 3, side, side) in a `.resized`
    folder beside the images; returns its path. Its name hashes all its pixels depend on: each image's path,
    size and modification time, the side and PIL's version: a changed image or size gets a new file."""
    side = resize(img_size).size[0]
    folder = Path(os.path.commonpath([p.parent for p, _ in samples])) / '.resized'
    try:
        stamps = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in samples]
        key = hashlib.sha256(json.dumps([stamps, side, PIL.__version__]).encode()).hexdigest()[:16]
        path = folder / f'{side}px-{key}.u8'
        if path.exists():
            return path
        folder.mkdir(exist_ok=True)
        tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # renamed when complete: no half-written file is used
        out = torch.from_file(str(tmp), shared=True, size=len(samples) * side * side * 3, dtype=torch.uint8)
    except OSError as e:
        raise DatasetError(f'{e.filename}: {e.strerror}; the images must be readable and {folder} writable '
                           '(or train with --no-cache)') from None
    out = out.view(len(samples), 3, side, side)
    plain = ImageList(samples, 0, T.Compose([resize(img_size), T.PILToTensor()]))  # decoded and resized, as uint8
    done = 0
    for images, _ in tqdm(DataLoader(plain, 32, num_workers=workers), desc=f'resizing {len(samples)} images once'):
        out[done:done + len(images)] = images  # (B, 3, side, side)
        done += len(images)
    del out
    os.replace(tmp, path)
    return path


def find_samples(root: Path, split: str, image_dir: str = 'images'):
    """Samples of `split` ('train' or 'test') under `root` and the number of classes seen, from the
    first layout that is present: (a) the official code's CSVs, (b) the benchmark's anno/*.txt,
    (c) one folder per class."""
    csv_file, txt = root / {'train': 'train_val.csv', 'test': 'test.csv'}[split], root / 'anno' / f'{split}.txt'
    if csv_file.is_file():  # (a) columns class_id (0-based), dir (relative to the image folder)
        with open(csv_file, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(f)
            found = reader.fieldnames or []
            if not {'class_id', 'dir'} <= set(found):
                raise DatasetError(f'{csv_file}: expected columns class_id,dir, found {",".join(found)}')
            rows = [(root / image_dir / r['dir'], r['class_id'], 0) for r in reader]
    elif txt.is_file():  # (b) lines "<image> <1-based label>"
        rows = [line.rsplit(maxsplit=1) for line in txt.read_text().splitlines() if line.strip()]
        if any(len(r) != 2 for r in rows):
            raise DatasetError(f'{txt}: every line must read "<image> <1-based label>"')
        rows = [(root / 'images' / name, label, 1) for name, label in rows]
    elif (root / split).is_dir():  # (c) train/<class>/*.png, test/<class>/*.png; classes from train/
        folders = lambda where: sorted(d for d in where.iterdir() if d.is_dir() and not d.name.startswith('.'))
        classes = [d.name for d in folders(root / 'train')] if (root / 'train').is_dir() else []
        samples = []
        for d in folders(root / split):  # hidden folders, such as .resized, are no classes
            if d.name not in classes:
                raise DatasetError(f'{d}: class folder {d.name!r} is not among the train/ classes')
            samples += [(f, classes.index(d.name)) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        return samples, len(classes)
    else:
        raise DatasetError(
            f'no {split} split found in {root}: looked for train_val.csv/test.csv (the official CLCA code), '
            f'anno/{split}.txt with images/ (the UFG benchmark release) or {split}/<class>/ folders. '
            'Get the UFG benchmark (Yu et al., ICCV 2021) and lay it out one of these ways (README: Data).')
    bad = [label for _, label, _ in rows if not label.strip().lstrip('-').isdigit()]
    if bad:
        raise DatasetError(f'{csv_file if csv_file.is_file() else txt}: label {bad[0]!r} is not an integer')
    samples = [(path, int(label) - first) for path, label, first in rows]  # 0-based
    return samples, 1 + max((label for _, label in samples), default=-1)


def build_dataset(name: str, split: str, img_size: int, data_dir=None, mean=None, std=None, augment=None,
                  cache_workers=None):
    """Returns (dataset, num_classes). `mean`/`std` default to ImageNet's (the reference's choice); `augment` is
    None or one of AUGMENTATIONS (`transforms`). With `cache_workers` (loader processes) the images are resized
    once (`resize_once`), except for TrivialAugment, which works on PIL images."""
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    if name in ('leaves', 'leaf-species'):  # drawn at the resized side already
        tf = transforms(img_size, augment, mean, std, resized=True)
        ds = Leaves(split, resize(img_size).size[0], tf, task='species' if name == 'leaf-species' else 'cultivar')
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
    if cache_workers is None or augment == 'trivial':
        return ImageList(samples, num_classes, transforms(img_size, augment, mean, std)), num_classes
    resized = resize_once(samples, img_size, cache_workers)
    return ImageList(samples, num_classes, transforms(img_size, augment, mean, std, resized=True), resized), num_classes
