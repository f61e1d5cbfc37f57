"""The report of a run: how well each model and the ensemble rank the lesions, per patient as a
clinic would use them, and the lesions themselves.

Out of fold (train): pAUC per model and fold; the ensemble's weights and every combination of the
models; top-k retrieval sensitivity, the ISIC 2024 organisers' secondary score: of the malignant
lesions, the share among their patient's k highest-scored lesions (k = 5, 10, 15; a tie at the
cut counts each tied lesion by its chance of being retrieved in a random order of the ties); ROC
curves, feature importance, training curves, the concepts that most often top the malignant
lesions' reasons; and tiles, each with its reasons beside it: the malignant lesions the ensemble
ranked lowest (misses), the benign ones it ranked highest (false alarms), a few patients' top 15.
On test: the triage list, a few patients' top lesions, and the same figures where labels are given.

Reads:  WORK/folds.csv, WORK/test_lesions.csv, WORK/preds/*_{oof,test}.csv, WORK/triage.csv and
        WORK/triage_oof.csv (from ensemble.py: the lesions' scores and reasons), MODELS/ensemble.json,
        MODELS/NAME/importance.csv,
        MODELS/ARCH/fold*/log.csv (MODELS: --models, default WORK/models); with --data, the tiles
        shown from DATA/{train,test}-image.hdf5
Writes: WORK/report.md,
        WORK/report.html (one self-contained page: no scripts, nothing fetched; the tiles are the
        stored JPEG bytes as data: URIs, at most 200 of them and 4 MB in all)

    python report.py --work work --data demo_data --test-labels demo_data/demo_test_labels.csv
    python report.py --work work --data DATA_DIR --predict-only
"""
import argparse
import base64
import glob
import html
import itertools
import os
import re
from collections import Counter

import numpy as np

from common import (MIN_TPR, add_path_flags, atomic_write, check_classes, check_ids, check_labels, check_record, codes,
                    default_data_dir, file_digest, log, models_folder, open_h5, pauc, pauc_or_nan, rank01,
                    rank_in_patient, read_csv, read_image_bytes, read_lesions, read_preds, roc_points, run_main,
                    stage_locks, write_args)
from ensemble import read_ensemble_json
from reasons import REASONS

TOP_K = (5, 10, 15)
MAX_TILES, MAX_TILE_BYTES = 200, 4 * 2 ** 20


def within_patient(score, patients):
    """For each lesion: how many of its patient's lesions score higher, and how many score the same
    (itself included)."""
    n = len(score)
    patient = codes(patients)
    order = np.lexsort((-score, patient))
    c, s = patient[order], score[order]
    new_patient = np.r_[True, c[1:] != c[:-1]]
    new_value = new_patient | np.r_[True, s[1:] != s[:-1]]
    patient_start = np.maximum.accumulate(np.where(new_patient, np.arange(n), 0))
    value_start = np.maximum.accumulate(np.where(new_value, np.arange(n), 0))
    group = np.cumsum(new_value) - 1
    above, tied = np.empty(n), np.empty(n)
    above[order], tied[order] = value_start - patient_start, np.bincount(group)[group]
    return above, tied


def retrieval_sensitivity(y, score, patients, k):
    """Top-k retrieval sensitivity: (the share of all malignant lesions that are among their
    patient's k highest-scored, the mean over patients with a malignant lesion of the share of
    theirs that are). A lesion tied at the cut counts as (places left) / (lesions tied)."""
    above, tied = within_patient(score, patients)
    found = np.clip((k - above) / tied, 0, 1) * y
    patient = codes(patients)
    per_patient = np.bincount(patient, found) / np.maximum(np.bincount(patient, y), 1)
    return found.sum() / y.sum(), per_patient[np.bincount(patient, y) > 0].mean()


def fold_scores(y, folds, pred):
    return [pauc_or_nan(y[folds == k], pred[folds == k]) for k in np.unique(folds)]


PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac"]  # Tableau 10; the ensemble is drawn in near-black
CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #222; max-width: 1200px; margin: 28px auto; padding: 0 24px; }
h1 { font-size: 26px; margin: 0 0 14px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 1px solid #ddd; }
figure { margin: 0; } figcaption { font-weight: 600; font-size: 14px; margin-bottom: 4px; }
.facts { display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 8px; }
.facts div { background: #f3f5f8; border-radius: 8px; padding: 8px 18px; color: #555; }
.facts b { display: block; font-size: 22px; color: #222; } .note { color: #666; margin: 4px 0 12px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 16px; text-align: right; border-bottom: 1px solid #e6e6e6; }
th:first-child { text-align: left; } thead th { border-bottom: 2px solid #bbb; }
.charts { display: flex; flex-wrap: wrap; gap: 18px 36px; align-items: flex-start; }
svg { font: 12px system-ui, sans-serif; max-width: 100%; height: auto; } svg text { fill: #333; }
.grid { stroke: #ececec; } .frame { fill: none; stroke: #999; } .band { fill: #fbe3c4; opacity: .6; }
.band-label { fill: #a15c00; text-anchor: end; } .axis { font-size: 13px; } .tick { fill: #666; }
polyline { fill: none; stroke-width: 2; stroke-linejoin: round; } line[data-series] { stroke-width: 3; }
[data-series="ensemble"] { stroke-width: 3; } [data-series="chance"] { stroke-dasharray: 5 4; stroke-width: 1.5; }
.bar { fill: #4e79a7; } .bar-label { font: 11.5px ui-monospace, Menlo, Consolas, monospace; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; } .tile { width: 132px; } .patient { margin: 10px 0 18px; }
.tile img { width: 128px; height: 128px; object-fit: cover; display: block; border: 2px solid #ddd;
           border-radius: 4px; }
.tile figcaption { font-weight: 400; font-size: 12px; line-height: 1.35; margin-top: 3px; color: #444; }
.tile.malignant img { border-color: #d62728; } .tile.malignant figcaption b { color: #d62728; }
.tile.why { width: 380px; display: flex; gap: 10px; } .tile.why figcaption { margin-top: 0; }
.reasons { margin: 4px 0 0; padding-left: 18px; color: #222; }
"""


def esc(text):
    return html.escape(str(text))


def nice_ticks(lo, hi, n=5):
    """At most about n+1 round tick values (1, 2 or 5 times a power of ten apart) from lo or below to hi or above."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    step = 10.0 ** np.floor(np.log10(span / n))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= n)
    first = np.floor(lo / step)
    return np.arange(first, max(np.ceil(hi / step), first + 1) + 0.5) * step


def thin_curve(x, y, max_points=400):
    """About max_points points of a monotone curve, to keep the SVG light. Points inside straight runs
    go first, which loses nothing: an ROC curve is horizontal and vertical steps, about two corners per
    positive. If still too many, one point stays per 1/max_points of the path's length: the few big
    steps of the steep start stay exact, only runs of tiny steps are merged."""
    d = np.diff(np.c_[x, y], axis=0)
    keep = np.r_[True, np.abs(d[:-1, 0] * d[1:, 1] - d[:-1, 1] * d[1:, 0]) > 1e-12, True]
    x, y = x[keep], y[keep]
    if len(x) > max_points:
        length = np.r_[0, np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))]
        keep = np.r_[True, np.diff(np.floor(length / length[-1] * (max_points - 1))) > 0]
        keep[-1] = True
        x, y = x[keep], y[keep]
    return x, y


def svg_open(svg_id, w, h):
    return f'<svg id="{esc(svg_id)}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'


def svg_lines(svg_id, series, x_label, y_label, x_ticks, y_ticks, size=(440, 300), band=None, legend=True):
    """A line chart as inline SVG, the axes spanning the first to the last tick. series: (name, label, x, y,
    colour) each, drawn as a polyline with data-series=name (styles and tests find lines by it), legend
    on the right; band: (y_lo, y_hi, text), a shaded horizontal stripe."""
    left, top, pw, ph = 58, 12, size[0] - 74, size[1] - 58
    w, h = size[0] + (7 * max(len(s[1]) for s in series) + 50 if legend else 0), size[1]
    (x0, x1), (y0, y1) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])

    def px(v):
        return left + (np.asarray(v, float) - x0) / (x1 - x0) * pw

    def py(v):
        return top + ph - (np.asarray(v, float) - y0) / (y1 - y0) * ph

    sid = esc(svg_id)
    clip = f'<rect x="{left - 3}" y="{top - 3}" width="{pw + 6}" height="{ph + 6}"/>'  # dots on the frame stay whole
    out = [svg_open(svg_id, w, h), f'<clipPath id="{sid}-clip">{clip}</clipPath>']
    if band:
        lo, hi, text = band
        out.append(f'<rect class="band" x="{left}" y="{py(hi):.1f}" width="{pw}" height="{py(lo) - py(hi):.1f}"/>'
                   f'<text class="band-label" x="{left + pw - 8}" y="{py(lo) - 8:.1f}">{esc(text)}</text>')
    out += [f'<line class="grid" x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + ph}"/>'
            f'<text class="tick" x="{px(t):.1f}" y="{top + ph + 17}" text-anchor="middle">{t:g}</text>'
            for t in x_ticks]
    out += [f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
            f'<text class="tick" x="{left - 7}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
            for t in y_ticks]
    out.append(f'<rect class="frame" x="{left}" y="{top}" width="{pw}" height="{ph}"/>'
               f'<text class="axis" x="{left + pw / 2}" y="{h - 10}" text-anchor="middle">{esc(x_label)}</text>'
               f'<text class="axis" transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{esc(y_label)}</text>\n<g clip-path="url(#{sid}-clip)">')
    for name, label, x, y, colour in series:
        x, y = np.asarray(x, float), np.asarray(y, float)
        ok = np.isfinite(x) & np.isfinite(y)
        xs, ys = px(x[ok]), py(y[ok])
        out.append(f'<polyline data-series="{esc(name)}" stroke="{colour}" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs, ys)) + '"/>')
        if len(xs) <= 30:  # few points (epochs): dots show each, and a one-epoch run at all
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{colour}"/>' for a, b in zip(xs, ys)]
    out.append("</g>")
    for i, (name, label, _, _, colour) in enumerate(series if legend else []):
        ly = top + 10 + 20 * i
        out.append(f'<line data-series="{esc(name)}" x1="{left + pw + 16}" x2="{left + pw + 38}" y1="{ly}" '
                   f'y2="{ly}" stroke="{colour}"/><text x="{left + pw + 46}" y="{ly + 4}">{esc(label)}</text>')
    return "\n".join(out + ["</svg>"])


def svg_bars(svg_id, labels, values):
    """Horizontal bars as inline SVG, one row per label, each with its value at its end."""
    label_w, row, bar_w = 7 * max(map(len, labels)) + 14, 20, 220
    w, h = label_w + bar_w + 60, row * len(labels) + 8
    scale = bar_w / max(max(values), 1e-12)
    out = [svg_open(svg_id, w, h)]
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 4 + row * i
        out.append(f'<text class="bar-label" x="{label_w - 8}" y="{y + 14}" text-anchor="end">{esc(label)}</text>'
                   f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{v * scale:.1f}" height="{row - 6}"/>'
                   f'<text class="tick" x="{label_w + v * scale + 5:.1f}" y="{y + 14}">{v:.4g}</text>')
    return "\n".join(out + ["</svg>"])


def roc_series(y, scores, paucs, min_tpr=0.0):
    """svg_lines series of the ROC curves from the last point below min_tpr on: thinned apart, the part
    a zoomed chart shows keeps all its ~400 points."""
    series = []
    for i, (name, s) in enumerate(scores.items()):
        fpr, tpr = roc_points(y, s)
        start = max(np.searchsorted(tpr, min_tpr) - 1, 0)
        series.append((name, f"{name} {paucs[name]:.4f}", *thin_curve(fpr[start:], tpr[start:]),
                       "#222" if name == "ensemble" else PALETTE[i % len(PALETTE)]))
    return series + [("chance", "chance", [0, 1], [0, 1], "#999")]


def roc_html(y, scores, paucs):
    """The ROC curves of every model (scores: {name: OOF predictions}), whole and above MIN_TPR."""
    ticks = np.linspace(0, 1, 6)
    return (f'<p class="note">Out of fold; the legend gives each model\'s OOF pAUC, the area of the shaded band '
            f'under its curve (TPR {MIN_TPR:g} to 1).</p><div class="charts"><figure><figcaption>Whole curve'
            '</figcaption>'
            + svg_lines("roc", roc_series(y, scores, paucs), "false positive rate (FPR)", "true positive rate (TPR)",
                        ticks, ticks, size=(440, 420), band=(MIN_TPR, 1.0, f"pAUC region: TPR ≥ {MIN_TPR:g}"))
            + f'</figure><figure><figcaption>The shaded band, stretched: TPR {MIN_TPR:g} to 1</figcaption>'
            + svg_lines("roc-zoom", roc_series(y, scores, paucs, MIN_TPR), "false positive rate (FPR)",
                        "true positive rate (TPR)", ticks, np.linspace(MIN_TPR, 1, 5), size=(440, 420), legend=False)
            + '</figure></div>')


def importance_html(models_dir, names):
    """A bar chart of the top 20 features by gain of each model with MODELS/NAME/importance.csv."""
    charts, missing = [], []
    for name in names:
        path = os.path.join(models_dir, name, "importance.csv")
        table = read_csv(path, ["feature", "gain"], ["gain"]) if os.path.exists(path) else {"gain": []}
        if not len(table["gain"]):
            missing.append(name)
            continue
        top = np.argsort(-table["gain"], kind="stable")[:20]
        bars = svg_bars(f"importance-{name}", table["feature"][top], table["gain"][top])
        charts.append(f'<figure><figcaption>{esc(name)}: top {len(top)} of {len(table["gain"])} features by gain'
                      f'</figcaption>{bars}</figure>')
    note = (f'<p class="note">No feature importance (MODELS/NAME/importance.csv) for '
            f'{esc(", ".join(missing))}.</p>' if missing else "")
    return note + (f'<div class="charts">{"".join(charts)}</div>' if charts else "")


def data_ticks(arrays):
    """nice_ticks spanning the finite values of some arrays."""
    v = np.concatenate(arrays)
    v = v[np.isfinite(v)]
    return nice_ticks(v.min(), v.max()) if v.size else nice_ticks(0, 1)


def training_html(models_dir):
    """Validation pAUC and train loss per epoch, one line per fold, of every MODELS/ARCH/fold*/log.csv."""
    logs = {}  # arch: [(fold, {column: values})]
    for path in glob.glob(os.path.join(models_dir, "*", "fold*", "log.csv")):
        arch, fold = path.split(os.sep)[-3:-1]
        table = read_csv(path, ["epoch", "val_pauc", "train_loss"], ["epoch", "val_pauc", "train_loss"])
        if len(table["epoch"]) and re.fullmatch(r"fold\d+", fold):
            logs.setdefault(arch, []).append((int(fold[4:]), table))
    if not logs:
        return '<p class="note">No image model training logs (MODELS/ARCH/fold*/log.csv).</p>'
    out = []
    for arch, folds in sorted(logs.items()):
        charts = []
        for column, label in (("val_pauc", "validation pAUC"), ("train_loss", "train loss")):
            series = [(f"fold {k}", f"fold {k}", t["epoch"], t[column], PALETTE[k % len(PALETTE)])
                      for k, t in sorted(folds, key=lambda f: f[0])]
            charts.append(svg_lines(f"curve-{arch}-{column}", series, "epoch", label,
                                    data_ticks([s[2] for s in series]), data_ticks([s[3] for s in series]),
                                    size=(420, 270)))
        out.append(f'<figure><figcaption>{esc(arch)}: {len(folds)} folds</figcaption><div class="charts">'
                   + "".join(f"<figure>{c}</figure>" for c in charts) + "</div></figure>")
    return "".join(out)


def fmt_weights(w):
    return "/".join(f"{v:g}" for v in np.round(w, 3))


def combination_rows(names, oof_ranks, y, weights, honest, test_ranks, test_y):
    """report.md's ensemble table: (combination, weights, OOF pAUC, test pAUC or None) of every subset
    of up to four models with equal weights, then the weights in use, scored in sample and, where
    they were chosen on the out-of-fold predictions, honestly (each fold by weights chosen without it)."""
    def row(label, w, oof_pred=None):
        oof_pred = w @ oof_ranks if oof_pred is None else oof_pred
        return label, w, pauc(y, oof_pred), pauc(test_y, w @ test_ranks) if test_y is not None else None
    rows = []
    if len(names) <= 4:
        for size in range(1, len(names) + 1):
            for subset in itertools.combinations(range(len(names)), size):
                w = np.isin(np.arange(len(names)), subset) / size
                rows.append(row(" + ".join(names[i] for i in subset), w))
    rows.append(row("the weights in use, scored on the rows they were chosen on", weights))
    if honest is not None:
        rows.append(row("the weights chosen on the other folds, fold by fold (honest)", weights, honest))
    return rows


def reason_rows(y, reasons, top=12):
    """report.md's table of the concepts that most often top the malignant lesions' reasons:
    (concept, first reason of how many, among the reasons of how many), the `top` most often first."""
    concepts = [[r.partition(": ")[0] for r in column[y == 1]] for column in reasons]
    first = Counter(concepts[0])
    among = Counter(c for lesion in zip(*concepts) for c in set(lesion) - {""})
    none = first.pop("", 0)
    rows = [[c, str(n), str(among[c])] for c, n in sorted(first.items(), key=lambda cn: (-cn[1], -among[cn[0]]))]
    return rows[:top] + ([["(no reasons: contributions not finite)", str(none), ""]] if none else [])


def triage_rows(y, scores, patients):
    """report.md's triage table: (model, [top-k share found for each k], top-15 patient mean)."""
    return [(name, [retrieval_sensitivity(y, s, patients, k)[0] for k in TOP_K],
             retrieval_sensitivity(y, s, patients, TOP_K[-1])[1]) for name, s in scores.items()]


# ---------------------------------------------------------------- the lesions themselves

def tiles_html(h5, items, budget):
    """Tiles as <figure>s: items (isic_id, caption lines, malignant, reasons), each the stored image
    bytes as a data: URI while the page's budget ({"tiles", "bytes"} left) lasts, its reasons beside it."""
    out = []
    for isic_id, lines, malignant, why in items:
        raw = read_image_bytes(h5, isic_id)
        if budget["tiles"] < 1 or len(raw) > budget["bytes"]:
            out.append(f'<figure class="tile"><figcaption>{esc(isic_id)}: not shown, the page holds at most '
                       f'{MAX_TILES} tiles and {MAX_TILE_BYTES // 2 ** 20} MB of them</figcaption></figure>')
            continue
        budget["tiles"] -= 1
        budget["bytes"] -= len(raw)
        kind = "png" if raw.startswith(b"\x89PNG") else "jpeg"
        caption = "<br>".join([f"<b>{esc(isic_id)}</b>"] + [esc(line) for line in lines])
        if why:
            caption += '<ol class="reasons">' + "".join(f"<li>{esc(r)}</li>" for r in why) + "</ol>"
        out.append(f'<figure class="tile{" malignant" if malignant else ""}{" why" if why else ""}"><img '
                   f'alt="{esc(isic_id)}" src="data:image/{kind};base64,{base64.b64encode(raw).decode()}">'
                   f"<figcaption>{caption}</figcaption></figure>")
    return '<div class="tiles">' + "".join(out) + "</div>"


def galleries_html(data, split, lesions, score, reasons, y, budget):
    """The tiles of one split, each with its reasons (REASONS columns, one entry a lesion): for train
    (y given), the misses, the false alarms and three patients' top 15; for test, three patients'
    top 15 (malignant ones marked where y is given)."""
    data = data or default_data_dir()
    if not data:
        return '<p class="note">No tiles: pass --data DIR, the folder of the HDF5 files, to see the lesions.</p>'
    rank = rank_in_patient(score, lesions["patient_id"])
    ids, patients = lesions["isic_id"], lesions["patient_id"]

    def item(i):
        truth = [] if y is None else ["malignant" if y[i] else "benign"]
        return (ids[i], [f"patient {patients[i]}", f"score {score[i]:.3f}", f"rank {rank[i]} in patient"] + truth,
                y is not None and bool(y[i]), [r[i] for r in reasons if r[i]])
    sections = []
    with open_h5(os.path.join(data, f"{split}-image.hdf5")) as h5:
        if split == "train":
            order = np.argsort(score, kind="stable")
            misses = [i for i in order if y[i]][:12]
            alarms = [i for i in order[::-1] if not y[i]][:12]
            sections += [("Misses: the malignant lesions ranked lowest, out of fold", misses),
                         ("False alarms: the benign lesions ranked highest, out of fold", alarms)]
        counts = np.unique(patients, return_counts=True)
        candidates = counts[0][np.argsort(-counts[1], kind="stable")]
        if split == "train":
            candidates = [p for p in candidates if y[patients == p].any()]
        for p in candidates[:3]:
            rows = np.flatnonzero(patients == p)
            top = rows[np.argsort(rank[rows])][:15]
            sections.append((f"Patient {p}: the top {len(top)} of {len(rows)} lesions, in order"
                             + (" (out of fold; malignant ones framed red)" if y is not None else ""), top))
        return "".join(f'<div class="patient"><figcaption>{esc(title)}</figcaption>'
                       + tiles_html(h5, [item(i) for i in rows], budget) + "</div>" for title, rows in sections)


# ---------------------------------------------------------------- report.md and report.html

def md_table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def html_table(table_id, header, rows):
    return (f'<table id="{table_id}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>"
            "<tbody>" + "".join(f"<tr><th>{esc(r[0])}</th>" + "".join(f"<td>{esc(c)}</td>" for c in r[1:]) + "</tr>"
                                for r in rows) + "</tbody></table>")


def number(v):
    return "" if v is None or np.isnan(v) else f"{v:.4f}"


def tables(args, y, folds, patients, oof, spec, test_y, test_scores, test_patients, oof_reasons):
    """The report's tables, (id, title, note, header, rows) each: pAUC per model and fold, the
    ensemble's combinations, triage out of fold and, with test labels, on test; the concepts that
    most often top the malignant lesions' reasons."""
    n_folds = len(np.unique(folds))
    has_test = test_y is not None
    header = ["model", "OOF pAUC"] + [f"fold {k}" for k in range(n_folds)] + (["test pAUC"] if has_test else [])
    rows = [[n, number(pauc(y, p))] + [number(v) for v in fold_scores(y, folds, p)]
            + ([number(pauc(test_y, test_scores[n]))] if has_test else []) for n, p in oof.items()]
    names, weights = spec["names"], np.array(spec["weights"])
    ranks = np.array([rank01(oof[n]) for n in names])
    test_ranks = np.array([rank01(test_scores[n]) for n in names]) if has_test else None
    combos = combination_rows(names, ranks, y, weights, oof["ensemble"] if spec["fold_weights"] else None,
                              test_ranks, test_y)
    how = ("chosen on the out-of-fold predictions; the ensemble's out-of-fold scores rank each fold with the "
           "weights chosen on the other folds: " + ", ".join(f"fold {k} {fmt_weights(w)}"
                                                            for k, w in spec["fold_weights"].items())
           if spec["fold_weights"] else "set by hand (ensemble.py --blend)")
    k_header = [f"top-{k}" for k in TOP_K] + [f"top-{TOP_K[-1]}, mean over patients"]
    out = [("pauc", "pAUC per model and fold", "Out of fold: each lesion scored by a model that did not train on it.",
            header, rows),
           ("combinations", "Ensemble weights", f"Weights ({', '.join(names)}): {fmt_weights(weights)}, {how}.",
            ["rank average of", "weights", "OOF pAUC"] + (["test pAUC"] if has_test else []),
            [[label, fmt_weights(w), number(o)] + ([number(t)] if has_test else []) for label, w, o, t in combos]),
           ("triage", "Triage, out of fold", "Of the malignant lesions, the share among their patient's k "
            "highest-scored lesions (the ISIC 2024 secondary score at k = 15); last column: the mean over patients "
            "with a malignant lesion of the share of theirs.", ["model"] + k_header,
            [[n] + [number(v) for v in shares] + [number(mean)] for n, shares, mean in triage_rows(y, oof, patients)])]
    out.append(("reasons", "Why the malignant lesions rank high, out of fold", "Each lesion's reasons are the "
                "concepts (a measurement with its patient and site normalizations, an image score, ...) whose "
                "TreeSHAP contributions raise its score most: log-odds contributions of the boosters that scored it "
                "out of fold, averaged over a GBDT's bags and over the GBDTs by their ensemble weights (one that "
                f"lowers the score says so). Of the {int(y.sum())} malignant lesions: how often each concept is the "
                "first reason, and how often among the three.", ["concept", "first reason", "among the three"],
                reason_rows(y, oof_reasons)))
    if has_test:
        out.append(("triage-test", "Triage on test", f"Against {args.test_labels}.", ["model"] + k_header,
                    [[n] + [number(v) for v in shares] + [number(mean)]
                     for n, shares, mean in triage_rows(test_y, test_scores, test_patients)]))
    return out


def write_report(args, facts, sections, html_parts):
    """report.md (the facts and tables) and report.html (the same, then html_parts: (title, html) each)."""
    lines = ["# ISIC 2024 pipeline report", "", "; ".join(f"{v:,} {what}" for v, what in facts) + "."]
    for _, title, note, header, rows in sections:
        lines += ["", f"## {title}", "", note, ""] + md_table(header, rows)
    atomic_write(os.path.join(args.work, "report.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    body = "".join(f"<h2>{esc(title)}</h2><p class=\"note\">{esc(note)}</p>{html_table(tid, header, rows)}\n"
                   for tid, title, note, header, rows in sections)
    body += "".join(f"<h2>{esc(title)}</h2>\n{part}\n" for title, part in html_parts)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ISIC 2024 pipeline report</title>
<style>{CSS}</style></head><body>
<h1>ISIC 2024 pipeline report</h1>
<div class="facts">{"".join(f"<div><b>{v:,}</b>{esc(what)}</div>" for v, what in facts)}</div>
<p class="note">Score: partial AUC above {MIN_TPR:.0%} TPR (0 to {1 - MIN_TPR:g}; a random ranking scores
{(1 - MIN_TPR) ** 2 / 2:g}).</p>
{body}</body></html>
"""
    atomic_write(os.path.join(args.work, "report.html"), lambda f: f.write(page.encode()))


def report_reads(args):
    """The lock units of the GBDTs (in ensemble.json) and image models (with out-of-fold scores or
    fold logs) that the report reads."""
    if args.predict_only:
        return []
    spec = read_ensemble_json(os.path.join(models_folder(args), "ensemble.json"), "ensemble.py")
    archs = {os.path.basename(p)[4:-8] for p in glob.glob(os.path.join(args.work, "preds", "img_*_oof.csv"))}
    archs |= {p.split(os.sep)[-3] for p in glob.glob(os.path.join(models_folder(args), "*", "fold*", "log.csv"))}
    return [f"gbdt-{n}" for n in spec["names"]] + [f"image-{a}" for a in sorted(archs)]


def report(args):
    """The stage's work: read and check every input, then write the report."""
    test = read_lesions(args.work, "test")
    triage_path = os.path.join(args.work, "triage.csv")
    spec_path = os.path.join(models_folder(args), "ensemble.json")
    spec = None if args.predict_only else read_ensemble_json(spec_path, "ensemble.py")
    # made by the models folder's ensemble.json (a --predict-only work folder has none beside it)
    check_record(args.work, "ensemble", [triage_path], "ensemble.py", spec and file_digest(spec_path))
    triage = read_csv(triage_path, ["isic_id", "score"] + REASONS, ["score"])
    check_ids(triage_path, triage["isic_id"], test["isic_id"])
    ens_test = triage["score"]
    test_y = None
    if args.test_labels:  # held-out answers, such as the demo set's
        labels = read_csv(args.test_labels, ["isic_id", "target"], ["target"])
        check_ids(args.test_labels, labels["isic_id"], test["isic_id"])
        check_labels(args.test_labels, labels["isic_id"], labels["target"])
        check_classes(args.test_labels, labels["target"], "the test lesions", "a score on test needs")
        test_y = labels["target"]
    budget = {"tiles": MAX_TILES, "bytes": MAX_TILE_BYTES}
    test_tiles = ("Test: three patients' top lesions",
                  galleries_html(args.data, "test", test, ens_test, [triage[r] for r in REASONS], test_y, budget))
    facts = [(len(test["isic_id"]), "test lesions"), (len(np.unique(test["patient_id"])), "test patients")]
    sections, parts = [], [test_tiles]
    if not args.predict_only:
        train = read_lesions(args.work, "train")
        y, folds = train["target"], train["fold"]
        images = sorted(os.path.basename(p)[:-8] for p in glob.glob(os.path.join(args.work, "preds", "img_*_oof.csv")))
        oof, test_scores = {}, {}
        made_by = {**spec["members"], "ensemble": file_digest(spec_path)}
        for n in spec["names"] + images + ["ensemble"]:
            oof[n], test_scores[n] = (read_preds(args.work, n, s, t["isic_id"], made_by.get(n))
                                      for s, t in (("train", train), ("test", test)))
            for s in (oof[n], test_scores[n]):  # an undecodable tile has no image score: it ranks last
                s[np.isnan(s)] = np.nanmin(s, initial=0) - 1
        oof_path = os.path.join(args.work, "triage_oof.csv")
        check_record(args.work, "ensemble", [oof_path], "ensemble.py", file_digest(spec_path))
        oof_triage = read_csv(oof_path, ["isic_id"] + REASONS)
        check_ids(oof_path, oof_triage["isic_id"], train["isic_id"])
        oof_reasons = [oof_triage[r] for r in REASONS]
        sections = tables(args, y, folds, train["patient_id"], oof, spec, test_y, test_scores, test["patient_id"],
                          oof_reasons)
        facts = [(len(y), "train lesions"), (int(y.sum()), "malignant"),
                 (len(np.unique(train["patient_id"])), "patients")] + facts
        parts = [("ROC curves, out of fold", roc_html(y, oof, {n: pauc(y, p) for n, p in oof.items()})),
                 ("The lesions, out of fold", galleries_html(args.data, "train", train, oof["ensemble"], oof_reasons,
                                                             y, budget)),
                 test_tiles, ("Feature importance", importance_html(models_folder(args), spec["names"])),
                 ("Image model training", training_html(models_folder(args)))]
    write_report(args, facts, sections, parts)
    write_args(os.path.join(args.work, "report_args.json"), args)
    log(f"wrote {args.work}/report.md and report.html ({MAX_TILES - budget['tiles']} tiles)")
    for _, title, _, header, rows in sections:
        log(title + "\n" + "\n".join(md_table(header, rows)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_path_flags(parser)  # --data: the HDF5 files of the tiles shown (without it the page shows none)
    parser.add_argument("--predict-only", action="store_true", help="only the test side: the test lesions' tiles")
    parser.add_argument("--test-labels", help="a CSV isic_id,target of the test lesions (the demo set's "
                        "demo_test_labels.csv): also scores the test predictions")
    args = parser.parse_args(argv)
    # what it reads is not rewritten while it reads (a rerun stops with one line): the ensemble and
    # the features first, which fix the GBDTs and image models it reads, then those
    with stage_locks(args, ["report"], ["features", "ensemble"]), stage_locks(args, [], report_reads(args)):
        report(args)


if __name__ == "__main__":
    run_main(main)
