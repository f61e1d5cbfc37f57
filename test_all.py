"""Tests of the pipeline: python -m pytest -q test_all.py (a few minutes on 2 cores, no GPU)."""
import csv
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py
import numpy as np
import pytest

import common
import ensemble
import features
import gbdt

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")
PUBLIC_TEST = os.path.join(SHARED, "isic2024_public_test")
TRAIN_SAMPLE = os.path.join(SHARED, "isic2024_train_sample")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo set: 40 train patients, 8 test patients."""
    out = str(tmp_path_factory.mktemp("demo"))
    common.make_demo(out, n_patients=40, n_test_patients=8, malignant_rate=0.06, seed=1)
    return out


# ---------------------------------------------------------------- the metric

def pauc_brute_force(y, pred, min_tpr=0.8):
    """The metric as REFERENCE.md words it, by loops: flip labels, negate scores, one ROC point per
    distinct threshold, cut at FPR = 0.2 with an interpolated point, trapezoids."""
    y2, s = 1 - np.asarray(y), -np.asarray(pred, dtype=float)
    pts = [(0.0, 0.0)]
    for t in sorted(set(s), reverse=True):
        fpr = sum(1 for yi, si in zip(y2, s) if yi == 0 and si >= t) / sum(1 for yi in y2 if yi == 0)
        tpr = sum(1 for yi, si in zip(y2, s) if yi == 1 and si >= t) / sum(1 for yi in y2 if yi == 1)
        pts.append((fpr, tpr))
    max_fpr, area = 1 - min_tpr, 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def test_pauc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(5, 60))
        y = (rng.random(n) < 0.3).astype(int)
        y[0], y[1] = 0, 1
        pred = rng.integers(0, 6, n) / 5.0 if trial % 2 else rng.normal(size=n) + y
        assert common.pauc(y, pred) == pytest.approx(pauc_brute_force(y, pred), abs=1e-12)


def test_pauc_hand_worked_cases():
    y = np.array([0, 0, 0, 0, 1, 1])
    assert common.pauc(y, [0.1, 0.2, 0.3, 0.4, 0.8, 0.9]) == pytest.approx(0.2)
    assert common.pauc(y, [0.8, 0.9, 0.3, 0.4, 0.1, 0.2]) == pytest.approx(0.0)
    # all tied: the ROC is the diagonal; area above TPR 0.8 is the triangle 0.2 * 0.2 / 2
    assert common.pauc(y, np.zeros(6)) == pytest.approx(0.02)
    # one negative above both positives: the ROC reaches TPR 1 at FPR 0.25, so the area above
    # TPR 0.8 is (1 - 0.25) * 0.2
    assert common.pauc(y, [0.1, 0.2, 0.3, 0.95, 0.8, 0.9]) == pytest.approx(0.15)
    # a positive below two negatives: TPR 0.5 up to FPR 0.5, then 1; area (1 - 0.5) * 0.2
    assert common.pauc(y, [0.1, 0.2, 0.7, 0.6, 0.5, 0.9]) == pytest.approx(0.1)
    assert common.pauc(y, [5, 4, 3, 2, 10, 11]) == common.pauc(y, [0.5, 0.4, 0.3, 0.2, 1.0, 1.1])


def test_pauc_rejects_one_class():
    with pytest.raises(ValueError, match="one class"):
        common.pauc([0, 0, 0], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------- folds

def test_make_folds_grouped_balanced_deterministic():
    rng = np.random.default_rng(3)
    patients = np.repeat([f"IP_{i}" for i in range(200)], rng.integers(1, 40, 200))
    y = (rng.random(len(patients)) < 0.02).astype(int)
    folds = common.make_folds(patients, y, 5, seed=7)
    for p in np.unique(patients):
        assert len(set(folds[patients == p])) == 1
    pos = np.bincount(folds, weights=y, minlength=5)
    max_patient_pos = max(y[patients == p].sum() for p in np.unique(patients))
    assert pos.max() - pos.min() <= max_patient_pos
    assert set(folds) == set(range(5))
    assert (common.make_folds(patients, y, 5, seed=7) == folds).all()
    assert (common.make_folds(patients, y, 5, seed=8) != folds).any()


# ---------------------------------------------------------------- patient normalization and ranks

def patient_normalize_loop(x, pids):
    out = {k: np.full(x.shape, np.nan) for k in features.STATS}
    for p in set(pids):
        rows = [i for i in range(len(pids)) if pids[i] == p]
        for j in range(x.shape[1]):
            vals = [x[i, j] for i in rows if not np.isnan(x[i, j])]
            if not vals:
                continue
            n, mean = len(vals), sum(vals) / len(vals)
            std = (sum((v - mean) ** 2 for v in vals) / n) ** 0.5
            srt = sorted(vals)
            median = (srt[(n - 1) // 2] + srt[n // 2]) / 2
            for i in rows:
                v = x[i, j]
                if np.isnan(v):
                    continue
                below, equal = sum(w < v for w in vals), sum(w == v for w in vals)
                out["z"][i, j] = (v - mean) / std if std > 0 else 0.0
                out["pct"][i, j] = (below + (equal + 1) / 2) / n
                out["dev"][i, j] = v - median
                out["is_max"][i, j] = float(v == max(vals))
                out["is_min"][i, j] = float(v == min(vals))
    return out


def test_patient_normalize_matches_loop():
    rng = np.random.default_rng(0)
    pids = np.array([f"P{i}" for i in rng.integers(0, 12, 150)] + ["single"])
    x = rng.integers(0, 5, (151, 4)).astype(float)       # many ties
    x[:, 1] = rng.normal(size=151)
    x[pids == "P3", 2] = 7.0                             # constant within a patient
    x[rng.random(151) < 0.15, 0] = np.nan                # missing values
    x[pids == "P4", 3] = np.nan                          # a patient with one feature all missing
    got, want = features.patient_normalize(x, pids), patient_normalize_loop(x, list(pids))
    for k in features.STATS:
        np.testing.assert_allclose(got[k], want[k], atol=1e-12, err_msg=k)
    assert got["z"][pids == "P3", 2].tolist() == [0.0] * int((pids == "P3").sum())
    assert got["pct"][-1, 1] == 1.0 and got["is_max"][-1, 1] == 1.0 and got["is_min"][-1, 1] == 1.0


def test_rank_average_matches_loop():
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 4, 30).astype(float), rng.normal(size=30), rng.random(30)]
    want = np.zeros(30)
    for p in preds:
        for i in range(30):
            want[i] += (sum(q < p[i] for q in p) + (sum(q == p[i] for q in p) + 1) / 2) / 30 / len(preds)
    np.testing.assert_allclose(ensemble.rank_average(preds), want, atol=1e-12)


# ---------------------------------------------------------------- the real files

def test_reads_real_public_test_csv():
    t = common.read_metadata(os.path.join(PUBLIC_TEST, "test-metadata.csv"))
    assert list(t) == common.TEST_COLUMNS and len(t["isic_id"]) == 3
    assert t["isic_id"].tolist() == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]
    assert t["attribution"][1] == "Frazer Institute, The University of Queensland, Dermatology Research Centre"
    assert t["age_approx"].tolist() == [45.0, 35.0, 65.0]
    assert t["tbp_lv_nevi_confidence"][2] == 8.052259e-13


def test_spreadsheet_resaved_csv_gives_same_values():
    a = common.read_metadata(os.path.join(PUBLIC_TEST, "test-metadata.csv"))
    b = common.read_metadata(os.path.join(PUBLIC_TEST, "variants", "test-metadata.spreadsheet-resaved.csv"))
    assert list(a) == list(b)
    for c in a:
        if a[c].dtype == float:
            np.testing.assert_allclose(a[c], b[c], rtol=5e-9, atol=1e-9, err_msg=c)
        else:
            assert a[c].tolist() == b[c].tolist(), c


def test_reads_real_train_rows():
    t = common.read_metadata(os.path.join(TRAIN_SAMPLE, "train-metadata-5rows.csv"))
    assert list(t) == common.TRAIN_COLUMNS and len(t["isic_id"]) == 5
    assert t["target"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert t["iddx_3"][2] == "Squamous cell carcinoma, Invasive"
    assert np.isnan(t["mel_thick_mm"]).all()


def test_reads_real_images():
    with h5py.File(os.path.join(PUBLIC_TEST, "test-image.hdf5"), "r") as h5:
        sizes = [common.decode_image(common.read_image_bytes(h5, i), i).shape
                 for i in ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]]
    assert sizes == [(141, 141, 3), (125, 125, 3), (119, 119, 3)]
    t = common.read_metadata(os.path.join(TRAIN_SAMPLE, "train-metadata-5rows.csv"))
    with h5py.File(os.path.join(TRAIN_SAMPLE, "train-image-5.hdf5"), "r") as h5:
        for i in t["isic_id"]:
            im = common.decode_image(common.read_image_bytes(h5, i), i)
            assert im.dtype == np.uint8 and im.shape[2] == 3 and 61 <= im.shape[0] <= 239
            assert 20 < im.mean() < 250


def test_features_on_real_rows():
    train = common.read_metadata(os.path.join(TRAIN_SAMPLE, "train-metadata-5rows.csv"))
    test = common.read_metadata(os.path.join(PUBLIC_TEST, "test-metadata.csv"))
    vocab = features.fit_vocabularies(train)
    xtr, names = features.build_features(train, vocab)
    xte, names_te = features.build_features(test, vocab)
    assert names == names_te and xtr.shape[1] == xte.shape[1] == len(names)
    assert not any(n.startswith(tuple(common.TRAIN_ONLY)) for n in names)
    # FNQH Cairns is unseen in train: every attribution one-hot of that row is 0
    att = [i for i, n in enumerate(names) if n.startswith("attribution__")]
    assert xte[2, att].sum() == 0 and xte[0, att].sum() == 1
    # each patient has one lesion here: z = 0, pct = 1, is_max = 1
    assert (xte[:, names.index("clin_size_long_diam_mm_pn_z")] == 0).all()
    assert (xte[:, names.index("clin_size_long_diam_mm_pn_pct")] == 1).all()
    lr = names.index("lesion_size_ratio")
    assert xte[0, lr] == pytest.approx(np.float32(2.187644 / 2.7))


# ---------------------------------------------------------------- the demo set and the chain

def test_demo_set_has_kaggle_layout(demo):
    with open(os.path.join(demo, "train-metadata.csv")) as f:
        assert next(csv.reader(f)) == common.TRAIN_COLUMNS
    with open(os.path.join(demo, "test-metadata.csv")) as f:
        assert next(csv.reader(f)) == common.TEST_COLUMNS
    train = common.read_train(demo)
    assert train["target"].sum() >= 10
    with h5py.File(os.path.join(demo, "train-image.hdf5"), "r") as h5:
        i = train["isic_id"][0]
        assert h5[i].shape == () and h5[i].dtype.kind == "S"
        assert 61 <= common.decode_image(common.read_image_bytes(h5, i)).shape[0] <= 239
    common.check_image_ids(os.path.join(demo, "train-image.hdf5"), list(train["isic_id"]))


def test_tabular_chain_end_to_end(demo, tmp_path):
    work = str(tmp_path / "work")
    features.main(["--data", demo, "--work", work])
    gbdt.main(["--data", demo, "--work", work, "--name", "tabular", "--rounds", "40", "--bags", "2"])
    ensemble.main(["--data", demo, "--work", work])
    test_ids = common.read_test(demo)["isic_id"].tolist()
    with open(os.path.join(work, "submission.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["isic_id", "target"]
    assert [r[0] for r in rows[1:]] == test_ids
    assert all(np.isfinite(float(r[1])) for r in rows[1:])
    oof = common.read_metadata(os.path.join(work, "preds", "tabular_oof.csv"))
    folds = common.read_metadata(os.path.join(work, "folds.csv"))
    assert oof["isic_id"].tolist() == folds["isic_id"].tolist()
    assert common.pauc(oof["target"], oof["pred"]) > 0.1     # far above chance (about 0.02)
    assert os.path.exists(os.path.join(work, "models", "tabular", "fold4_bag1.txt"))
    assert os.path.exists(os.path.join(work, "report.md"))
