"""plot.py: the figure reads like one (round ticks, labels that do not overlap, a marker and an error bar per
row, a line per method and setting), drawn from the tables eval.py --sweep prints and the docs keep."""
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

import plot

NS = '{http://www.w3.org/2000/svg}'
GRID = '#e4e4e4'  # the plot's gridlines


def row(keep, gmacs, mean, clca, method='evit', seeds=3):
    return dict(method=method, keep=keep, clc=clca, cla=clca, gmacs=gmacs, mean=mean, std=1.0, seeds=seeds)


def test_plot_reads_like_a_figure_round_ticks_and_labels_that_do_not_overlap(tmp_path):
    assert plot.nice_ticks(0.062, 0.254) == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert plot.nice_ticks(46.4, 75.2) == [45, 50, 55, 60, 65, 70, 75, 80]
    rows = [row('0.1', 0.074, 64.6, False), row('0.25', 0.076, 64.7, False), row('0.5', 0.111, 65.4, False),
            row('0.1', 0.095, 72.7, True)]  # the first two points nearly coincide
    plot.plot(rows, tmp_path / 'p.svg')
    svg = ElementTree.parse(tmp_path / 'p.svg').getroot()
    texts = list(svg.iter(NS + 'text'))
    assert 'Test top-1 against cost' in texts[0].text and '3 seeds' in texts[0].text
    labels = [(float(t.get('x')), float(t.get('y')), len(t.text)) for t in texts if t.get('fill')]  # keep rates
    assert len(labels) == 4
    boxes = [(x, y - 11, x + 7 * n, y) for x, y, n in labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert len(list(svg.iter(NS + 'polyline'))) == 1  # base joins three keep rates; CLCA has one point
    assert sum(e.get('stroke') == GRID for e in svg.iter(NS + 'line')) >= 10  # light gridlines


def test_a_marker_and_an_error_bar_per_row_and_one_line_per_method_and_setting(tmp_path):
    rows = [row('0.25', 0.07, 83.0, True), row('0.5', 0.09, 50.0, True, seeds=1), row('0.25', 0.07, 60.0, True)]
    plot.plot(rows, tmp_path / 'acc.svg')
    svg = ElementTree.parse(tmp_path / 'acc.svg').getroot()  # well-formed XML
    assert svg.tag == NS + 'svg'
    assert len([e for e in svg.iter(NS + 'line') if e.get('stroke') != GRID]) == 3  # one error bar per row
    assert len(list(svg.iter(NS + 'polygon'))) == 3 + 1  # a marker per row, and the legend's CLCA marker
    line, = svg.iter(NS + 'polyline')                    # all three rows are EViT + CLCA: one line joins them
    assert len(line.get('points').split()) == 3
    assert '1–3 seeds' in next(svg.iter(NS + 'text')).text


def test_a_table_in_a_markdown_file_is_drawn_and_rows_without_a_top1_are_left_out(tmp_path, capsys):
    (tmp_path / 'runs.md').write_text('Some text.\n\n| run | method | keep | CLC | CLA | GMACs | seeds | top-1 |\n'
                                      '|---|---|---|---|---|---|---|---|\n'
                                      '| a | evit | 0.1 | on | on | 0.095 | 6 | **72.7 ± 1.4 %** |\n'
                                      '| b | none | 1 | off | off | 0.204 | 1 | 66.6 |\n'
                                      '| c | topk | 0.1 | off | off | 0.071 | - | - |\n\nMore text.\n')
    rows = plot.main([str(tmp_path / 'runs.md'), str(tmp_path / 'p.svg')])
    assert rows == [dict(method='evit', keep='0.1', clc=True, cla=True, gmacs=0.095, mean=72.7, std=1.4, seeds=6),
                    dict(method='none', keep='1', clc=False, cla=False, gmacs=0.204, mean=66.6, std=0.0, seeds=1)]
    assert len(list(ElementTree.parse(tmp_path / 'p.svg').getroot().iter(NS + 'polygon'))) == 2 + 2
    assert 'wrote' in capsys.readouterr().out


def test_bad_input_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match='does not exist: give a markdown file'):
        plot.main([str(tmp_path / 'missing.md'), str(tmp_path / 'p.svg')])
    (tmp_path / 'none.md').write_text('| a | b |\n|---|---|\n')
    with pytest.raises(SystemExit, match='has no table with the columns method'):
        plot.main([str(tmp_path / 'none.md'), str(tmp_path / 'p.svg')])
    with pytest.raises(SystemExit, match='the figure is an SVG'):
        plot.main([str(tmp_path / 'none.md'), str(tmp_path / 'p.png')])
    assert not (tmp_path / 'p.svg').exists()


def test_methods_take_colours_in_the_order_they_appear_however_many_and_whatever_their_names(tmp_path):
    names = ['none', 'evit', 'random', 'mine'] + [f'method{i}' for i in range(8)]  # more methods than colours
    rows = [row('0.1', 0.05 + 0.01 * i, 60.0 + i, True, method=name) for i, name in enumerate(names)]
    plot.plot(rows, tmp_path / 'many.svg')
    svg = ElementTree.parse(tmp_path / 'many.svg').getroot()
    markers = [e.get('stroke') for e in svg.iter(NS + 'polygon')][:len(names)]  # the rows' markers, in order
    assert markers[:9] == ['#444', '#1f77b4', '#17becf', '#ff7f0e', '#d62728', '#2ca02c', '#9467bd', '#8c564b',
                           '#e377c2'] and markers[9:] == markers[:3]  # then the palette starts again


def test_plot_needs_no_torch():
    """It reads text and writes text: a machine that only draws figures needs no torch import."""
    check = "import sys; import plot; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, '-c', check], cwd=Path(plot.__file__).parent, timeout=60).returncode == 0
