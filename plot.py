"""Draw the paper's kind of figure, test top-1 against GMACs, from a markdown table of measured runs: the one
`eval.py --sweep --checkpoints` prints, or one kept in the docs. Not a stage of training: it reads text and
writes an SVG by hand, so no plotting library is needed.

    python eval.py --sweep --checkpoints runs/*/ > runs.md   # accuracy over seeds, and cost
    python plot.py runs.md runs.svg
    python plot.py docs/RESULTS.md figures/accuracy_gmacs.svg  # the README's figure, from the results page
"""
import sys

if sys.version_info < (3, 10):  # said in one line, before the first `str | None` below fails with a traceback
    sys.exit(f'error: this code needs Python 3.10 or newer, not {sys.version.split()[0]}: install a newer Python')

import argparse
import itertools
import math
import re
from pathlib import Path

COLUMNS = ('method', 'keep', 'CLC', 'CLA', 'GMACs', 'top-1', 'seeds')  # eval.py's sweep table; others ignored


def read_table(path) -> list:
    """The rows of the first markdown table in `path` with all of COLUMNS, as dicts; rows with no top-1 (a
    sweep over settings measures cost alone) are left out, as there is nothing to draw for them."""
    if not Path(path).is_file():
        raise ValueError(f'{path} does not exist: give a markdown file holding a table that eval.py --sweep printed')
    rows, header = [], None
    for line in Path(path).read_text().splitlines():
        cells = [c.strip().strip('*') for c in line.strip().strip('|').split('|')]
        if header is None and set(COLUMNS) <= set(cells):
            header = cells
        elif header is not None and not line.startswith('|'):
            break
        elif header is not None and not set(line) <= set('|-: '):  # a row, not the rule under the header
            row = dict(zip(header, cells))
            top1 = re.match(r'([\d.]+)(?: ± ([\d.]+))?', row['top-1'])
            if top1 is None:
                continue
            rows.append(dict(method=row['method'], keep=row['keep'], clc=row['CLC'] == 'on', cla=row['CLA'] == 'on',
                             gmacs=float(row['GMACs']), mean=float(top1[1]), std=float(top1[2] or 0),
                             seeds=int(row['seeds'])))
    if not rows:
        raise ValueError(f'{path} has no table with the columns {", ".join(COLUMNS)} and a top-1 in a row: '
                         'sweep over checkpoints or run folders (eval.py --sweep --checkpoints) to measure one')
    return rows


def nice_ticks(lo: float, hi: float, most: int = 6) -> list:
    """Round tick values, steps of 1, 2 or 5 x 10^k, from at or below `lo` to at or above `hi`."""
    unit = 10 ** math.floor(math.log10((hi - lo) / most))
    step = next(unit * m for m in (1, 2, 5, 10) if (hi - lo) / (unit * m) <= most)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(math.ceil(round((hi - first) / step, 6)) + 1)]


def plot(rows, path):
    """Top-1 against GMACs as an SVG, drawn like the paper's figure: a colour per method, a marker per CLC/CLA
    setting (hollow: neither), a line joining the keep rates of each method and setting, the keep rate beside
    each point where it overlaps nothing, error bars of one standard deviation."""
    W, H, L, T, B, R = 680, 440, 60, 40, 50, 150  # canvas; left, top, bottom, right (legend) margins, pixels
    xs = nice_ticks(min(r['gmacs'] for r in rows), max(r['gmacs'] for r in rows))
    ys = nice_ticks(min(r['mean'] - r['std'] for r in rows), max(r['mean'] + r['std'] for r in rows))
    px = lambda x: L + (x - xs[0]) / (xs[-1] - xs[0]) * (W - L - R)
    py = lambda y: H - B - (y - ys[0]) / (ys[-1] - ys[0]) * (H - B - T)
    palette = '#444 #1f77b4 #17becf #ff7f0e #d62728 #2ca02c #9467bd #8c564b #e377c2'.split()
    colours = dict(zip(dict.fromkeys(r['method'] for r in rows), itertools.cycle(palette)))  # as they appear
    square = [(-5, -5), (5, -5), (5, 5), (-5, 5)]
    shapes = {(False, False): ('base', square), (True, True): ('CLCA', square),
              (True, False): ('CLC only', [(0, -6), (6, 5), (-6, 5)]),
              (False, True): ('CLA only', [(0, -6), (6, 0), (0, 6), (-6, 0)])}
    marker = lambda key, x, y, colour: (
        f'<polygon points="{" ".join(f"{x + a:.1f},{y + b:.1f}" for a, b in shapes[key][1])}" '
        f'fill="{"white" if key == (False, False) else colour}" stroke="{colour}" stroke-width="2"/>')
    seeds = sorted({r['seeds'] for r in rows})
    span = f'{seeds[0]}–{seeds[-1]}' if len(seeds) > 1 else f'{seeds[0]}'
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">'
           f'<rect width="{W}" height="{H}" fill="white"/>', f'<text x="{(L + W - R) / 2}" y="22" text-anchor="middle" '
           f'font-size="14">Test top-1 against cost (mean and one std over {span} seeds)</text>']
    for x in xs:  # light gridlines and round tick values
        out += [f'<line x1="{px(x):.1f}" y1="{T}" x2="{px(x):.1f}" y2="{H - B}" stroke="#e4e4e4"/>',
                f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x:g}</text>']
    for y in ys:
        out += [f'<line x1="{L}" y1="{py(y):.1f}" x2="{W - R}" y2="{py(y):.1f}" stroke="#e4e4e4"/>',
                f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>']
    out += [f'<path d="M{L},{T} V{H - B} H{W - R}" fill="none" stroke="black"/>',
            f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">GMACs per image</text>',
            f'<text transform="translate(16,{(H - B + T) / 2}) rotate(-90)" text-anchor="middle">test top-1 (%)</text>']
    points = [(px(r['gmacs']), py(r['mean'])) for r in rows]
    for method, clc, cla in dict.fromkeys((r['method'], r['clc'], r['cla']) for r in rows):
        line = sorted(p for r, p in zip(rows, points) if (r['method'], r['clc'], r['cla']) == (method, clc, cla))
        dashes = '' if clc or cla else ' stroke-dasharray="4 3"'  # base runs dashed
        if len(line) > 1:
            out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in line)}" fill="none" '
                       f'stroke="{colours[method]}" stroke-opacity="0.6"{dashes}/>')
    taken = [(x - 7, y - 7, x + 7, y + 7) for x, y in points]  # boxes of markers and of labels placed so far
    for r, (x, y) in zip(rows, points):
        colour = colours[r['method']]
        out += [f'<line x1="{x:.1f}" y1="{py(r["mean"] - r["std"]):.1f}" x2="{x:.1f}" '
                f'y2="{py(r["mean"] + r["std"]):.1f}" stroke="{colour}"/>', marker((r['clc'], r['cla']), x, y, colour)]
        w = 7 * len(r['keep'])  # about 7 px per character at 12 px
        for dx, dy in ((9, -4), (9, 9), (-9 - w, -4), (-9 - w, 9), (-w / 2, -20), (-w / 2, 12)):
            box = (x + dx, y + dy - 5, x + dx + w, y + dy + 8)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
        if r['method'] != 'none':  # which has no keep rate to name
            taken.append(box)
            out.append(f'<text x="{box[0]:.1f}" y="{box[3] - 2:.1f}" fill="{colour}">{r["keep"]}</text>')
    legend = [(m, colours[m], None) for m in dict.fromkeys(r['method'] for r in rows)]
    legend += [(shapes[k][0], '#444', k) for k in dict.fromkeys((r['clc'], r['cla']) for r in rows)]
    for i, (label, colour, key) in enumerate(legend):
        x, y = W - R + 20, T + 10 + 20 * i
        bar = f'<rect x="{x - 6}" y="{y - 2}" width="12" height="4" fill="{colour}"/>'
        out += [marker(key, x, y, colour) if key else bar, f'<text x="{x + 14}" y="{y + 4}">{label}</text>']
    Path(path).write_text('\n'.join(out + ['</svg>']) + '\n')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Draw test top-1 against GMACs from a markdown table of runs.')
    p.add_argument('table', help='markdown file; its first table with the columns of eval.py --sweep is drawn')
    p.add_argument('svg', help='the figure to write')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if not args.svg.endswith('.svg'):
            raise ValueError(f'{args.svg}: the figure is an SVG, name it FILE.svg')
        rows = read_table(args.table)
        plot(rows, args.svg)
    except (OSError, ValueError) as e:
        sys.exit(f'error: {e}')  # one line, no traceback
    print(f'wrote {args.svg}: {len(rows)} rows of {args.table}')
    return rows


if __name__ == '__main__':
    main()
