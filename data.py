"""Datasets and transforms for the paper's recipe.

- The UFG benchmark's five leaf datasets (Yu et al., ICCV 2021) from disk: as their release unpacks, in the
  CLCA authors' CSVs, or in class folders; `folder` reads any directory laid out one of these ways. Images may
  be resized once and kept (`resize_once`).
- `leaves` and `leaf-species`, the embedded data drawn by leaves.py, by the same `build_dataset`.
- `python data.py --dataset soyageing --data-dir DIR` checks a download before a long run (`check`).
"""
import sys

if sys.version_info < (3, 10):  # said in one line, before the first `str | None` below fails with a traceback
    sys.exit(f'error: this code needs Python 3.10 or newer, not {sys.version.split()[0]}: install a newer Python')

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import PIL
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from leaves import Leaves
from model import IMAGENET_MEAN, IMAGENET_STD, PAPER_SIZE


class Release(NamedTuple):
    """A UFG dataset as its release holds it: what a download is checked against."""
    classes: int
    train: int             # lines of anno/train.txt
    test: int              # lines of anno/test.txt
    csv_folder: str        # the image folder the CLCA authors' CSVs name (their own copies, for three)
    subsets: tuple = ()    # a release in parts: a folder per part, by these names, merged with shared labels


# SoyAgeing is released as five subsets (no R2), each with the same 198 cultivars under the same labels
AGEING = ('R1', 'R3', 'R4', 'R5', 'R6')
UFG = {'cotton': Release(80, 240, 240, 'cotton_square_new'), 'soylocal': Release(200, 600, 600, 'soybean200_square'),
       'soygene': Release(1110, 12763, 11143, 'images'), 'soyglobal': Release(1938, 5814, 5814, 'soybean2000'),
       'soyageing': Release(198, 4950, 4950, '.', AGEING),  # the CSVs' paths start R1/images/...
       **{f'soyageing-{r.lower()}': Release(198, 990, 990, '.', (r,)) for r in AGEING}}  # one subset alone
DATASETS = ('leaves', 'leaf-species', 'folder') + tuple(UFG)
AUGMENTATIONS = ('weak', 'trivial')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
LAYOUTS = {'csv': "the CLCA authors' CSVs", 'anno': "the benchmark's release (anno/*.txt, images/)",
           'folders': 'one folder per class'}


class DatasetError(ValueError):
    """Bad or missing data; the message says what is wrong and how to fix it."""


def resize(img_size: int) -> T.Resize:
    """The same for every epoch: a square bicubic resize to S/0.875 (448 -> 512), aspect ratio not kept."""
    big = int(img_size / 0.875)
    return T.Resize((big, big), interpolation=T.InterpolationMode.BICUBIC)


def transforms(img_size: int, augment, resized: bool = False):
    """The paper's pipeline up to the model's input, as uint8 (3, S, S): `resize`, then a centre crop
    (`augment` None: evaluation) or a random crop and flip ('weak', its published command line), then
    TrivialAugmentWide for 'trivial' (a config of its for Cotton and SoyLocal). `resized`: the input is
    already resized, uint8 (3, S/0.875, S/0.875); the same draws, the same pixels. Normalising is left to
    `Standardise`, on the model's device."""
    if augment not in (None, *AUGMENTATIONS):
        raise ValueError(f'unknown augmentation {augment!r}: choose one of {", ".join(AUGMENTATIONS)}')
    crop = [T.RandomCrop(img_size), T.RandomHorizontalFlip()] if augment else [T.CenterCrop(img_size)]
    crop += [T.TrivialAugmentWide()] if augment == 'trivial' else []
    return T.Compose(crop if resized else [resize(img_size), *crop, T.PILToTensor()])


class Standardise(torch.nn.Module):
    """uint8 images (B, 3, H, W), as every dataset here gives them, -> the model's float32 input on this
    module's device: / 255, less the mean, over the std, per channel. ToTensor's and Normalize's arithmetic in
    their order: the same bits as normalising each image in a loader worker, but the workers, their shared
    memory and the copy to a GPU carry 1 byte a pixel instead of 4. (255 is a tensor: CUDA divides by a Python
    number as a product with its reciprocal, one bit off for half the pixel values.)"""

    def __init__(self, mean, std):
        super().__init__()
        for name, value in (('mean', mean), ('std', std), ('scale', (255.0,) * 3)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def of(cls, dataset, device) -> 'Standardise':
        """The standardising that `dataset`'s images need (its `mean` and `std`), on `device`."""
        return cls(dataset.mean, dataset.std).to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.mean.device, non_blocking=True)
        return images.to(torch.float32).div_(self.scale).sub_(self.mean).div_(self.std)


class ImageList(Dataset):
    """(image path, 0-based label) pairs, read with PIL and converted to RGB; or, with `resized` (a file
    from `resize_once`), the same images already resized, memory-mapped from that file. Gives uint8 images."""

    def __init__(self, samples, num_classes, transform, resized=None, where=''):
        self.samples = samples
        self.where = where  # what was read, and from where (`described`)
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


def resized_file(samples, img_size: int) -> Path:
    """Where `resize_once` keeps the images of `samples` at `img_size`: a `.resized` folder beside the images,
    a name that hashes all the pixels depend on: each image's path, size and modification time, the side and
    PIL's version. A changed image or size gets a new file."""
    side = resize(img_size).size[0]
    folder = Path(os.path.commonpath([p.parent for p, _ in samples])) / '.resized'
    stamps = [(str(p.absolute()), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in samples]  # however typed
    key = hashlib.sha256(json.dumps([stamps, side, PIL.__version__]).encode()).hexdigest()[:16]
    return folder / f'{side}px-{key}.u8'


def resize_once(samples, img_size: int, workers: int) -> Path:
    """Decode and `resize` the images of `samples` once into one uint8 file (N, 3, side, side) at
    `resized_file`, unless it is there already; returns its path."""
    side = resize(img_size).size[0]
    try:
        path = resized_file(samples, img_size)
        if path.exists():
            return path
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # renamed when complete: never read half-done
        out = torch.from_file(str(tmp), shared=True, size=len(samples) * side * side * 3, dtype=torch.uint8)
    except OSError as e:
        raise DatasetError(f'{e.filename}: {e.strerror}; the images must be readable and a .resized folder beside '
                           'them writable (or train with --no-cache)') from None
    out = out.view(len(samples), 3, side, side)
    plain = ImageList(samples, 0, T.Compose([resize(img_size), T.PILToTensor()]))  # decoded, resized, uint8
    done = 0
    for images, _ in tqdm(DataLoader(plain, 32, num_workers=workers), desc=f'resizing {len(samples)} images once'):
        out[done:done + len(images)] = images  # (B, 3, side, side)
        done += len(images)
    del out
    os.replace(tmp, path)
    return path


def data_folders(root: Path, depth: int = 3) -> list:
    """`root` if it holds a dataset in one of the three layouts, else the folders below it that
    do, down to `depth` levels: a release unpacks inside wrappers (Cotton80/COTTON/,
    SoyAgeing/SoyAgeing-R1/R1/). Hidden folders, the __MACOSX copies some archives carry and
    folders this user cannot read (lost+found) are passed over."""
    try:
        if any((root / marker).exists() for marker in ('train_val.csv', 'test.csv', 'anno', 'train', 'test')):
            return [root]
        below = [Path(e.path) for e in os.scandir(root) if e.is_dir() and e.name[0] != '.' and e.name != '__MACOSX']
    except PermissionError:
        return []
    return [found for folder in sorted(below) if depth for found in data_folders(folder, depth - 1)]


def read_split(folder: Path, split: str, csv_folder: str = 'images'):
    """(samples, classes seen, layout) of `split` ('train' or 'test') in `folder`, from the
    first layout present: 'csv' (the CLCA authors' train_val.csv / test.csv), 'anno' (the
    release's anno/<split>.txt), 'folders'."""
    csv_file, txt = folder / {'train': 'train_val.csv', 'test': 'test.csv'}[split], folder / 'anno' / f'{split}.txt'
    if csv_file.is_file():  # columns class_id (0-based), dir (relative to the image folder)
        with open(csv_file, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(f)
            found = reader.fieldnames or []
            if not {'class_id', 'dir'} <= set(found):
                raise DatasetError(f'{csv_file}: expected columns class_id,dir, found {",".join(found)}')
            rows = [(r['dir'], r['class_id'], 0) for r in reader]
        # the folder the CSV names (the authors' own copies), or the release's images/ in its place
        bases = [folder / csv_folder, folder / csv_folder / 'images', folder / 'images']
        base = next((b for b in bases if rows and (b / rows[0][0]).is_file()), bases[0])
        # SoyAgeing's paths start R1/, which its release keeps one folder down, in SoyAgeing-R1/
        down = {r: f'SoyAgeing-{r}/' for r in AGEING
                if (base / f'SoyAgeing-{r}' / r).is_dir() and not (base / r).is_dir()}
        rows = [(down.get(name.split('/')[0], '') + name, label, first) for name, label, first in rows]
        layout = 'csv'
    elif txt.is_file():  # lines "<image> <1-based label>", images under images/
        rows = [line.rsplit(maxsplit=1) + [1] for line in txt.read_text().splitlines() if line.strip()]
        if any(len(r) != 3 for r in rows):
            raise DatasetError(f'{txt}: every line must read "<image> <1-based label>"')
        base, layout = folder / 'images', 'anno'
    elif (folder / split).is_dir():  # train/<class>/*.png, test/<class>/*.png; classes from train/
        folders = lambda where: sorted(d for d in where.iterdir() if d.is_dir() and not d.name.startswith('.'))
        classes = [d.name for d in folders(folder / 'train')] if (folder / 'train').is_dir() else []
        samples = []
        for d in folders(folder / split):  # hidden folders, such as .resized, are no classes
            if d.name not in classes:
                raise DatasetError(f'{d}: class folder {d.name!r} is not among the train/ classes')
            samples += [(f, classes.index(d.name)) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        return samples, len(classes), 'folders'
    else:
        return [], 0, None
    bad = [label for _, label, _ in rows if not label.strip().lstrip('-').isdigit()]
    if bad:
        raise DatasetError(f'{csv_file if layout == "csv" else txt}: label {bad[0]!r} is not an integer')
    samples = [(base / name, int(label) - first) for name, label, first in rows]  # 0-based
    return samples, 1 + max((label for _, label in samples), default=-1), layout


def subset_of(path: Path, root: Path) -> str | None:
    """The SoyAgeing subset folder (R1, R3, ...) `path` lies in, below `root` or `root` itself, or None."""
    return next((part for part in path.absolute().relative_to(root.absolute().parent).parts if part in AGEING), None)


def dataset_folders(root: Path, name: str, release) -> list:
    """The folders under `root` that hold dataset `name`: one, or for SoyAgeing one per subset found (each
    once) of those `name` asks for; anything else beside them is refused, not merged."""
    folders = data_folders(root)
    if len(folders) > 1 and not release.subsets:
        raise DatasetError(f'{root} holds {len(folders)} datasets ({", ".join(map(str, folders[:3]))}): pass the one '
                           'you mean as --data-dir')
    if len(folders) < 2:  # none, one dataset, one subset, or the subsets in one folder (the authors' CSVs)
        return folders
    parts = [subset_of(f, root) for f in folders]
    odd = [f for f, part in zip(folders, parts) if part is None or parts.count(part) > 1]
    if odd:
        raise DatasetError(f'{odd[0]} is no {name} subset, or a second copy of one: keep only the subsets '
                           f'({" ".join(AGEING)}) in {root}, or pass the folder that holds them as --data-dir')
    if not set(parts) & set(release.subsets):
        raise DatasetError(f'{root} holds SoyAgeing subsets {" ".join(sorted(parts))}, not {name}\'s '
                           f'{" ".join(release.subsets)}')
    return [f for f, part in zip(folders, parts) if part in release.subsets]


def find_samples(name: str, split: str, data_dir=None):
    """(samples, num_classes, {folder: layout}, root) of `split` of dataset `name` on disk, checked: every
    label a class, every listed image there. A release in parts (SoyAgeing) merges the parts found, labels as
    they are. A UFG split that differs from its release is said in one line, and the run goes on."""
    release = UFG.get(name, Release(0, 0, 0, 'images'))
    root = Path(data_dir or f'data/{name.partition("-")[0]}')  # soyageing-r1 lives in data/soyageing too
    if not root.is_dir():
        raise DatasetError(f'dataset folder {root} does not exist: pass --data-dir, or put the {name} data there '
                           '(get it from the UFG benchmark, Yu et al., ICCV 2021; README: Data)')
    samples, seen, read = [], 0, {}
    for folder in dataset_folders(root, name, release):
        found, classes, layout = read_split(folder, split, release.csv_folder)
        samples, seen, read = samples + found, max(seen, classes), read | ({folder: layout} if layout else {})
    if not read:
        raise DatasetError(
            f'no {split} split found in {root} or the folders below it: looked for train_val.csv/test.csv (the CLCA '
            f"authors' CSVs), anno/{split}.txt with images/ (the UFG benchmark release) or {split}/<class>/ folders. "
            'Get the UFG benchmark (Yu et al., ICCV 2021) and unpack it there (README: Data).')
    if release.subsets:  # soyageing-r1 is R1 alone; an image in no subset folder belongs to the whole only
        keep = (*release.subsets, None) if release.subsets == AGEING else release.subsets
        samples = [(p, c) for p, c in samples if subset_of(p, root) in keep]
    if name not in UFG and split != 'train':  # a folder's classes are those of its training split
        seen = max(seen, find_samples(name, 'train', data_dir)[1])
    num_classes = release.classes or seen
    if not samples:
        raise DatasetError(f'the {split} split in {root} has no images' + (
            f' of subsets {" ".join(release.subsets)} (folders of those names)' if release.subsets else ''))
    bad = [(p, c) for p, c in samples if not 0 <= c < num_classes]
    if bad:
        raise DatasetError(f'{bad[0][0]}: label {bad[0][1]} is outside 0..{num_classes - 1} '
                           f'({name} has {num_classes} classes)')
    missing = [p for p, _ in samples if not p.is_file()]
    if missing:
        raise DatasetError(f'{len(missing):,} of the {len(samples):,} {split} images listed are missing, e.g. '
                           f'{missing[0]}: an incomplete download or unpacking? (python data.py shows what is found)')
    note = unlike_release(name, split, samples, root) if name in UFG else None
    if note and os.environ.get('RANK', '0') == '0':  # once under torchrun
        print(f'warning: {note}', file=sys.stderr)
    return samples, num_classes, read, root


def unlike_release(name: str, split: str, samples, root: Path) -> str | None:
    """One line on how a UFG split found on disk differs from the benchmark's release; None if it does not."""
    release, classes = UFG[name], len({c for _, c in samples})
    expected = getattr(release, split)
    if (len(samples), classes) == (expected, release.classes):
        return None
    found = sorted({subset_of(p, root) for p, _ in samples} - {None}) if release.subsets else []
    return (f'{name} {split}: found {len(samples):,} images of {classes} classes'
            + (f' in subsets {" ".join(found)} of {" ".join(release.subsets)}' if found else '')
            + f'; the benchmark has {expected:,} of {release.classes}: a subset missing or a partial download? '
            'Going on')


def described(read: dict) -> str:
    """What {folder: layout} says: each layout read, and in which folders (below the one they share)."""
    said = []
    for layout in sorted(set(read.values())):
        folders = sorted(f for f in read if read[f] == layout)
        top = Path(os.path.commonpath(folders))
        said.append(f'{LAYOUTS[layout]} in {top}' + ': ' * (len(folders) > 1) + ', '.join(
            str(f.relative_to(top)) for f in folders if f != top))
    return '; '.join(said)


def build_dataset(name: str, split: str, img_size: int, data_dir=None, mean=None, std=None, augment=None,
                  cache_workers=None):
    """Returns (dataset, num_classes): a dataset of uint8 images and labels, whose `mean` and `std` say how to
    `Standardise` them, ImageNet's unless given (the reference's choice). `augment` is None or one of
    AUGMENTATIONS (`transforms`). With `cache_workers` (loader processes) the images are resized once
    (`resize_once`), except for TrivialAugment, which works on PIL images."""
    if name in ('leaves', 'leaf-species'):  # drawn at the resized side already
        tf = transforms(img_size, augment, resized=True)
        ds = Leaves(split, resize(img_size).size[0], tf, task='species' if name == 'leaf-species' else 'cultivar')
    elif name in DATASETS:
        samples, num_classes, read, root = find_samples(name, split, data_dir)
        cached = cache_workers is not None and augment != 'trivial'
        resized = resize_once(samples, img_size, cache_workers) if cached else None
        ds = ImageList(samples, num_classes, transforms(img_size, augment, cached), resized, described(read))
    else:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    ds.mean, ds.std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    return ds, ds.num_classes


def check(name: str, data_dir=None, img_size: int = PAPER_SIZE, sample: int = 20):
    """Print what a dataset on disk holds, before a long run: the layout read and where, the
    images per split (and subset), the classes, the sizes of a sample of images, and the disk
    space `--cache` takes at `img_size`."""
    splits = {split: find_samples(name, split, data_dir) for split in ('train', 'test')}
    _, num_classes, read, root = splits['train']
    read |= splits['test'][2]
    print(f'{name}, {num_classes} classes: {described(read)}')
    sizes, unreadable = Counter(), []
    for split, (samples, _, _, _) in splits.items():
        subsets = Counter(subset_of(p, root) for p, _ in samples)
        per = ' '.join(f'{s} {subsets[s]:,}' for s in AGEING if s in subsets)
        print(f'  {split}: {len(samples):,} images of {len({c for _, c in samples})} classes' + f' ({per})' * bool(per))
        for path, _ in samples[::max(1, 2 * len(samples) // sample)]:  # sample / 2, spread over the split
            try:
                with Image.open(path) as img:
                    sizes[f'{img.width}x{img.height} {img.mode}'] += 1
            except (OSError, ValueError) as e:
                unreadable.append(f'{path} ({e})')
    print(f'  image sizes in a sample of {sum(sizes.values()) + len(unreadable)}: '
          + ', '.join([f'{s} ({n})' for s, n in sizes.items()] + [f'{len(unreadable)} unreadable'] * bool(unreadable))
          + (f', e.g. {unreadable[0]}' if unreadable else ''))
    for split, (samples, _, _, _) in splits.items():
        path, side = resized_file(samples, img_size), resize(img_size).size[0]
        size, free = len(samples) * 3 * side * side, shutil.disk_usage(next(p for p in path.parents if p.exists())).free
        print(f'  --cache at {img_size} px, {split}: ' + (f'{size / 2**30:.1f} GiB' if size > 2**30 else
              f'{size / 2**20:.0f} MiB') + f' in {path.parent} ({"built" if path.exists() else "not built yet"}; '
              f'{free / 2**30:.0f} GiB free there)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Check a dataset on disk before training: what is found, what it lacks.')
    p.add_argument('--dataset', choices=DATASETS[2:], required=True, help='folder or a UFG dataset')
    p.add_argument('--data-dir', help='dataset folder (default data/<dataset>)')
    p.add_argument('--img-size', type=int, default=PAPER_SIZE, help='the size to train at, for --cache (default 448)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        check(args.dataset, args.data_dir, args.img_size)
    except (DatasetError, OSError) as e:  # OSError: a file this user may not read
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
