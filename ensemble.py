"""Rank averaging of the models' predictions, the submission file and a report.

Each model's predictions become ranks (ties averaged) divided by their count, and the ensemble is
their mean: only the ranking counts for pAUC, and ranks put models of different scales on one.

Reads:  WORK/folds.csv, WORK/test_lesions.csv, WORK/preds/NAME_{oof,test}.csv for each model
Also reads, for report.html only: WORK/models/NAME/importance.csv, WORK/models/ARCH/fold*/log.csv
Writes: WORK/submission.csv (isic_id,target, in test-metadata order), WORK/report.md, WORK/report.html
        (ROC curves, pAUC table, feature importance, training curves: one file, no network),
        WORK/preds/ensemble_{oof,test}.csv, WORK/ensemble_args.json

    python ensemble.py --work work --names tabular
    python ensemble.py --work work --names tabular,tab_eva02,tab_convnext
    python ensemble.py --work work --predict-only        # the submission alone
    python ensemble.py --work work --test-labels demo_data/demo_test_labels.csv
"""
import argparse
import glob
import html
import itertools
import json
import os
import re

import numpy as np

from common import (DataError, atomic_write, check_ids, check_labels, log, output_lock, pauc, read_csv, read_lesions,
                    read_manifest, read_preds, roc_points, run_main, write_args, write_csv, write_json, write_preds)


def rank01(x):
    """Ranks 1..n with ties averaged, divided by n."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    run = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = (starts[run] + ends[run] + 1) / 2.0
    return ranks / len(x)


def rank_average(preds):
    """Mean over models of each model's ranks / n (ties averaged)."""
    return np.mean([rank01(p) for p in preds], axis=0)


def simplex_grid(m, steps=10):
    """Every vector of m non-negative weights, multiples of 1/steps, that sum to 1 (stars and bars)."""
    return np.array([np.diff([-1, *bars, steps + m - 1]) - 1
                     for bars in itertools.combinations(range(steps + m - 1), m - 1)]) / steps


def choose_weights(ranks, y, rows):
    """The grid's weights whose rank average (ranks: models x lesions) scores the best pAUC on the
    lesions `rows`; of equal scores, the weights nearest to equal ones."""
    grid = simplex_grid(len(ranks))
    scores = np.array([pauc(y[rows], w @ ranks[:, rows]) for w in grid])
    best = grid[scores >= scores.max() - 1e-12]
    return best[np.argmin(((best - 1 / len(ranks)) ** 2).sum(axis=1))]


def nested_choice(ranks, y, folds):
    """The honest out-of-fold score of choosing weights: each fold's lesions are ranked with the
    weights chosen on the other folds. Returns ({fold: weights}, the predictions)."""
    chosen, pred = {}, np.empty(len(y))
    for k in np.unique(folds):
        chosen[k] = choose_weights(ranks, y, folds != k)
        pred[folds == k] = chosen[k] @ ranks[:, folds == k]
    return chosen, pred


def parse_weights(text, names):
    """--weights: "oof" (None: chosen on the out-of-fold predictions), "equal", or one number a model."""
    if text == "oof":
        return None
    if text == "equal":
        return np.full(len(names), 1 / len(names))
    try:
        w = np.array([float(v) for v in text.split(",")])
    except ValueError:
        w = np.zeros(0)
    if len(w) != len(names) or (w < 0).any() or not w.sum() > 0:
        raise DataError(f"--weights {text}: 'oof', 'equal', or {len(names)} non-negative numbers, one for each of "
                        f"{', '.join(names)}")
    return w / w.sum()


def model_preds(work, name, split, ids):
    """A model's predictions, every lesion's present."""
    pred = read_preds(work, name, split, ids)
    if np.isnan(pred).any():
        raise DataError(f"{work}/preds/{name}: isic_id {ids[np.flatnonzero(np.isnan(pred))[0]]} has no prediction")
    return pred


def fold_scores(y, folds, pred):
    return [pauc(y[folds == k], pred[folds == k]) if 0 < y[folds == k].sum() < (folds == k).sum()
            else float("nan") for k in np.unique(folds)]


# ---------------------------------------------------------------- report.html: inline SVG, no plotting library

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac"]  # Tableau 10; the ensemble is drawn in near-black
CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       max-width: 1200px; margin: 28px auto; padding: 0 24px; }
h1 { font-size: 26px; margin: 0 0 14px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 1px solid #ddd; }
figcaption { font-weight: 600; font-size: 14px; margin-bottom: 4px; }
.facts { display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 8px; }
.facts div { background: #f3f5f8; border-radius: 8px; padding: 8px 18px; color: #555; }
.facts b { display: block; font-size: 22px; color: #222; }
.note { color: #666; margin: 4px 0 12px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 16px; text-align: right; border-bottom: 1px solid #e6e6e6; }
th:first-child { text-align: left; }
thead th { border-bottom: 2px solid #bbb; }
td.best { font-weight: 700; }
tr.ensemble { background: #f3f5f8; }
.charts { display: flex; flex-wrap: wrap; gap: 18px 36px; align-items: flex-start; }
figure { margin: 0; }
svg { font: 12px system-ui, sans-serif; max-width: 100%; height: auto; }
svg text { fill: #333; }
.grid { stroke: #ececec; }
.frame { fill: none; stroke: #999; }
.band { fill: #fbe3c4; opacity: .6; }
.band-label { fill: #a15c00; text-anchor: end; }
.axis { font-size: 13px; }
.tick { fill: #666; }
polyline { fill: none; stroke-width: 2; stroke-linejoin: round; }
line[data-series] { stroke-width: 3; }
[data-series="ensemble"] { stroke-width: 3; }
[data-series="chance"] { stroke-dasharray: 5 4; stroke-width: 1.5; }
.bar { fill: #4e79a7; }
.bar-label { font: 11.5px ui-monospace, Menlo, Consolas, monospace; }
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
    """The ROC curves of every model (scores: {name: OOF predictions}), whole and above 80% TPR."""
    ticks = np.linspace(0, 1, 6)
    return ('<p class="note">Out of fold; the legend gives each model\'s OOF pAUC, the area of the shaded band '
            'under its curve (TPR 0.8 to 1).</p><div class="charts"><figure><figcaption>Whole curve</figcaption>'
            + svg_lines("roc", roc_series(y, scores, paucs), "false positive rate (FPR)", "true positive rate (TPR)",
                        ticks, ticks, size=(440, 420), band=(0.8, 1.0, "pAUC region: TPR ≥ 0.8"))
            + '</figure><figure><figcaption>The shaded band, stretched: TPR 0.8 to 1</figcaption>'
            + svg_lines("roc-zoom", roc_series(y, scores, paucs, 0.8), "false positive rate (FPR)",
                        "true positive rate (TPR)", ticks, np.linspace(0.8, 1, 5), size=(440, 420), legend=False)
            + '</figure></div>')


def importance_html(work, names):
    """A bar chart of the top 20 features by gain of each model with WORK/models/NAME/importance.csv."""
    charts, missing = [], []
    for name in names:
        path = os.path.join(work, "models", name, "importance.csv")
        table = read_csv(path, ["feature", "gain"], ["gain"]) if os.path.exists(path) else {"gain": []}
        if not len(table["gain"]):
            missing.append(name)
            continue
        top = np.argsort(-table["gain"], kind="stable")[:20]
        bars = svg_bars(f"importance-{name}", table["feature"][top], table["gain"][top])
        charts.append(f'<figure><figcaption>{esc(name)}: top {len(top)} of {len(table["gain"])} features by gain'
                      f'</figcaption>{bars}</figure>')
    note = (f'<p class="note">No feature importance (WORK/models/NAME/importance.csv) for '
            f'{esc(", ".join(missing))}.</p>' if missing else "")
    return note + (f'<div class="charts">{"".join(charts)}</div>' if charts else "")


def data_ticks(arrays):
    """nice_ticks spanning the finite values of some arrays."""
    v = np.concatenate(arrays)
    v = v[np.isfinite(v)]
    return nice_ticks(v.min(), v.max()) if v.size else nice_ticks(0, 1)


def training_html(work):
    """Validation pAUC and train loss per epoch, one line per fold, of every WORK/models/ARCH/fold*/log.csv."""
    logs = {}  # arch: [(fold, {column: values})]
    for path in glob.glob(os.path.join(work, "models", "*", "fold*", "log.csv")):
        arch, fold = path.split(os.sep)[-3:-1]
        table = read_csv(path, ["epoch", "val_pauc", "train_loss"], ["epoch", "val_pauc", "train_loss"])
        if len(table["epoch"]) and re.fullmatch(r"fold\d+", fold):
            logs.setdefault(arch, []).append((int(fold[4:]), table))
    if not logs:
        return '<p class="note">No image model training logs (WORK/models/ARCH/fold*/log.csv).</p>'
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


def write_report_html(path, work, y, scores, rows, facts, names, combos):
    """report.html, one self-contained file (inline CSS and SVG, no scripts, nothing fetched): the pAUC
    table (rows as report.md's: name, OOF pAUC, fold pAUCs), the ensemble's combinations (combos as
    report.md's), the ROC curves (scores: {name: OOF predictions}, the ensemble last), feature
    importance and the image models' training curves. facts: (number, what) pairs for the header."""
    combo_body = "".join(f"<tr><th>{esc(label)}</th><td>{fmt_weights(w)}</td><td>{o:.4f}</td>"
                         f"<td>{'' if t is None else f'{t:.4f}'}</td></tr>" for label, w, o, t in combos)
    table = np.array([[s] + list(fs) for _, s, fs in rows])
    best = np.where(np.isnan(table), -1, table).max(axis=0)  # bold the best of each column
    head = ("<tr><th>model</th><th>OOF pAUC</th>" + "".join(f"<th>fold {k}</th>" for k in range(table.shape[1] - 1))
            + "</tr>")
    body = "".join(f'<tr{" class=ensemble" if n == "ensemble" else ""}><th>{esc(n)}</th>'
                   + "".join(f'<td{" class=best" if v == b else ""}>{v:.4f}</td>' for v, b in zip(vals, best))
                   + "</tr>" for (n, _, _), vals in zip(rows, table))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ISIC 2024 pipeline report</title>
<style>{CSS}</style></head><body>
<h1>ISIC 2024 pipeline report</h1>
<div class="facts">{"".join(f"<div><b>{v:,}</b>{esc(what)}</div>" for v, what in facts)}</div>
<p class="note">Score: partial AUC above 80% TPR (0 to 0.2; a random ranking scores 0.02), out of fold:
each lesion scored by the model of the fold that did not train on it.</p>
<h2>OOF pAUC per model and fold</h2>
<table id="pauc"><thead>{head}</thead><tbody>{body}</tbody></table>
<h2>Ensemble weights</h2>
<p class="note">Rank averages of the models, the weights in the order {esc(", ".join(names))}.</p>
<table id="combinations"><thead><tr><th>rank average of</th><th>weights</th><th>OOF pAUC</th><th>test pAUC</th></tr>
</thead><tbody>{combo_body}</tbody></table>
<h2>ROC curves</h2>
{roc_html(y, scores, {n: s for n, s, _ in rows})}
<h2>Feature importance</h2>
{importance_html(work, [n for n in scores if n != "ensemble"])}
<h2>Image model training</h2>
{training_html(work)}
</body></html>
"""
    atomic_write(path, lambda f: f.write(page.encode()))


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


def ensemble_spec(models_dir, names, weights):
    """models/ensemble.json: the models and weights of the submission, with the digests of the model
    folders, so that --predict-only rebuilds the same submission from the same models."""
    members = {n: read_manifest(os.path.join(models_dir, n), f"gbdt.py --name {n}")["digest"] for n in names}
    return {"names": names, "weights": weights.tolist(), "members": members}


def read_ensemble_spec(models_dir, names):
    """The training run's names and weights, after checking that the models folder holds its models."""
    path = os.path.join(models_dir, "ensemble.json")
    if not os.path.exists(path):
        raise DataError(f"{path}: not found: run ensemble.py on the training data first")
    with open(path) as f:
        spec = json.load(f)
    if names and names != spec["names"]:
        raise DataError(f"{path}: the submission was built from {', '.join(spec['names'])}, not {', '.join(names)}")
    if ensemble_spec(models_dir, spec["names"], np.array(spec["weights"])) != spec:
        raise DataError(f"{models_dir}: its GBDT models are not those the ensemble was built from (models of two runs "
                        "mixed?): run gbdt.py and ensemble.py on the training data again")
    return spec["names"], np.array(spec["weights"])


def ensemble(args):
    """The stage's work: read and check every input, then write the submission and the report."""
    models_dir = args.models or os.path.join(args.work, "models")
    test = read_lesions(args.work, "test")
    names = args.names.split(",") if args.names else None
    if args.predict_only:
        names, weights = read_ensemble_spec(models_dir, names)
    names = names or sorted(os.path.basename(p)[:-9] for p in glob.glob(os.path.join(args.work, "preds", "*_test.csv"))
                            if not os.path.basename(p).startswith(("img_", "ensemble_")))
    if not names:
        raise DataError(f"{args.work}/preds: no model predictions found (run gbdt.py first)")
    # every input is read and checked before anything is written
    tst = [model_preds(args.work, n, "test", test["isic_id"]) for n in names]
    test_ranks = np.array([rank01(p) for p in tst]) if len(test["isic_id"]) else np.zeros((len(names), 0))
    if not args.predict_only:
        train = read_lesions(args.work, "train")
        y, folds = train["target"], train["fold"]
        oof = [model_preds(args.work, n, "train", train["isic_id"]) for n in names]
        oof_ranks = np.array([rank01(p) for p in oof])
        weights, honest = parse_weights(args.weights, names), None
        if weights is None:
            if len(names) > 6:
                raise DataError(f"--weights oof searches the weights of at most 6 models, not {len(names)}: pass "
                                "--names, or --weights")
            weights = choose_weights(oof_ranks, y, np.ones(len(y), bool))
            per_fold, honest = nested_choice(oof_ranks, y, folds)
        spec = ensemble_spec(models_dir, names, weights)
        # the image models alone, for reference (the GBDTs use them); an undecodable tile ranks last
        images = sorted(os.path.basename(p)[:-8] for p in glob.glob(os.path.join(args.work, "preds", "img_*_oof.csv")))
        scores = {**dict(zip(names, oof)), **{n: np.nan_to_num(read_preds(args.work, n, "train", train["isic_id"]),
                                                                nan=-1.0) for n in images},
                  "ensemble": weights @ oof_ranks if honest is None else honest}
        labels = None
        if args.test_labels:  # held-out answers, such as the demo set's
            labels = read_csv(args.test_labels, ["isic_id", "target"], ["target"])
            check_ids(args.test_labels, labels["isic_id"], test["isic_id"])
            check_labels(args.test_labels, labels["isic_id"], labels["target"])
    ens_test = weights @ test_ranks
    write_preds(args.work, "ensemble", "test", test, ens_test)
    write_csv(os.path.join(args.work, "submission.csv"), ["isic_id", "target"], [test["isic_id"], ens_test])
    log(f"wrote {args.work}/submission.csv: {len(ens_test)} rows, the rank average of "
        + ", ".join(f"{n} (weight {w:g})" for n, w in zip(names, weights)))
    if args.predict_only:
        return
    write_json(os.path.join(models_dir, "ensemble.json"), spec)
    rows = [(n, pauc(y, p), fold_scores(y, folds, p)) for n, p in scores.items()]
    for n, s, fs in rows:
        log(f"{n:>20s}: OOF pAUC {s:.4f}  per fold {' '.join(f'{f:.4f}' for f in fs)}")
    write_preds(args.work, "ensemble", "train", train, scores["ensemble"])
    test_y = labels["target"] if labels is not None else None
    combos = combination_rows(names, oof_ranks, y, weights, honest, test_ranks, test_y)
    n_folds, n_patients = len(np.unique(folds)), len(np.unique(train["patient_id"]))
    how = ("chosen on the out-of-fold predictions (--weights oof); the ensemble's OOF row below ranks each fold "
           "with the weights chosen on the other folds: "
           + ", ".join(f"fold {k} {fmt_weights(w)}" for k, w in per_fold.items())) if honest is not None \
        else f"--weights {args.weights}"
    lines = ["# ISIC 2024 pipeline report", "",
             f"{len(y)} train lesions ({y.sum()} malignant) of {n_patients} patients, "
             f"{len(test['isic_id'])} test lesions. Score: partial AUC above 80% TPR (max 0.2).", "",
             "| model | OOF pAUC | " + " | ".join(f"fold {k}" for k in range(n_folds)) + " |",
             "|---|---|" + "---|" * n_folds]
    lines += [f"| {n} | {s:.4f} | " + " | ".join(f"{f:.4f}" for f in fs) + " |" for n, s, fs in rows]
    lines += ["", f"Ensemble weights ({', '.join(names)}): {fmt_weights(weights)}, {how}.", "",
              "| rank average of | weights | OOF pAUC | test pAUC |", "|---|---|---|---|"]
    lines += [f"| {label} | {fmt_weights(w)} | {o:.4f} | {'' if t is None else f'{t:.4f}'} |"
              for label, w, o, t in combos]
    if args.test_labels:
        test_scores = {**dict(zip(names, tst)), "ensemble": ens_test}
        lines += ["", f"Test pAUC against {args.test_labels}: "
                  + ", ".join(f"{n} {pauc(test_y, p):.4f}" for n, p in test_scores.items())]
        log(lines[-1])
    atomic_write(os.path.join(args.work, "report.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    facts = [(len(y), "train lesions"), (int(y.sum()), "malignant"), (n_patients, "patients"),
             (len(test["isic_id"]), "test lesions")]
    write_report_html(os.path.join(args.work, "report.html"), args.work, y, scores, rows, facts, names, combos)
    write_args(os.path.join(args.work, "ensemble_args.json"), args)
    log(f"wrote {args.work}/report.md and report.html")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="work")
    parser.add_argument("--names", help="comma-separated model names in preds/; default: every model there "
                        "except the image models (img_*), which the GBDTs already use")
    parser.add_argument("--weights", default="oof",
                        help="oof: chosen on the out-of-fold predictions (a grid of tenths); equal; or one number "
                             "a model, in --names order")
    parser.add_argument("--models", help="folder of trained models (default WORK/models); may be read-only")
    parser.add_argument("--predict-only", action="store_true",
                        help="only the submission, with the models and weights of --models/ensemble.json")
    parser.add_argument("--test-labels", help="a CSV isic_id,target of the test lesions (the demo set's "
                        "demo_test_labels.csv): also scores the test predictions")
    args = parser.parse_args(argv)
    with output_lock(args.work, "ensemble"):
        ensemble(args)


if __name__ == "__main__":
    run_main(main)
