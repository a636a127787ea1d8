"""Docs that cannot rot: every command README.md and docs/*.md show parses with its script's own argument
parser, the flags in their tables' `flags` columns are train.py flags, and every repository path they name
exists (with the function, for `file.py:name`)."""
import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import explain
import leaves
import plot
import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
PARSERS = {'data.py': data.parse_args, 'train.py': train.parse_args, 'eval.py': evaluation.parse_args,
           'explain.py': explain.parse_args, 'plot.py': plot.parse_args}
PROSE_ONLY = {'FIDELITY.md'}  # docs that show no command; every other one must show some
# the shell variables the docs' loops use, and a value each could take
VARIABLES = {'seed': '4'}


def shell_lines(text: str) -> list:
    """The lines of every ``` block but Python's (continued lines joined, comments cut) and every `inline` code
    span."""
    lines = []
    for language, block in re.findall(r'```([a-z]*)\n(.*?)```', text, re.S):
        if language == 'python':
            continue
        lines += [re.sub(r'(^|\s)#.*', '', line) for line in block.replace('\\\n', ' ').splitlines()]
    spans = re.findall(r'(?<!`)`([^`]+)`(?!`)', re.sub(r'```.*?```', '', text, flags=re.S))
    lines += [span.replace('\n', ' ') for span in spans]  # a span may wrap onto the next line
    return lines


def commands(text: str) -> list:
    """(script, argv) for every `python SCRIPT ...` or `torchrun ... SCRIPT ...` of ours in `text`, up to any
    redirection of its output."""
    found = []
    for line in shell_lines(text):
        for part in re.split(r'&&|;|\|', line):
            words = shlex.split(re.sub(r'\$\{?(\w+)\}?', lambda m: VARIABLES[m[1]], part))
            words = words[:next((i for i, w in enumerate(words) if re.match(r'\d*[<>]', w)), len(words))]  # redirects
            starts = [i for i, w in enumerate(words) if w in PARSERS and {'python', 'torchrun'} & set(words[:i])]
            if starts:
                found.append((words[starts[0]], words[starts[0] + 1:]))
    return found


def flag_cells(text: str) -> list:
    """The cells of every table column headed `flags`: train.py flags, one run each."""
    cells, column = [], None
    for line in text.splitlines():
        row = [c.strip() for c in line.strip().strip('|').split('|')] if line.startswith('|') else None
        if row is None:
            column = None
        elif column is None and 'flags' in row:
            column = row.index('flags')
        elif column is not None and not set(line) <= set('|-: ') and row[column]:
            cells.append(row[column].strip('`'))
    return cells


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_every_command_in_the_docs_parses(doc, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # commands for a GPU parse here too
    text = doc.read_text()
    runs = commands(text) + [('train.py', shlex.split(cell)) for cell in flag_cells(text)]
    if doc.name in PROSE_ONLY:
        assert not runs, f'{doc.name} shows commands now: take it out of PROSE_ONLY, so that they are parsed'
    else:
        assert runs, f'{doc.name} shows no command: commands() no longer finds them, and nothing would be parsed'
    for script, argv in runs:
        try:
            PARSERS[script](argv)
        except SystemExit as e:
            pytest.fail(f'{doc.name}: python {script} {" ".join(argv)}: {capsys.readouterr().err.strip()} ({e})')


def defines(path: Path, name: str) -> bool:
    """Whether `path` defines `name`: a function, a class or a top-level name, or `Class.member` inside a class."""
    source = path.read_text()
    owner, _, member = name.rpartition('.')
    if owner and not re.search(rf'^class {owner}\b', source, re.M):
        return False
    return bool(re.search(rf'^\s*(def|class) {member}\b|^{member} *=|^\s+{member}: ', source, re.M))


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_every_repository_path_in_the_docs_exists(doc):
    pattern = r'(?<![\w/.-])((?:tests|docs|figures|\.ci)/[\w./-]*\w|[\w-]+\.(?:py|md))(?::([\w.]+))?'
    # what the docs' own commands write (`> runs.md`) and the files they ask the reader to save (saved as `x.py`)
    written = {path for pair in re.findall(r'> *([\w./-]+)|[Ss]aved?(?:\s+it)?\s+as\s+`([\w./-]+)`', doc.read_text())
               for path in pair}
    for path, name in re.findall(pattern, doc.read_text()):
        if path in written:
            continue
        assert (ROOT / path).exists(), f'{doc.name} names {path}, which does not exist'
        if name:
            assert defines(ROOT / path, name), f'{doc.name} names {path}:{name}, which {path} does not define'


def test_the_docs_checks_catch_a_renamed_flag_and_a_missing_path(tmp_path):
    text = ('```bash\nfor seed in 4 5; do python train.py --keep 0.1 \\\n  --seed $seed; done  # a comment\n```\n'
            'and `python eval.py --cost`')
    assert commands(text) == [('train.py', ['--keep', '0.1', '--seed', '4']), ('eval.py', ['--cost'])]
    assert commands('`python eval.py --sweep > runs.md 2>&1`') == [('eval.py', ['--sweep'])]
    with pytest.raises(SystemExit):
        train.parse_args(['--keep-rate', '0.1'])  # what a renamed flag looks like to the parser
    assert flag_cells('| run | flags |\n|---|---|\n| a | `--method tome` |\n\nnot a row') == ['--method tome']
    assert defines(ROOT / 'model.py', 'ViT.forward') and not defines(ROOT / 'model.py', 'ViT.fly')


def test_the_readme_figure_is_what_plot_py_draws_from_the_results_page(tmp_path):
    """The figure cannot drift from the table it shows: redrawn from docs/RESULTS.md, it is the same file."""
    plot.main([str(ROOT / 'docs' / 'RESULTS.md'), str(tmp_path / 'figure.svg')])
    assert (tmp_path / 'figure.svg').read_text() == (ROOT / 'figures' / 'accuracy_gmacs.svg').read_text()


@pytest.mark.parametrize('script', sorted(PARSERS))
def test_an_older_python_is_told_in_one_line_what_it_needs(script):
    """Each script parses as Python 3.9 (so its check is reached) and says what it needs before anything fails."""
    ast.parse((ROOT / script).read_text(), feature_version=(3, 9))
    older = f"import runpy, sys; sys.version_info = (3, 9, 18, 'final', 0); runpy.run_path({script!r}, run_name='__main__')"
    run = subprocess.run([sys.executable, '-c', older], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == ''
    assert run.stderr.count('\n') == 1 and run.stderr.startswith('error: this code needs Python 3.10 or newer')


def test_the_readme_predicts_one_image_as_written(tmp_path, monkeypatch, capsys):
    """The README's snippet, run as it stands in a folder holding runs/leaves/last.pt and leaf.png, prints the top-5
    classes that the test set's own pipeline gives for that image."""
    snippet = re.search(r'### Predict one image\n\n```python\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)[1]
    monkeypatch.setattr(leaves.Leaves, 'per_class', {'train': 10, 'test': 2})
    flags = ['--pretrained', 'none', '--img-size', '32', '--batch-size', '50', '--epochs', '1', '--workers', '0']
    train.main(flags + ['--out', str(tmp_path / 'runs' / 'leaves')])
    test_set, _ = data.build_dataset('leaves', 'test', 32)
    Image.fromarray(test_set.render(7)[0].permute(1, 2, 0).numpy()).save(tmp_path / 'leaf.png')  # as drawn, lossless
    model, _ = evaluation.build(evaluation.parse_args(['--dataset', 'leaves']), tmp_path / 'runs' / 'leaves' / 'last.pt')
    with torch.no_grad():
        expected = model.eval()(data.Standardise.of(test_set, 'cpu')(test_set[7][0][None]))[0].topk(5).indices[0]
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, 'README.md', 'exec'), {})
    assert capsys.readouterr().out == f'{expected.tolist()}\n'
