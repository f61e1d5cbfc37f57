"""Tests of the pipeline, in the order of the files they test: common, demo, features,
train_backbone, extract, gbdt, ensemble, then the whole pipeline.

    HF_HUB_OFFLINE=1 python -m pytest -q test_all.py                  # everything, a few minutes on 2 cores
    HF_HUB_OFFLINE=1 python -m pytest -q -m "not slow" test_all.py    # the unit tests, under a minute

Tests marked slow run stages on the demo set or train tiny models (no GPU needed).
"""
import argparse
import base64
import copy
import csv
import errno
import glob
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import warnings
from html import unescape as html_unescape
from html.parser import HTMLParser

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py  # noqa: E402
import nbclient  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import bench  # noqa: E402
import common  # noqa: E402
import ensemble  # noqa: E402
import extract  # noqa: E402
import features  # noqa: E402
import gbdt  # noqa: E402
import lightgbm as lgb  # noqa: E402
import notebooks  # noqa: E402
import reasons  # noqa: E402
import report  # noqa: E402
import train_backbone  # noqa: E402
from demo import make_demo  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLIC_TEST = os.path.join(HERE, "testdata", "public_test")
TRAIN_SAMPLE = os.path.join(HERE, "testdata", "train_sample")
slow = pytest.mark.slow


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A small demo set: 40 train patients, 20 test patients drawn like them."""
    out = str(tmp_path_factory.mktemp("demo"))
    make_demo(out, n_patients=40, n_test_patients=20, malignant_rate=0.06, seed=1)
    return out


@pytest.fixture(scope="session")
def demo_work(demo, tmp_path_factory):
    """features.py run on the demo set: folds.csv, test_lesions.csv, the feature matrices."""
    work = str(tmp_path_factory.mktemp("demo_work"))
    features.main(["--data", demo, "--work", work])
    return work


def tiny_train(epochs=2):
    return ["--no-pretrained", "--epochs", str(epochs), "--neg-per-pos", "3", "--batch-size", "16", "--lr", "3e-4",
            "--workers", "0"]


@pytest.fixture(scope="session")
def trained(demo, demo_work, tmp_path_factory):
    """convnext_atto trained on every fold of the demo set, then extracted."""
    work = str(tmp_path_factory.mktemp("work_img"))
    shutil.copytree(demo_work, work, dirs_exist_ok=True)
    train_backbone.main(["--arch", "convnext_atto", "--fold", "all", "--data", demo, "--work", work] + tiny_train(1))
    extract.main(["--arch", "convnext_atto", "--data", demo, "--work", work, "--workers", "0", "--batch-size", "64"])
    return work


def copy_work(src, dst, **kw):
    shutil.copytree(src, dst, **kw)
    return str(dst)


def rerecord(work, name):
    """Records the files that WORK/records/NAME.json lists as they are now: a test's edit of a stage's
    outputs, made to pass as that stage's own."""
    with open(os.path.join(work, "records", f"{name}.json")) as f:
        record = json.load(f)
    common.write_record(work, name, [os.path.join(work, p) for p in record["files"]], record["made_by"])


def copy_demo(demo, dst):
    shutil.copytree(demo, dst)
    return str(dst)


def rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def damage(path, how):
    """A state file as a killed run, a full disk or a stray copy leaves it."""
    with open(path, "rb") as f:
        raw = f.read()
    if how == "remove":
        os.remove(path)
        return
    with open(path, "wb") as f:
        f.write({"empty": b"", "truncate": raw[:len(raw) // 2], "foreign": b"[1, 2]\n"}[how])


def run_script(script, args, timeout=600):
    return subprocess.run([sys.executable, script] + args, cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def jpeg(mode, fmt="JPEG"):
    buf = io.BytesIO()
    Image.new(mode, (70, 64), {"L": 128, "RGBA": (10, 20, 30, 40), "CMYK": (0, 50, 100, 0),
                              "RGB": (200, 100, 50)}[mode]).save(buf, format=fmt)
    return buf.getvalue()


def stage_error(capsys, main, args):
    """Runs a stage's main as `python SCRIPT.py` does (common.run_main); checks that it ends with exit
    status 2 and no traceback, and returns what it printed to stderr."""
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: main(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: " in err and "Traceback" not in err, err
    return err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def corrupt_image(h5_path, isic_id, raw):
    with h5py.File(h5_path, "a") as h5:
        del h5[isic_id]
        h5.create_dataset(isic_id, data=np.bytes_(raw))


# ---------------------------------------------------------------- common: the metric

def pauc_brute_force(y, pred, min_tpr=0.8):
    """The metric as the competition defines it, by loops: flip labels, negate scores, one ROC point per
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


# ---------------------------------------------------------------- common: patient normalization

def patient_normalize_loop(x, pids):
    out = {k: np.full(x.shape, np.nan) for k in common.STATS}
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
    got, want = common.patient_normalize(x, pids), patient_normalize_loop(x, list(pids))
    for k in common.STATS:
        np.testing.assert_allclose(got[k], want[k], atol=1e-12, err_msg=k)
    assert got["z"][pids == "P3", 2].tolist() == [0.0] * int((pids == "P3").sum())
    assert got["pct"][-1, 1] == 1.0 and got["is_max"][-1, 1] == 1.0 and got["is_min"][-1, 1] == 1.0


# ---------------------------------------------------------------- common: reading CSV files

def test_reads_real_public_test_csv():
    t = common.read_metadata(os.path.join(PUBLIC_TEST, "test-metadata.csv"), ["isic_id"])
    assert list(t) == common.TEST_COLUMNS and len(t["isic_id"]) == 3
    assert t["isic_id"].tolist() == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]
    assert t["attribution"][1] == "Frazer Institute, The University of Queensland, Dermatology Research Centre"
    assert t["age_approx"].tolist() == [45.0, 35.0, 65.0]
    assert t["tbp_lv_nevi_confidence"][2] == 8.052259e-13


def test_spreadsheet_resaved_csv_gives_same_values():
    a = common.read_metadata(os.path.join(PUBLIC_TEST, "test-metadata.csv"), ["isic_id"])
    b = common.read_metadata(os.path.join(PUBLIC_TEST, "variants", "test-metadata.spreadsheet-resaved.csv"),
                             ["isic_id"])
    assert list(a) == list(b)
    for c in a:
        if a[c].dtype == float:
            np.testing.assert_allclose(a[c], b[c], rtol=5e-9, atol=1e-9, err_msg=c)
        else:
            assert a[c].tolist() == b[c].tolist(), c


def test_reads_real_train_rows():
    t = common.read_metadata(os.path.join(TRAIN_SAMPLE, "train-metadata-5rows.csv"), ["isic_id"])
    assert list(t) == common.TRAIN_COLUMNS and len(t["isic_id"]) == 5
    assert t["target"].tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert t["iddx_3"][2] == "Squamous cell carcinoma, Invasive"
    assert np.isnan(t["mel_thick_mm"]).all()


def test_csv_reader_accepts_every_variation_and_matches_float(tmp_path):
    """Each field's expected value is written beside its CSV spelling: numbers are float() of the
    random digits or the hand-given value, texts their hand-unquoted value."""
    rng = np.random.default_rng(3)
    random = [f"{v:.{d}g}" for v, d in zip(rng.lognormal(0, 4, 400) * rng.choice([-1, 1], 400),
                                            rng.integers(1, 18, 400))]  # 1 to 17 digits, exponents
    numbers = [(v, float(v)) for v in random] + [
        ("45", 45.0), ("45.0", 45.0), ("+7", 7.0), (".5", 0.5), ("5.", 5.0), ("-0.0", -0.0), ("8.05E-13", 8.05e-13),
        (" 3.2 ", 3.2), ("NA", np.nan), ("nan", np.nan), ("", np.nan), ("1e5", 1e5), ("0.000001234", 1.234e-6),
        ("123456789012345", 123456789012345.0), ("1234567890123456", 1234567890123456.0),
        ("12345678901234567", 12345678901234568.0), ('"2.5"', 2.5), (' "2.5"', 2.5), ("-.25", -0.25), ("007", 7.0)]
    texts = [("Torso Front", "Torso Front"), ("", ""), (" padded ", "padded"), ("Hospital Clínic", "Hospital Clínic"),
             ('"Frazer Institute, The University"', "Frazer Institute, The University"), ('"say ""hi"""', 'say "hi"'),
             ('"two\nlines"', "two\nlines"), (' "a,b"', "a,b"), ("ISIC_0000001", "ISIC_0000001"), ("x" * 130, "x" * 130)]
    for ending in ("\r\n", "\r", "\n"):  # CRLF, old Mac CR-only, Unix
        lines, want = [], {"isic_id": [], "tbp_lv_A": [], "attribution": [], "age_approx": []}
        for i, (v, value) in enumerate(numbers):
            text, unquoted = texts[i % len(texts)]
            lines.append(f"ISIC_{i:07d},{v},{text},{numbers[-1 - i][0]}")
            for c, x in zip(want, (f"ISIC_{i:07d}", value, unquoted, numbers[-1 - i][1])):
                want[c].append(x)
            if i % 97 == 5:
                lines.append("")  # a blank line, skipped
        body = ending.join(["isic_id,tbp_lv_A,attribution,age_approx"] + lines)  # no final line end
        path = tmp_path / "t.csv"
        path.write_bytes(b"\xef\xbb\xbf" + body.encode())
        got = common.read_csv(str(path), numbers=["tbp_lv_A", "age_approx"])
        assert list(got) == list(want)
        for c in ("tbp_lv_A", "age_approx"):
            expected = np.array(want[c])
            assert np.array_equal(got[c], expected, equal_nan=True), c  # bit for bit, not approximately
            assert (np.signbit(got[c]) == np.signbit(expected)).all()
        for c in ("isic_id", "attribution"):
            assert got[c].tolist() == want[c], c


@pytest.mark.parametrize("content, match", [
    (b"isic_id,target\nISIC_1,1\nISIC_2,1.5x\n", "line 3, column target: '1.5x' is not a number"),
    (b"isic_id,attribution\nISIC_1,\xff\xfe\n", r"line 2, column attribution: .* not UTF-8"),
    (b'isic_id,attribution\nISIC_1,ok\nISIC_2,"open\nISIC_3,ok\n', "line 3: a double quote .* never closed"),
    # the quote opened on line 3 is closed by the first quote of line 5: reported where it opens
    (b'isic_id,attribution\nISIC_1,ok\nISIC_2,"open\nISIC_3,ok\nISIC_4,"Frazer, x"\nISIC_5,ok\n',
     "line 3: a closing double quote is followed by more text"),
    (b"isic_id,target\nISIC_1,1\n\nISIC_2,2,3\n", "line 4 has 3 fields, the header has 2"),
    (b"", "the file is empty"),
    (b"isic_id,target,patient_id,target\nISIC_1,1,IP_1,0\n", "column target appears 2 times in the header"),
    (b"isic_id;target;patient_id\nISIC_1;1;IP_1\n", "the header has 1 field: is the file separated by ';'"),
])
def test_csv_reader_errors_name_the_line_and_the_cause(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(common.DataError, match=f"bad.csv: {match}"):
        common.read_csv(str(path), ["isic_id", "target"], ["target"])


@pytest.mark.parametrize("row, match", [
    ("ISIC_2,IP_1,0,inf", "line 3, column tbp_lv_A: 'inf' is not a finite number"),
    ("ISIC_2,IP_1,0,-Infinity", "line 3, column tbp_lv_A: '-Infinity' is not a finite number"),
    ("ISIC_2,IP_1,0,1e39", "line 3, column tbp_lv_A: '1e39' is not a finite number"),
    (",IP_1,0,1", "line 3, column isic_id: empty"),
    ("ISIC_2,,0,1", "line 3, column patient_id: empty"),
    ("ISIC 2,IP_1,0,1", "line 3, column isic_id: 'ISIC 2' has a space inside"),
])
def test_ids_and_numbers_that_are_not_measurements_are_errors(tmp_path, row, match):
    path = tmp_path / "m.csv"
    path.write_text(f"isic_id,patient_id,target,tbp_lv_A\nISIC_1,IP_1,1,2.5\n{row}\n")
    with pytest.raises(common.DataError, match=f"m.csv: {match}"):
        common.read_metadata(str(path), ["isic_id", "patient_id"])


@pytest.mark.parametrize("targets, match", [
    ("0 1 0.5", "ISIC_2: target is 0.5, not 0 or 1"),
    ("-1 1 -1", "ISIC_0: target is -1, not 0 or 1"),
    ("0 2 1", "ISIC_1: target is 2, not 0 or 1"),
    ("0 1 ", "ISIC_2: target is empty, not 0 or 1"),
    ("0 0 0", "hold only lesions of target 0: training needs malignant and benign lesions"),
    ("1 1 1", "hold only lesions of target 1"),
    ("", "hold no lesion"),
])
def test_training_labels_must_be_0_or_1_and_both_present(tmp_path, targets, match):
    header = ",".join(common.TRAIN_COLUMNS)
    rows = [",".join(f"ISIC_{i}" if c == "isic_id" else "IP_1" if c == "patient_id" else t if c == "target" else "1"
                     for c in common.TRAIN_COLUMNS) for i, t in enumerate(targets.split(" ") if targets else [])]
    (tmp_path / "train-metadata.csv").write_text("\n".join([header] + rows) + "\n")
    with pytest.raises(common.DataError, match=match):
        common.read_train(str(tmp_path))


def test_number_spellings(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("isic_id,age_approx\na,45\nb,45.0\nc,8.05E-13\nd, 3.2 \ne,NA\nf,nan\ng,\nh,-1e3\n")
    got = common.read_csv(str(path), numbers=["age_approx"])["age_approx"]
    np.testing.assert_array_equal(got[[0, 1, 2, 3, 7]], [45.0, 45.0, 8.05e-13, 3.2, -1000.0])
    assert np.isnan(got[4:7]).all()


def test_a_killed_write_leaves_a_temporary_file_that_the_next_write_removes(tmp_path):
    path = tmp_path / "features" / "train.npy"
    code = ("import sys, time, numpy as np, common\n"
            "common.atomic_write(sys.argv[1], lambda f: (f.write(b'x' * 1000), f.flush(), time.sleep(60)))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=HERE)
    deadline = time.time() + 60
    while not list(path.parent.glob(".train.npy.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(path.parent.glob(".train.npy.tmp-*"))) == 1 and not path.exists()
    common.save_array(str(path), np.zeros((2, 2), np.float32), ["a", "b"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.npy", "train_ids.txt"]


@pytest.mark.parametrize("writer", [
    lambda path: common.save_array(path, np.zeros((100, 100), np.float32), [f"id{i}" for i in range(100)]),
    lambda path: common.save_array(path, np.zeros((100, 100), np.float32, order="F"), [f"id{i}" for i in range(100)]),
    lambda path: common.atomic_write(path, lambda f: np.savez(f, a=np.zeros(10000))),
    lambda path: train_backbone.save_checkpoint(path, {"model": torch.zeros(10000)}),
    lambda path: common.write_csv(path, ["a"], [np.arange(1000)])], ids=["save", "save_fortran", "savez", "torch",
                                                                         "csv"])
def test_a_full_disk_is_one_error_line_naming_the_file_from_every_writer(tmp_path, capsys, monkeypatch, writer):
    """The disk fills after 1000 bytes of the file: each writer's OSError ENOSPC reaches run_main (not
    NumPy's errno-less one from tofile, nor torch's RuntimeError), and no temporary file is left."""
    room = [1000]

    class FillingDisk(io.FileIO):
        def write(self, data):
            if memoryview(data).nbytes > room[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            room[0] -= memoryview(data).nbytes
            return super().write(data)
    monkeypatch.setattr(common.os, "fdopen", lambda fd, mode: io.BufferedWriter(FillingDisk(fd, "w")))
    path = str(tmp_path / "out" / "x.npy")
    err = one_error_line(stage_error(capsys, lambda _: writer(path), None))
    assert err == f"error: {path}: No space left on device: free some space, or pass a --work on another disk"
    assert [p for p in os.listdir(tmp_path / "out") if p != "x_ids.txt"] == []


def test_stage_files_from_another_run_are_refused(tmp_path):
    path = str(tmp_path / "emb" / "x_train.npy")
    common.save_array(path, np.zeros((3, 2), np.float32), ["a", "b", "c"])
    np.testing.assert_array_equal(common.load_array(path, ["a", "b", "c"]), np.zeros((3, 2)))
    with pytest.raises(common.DataError, match=r"do not line up.*first difference at row 1\): the same lesions in "
                       r"another order: is it from a run on the metadata in another order\?$"):
        common.load_array(path, ["a", "c", "b"])
    with pytest.raises(common.DataError, match=r"first difference at row 2\): is it from another run\?$"):
        common.load_array(path, ["a", "b", "d"])
    with pytest.raises(common.DataError, match=r"3 rows against 4; first difference at row 3\): is it from another"):
        common.load_array(path, ["a", "b", "c", "d"])


@pytest.mark.parametrize("error, folder", [
    (OSError(errno.EACCES, "Permission denied", "/ro/models/tabular.partial/.args.json.tmp-x1"),
     "/ro/models/tabular.partial"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/models/convnext/fold0.partial"), "/ro/models/convnext"),
    (OSError(errno.EEXIST, "File exists", "/w/a_file"), "/w/a_file"),
    (OSError(errno.ENOTDIR, "Not a directory", "/w/a_file/features"), "/w/a_file/features")])
def test_an_unwritable_path_is_named_without_blaming_work(capsys, error, folder):
    """The folder may be --models (read-only, as the README allows): the message names it."""
    def fail():
        raise error
    err = one_error_line(stage_error(capsys, lambda _: fail(), None))
    assert err == f"error: {error.filename}: {error.strerror}: is {folder} a folder you can write to?"


# ---------------------------------------------------------------- common: HDF5 tiles

def test_reads_real_images():
    with h5py.File(os.path.join(PUBLIC_TEST, "test-image.hdf5"), "r") as h5:
        sizes = [common.decode_image(common.read_image_bytes(h5, i), i).shape
                 for i in ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]]
    assert sizes == [(141, 141, 3), (125, 125, 3), (119, 119, 3)]
    t = common.read_metadata(os.path.join(TRAIN_SAMPLE, "train-metadata-5rows.csv"), ["isic_id"])
    with h5py.File(os.path.join(TRAIN_SAMPLE, "train-image-5.hdf5"), "r") as h5:
        for i in t["isic_id"]:
            im = common.decode_image(common.read_image_bytes(h5, i), i)
            assert im.dtype == np.uint8 and im.shape[2] == 3 and 61 <= im.shape[0] <= 239
            assert 20 < im.mean() < 250


def test_image_bytes_read_at_file_offset_match_h5py(tmp_path):
    with h5py.File(os.path.join(PUBLIC_TEST, "test-image.hdf5"), "r") as h5:
        real = {i: h5[i][()] for i in h5}
        assert all(common.read_image_bytes(h5, i) == v for i, v in real.items())
    # the layouts other writers use: the raw-offset path, or h5py's read where there is no offset
    path, raw = str(tmp_path / "other.hdf5"), real["ISIC_0015729"]
    with h5py.File(path, "w") as h5:
        h5["u8"] = np.frombuffer(raw, np.uint8)
        h5.create_dataset("chunked", data=np.frombuffer(raw, np.uint8), chunks=(500,), compression="gzip")
        h5["void"] = np.void(raw)  # an opaque scalar
        h5["vlen"] = raw  # a variable-length byte string
    with h5py.File(path, "r") as h5:
        for name in ("u8", "chunked", "void", "vlen"):
            assert common.read_image_bytes(h5, name) == raw, name
        with pytest.raises(common.DataError, match="other.hdf5: no image for isic_id ISIC_missing"):
            common.read_image_bytes(h5, "ISIC_missing")


def test_image_formats_decode_to_rgb_and_broken_ones_name_the_id():
    for raw in (jpeg("L"), jpeg("RGBA", "PNG"), jpeg("CMYK"), jpeg("RGB", "PNG")):
        im = common.decode_image(raw, "ISIC_x")
        assert im.shape == (64, 70, 3) and im.dtype == np.uint8
    good = jpeg("RGB")
    for raw, what in ((good[:len(good) // 2], "cannot be decoded"), (b"not an image", "cannot be decoded"),
                      (b"", "empty")):
        with pytest.raises(common.DataError, match=f"ISIC_bad.*{what}"):
            common.decode_image(raw, "ISIC_bad")


def test_image_ids_must_match_metadata():
    path = os.path.join(TRAIN_SAMPLE, "train-image-5.hdf5")
    ids = list(common.read_csv(os.path.join(TRAIN_SAMPLE, "train-metadata-5rows.csv"), ["isic_id"])["isic_id"])
    common.check_image_ids(path, ids)
    with pytest.raises(common.DataError, match="no image for 1 isic_id.*ISIC_9999999"):
        common.check_image_ids(path, ids + ["ISIC_9999999"])
    with pytest.raises(common.DataError, match=f"not in the metadata, e.g. {ids[0]}"):
        common.check_image_ids(path, ids[1:])


def test_h5_loader_works_under_spawn():
    ids = ["ISIC_0015740", "ISIC_0015657", "ISIC_0015729"]
    images = common.H5Images(os.path.join(PUBLIC_TEST, "test-image.hdf5"), ids)
    loader = common.image_loader(images, [2, 0, 1], batch_size=2, workers=1)
    loader.multiprocessing_context = "spawn"
    batches = list(loader)
    assert [int(i) for b in batches for i in b[3]] == [2, 0, 1]
    assert batches[0][0].shape == (2, common.CANVAS, common.CANVAS, 3)
    with h5py.File(images.h5_path, "r") as h5:
        tile = common.decode_image(h5[ids[2]][()].tobytes())
    h, w = batches[0][1][0].tolist()
    assert (h, w) == tile.shape[:2] == (125, 125) and np.array_equal(batches[0][0][0, :h, :w].numpy(), tile)


# ---------------------------------------------------------------- common: image models

def test_focal_loss_hand_values():
    def fl(logits, targets):
        return common.focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    # logit 0, positive: p_t = 0.5, BCE = ln 2, loss = 0.25 * 0.5^2 * ln 2
    assert fl(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(0.25 * 0.25 * np.log(2))
    # logit 0, negative: alpha_t = 0.75
    assert fl(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(0.75 * 0.25 * np.log(2))
    # confidently wrong at +-50: BCE = 50 (to 1e-20), 1 - p_t = 1
    assert fl(torch.tensor([50.0]), torch.tensor([0.0])).item() == pytest.approx(0.75 * 50)
    assert fl(torch.tensor([-50.0]), torch.tensor([1.0])).item() == pytest.approx(0.25 * 50)
    # confidently right: about 0, and finite gradients
    x = torch.tensor([50.0, -50.0], requires_grad=True)
    loss = fl(x, torch.tensor([1.0, 0.0]))
    loss.backward()
    assert loss.item() < 1e-30 and torch.isfinite(x.grad).all()
    # logit 2, positive: p = sigmoid(2); mean over a batch of two different terms
    p = 1 / (1 + np.exp(-2.0))
    want = (0.25 * (1 - p) ** 2 * -np.log(p) + 0.75 * p ** 2 * -np.log(1 - p)) / 2
    assert fl(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0])).item() == pytest.approx(want, rel=1e-6)


def lesion_canvases(n, seed=0):
    """n tiles of 80 to 200 px on their canvases: grey stripes (texture for the blur to soften) with a
    green disc of radius 0.12 of the tile at its centre, the lesion; and their sizes."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((n, common.CANVAS, common.CANVAS, 3), np.uint8)
    sizes = rng.integers(80, 201, (n, 2))
    for tile, (h, w) in zip(canvas, sizes):
        y, x = np.mgrid[0:h, 0:w]
        tile[:h, :w] = (128 + 60 * np.sin(x / 2.0 + y / 3.0))[..., None].astype(np.uint8)
        tile[:h, :w][np.hypot((y + 0.5) / h - 0.5, (x + 0.5) / w - 0.5) < 0.06] = (30, 220, 30)
    return torch.from_numpy(canvas), torch.from_numpy(sizes)


def augmented(canvas, sizes, draws, size=64):
    """prepare_batch's output in [0, 1] colours (mean 0, std 1)."""
    return common.prepare_batch(canvas, sizes, size, (0, 0, 0), (1, 1, 1), torch.device("cpu"), draws)


def test_prediction_input_is_the_tile_resized_and_nothing_else():
    canvas, sizes = lesion_canvases(4)
    for (h, w), tile, x in zip(sizes, canvas, augmented(canvas, sizes, None, 56)):
        plain = torch.nn.functional.interpolate(tile[:h, :w].permute(2, 0, 1)[None].float() / 255, (56, 56),
                                                mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(x, plain, rtol=0, atol=1e-3)  # 1e-3: prepare_batch stays 0.001 px inside


def test_cutout_never_hides_the_lesion_at_the_tile_centre():
    """Over 300 random draws with cutout on, no pixel of the green disc (the tile's centre, whatever
    the rotation, zoom, shift, colour, blur and noise) is among those that the cutout changed."""
    canvas, sizes = lesion_canvases(300)
    draws = torch.rand(300, common.AUGMENT_DRAWS, generator=torch.Generator().manual_seed(0))
    cut, kept = draws.clone(), draws.clone()
    cut[:, 11], kept[:, 11] = draws[:, 11] * common.CUTOUT_P, 0.99
    with_cut, without = augmented(canvas, sizes, cut), augmented(canvas, sizes, kept)
    kept[:, 9] = 0.99  # the disc is where it is found without noise (which turns a few grey pixels green)
    noiseless = augmented(canvas, sizes, kept)
    green = noiseless[:, 1] - noiseless[:, [0, 2]].amax(1) > 0.3
    changed = (with_cut != without).any(1)
    assert green.flatten(1).any(1).all()  # the lesion is in view
    assert changed.flatten(1).any(1).float().mean() > 0.5  # the cutouts were there to hide it
    assert not (green & changed).any()


@pytest.mark.parametrize("draw, p, also", [(5, common.BLUR_P, ()), (9, common.NOISE_P, (10,)),
                                           (11, common.CUTOUT_P, (12, 13))])
def test_blur_noise_and_cutout_change_the_tile_when_drawn_and_only_then(draw, p, also):
    """A draw below p turns it on: every tile changes. Another draw above p, or other values of its
    seed or position draws, leave the output unchanged to the bit."""
    canvas, sizes = lesion_canvases(12)
    base = torch.rand(12, common.AUGMENT_DRAWS, generator=torch.Generator().manual_seed(1))
    base[:, [5, 9, 11]] = 0.99
    base[:, 13] = 0  # a cutout as near the centre as it goes: inside the image
    off = augmented(canvas, sizes, base)
    on, other_off = base.clone(), base.clone()
    on[:, draw] = torch.linspace(0.05, 0.95, 12) * p
    other_off[:, draw] = p + (1 - p) * 0.3
    other_off[:, list(also)] = 0.7
    assert (augmented(canvas, sizes, on) != off).flatten(1).any(1).all()
    assert torch.equal(augmented(canvas, sizes, other_off), off)


def test_a_tile_is_augmented_alike_in_any_batch():
    """Each process of torchrun augments its share of a batch: the same as in the whole batch."""
    canvas, sizes = lesion_canvases(8)
    draws = torch.rand(8, common.AUGMENT_DRAWS, generator=torch.Generator().manual_seed(2))
    draws[:, [5, 9, 11]] *= 0.2  # blur, noise and cutout on
    whole = augmented(canvas, sizes, draws)
    for rank in (0, 1):
        share = augmented(canvas[rank::2], sizes[rank::2], draws[rank::2])
        torch.testing.assert_close(share, whole[rank::2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("capability, dtype", [((6, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_precision_is_native_bf16_or_fp16_with_a_scaler(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # says yes on a T4 too
    assert common.amp_settings(torch.device("cuda", 0)) == (dtype, dtype == torch.float16)
    assert common.amp_settings(torch.device("cpu")) == (None, False)
    assert common.amp_settings(torch.device("cpu"), cpu_amp=True) == (torch.bfloat16, False)


KAGGLE_TORCH_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("name, capability, archs, runs", [
    ("Tesla P100-PCIE-16GB", (6, 0), KAGGLE_TORCH_ARCHS, False),   # Kaggle's torch: no sm_60
    ("Tesla T4", (7, 5), KAGGLE_TORCH_ARCHS, True),
    ("NVIDIA A10G", (8, 6), ["sm_80"], True),                     # sm_80 code runs on 8.x
    ("NVIDIA H100", (9, 0), ["sm_80", "compute_80"], True),        # PTX is compiled for newer GPUs
    ("NVIDIA H100", (9, 0), ["sm_80", "sm_86"], False),            # but sm_8x code never runs on 9.0
    ("Tesla T4", (7, 5), ["sm_80", "sm_90a"], False),
])
def test_a_gpu_that_this_torch_has_no_kernels_for_is_one_error_line(demo, demo_work, capsys, monkeypatch, name,
                                                                    capability, archs, runs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    if runs:
        assert common.check_gpu_kernels(torch.device("cuda", 0)) is None
        return
    err = one_error_line(stage_error(capsys, train_backbone.main, ["--arch", "convnext_atto", "--fold", "0",
                                                                   "--data", demo, "--work", demo_work]))
    assert (f"{name} (compute capability {capability[0]}.{capability[1]}): this torch {torch.__version__} has GPU "
            f"kernels for {', '.join(archs)} only: on Kaggle choose the accelerator GPU T4 x2; elsewhere install a "
            f"torch built for compute capability {capability[0]}.{capability[1]}") in err


def test_micro_batches_follow_the_gpu_memory(monkeypatch):
    class Props:
        total_memory, name = 16 * 10 ** 9, "a GPU"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    cuda = torch.device("cuda", 0)

    def plan(arch, n_params, **flags):
        args = type("Args", (), {"arch": arch, "batch_size": 64, "micro_batch": None, "grad_checkpointing": False,
                                 **flags})
        model = torch.nn.Linear(n_params, 1, bias=False)
        return train_backbone.memory_plan(args, model, cuda)
    # by hand: 85% of 16 GB is 13.6 GB; less 1.376 GB of weights, gradients and AdamW state (16 bytes
    # a parameter) and 1.074 GB (1 GiB) of CUDA context: 11.15 GB, 20.3 images of 524.5 MiB: 16
    assert common.MODEL_CONFIGS["eva02_base"]["act_mib"] == 524.5
    assert plan("eva02_base", 86_000_000) == (16, False)
    # an EMA copy holds 4 bytes a parameter more. On 8.3 GB: 7.055 - 1.376 - 1.074 = 4.605 GB, 8.4
    # images (8); with it 7.055 - 1.720 - 1.074 = 4.261 GB, 7.7 images (4)
    Props.total_memory = int(8.3e9)
    assert plan("eva02_base", 86_000_000) == (8, False)
    assert plan("eva02_base", 86_000_000, ema=0.999) == (4, False)
    Props.total_memory = 16 * 10 ** 9
    assert plan("convnext", 28_000_000) == (64, False)                   # capped at the batch
    assert plan("eva02_base", 86_000_000, micro_batch=4) == (4, False)  # the flags win
    assert plan("eva02_base", 86_000_000, grad_checkpointing=True)[1] is True
    Props.total_memory = int(3.2e9)  # not one image without checkpointing: a few with it
    micro, checkpointing = plan("eva02_base", 86_000_000)
    assert checkpointing and 1 <= micro <= 8
    assert plan("convnext", 28_000_000, micro_batch=16)[0] == 16
    assert train_backbone.memory_plan(type("Args", (), {"arch": "convnext", "batch_size": 64, "micro_batch": None,
                                                         "grad_checkpointing": False}), None,
                                      torch.device("cpu")) == (64, False)


def test_training_forward_is_counted_as_a_gpu_runs_it():
    """By hand: a linear layer under fp16 autocast saves its input in fp16; CUDA's autocast runs layer
    norm in fp32 (input cast and saved, mean and rstd per row, fp32 output that GELU saves); FLOPs are
    the two matrix products. CPU bf16 autocast would save 128 bytes an image, not 192."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.LayerNorm(16),
                                torch.nn.GELU(), torch.nn.Linear(16, 1))
    weights = [p.clone() for p in model.parameters()]
    flops, saved = bench.counted_training_forward(model, 2)
    assert flops == 2 * 12 * 16 + 2 * 16 * 1
    assert saved == 12 * 2 + (16 * 4 + 2 * 4) + 16 * 4 + 16 * 2
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # the model is left as it was
    # attention as the memory-efficient kernel runs it: q, k, v (one fp16 storage), the fp16 output and
    # the fp32 log-sum-exp per query are saved, no attention matrix; 4 N^2 d FLOPs a head
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(3, 48)

        def forward(self, x):  # 64 tokens of 3 values, 2 heads of 8
            qkv = self.qkv(x.reshape(len(x), 64, 3)).reshape(len(x), 64, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    flops, saved = bench.counted_training_forward(Attention(), 8)
    assert flops == 2 * 64 * 3 * 48 + 2 * 4 * 64 ** 2 * 8
    assert saved == 64 * 3 * 2 + 64 * 48 * 2 + 2 * 64 * 8 * 2 + 2 * 64 * 4
    # a whole model: every linear layer, the patch embedding and 4 N^2 D a layer (QK^T and AV)
    model = common.build_model("eva02_tiny", pretrained=False)
    patches, dim = (56 // 14) ** 2, model.embed_dim
    tokens = patches + 1
    linear = sum(2 * (1 if m is model.get_classifier() else tokens) * m.in_features * m.out_features
                 for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = len(model.blocks) * 4 * tokens ** 2 * dim
    assert bench.counted_training_forward(model, 56)[0] == linear + 2 * patches * 3 * 14 * 14 * dim + attention


@pytest.mark.parametrize("arch", ["convnext_atto", "eva02_tiny"])
def test_model_table_holds_the_counted_activation_memory(arch):
    model = common.build_model(arch, pretrained=False)
    for checkpointing, key in ((False, "act_mib"), (True, "act_mib_ckpt")):
        model.set_grad_checkpointing(checkpointing)
        counted = bench.counted_training_forward(model, common.MODEL_CONFIGS[arch]["img_size"])[1] / 2 ** 20
        assert counted == pytest.approx(common.MODEL_CONFIGS[arch][key], rel=0.1), key
    assert common.MODEL_CONFIGS[arch]["act_mib_ckpt"] < common.MODEL_CONFIGS[arch]["act_mib"] / 4


@slow
def test_eva02_base_builds_design_model():
    model = common.build_model("eva02_base", pretrained=False)
    assert model.num_features == 768 and common.MODEL_CONFIGS["eva02_base"]["img_size"] == 448
    with torch.no_grad():
        f, z = common.forward_features_and_logit(model.eval(), torch.zeros(1, 3, 448, 448))
    assert f.shape == (1, 768) and z.shape == (1,)


def test_missing_weights_error_names_flag(tmp_path):
    """With timm's caches pointed at an empty folder, offline: no weights to find."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "TORCH_HOME": str(tmp_path / "torch")}
    r = subprocess.run([sys.executable, "-c", "import common; common.build_model('convnext_atto', pretrained=True)"],
                       cwd=HERE, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "common.DataError: no local pretrained weights" in r.stderr, r.stderr[-2000:]
    assert "pass --weights PATH" in r.stderr


def test_a_real_bug_in_model_building_is_not_called_missing_weights(monkeypatch):
    import timm

    def broken(*args, **kwargs):
        raise TypeError("create_model() got an unexpected keyword argument")
    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):
        common.build_model("convnext_atto", pretrained=True)


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_weights_from_local_file_load_with_new_head(tmp_path, ext):
    import timm
    src = timm.create_model("convnextv2_atto", pretrained=False, num_classes=1000)
    path = str(tmp_path / f"w.{ext}")
    if ext == "pth":
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(src.state_dict(), path)
    model = common.build_model("convnext_atto", weights=path)
    assert model.get_classifier().out_features == 1
    assert torch.equal(model.stem[0].weight, src.stem[0].weight)
    assert torch.equal(model.stages[3].blocks[0].conv_dw.weight, src.stages[3].blocks[0].conv_dw.weight)


@pytest.mark.parametrize("arch", ["convnext_atto", "eva02_tiny"])
def test_exported_weights_load_back_with_the_weights_flag(tmp_path, arch, monkeypatch):
    """... and the folder is a Kaggle dataset, of the user the kaggle CLI knows."""
    torch.manual_seed(3)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    build = train_backbone.build_model  # random weights stand in for timm's download
    monkeypatch.setattr(train_backbone, "build_model", lambda *a, **k: build(*a, **{**k, "pretrained": False}))
    train_backbone.main(["--arch", arch, "--save-weights", str(tmp_path)])
    with open(tmp_path / "dataset-metadata.json") as f:
        assert json.load(f)["id"] == "someone/isic-2024-weights"
    path = tmp_path / f"{arch}.safetensors"
    from safetensors.torch import load_file
    saved = load_file(str(path))
    model = common.build_model(arch, weights=str(path))
    assert model.get_classifier().out_features == 1
    body = {k: v for k, v in model.state_dict().items() if k in saved and v.shape == saved[k].shape}
    assert len(body) >= len(saved) - 2  # every tensor but the classifier's
    assert all(torch.equal(v, saved[k]) for k, v in body.items())


# ---------------------------------------------------------------- demo.py

@slow
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


# ---------------------------------------------------------------- features.py

def test_make_folds_grouped_balanced_deterministic():
    rng = np.random.default_rng(3)
    patients = np.repeat([f"IP_{i}" for i in range(200)], rng.integers(1, 40, 200))
    y = (rng.random(len(patients)) < 0.02).astype(int)
    folds = features.make_folds(patients, y, 5, seed=7)
    for p in np.unique(patients):
        assert len(set(folds[patients == p])) == 1
    pos = np.bincount(folds, weights=y, minlength=5)
    max_patient_pos = max(y[patients == p].sum() for p in np.unique(patients))
    assert pos.max() - pos.min() <= max_patient_pos
    assert set(folds) == set(range(5))
    assert (features.make_folds(patients, y, 5, seed=7) == folds).all()
    assert (features.make_folds(patients, y, 5, seed=8) != folds).any()


def test_features_seed_makes_the_folds_of_that_seed(demo, tmp_path):
    work = str(tmp_path / "work")
    features.main(["--data", demo, "--work", work, "--seed", "7", "--no-context", "--no-outlier"])
    lesions = common.read_lesions(work, "train")
    want = features.make_folds(lesions["patient_id"], lesions["target"], 5, seed=7)
    assert np.array_equal(lesions["fold"], want)
    assert not np.array_equal(want, features.make_folds(lesions["patient_id"], lesions["target"], 5, seed=42))


def test_site_context_matches_a_loop_over_groups():
    """z and percentile within patient x site against the loop oracle run on (patient, site) groups:
    one-lesion groups, missing sites (no context), ties; shifting one group leaves it unchanged."""
    rng = np.random.default_rng(5)
    n = 160
    patient = rng.integers(0, 6, n)
    site = rng.integers(-1, 4, n)                     # -1: missing
    site[0], patient[0] = 3, 99                       # a one-lesion group (and patient)
    x = rng.integers(0, 4, (n, 3)).astype(float)      # ties
    x[:, 1] = rng.normal(size=n)
    x[rng.random(n) < 0.1, 2] = np.nan
    out = np.empty((2, 3, n))
    features.group_normalize(x, patient, site, out)
    want = patient_normalize_loop(x, [f"{p}/{s}" for p, s in zip(patient, site)])
    for i, stat in enumerate(features.CONTEXT_STATS):
        expected = np.where((site < 0)[:, None], np.nan, want[stat])
        np.testing.assert_allclose(out[i].T, expected, atol=1e-12, err_msg=stat)
    shifted = x.copy()
    in_group = (patient == patient[5]) & (site == site[5])
    shifted[in_group] += 1000.0
    out2 = np.empty_like(out)
    features.group_normalize(shifted, patient, site, out2)
    np.testing.assert_allclose(out2, out, atol=1e-9)


def test_z_summary_and_outlier_distance_match_brute_force():
    rng = np.random.default_rng(6)
    z = rng.normal(0, 1.5, (40, 5))
    z[3] = np.nan
    z[rng.random((40, 5)) < 0.1] = np.nan
    count, largest = features.z_summary(z)
    for i in range(40):
        vals = [abs(v) for v in z[i] if not np.isnan(v)]
        assert (np.isnan(count[i]) and not vals) or count[i] == sum(v > 2 for v in vals)
        assert (np.isnan(largest[i]) and not vals) or largest[i] == max(vals)
    patient = np.array([0] * 12 + [1] * 3 + [2] + [3] * 24)
    got = features.knn_outlier(z, patient, k=5, chunk=7)   # chunks smaller than a patient
    zz = np.nan_to_num(z)
    for i in range(40):
        others = [j for j in range(40) if patient[j] == patient[i] and j != i]
        d = sorted(float(np.sqrt(sum((zz[i] - zz[j]) ** 2))) for j in others)[:5]
        assert (np.isnan(got[i]) and not d) or got[i] == pytest.approx(np.mean(d), rel=1e-9, abs=1e-12)


def test_a_lesions_features_come_from_its_own_patient_only(demo):
    """Adding another patient's lesions changes no feature of the lesions already there."""
    train = common.read_train(demo)
    vocab = features.fit_vocabularies(train)
    first = np.isin(train["patient_id"], np.unique(train["patient_id"])[:5])
    part = {c: v[first] for c, v in train.items()}
    x_part, _ = features.build_features(part, vocab)
    x_all, _ = features.build_features(train, vocab)
    np.testing.assert_array_equal(x_all[first], x_part)


def test_features_on_real_rows():
    train = common.read_metadata(os.path.join(TRAIN_SAMPLE, "train-metadata-5rows.csv"), ["isic_id"])
    test = common.read_metadata(os.path.join(PUBLIC_TEST, "test-metadata.csv"), ["isic_id"])
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


def test_engineered_features_leave_numpy_error_settings_alone():
    train = common.read_metadata(os.path.join(TRAIN_SAMPLE, "train-metadata-5rows.csv"), ["isic_id"])
    train["tbp_lv_perimeterMM"][:] = 0.0  # zero denominators
    with np.errstate(all="raise"):  # a notebook's own setting: kept, and no FloatingPointError
        names, x = features.engineered_features(train)
        assert np.geterr()["divide"] == "raise"
    assert np.isnan(x[:, names.index("area_to_perimeter_ratio")]).all()


@slow
def test_folds_are_reused_only_for_the_same_lesions_patients_and_labels(demo, demo_work, tmp_path, capsys):
    data = copy_demo(demo, tmp_path / "data")
    work = copy_work(demo_work, tmp_path / "work")
    features.main(["--data", data, "--work", work])  # the same metadata: folds.csv reused
    col = common.TRAIN_COLUMNS.index("patient_id")
    rewrite_csv(os.path.join(data, "train-metadata.csv"),
                lambda rows: rows[:3] + [rows[3][:col] + ["IP_9999999"] + rows[3][col + 1:]] + rows[4:])
    err = one_error_line(stage_error(capsys, features.main, ["--data", data, "--work", work]))
    assert "folds.csv: made from other training data (patient_id of isic_id" in err and "new --work" in err
    # the folds.csv that came with the models, refused, is not left in a new work folder to be reused
    fresh, models = str(tmp_path / "fresh"), os.path.join(work, "models")
    err = one_error_line(stage_error(capsys, features.main, ["--data", data, "--work", fresh, "--models", models]))
    assert err.startswith(f"error: {models}/folds.csv: made from other training data"), err
    assert not os.path.exists(os.path.join(fresh, "folds.csv"))


@slow
@pytest.mark.parametrize("column, value, what", [("tbp_lv_areaMM2", "3e38", "too large"),
                                                 ("tbp_lv_perimeterMM", "1e-38", "too close to 0")])
def test_a_measurement_whose_features_overflow_float32_is_one_error_line(demo, tmp_path, capsys, column, value, what):
    """3e38 passes the CSV reader (float32 holds it), but the area times the distance does not; nor
    does the area over a perimeter of 1e-38 squared."""
    data = copy_demo(demo, tmp_path / "data")
    path = os.path.join(data, "train-metadata.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    row = 7
    rewrite_csv(path, lambda rows: [r if i != row else [(value if h == column else v)
                                                        for h, v in zip(rows[0], r)] for i, r in enumerate(rows)])
    work = str(tmp_path / "work")
    with warnings.catch_warnings(record=True) as caught:  # a warning line would be printed before the error
        warnings.simplefilter("always")
        err = one_error_line(stage_error(capsys, features.main, ["--data", data, "--work", work]))
    assert not caught, [str(w.message) for w in caught]
    assert re.fullmatch(f"error: {path}: isic_id {rows[row][rows[0].index('isic_id')]}: feature "
                        rf"(\w*) is infinite \(1 lesion\(s\)\): {column} {re.escape(f'{float(value):g}')} is {what} .*", err), err
    assert re.fullmatch(r"error: .*: feature (\w*) is.*", err)[1] in features.engineered_features(
        common.read_train(demo))[0]
    assert not os.path.exists(os.path.join(work, "features", "train.npy"))


@slow
def test_a_test_csv_with_an_empty_target_column_is_fine(demo, demo_work, tmp_path):
    """An empty target column in the test file changes nothing: the same test features as without it."""
    data = copy_demo(demo, tmp_path / "data")
    rewrite_csv(os.path.join(data, "test-metadata.csv"), lambda rows: [rows[0] + ["target"]] + [r + [""] for r in rows[1:]])
    work = str(tmp_path / "work")
    features.main(["--data", data, "--work", work])
    ids = common.read_lesions(demo_work, "test")["isic_id"]
    np.testing.assert_array_equal(common.load_array(os.path.join(work, "features", "test.npy"), ids),
                                  common.load_array(os.path.join(demo_work, "features", "test.npy"), ids))
    with open(os.path.join(work, "features", "columns.txt")) as a, \
            open(os.path.join(demo_work, "features", "columns.txt")) as b:
        assert a.read() == b.read()


@slow
@pytest.mark.parametrize("case, match", [
    ("header_only", "train-metadata.csv: the training lesions hold no lesion"),
    ("all_positive", "train-metadata.csv: the training lesions hold only lesions of target 1"),
    ("positives_in_one_patient", "folds.csv: the training rows of fold .* hold only lesions of target 0"),
    ("cr_line_ends", None),
])
def test_training_data_that_cannot_train_stops_before_any_work(demo, tmp_path, capsys, case, match):
    data = copy_demo(demo, tmp_path / "data")
    path = os.path.join(data, "train-metadata.csv")
    target, patient = common.TRAIN_COLUMNS.index("target"), common.TRAIN_COLUMNS.index("patient_id")
    if case == "header_only":
        rewrite_csv(path, lambda rows: rows[:1])
    elif case == "all_positive":
        rewrite_csv(path, lambda rows: rows[:1] + [r[:target] + ["1.0"] + r[target + 1:] for r in rows[1:]])
    elif case == "positives_in_one_patient":
        rewrite_csv(path, lambda rows: rows[:1] + [r[:patient] + ["IP_0000001"] + r[patient + 1:] if r[target] == "1.0"
                                                   else r for r in rows[1:]])
    else:  # old Mac line ends: read as any other
        with open(path, "rb") as f:
            text = f.read()
        with open(path, "wb") as f:
            f.write(text.replace(b"\r\n", b"\r").replace(b"\n", b"\r"))
    work = str(tmp_path / "work")
    if match is None:
        features.main(["--data", data, "--work", work])
        assert common.read_lesions(work, "train")["isic_id"].tolist() == common.read_train(demo)["isic_id"].tolist()
        return
    assert re.search(match, one_error_line(stage_error(capsys, features.main, ["--data", data, "--work", work])))
    assert not os.path.exists(os.path.join(work, "features"))


@slow
def test_an_unwritable_work_folder_is_one_error_line(demo, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = one_error_line(stage_error(capsys, features.main, ["--data", demo, "--work", str(a_file)]))
    assert f"{a_file}: File exists: is {a_file} a folder you can write to?" in err

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(kwargs["dir"], kwargs["prefix"] + "x1y2"))
    monkeypatch.setattr(common.tempfile, "mkstemp", read_only)
    err = one_error_line(stage_error(capsys, features.main, ["--data", demo, "--work", str(tmp_path / "w1")]))
    assert f"Read-only file system: is {tmp_path / 'w1'} a folder you can write to?" in err
    monkeypatch.undo()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common.np, "save", disk_full)
    err = one_error_line(stage_error(capsys, features.main, ["--data", demo, "--work", str(tmp_path / "w2")]))
    assert re.search(r"features/train.npy: No space left on device: free some space", err)
    assert not [p for p in (tmp_path / "w2" / "features").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- train_backbone.py

@slow
def test_training_writes_checkpoint_and_log_and_resume_after_kill_matches(demo, demo_work, tmp_path):
    """With --ema, so that the average saved as the fold model must resume where it was too."""
    args = ["--arch", "convnext_atto", "--fold", "1", "--data", demo, "--ema", "0.9", "--keep-best"] + tiny_train(2)
    straight, killed = copy_work(demo_work, tmp_path / "straight"), copy_work(demo_work, tmp_path / "killed")
    points = points_of(lambda: train_backbone.main(args + ["--work", straight]))
    log_rows = read_log(os.path.join(straight, "models", "convnext_atto", "fold1", "log.csv"))
    assert [int(r["epoch"]) for r in log_rows] == [0, 1]
    assert all(0 <= float(r["val_pauc"]) <= 0.2 for r in log_rows)
    # the same run killed (as SIGKILL would) right after its first resume state is in place, then resumed:
    # the epoch's log row was written before it, so the resumed log is whole
    saved_at = next(i for i, p in enumerate(points, 1) if p == "renaming it to " + os.path.join(
        straight, "models", "convnext_atto", "fold1.partial", "resume.pt"))
    log_path = os.path.join(killed, "models", "convnext_atto", "fold1.partial", "log.csv")
    r = subprocess.run([sys.executable, "train_backbone.py"] + args + ["--work", killed], cwd=HERE, timeout=600,
                       capture_output=True, text=True, env={**os.environ, common.KILL_AT: str(saved_at)})
    assert r.returncode == 137, r.stderr[-2000:]
    # what the killed run left: the epoch's average saved as best.pt, and in resume.pt beside the weights
    saved = [torch.load(os.path.join(os.path.dirname(log_path), f), weights_only=False)
             for f in ("resume.pt", "best.pt")]
    assert saved[0]["epoch"] == saved[1]["epoch"] == 0
    assert all(torch.equal(saved[1]["model"][k], saved[0]["ema"][k]) for k in saved[0]["ema"])
    assert not all(torch.equal(saved[0]["model"][k], saved[0]["ema"][k]) for k in saved[0]["ema"])
    r = run_script("train_backbone.py", args + ["--work", killed, "--resume"])
    assert r.returncode == 0, r.stderr
    assert "resuming after epoch" in r.stdout
    a = torch.load(os.path.join(straight, "models", "convnext_atto", "fold1", "last.pt"), weights_only=False)
    b = torch.load(os.path.join(killed, "models", "convnext_atto", "fold1", "last.pt"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["epoch"] for r in read_log(os.path.join(killed, "models", "convnext_atto", "fold1", "log.csv"))] == \
        ["0", "1"]
    assert not os.path.exists(os.path.dirname(log_path))  # the finished fold replaced fold1/ whole


@slow
def test_a_run_stopped_by_its_deadline_resumes_with_the_settings_it_began(demo, demo_work, tmp_path, capsys):
    """--deadline already passed, on folds 1 and 2 of 2 epochs: the first epoch of the process starts
    unjudged; fold 1 then stops before its second, leaving its resume state, and fold 2 is not
    started. Resumed with settings that change the weights, or from a damaged resume.pt, the fold
    stops with one error line and keeps the first run's args.json; with another --micro-batch
    (speed alone) and no deadline it finishes, with that record."""
    work = copy_work(demo_work, tmp_path / "work")
    args = ["--arch", "convnext_atto", "--fold", "1", "--data", demo, "--work", work] + tiny_train(2)
    partial = os.path.join(work, "models", "convnext_atto", "fold1.partial")
    train_backbone.main(args[:3] + ["1,2", "--deadline", str(time.time())] + args[4:])
    out = capsys.readouterr().out
    assert "convnext_atto fold 1: stopped after epoch 1 of 2, as the next would end after --deadline" in out, out
    assert "convnext_atto fold 2: not started: its 2 epochs would end after --deadline" in out
    assert sorted(os.listdir(os.path.dirname(partial))) == ["fold1.partial"]
    assert [r["epoch"] for r in read_log(os.path.join(partial, "log.csv"))] == ["0"]
    with open(os.path.join(partial, "args.json"), "rb") as f:
        recorded = f.read()
    err = one_error_line(stage_error(capsys, train_backbone.main, args + ["--resume", "--epochs", "3", "--lr", "1e-4",
                                                                         "--micro-batch", "4"]))
    assert f"{partial}/args.json: " in err and "(--epochs 2 -> 3, --lr 0.0003 -> 0.0001)" in err, err
    assert "resume with the recorded settings, or run without --resume to start the fold again" in err
    resume_pt = os.path.join(partial, "resume.pt")
    with open(resume_pt, "rb") as f:
        saved = f.read()
    with open(resume_pt, "wb") as f:
        f.write(saved[:len(saved) // 2])
    err = one_error_line(stage_error(capsys, train_backbone.main, args + ["--resume"]))
    assert f"{resume_pt}: damaged (" in err and "run without --resume to start the fold again" in err, err
    with open(resume_pt, "wb") as f:
        f.write(saved)
    # another fold's resume state (with its args.json), or a loadable file that is no resume state
    other = os.path.join(work, "models", "convnext_atto", "fold2.partial")
    shutil.copytree(partial, other)
    err = one_error_line(stage_error(capsys, train_backbone.main, args[:3] + ["2"] + args[4:] + ["--resume"]))
    assert f"{other}/resume.pt: the resume state of another run (fold 1), not of convnext_atto fold 2" in err, err
    shutil.rmtree(other)
    torch.save({"model": {}, "epoch": 0}, resume_pt)
    err = one_error_line(stage_error(capsys, train_backbone.main, args + ["--resume"]))
    assert f"{resume_pt}: not a resume state of train_backbone.py" in err, err
    with open(resume_pt, "wb") as f:
        f.write(saved)
    train_backbone.main(args + ["--resume", "--micro-batch", "4"])
    assert "resuming after epoch 0" in capsys.readouterr().out
    fold = os.path.join(work, "models", "convnext_atto", "fold1")
    assert [r["epoch"] for r in read_log(os.path.join(fold, "log.csv"))] == ["0", "1"]
    with open(os.path.join(fold, "args.json"), "rb") as f:
        assert f.read() == recorded
    # a committed fold is kept under --resume only with the settings and folds it was trained with
    train_backbone.main(args + ["--resume", "--workers", "1"])
    assert "fold 1: already trained" in capsys.readouterr().out
    err = one_error_line(stage_error(capsys, train_backbone.main, args + ["--resume", "--lr", "1e-4"]))
    assert (f"{fold}: trained with other settings than these (--lr 0.0003 -> 0.0001): run train_backbone.py --arch "
            "convnext_atto --fold 1 without --resume") in err
    swap = {"3": "4", "4": "3"}  # other folds, still grouped by patient
    rewrite_csv(os.path.join(work, "folds.csv"), lambda rows: rows[:1] + [r[:3] + [swap.get(r[3], r[3])] for r in rows[1:]])
    common.write_record(work, "features", [os.path.join(work, "folds.csv")])
    err = one_error_line(stage_error(capsys, train_backbone.main, args + ["--resume"]))
    assert f"{fold}: trained with other settings than these (the folds of {work}/folds.csv)" in err, err
    assert file_bytes(os.path.join(fold, "last.pt")) and os.path.exists(os.path.join(fold, "manifest.json"))


def test_micro_batches_give_the_whole_batch_gradient():
    x, y = torch.randn(8, 3, 64, 64), torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0])
    after = []
    for micro in (8, 3, 1):
        torch.manual_seed(0)
        model = common.build_model("convnext_atto", pretrained=False, drop_path=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, skipped = train_backbone.train_step(model, model, opt, scaler, common.focal_loss, x, y, micro,
                                                  torch.device("cpu"), None)
        assert not skipped
        after.append((loss, torch.cat([p.detach().flatten() for p in model.parameters()])))
    for loss, weights in after[1:]:
        assert loss == pytest.approx(after[0][0], rel=1e-5)
        torch.testing.assert_close(weights, after[0][1], rtol=0, atol=1e-6)


def convnext_atto_depth(name):
    """A convnext_atto parameter's depth as timm groups its layers, worked out by hand: the stem 0,
    then one layer a block (stages of 2, 2, 6, 2 blocks), a stage's downsampling with its first
    block; the final norm 13, the last layer."""
    if name.startswith("stem."):
        return 0
    if name.startswith("head.norm."):
        return 13
    stage, rest = re.fullmatch(r"stages\.(\d)\.(.*)", name).groups()
    first = {"0": 1, "1": 3, "2": 5, "3": 11}[stage]
    return first if rest.startswith("downsample.") else first + int(re.match(r"blocks\.(\d+)\.", rest).group(1))


def test_each_parameter_group_learns_at_its_base_rate_times_the_schedule():
    """The head at --head-lr, a backbone parameter at depth i of 13 at lr * decay^(13 - i), each
    following 3 warm-up steps then a cosine over the 7 left of 10; weight decay on matrices only."""
    model = common.build_model("convnext_atto", pretrained=False)
    lr, head_lr, decay, wd = 1e-4, 3e-3, 0.5, 0.05
    opt = torch.optim.AdamW(train_backbone.param_groups(model, lr, head_lr, wd, decay))
    head = {id(p) for p in model.get_classifier().parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    want = {n: head_lr if id(p) in head else lr * decay ** (13 - convnext_atto_depth(n))
            for n, p in model.named_parameters()}
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(names)  # each once
    assert {id(p) for g in opt.param_groups if g["base_lr"] == head_lr for p in g["params"]} == head
    factors = [1 / 3, 2 / 3, 1] + [0.5 * (1 + np.cos(np.pi * k / 7)) for k in range(7)]
    for step, factor in enumerate(factors):
        train_backbone.set_lr(opt, train_backbone.lr_factor(step, 10, 3))
        for g in opt.param_groups:
            for p in g["params"]:
                assert g["lr"] == pytest.approx(want[names[id(p)]] * factor, rel=1e-12), (step, names[id(p)])
                assert g["weight_decay"] == (wd if p.ndim > 1 else 0.0), names[id(p)]


@slow
def test_with_ema_the_average_is_what_is_validated_and_saved(demo, demo_work, tmp_path, monkeypatch):
    """--ema: validation scores the moving average (a frozen copy), and last.pt holds those very weights."""
    work = copy_work(demo_work, tmp_path / "work")
    validated = []

    def spy(model, *args, **kw):
        validated.append(({k: v.detach().clone() for k, v in model.state_dict().items()},
                          any(p.requires_grad for p in model.parameters())))
        return real_validate(model, *args, **kw)
    real_validate = train_backbone.validate
    monkeypatch.setattr(train_backbone, "validate", spy)
    train_backbone.main(["--arch", "convnext_atto", "--fold", "0", "--data", demo, "--work", work, "--ema", "0.5"]
                        + tiny_train(1))
    state, trainable = validated[-1]
    assert not trainable  # the average, not the model being trained
    saved = torch.load(os.path.join(work, "models", "convnext_atto", "fold0", "last.pt"), weights_only=False)["model"]
    assert saved.keys() == state.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], state[k], rtol=0, atol=0, msg=k)


def test_ema_is_the_running_average_of_the_weights_after_each_step():
    """ema = 0.9 ema + 0.1 w after each of 5 SGD steps, worked out beside; the batch norm's running
    statistics (buffers, not learned) are the model's own."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    ema = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    want = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        train_backbone.update_ema(ema, model, 0.9)
        want = [0.9 * w + 0.1 * p.detach() for w, p in zip(want, model.parameters())]
    for got, w in zip(ema.parameters(), want):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(torch.cat([p.flatten() for p in ema.parameters()]),
                              torch.cat([p.flatten() for p in model.parameters()]))  # an average, not a copy
    for got, b in zip(ema.buffers(), model.buffers()):
        assert torch.equal(got, b)


@slow
@pytest.mark.parametrize("fault, match", [
    ("nan weight", r"convnext_atto fold 0, epoch 1, step 1: the training loss is nan: try a lower --lr"),
    ("inf gradients", r"convnext_atto fold 0, epoch \d, step 20: the fp16 gradient scaler skipped the last 20 steps"),
])
def test_training_that_stops_learning_stops_with_an_error(demo, demo_work, tmp_path, capsys, monkeypatch, fault,
                                                         match):
    """fp16 with a gradient scaler (faked on the CPU: float32 with the scaler on): a forward pass
    that gives NaN, or gradients that overflow at every step, end training with the fold and step,
    and no fold model is saved."""
    monkeypatch.setattr(train_backbone, "amp_settings", lambda device, cpu_amp: (None, True))
    build = train_backbone.build_model

    def broken_model(*args, **kwargs):
        model = build(*args, **kwargs)
        weight = model.get_classifier().weight
        if fault == "nan weight":
            with torch.no_grad():
                weight[0, 0] = float("nan")
        else:
            weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return model
    monkeypatch.setattr(train_backbone, "build_model", broken_model)
    work = copy_work(demo_work, tmp_path / "work")
    args = ["--arch", "convnext_atto", "--fold", "0", "--data", demo, "--work", work] + tiny_train(3)
    err = one_error_line(stage_error(capsys, train_backbone.main, args + ["--batch-size", "4"]))
    assert re.search(match, err), err
    assert not os.path.exists(os.path.join(work, "models", "convnext_atto", "fold0"))


def test_the_head_computes_in_float32_under_autocast():
    """Logits under bf16 autocast equal the float32 head applied to the features (a bf16 logit has
    8 significant bits: a patient's lesions would tie), and the weights keep timm's names."""
    import timm
    torch.manual_seed(0)
    for arch in ("eva02_tiny", "convnext_atto"):
        model = common.build_model(arch, pretrained=False, drop_path=0.0).eval()
        size = common.MODEL_CONFIGS[arch]["img_size"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feats, logit = common.forward_features_and_logit(model, torch.randn(32, 3, size, size))
            whole = model(torch.randn(2, 3, size, size))
        head = model.get_classifier()
        assert logit.dtype == whole.dtype == torch.float32
        expected = feats.double() @ head.weight.double().T + head.bias.double()
        torch.testing.assert_close(logit.double(), expected[:, 0], rtol=0, atol=1e-5)
        plain = timm.create_model(common.MODEL_CONFIGS[arch]["model_name"], pretrained=False, num_classes=1,
                                  **({"img_size": size} if arch.startswith("eva02") else {}))
        assert list(model.state_dict()) == list(plain.state_dict())


@slow
def test_out_of_gpu_memory_names_the_flags_that_lower_it(demo, demo_work, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train_backbone, "train_step", oom)
    work = copy_work(demo_work, tmp_path / "work")
    err = one_error_line(stage_error(capsys, train_backbone.main, ["--arch", "convnext_atto", "--fold", "0",
                                                                   "--data", demo, "--work", work] + tiny_train(1)))
    assert "out of GPU memory training convnext_atto: pass a smaller --micro-batch, or --grad-checkpointing" in err


@slow
@pytest.mark.parametrize("option, match", [
    (["--fold", "7"], "--fold 7: the folds of .*folds.csv are 0 to 4: one fold, several comma-separated, or 'all'"),
    (["--fold", "0,x"], "--fold 0,x: the folds of .*folds.csv are 0 to 4: one fold, several"),
    (["--fold", "abc"], "--fold abc: the folds of"),
    (["--epochs", "0"], "argument --epochs: must be at least 1 and at most 1000, not 0"),
    (["--save-weights", "out"], "argument --save-weights: writes timm.s pretrained weights; with --no-pretrained"),
    (["--ema", "1"], "argument --ema: must be at least 0 and below 1, not 1"),
])
def test_bad_training_options_are_one_error(demo, demo_work, capsys, option, match):
    err = stage_error(capsys, train_backbone.main, ["--arch", "convnext_atto", "--data", demo, "--work", demo_work]
                      + tiny_train(1) + option)
    assert re.search(match, err)
    assert not os.path.exists(os.path.join(demo_work, "models", "convnext_atto"))


@slow
def test_no_fold_model_is_saved_from_data_it_cannot_learn(demo, demo_work, tmp_path, capsys):
    work = copy_work(demo_work, tmp_path / "work")
    lesions = common.read_lesions(work, "train")
    folds = np.where(lesions["target"] == 1, 2, lesions["fold"])  # every positive in fold 2
    common.write_csv(os.path.join(work, "folds.csv"), ["isic_id", "patient_id", "target", "fold"],
                     [lesions["isic_id"], lesions["patient_id"], lesions["target"], folds])
    rerecord(work, "features")
    err = one_error_line(stage_error(capsys, train_backbone.main, ["--arch", "convnext_atto", "--fold", "all",
                                                                   "--data", demo, "--work", work] + tiny_train(1)))
    assert "the training rows of fold 2" in err and "only lesions of target 0" in err
    assert not os.path.exists(os.path.join(work, "models", "convnext_atto"))


@slow
def test_no_fold_trains_without_a_positive_that_decodes(demo, demo_work, tmp_path, capsys):
    """Every positive of fold 2's training rows broken: --fold all stops before any fold trains
    (the other folds' training rows hold fold 2's positives, which decode)."""
    data = copy_demo(demo, tmp_path / "data")
    work = copy_work(demo_work, tmp_path / "work")
    train = common.read_lesions(work, "train")
    broken = train["isic_id"][(train["target"] == 1) & (train["fold"] != 2)]
    for i in broken:
        corrupt_image(os.path.join(data, "train-image.hdf5"), i, b"\xff\xd8\xff truncated")
    err = one_error_line(stage_error(capsys, train_backbone.main, ["--arch", "convnext_atto", "--fold", "all",
                                                                   "--data", data, "--work", work] + tiny_train(1)))
    assert f"train-image.hdf5: none of the {len(broken)} positives (target 1) of the training rows of fold 2 can " \
           "be decoded" in err and "replace the broken tiles" in err, err
    assert f"the first: isic_id {broken[0]}: the image cannot be decoded" in err, err
    assert not os.path.exists(os.path.join(work, "models", "convnext_atto"))


def torchrun(script, args, nproc=2, timeout=600, **env):
    """`torchrun --standalone --nproc_per_node=N SCRIPT ARGS` on the CPU (gloo), one thread a process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           script] + args, cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})


@slow
def test_two_processes_train_what_one_does(demo, demo_work, tmp_path):
    """--batch-size is the optimizer step across processes: two gloo processes take the same steps,
    learning rates and augmentation as one, and end with its weights (no drop path: its draws are
    each process's own)."""
    args = ["--arch", "convnext_atto", "--fold", "0", "--data", demo, "--drop-path", "0"] + tiny_train(2)
    one, two = copy_work(demo_work, tmp_path / "one"), copy_work(demo_work, tmp_path / "two")
    train_backbone.main(args + ["--work", one])
    r = torchrun("train_backbone.py", args + ["--work", two])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if "weights differ between ranks by at most" in line]
    assert len(lines) == 2 and all(line.endswith("at most 0") for line in lines)
    assert "(2 processes of 8)" in r.stdout
    fold = os.path.join("models", "convnext_atto", "fold0")
    logs = [read_log(os.path.join(w, fold, "log.csv")) for w in (one, two)]
    assert [len(rows) for rows in logs] == [2, 2]
    for a, b in zip(*logs):
        for c in ("lr", "train_loss", "val_loss", "val_pauc"):
            assert float(a[c]) == pytest.approx(float(b[c]), rel=1e-4, abs=1e-6), c
    a, b = (torch.load(os.path.join(w, fold, "last.pt"), weights_only=False)["model"] for w in (one, two))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@slow
def test_a_process_whose_share_is_all_broken_tiles_keeps_step_with_the_others(demo, demo_work, tmp_path):
    """Two processes, one tile each a step, a tenth of the negatives broken: a step where either
    process has only a broken tile is skipped by both, so neither waits for the other (a hang) nor
    adds its gradients to another step's."""
    data, work = copy_demo(demo, tmp_path / "data"), copy_work(demo_work, tmp_path / "work")
    lesions = common.read_lesions(work, "train")
    for isic_id in lesions["isic_id"][(lesions["target"] == 0) & (lesions["fold"] != 0)][::10]:
        corrupt_image(os.path.join(data, "train-image.hdf5"), isic_id, b"not a jpeg")
    # --deadline passed: fold 0's one epoch, unjudged, then both processes leave fold 1 unstarted together
    r = torchrun("train_backbone.py", ["--arch", "convnext_atto", "--fold", "0,1", "--data", data, "--work", work]
                 + tiny_train(1) + ["--batch-size", "2", "--val-neg-per-pos", "3", "--deadline", str(time.time())],
                 timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training image(s) cannot be decoded (skipped)" in r.stdout
    assert r.stdout.count("convnext_atto fold 1: not started") == 2  # each process, deciding together
    lines = [line for line in r.stdout.splitlines() if "weights differ between ranks by at most" in line]
    assert len(lines) == 2 and all(line.endswith("at most 0") for line in lines)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(demo, demo_work, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_backbone, "process_device", lambda: (torch.device("cpu"), 0, 3))
    err = one_error_line(stage_error(capsys, train_backbone.main, ["--arch", "convnext_atto", "--fold", "0", "--data",
                                                                   demo, "--work", demo_work] + tiny_train(1)))
    assert "--batch-size 16 does not split evenly over 3 processes" in err


# ---------------------------------------------------------------- extract.py

def embed_one(work, demo, fold, isic_id, split="train"):
    model = extract.load_fold_model(os.path.join(work, "models"), "convnext_atto", fold, torch.device("cpu"))
    mean, std = common.normalization(model)
    with h5py.File(os.path.join(demo, f"{split}-image.hdf5"), "r") as h5:
        img = common.decode_image(common.read_image_bytes(h5, isic_id))
    canvas = np.zeros((1, common.CANVAS, common.CANVAS, 3), np.uint8)
    canvas[0, :img.shape[0], :img.shape[1]] = img
    x = common.prepare_batch(torch.from_numpy(canvas), torch.tensor([img.shape[:2]]), 64, mean, std,
                             torch.device("cpu"))
    with torch.no_grad():
        f, z = common.forward_features_and_logit(model, x)
    return f[0].numpy(), z[0].item()


def scores_json(work):
    import json
    with open(os.path.join(work, "models", "convnext_atto", "scores.json")) as f:
        return json.load(f)


@slow
def test_extraction_parity_and_out_of_fold(demo, trained):
    train = common.read_lesions(trained, "train")
    emb = common.load_array(os.path.join(trained, "emb", "convnext_atto_train.npy"), train["isic_id"])
    oof = common.read_preds(trained, "img_convnext_atto", "train", train["isic_id"])
    stats = scores_json(trained)["logit_stats"]
    for k in range(5):
        # a fold's scores are its model's logits standardized by their own mean and spread
        assert oof[train["fold"] == k].mean() == pytest.approx(0, abs=1e-5)
        assert oof[train["fold"] == k].std() == pytest.approx(1, abs=1e-5)
        row = int(np.flatnonzero(train["fold"] == k)[0])
        mine = [embed_one(trained, demo, j, train["isic_id"][row]) for j in range(5)]
        np.testing.assert_allclose(emb[row], mine[k][0], rtol=1e-4, atol=1e-4)
        mean, std = stats[str(k)]
        assert oof[row] == pytest.approx((mine[k][1] - mean) / std, rel=1e-4, abs=1e-4)
        # and not from any other fold's model, which trained on this row
        assert all(np.abs(emb[row] - mine[j][0]).max() > 1e-3 for j in range(5) if j != k)


@slow
def test_test_scores_come_from_the_best_fold_model_or_the_mean_of_all(demo, trained, tmp_path):
    test = common.read_lesions(trained, "test")
    per_fold = [embed_one(trained, demo, j, test["isic_id"][0], "test") for j in range(5)]
    stats = {int(k): v for k, v in scores_json(trained)["logit_stats"].items()}
    manifests = [common.read_manifest(os.path.join(trained, "models", "convnext_atto", f"fold{k}"), "") for k in range(5)]
    best = max(range(5), key=lambda k: manifests[k]["val_pauc"]["last"])
    emb = common.load_array(os.path.join(trained, "emb", "convnext_atto_test.npy"), test["isic_id"])
    score = common.read_preds(trained, "img_convnext_atto", "test", test["isic_id"])
    np.testing.assert_allclose(emb[0], per_fold[best][0], rtol=1e-4, atol=1e-4)
    assert score[0] == pytest.approx((per_fold[best][1] - stats[best][0]) / stats[best][1], rel=1e-4, abs=1e-4)
    work = copy_work(trained, tmp_path / "work")
    extract.main(["--arch", "convnext_atto", "--data", demo, "--work", work, "--workers", "0", "--test-models", "mean",
                  "--predict-only"])
    emb = common.load_array(os.path.join(work, "emb", "convnext_atto_test.npy"), test["isic_id"])
    score = common.read_preds(work, "img_convnext_atto", "test", test["isic_id"])
    np.testing.assert_allclose(emb[0], np.mean([e for e, _ in per_fold], axis=0), rtol=1e-4, atol=1e-4)
    assert score[0] == pytest.approx(np.mean([(z - stats[k][0]) / stats[k][1] for k, (_, z) in enumerate(per_fold)]),
                                     rel=1e-4, abs=1e-4)


def test_the_best_fold_model_is_chosen_among_those_with_a_validation_score():
    """NaN (no positive in a fold's validation rows) neither wins nor loses, first or last; with none
    scored, --test-models mean is the way."""
    nan = float("nan")
    manifests = {k: {"val_pauc": {"last": last, "best": best}} for k, last, best in
                 [(0, nan, 0.01), (1, 0.10, 0.12), (2, 0.15, 0.11), (3, 0.05, 0.19), (4, nan, nan)]}
    assert extract.best_fold(manifests, "last", "models/a") == 2
    assert extract.best_fold(manifests, "best", "models/a") == 3
    none = {k: {"val_pauc": {"last": nan}} for k in range(3)}
    with pytest.raises(common.DataError, match=r"^models/a: no fold model has a validation pAUC at its last "
                                               r"checkpoint .*: pass --test-models mean$"):
        extract.best_fold(none, "last", "models/a")


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical distribution
    functions, by a loop over the pooled values."""
    a, b = np.sort(a[~np.isnan(a)]), np.sort(b[~np.isnan(b)])
    return max(abs(np.searchsorted(a, v, "right") / len(a) - np.searchsorted(b, v, "right") / len(b))
               for v in np.r_[a, b])


def test_standardized_scores_mean_the_same_on_train_and_test(tmp_path):
    """Five fold models whose logits differ in level and spread: before, a train lesion's probability
    came from its fold's model and a test lesion's was the mean of the five, so their distributions
    differ; each model's logits standardized by its own out-of-fold statistics agree."""
    rng = np.random.default_rng(8)
    scale, offset = np.array([0.5, 1.0, 1.5, 2.0, 3.0]), np.array([-3.0, -1.0, 0.0, 1.0, 2.5])
    folds = np.repeat(np.arange(5), 2000)
    train_latent, test_latent = rng.normal(size=10000), rng.normal(size=4000)
    oof = {k: scale[k] * train_latent[folds == k] + offset[k] for k in range(5)}
    test = {k: scale[k] * test_latent + offset[k] for k in range(5)}
    args = type("Args", (), {"arch": "convnext_atto"})
    stats = extract.logit_statistics(args, str(tmp_path), {"folds": {}, "checkpoint": "last"}, oof)
    assert extract.logit_statistics(args, str(tmp_path), {"folds": {}, "checkpoint": "last"}, {}) == stats
    train_score = np.concatenate(list(extract.standardize(oof, stats).values()))
    best, mean = extract.standardize({3: test[3]}, stats)[3], np.mean(list(extract.standardize(test, stats).values()), 0)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    before = ks_statistic(sigmoid(np.concatenate(list(oof.values()))), np.mean([sigmoid(z) for z in test.values()], 0))
    after = [ks_statistic(train_score, best), ks_statistic(train_score, mean)]
    assert before > 0.1 and max(after) < 0.05, (before, after)


@slow
def test_two_processes_extract_what_one_does(demo, trained, tmp_path):
    work = copy_work(trained, tmp_path / "work")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "extract.py",
           "--arch", "convnext_atto", "--data", demo, "--work", work, "--workers", "0"]
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "process 1" in r.stdout
    for split in ("train", "test"):
        ids = common.read_lesions(work, split)["isic_id"]
        np.testing.assert_allclose(common.load_array(os.path.join(work, "emb", f"convnext_atto_{split}.npy"), ids),
                                   common.load_array(os.path.join(trained, "emb", f"convnext_atto_{split}.npy"), ids),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(common.read_preds(work, "img_convnext_atto", split, ids),
                                   common.read_preds(trained, "img_convnext_atto", split, ids), rtol=1e-4, atol=1e-4)
    assert not os.path.exists(os.path.join(work, "emb", "parts"))


@slow
def test_two_processes_score_a_share_of_broken_tiles_as_one_does(demo, trained, tmp_path):
    """Every test tile of process 1's share broken, process 0's fine: whether a tile of the split
    decodes is decided on the whole split, so torchrun goes on with NaN for them, as one process does."""
    data = copy_demo(demo, tmp_path / "data")
    ids = common.read_lesions(trained, "test")["isic_id"]
    broken = np.array_split(np.arange(len(ids)), 2)[1]
    for i in ids[broken]:
        corrupt_image(os.path.join(data, "test-image.hdf5"), i, b"\xff\xd8\xff not a jpeg")
    one, two = copy_work(trained, tmp_path / "one"), copy_work(trained, tmp_path / "two")
    args = ["--arch", "convnext_atto", "--data", data, "--workers", "0", "--predict-only"]
    extract.main(args + ["--work", one])
    r = torchrun("extract.py", args + ["--work", two])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: {len(broken)} test image(s) missing, or that cannot be decoded, or not finite" in r.stdout
    emb = [common.load_array(os.path.join(w, "emb", "convnext_atto_test.npy"), ids) for w in (one, two)]
    assert np.isnan(emb[0][broken]).all() and not np.isnan(np.delete(emb[0], broken, 0)).any()
    np.testing.assert_allclose(emb[1], emb[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(common.read_preds(two, "img_convnext_atto", "test", ids),
                               common.read_preds(one, "img_convnext_atto", "test", ids), rtol=1e-4, atol=1e-4)


def fake_part(work, fold, value, with_test=True):
    """A part of extract.py --resume's, as an interrupted run with the current fold model would leave it,
    holding a marker no recomputation gives; with the test lesions where the fold model scores them."""
    part = os.path.join(work, "emb", "parts", f"convnext_atto_fold{fold}.npz")
    os.makedirs(os.path.dirname(part), exist_ok=True)
    train, test = common.read_lesions(work, "train"), common.read_lesions(work, "test")
    rows = np.flatnonzero(train["fold"] == fold)
    test = {"isic_id": test["isic_id"][:len(test["isic_id"]) if with_test else 0]}
    digest = common.file_digest(os.path.join(work, "models", "convnext_atto", f"fold{fold}", "manifest.json"))
    np.savez(part, model=np.array(f"{digest} last"), train_ids=train["isic_id"][rows].astype(str),
             test_ids=test["isic_id"].astype(str), train_emb=np.full((len(rows), 320), value, np.float32),
             train_logit=np.zeros(len(rows)), test_emb=np.zeros((len(test["isic_id"]), 320), np.float32),
             test_logit=np.zeros(len(test["isic_id"])))
    return part, rows


@slow
def test_extraction_resumes_from_finished_folds_made_by_the_same_models(demo, trained, tmp_path, capsys):
    work = copy_work(trained, tmp_path / "work")
    want = np.load(os.path.join(work, "emb", "convnext_atto_train.npy"))
    folds = common.read_lesions(work, "train")["fold"]
    manifests = {k: common.read_manifest(os.path.join(work, "models", "convnext_atto", f"fold{k}"), "") for k in range(5)}
    scores_test = extract.best_fold(manifests, "last", "") == 0  # the best fold model alone scores the test lesions
    part, rows = fake_part(work, 0, 7.0, scores_test)
    args = ["--arch", "convnext_atto", "--data", demo, "--work", work, "--workers", "0"]
    capsys.readouterr()
    extract.main(args + ["--resume"])
    out = capsys.readouterr().out
    assert "fold 0: reusing" in out and "fold 1 held-out train" in out
    got = np.load(os.path.join(work, "emb", "convnext_atto_train.npy"))
    assert (got[rows] == 7.0).all()
    np.testing.assert_allclose(got[folds != 0], want[folds != 0], rtol=1e-4, atol=1e-4)
    assert not os.path.exists(os.path.dirname(part))      # parts are removed once the outputs are whole
    # fold 0 retrained after its part was written: the part is scored again, not reused
    part, rows = fake_part(work, 0, 7.0, scores_test)
    train_backbone.main(["--arch", "convnext_atto", "--fold", "0", "--data", demo, "--work", work] + tiny_train(1))
    capsys.readouterr()
    extract.main(args + ["--resume"])
    out = capsys.readouterr().out
    assert "fold 0: " in out and "made by another model" in out and "fold 0: reusing" not in out
    assert not (np.load(os.path.join(work, "emb", "convnext_atto_train.npy"))[rows] == 7.0).any()


def test_a_damaged_part_is_scored_again_on_resume(tmp_path, monkeypatch, capsys):
    """A part that a full disk or a killed copy left unreadable is no traceback: it is scored again."""
    args = types.SimpleNamespace(work=str(tmp_path), arch="convnext_atto", checkpoint="last", resume=True)
    images, rows = {"test": types.SimpleNamespace(ids=["a", "b", "c"])}, {"test": np.arange(3)}
    monkeypatch.setattr(extract, "load_fold_model", lambda *a: None)
    monkeypatch.setattr(extract, "embed", lambda args, model, images, r, *rest: (np.ones((len(r), 4), np.float32),
                                                                                  np.arange(len(r), dtype=float)))
    part = tmp_path / "emb" / "parts" / "convnext_atto_fold0.npz"
    extract.fold_part(args, str(tmp_path), 0, "digest", images, rows, torch.device("cpu"), None)
    for how in ("truncate", "empty", "foreign"):
        damage(part, how)
        capsys.readouterr()
        p = extract.fold_part(args, str(tmp_path), 0, "digest", images, rows, torch.device("cpu"), None)
        out = capsys.readouterr().out
        assert re.search(r"fold 0: .*convnext_atto_fold0.npz cannot be read \(.*\); scoring again", out), out
        np.testing.assert_array_equal(p["test_logit"], [0, 1, 2])
        np.testing.assert_array_equal(np.load(part)["test_logit"], [0, 1, 2])


@pytest.mark.parametrize("how, match", [
    ("empty", "damaged"), ("truncate", "damaged"), ("foreign", r"the file is \[1, 2\], not an object"),
    ("remove", "not found"), ({"0": [2.0, 0.0]}, "logit_stats.0 is not a mean and a std above 0"),
    ({"0": [2.0, None]}, r"logit_stats.0\[1\] is null, not a finite number"), ({"1": [2.0, 1.0]}, "lacks fold 0"),
    ({"0": 5}, "logit_stats.0 is 5, not a list"), ({"x": [2.0, 1.0]}, "'x' is not a fold number")])
def test_a_damaged_scores_json_is_one_error_line_naming_it(tmp_path, capsys, how, match):
    """Damaged, or valid JSON whose statistics would give wrong scores (a std of 0: infinite ones),
    or none for a fold it scores with."""
    args = types.SimpleNamespace(arch="convnext_atto")
    made_with = {"folds": {"0": "d" * 64}, "checkpoint": "last"}
    path = tmp_path / "convnext_atto" / "scores.json"
    extract.logit_statistics(args, str(tmp_path), made_with, {0: np.array([1.0, 3.0])})
    assert extract.logit_statistics(args, str(tmp_path), made_with, {}) == {0: (2.0, 1.0)}
    if isinstance(how, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), "logit_stats": how}))
    else:
        damage(path, how)
    err = one_error_line(stage_error(capsys, lambda _: extract.logit_statistics(args, str(tmp_path), made_with, {}),
                                     None))
    assert re.search(f"{path}: .*{match}.*: run extract.py --arch convnext_atto on the training data", err), err


@slow
def test_predict_only_checks_scores_json_before_scoring(demo, trained, tmp_path, capsys, monkeypatch):
    work = copy_work(trained, tmp_path / "work")
    with open(os.path.join(work, "models", "convnext_atto", "scores.json"), "w") as f:
        f.write('{"folds": ')
    monkeypatch.setattr(extract, "predict", lambda *a, **k: pytest.fail("scored before scores.json was checked"))
    err = one_error_line(stage_error(capsys, extract.main, ["--arch", "convnext_atto", "--data", demo, "--work", work,
                                                            "--predict-only", "--workers", "0"]))
    assert "scores.json: damaged" in err


@slow
def test_fold_models_of_other_folds_or_incomplete_are_refused(demo, trained, tmp_path, capsys):
    work = copy_work(trained, tmp_path / "work")
    args = ["--arch", "convnext_atto", "--data", demo, "--work", work, "--workers", "0"]
    os.remove(os.path.join(work, "models", "convnext_atto", "fold3", "last.pt"))  # an incomplete copy
    err = one_error_line(stage_error(capsys, extract.main, args))
    assert "fold3: last.pt is missing or is not the file this model was trained with" in err
    assert "run train_backbone.py --arch convnext_atto --fold 3" in err
    shutil.rmtree(work)
    work = copy_work(trained, tmp_path / "work")
    lesions = common.read_lesions(work, "train")  # folds.csv changed since the models were trained
    common.write_csv(os.path.join(work, "folds.csv"), ["isic_id", "patient_id", "target", "fold"],
                     [lesions["isic_id"], lesions["patient_id"], lesions["target"], (lesions["fold"] + 1) % 5])
    rerecord(work, "features")
    err = one_error_line(stage_error(capsys, extract.main, args))
    assert "were trained on other folds than" in err and "retrain them" in err


@slow
@pytest.mark.parametrize("damage", ["not_hdf5", "empty", "truncated"])
def test_a_damaged_hdf5_file_is_one_error_line(demo, demo_work, tmp_path, capsys, damage):
    data = copy_demo(demo, tmp_path / "data")
    path = os.path.join(data, "train-image.hdf5")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write({"not_hdf5": b"isic_id,target\n", "empty": b"", "truncated": raw[:len(raw) // 2]}[damage])
    err = one_error_line(stage_error(capsys, train_backbone.main, ["--arch", "convnext_atto", "--fold", "0",
                                                                   "--data", data, "--work", demo_work] + tiny_train(1)))
    assert "train-image.hdf5: cannot be read as an HDF5 file" in err


def test_a_model_that_outputs_nan_is_an_error_not_undecodable_tiles(demo):
    model = common.build_model("convnext_atto", pretrained=False, drop_path=0.0)
    with torch.no_grad():
        model.get_classifier().bias.fill_(float("nan"))
    h5_path = os.path.join(demo, "train-image.hdf5")
    with h5py.File(h5_path, "r") as h5:
        ids = sorted(h5.keys())[:6]
    loader = common.image_loader(common.H5Images(h5_path, ids), batch_size=4, workers=0)
    mean, std = common.normalization(model)
    with pytest.raises(common.DataError) as e:
        common.predict(model, loader, 64, mean, std, torch.device("cpu"), None, "scoring test")
    assert str(e.value).startswith(f"scoring test: the model's output for {ids[0]} (a tile that decodes) is not "
                                   "finite (logit nan; 4 of the 4 tiles of its batch) in float32"), e.value


def test_a_tile_not_finite_in_reduced_precision_is_scored_again_in_float32(demo, monkeypatch, capsys):
    """A tile whose bf16 output is not finite (as an fp16 overflow) gets its float32 scores; one that
    is not finite in float32 either stops a training-side extraction, and in a submission (lenient)
    gets NaN and one warning line while the rest of its batch keeps its scores."""
    model = common.build_model("convnext_atto", pretrained=False, drop_path=0.0)
    h5_path = os.path.join(demo, "test-image.hdf5")
    with h5py.File(h5_path, "r") as h5:
        ids = sorted(h5.keys())[:6]
    loader = common.image_loader(common.H5Images(h5_path, ids), batch_size=4, workers=0)
    mean, std = common.normalization(model)
    cpu = torch.device("cpu")
    emb32, logit32 = common.predict(model, loader, 64, mean, std, cpu, None)
    emb16, logit16 = common.predict(model, loader, 64, mean, std, cpu, torch.bfloat16)
    assert not np.array_equal(logit16, logit32)  # bf16 differs: a retried tile is recognisable
    monkeypatch.setenv(common.NONFINITE_AT, f"{ids[1]} {ids[4]}!")
    with pytest.raises(common.DataError) as e:
        common.predict(model, loader, 64, mean, std, cpu, torch.bfloat16, "scoring test")
    assert re.search(f"the model.s output for {ids[4]} \\(a tile that decodes\\) is not finite .* in float32:", str(e.value))
    capsys.readouterr()
    emb, logit = common.predict(model, loader, 64, mean, std, cpu, torch.bfloat16, "scoring test", lenient=True)
    close = dict(rtol=1e-5, atol=1e-6)  # the retry, in float32 (alone: not bit for bit the batch's)
    assert np.isclose(logit[1], logit32[1], **close) and not np.isclose(logit16[1], logit32[1], **close)
    assert np.isnan(logit[4]) and np.isnan(emb[4]).all()
    kept = [0, 2, 3, 5]
    assert np.array_equal(logit[kept], logit16[kept]) and np.array_equal(emb[kept], emb16[kept])
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warning) == 1 and f"not finite, in float32 too: scored without image features (NaN): {ids[4]}" \
        in warning[0], warning


@slow
def test_when_no_tile_of_a_split_decodes_it_is_an_error(demo, trained, tmp_path, capsys):
    data = copy_demo(demo, tmp_path / "data")
    work = copy_work(trained, tmp_path / "work")
    test_ids = common.read_lesions(work, "test")["isic_id"]
    for i in test_ids:
        corrupt_image(os.path.join(data, "test-image.hdf5"), i, b"\xff\xd8\xff not a jpeg")
    err = stage_error(capsys, extract.main, ["--arch", "convnext_atto", "--data", data, "--work", work,
                                             "--workers", "0"])
    line = one_error_line(err)
    assert re.search(f"test-image.hdf5: none of the {len(test_ids)} images of convnext_atto fold . test can be decoded",
                     line)
    assert f"the first: isic_id {test_ids[0]}: the image cannot be decoded" in line


# ---------------------------------------------------------------- gbdt.py

@slow
def test_gbdt_with_image_scores_and_embeddings(trained, tmp_path):
    work = copy_work(trained, tmp_path / "work")
    gbdt.main(["--work", work, "--name", "tab_cnx", "--image", "convnext_atto", "--embeddings", "convnext_atto",
               "--rounds", "20", "--bags", "1"])
    names = common.read_csv(os.path.join(work, "models", "tab_cnx", "importance.csv"), ["feature"])["feature"]
    assert {"img_convnext_atto", "img_convnext_atto_pn_dev", "img_convnext_atto_pn_z", "img_convnext_atto_site_z",
            "img_convnext_atto_site_pct", "emb_convnext_atto_319"} <= set(names)


@slow
def test_one_gbdt_takes_every_image_models_score_with_its_site_context(demo, trained, tmp_path):
    """--image A,B: each model's five score features; the site z-score against the loop oracle on
    (patient, anatom_site_general) groups read from the metadata, NaN where the site is missing."""
    work = copy_work(trained, tmp_path / "work")
    for split in ("oof", "test"):  # a second image model: convnext_atto's scores, transformed
        rows = common.read_csv(os.path.join(work, "preds", f"img_convnext_atto_{split}.csv"), ["isic_id", "pred"],
                               ["pred"])
        other = np.tanh(rows["pred"]) * 3
        shutil.copy(os.path.join(work, "preds", f"img_convnext_atto_{split}.csv"),
                    os.path.join(work, "preds", f"img_other_{split}.csv"))
        rewrite_csv(os.path.join(work, "preds", f"img_other_{split}.csv"),
                    lambda r: [r[0]] + [row[:-1] + [repr(float(v))] for row, v in zip(r[1:], other)])
    common.write_record(work, "img_other", glob.glob(os.path.join(work, "preds", "img_other_*.csv")))
    args = types.SimpleNamespace(work=work, image=["convnext_atto", "other"], embeddings=[])
    train = common.read_lesions(work, "train")
    x, names = gbdt.load_features(args, "train", train, gbdt.input_digests(args, os.path.join(work, "models")))
    image_names = [n for n in names if n.startswith("img_")]
    assert len(image_names) == 10 and image_names[5] == "img_other"
    site = common.read_train(demo)["anatom_site_general"]
    score = x[:, names.index("img_other")].astype(float)
    want = patient_normalize_loop(score[:, None], [f"{p}/{s}" for p, s in zip(train["patient_id"], site)])["z"][:, 0]
    want[site == ""] = np.nan
    np.testing.assert_allclose(x[:, names.index("img_other_site_z")], want, rtol=1e-4, atol=1e-5)  # float32 features
    gbdt.main(["--work", work, "--name", "tab_all", "--image", "convnext_atto,other", "--rounds", "10", "--bags", "1"])
    assert len(common.read_preds(work, "tab_all", "test", common.read_lesions(work, "test")["isic_id"])) > 0


def test_each_bag_trains_on_its_own_rows_with_their_labels_and_weights():
    """gbdt.bag_datasets bins the rows of every bag once and takes each bag as a subset. On features
    of a few integer values every binning puts each value in a bin of its own, so a booster trained
    on a bag's subset must equal one trained on a Dataset built from the bag's rows alone
    (positives repeated by the oversampling, labels, weights)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (600, 3)).astype(np.float32)
    y = ((x[:, 0] + rng.random(600) * 3) > 6.5).astype(float)
    weight = rng.choice([0.0, 0.5, 1.0], 600)
    trn = np.sort(rng.choice(600, 450, replace=False))
    args = gbdt.build_parser().parse_args(["--pos-rate", "0.3", "--neg-rate", "0.5", "--min-leaf", "5",
                                           "--rounds", "8", "--threads", "1"])
    names = ["a", "b", "c"]
    bags = gbdt.bag_datasets(args, x, y, weight, trn, names, [3, 4])
    for seed, bag in zip([3, 4], bags):
        rows = trn[gbdt.bag_sample(y[trn], np.random.default_rng(seed), args.pos_rate, args.neg_rate)]
        assert len(rows) > len(np.unique(rows))  # positives repeated
        alone = gbdt.lgb.Dataset(x[rows], y[rows], weight=weight[rows], feature_name=names,
                                 params=gbdt.lgb_params(args, seed))
        want = gbdt.lgb.train(gbdt.lgb_params(args, seed), alone, args.rounds).predict(x)
        got = gbdt.lgb.train(gbdt.lgb_params(args, seed), bag, args.rounds).predict(x)
        assert np.array_equal(got, want)
        assert np.array_equal(bag.get_label(), y[rows]) and np.array_equal(bag.get_weight(), weight[rows])


@slow
def test_indeterminate_negatives_get_their_training_weight_and_nothing_else(demo, demo_work, tmp_path):
    """The weight reaches LightGBM's rows of Indeterminate negatives only (counted from the metadata by
    hand); the diagnosis is no feature; --predict-only needs no diagnosis file."""
    work = copy_work(demo_work, tmp_path / "work")
    with open(os.path.join(demo, "train-metadata.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    want = [0.25 if r["iddx_1"] == "Indeterminate" and float(r["target"]) == 0 else 1.0 for r in rows]
    assert 0 < want.count(0.25) < len(want)
    args = types.SimpleNamespace(work=work, indeterminate_weight=0.25)
    weight, n = gbdt.training_weights(args, common.read_lesions(work, "train"))
    assert weight.tolist() == want and n == want.count(0.25)
    with open(os.path.join(work, "features", "columns.txt")) as f:
        assert not [c for c in f.read().split() if "iddx" in c or "Indeterminate" in c]
    gbdt.main(["--work", work, "--rounds", "10", "--bags", "1", "--indeterminate-weight", "0"])
    os.remove(os.path.join(work, "train_diagnosis.csv"))
    gbdt.main(["--work", work, "--rounds", "10", "--bags", "1", "--predict-only"])


@slow
def test_the_models_folder_is_one_consistent_unit(demo, demo_work, tmp_path, capsys):
    work = copy_work(demo_work, tmp_path / "work")
    model_dir = os.path.join(work, "models", "tabular")

    def predict_only():
        os.remove(os.path.join(work, "preds", "tabular_test.csv"))
        gbdt.main(["--work", work, "--predict-only"])
        return common.read_preds(work, "tabular", "test", common.read_lesions(work, "test")["isic_id"])
    gbdt.main(["--work", work, "--rounds", "20", "--bags", "3"])
    gbdt.main(["--work", work, "--rounds", "20", "--bags", "1"])  # fewer boosters than the run before
    trained = common.read_preds(work, "tabular", "test", common.read_lesions(work, "test")["isic_id"])
    assert sorted(f for f in os.listdir(model_dir) if f.endswith(".txt")) == [f"fold{k}_bag0.txt" for k in range(5)]
    np.testing.assert_array_equal(predict_only(), trained)
    # a rerun killed after its first boosters leaves the committed folder as it was
    proc = subprocess.Popen([sys.executable, "gbdt.py", "--work", work, "--rounds", "300", "--bags", "3", "--seed", "9"],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(model_dir + ".partial", "fold0_bag1.txt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    np.testing.assert_array_equal(predict_only(), trained)
    # two runs writing the same model at once: the second stops
    with common.stage_locks(types.SimpleNamespace(work=work), ["gbdt-tabular"]):
        assert "another run is writing or reading gbdt-tabular" in one_error_line(
            stage_error(capsys, gbdt.main, ["--work", work, "--rounds", "20", "--bags", "1"]))
    # an interrupted first run: no model folder; a model asked to predict other features than it knows
    assert "models/never: not a complete trained model (no manifest.json): run gbdt.py --name never" in \
        one_error_line(stage_error(capsys, gbdt.main, ["--work", work, "--predict-only", "--name", "never"]))
    features.main(["--data", demo, "--work", work, "--no-patient-norm"])
    assert "trained on other features than these" in one_error_line(
        stage_error(capsys, gbdt.main, ["--work", work, "--predict-only"]))
    # a booster of another run copied in
    other = copy_work(demo_work, tmp_path / "other")
    gbdt.main(["--work", other, "--rounds", "20", "--bags", "1", "--seed", "5"])
    shutil.copy(os.path.join(model_dir, "fold2_bag0.txt"), os.path.join(other, "models", "tabular"))
    assert "fold2_bag0.txt is missing or is not the file this model was trained with" in one_error_line(
        stage_error(capsys, gbdt.main, ["--work", other, "--predict-only"]))


@pytest.mark.parametrize("script, option, value, match", [  # the values a careless run tried
    (gbdt, "--lr", "1e308", "must be above 0 and at most 1, not 1e308"),
    (gbdt, "--min-leaf", "10000000000", "must be at least 1 and at most 100000, not 10000000000"),
    (gbdt, "--indeterminate-weight", "1e308", "must be at least 0 and at most 10, not 1e308"),
    (gbdt, "--num-leaves", "131072", "must be at least 2 and at most 1024, not 131072"),
    (gbdt, "--neg-rate", "1e-320", "must be at least 0.0001 and at most 1, not 1e-320"),
    (gbdt, "--neg-rate", "inf", "must be a finite number at least 0.0001 and at most 1, not inf"),
    (gbdt, "--max-depth", "0", "must be -1 or at least 1 and at most 64, not 0"),
    (train_backbone, "--batch-size", str(2 ** 63), f"must be at least 1 and at most 4096, not {2 ** 63}"),
    (train_backbone, "--head-lr", "nan", "must be a finite number above 0 and at most 1, not nan"),
    (train_backbone, "--warmup-epochs", "41", r"must be at most --epochs \(40\), not 41"),
    (train_backbone, "--seed", "2000000000", "must be at least 0 and at most 1073741824, not 2000000000"),
    (extract, "--batch-size", "inf", "'inf' is not a number of type int"),
])
def test_numeric_options_out_of_range_are_refused_naming_the_range(tmp_path, capsys, script, option, value, match):
    """inf and nan would pass a bare comparison (no negatives in a bag, an overflow later); each is
    refused by argparse, before any work, with the option's range."""
    args = ["--arch", "convnext_atto"] if script in (train_backbone, extract) else []
    err = stage_error(capsys, script.main, args + ["--work", str(tmp_path / "work"), option, value])
    assert re.search(f"argument {option}: {match}$", err.strip()), err
    assert not os.path.exists(tmp_path / "work")


def script_parsers(monkeypatch):
    """{(script, option): its argparse action} of every numeric option of every stage and demo.py,
    each parser caught as its main hands it the arguments."""
    class Caught(Exception):
        pass

    def catch(parser, args=None, namespace=None):
        raise Caught(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    options = {}
    for script in (sys.modules["demo"], features, train_backbone, extract, gbdt, ensemble, report, notebooks):
        with pytest.raises(Caught) as caught:
            script.main([])
        options.update({(script.__name__, a.option_strings[0]): a for a in caught.value.args[0]._actions
                        if a.option_strings and (a.type in (int, float) or hasattr(a.type, "bounds"))})
    monkeypatch.undo()
    return options


def test_every_numeric_option_has_bounds_that_hold_at_and_just_beyond(monkeypatch, capsys, tmp_path):
    """Each numeric option of each script has a finite upper bound and a lower one; the bounds are
    taken, and a step beyond each, inf and nan end the script with exit 2 and one line naming the
    range, before it makes any file."""
    options = script_parsers(monkeypatch)
    assert len(options) >= 35 and ("demo", "--patients") in options and ("gbdt", "--num-leaves") in options
    scripts = {m.__name__: m for m in (sys.modules["demo"], features, train_backbone, extract, gbdt, ensemble, report,
                                       notebooks)}
    first = {"demo": [str(tmp_path / "d")], "notebooks": [str(tmp_path / "k")],
             "train_backbone": ["--arch", "convnext_atto"], "extract": ["--arch", "convnext_atto"]}  # what each needs
    for (script, option), action in options.items():
        assert hasattr(action.type, "bounds"), f"{script}.py {option}: a bare {action.type.__name__}, no range"
        low, high, low_open, high_open = action.type.bounds
        assert low is not None and high is not None and high < 1e12, (script, option, low, high)
        kind = int if all(isinstance(v, int) for v in (low, high, action.default or 0)) else float
        step = 1 if kind is int else max(abs(high), abs(low), 1e-300) * 1e-6
        for value, taken in [(low, not low_open), (low - step, False), (high, not high_open),
                             (high + step, False), (math.inf, False), (math.nan, False), (-math.inf, False)]:
            text = repr(value) if kind is float else str(value)
            if taken:
                assert action.type(text) == value, (script, option, value)
                continue
            args = first.get(script, []) + ["--work", str(tmp_path / "w")] * (script in STAGES) + [f"{option}={text}"]
            err = stage_error(capsys, scripts[script].main, args).strip().splitlines()[-1]  # after the usage
            assert re.search(f"error: argument {option}: (must be .*|'.*' is not a number of type int)$", err), err
            assert os.listdir(tmp_path) == [], (script, option, value)
        if action.default is not None:
            assert action.type(str(action.default)) == action.default, (script, option)


STAGES = ("features", "train_backbone", "extract", "gbdt", "ensemble", "report")


@pytest.mark.parametrize("script, args, match", [
    (gbdt, ["--name", "convnext_atto"], "'convnext_atto' is an image model's --arch name"),
    (gbdt, ["--name", "eva02_base", "--image", "convnext_atto"], "'eva02_base' is an image model's --arch name"),
    (gbdt, ["--name", "img_convnext_atto"], "'img_convnext_atto' is extract.py's name for an image model's scores"),
    (gbdt, ["--name", "ensemble"], "'ensemble' is ensemble.py's name for its outputs"),
    (gbdt, ["--name", "features"], "'features' is features.py's name for its outputs"),
    (gbdt, ["--name", ""], "'': a GBDT name is a plain word"),
    (gbdt, ["--name", "."], "'.': a GBDT name is a plain word"),
    (gbdt, ["--name", ".."], "'..': a GBDT name is a plain word"),
    (gbdt, ["--name", "a/b"], "'a/b': a GBDT name is a plain word"),
    (gbdt, ["--name", "x" * 65], "a GBDT name is a plain word of letters, digits, _ and -"),
    (ensemble, ["--names", "tabular,img_convnext_atto"], "'img_convnext_atto' is extract.py's name"),
    (ensemble, ["--names", "tabular,tabular"], "'tabular,tabular': a name twice"),
])
def test_a_model_name_that_another_stage_owns_is_refused_before_any_work(tmp_path, capsys, script, args, match):
    """GBDT names, image models' names, img_ARCH, features and ensemble share models/, preds/ and
    records/: a GBDT name that would write over another stage's outputs (or outside them) is refused
    when the arguments are parsed, and every output stays as it was."""
    work = tmp_path / "work"
    for path in ("models/convnext_atto/fold0/last.pt", "models/ensemble.json", "models/features.json",
                 "models/tabular/manifest.json", "preds/img_convnext_atto_oof.csv", "preds/ensemble_test.csv",
                 "records/features.json", "records/img_convnext_atto.json", "records/ensemble.json"):
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(path)
    before = tree_digest(work)
    err = stage_error(capsys, script.main, ["--work", str(work)] + args).strip().splitlines()[-1]  # after the usage
    assert "error: argument --name" in err and match in err, err
    assert tree_digest(work) == before


@slow
@pytest.mark.parametrize("name, how, match", [
    ("train.npy", "truncate", r"train.npy: damaged \(Failed to read all data.*\): run features.py$"),
    ("test.npy", "empty", r"test.npy: damaged \(No data left in file\): run features.py$"),
    ("test.npy", "foreign", r"test.npy: damaged \(.*\): run features.py$"),
    ("train_ids.txt", "truncate", r"train.npy: \d+ rows but \d+ ids in .*train_ids.txt: run features.py$"),
    ("test_ids.txt", "remove", r"test_ids.txt: not found: run features.py$"),
    ("columns.txt", "remove", r"columns.txt: not found: run features.py$"),
])
def test_a_damaged_feature_matrix_is_one_error_line_naming_it(demo_work, tmp_path, capsys, name, how, match):
    work = copy_work(demo_work, tmp_path / "work")
    damage(os.path.join(work, "features", name), how)
    if how != "remove":  # as recorded (a damaged copy with its record): load_array's own checks
        rerecord(work, "features")
    err = one_error_line(stage_error(capsys, gbdt.main, ["--work", work, "--rounds", "2", "--bags", "1"]))
    assert re.search(os.path.join(work, "features", "") + match, err), err
    assert not os.path.exists(os.path.join(work, "models", "tabular"))


@slow
def test_folds_csv_with_a_patient_in_two_folds_is_refused(demo, demo_work, tmp_path, capsys):
    work = copy_work(demo_work, tmp_path / "work")
    lesions = common.read_lesions(work, "train")
    row = int(np.flatnonzero(lesions["patient_id"] == lesions["patient_id"][-1])[-1])  # a patient's last lesion
    first_fold, moved = lesions["fold"][row], (lesions["fold"][row] + 1) % 5

    def move(rows):
        rows[row + 1][rows[0].index("fold")] = str(moved)
        return rows
    rewrite_csv(os.path.join(work, "folds.csv"), move)  # a damaged folds.csv, which features.py reuses
    err = one_error_line(stage_error(capsys, features.main, ["--data", demo, "--work", work]))
    assert (f"folds.csv: patient_id {lesions['patient_id'][row]} is in fold {first_fold} and in fold {moved} "
            f"(isic_id {lesions['isic_id'][row]}): each patient's lesions must be in one fold") in err, err


# ---------------------------------------------------------------- ensemble.py

def test_rank_average_matches_loop():
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 4, 30).astype(float), rng.normal(size=30), rng.random(30)]
    weights = [0.2, 0.5, 0.3]
    want = np.zeros(30)
    for p, w in zip(preds, weights):
        for i in range(30):
            want[i] += w * (sum(q < p[i] for q in p) + (sum(q == p[i] for q in p) + 1) / 2) / 30
    np.testing.assert_allclose(ensemble.rank_average(preds, weights), want, atol=1e-12)


@slow
def test_the_submission_is_written_only_after_every_input_is_checked(demo_work, tmp_path, capsys):
    work = copy_work(demo_work, tmp_path / "work")
    gbdt.main(["--work", work, "--name", "a", "--rounds", "10", "--bags", "1"])
    gbdt.main(["--work", work, "--name", "b", "--rounds", "10", "--bags", "1", "--seed", "3"])
    ensemble.main(["--work", work, "--names", "a,b"])
    with open(os.path.join(work, "submission.csv"), "rb") as f:
        before = f.read()
    os.remove(os.path.join(work, "preds", "b_oof.csv"))
    gbdt.main(["--work", work, "--name", "a", "--rounds", "10", "--bags", "1", "--seed", "4"])  # new test preds
    assert "b_oof.csv: not found: run gbdt.py --name b" in one_error_line(stage_error(capsys, ensemble.main,
                                                                     ["--work", work, "--names", "a,b"]))
    with open(os.path.join(work, "submission.csv"), "rb") as f:
        assert f.read() == before


def test_weights_give_a_noise_member_nothing_and_never_lose_to_the_best_member():
    rng = np.random.default_rng(5)
    y = (rng.random(3000) < 0.05).astype(int)
    folds = rng.integers(0, 5, 3000)
    strong, weaker, noise = y + rng.normal(0, 0.7, 3000), y + rng.normal(0, 1.2, 3000), rng.normal(size=3000)
    ranks = np.array([ensemble.rank01(p) for p in (strong, weaker, noise)])
    w = ensemble.choose_weights(ranks, y, np.ones(3000, bool))
    assert w.sum() == pytest.approx(1) and w[2] <= 0.1
    assert common.pauc(y, w @ ranks) >= max(common.pauc(y, r) for r in ranks)
    chosen, honest = ensemble.nested_choice(ranks, y, folds)
    assert all(c[2] <= 0.1 for c in chosen.values()) and common.pauc(y, honest) > common.pauc(y, weaker)


def test_weights_for_a_fold_never_see_its_labels():
    rng = np.random.default_rng(6)
    y = (rng.random(2000) < 0.1).astype(int)
    folds = np.repeat(np.arange(5), 400)
    decent = y + rng.normal(0, 1.0, 2000)
    lucky = np.where(folds == 2, y + rng.normal(0, 0.01, 2000), rng.normal(size=2000))  # perfect on fold 2 only
    ranks = np.array([ensemble.rank01(decent), ensemble.rank01(lucky)])
    in_sample = ensemble.choose_weights(ranks, y, folds == 2)
    assert in_sample[1] >= 0.5  # chosen with fold 2's labels, the lucky member would lead on fold 2
    chosen, honest = ensemble.nested_choice(ranks, y, folds)
    assert chosen[2][1] <= 0.1  # chosen on the other folds, where it is noise, it gets next to nothing
    fold2 = folds == 2
    assert common.pauc(y[fold2], honest[fold2]) < common.pauc(y[fold2], in_sample @ ranks[:, fold2]) - 0.02


@pytest.mark.parametrize("text, want", [("equal", [0.5, 0.5]), ("1,3", [0.25, 0.75]), ("0,2", [0.0, 1.0]),
                                        ("1e308,1e308", [0.5, 0.5]), ("1e308,1.5e308", [0.4, 0.6]),
                                        ("5e-324,0", [1.0, 0.0])])
def test_weights_by_hand(text, want):
    """Hand-worked: 1e308 + 1e308 overflows a plain sum, 5e-324 is the smallest float above 0."""
    np.testing.assert_allclose(ensemble.parse_weights(text, ["a", "b"]), want, rtol=1e-15)


@pytest.mark.parametrize("text", ["1", "1,-1", "0,0", "a,b", "inf,1", "1e309,1", "nan,1"])
def test_bad_weights_say_what_is_expected(text):
    with pytest.raises(common.DataError, match="'oof', 'equal', or 2 finite non-negative numbers, not all 0"):
        ensemble.parse_weights(text, ["a", "b"])


@pytest.mark.parametrize("argv", [["--blend", "-1,2"], ["--blend=-1,2"], ["--blend", "-.5,2"]])
def test_a_negative_first_weight_gets_the_weights_message_not_argparses(tmp_path, capsys, monkeypatch, argv):
    """argparse takes "-1,2" for an option ("expected one argument"): main hands it to --blend."""
    monkeypatch.setattr(ensemble, "ensemble", lambda args: ensemble.parse_weights(args.blend, ["a", "b"]))
    monkeypatch.setattr(ensemble, "member_names", lambda args: ["a", "b"])
    err = one_error_line(stage_error(capsys, ensemble.main, ["--work", str(tmp_path)] + argv))
    assert re.fullmatch(r"error: --blend -\.?[0-9.]+,2: 'oof', 'equal', or 2 finite non-negative numbers, not all 0, "
                        "one for each of a, b", err), err
    assert ensemble.blend_joined(["--names", "a,b", "--blend", "-1,2", "--blend", "1,2"]) == [
        "--names", "a,b", "--blend=-1,2", "--blend", "1,2"]


# ---------------------------------------------------------------- reasons.py

def test_every_feature_belongs_to_exactly_one_concept(demo_work):
    """The concepts of every column a GBDT can get (features.py's, two image models' scores and an
    embedding) against groups built the way the columns are made: each numeric feature with its
    patient, site and location statistics; the counts; the z summary; the outlier distance; each
    categorical's one-hots (the three site columns together); each image model's score and its
    statistics; its embedding."""
    with open(os.path.join(demo_work, "features", "columns.txt")) as f:
        columns = f.read().split()
    engineered, _ = features.engineered_features({c: np.ones(2) for c in common.NUMERIC})
    groups = [{n} | {f"{n}_pn_{s}" for s in common.STATS}
              | {f"{n}_{key}_{s}" for key in features.CONTEXT for s in features.CONTEXT_STATS}
              for n in common.NUMERIC + engineered]
    groups += [{"n_lesions_patient", "n_lesions_patient_site", "n_lesions_patient_location"},
               {"pn_z_count_above_2", "pn_z_max_abs"}, {"pn_knn_distance"}]
    sites = {"anatom_site_general", "tbp_lv_location", "tbp_lv_location_simple"}
    groups += [{n for n in columns if n.split("__")[0] in cs} for cs in [sites] + [{c} for c in common.CATEGORICAL
                                                                                  if c not in sites]]
    for arch in ("eva02_base", "convnext_atto"):
        names = [f"img_{arch}", f"img_{arch}_pn_dev", f"img_{arch}_pn_z", f"img_{arch}_site_z", f"img_{arch}_site_pct"]
        columns += names
        groups.append(set(names))
    columns += [f"emb_convnext_atto_{i}" for i in range(12)]
    groups.append(set(columns[-12:]))
    assert len(columns) > 860 and all(sum(n in g for g in groups) == 1 for n in columns)
    concepts = [{reasons.concept_of(n)[0] for n in g if n in columns} for g in groups]
    assert all(len(c) == 1 for c in concepts)  # a group is one concept ...
    assert len(set.union(*concepts)) == len(groups) < 100  # ... and no two groups share one


def test_the_measurement_the_label_depends_on_is_the_top_reason_for_the_positives():
    rng = np.random.default_rng(3)
    bases = ["tbp_lv_areaMM2", "tbp_lv_L", "age_approx", "hue_contrast"]
    names = [f"{b}{s}" for b in bases for s in ("", "_pn_z", "_pn_pct", "_site_z")] + ["n_lesions_patient",
                                                                                      "sex__male"]
    x = rng.normal(size=(3000, len(names)))
    x[:, names.index("tbp_lv_areaMM2_pn_pct")] = rng.random(3000)
    y = (x[:, names.index("tbp_lv_areaMM2_pn_z")] > 1.5).astype(int)  # the area's patient z-score alone
    boosters = [lgb.train({"objective": "binary", "num_leaves": 7, "verbose": -1, "seed": s, "num_threads": 1,
                           "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.7}, lgb.Dataset(x, y), 30) for s in (1, 2)]
    pos = np.flatnonzero(y == 1)
    phi = reasons.contributions(boosters, x[pos])
    first, *_ = reasons.top_reasons(phi[:, :-1], x[pos], names)
    z = x[pos, names.index("tbp_lv_areaMM2_pn_z")]
    assert all(r.startswith("area: ") for r in first)
    # in the lesion's own words: its z-score where that feature contributes most of the concept
    said = [f"area: {v:.1f} SD above the mean of this patient's lesions" for v in z]
    assert np.mean([r == s for r, s in zip(first, said)]) > 0.5


@pytest.mark.parametrize("name, value, said", [
    ("tbp_lv_areaMM2_pn_z", 3.14, "area: 3.1 SD above the mean of this patient's lesions"),
    ("tbp_lv_deltaLBnorm_site_pct", 1.0, "colour contrast: the highest of the patient's lesions on this body site"),
    ("tbp_lv_deltaLBnorm_site_pct", 0.98, "colour contrast: in the top 2% of the patient's lesions on this body site"),
    ("tbp_lv_L_location_z", -1.26, "lightness: 1.3 SD below the mean of the patient's lesions in this location"),
    ("img_eva02_base", 2.51, "image score (eva02_base): 2.5 SD above the mean of the training lesions"),
    ("img_eva02_base_pn_dev", 0.5, "image score (eva02_base): +0.5 from the median of this patient's lesions"),
    ("img_eva02_base_site_pct", 0.1, "image score (eva02_base): in the bottom 10% of the patient's lesions on this "
                                     "body site"),
    ("tbp_lv_areaMM2", np.nan, "area: missing"),
])
def test_a_reason_says_what_the_lesions_own_value_says(name, value, said):
    concept, kind = reasons.concept_of(name)
    assert f"{concept}: {reasons.describe(kind, value)}" == said


def test_a_concept_that_lowers_the_score_is_phrased_from_the_feature_that_lowers_it_most():
    names = ["tbp_lv_areaMM2_pn_z", "tbp_lv_areaMM2_pn_pct"]
    first, = reasons.top_reasons(np.array([[-1.0, -0.1]]), np.array([[2.0, 0.9]]), names, n=1)
    assert first == ["area: 2.0 SD above the mean of this patient's lesions (lowers the score)"]


def test_reasons_combine_the_members_by_the_weights_that_ranked_each_lesion(monkeypatch):
    """Two members, each whose contribution is one measurement: the lesions of fold 0, ranked with
    weights 1/0, give the first member's measurement; those of fold 1, weighted 0/1, the second's."""
    lesions = {"patient_id": np.array(["a"] * 4), "fold": np.array([0, 0, 1, 1]), "target": np.zeros(4)}
    own = {"m1": "tbp_lv_areaMM2_pn_z", "m2": "tbp_lv_L_pn_z"}

    def contributions(work, models_dir, name, made_by, split, lesions, rows):
        return np.ones((len(rows), 2)), [own[name]], np.full((len(rows), 1), 2.0)
    monkeypatch.setattr(reasons, "member_contributions", contributions)
    weights = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    first = reasons.explain("", "", ["m1", "m2"], weights, dict.fromkeys(own), "train", lesions, np.arange(4.0))[0]
    assert [r.partition(":")[0] for r in first] == ["area", "area", "lightness", "lightness"]


@slow
def test_out_of_fold_reasons_use_the_weights_chosen_on_the_other_folds(reported, tmp_path, monkeypatch):
    work = copy_work(reported, tmp_path / "work")
    given = {}
    explain = reasons.explain

    def spy(*args):  # each split's weights, as ensemble.py hands them over
        given[args[5]] = args[3]
        return explain(*args)
    monkeypatch.setattr(ensemble, "explain", spy)
    ensemble.main(["--work", work, "--names", "tab,tab_cnx"])
    with open(os.path.join(work, "models", "ensemble.json")) as f:
        spec = json.load(f)
    folds = common.read_lesions(work, "train")["fold"]
    want = np.array([spec["fold_weights"][str(k)] for k in folds])
    assert len({tuple(w) for w in spec["fold_weights"].values()}) > 1  # the folds' weights differ: a real check
    np.testing.assert_array_equal(given["train"], want)
    np.testing.assert_array_equal(given["test"], np.tile(spec["weights"], (len(given["test"]), 1)))


@slow
def test_contributions_add_up_to_the_raw_scores_of_the_boosters_that_scored_the_lesion(reported):
    """Test lesions: every booster of the GBDT; train lesions: those of the fold that held them out
    (fold{k}_bag*.txt), each booster's own raw score (booster.predict(raw_score=True))."""
    models = os.path.join(reported, "models")
    digest = common.read_manifest(os.path.join(models, "tab_cnx"), "gbdt.py")["digest"]
    args = types.SimpleNamespace(work=reported, image=["convnext_atto"], embeddings=[])
    inputs = gbdt.input_digests(args, models)
    files = sorted(glob.glob(os.path.join(models, "tab_cnx", "fold*_bag*.txt")))
    boosters = {os.path.basename(f): lgb.Booster(model_file=f) for f in files}
    for split in ("test", "train"):
        lesions = common.read_lesions(reported, split)
        rows = np.arange(0, len(lesions["isic_id"]), 7)
        phi, names, _ = reasons.member_contributions(reported, models, "tab_cnx", digest, split, lesions, rows)
        x = gbdt.load_features(args, split, lesions, inputs)[0][rows]
        raw = {f: b.predict(x, raw_score=True) for f, b in boosters.items()}
        for f, b in boosters.items():  # LightGBM's contributions and bias sum to each booster's raw score
            np.testing.assert_allclose(b.predict(x, pred_contrib=True).sum(1), raw[f], atol=1e-6)
        if split == "test":
            np.testing.assert_allclose(phi.sum(1), np.mean(list(raw.values()), 0), atol=1e-6)
            continue
        for k in range(5):
            held_out = lesions["fold"][rows] == k
            mine = np.mean([r for f, r in raw.items() if f.startswith(f"fold{k}_")], 0)[held_out]
            np.testing.assert_allclose(phi[held_out].sum(1), mine, atol=1e-6)
            assert np.abs(np.mean(list(raw.values()), 0)[held_out] - mine).max() > 1e-3  # other folds differ


# ---------------------------------------------------------------- report.py, and the retrieval metrics it shows

class ReportParser(HTMLParser):
    """What report.html shows: each chart's (svg id) polylines, rects and text, and the table rows."""

    def __init__(self):
        super().__init__()
        self.svg, self.cell, self.rows = None, None, []
        self.lines, self.rects, self.text = {}, {}, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.svg = a["id"]
            self.lines[self.svg], self.rects[self.svg], self.text[self.svg] = {}, [], []
        elif tag == "polyline":
            self.lines[self.svg][a["data-series"]] = [tuple(map(float, p.split(","))) for p in a["points"].split()]
        elif tag == "rect" and self.svg:
            self.rects[self.svg].append(a)
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "svg":
            self.svg = None
        elif tag in ("th", "td"):
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data
        if self.svg:
            self.text[self.svg].append(data)


def retrieval_brute_force(y, score, patients, k):
    """Top-k retrieval sensitivity by enumeration: every order of each patient's lesions that sorts
    their scores from high to low (all orders of the ties) counts equally."""
    found, per_patient = 0.0, []
    for p in np.unique(patients):
        rows = np.flatnonzero(patients == p)
        orders = [o for o in itertools.permutations(rows) if all(score[a] >= score[b] for a, b in zip(o, o[1:]))]
        hits = np.mean([y[list(o[:k])].sum() for o in orders])
        found += hits
        if y[rows].sum():
            per_patient.append(hits / y[rows].sum())
    return found / y.sum(), np.mean(per_patient)


def test_retrieval_sensitivity_matches_brute_force_ties_included():
    rng = np.random.default_rng(9)
    checked = 0
    for trial in range(40):
        patients = np.array([f"P{i}" for i in rng.integers(0, 6, 24)])
        if np.unique(patients, return_counts=True)[1].max() > 7:  # enumerating every order: small patients only
            continue
        y = (rng.random(24) < 0.3).astype(int)
        y[0] = 1
        score = rng.integers(0, 4, 24) / 3.0 if trial % 2 else rng.normal(size=24)  # many ties, or none
        for k in (1, 2, 3):
            got = report.retrieval_sensitivity(y, score, patients, k)
            assert got == pytest.approx(retrieval_brute_force(y, score, patients, k), abs=1e-12)
        checked += 1
    assert checked >= 20
    # a hand-worked tie at the cut: two malignant of three tied lesions, two places left: 2 x 2/3 found
    y, score = np.array([1, 1, 0, 0]), np.array([0.5, 0.5, 0.5, 0.9])
    assert report.retrieval_sensitivity(y, score, np.zeros(4), 3) == pytest.approx((2 / 3, 2 / 3))


def test_rank_in_patient_is_one_for_the_lesion_to_look_at_first():
    patients = np.array(["b", "a", "b", "a", "b", "a"])
    score = np.array([0.2, 0.9, 0.7, 0.9, 0.2, 0.1])
    assert common.rank_in_patient(score, patients).tolist() == [2, 1, 1, 2, 3, 3]  # ties in the given order


@pytest.fixture(scope="session")
def reported(demo, trained, tmp_path_factory):
    """The report of two GBDTs (tabular; tabular + convnext_atto scores) and their ensemble on the demo set."""
    work = copy_work(trained, tmp_path_factory.mktemp("reported") / "work", ignore=shutil.ignore_patterns("*.pt"))
    gbdt.main(["--work", work, "--name", "tab", "--rounds", "10", "--bags", "1"])
    gbdt.main(["--work", work, "--name", "tab_cnx", "--image", "convnext_atto", "--rounds", "10", "--bags", "1"])
    ensemble.main(["--work", work, "--names", "tab,tab_cnx"])
    report.main(["--work", work, "--data", demo, "--test-labels", os.path.join(demo, "demo_test_labels.csv")])
    return work


def outputs_state(work, left_out):
    """Every file under WORK as (inode, size, mtime): any write, in place or by rename, changes it;
    lock files, and `left_out` (the damaged path, and what is under it), aside."""
    return {p: (st.st_ino, st.st_size, st.st_mtime_ns) for d, _, files in os.walk(work) for f in files
            if not f.startswith(".lock-") and not (p := os.path.join(d, f)).startswith(left_out)
            for st in [os.stat(p)]}


def damaged_state_file(path, how, inconsistent):
    """The state file at PATH as a user, a killed run or a stray copy may leave it."""
    with open(path, "rb") as f:
        raw = f.read()
    os.remove(path)
    named = path
    if how == "directory":
        os.mkdir(path)
    elif how == "dangling symlink":
        os.symlink(path + ".gone", path)
    elif how == "looping symlink":
        os.symlink(os.path.basename(path), path)
    elif how in ("empty", "wrong types", "inconsistent"):
        if path.endswith(".pt"):  # resume.pt: a checkpoint of the right keys, of the wrong types or for another fold
            obj = torch.load(io.BytesIO(raw), weights_only=False) if raw else {}
        else:
            obj = json.loads(raw) if raw else {}
        if how == "wrong types":
            obj = {k: "x" if not isinstance(v, str) else 5 for k, v in obj.items()}
        elif how == "inconsistent":
            inconsistent(obj)
            if "records" in path:  # a record at odds with its first file: what the error names is that file
                named = next(iter(obj["files"]))
        with open(path, "wb") as f:
            if how == "empty":
                pass
            elif path.endswith(".pt"):
                torch.save(obj, f)
            else:
                f.write(json.dumps(obj).encode())
    return raw, named


def other_digest(obj):  # a record whose first file's digest is another file's
    obj["files"][next(iter(obj["files"]))] = "0" * 64


@pytest.fixture(scope="session")
def resume_args(demo):
    return ["--arch", "convnext_atto", "--data", demo, "--fold", "0", "--resume"] + tiny_train(1)


def matrix_work(demo, reported, tmp_path, resume_args):
    """A copy of the reported work folder, with fold 0 of convnext_atto interrupted: its .partial
    holds the args.json of the resume command and a resume.pt (another fold's, made by hand)."""
    work = copy_work(reported, tmp_path / "work")
    partial = os.path.join(work, "models", "convnext_atto", "fold0.partial")
    args = train_backbone.build_parser().parse_args(resume_args + ["--work", work])
    common.write_args(os.path.join(partial, "args.json"), args)
    torch.save({"arch": "convnext_atto", "fold": 0, "settings": train_backbone.weight_settings(args),
                "lesions": common.lesions_digest(work), "epoch": 0, "best": 0.1, "step": 3, "val_pauc": 0.1,
                "model": {}, "optimizer": {}, "scaler": {}}, os.path.join(partial, "resume.pt"))
    return work


DAMAGES = ("missing", "empty", "directory", "dangling symlink", "looping symlink", "wrong types", "inconsistent")
# each state file, the stage that reads it and its arguments, how it is made inconsistent, the damages to try
STATE_FILES = [
    ("records/features.json", gbdt, ["--name", "dm", "--rounds", "2", "--bags", "1"], other_digest, DAMAGES),
    ("records/tab.json", ensemble, ["--names", "tab"], other_digest, DAMAGES),
    ("records/img_convnext_atto.json", gbdt, ["--name", "dm", "--image", "convnext_atto"], other_digest, DAMAGES),
    ("records/ensemble.json", report, [], other_digest, DAMAGES),
    ("models/tab/manifest.json", gbdt, ["--name", "tab", "--predict-only"],
     lambda m: m["boosters"].append("fold9_bag0.txt"), DAMAGES),
    ("models/tab/manifest.json", gbdt, ["--name", "tab", "--predict-only"], lambda m: m.update(boosters=[]),
     ("inconsistent",)),
    ("models/convnext_atto/fold0/manifest.json", extract, ["--arch", "convnext_atto", "--predict-only", "--workers",
                                                           "0"], lambda m: m.update(fold=3), DAMAGES),
    ("models/convnext_atto/scores.json", extract, ["--arch", "convnext_atto", "--predict-only", "--workers", "0"],
     lambda s: s["logit_stats"].pop("0"), DAMAGES),
    ("models/ensemble.json", ensemble, ["--predict-only"], lambda e: e["weights"].pop(), DAMAGES),
    ("models/ensemble.json", report, [], lambda e: e["members"].pop("tab"), DAMAGES),
    ("models/features.json", features, ["--predict-only"], lambda f: f["columns"].pop(), DAMAGES),
    ("models/convnext_atto/fold0/args.json", train_backbone, "resume",
     lambda a: a["args"].update(lr=0.1), DAMAGES),
    ("models/convnext_atto/fold0.partial/args.json", train_backbone, "resume",
     lambda a: a["args"].update(lr=0.1), DAMAGES),
    ("models/convnext_atto/fold0.partial/resume.pt", train_backbone, "resume", lambda c: c.update(fold=3),
     DAMAGES[1:]),  # with no resume.pt the fold starts afresh
    (".lock-gbdt-dm", gbdt, ["--name", "dm"], None, ("directory", "dangling symlink", "looping symlink")),
    (".lock-features", gbdt, ["--name", "dm"], None, ("directory", "dangling symlink", "looping symlink")),
]


@slow
@pytest.mark.parametrize("name, stage, args, inconsistent, damages", STATE_FILES,
                         ids=[f"{f[0]}-{f[1].__name__}" for f in STATE_FILES])
def test_damage_matrix_of_state_files(demo, reported, resume_args, tmp_path, capsys, name, stage, args, inconsistent,
                                      damages):
    """Every state file a stage reads, in turn missing, empty, a directory, a dangling symlink, of
    the wrong types, or with lists that disagree: exit 2, one error line naming it, no traceback,
    and every earlier output as it was."""
    work = matrix_work(demo, reported, tmp_path, resume_args)
    args = resume_args if args == "resume" else args + ["--data", demo] * (stage in (extract, features))
    path = os.path.join(work, name)
    if name.endswith("args.json") and "partial" not in name:  # the committed fold, with no resume state
        shutil.rmtree(os.path.dirname(path) + ".partial")
    if not os.path.lexists(path):  # a lock file that no run has made yet
        open(path, "w").close()
    for how in damages:
        before = outputs_state(work, path)
        raw, named = damaged_state_file(path, how, inconsistent)
        err = one_error_line(stage_error(capsys, stage.main, args + ["--work", work]))
        named = os.path.join(work, named)
        assert f"error: {named}: " in err or f"error: {os.path.dirname(named)}: " in err, (how, err)
        assert outputs_state(work, path) == before, how
        if os.path.lexists(path):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        with open(path, "wb") as f:
            f.write(raw)


@slow
@pytest.mark.parametrize("odd", ["preds/tab_test.csv as a folder", "records/tab.json as a folder", "preds as a file",
                                 "models/tab as a dangling symlink", "models/tab.old as a file"])
def test_an_output_that_cannot_be_replaced_is_named_before_any_work(reported, tmp_path, capsys, odd):
    """A folder where gbdt.py's predictions or record go, a file where a folder goes, a dangling
    symlink in the place of the model: one line naming the path, and the model in place."""
    work = copy_work(reported, tmp_path / "work")
    name, kind = odd.split(" as a ")
    path = os.path.join(work, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.path.lexists(path) and os.remove(path)
    if kind == "folder":
        os.mkdir(path)
    elif kind == "file":
        open(path, "w").close()
    else:
        os.symlink(path + ".gone", path)
    before = outputs_state(work, path)
    err = one_error_line(stage_error(capsys, gbdt.main, ["--work", work, "--name", "tab", "--rounds", "2"]))
    assert err.startswith(f"error: {path}: ") and "remove it" in err, err
    assert outputs_state(work, path) == before


@slow
def test_a_symlinked_model_folder_is_replaced_and_what_it_points_to_left_alone(reported, tmp_path):
    """models/tab as a symlink to a folder elsewhere (a shared copy): retraining puts a real folder
    in its place, the folder it pointed to stays as it was, and later runs go on as usual."""
    work = copy_work(reported, tmp_path / "work")
    elsewhere = copy_work(os.path.join(work, "models", "tab"), tmp_path / "shared_tab")
    shutil.rmtree(os.path.join(work, "models", "tab"))
    os.symlink(elsewhere, os.path.join(work, "models", "tab"))
    kept = tree_digest(elsewhere)
    for _ in range(2):
        gbdt.main(["--work", work, "--name", "tab", "--rounds", "2", "--bags", "1"])
        assert not os.path.islink(os.path.join(work, "models", "tab"))
        assert sorted(os.listdir(os.path.join(work, "models"))) == sorted(os.listdir(os.path.join(reported, "models")))
    assert tree_digest(elsewhere) == kept
    ensemble.main(["--work", work, "--names", "tab"])


@slow
@pytest.mark.parametrize("case, match", [
    ("--min-leaf above the rows", "tab fold 0: every prediction is .*: the boosters learned nothing"),
    ("every negative Indeterminate", "every negative is Indeterminate, and --indeterminate-weight 0 gives them no "
                                     "weight")])
def test_a_gbdt_that_would_predict_one_value_is_refused_and_the_old_one_kept(reported, tmp_path, capsys, case, match):
    work = copy_work(reported, tmp_path / "work")
    args = ["--work", work, "--name", "tab", "--rounds", "2", "--bags", "1"]
    if case.startswith("--min-leaf"):
        args += ["--min-leaf", "100000"]
    else:
        rewrite_csv(os.path.join(work, "train_diagnosis.csv"),
                    lambda rows: rows[:1] + [[r[0], "Indeterminate"] for r in rows[1:]])
        rerecord(work, "features")
    before = outputs_state(work, os.path.join(work, "records", "features.json"))
    err = one_error_line(stage_error(capsys, gbdt.main, args))
    assert re.search(match, err), err
    assert outputs_state(work, os.path.join(work, "records", "features.json")) == before
    assert not os.path.exists(os.path.join(work, "models", "tab.partial"))


@slow
@pytest.mark.parametrize("labels, match", [("one class", "the test lesions hold only lesions of target 0: a score "
                                                         "on test needs malignant and benign lesions"),
                                           ("not 0 or 1", "target is 2, not 0 or 1")])
def test_test_labels_that_cannot_score_are_one_error_line(demo, reported, tmp_path, capsys, labels, match):
    path = str(tmp_path / "labels.csv")
    shutil.copy(os.path.join(demo, "demo_test_labels.csv"), path)
    rewrite_csv(path, lambda rows: rows[:1] + [[r[0], "2" if labels == "not 0 or 1" and i == 3 else "0"]
                                               for i, r in enumerate(rows[1:])])
    work = copy_work(reported, tmp_path / "work")
    before = outputs_state(work, path)
    err = one_error_line(stage_error(capsys, report.main, ["--work", work, "--data", demo, "--test-labels", path]))
    assert err.startswith(f"error: {path}: ") and match in err, err
    assert outputs_state(work, path) == before


@slow
def test_reasons_that_fail_in_a_submission_run_cost_the_reasons_not_the_submission(reported, tmp_path, capsys,
                                                                                   monkeypatch):
    work = copy_work(reported, tmp_path / "work")
    with open(os.path.join(work, "submission.csv"), "rb") as f:
        submission = f.read()

    def fail(*args):
        raise MemoryError("out of memory")
    monkeypatch.setattr(ensemble, "explain", fail)
    ensemble.main(["--work", work, "--predict-only"])
    assert "warning: triage.csv without reasons: MemoryError: out of memory\n" in capsys.readouterr().out
    with open(os.path.join(work, "submission.csv"), "rb") as f:
        assert f.read() == submission
    assert {r for n in reasons.REASONS for r in common.read_csv(os.path.join(work, "triage.csv"))[n]} == {""}
    with pytest.raises(MemoryError):  # in training, a failure is a failure
        ensemble.main(["--work", work])


@slow
def test_report_html_shows_every_model_and_the_lesions(demo, reported):
    work = reported
    page = open(os.path.join(work, "report.html"), encoding="utf-8").read()
    assert not any(s in page for s in ("<script", "<link", "href=")), "self-contained: nothing fetched"
    assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)|url\((?!#)", page)  # but the SVG namespace
    assert re.findall(r'src="([^"]{0,15})', page) and all(s == "data:image/jpeg" for s in re.findall(r'src="([^";]*)',
                                                                                                       page))
    report_page = ReportParser()
    report_page.feed(page)
    # a whole ROC curve per model, from (0, 0), the frame's bottom left, to (1, 1), its top right
    frame = next(r for r in report_page.rects["roc"] if r.get("class") == "frame")
    x, y, w, h = (float(frame[k]) for k in ("x", "y", "width", "height"))
    for name in ("tab", "tab_cnx", "ensemble"):
        points = report_page.lines["roc"][name]
        assert points[0] == pytest.approx((x, y + h), abs=0.06) and points[-1] == pytest.approx((x + w, y), abs=0.06)
        assert len(points) >= 3 and name in report_page.lines["roc-zoom"]
    # the shaded region is TPR 0.8 to 1: the top fifth of the frame
    band = next(r for r in report_page.rects["roc"] if r.get("class") == "band")
    assert float(band["y"]) == pytest.approx(y, abs=0.06) and float(band["height"]) == pytest.approx(h / 5, abs=0.1)
    # the tables hold report.md's, cell for cell: per model and fold, every combination, triage
    md = [line.strip().strip("|").split("|") for line in open(os.path.join(work, "report.md")) if line.startswith("| ")]
    assert report_page.rows == [[c.strip() for c in row] for row in md]
    assert [row[0] for row in report_page.rows[1:5]] == ["tab", "tab_cnx", "img_convnext_atto", "ensemble"]
    assert [row[0] for row in report_page.rows[6:9]] == ["tab", "tab_cnx", "tab + tab_cnx"]  # every combination
    # each GBDT's most important feature labels a bar
    for name in ("tab", "tab_cnx"):
        top = common.read_csv(os.path.join(work, "models", name, "importance.csv"), ["feature"])["feature"][0]
        assert top in report_page.text[f"importance-{name}"]
    # the image model's validation pAUC, a line per fold, a point per logged epoch
    curves = report_page.lines["curve-convnext_atto-val_pauc"]
    assert sorted(curves) == [f"fold {k}" for k in range(5)]
    for k in range(5):
        assert len(curves[f"fold {k}"]) == len(read_log(os.path.join(work, "models", "convnext_atto", f"fold{k}",
                                                                      "log.csv")))
    # the misses are the malignant lesions the ensemble ranked lowest, shown as their stored JPEG bytes
    train = common.read_lesions(work, "train")
    oof = common.read_preds(work, "ensemble", "train", train["isic_id"])
    malignant = np.flatnonzero(train["target"] == 1)
    lowest = train["isic_id"][malignant[np.argsort(oof[malignant], kind="stable")[:12]]]
    shown = re.search(r"Misses:.*?</div>", page, re.S).group(0)
    assert re.findall(r'alt="([^"]+)"', shown) == list(lowest)
    with h5py.File(os.path.join(demo, "train-image.hdf5"), "r") as h5:
        raw = h5[lowest[0]][()]
    assert base64.b64encode(raw).decode() in shown
    assert "False alarms" in page and len(re.findall("<img ", page)) <= report.MAX_TILES
    # beside each tile its reasons from triage_oof.csv; the table counts the malignant lesions' first reasons
    why = common.read_csv(os.path.join(work, "triage_oof.csv"), ["isic_id"] + reasons.REASONS)
    cards = re.findall(r'alt="([^"]+)"[^>]*><figcaption>(.*?)</figcaption>', shown)
    assert len(cards) == 12 and any("<li>" in c for _, c in cards)
    for isic_id, caption in cards:
        i = list(why["isic_id"]).index(isic_id)
        assert [html_unescape(r) for r in re.findall(r"<li>(.*?)</li>", caption)] == \
            [why[r][i] for r in reasons.REASONS if why[r][i]]
    table = report_page.rows[report_page.rows.index(["concept", "first reason", "among the three"]) + 1:]
    first = [r.partition(":")[0] for r in why["reason_1"][train["target"] == 1]]
    assert all(first) and all(why[r][train["target"] == 1].all() for r in reasons.REASONS)  # every malignant one
    concept, count = table[0][:2]
    assert int(count) == first.count(concept) == max(map(first.count, set(first) - {""}))


@slow
def test_triage_csv_ranks_each_patients_test_lesions(reported):
    test = common.read_lesions(reported, "test")
    triage = common.read_csv(os.path.join(reported, "triage.csv"), ["isic_id", "patient_id", "score", "rank_in_patient"],
                             ["score", "rank_in_patient"])
    assert triage["isic_id"].tolist() == test["isic_id"].tolist()
    assert triage["patient_id"].tolist() == test["patient_id"].tolist()
    np.testing.assert_array_equal(triage["score"], common.read_preds(reported, "ensemble", "test", test["isic_id"]))
    for p in np.unique(test["patient_id"]):
        rows = np.flatnonzero(test["patient_id"] == p)
        order = sorted(rows, key=lambda i: (-triage["score"][i], i))
        assert [int(triage["rank_in_patient"][i]) for i in order] == list(range(1, len(rows) + 1))
    # three reasons, "concept: phrase", for each patient's top 15 and none beyond
    why = common.read_csv(os.path.join(reported, "triage.csv"), reasons.REASONS)
    top = triage["rank_in_patient"] <= 15
    assert not any(why[r][~top].any() for r in reasons.REASONS) and all(why[r][top].all() for r in reasons.REASONS)
    assert all(re.fullmatch(r"[^:]+: .+", r) for c in reasons.REASONS for r in why[c][top])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(page, profile, *args):
    """Headless Chromium on a local page, the network off (every request goes to a closed proxy)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           "--proxy-server=127.0.0.1:9", f"--user-data-dir={profile}", "--window-size=1300,4000",
           "--virtual-time-budget=10000", *args, f"file://{page}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@slow
def test_report_in_a_real_browser(reported, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the browser check did not run")
    page = open(os.path.join(reported, "report.html"), encoding="utf-8").read()
    probe = """<script>addEventListener("load", () => {
      const r = document.getElementById("roc").getBoundingClientRect(), images = [...document.images];
      const out = document.createElement("pre"); out.id = "probe";
      out.textContent = JSON.stringify({images: images.length, roc: [r.left, r.top, r.width, r.height],
        broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)});
      document.body.appendChild(out); });</script></body>"""
    probed = tmp_path / "probed.html"  # a copy that reports what the browser shows; the report has no scripts
    probed.write_text(page.replace("</body>", probe), encoding="utf-8")
    r = run_chromium(probed, tmp_path / "profile", "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert found, r.stderr[-2000:]
    import json
    seen = json.loads(html_unescape(found.group(1)))
    assert seen["images"] == len(re.findall("<img ", page)) > 0 and seen["broken"] == []
    shot = tmp_path / "report.png"
    r = run_chromium(os.path.join(reported, "report.html"), tmp_path / "profile2", f"--screenshot={shot}")
    assert shot.exists(), r.stderr[-2000:]
    left, top, width, height = (int(v) for v in seen["roc"])
    chart = np.asarray(Image.open(shot).convert("RGB"))[top:top + height, left:left + width]
    assert chart.shape[0] > 100 and chart.shape[1] > 100
    inked = (chart < 200).any(axis=2).mean()       # lines, text, the frame: not a blank area
    colours = len(np.unique(chart.reshape(-1, 3) // 32, axis=0))
    assert inked > 0.02 and colours >= 6, (inked, colours)


# ---------------------------------------------------------------- the whole pipeline

@slow
def test_tabular_chain_end_to_end_where_torch_is_not_installed(demo, tmp_path):
    """features.py, gbdt.py, ensemble.py and report.py, each run as a script where `import torch`
    fails: the tabular pipeline needs no torch."""
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    work = str(tmp_path / "work")
    labels = os.path.join(demo, "demo_test_labels.csv")
    for script, args in (("features.py", ["--data", demo]), ("gbdt.py", ["--name", "tabular", "--rounds", "40",
                                                                          "--bags", "2"]),
                         ("ensemble.py", []), ("report.py", ["--data", demo, "--test-labels", labels])):
        r = subprocess.run([sys.executable, script, "--work", work] + args, cwd=HERE, capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, (script, r.stderr[-2000:])
    r = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert "No module named 'torch'" in r.stderr  # the blocker blocks
    test_ids = common.read_test(demo)["isic_id"].tolist()
    answers = common.read_csv(labels, ["isic_id", "target"], ["target"])
    test_pred = common.read_preds(work, "tabular", "test", test_ids)
    tabular_row = next(line for line in open(os.path.join(work, "report.md")) if line.startswith("| tabular |"))
    assert tabular_row.strip().endswith(f"| {common.pauc(answers['target'], test_pred):.4f} |")
    with open(os.path.join(work, "submission.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["isic_id", "target"]
    assert [r[0] for r in rows[1:]] == test_ids
    assert all(np.isfinite(float(r[1])) for r in rows[1:])
    folds = common.read_lesions(work, "train")
    assert folds["isic_id"].tolist() == common.read_train(demo)["isic_id"].tolist()
    oof = common.read_preds(work, "tabular", "train", folds["isic_id"])
    assert common.pauc(folds["target"], oof) > 0.05    # far above chance (about 0.02)
    assert os.path.exists(os.path.join(work, "models", "tabular", "fold4_bag1.txt"))


@slow
@pytest.mark.parametrize("case, match", [
    ("missing_file", "train-metadata.csv: file not found"),
    ("missing_column", "missing required column.*tbp_lv_areaMM2"),
    ("duplicate_id", "duplicated isic_id ISIC_1000003"),
    ("not_a_number", "line 5, column tbp_lv_L: 'dark' is not a number"),
    ("ragged_row", "line 3 has 54 fields, the header has 55"),
])
def test_bad_metadata_gives_clear_error_and_writes_nothing(demo, tmp_path, case, match):
    data = copy_demo(demo, tmp_path / "data")
    path = os.path.join(data, "train-metadata.csv")
    if case == "missing_file":
        os.remove(path)
    elif case == "missing_column":
        rewrite_csv(path, lambda rows: [r[:19] + r[20:] for r in rows])
    elif case == "duplicate_id":
        rewrite_csv(path, lambda rows: rows[:5] + [rows[4]] + rows[5:])
    elif case == "not_a_number":
        rewrite_csv(path, lambda rows: rows[:4] + [rows[4][:17] + ["dark"] + rows[4][18:]] + rows[5:])
    elif case == "ragged_row":
        rewrite_csv(path, lambda rows: rows[:2] + [rows[2][:-1]] + rows[3:])
    with pytest.raises(common.DataError, match=match):
        common.read_train(data)
    work = str(tmp_path / "work")
    r = run_script("features.py", ["--data", data, "--work", work])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert not os.path.exists(os.path.join(work, "features"))


@slow
def test_missing_data_dir_says_how_to_pass_it(tmp_path):
    r = run_script("features.py", ["--work", str(tmp_path)])
    assert r.returncode == 2 and "--data" in r.stderr and "python demo.py" in r.stderr


@slow
def test_broken_images_skipped_in_training_and_scored_without_image(demo, trained, tmp_path, capsys):
    data = copy_demo(demo, tmp_path / "data")
    train, test = common.read_lesions(trained, "train"), common.read_lesions(trained, "test")
    bad_train = train["isic_id"][np.flatnonzero(train["target"] == 1)[0]]   # a positive: in every epoch
    bad_test = test["isic_id"][3]
    corrupt_image(os.path.join(data, "train-image.hdf5"), bad_train, b"\xff\xd8\xff truncated")
    corrupt_image(os.path.join(data, "test-image.hdf5"), bad_test, b"")
    work = copy_work(trained, tmp_path / "work")
    fold = (int(train["fold"][list(train["isic_id"]).index(bad_train)]) + 1) % 5
    capsys.readouterr()
    train_backbone.main(["--arch", "convnext_atto", "--fold", str(fold), "--data", data, "--work", work]
                        + tiny_train(1))
    assert capsys.readouterr().out.count("warning: 1 training image(s) cannot be decoded (skipped): " + bad_train) == 1
    extract.main(["--arch", "convnext_atto", "--data", data, "--work", work, "--workers", "0"])
    out, err = capsys.readouterr()
    warnings = [line for line in (out + err).splitlines() if "warning" in line]
    assert len(warnings) == 2 and bad_train in warnings[0] and bad_test in warnings[1], warnings
    emb = common.load_array(os.path.join(work, "emb", "convnext_atto_test.npy"), test["isic_id"])
    assert np.isnan(emb[3]).all() and not np.isnan(emb[[0, 1, 2, 4]]).any()
    gbdt.main(["--work", work, "--name", "t", "--image", "convnext_atto", "--rounds", "10", "--bags", "1"])
    ensemble.main(["--work", work, "--names", "t"])
    sub = common.read_csv(os.path.join(work, "submission.csv"), ["isic_id", "target"], ["target"])
    assert sub["isic_id"].tolist() == test["isic_id"].tolist() and np.isfinite(sub["target"]).all()


@slow
def test_edge_cases_zero_test_rows_and_all_missing_column(demo, tmp_path):
    data = copy_demo(demo, tmp_path / "data")
    rewrite_csv(os.path.join(data, "test-metadata.csv"), lambda rows: rows[:1])
    col = common.TRAIN_COLUMNS.index("tbp_lv_nevi_confidence")
    rewrite_csv(os.path.join(data, "train-metadata.csv"),
                lambda rows: rows[:1] + [r[:col] + [""] + r[col + 1:] for r in rows[1:]])
    work = str(tmp_path / "work")
    features.main(["--data", data, "--work", work])
    gbdt.main(["--work", work, "--rounds", "10", "--bags", "1"])
    ensemble.main(["--work", work])
    with open(os.path.join(work, "submission.csv")) as f:
        assert f.read() == "isic_id,target\n"


@slow
def test_same_seed_gives_byte_identical_outputs(demo, tmp_path):
    outs = []
    for name in ("a", "b"):
        work = str(tmp_path / name)
        features.main(["--data", demo, "--work", work])
        gbdt.main(["--work", work, "--rounds", "20", "--bags", "2"])
        ensemble.main(["--work", work])
        outs.append([open(os.path.join(work, f), "rb").read() for f in
                     ("folds.csv", "features/train.npy", "features/test.npy", "preds/tabular_oof.csv",
                      "preds/tabular_test.csv", "submission.csv")])
    assert outs[0] == outs[1]


@slow
def test_run_sh_takes_relative_paths_with_spaces_from_anywhere(demo, tmp_path):
    """run.sh called from another folder, with relative DATA and WORK and a WEIGHTS_DIR holding
    spaces: every path is resolved where it was given, and quoted."""
    copy_demo(demo, tmp_path / "my data")
    train_backbone.save_weights("convnext_atto", str(tmp_path / "my weights"), pretrained=False)
    run = subprocess.run(["bash", os.path.join(HERE, "run.sh"), "my data"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "WORK": "my work", "WEIGHTS_DIR": "my weights", "NGPU": "1",
                                         "ARCHS": "convnext_atto", "TRAIN": "convnext_atto:0", "FINISH": "0",
                                         "PYTHON": sys.executable,
                                         "TRAIN_ARGS": "--epochs 1 --neg-per-pos 3 --batch-size 16 --workers 0"})
    assert run.returncode == 0, run.stderr[-2000:]
    fold = tmp_path / "my work" / "models" / "convnext_atto" / "fold0"
    with open(fold / "args.json") as f:
        assert json.load(f)["args"]["weights"] == str(tmp_path / "my weights" / "convnext_atto.safetensors")
    assert not os.path.exists(os.path.join(HERE, "my work"))


def read_only_kernel(folder, tmp, monkeypatch):
    """The name of a kernel spec (under tmp, put on JUPYTER_PATH) whose kernel, and everything it
    starts, sees `folder` mounted read-only, as Kaggle mounts its inputs; None where this machine
    cannot make a private mount (no `unshare -m`)."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && "
                            f"mount -o remount,bind,ro {folder} {folder} && ! touch {folder}/.probe"],
                           capture_output=True)
    if probe.returncode:
        return None
    spec = os.path.join(tmp, "kernels", "read_only_input")
    os.makedirs(spec, exist_ok=True)
    command = (f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} {folder} && '
               f'exec {sys.executable} -m ipykernel_launcher -f "$0"')
    with open(os.path.join(spec, "kernel.json"), "w") as f:
        json.dump({"argv": ["unshare", "-m", "sh", "-c", command, "{connection_file}"], "language": "python",
                   "display_name": "Python 3, read-only input"}, f)
    monkeypatch.setenv("JUPYTER_PATH", tmp)
    return "read_only_input"


def test_run_sh_predict_only_without_a_models_folder_is_one_error_line(tmp_path):
    """No path, or one that is not a folder: one line that says what --predict-only needs, before
    any stage runs and without making the mistyped folder."""
    for args in ([], [str(tmp_path / "modles")]):
        r = subprocess.run(["bash", os.path.join(HERE, "run.sh"), "--predict-only"] + args, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.strip() == ("error: --predict-only needs the trained models' folder (a training run's "
                                    f"WORK/models), not '{''.join(args)}'")
    assert os.listdir(tmp_path) == []


def run_notebook(path, cwd, kernel_name="python3", **overrides):
    """Executes a generated notebook top to bottom in a real IPython kernel, as Kaggle's "Save & Run
    All" does, with `overrides` set after its settings cell (as papermill injects them)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert at == 2  # the start time, then the settings
    nb.cells[at].source += "".join(f"\n{k} = {v!r}" for k, v in overrides.items())
    os.makedirs(cwd, exist_ok=True)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel_name, resources={"metadata": {"path": cwd}})
    try:
        client.execute()
    finally:  # what the cells printed, for the message of a failing test
        text = "".join(o.get("text", "") + "".join(o.get("traceback", [])) for c in nb.cells if c.cell_type == "code"
                       for o in c.outputs)
    return text


def kaggle_inputs(root, layout, data_src=None, archs=("eva02_base", "convnext"), models=None):
    """A folder standing in for /kaggle/input, in the 2026 layout (competitions/SLUG,
    datasets/OWNER/SLUG) or the older one (SLUG): the competition's files, the weights, and the
    models dataset (whose folder holds MODELS where given, as a dataset made from a whole output would)."""
    comp, ds = (("competitions", "isic-2024-challenge"), ("datasets", "me")) if layout == "2026" else \
        (("isic-2024-challenge",), ())
    data = os.path.join(root, *comp)
    os.makedirs(data)
    for name in common.DATA_FILES:
        if data_src:
            shutil.copyfile(os.path.join(data_src, name), os.path.join(data, name))
        else:
            open(os.path.join(data, name), "w").close()
    weights = os.path.join(root, *ds, "isic-2024-weights")
    os.makedirs(weights)
    for a in archs:
        open(os.path.join(weights, f"{a}.safetensors"), "w").close()
    dataset = os.path.join(root, *ds, "isic-2024-models")
    if models:
        shutil.copytree(models[0], os.path.join(dataset, models[1]))
    return data, weights, dataset


def tree_digest(root):
    return {os.path.relpath(os.path.join(d, f), root): common.file_digest(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


def test_kaggle_inputs_are_found_by_what_they_hold_in_either_layout(demo, tmp_path, capsys, monkeypatch):
    """The competition's files, the weights and a models folder (made from a whole output, so one
    level deeper), in Kaggle's 2026 layout and in the older one; nothing found, two found, an empty
    or a partial models dataset: one error line that says what was searched for and where."""
    models = tmp_path / "run1" / "work" / "models"
    (models / "convnext" / "fold0").mkdir(parents=True)
    for name in ("features.json", "folds.csv"):
        (models / name).write_text("{}")
    (models / "convnext" / "fold0" / "manifest.json").write_text("{}")
    for layout in ("2026", "old"):
        root = str(tmp_path / layout)
        data, weights, dataset = kaggle_inputs(root, layout, demo, models=(str(tmp_path / "run1"), "output"))
        assert common.find_input(root, "data", common.holds_data) == data
        assert notebooks.find_weights(root, ["eva02_base", "convnext"]) == weights
        assert notebooks.find_models(root) == os.path.join(dataset, "output", "work", "models")
    # a stage without --data finds the competition's files on its own (here under the 2026 layout)
    monkeypatch.setattr(common, "KAGGLE_INPUT", str(tmp_path / "2026"))
    features.main(["--work", str(tmp_path / "w")])
    assert "found the competition's files" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "w" / "folds.csv")
    errors = {"nothing": (str(tmp_path / "empty_input"), lambda r: notebooks.find_weights(r, ["eva02_base"])),
              "two": (str(tmp_path), lambda r: common.find_input(r, "the data", common.holds_data))}
    os.makedirs(errors["nothing"][0])
    for what, (root, find) in errors.items():
        err = one_error_line(stage_error(capsys, find, root))
        assert root in err and ("eva02_base.safetensors" in err if what == "nothing" else
                                "2 folders" in err and "2026/competitions" in err and "old/isic-2024" in err), err
    shutil.rmtree(os.path.join(models, "convnext"))  # made without its subfolders
    root = str(tmp_path / "partial")
    kaggle_inputs(root, "2026", models=(str(models), "."))
    err = one_error_line(stage_error(capsys, notebooks.find_models, root))
    assert "features.json without the fold models" in err and "--dir-mode" in err
    root = str(tmp_path / "loose")
    os.makedirs(os.path.join(root, "ds", "fold3"))
    open(os.path.join(root, "ds", "fold3", "manifest.json"), "w").close()
    err = one_error_line(stage_error(capsys, notebooks.find_models, root))
    assert "ds/fold3: a fold model without its models folder" in err
    assert notebooks.find_models(str(tmp_path / "empty_input")) is None  # a first run
    other = tmp_path / "other" / "models"  # a fold model trained on other folds than the folds.csv beside it
    (other / "convnext" / "fold0.partial").mkdir(parents=True)
    (other / "convnext" / "fold0.partial" / "last.pt").write_bytes(b"weights")
    common.commit_folder(str(other / "convnext" / "fold0.partial"), str(other / "convnext" / "fold0"),
                         {"lesions": "0" * 64})  # the digest of another folds.csv
    (other / "folds.csv").write_text("isic_id,patient_id,target,fold\n")
    (other / "features.json").write_text("{}")
    err = one_error_line(stage_error(capsys, lambda a: notebooks.copy_models_in(*a), (str(other), str(tmp_path))))
    assert "convnext/fold0: made with another folds.csv" in err
    assert not os.path.exists(tmp_path / "models")  # nothing copied


def test_the_projected_notebook_runs_start_no_fold_past_the_budget():
    """bench.notebook_runs, hand-worked with the defaults (11 h budget, 3 h kept for the finishing
    stages of a 12 h run): 2.5 h folds, four to a run; then the rest and the finishing stages."""
    folds = [("eva02_base", k, 2.5) for k in range(5)] + [("convnext", k, 0.1) for k in range(5)]
    runs = bench.notebook_runs(folds, 2.0)
    assert [w for w, _ in runs] == ["eva02_base folds 0,1,2,3",
                                    "eva02_base folds 4, convnext folds 0,1,2,3,4, finishing stages"]
    assert np.allclose([h for _, h in runs], [10.0, 2.5 + 0.5 + 2.0])
    # 8.5 h of folds leave 3.5 h: the finishing stages in the same run; 9.5 h leave 2.5: a run of their own
    assert [w for w, _ in bench.notebook_runs([("a", 0, 8.5)], 2.0)] == ["a folds 0, finishing stages"]
    assert [w for w, _ in bench.notebook_runs([("a", 0, 9.5)], 2.0)] == ["a folds 0", "finishing stages"]


@slow
def test_the_training_notebook_runs_until_done_with_the_submission_of_one_uninterrupted_run(tmp_path, monkeypatch):
    """The demo training notebook in a real kernel, run after run on 3 folds with no time to spare
    (each run trains one fold: its first epoch, unmeasured, is the one it may start), each reading
    the previous run's models through a models dataset in the 2026 layout, left unchanged; its
    submission is byte for byte that of one uninterrupted run. (The submission notebook reproduces
    a training run's submission: test_predict_only_from_read_only_models_gives_the_same_submission;
    it runs in a kernel in test_a_hidden_test_set_with_odd_and_broken_lesions_gets_a_full_submission.)"""
    notebooks.main([str(tmp_path / "nb"), "--demo"])
    train_nb = str(tmp_path / "nb" / "train" / "isic-2024-demo-train.ipynb")
    settings = dict(ARCHS="convnext_atto", FINISH_HOURS=0.0,
                    EXTRA=dict(notebooks.DEMO_EXTRA, FEATURES_ARGS="--folds 3"))
    # a small demo set placed in each working folder (it stands in for the competition's input, and
    # run.sh makes none where one is): made once here rather than by every run
    demo = str(tmp_path / "demo_data")
    make_demo(demo, n_patients=24, n_test_patients=6, malignant_rate=0.08, seed=1)
    straight = tmp_path / "straight"
    shutil.copytree(demo, straight / "demo_data")
    out = run_notebook(train_nb, str(straight), INPUT=str(tmp_path / "no_input"), **settings)
    assert "found no models dataset: a first run" in out and "done: every fold model" in out
    root = str(tmp_path / "input")
    dataset = os.path.join(root, "datasets", "me", "isic-2024-models")
    os.makedirs(dataset)
    read_only = read_only_kernel(root, str(tmp_path / "jupyter"), monkeypatch) or "python3"  # else the digests below
    outputs = []
    for run in range(1, 4):
        kernel = tmp_path / f"run{run}"  # each run starts in a fresh working folder, as on Kaggle
        shutil.copytree(demo, kernel / "demo_data")
        before = tree_digest(root)
        out = run_notebook(train_nb, str(kernel), read_only, INPUT=root, BUDGET_HOURS=0.0, **settings)
        assert tree_digest(root) == before  # the input is read, never written
        found = f"found {run - 1} of 3 fold models in {dataset}" if run > 1 else "found no models dataset"
        assert found in out, out[-3000:]
        outputs.append(out)
        shutil.rmtree(dataset)  # the models folder becomes the dataset's new version
        shutil.copytree(kernel / "work" / "models", dataset)
    assert "1 of 3 fold models are in" in outputs[0] and "convnext_atto fold 2: not started" in outputs[1]
    assert "train_backbone.py --arch convnext_atto --fold 1,2 " in outputs[1] and "--resume --deadline" in outputs[1]
    assert "kaggle datasets version -p out/work/models --dir-mode tar" in outputs[1]
    assert "done: every fold model" in outputs[2]
    with open(os.path.join(dataset, "dataset-metadata.json")) as f:
        assert json.load(f)["id"] == "YOUR-KAGGLE-NAME/isic-2024-models"
    assert file_bytes(tmp_path / "run3" / "work" / "submission.csv") == file_bytes(straight / "work" / "submission.csv")
    submit_nb = str(tmp_path / "nb" / "submit" / "isic-2024-demo-submit.ipynb")
    kernel = tmp_path / "submit"
    (kernel / "submission.csv").parent.mkdir()
    (kernel / "submission.csv").write_text("a stale submission")
    meta = json.load(open(tmp_path / "nb" / "submit" / "kernel-metadata.json"))
    assert meta["id"] == "YOUR-KAGGLE-NAME/isic-2024-demo-submit" and meta["dataset_sources"] == []
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["enable_internet"] is False
    assert meta["competition_sources"] == []  # a demo push adds no version to the real kernels
    # a stage that fails stops the notebook with its error, and no stale submission is left behind
    with pytest.raises(nbclient.exceptions.CellExecutionError) as e:
        run_notebook(submit_nb, str(kernel), MODELS="no_such_models", ARCHS="convnext_atto")
    assert "failed (exit status 2)" in str(e.value)
    assert not os.path.exists(kernel / "submission.csv")


@slow
def test_a_hidden_test_set_with_odd_and_broken_lesions_gets_a_full_submission(demo, trained, tmp_path, monkeypatch):
    """The submission notebook in a real kernel, its inputs found under an input folder in Kaggle's
    older layout (the training notebook's test has the 2026 one), extraction on two processes
    (torchrun, as on two T4s), on a hidden-like test set: patients never seen in train, a one-lesion
    patient, an unseen body site, missing values, a lesion without an image, an image the metadata
    does not list, a tile that cannot be decoded, one whose output is not finite even in float32,
    and a report that fails. Every lesion gets a finite score, in metadata order, and each problem
    one warning line."""
    work = copy_work(trained, tmp_path / "train_run")
    for name, image in (("tabular", []), ("tab_convnext_atto", ["--image", "convnext_atto"])):
        gbdt.main(["--work", work, "--name", name, "--rounds", "10", "--bags", "1"] + image)
    ensemble.main(["--work", work, "--names", "tabular,tab_convnext_atto"])
    root = str(tmp_path / "input")
    data, _, _ = kaggle_inputs(root, "old", demo, archs=(), models=(os.path.join(work, "models"), "models"))
    path = os.path.join(data, "test-metadata.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    col = {c: i for i, c in enumerate(rows[0])}
    alone = list(rows[1])  # a patient with one lesion, never seen
    alone[col["isic_id"]], alone[col["patient_id"]] = "ISIC_9000001", "IP_9000001"
    rows[2][col["anatom_site_general"]] = "left little toe"  # a body site train never had
    rows[3][col["age_approx"]] = rows[3][col["clin_size_long_diam_mm"]] = ""  # missing values
    imageless = list(rows[1])  # a lesion whose image the file lacks
    imageless[col["isic_id"]], imageless[col["patient_id"]] = "ISIC_9000002", "IP_9000002"
    rows += [alone, imageless]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    ids = [r[0] for r in rows[1:]]
    with h5py.File(os.path.join(data, "test-image.hdf5"), "a") as h5:
        raw = h5[ids[0]][()]
        h5.create_dataset("ISIC_9000001", data=raw)
        h5.create_dataset("ISIC_9999999", data=raw)  # an image the metadata does not list
    corrupt_image(os.path.join(data, "test-image.hdf5"), ids[4], b"\xff\xd8\xff not a jpeg")
    monkeypatch.setenv(common.NONFINITE_AT, ids[5] + "!")  # the kernel and its stages inherit it
    shim = tmp_path / "python_without_report"  # a report that fails, as PYTHON for run.sh
    shim.write_text(f'#!/bin/sh\n[ "$1" = report.py ] && {{ echo "report.py: broken" >&2; exit 1; }}\n'
                    f'exec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    notebooks.main([str(tmp_path / "nb")])
    kernel = tmp_path / "kernel"
    out = run_notebook(str(tmp_path / "nb" / "submit" / "isic-2024-submit.ipynb"), str(kernel), INPUT=root,
                       ARCHS="convnext_atto", NGPU=2, EXTRA={"EXTRACT_ARGS": "--workers 0", "PYTHON": str(shim)})
    assert f"found the competition's files ({', '.join(common.DATA_FILES)}) in {data}" in out
    assert "torch.distributed.run --standalone --nproc_per_node=2 extract.py" in out
    for problem in ("1 image(s) whose isic_id is not in the metadata, ignored: ISIC_9999999",
                    "no image for 1 isic_id(s) of the metadata (scored without image features): ISIC_9000002",
                    f"missing, or that cannot be decoded, or not finite (no image features: the GBDTs score them "
                    f"from their other features): {ids[4]}, {ids[5]}, ISIC_9000002",
                    f"float32 too: scored without image features (NaN): {ids[5]}",
                    "test anatom_site_general: 1 value(s) never seen in train",
                    "warning: the report failed"):
        assert problem in out, (problem, out[-4000:])
    with open(kernel / "submission.csv") as f:
        sub = list(csv.reader(f))
    assert sub[0] == ["isic_id", "target"] and [r[0] for r in sub[1:]] == ids
    assert all(np.isfinite(float(r[1])) for r in sub[1:])


@slow
def test_predict_only_from_read_only_models_gives_the_same_submission(demo, trained, tmp_path):
    work = copy_work(trained, tmp_path / "train_run")
    gbdt.main(["--work", work, "--name", "tab_cnx", "--image", "convnext_atto", "--rounds", "20", "--bags", "2"])
    ensemble.main(["--work", work])
    models = str(tmp_path / "input" / "models")          # as a Kaggle dataset: read-only
    shutil.copytree(os.path.join(work, "models"), models)
    arch_dir = os.path.join(models, "convnext_atto")
    for k in range(5):  # what is uploaded: the weights extract.py scores, no optimizer state, no best.pt unasked
        assert sorted(os.listdir(os.path.join(arch_dir, f"fold{k}"))) == \
            ["args.json", "last.pt", "log.csv", "manifest.json"]
        assert set(torch.load(os.path.join(arch_dir, f"fold{k}", "last.pt"), weights_only=False)) == \
            {"arch", "fold", "epoch", "val_pauc", "model"}
    val_pauc = [json.load(open(os.path.join(arch_dir, f"fold{k}", "manifest.json")))["val_pauc"]["last"]
                for k in range(5)]
    for k in set(range(5)) - {int(np.argmax(val_pauc))}:  # predict-only reads no fold model it does not score
        with open(os.path.join(arch_dir, f"fold{k}", "last.pt"), "wb") as f:
            f.write(b"not read")
    for root, dirs, files in os.walk(models):
        for name in files + dirs:
            os.chmod(os.path.join(root, name), 0o555 if name in dirs else 0o444)
    fresh = str(tmp_path / "kernel_work")
    common_args = ["--work", fresh, "--predict-only", "--models", models]
    features.main(common_args + ["--data", demo])
    extract.main(common_args + ["--data", demo, "--arch", "convnext_atto", "--workers", "0", "--batch-size", "64"])
    gbdt.main(common_args + ["--name", "tab_cnx", "--image", "convnext_atto"])
    ensemble.main(["--work", fresh, "--predict-only", "--models", models])
    report.main(["--work", fresh, "--data", demo, "--predict-only"])
    assert not os.path.exists(os.path.join(fresh, "features", "train.npy"))
    assert not os.path.exists(os.path.join(fresh, "folds.csv"))
    triage = common.read_csv(os.path.join(fresh, "triage.csv"), ["isic_id", "rank_in_patient"], ["rank_in_patient"])
    assert triage["isic_id"].tolist() == common.read_lesions(fresh, "test")["isic_id"].tolist()
    assert "<img " in open(os.path.join(fresh, "report.html"), encoding="utf-8").read()
    with open(os.path.join(work, "submission.csv"), "rb") as a, open(os.path.join(fresh, "submission.csv"), "rb") as b:
        assert a.read() == b.read()
    # and the same reasons as the training run's triage gave
    trained_triage = common.read_csv(os.path.join(work, "triage.csv"), reasons.REASONS)
    assert trained_triage["reason_1"].any()
    fresh_triage = common.read_csv(os.path.join(fresh, "triage.csv"), reasons.REASONS)
    assert all(fresh_triage[r].tolist() == trained_triage[r].tolist() for r in reasons.REASONS)


# ---------------------------------------------------------------- kills at every write and rename point

class Killed(BaseException):
    """PIPELINE_KILL_AT's kill, raised in place of os._exit: the stages run in this process."""


def killed_at(n, run):
    """Runs run() with PIPELINE_KILL_AT=n (the process's n-th write or rename point ends it); True if
    it was killed there, False if it ended before reaching an n-th point."""
    def kill(status):
        raise Killed
    real_exit, os._exit, common.fault_points = os._exit, kill, 0
    os.environ[common.KILL_AT] = str(n)
    try:
        run()
        return False
    except Killed:
        return True
    finally:
        os._exit = real_exit
        del os.environ[common.KILL_AT]


def result_or_error(run):
    """What a stage gives: run()'s result, or its error line (exit status 2, one line, no traceback)."""
    try:
        return run()
    except common.DataError as e:
        assert "\n" not in str(e)
        return f"error: {e}"


def kill_at_every_point(base, tmp_path, stage, next_stage, models=()):
    """The work folder `base` holds a complete run of a stage (old settings). stage(work) runs it again
    with new settings; next_stage(work) runs the stage after it and returns what it made. A copy of
    `base` is given stage() killed at its 1st, 2nd, ... point until it runs to the end: after each
    kill the next stage gives the old run's result, the new run's, or one error line, never anything
    else; and after the stage's own next run, the new run's result. The model folders `models`
    hold a complete model (old or new) even after a second kill, before anything repaired the
    first. Returns {outcome: count}."""
    def fresh(name):
        return copy_work(base, tmp_path / name)
    old = next_stage(fresh("old"))
    work = fresh("new")
    stage(work)
    new = next_stage(work)
    assert old != new  # otherwise a mix of the two could pass unseen
    outcomes = {"old": 0, "new": 0, "refused": 0}
    for n in itertools.count(1):
        work = fresh(f"killed{n}")
        if not killed_at(n, lambda: stage(work)):
            break
        if models:
            killed_at(1, lambda: stage(work))
            for folder in models:
                common.read_manifest(os.path.join(work, folder), "the stage")
        got = result_or_error(lambda: next_stage(work))
        assert got in (old, new) or (isinstance(got, str) and got.startswith("error: ")), \
            f"killed at point {n}: {got!r:.300}"
        outcomes["old" if got == old else "new" if got == new else "refused"] += 1
        stage(work)  # the stage's next run recovers whatever the kill left
        assert next_stage(work) == new, f"killed at point {n}, then rerun"
        shutil.rmtree(work)
    assert n > 5 and outcomes["refused"] + outcomes["new"] > 0
    print(f"{n - 1} points: {outcomes}")  # pytest -s shows them
    return outcomes


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def tiny_gbdt(work, *more):
    gbdt.main(["--work", work, "--rounds", "3", "--bags", "1", "--threads", "1", *more])


@slow
def test_a_reader_keeps_what_it_reads_while_a_writer_reruns(demo, tmp_path, monkeypatch):
    """ensemble.py and report.py paused mid-read while gbdt.py and ensemble.py are run again on the
    models they read: each rerun stops with one line, and the reader ends with the result of an
    undisturbed run."""
    work = small_work(demo, tmp_path)
    tiny_gbdt(work)
    ensemble.main(["--work", work, "--names", "tabular"])
    undisturbed = file_bytes(os.path.join(work, "submission.csv"))
    refusals = []

    def rerun_mid_read(read, writers):
        def paused(*a, **kw):
            if not refusals:
                refusals.extend(result_or_error(w) for w in writers)
            return read(*a, **kw)
        return paused

    def gbdt_rerun():
        tiny_gbdt(work, "--seed", "7")
    monkeypatch.setattr(ensemble, "model_preds", rerun_mid_read(ensemble.model_preds, [gbdt_rerun]))
    ensemble.main(["--work", work, "--names", "tabular"])
    assert re.match(r"error: .*: another run is writing or reading gbdt-tabular now", refusals[0]), refusals
    assert file_bytes(os.path.join(work, "submission.csv")) == undisturbed
    refusals.clear()
    monkeypatch.setattr(report, "read_preds", rerun_mid_read(report.read_preds, [
        gbdt_rerun, lambda: ensemble.main(["--work", work, "--names", "tabular"])]))
    report.main(["--work", work])
    assert re.match(r"error: .*: another run is writing or reading gbdt-tabular now", refusals[0]), refusals
    assert re.match(r"error: .*: another run is writing or reading ensemble now", refusals[1]), refusals
    assert file_bytes(os.path.join(work, "submission.csv")) == undisturbed


@slow
def test_features_killed_at_any_point(demo, demo_work, tmp_path):
    def next_stage(work):  # what gbdt.py reads, through its readers
        args = types.SimpleNamespace(work=work, image=[], embeddings=[], indeterminate_weight=0.0)
        inputs = gbdt.input_digests(args, os.path.join(work, "models"))
        train, test = common.read_lesions(work, "train"), common.read_lesions(work, "test")
        x = [gbdt.load_features(args, s, t, inputs) for s, t in (("train", train), ("test", test))]
        return pickle.dumps((train, test, x, gbdt.training_weights(args, train), inputs))
    kill_at_every_point(demo_work, tmp_path, lambda w: features.main(["--data", demo, "--work", w, "--no-outlier"]),
                        next_stage)


def small_work(demo, tmp_path):
    """A work folder of the demo set with fewer features and 2 folds: a GBDT in about a second."""
    work = str(tmp_path / "small")
    features.main(["--data", demo, "--work", work, "--no-context", "--no-patient-norm"])
    lesions = common.read_lesions(work, "train")
    common.write_csv(os.path.join(work, "folds.csv"), ["isic_id", "patient_id", "target", "fold"],
                     [lesions["isic_id"], lesions["patient_id"], lesions["target"], lesions["fold"] % 2])
    rerecord(work, "features")
    return work


@slow
def test_gbdt_killed_at_any_point(demo, tmp_path):
    base = small_work(demo, tmp_path)
    tiny_gbdt(base)

    def next_stage(work):  # the submission, and what the committed model predicts (as --predict-only would)
        ensemble.main(["--work", work, "--names", "tabular"])
        args = types.SimpleNamespace(work=work, image=[], embeddings=[])
        inputs = gbdt.input_digests(args, os.path.join(work, "models"))
        x, names = gbdt.load_features(args, "test", common.read_lesions(work, "test"), inputs)
        boosters, _ = gbdt.load_boosters(os.path.join(work, "models", "tabular"), names, inputs)
        return file_bytes(os.path.join(work, "submission.csv")), np.mean([b.predict(x) for b in boosters.values()], 0).tobytes()
    kill_at_every_point(base, tmp_path, lambda w: tiny_gbdt(w, "--seed", "7", "--rounds", "4"), next_stage,
                        models=["models/tabular"])


def points_of(run):
    """The write and rename points that run() passes, in order (their descriptions)."""
    seen = []
    real, common.fault_point = common.fault_point, seen.append
    try:
        run()
    finally:
        common.fault_point = real
    return seen


@slow
def test_ensemble_killed_at_any_point(demo, tmp_path):
    base = small_work(demo, tmp_path)
    tiny_gbdt(base)
    tiny_gbdt(base, "--name", "tab2", "--seed", "7")
    ensemble.main(["--work", base, "--names", "tabular,tab2", "--blend", "1,0"])

    def next_stage(work):
        report.main(["--work", work])
        return file_bytes(os.path.join(work, "report.md"))
    kill_at_every_point(base, tmp_path, lambda w: ensemble.main(["--work", w, "--names", "tabular,tab2", "--blend",
                                                                 "0,1"]), next_stage)


@slow
def test_extract_killed_at_any_point(demo, trained, tmp_path):
    """extract.py's outputs, from its fold parts on: the scores with the mean of the fold models
    replacing those of the best one. (A kill while it writes the parts leaves every output as it
    was; --resume reuses the finished parts: test_extraction_resumes_from_finished_folds_....)"""
    args = ["--arch", "convnext_atto", "--data", demo, "--workers", "0", "--test-models", "mean", "--resume"]
    run, base = copy_work(trained, tmp_path / "run"), str(tmp_path / "base")

    def copy_at_last_part(what):  # what a kill there leaves: every fold part made, nothing else
        if re.search(r"renaming it to .*/parts/.*fold4\.npz$", what):
            shutil.copytree(run, base)
    real, common.fault_point = common.fault_point, copy_at_last_part
    try:
        extract.main(args + ["--work", run])
    finally:
        common.fault_point = real
    assert sorted(os.listdir(os.path.join(base, "emb", "parts"))) == [f"convnext_atto_fold{k}.npz" for k in range(5)]

    def next_stage(work):  # what gbdt.py --image --embeddings reads, through its readers
        a = types.SimpleNamespace(work=work, image=["convnext_atto"], embeddings=["convnext_atto"])
        inputs = gbdt.input_digests(a, os.path.join(work, "models"))
        return pickle.dumps([inputs] + [gbdt.load_features(a, s, common.read_lesions(work, s), inputs)
                                        for s in ("train", "test")])
    kill_at_every_point(base, tmp_path, lambda w: extract.main(args + ["--work", w]), next_stage)


@slow
def test_a_fold_commit_killed_at_any_point(demo, demo_work, tmp_path):
    """train_backbone.py's commit of a fold (its last checkpoint, manifest, renames), killed at each
    point: extract.py finds the old fold model or the new one, whole; the next run finishes the
    commit. (A kill during the epochs: test_training_writes_checkpoint_and_log_and_resume_after_kill_matches.)"""
    train = ["--arch", "convnext_atto", "--fold", "0", "--data", demo] + tiny_train(1)
    base = copy_work(demo_work, tmp_path / "base")
    train_backbone.main(train + ["--work", base])
    probe = copy_work(demo_work, tmp_path / "probe")
    points = points_of(lambda: train_backbone.main(train + ["--work", probe, "--seed", "7"]))
    epoch_end = max(i for i, p in enumerate(points, 1) if p.endswith("renaming it to " + os.path.join(
        probe, "models", "convnext_atto", "fold0.partial", "resume.pt")))
    assert killed_at(epoch_end, lambda: train_backbone.main(train + ["--work", base, "--seed", "7"]))

    def next_stage(work):  # the fold model as extract.py reads it
        folder = os.path.join(work, "models", "convnext_atto", "fold0")
        common.read_manifest(folder, "train_backbone.py", files=["last.pt"])
        return file_bytes(os.path.join(folder, "last.pt"))
    outcomes = kill_at_every_point(base, tmp_path, lambda w: train_backbone.main(train + ["--work", w, "--seed", "7",
                                                                                         "--resume"]), next_stage,
                                   models=["models/convnext_atto/fold0"])
    assert outcomes["refused"] == 0  # a fold model is never lost: old or new, whole


@slow
def test_pipeline_kill_at_ends_the_process_as_a_kill_would(demo, tmp_path):
    """PIPELINE_KILL_AT=N in a real process: exit status 137 at once, the temporary file of the write
    it stopped left behind, nothing committed; the next run completes."""
    work = small_work(demo, tmp_path)
    run = subprocess.run([sys.executable, "gbdt.py", "--work", work, "--rounds", "2", "--bags", "1"], cwd=HERE,
                         capture_output=True, text=True, env={**os.environ, common.KILL_AT: "1"})
    assert run.returncode == 137 and "PIPELINE_KILL_AT=1: killed after writing" in run.stderr
    assert glob.glob(os.path.join(work, "models", "tabular.partial", ".fold0_bag0.txt.tmp-*"))
    assert not os.path.exists(os.path.join(work, "models", "tabular"))
    tiny_gbdt(work)
    assert not os.path.exists(os.path.join(work, "models", "tabular.partial"))
    common.read_manifest(os.path.join(work, "models", "tabular"), "gbdt.py")


@slow
def test_one_models_folder_has_one_writer_whatever_the_work_folders(demo, tmp_path, capsys):
    """The locks live in the models folder as well as the work folder: two work folders sharing
    --models cannot write one model at once, and a fold model is not rewritten while extract.py
    reads the fold models (nor extract.py run while a fold trains)."""
    work = small_work(demo, tmp_path)
    other = copy_work(work, tmp_path / "other")
    models = os.path.join(work, "models")
    with common.stage_locks(types.SimpleNamespace(work=work, models=models), ["gbdt-tabular"]):
        err = one_error_line(stage_error(capsys, gbdt.main, ["--work", other, "--models", models, "--rounds", "2"]))
        assert f"{models}: another run is writing or reading gbdt-tabular now" in err
        tiny_gbdt(other)  # its own models folder: no conflict
    training = types.SimpleNamespace(work=work)
    with common.stage_locks(training, ["image-convnext_atto-fold2"], ["features", "image-convnext_atto"]):
        err = one_error_line(stage_error(capsys, extract.main, ["--arch", "convnext_atto", "--data", demo,
                                                                "--work", other, "--models", models]))
        assert "another run is writing or reading image-convnext_atto now" in err
    with common.stage_locks(training, ["image-convnext_atto"], ["features"]):  # extract.py running
        err = one_error_line(stage_error(capsys, train_backbone.main, ["--arch", "convnext_atto", "--fold", "0",
                                                                       "--data", demo, "--work", work] + tiny_train(1)))
        assert "another run is writing image-convnext_atto now" in err

