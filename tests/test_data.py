import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from torch.utils.data import DataLoader

from data import DatasetError, build_dataset, transforms

ROOT = Path(__file__).resolve().parents[1]


def image(path: Path, mode='RGB', size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def csv_layout(root, rows_train, rows_test, image_dir='soybean200_square', header='class_id,dir'):
    for name, rows in (('train_val.csv', rows_train), ('test.csv', rows_test)):
        (root / name).write_text('\n'.join([header] + [f'{c},{d}' for c, d in rows]) + '\n')
        for _, d in rows:
            image(root / image_dir / d)


def test_layout_a_official_csvs(tmp_path):
    csv_layout(tmp_path, [(0, 'a/1.png'), (199, 'b/2.png')], [(5, 'c/3.png')])
    train, classes = build_dataset('soylocal', 'train', 32, tmp_path)
    assert classes == 200 and len(train) == 2 and train[1][1] == 199
    assert train[0][0].shape == (3, 32, 32)
    test, _ = build_dataset('soylocal', 'test', 32, tmp_path)
    assert [label for _, label in test.samples] == [5]


def test_layout_b_benchmark_anno_files_with_one_based_labels(tmp_path):
    (tmp_path / 'anno').mkdir()
    (tmp_path / 'anno' / 'train.txt').write_text('1.png 1\n2.png 80\n')
    (tmp_path / 'anno' / 'test.txt').write_text('3.png 3\n')
    for n in (1, 2, 3):
        image(tmp_path / 'images' / f'{n}.png')
    train, classes = build_dataset('cotton', 'train', 32, tmp_path)
    assert classes == 80 and [label for _, label in train.samples] == [0, 79]
    assert build_dataset('cotton', 'test', 32, tmp_path)[0].samples[0][1] == 2


def test_layout_c_class_folders_and_non_rgb_images(tmp_path):
    image(tmp_path / 'train' / 'ash' / 'x.png', mode='L')
    image(tmp_path / 'train' / 'oak' / 'y.png', mode='RGBA')
    image(tmp_path / 'train' / 'oak' / 'z.jpg', mode='CMYK')
    image(tmp_path / 'test' / 'oak' / 'w.png', mode='P')
    train, classes = build_dataset('folder', 'train', 32, tmp_path)
    assert classes == 2 and [label for _, label in train.samples] == [0, 1, 1]
    assert all(train[i][0].shape == (3, 32, 32) for i in range(3))
    test, _ = build_dataset('folder', 'test', 32, tmp_path)
    assert test.samples[0][1] == 1 and test[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize('make,match', [
    (lambda r: None, 'does not exist'),
    (lambda r: r.mkdir(), 'no train split found'),
    (lambda r: (r.mkdir(), csv_layout(r, [(0, 'a.png')], [], header='label,path')), 'expected columns class_id,dir'),
    (lambda r: (r.mkdir(), csv_layout(r, [(200, 'a.png')], [])), 'outside 0..199'),
    (lambda r: (r.mkdir(), csv_layout(r, [('x', 'a.png')], [])), 'not an integer'),
    (lambda r: (r.mkdir(), csv_layout(r, [], [])), 'has no images'),
])
def test_bad_data_is_refused_with_a_clear_message(tmp_path, make, match):
    root = tmp_path / 'soylocal'
    make(root)
    with pytest.raises(DatasetError, match=match):
        build_dataset('soylocal', 'train', 32, root)


def test_unknown_test_class_and_unreadable_image_are_named(tmp_path):
    image(tmp_path / 'train' / 'oak' / 'a.png')
    image(tmp_path / 'test' / 'elm' / 'b.png')
    with pytest.raises(DatasetError, match="'elm' is not among the train/ classes"):
        build_dataset('folder', 'test', 32, tmp_path)
    (tmp_path / 'train' / 'oak' / 'broken.png').write_bytes(b'not a png')
    train, _ = build_dataset('folder', 'train', 32, tmp_path)
    with pytest.raises(DatasetError, match='cannot read image .*broken.png'):
        train[1]


def test_missing_dataset_on_the_command_line_is_one_line_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, 'train.py', '--dataset', 'cotton', '--data-dir', str(tmp_path / 'no')],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and 'Traceback' not in run.stderr
    assert run.stderr.strip().count('\n') == 0 and 'UFG benchmark' in run.stderr and 'does not exist' in run.stderr


def test_transforms_follow_the_paper():
    train, test = transforms(448, 'weak', (0, 0, 0), (1, 1, 1)), transforms(448, None, (0, 0, 0), (1, 1, 1))
    assert train.transforms[0].size == (512, 512) and test.transforms[1].size == (448, 448)
    img = Image.new('RGB', (700, 300))
    assert train(img).shape == test(img).shape == (3, 448, 448)
    names = lambda tf: [type(t).__name__ for t in tf.transforms]
    assert names(train) == ['Resize', 'RandomCrop', 'RandomHorizontalFlip', 'ToTensor', 'Normalize']
    trivial = transforms(448, 'trivial', (0, 0, 0), (1, 1, 1))  # the paper's configs for Cotton and SoyLocal
    assert names(trivial) == names(train)[:3] + ['TrivialAugmentWide'] + names(train)[3:]
    assert trivial(img).shape == (3, 448, 448)
    with pytest.raises(ValueError, match='unknown augmentation'):
        transforms(448, 'strong', (0, 0, 0), (1, 1, 1))


def photo(path: Path, size, mode='RGB', seed=0):
    """A noisy image, so that a resize or a crop one pixel off shows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    Image.frombytes('RGB', size, pixels.numpy().tobytes()).convert(mode).save(path)
    return path


def test_resizing_once_gives_the_same_batches_bit_for_bit(tmp_path):
    for k, (size, mode, suffix) in enumerate([((90, 70), 'RGB', 'png'), ((60, 100), 'L', 'jpg'), ((75, 75), 'RGBA', 'png'),
                                              ((120, 50), 'P', 'png')]):
        for split in ('train', 'test'):
            photo(tmp_path / split / f'c{k % 2}' / f'{k}.{suffix}', size, mode, seed=k)
    for split, augment in (('train', 'weak'), ('test', None)):
        plain, _ = build_dataset('folder', split, 32, tmp_path, augment=augment)
        cached, _ = build_dataset('folder', split, 32, tmp_path, augment=augment, cache_workers=0)
        assert cached.resized is not None and plain.resized is None
        for workers in (0, 2):  # the random crops and flips come from the same draws, in workers too
            batches = []
            for ds in (plain, cached):
                torch.manual_seed(5)  # what the main process draws from, with no workers
                batches.append(list(DataLoader(ds, 2, shuffle=True, num_workers=workers,
                                               generator=torch.Generator().manual_seed(5))))
            for (a, la), (b, lb) in zip(*batches):
                assert torch.equal(a, b) and torch.equal(la, lb)
    assert build_dataset('folder', 'train', 32, tmp_path, augment='trivial', cache_workers=0)[0].resized is None


def test_the_resized_file_follows_the_images_and_the_size(tmp_path):
    for k in range(3):
        photo(tmp_path / 'train' / f'c{k}' / 'a.png', (40, 40), seed=k)
    first = build_dataset('folder', 'train', 32, tmp_path, cache_workers=0)[0]
    assert first.resized.parent == tmp_path / 'train' / '.resized' and first.resized.name.startswith('36px-')
    assert build_dataset('folder', 'train', 32, tmp_path, cache_workers=0)[0].resized == first.resized  # reused
    assert build_dataset('folder', 'train', 32, tmp_path)[1] == 3  # train/.resized is no class
    assert build_dataset('folder', 'train', 48, tmp_path, cache_workers=0)[0].resized != first.resized  # another size
    photo(tmp_path / 'train' / 'c1' / 'a.png', (40, 40), seed=9)  # one image changes
    changed = build_dataset('folder', 'train', 32, tmp_path, cache_workers=0)[0]
    plain = build_dataset('folder', 'train', 32, tmp_path)[0]
    assert changed.resized != first.resized and torch.equal(changed[1][0], plain[1][0])  # never the stale pixels
    assert not list(changed.resized.parent.glob('*.tmp'))  # written under a temporary name, then renamed
