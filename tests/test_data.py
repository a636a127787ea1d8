import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader

import data
from conftest import release
from data import DatasetError, Standardise, build_dataset, transforms

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


def test_transforms_follow_the_paper_and_standardising_on_the_device_is_the_same_arithmetic():
    train, test = transforms(448, 'weak'), transforms(448, None)
    assert train.transforms[0].size == (512, 512) and test.transforms[1].size == (448, 448)
    img = Image.new('RGB', (700, 300))
    assert train(img).shape == test(img).shape == (3, 448, 448) and train(img).dtype == torch.uint8
    names = lambda tf: [type(t).__name__ for t in tf.transforms]
    assert names(train) == ['Resize', 'RandomCrop', 'RandomHorizontalFlip', 'PILToTensor']
    trivial = transforms(448, 'trivial')  # the paper's configs for Cotton and SoyLocal
    assert names(trivial) == names(train)[:3] + ['TrivialAugmentWide'] + names(train)[3:]
    assert trivial(img).shape == (3, 448, 448)
    with pytest.raises(ValueError, match='unknown augmentation'):
        transforms(448, 'strong')
    pixels = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    per_image = torch.stack([T.Normalize(mean, std)(T.ToTensor()(T.ToPILImage()(p))) for p in pixels])
    assert torch.equal(Standardise(mean, std)(pixels), per_image)  # bit for bit what the workers used to send


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


# Where each UFG archive unpacks (the folder with anno/ and images/) and how its images are named, as released
ARCHIVES = {'cotton': 'Cotton80/COTTON', 'soylocal': 'SoyLocal/soybean200', 'soyglobal': 'SoyGlobal/soybean2000',
            'soygene': 'SoyGene/soybeangene'}
COUNTS = {'cotton': (240, 240, 80), 'soylocal': (600, 600, 200), 'soyglobal': (5814, 5814, 1938),
          'soygene': (12763, 11143, 1110)}


def ufg_lines(name: str) -> dict:
    """Every split's (file, 1-based label) lines at the release's counts, named as released: cotton, soylocal and
    soyglobal '<class>_<n>_<split>.png', soygene '<plant id>_<n>_<split>.png' (no class in the name)."""
    *counts, classes = COUNTS[name]
    label = lambda i: 1 + (7 * i) % classes  # every class, in no simple order
    if name == 'soygene':
        return {s: [(f'GDC{i % 977:03d}-1-{i:05d}_1_{s}.png', label(i)) for i in range(n)]
                for s, n in zip(SPLITS, counts)}
    return {s: [(f'{label(i)}_{i}_{s}.png', label(i)) for i in range(n)] for s, n in zip(SPLITS, counts)}


SPLITS = ('train', 'test')
CULTIVARS = [f'yd{k:03d}' for k in torch.randperm(198, generator=torch.Generator().manual_seed(0)).tolist()]


def ageing_lines(subset: str, per_class=5) -> dict:
    """A SoyAgeing subset's lines: 198 cultivars, `per_class` images each per split; cultivar k has label k + 1 in
    every subset (the cultivars are listed in a shuffled order, so their labels are not their names)."""
    return {s: [(f'{c}_{subset}_{n}_{s}.png', k + 1) for k, c in enumerate(CULTIVARS) for n in range(1, per_class + 1)]
            for s in SPLITS}


def labels_by_name(name, data_dir):
    """{image file name: 0-based label}, the images per split and the class counts, as build_dataset reads them."""
    found, sizes, classes = {}, [], set()
    for split in SPLITS:
        ds, num_classes = build_dataset(name, split, 32, data_dir)
        found |= {p.name: c for p, c in ds.samples}
        sizes.append(len(ds))
        classes.add(num_classes)
    return found, tuple(sizes), classes


BIG = pytest.mark.long  # thousands of files: in the full suite only


@pytest.mark.parametrize('name', ['cotton', 'soylocal', pytest.param('soyglobal', marks=BIG),
                                  pytest.param('soygene', marks=BIG)])
def test_each_release_reads_as_unpacked_at_its_counts_from_above_or_inside_its_wrapper(tmp_path, name, capsys):
    lines = ufg_lines(name)
    release(tmp_path / ARCHIVES[name], lines)
    for data_dir in (tmp_path, tmp_path / ARCHIVES[name].split('/')[0], tmp_path / ARCHIVES[name]):
        found, sizes, classes = labels_by_name(name, data_dir)
        assert sizes == COUNTS[name][:2] and classes == {COUNTS[name][2]}
        assert found == {file: label - 1 for rows in lines.values() for file, label in rows}  # 1-based in anno
    assert capsys.readouterr().err == ''  # the counts are the benchmark's: no warning


@pytest.mark.parametrize('layout', ['SoyAgeing/SoyAgeing-{r}/{r}', pytest.param('SoyAgeing-{r}/{r}', marks=BIG),
                                    pytest.param('{r}', marks=BIG)])
def test_soyageing_merges_its_five_subsets_with_one_label_per_cultivar(tmp_path, layout, capsys):
    for r in ('R1', 'R3', 'R4', 'R5', 'R6'):
        release(tmp_path / layout.format(r=r), ageing_lines(r))
    found, sizes, classes = labels_by_name('soyageing', tmp_path)
    assert sizes == (4950, 4950) and classes == {198}
    per_cultivar = {}
    for file, label in found.items():
        per_cultivar.setdefault(file.split('_')[0], set()).add(label)
    assert per_cultivar == {c: {k} for k, c in enumerate(CULTIVARS)}  # the same label in every subset, 0-based
    assert capsys.readouterr().err == ''
    one, classes = build_dataset('soyageing-r4', 'test', 32, tmp_path)  # one subset alone
    assert (len(one), classes) == (990, 198) and all('_R4_' in p.name for p, _ in one.samples)


def test_a_missing_subset_is_said_in_one_line_and_the_rest_is_read(tmp_path, capsys):
    for r in ('R1', 'R3', 'R5', 'R6'):
        release(tmp_path / f'SoyAgeing-{r}' / r, ageing_lines(r, per_class=1))
    train, classes = build_dataset('soyageing', 'train', 32, tmp_path)
    assert (len(train), classes) == (4 * 198, 198)
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'found 792 images of 198 classes in subsets R1 R3 R5 R6 of R1 R3 R4 R5 R6' in err
    assert 'the benchmark has 4,950' in err
    with pytest.raises(DatasetError, match="holds SoyAgeing subsets R1 R3 R5 R6, not soyageing-r4's R4"):
        build_dataset('soyageing-r4', 'train', 32, tmp_path)


def test_the_authors_csvs_read_from_their_image_folder_or_the_releases(tmp_path):
    inner = tmp_path / 'SoyGlobal' / 'soybean2000'
    release(inner, {'train': [('1_1_train.png', 1), ('2_1_train.png', 2)], 'test': [('1_1_test.png', 1)]})
    (inner / 'anno' / 'train.txt').write_text('')  # the CSVs come first, where both are
    for where in (inner, tmp_path / 'SoyGlobal'):  # CSVs beside images/, or above soybean2000/ (the CSVs' folder)
        csv_layout(where, [(1, '2_1_train.png'), (0, '1_1_train.png')], [(0, '1_1_test.png')], image_dir='unused')
        ds, _ = build_dataset('soyglobal', 'train', 32, where)
        assert [(p, c) for p, c in ds.samples] == [(inner / 'images' / '2_1_train.png', 1),
                                                   (inner / 'images' / '1_1_train.png', 0)]
        for f in ('train_val.csv', 'test.csv'):
            (where / f).unlink()
    (tmp_path / 'ageing').mkdir()  # the authors' SoyAgeing CSVs list R1/images/... : beside the subsets' folders
    csv_layout(tmp_path / 'ageing', [(3, 'R1/images/yd003_R1_1_train.png'), (5, 'R3/images/yd005_R3_1_train.png'),
                                     (4, 'mine/x.png')], [], image_dir='.')
    assert [c for _, c in build_dataset('soyageing', 'train', 32, tmp_path / 'ageing')[0].samples] == [3, 5, 4]
    assert [c for _, c in build_dataset('soyageing-r3', 'train', 32, tmp_path / 'ageing')[0].samples] == [5]
    for r in ('R1', 'R3'):  # the release beside them, in its SoyAgeing-R#/ wrappers: the CSVs' R#/ paths find it
        release(tmp_path / 'both' / f'SoyAgeing-{r}' / r, ageing_lines(r, per_class=1), draw=image)
    csv_layout(tmp_path / 'both', [(c - 1, f'{r}/images/{n}') for r in ('R1', 'R3')
                                   for n, c in ageing_lines(r, 1)['train']], [], image_dir='unused')
    both = build_dataset('soyageing', 'train', 32, tmp_path / 'both')[0].samples
    first = tmp_path / 'both' / 'SoyAgeing-R1' / 'R1' / 'images' / f'{CULTIVARS[0]}_R1_1_train.png'
    assert len(both) == 396 and both[0] == (first, 0)


def test_a_partial_download_or_an_ambiguous_folder_is_one_clear_error(tmp_path):
    lines = ufg_lines('cotton')
    release(tmp_path / 'Cotton80' / 'COTTON', lines)
    (tmp_path / 'Cotton80' / 'COTTON' / 'images' / lines['train'][7][0]).unlink()
    with pytest.raises(DatasetError, match=r'1 of the 240 train images listed are missing, e\.g\. .*_7_train\.png'):
        build_dataset('cotton', 'train', 32, tmp_path)
    release(tmp_path / 'copy' / 'COTTON', lines)
    with pytest.raises(DatasetError, match='holds 2 datasets'):
        build_dataset('cotton', 'train', 32, tmp_path)
    for label in (0, 81):  # a 0-based file, a class the release does not have
        release(tmp_path / str(label), {'train': [('a.png', label)]})
        with pytest.raises(DatasetError, match='outside 0..79'):
            build_dataset('cotton', 'train', 32, tmp_path / str(label))


def test_the_data_check_says_what_it_found_and_what_the_cache_takes(tmp_path, capsys):
    for r in ('R1', 'R3', 'R4', 'R5', 'R6'):
        release(tmp_path / f'SoyAgeing-{r}' / r, ageing_lines(r, per_class=1), draw=lambda p: image(p, size=(64, 48)))
    data.main(['--dataset', 'soyageing', '--data-dir', str(tmp_path), '--img-size', '32'])
    out, err = capsys.readouterr()
    assert "soyageing, 198 classes: the benchmark's release (anno/*.txt, images/) in " in out
    assert f'images/) in {tmp_path}: SoyAgeing-R1/R1, SoyAgeing-R3/R3, SoyAgeing-R4/R4, SoyAgeing-R5/R5' in out
    assert 'train: 990 images of 198 classes (R1 198 R3 198 R4 198 R5 198 R6 198)' in out
    assert 'image sizes in a sample of 20: 64x48 RGB (20)' in out
    assert f'--cache at 32 px, train: 4 MiB in {tmp_path}/.resized (not built yet' in out  # 990 x 3 x 36 x 36 bytes
    assert 'found 990 images of 198 classes in subsets R1 R3 R4 R5 R6' in err  # 1 image per cultivar, not 5
    build_dataset('soyageing', 'train', 32, tmp_path, cache_workers=0)
    data.main(['--dataset', 'soyageing', '--data-dir', str(tmp_path), '--img-size', '448'])
    assert '--cache at 448 px, train: 742 MiB' in capsys.readouterr().out  # 990 x 768 KiB
    data.main(['--dataset', 'soyageing', '--data-dir', str(tmp_path), '--img-size', '32'])
    out = capsys.readouterr().out
    assert 'train: 4 MiB in' in out and '.resized (built;' in out and '.resized (not built yet;' in out  # test: not yet
    with pytest.raises(SystemExit, match='error: dataset folder .* does not exist'):
        data.main(['--dataset', 'cotton', '--data-dir', str(tmp_path / 'nowhere')])


def test_where_the_data_is_found_or_refused(tmp_path, monkeypatch):
    for r in ('R1', 'R3'):
        release(tmp_path / 'data' / 'soyageing' / 'SoyAgeing' / f'SoyAgeing-{r}' / r, ageing_lines(r, per_class=1))
    (tmp_path / 'data' / 'soyageing' / '__MACOSX' / 'SoyAgeing-R1' / 'R1' / 'anno').mkdir(parents=True)  # a Mac's zip
    monkeypatch.chdir(tmp_path)
    assert len(build_dataset('soyageing-r3', 'train', 32)[0]) == 198  # a subset's default folder: data/soyageing
    monkeypatch.chdir(tmp_path / 'data' / 'soyageing' / 'SoyAgeing' / 'SoyAgeing-R3' / 'R3')
    assert len(build_dataset('soyageing-r3', 'test', 32, '.')[0]) == 198  # the subset is R3, however its path is typed
    with pytest.raises(DatasetError, match='has no images of subsets R1'):  # not R3's images under R1's name
        build_dataset('soyageing-r1', 'train', 32, '.')
    monkeypatch.chdir(tmp_path)
    release(tmp_path / 'data' / 'soyageing' / 'Cotton80' / 'COTTON', {'train': [('1_1_train.png', 1)]})
    with pytest.raises(DatasetError, match=r'Cotton80/COTTON is no soyageing subset, or a second copy of one'):
        build_dataset('soyageing', 'train', 32)
    real_scandir = os.scandir

    def scandir(path):  # a folder this user may not read, as lost+found on a mounted disk
        if str(path).endswith('Cotton80'):
            raise PermissionError(13, 'Permission denied', str(path))
        return real_scandir(path)
    monkeypatch.setattr(data.os, 'scandir', scandir)
    assert len(build_dataset('soyageing', 'train', 32)[0]) == 2 * 198  # passed over, the subsets read


def test_two_processes_resizing_the_same_images_at_once_leave_one_whole_file(tmp_path):
    """What each node's first process does under torchrun when the nodes share a disk: each writes a file of its own
    and renames it into place, so whichever rename comes last leaves a whole file and no reader sees half of one."""
    for k in range(60):
        photo(tmp_path / 'train' / f'c{k % 3}' / f'{k}.png', (120, 90), seed=k)
    build = ('import sys, data; samples = data.build_dataset("folder", "train", 32, sys.argv[1])[0].samples; '
             'print(data.resize_once(samples, 32, 0))')
    builders = [subprocess.Popen([sys.executable, '-c', build, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    paths = {b.communicate(timeout=300)[0].strip() for b in builders}
    assert [b.returncode for b in builders] == [0, 0]
    assert len(paths) == 1 and not list(Path(next(iter(paths))).parent.glob('*.tmp'))
    cached = build_dataset('folder', 'train', 32, tmp_path, cache_workers=0)[0]
    plain = build_dataset('folder', 'train', 32, tmp_path)[0]
    assert str(cached.resized) in paths and all(torch.equal(cached[i][0], plain[i][0]) for i in range(len(plain)))
