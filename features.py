"""Tabular features: the raw TBP measurements, engineered and clinical ABCDE features, categorical
one-hots fitted on train, lesion counts, and every numeric feature normalized against the same
patient's other lesions (the "ugly duckling" sign: z-score, percentile rank, deviation from the
patient median, is-max and is-min), with a summary of those z-scores (how many beyond 2, the
largest) and a within-patient outlier distance (mean distance to the k nearest of the patient's
lesions); and the z-score and percentile within patient x body site and patient x location.

This is the one stage that parses the Kaggle CSVs: it records the lesions of each split in the
work directory, where every later stage reads them.

Reads:  DATA/train-metadata.csv, DATA/test-metadata.csv
Writes: WORK/folds.csv (isic_id,patient_id,target,fold: made once, patient-grouped, or taken from the models
        folder's copy when it has one; checked on reruns),
        WORK/test_lesions.csv (isic_id,patient_id), WORK/features/{train,test}.npy (float32) with
        {train,test}_ids.txt beside them, WORK/features/columns.txt, WORK/features/args.json,
        WORK/models/features.json (the vocabularies, which --predict-only reads back from --models) and
        WORK/models/folds.csv (a copy: the folds travel with the fold models, to the next run of a notebook),
        WORK/train_diagnosis.csv (isic_id,iddx_1: for gbdt.py's training weights, never a feature),
        and last WORK/records/features.json (the digests of those files and of features.json)

    python features.py --data demo_data --work work                     # tiny: the demo set
    python features.py --data DATA_DIR --work work
    python features.py --data DIR --work work_nopn --no-patient-norm    # to measure what it adds
"""
import argparse
import math
import os
import re
import warnings

import numpy as np

from common import (CATEGORICAL, NUMERIC, SEED, STATS, DataError, add_path_flags, atomic_copy, atomic_write,
                    check_folds, check_ids, codes, data_path, file_digest, log, models_folder, number,
                    patient_normalize, read_json, read_lesions, read_test, read_train, run_main, save_array,
                    stage_locks, write_args, write_csv, write_json, write_record)


def make_folds(patient_ids, targets, n_folds=5, seed=42):
    """Fold of each row: grouped by patient, positives spread as evenly as the grouping allows.

    Patients in a seeded random order, those with the most positives first, each to the fold with
    the fewest positives so far (then the fewest rows)."""
    patients, patient_codes = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
    pos = np.bincount(patient_codes, weights=np.asarray(targets, dtype=float), minlength=len(patients))
    rows = np.bincount(patient_codes, minlength=len(patients))
    order = np.random.default_rng(seed).permutation(len(patients))
    order = order[np.argsort(-pos[order], kind="stable")]
    fold_pos, fold_rows = np.zeros(n_folds), np.zeros(n_folds)
    patient_fold = np.empty(len(patients), dtype=np.int64)
    for p in order:
        f = np.lexsort((fold_rows, fold_pos))[0] if pos[p] > 0 else np.argmin(fold_rows)
        patient_fold[p] = f
        fold_pos[f] += pos[p]
        fold_rows[f] += rows[p]
    return patient_fold[patient_codes]


def record_folds(work, train, models_dir, n_folds=5, seed=42):
    """The folds of WORK/folds.csv, made on first use, or copied from MODELS/folds.csv where the fold
    models of an earlier run came with it. A folds.csv made from other training data is refused:
    reused, it could put one patient in two folds."""
    path, travelled = os.path.join(work, "folds.csv"), os.path.join(models_dir, "folds.csv")
    copied = not os.path.exists(path) and os.path.exists(travelled)
    if copied:
        atomic_copy(travelled, path)
        log(f"{path}: the folds of {travelled}, which the fold models there were trained on")
    if not os.path.exists(path):
        folds = make_folds(train["patient_id"], train["target"], n_folds, seed)
        check_folds(path, train["target"], folds)
        write_csv(path, ["isic_id", "patient_id", "target", "fold"],
                  [train["isic_id"], train["patient_id"], train["target"].astype(int), folds])
        log(f"wrote {path}: {n_folds} folds grouped by patient, seed {seed}")
        return folds
    try:
        old = read_lesions(work, "train", recorded=False)  # this stage's own file: its record is rewritten below
        check_ids(path, old["isic_id"], train["isic_id"])
        for c in ("patient_id", "target"):
            differs = np.flatnonzero(old[c] != train[c])
            if len(differs):
                raise DataError(f"{travelled if copied else path}: made from other training data ({c} of isic_id "
                                f"{train['isic_id'][differs[0]]} differs in {len(differs)} row(s)): use a new "
                                "--work, or delete folds.csv and rerun every stage")
    except DataError:
        if copied:  # a refused copy is not left to be reused
            os.remove(path)
        raise
    return old["fold"]


def engineered_features(t):
    """The public feature set's ratios and interactions, plus clinical ABCDE features.

    Asymmetry, Border, Colour and Diameter are measured per lesion; Evolution cannot be (one visit),
    so it stands in as change against the patient's own lesions, from patient_normalize."""
    g = {c[7:] if c.startswith("tbp_lv_") else c: t[c] for c in NUMERIC}
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero denominator: NaN, below
        size, age = g["clin_size_long_diam_mm"], g["age_approx"]
        area, perim = g["areaMM2"], g["perimeterMM"]
        delta_e = np.sqrt(g["deltaA"] ** 2 + g["deltaB"] ** 2 + g["deltaL"] ** 2)
        border_complexity = g["norm_border"] + g["symm_2axis"]
        shape_index = area / perim ** 2
        f = {
            "lesion_size_ratio": g["minorAxisMM"] / size,
            "lesion_shape_index": shape_index,
            "hue_contrast": np.abs(g["H"] - g["Hext"]),
            "luminance_contrast": np.abs(g["L"] - g["Lext"]),
            "lesion_color_difference": delta_e,
            "border_complexity": border_complexity,
            "color_uniformity": g["color_std_mean"] / g["radial_color_std_max"],
            "position_distance_3d": np.sqrt(g["x"] ** 2 + g["y"] ** 2 + g["z"] ** 2),
            "perimeter_to_area_ratio": perim / area,
            "area_to_perimeter_ratio": area / perim,
            "lesion_visibility_score": g["deltaLBnorm"] + g["norm_color"],
            "symmetry_border_consistency": g["symm_2axis"] * g["norm_border"],
            "consistency_symmetry_border": g["symm_2axis"] * g["norm_border"] / (g["symm_2axis"] + g["norm_border"]),
            "color_consistency": g["stdL"] / g["Lext"],
            "consistency_color": g["stdL"] * g["Lext"] / (g["stdL"] + g["Lext"]),
            "size_age_interaction": size * age,
            "hue_color_std_interaction": g["H"] * g["color_std_mean"],
            "lesion_severity_index": (g["norm_border"] + g["norm_color"] + g["eccentricity"]) / 3,
            "shape_complexity_index": border_complexity + shape_index,
            "shape_color_consistency": g["eccentricity"] * g["color_std_mean"],
            "border_length_ratio": perim / (2 * np.pi * np.sqrt(area / np.pi)),
            "age_size_symmetry_index": age * g["areaMM2"] * g["symm_2axis"],
            "age_normalized_nevi_confidence": g["nevi_confidence"] / age,
            "age_normalized_nevi_confidence_2": np.sqrt(size ** 2 + age ** 2),
            "color_contrast_index": g["deltaA"] + g["deltaB"] + g["deltaL"] + g["deltaLBnorm"],
            "log_lesion_area": np.log1p(area),
            "normalized_lesion_size": size / age,
            "mean_hue_difference": (g["H"] + g["Hext"]) / 2,
            "std_dev_contrast": np.sqrt((g["deltaA"] ** 2 + g["deltaB"] ** 2 + g["deltaL"] ** 2) / 3),
            "color_shape_composite_index": (g["color_std_mean"] + g["area_perim_ratio"] + g["symm_2axis"]) / 3,
            "lesion_orientation_3d": np.arctan2(g["y"], g["x"]),
            "overall_asymmetry_factor": g["symm_2axis"] * g["eccentricity"],
            "volume_approximation_3d": area * np.sqrt(g["x"] ** 2 + g["y"] ** 2 + g["z"] ** 2),
            "color_range": np.abs(g["L"] - g["Lext"]) + np.abs(g["A"] - g["Aext"]) + np.abs(g["B"] - g["Bext"]),
            "border_color_interaction": g["norm_border"] * g["norm_color"],
            "border_color_interaction_2": g["norm_border"] * g["norm_color"] / (g["norm_border"] + g["norm_color"]),
            "size_color_contrast_ratio": size / g["deltaLBnorm"],
            "age_normalized_nevi_confidence_ratio": g["nevi_confidence"] / (1 + age),
            "color_asymmetry_index": g["radial_color_std_max"] * g["symm_2axis"],
            "color_variation_intensity": g["norm_color"] * g["deltaLBnorm"],
            "color_contrast_ratio": g["deltaLBnorm"] / g["Lext"],
            # clinical ABCDE
            "abcde_asymmetry": g["symm_2axis"] * (1 + g["eccentricity"]),
            "abcde_border_irregularity": g["area_perim_ratio"] / (4 * np.pi),
            "abcde_color_variegation": g["color_std_mean"] + g["radial_color_std_max"] + g["norm_color"],
            "abcde_color_darkness": g["Lext"] - g["L"],
            "abcde_diameter_over_6mm": (size > 6).astype(float),
            "abcde_not_nevus": 100 - g["nevi_confidence"],
        }
    names = list(f)
    x = np.stack([f[n] for n in names], dtype=np.float64)
    x[~np.isfinite(x)] = np.nan  # a zero denominator is missing, not infinite
    return names, x.T  # feature-major in memory, as patient_normalize wants


def group_counts(*keys):
    """For each row, how many rows share its combination of keys (integer codes)."""
    group = np.zeros(len(keys[0]), dtype=np.int64)
    for code in keys:  # renumbered after each key so the combined code stays below N^2
        _, group, counts = np.unique(group * (code.max(initial=0) + 1) + code, return_inverse=True,
                                     return_counts=True)
    return counts[group]


# body-site context: real TBP lesions differ by body region (sun exposure, the camera's lighting), so a
# lesion is also compared with the same patient's lesions on the same site and in the same location
CONTEXT = {"site": "anatom_site_general", "location": "tbp_lv_location_simple"}
CONTEXT_STATS = ("z", "pct")
# the measurements the within-patient outlier distance uses: size, shape, border, colour, contrast
OUTLIER_COLUMNS = ["clin_size_long_diam_mm", "tbp_lv_areaMM2", "tbp_lv_minorAxisMM", "tbp_lv_eccentricity",
                   "tbp_lv_area_perim_ratio", "tbp_lv_norm_border", "tbp_lv_symm_2axis", "tbp_lv_norm_color",
                   "tbp_lv_color_std_mean", "tbp_lv_radial_color_std_max", "tbp_lv_deltaLBnorm", "tbp_lv_L",
                   "tbp_lv_A", "tbp_lv_B", "tbp_lv_H", "tbp_lv_stdL", "tbp_lv_nevi_confidence"]
OUTLIER_K = 5


def group_normalize(x, patient, group, out):
    """CONTEXT_STATS of each feature (columns of x) within patient x group, written into out
    (len(CONTEXT_STATS), F, N); NaN for a lesion whose group is missing (code -1)."""
    patient_normalize(x, patient * (group.max(initial=0) + 2) + group + 1, out=out, stats=CONTEXT_STATS)
    out[:, :, group < 0] = np.nan


def z_summary(z):
    """Per lesion, over its features' patient z-scores (N, F): how many are beyond 2 in size, and the
    largest size; NaN where every z is missing."""
    size = np.abs(z)
    with np.errstate(invalid="ignore"):
        count = (size > 2).sum(1).astype(float)
    seen = ~np.isnan(size).all(1)
    largest = np.full(len(z), np.nan)
    largest[seen] = np.nanmax(size[seen], axis=1)
    return np.where(seen, count, np.nan), largest


def knn_outlier(z, patient, k=OUTLIER_K, chunk=1024):
    """Each lesion's mean Euclidean distance to its k nearest other lesions of the same patient, on
    patient z-scores (N, D) with missing values at the patient mean (0); NaN for a patient's only
    lesion. Distances are computed patient by patient, in blocks of `chunk` rows, so that a patient
    with 10,000 lesions needs chunk x 10,000 floats at a time."""
    z = np.nan_to_num(np.asarray(z, np.float64))
    out = np.full(len(z), np.nan)
    order = np.argsort(patient, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(patient[order]) != 0, True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        kk = min(k, len(rows) - 1)
        if kk == 0:
            continue
        p = z[rows]
        sq = (p * p).sum(1)
        for c in range(0, len(rows), chunk):
            d2 = sq[c:c + chunk, None] + sq[None] - 2 * p[c:c + chunk] @ p.T
            d2[np.arange(len(d2)), np.arange(c, c + len(d2))] = np.inf  # not itself
            nearest = np.partition(d2, kk - 1, axis=1)[:, :kk]
            out[rows[c:c + chunk]] = np.sqrt(np.maximum(nearest, 0)).mean(1)
    return out


def fit_vocabularies(train):
    return {c: sorted(set(train[c]) - {""}) for c in CATEGORICAL if c in train}


def build_features(table, vocabularies, patient_norm=True, context=True, outlier=True):
    """Feature matrix (float32, N x F) and column names of one metadata table; the vocabularies come
    from train, so train and test get the same columns. Every statistic of a lesion comes from its
    own patient's lesions. patient_norm: the STATS of each numeric feature within the patient, and
    (outlier) the summary of its patient z-scores and its outlier distance; context: CONTEXT_STATS
    within patient x site and patient x location.

    The matrix is feature-major in memory (Fortran order): every block is copied in whole rows of
    the (F, N) buffer, where a row-major (N, F) matrix would be filled by a transposing copy of each
    feature; LightGBM reads either order without a copy."""
    missing = [c for c in NUMERIC + list(vocabularies) if c not in table]
    if missing:
        raise DataError(f"metadata lacks column(s) {', '.join(missing)}")
    eng_names, eng = engineered_features(table)
    numeric = np.vstack([np.stack([table[c] for c in NUMERIC]), eng.T]).T  # (N, F), feature-major
    numeric_names = NUMERIC + eng_names
    patient = codes(table["patient_id"])
    counts = [group_counts(patient), group_counts(patient, codes(table["anatom_site_general"])),
              group_counts(patient, codes(table["tbp_lv_location_simple"]))]
    names = numeric_names + ["n_lesions_patient", "n_lesions_patient_site", "n_lesions_patient_location"]
    one_hots = {c: codes(table[c], vocab) for c, vocab in vocabularies.items()}  # -1: never seen in train
    n_num, n = len(numeric_names), len(patient)
    outlier = outlier and patient_norm  # it works on the patient z-scores
    n_pn = (len(STATS) * n_num + 3 * outlier) if patient_norm else 0
    n_context = len(CONTEXT) * len(CONTEXT_STATS) * n_num if context else 0
    x = np.empty((len(names) + n_pn + n_context + sum(map(len, vocabularies.values())), n), np.float32)
    x[:n_num] = numeric.T
    x[n_num:len(names)] = counts
    if patient_norm:  # written straight into its rows of x: no float64 copy of the largest block
        pn_rows = x[len(names):len(names) + len(STATS) * n_num].reshape(len(STATS), n_num, n)
        patient_normalize(numeric, patient, out=pn_rows)
        names += [f"{name}_pn_{stat}" for stat in STATS for name in numeric_names]
    if outlier:
        z = pn_rows[STATS.index("z")]
        x[len(names):len(names) + 2] = z_summary(z.T)
        x[len(names) + 2] = knn_outlier(z[[numeric_names.index(c) for c in OUTLIER_COLUMNS]].T, patient)
        names += ["pn_z_count_above_2", "pn_z_max_abs", "pn_knn_distance"]
    if context:
        for key, column in CONTEXT.items():
            rows = x[len(names):len(names) + len(CONTEXT_STATS) * n_num].reshape(len(CONTEXT_STATS), n_num, n)
            group = codes(table[column])
            group[np.asarray(table[column]) == ""] = -1  # a missing site: no site context
            group_normalize(numeric, patient, group, rows)
            names += [f"{name}_{key}_{stat}" for stat in CONTEXT_STATS for name in numeric_names]
    for c, vocab in vocabularies.items():
        x[len(names):len(names) + len(vocab)] = np.arange(len(vocab))[:, None] == one_hots[c]
        names += [f"{c}__{re.sub('[^0-9A-Za-z]+', '_', v)}" for v in vocab]  # LightGBM-safe names
    return x.T, names


def check_finite(x, names, table, path, block=64):
    """NaN is a missing value, but inf comes from a measurement so large (near float32's 3.4e38), or
    so close to 0 (a divisor near 1e-38), that a feature made from it overflows: a DataError naming
    the metadata file, the first such lesion, the feature and the measurement. A block of columns
    at a time (x is feature-major): a mask of all 400,000 x 860 would take 340 MB."""
    bad = np.zeros(len(x), bool)
    for j in range(0, x.shape[1], block):
        bad |= np.isinf(x[:, j:j + block]).any(1)
    if bad.any():
        i = int(np.argmax(bad))
        # the lesion's most extreme measurement, in orders of magnitude from 1
        size = {c: abs(math.log10(abs(float(table[c][i])))) for c in NUMERIC
                if np.isfinite(table[c][i]) and table[c][i] != 0}
        c = max(size, key=size.get)
        what = "too large" if abs(float(table[c][i])) > 1 else "too close to 0 (a feature divides by it)"
        raise DataError(f"{path}: isic_id {table['isic_id'][i]}: feature {names[np.flatnonzero(np.isinf(x[i]))[0]]} "
                        f"is infinite ({bad.sum()} lesion(s)): {c} {float(table[c][i]):g} is {what} to compute with "
                        "in float32: correct it, or leave it empty (missing)")


def make_features(args):
    """The stage's work: read the metadata, record the lesions, build and save the features; last,
    WORK/records/features.json, the digests of what it wrote, which every reader checks."""
    spec_path = os.path.join(models_folder(args), "features.json")
    test = read_test(args.data)
    written = []
    if args.predict_only:
        spec = read_json(spec_path, "features.py on the training data (without --predict-only)",
                         {"vocabularies": {"*": ["text"]}, "patient_norm": "bool", "context": "bool",
                          "outlier": "bool", "columns": ["text"]})
        tables = [("test", test)]
    else:
        train = read_train(args.data)
        record_folds(args.work, train, models_folder(args), args.folds, args.seed)
        written.append(os.path.join(args.work, "folds.csv"))
        copy = os.path.join(models_folder(args), "folds.csv")
        if not os.path.exists(copy) or file_digest(copy) != file_digest(written[-1]):
            atomic_copy(written[-1], copy)
        # the first-level diagnosis, for gbdt.py's training weights only: never a feature
        written.append(os.path.join(args.work, "train_diagnosis.csv"))
        write_csv(written[-1], ["isic_id", "iddx_1"], [train["isic_id"], train["iddx_1"]])
        spec = {"vocabularies": fit_vocabularies(train), "patient_norm": not args.no_patient_norm,
                "context": not args.no_context, "outlier": not args.no_outlier}
        tables = [("train", train), ("test", test)]
    for c, v in spec["vocabularies"].items():
        unseen = sorted(set(test[c]) - set(v) - {""})
        if unseen:
            log(f"test {c}: {len(unseen)} value(s) never seen in train, encoded as all-zero: {unseen[:3]}")
    out = os.path.join(args.work, "features")
    for name, table in tables:
        with warnings.catch_warnings():  # NumPy's warning lines (from every thread): check_finite names the lesion
            warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
            x, names = build_features(table, spec["vocabularies"], spec["patient_norm"], spec["context"],
                                      spec["outlier"])
        if args.predict_only and names != spec["columns"]:  # the boosters would read their features by position
            raise DataError(f"{spec_path}: its columns are not the features built from it ({len(spec['columns'])} "
                            f"against {len(names)}): run features.py on the training data (without --predict-only)")
        check_finite(x, names, table, data_path(args.data, f"{name}-metadata.csv"))
        written += save_array(os.path.join(out, f"{name}.npy"), x, list(table["isic_id"]))
        log(f"features/{name}.npy: {x.shape[0]} lesions x {x.shape[1]} features")
    written.append(os.path.join(args.work, "test_lesions.csv"))
    write_csv(written[-1], ["isic_id", "patient_id"], [test["isic_id"], test["patient_id"]])
    written.append(os.path.join(out, "columns.txt"))
    atomic_write(written[-1], lambda f: f.write(("\n".join(names) + "\n").encode()))
    if not args.predict_only:
        write_json(spec_path, {**spec, "columns": names})
    write_args(os.path.join(out, "args.json"), args)
    write_record(args.work, "features", written, file_digest(spec_path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_path_flags(parser)
    parser.add_argument("--predict-only", action="store_true",
                        help="only the test features, with the vocabularies saved in --models at training")
    parser.add_argument("--seed", type=SEED, default=42,
                        help="seed of the patient-grouped folds (used when folds.csv is made, not on reuse)")
    parser.add_argument("--folds", type=number(int, 2, 20), default=5,
                        help="patient-grouped folds (used when folds.csv is made, not on reuse)")
    parser.add_argument("--no-patient-norm", action="store_true", help="leave the patient-normalized features out")
    parser.add_argument("--no-context", action="store_true",
                        help="leave out the features within patient x site and patient x location")
    parser.add_argument("--no-outlier", action="store_true",
                        help="leave out the summary of the patient z-scores and the outlier distance")
    args = parser.parse_args(argv)
    with stage_locks(args, ["features"]):
        make_features(args)


if __name__ == "__main__":
    run_main(main)
