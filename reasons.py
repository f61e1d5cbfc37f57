"""Why a lesion ranks where it does: its top three concepts by TreeSHAP contribution, each with a
phrase from the lesion's own values ("area: 3.1 SD above this patient's other lesions").

LightGBM's pred_contrib gives each feature's exact contribution to a booster's raw score (log-odds;
with the bias, last, they sum to it). A GBDT's contributions are the mean over the boosters that
make its predictions: every fold and bag for test lesions, as gbdt.py predicts test; the boosters
of the fold that held a train lesion out for train (out of fold, like its score). Under the rank
average the members' contributions are combined as their ensemble weights combine them: the
weighted mean of the log-odds contributions of the members with a weight above 0 (ranks have no
contributions of their own). Only the lesions that the triage shows get reasons: each patient's
top TOP_K by the ensemble score (and, out of fold, every malignant lesion, for the report's table).

A concept is a measurement with all its patient, site and location normalizations, an image
model's score with its normalizations, its embedding, the lesion counts, the z-score summary, the
outlier distance, or a categorical column's one-hots (the three site columns are one concept):
concept_of derives it from the column name. A concept's contribution is the sum of its features';
its phrase comes from the feature that contributes most. Every lesion shown gets three reasons,
its three largest contributions; one that does not raise the score says so ("lowers the score"):
a lesion can rank in its patient's top 15 with little for it.

Used by ensemble.py (which writes the reasons into triage.csv and triage_oof.csv) and report.py.
"""
import argparse
import os
import re

import numpy as np

import gbdt
from common import CATEGORICAL, NUMERIC, STATS, DataError, rank_in_patient, read_json
from features import CONTEXT, CONTEXT_STATS, OUTLIER_K

TOP_K = 15  # the triage's list: each patient's top 15 (the organisers' secondary score)
N_REASONS = 3
REASONS = [f"reason_{r + 1}" for r in range(N_REASONS)]  # their columns in triage.csv and triage_oof.csv
NORMALIZED = re.compile(r"(.+?)_((?:pn_(?:%s))|(?:(?:%s)_(?:%s)))" % ("|".join(STATS), "|".join(CONTEXT),
                                                                     "|".join(CONTEXT_STATS)))
IMAGE = re.compile(r"img_(.+?)(?:_(pn_dev|pn_z|site_z|site_pct))?")  # gbdt.image_score_features' columns
SITE_COLUMNS = ("anatom_site_general", "tbp_lv_location", "tbp_lv_location_simple")
LABELS = {  # the TBP measurements in words; an engineered feature's name, underscores as spaces, is its label
    "age_approx": "age", "clin_size_long_diam_mm": "diameter", "tbp_lv_A": "redness (A)",
    "tbp_lv_Aext": "redness around (Aext)", "tbp_lv_B": "yellowness (B)", "tbp_lv_Bext": "yellowness around (Bext)",
    "tbp_lv_C": "chroma", "tbp_lv_Cext": "chroma around", "tbp_lv_H": "hue", "tbp_lv_Hext": "hue around",
    "tbp_lv_L": "lightness", "tbp_lv_Lext": "lightness around", "tbp_lv_areaMM2": "area",
    "tbp_lv_area_perim_ratio": "border jaggedness", "tbp_lv_color_std_mean": "colour variation",
    "tbp_lv_deltaA": "redness contrast", "tbp_lv_deltaB": "yellowness contrast", "tbp_lv_deltaL": "lightness contrast",
    "tbp_lv_deltaLB": "colour contrast (deltaLB)", "tbp_lv_deltaLBnorm": "colour contrast",
    "tbp_lv_eccentricity": "eccentricity", "tbp_lv_minorAxisMM": "smallest diameter",
    "tbp_lv_nevi_confidence": "nevus likeness", "tbp_lv_norm_border": "border irregularity",
    "tbp_lv_norm_color": "colour irregularity", "tbp_lv_perimeterMM": "perimeter",
    "tbp_lv_radial_color_std_max": "radial colour variation", "tbp_lv_stdL": "lightness spread",
    "tbp_lv_stdLExt": "lightness spread around", "tbp_lv_symm_2axis": "asymmetry",
    "tbp_lv_symm_2axis_angle": "asymmetry axis angle", "tbp_lv_x": "position x", "tbp_lv_y": "position y",
    "tbp_lv_z": "position z", "sex": "sex", "tbp_tile_type": "tile lighting", "attribution": "clinic",
    "body_site": "body site", "n_lesions": "lesion counts", "pn_z_summary": "measurements unusual for the patient",
    "pn_knn_distance": "outlier distance"}
assert set(NUMERIC) <= set(LABELS)


def concept_of(name):
    """(concept, kind) of a feature column: what it measures, and which statistic of it it is."""
    if name.startswith("emb_"):
        return f"image embedding ({name[4:].rsplit('_', 1)[0]})", "embedding"
    image = IMAGE.fullmatch(name)
    if image:
        return f"image score ({image.group(1)})", image.group(2) or "score"
    if name.startswith("n_lesions_patient"):
        return LABELS["n_lesions"], name
    if name in ("pn_z_count_above_2", "pn_z_max_abs"):
        return LABELS["pn_z_summary"], name
    if name == "pn_knn_distance":
        return LABELS[name], "knn"
    column, _, value = name.partition("__")
    if value and column in CATEGORICAL:
        return LABELS["body_site" if column in SITE_COLUMNS else column], "is " + value.replace("_", " ")
    normalized = NORMALIZED.fullmatch(name)
    base, kind = normalized.groups() if normalized else (name, "value")
    return LABELS.get(base, base.replace("_", " ")), kind


def share(p):
    return f"{max(100 * p, 1):.0f}%"


def describe(kind, v):
    """The phrase of one feature's value: what the lesion's own value says."""
    if np.isnan(v):
        return "missing"
    where = {"pn": "this patient's lesions", "site": "the patient's lesions on this body site",
             "location": "the patient's lesions in this location"}.get(kind.split("_")[0])
    if kind == "score":  # extract.py standardizes each fold model's logits by its out-of-fold mean and std
        return f"{abs(v):.1f} SD {'above' if v >= 0 else 'below'} the mean of the training lesions"
    if kind.endswith("_z"):
        return f"{abs(v):.1f} SD {'above' if v >= 0 else 'below'} the mean of {where}"
    if kind.endswith("_pct"):
        return (f"the highest of {where}" if v >= 1 else f"in the top {share(1 - v)} of {where}" if v >= 0.5
                else f"in the bottom {share(v)} of {where}")
    if kind == "pn_dev":
        return f"{v:+.3g} from the median of {where}"
    if kind in ("pn_is_max", "pn_is_min"):
        return f"{'' if v else 'not '}the {'highest' if kind == 'pn_is_max' else 'lowest'} of {where}"
    if kind.startswith("is "):
        return kind[3:] if v else f"not {kind[3:]}"
    return {"n_lesions_patient": f"{v:.0f} lesions on this patient",
            "n_lesions_patient_site": f"{v:.0f} of the patient's lesions on this body site",
            "n_lesions_patient_location": f"{v:.0f} of the patient's lesions in this location",
            "pn_z_count_above_2": f"{v:.0f} measurements beyond 2 SD of the patient's lesions",
            "pn_z_max_abs": f"one {v:.1f} SD from the patient's lesions",
            "knn": f"{v:.1f} SD (mean) from its {OUTLIER_K} most similar lesions of the patient",
            "embedding": "its embedding"}.get(kind, f"{v:.3g}")


def contributions(boosters, x):
    """The mean over boosters of each feature's TreeSHAP contribution to the raw score (log-odds),
    rows x (features + 1), the bias last."""
    return sum(b.predict(x, pred_contrib=True) for b in boosters) / len(boosters)


def top_reasons(phi, values, names, n=N_REASONS):
    """n lists (one per reason) of each row's reasons, "concept: phrase", by falling contribution;
    phi: rows x names (no bias), values: the rows' feature values. A row whose contributions are
    not all finite gets none (one lesion's problem costs only its reasons)."""
    concepts, kinds = zip(*map(concept_of, names))
    labels, concept = np.unique(concepts, return_inverse=True)
    by_concept = np.zeros((len(phi), len(labels)))
    np.add.at(by_concept.T, concept, phi.T)
    columns = [np.flatnonzero(concept == k) for k in range(len(labels))]
    out = [[""] * len(phi) for _ in range(n)]
    for i in np.flatnonzero(np.isfinite(by_concept).all(1)):
        for r, k in enumerate(np.argsort(-by_concept[i], kind="stable")[:n]):
            lowers = by_concept[i, k] <= 0  # then the phrase is of the feature that lowers it most
            j = columns[k][np.argmax(phi[i, columns[k]] * (-1 if lowers else 1))]
            out[r][i] = f"{labels[k]}: {describe(kinds[j], float(values[i, j]))}" + " (lowers the score)" * bool(lowers)
    return out


def member_args(work, models_dir, name):
    """A GBDT's feature options (--image, --embeddings), from its models folder's args.json."""
    a = read_json(os.path.join(models_dir, name, "args.json"), f"gbdt.py --name {name}",
                  {"args": {"image": ["text"], "embeddings": ["text"]}})["args"]
    return argparse.Namespace(work=work, image=a["image"], embeddings=a["embeddings"])


def member_images(models_dir, names):
    """The image models whose scores or embeddings the GBDTs `names` read (none for a GBDT without
    args.json: reading it later names the problem)."""
    archs = set()
    for name in names:
        if not os.path.exists(os.path.join(models_dir, name, "args.json")):
            continue
        args = member_args("", models_dir, name)
        archs.update(args.image + args.embeddings)
    return sorted(archs)


def member_contributions(work, models_dir, name, made_by, split, lesions, rows):
    """A GBDT's contributions (len(rows) x (features + 1)), its feature names and the rows' values:
    test rows from all its boosters, train rows from those of the fold that held them out. made_by:
    the digest of the model that made the predictions being explained."""
    args = member_args(work, models_dir, name)
    inputs = gbdt.input_digests(args, models_dir)
    x, names = gbdt.load_features(args, split, lesions, inputs)
    x = x[rows]
    boosters, digest = gbdt.load_boosters(os.path.join(models_dir, name), names, inputs)
    if digest != made_by:
        raise DataError(f"{models_dir}/{name}: not the model that made the predictions being explained: run "
                        f"gbdt.py --name {name} and ensemble.py again")
    if split == "test":
        return contributions(list(boosters.values()), x), names, x
    phi = np.full((len(rows), len(names) + 1), np.nan)
    fold_of = {f: int(re.match(r"fold(\d+)_", f).group(1)) for f in boosters}
    for k in np.unique(lesions["fold"][rows]):
        held_out = lesions["fold"][rows] == k
        phi[held_out] = contributions([b for f, b in boosters.items() if fold_of[f] == k], x[held_out])
    return phi, names, x


def explain(work, models_dir, names, weights, members, split, lesions, score):
    """N_REASONS arrays of reasons, one entry per lesion of the split: each patient's top TOP_K by
    `score` (and every malignant train lesion) get theirs, the rest "". The members' contributions
    combine by the weights that made each lesion's score (weights: lesions x members; out of fold,
    those chosen on the other folds); a feature that several members use adds up."""
    rows = np.flatnonzero((rank_in_patient(score, lesions["patient_id"]) <= TOP_K) | (lesions.get("target", 0) == 1))
    out = [np.full(len(score), "", dtype=object) for _ in range(N_REASONS)]
    if not len(rows):
        return out
    column, phi, values = {}, [], []  # every member's features as columns of one table
    for name, w in zip(names, weights[rows].T):
        if not w.any():
            continue
        member_phi, member_names, x = member_contributions(work, models_dir, name, members[name], split, lesions,
                                                           rows)
        for j, f in enumerate(member_names):
            if f not in column:
                column[f] = len(column)
                phi.append(np.zeros(len(rows)))
                values.append(x[:, j])
            phi[column[f]] += w * member_phi[:, j]
    for r, reasons in enumerate(top_reasons(np.array(phi).T, np.array(values).T, list(column))):
        out[r][rows] = reasons
    return out
