"""Shared code of the ISIC 2024 pipeline: reading the Kaggle files (CSV, HDF5 JPEGs), atomic writes
and id-checked arrays, patient-grouped folds, the competition metric, patient normalization, the
image-model table, focal loss, the image loader with device-side resizing and augmentation, the
mixed-precision predict loop, and the demo data set.

Reads:  DATA/train-metadata.csv, DATA/test-metadata.csv, DATA/*-image.hdf5
Writes: WORK/folds.csv (isic_id,patient_id,target,fold), once; every later stage reads it.

Command:
    python common.py demo tiny --patients 30 --test-patients 6   # a tiny demo set, for trying things
    python common.py demo demo_data                              # the demo set of run.sh (~15 s)
"""
import argparse
import contextlib
import codecs
import csv
import io
import itertools
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network for weights

KAGGLE_DATA = "/kaggle/input/isic-2024-challenge"

TRAIN_ONLY = ["target", "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5",
              "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence"]
NUMERIC = ["age_approx", "clin_size_long_diam_mm", "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext",
           "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H", "tbp_lv_Hext", "tbp_lv_L", "tbp_lv_Lext", "tbp_lv_areaMM2",
           "tbp_lv_area_perim_ratio", "tbp_lv_color_std_mean", "tbp_lv_deltaA", "tbp_lv_deltaB",
           "tbp_lv_deltaL", "tbp_lv_deltaLB", "tbp_lv_deltaLBnorm", "tbp_lv_eccentricity",
           "tbp_lv_minorAxisMM", "tbp_lv_nevi_confidence", "tbp_lv_norm_border", "tbp_lv_norm_color",
           "tbp_lv_perimeterMM", "tbp_lv_radial_color_std_max", "tbp_lv_stdL", "tbp_lv_stdLExt",
           "tbp_lv_symm_2axis", "tbp_lv_symm_2axis_angle", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z"]
CATEGORICAL = ["sex", "anatom_site_general", "tbp_tile_type", "tbp_lv_location", "tbp_lv_location_simple",
               "attribution"]
TRAIN_COLUMNS = ("isic_id target patient_id age_approx sex anatom_site_general clin_size_long_diam_mm image_type "
                 "tbp_tile_type tbp_lv_A tbp_lv_Aext tbp_lv_B tbp_lv_Bext tbp_lv_C tbp_lv_Cext tbp_lv_H tbp_lv_Hext "
                 "tbp_lv_L tbp_lv_Lext tbp_lv_areaMM2 tbp_lv_area_perim_ratio tbp_lv_color_std_mean tbp_lv_deltaA "
                 "tbp_lv_deltaB tbp_lv_deltaL tbp_lv_deltaLB tbp_lv_deltaLBnorm tbp_lv_eccentricity tbp_lv_location "
                 "tbp_lv_location_simple tbp_lv_minorAxisMM tbp_lv_nevi_confidence tbp_lv_norm_border "
                 "tbp_lv_norm_color tbp_lv_perimeterMM tbp_lv_radial_color_std_max tbp_lv_stdL tbp_lv_stdLExt "
                 "tbp_lv_symm_2axis tbp_lv_symm_2axis_angle tbp_lv_x tbp_lv_y tbp_lv_z attribution "
                 "copyright_license lesion_id iddx_full iddx_1 iddx_2 iddx_3 iddx_4 iddx_5 mel_mitotic_index "
                 "mel_thick_mm tbp_lv_dnn_lesion_confidence").split()
TEST_COLUMNS = [c for c in TRAIN_COLUMNS if c not in TRAIN_ONLY]
FLOAT_COLUMNS = set(NUMERIC) | {"target", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence", "fold", "pred"}
MISSING = {"", "na", "nan", "n/a", "null", "none"}


class DataError(Exception):
    """Bad input: the message names the file, the row or isic_id, and what is wrong."""


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def run_main(main):
    """The scripts' entry point: bad input ends with its message and exit status 2, no traceback."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------- reading the Kaggle files

def default_data_dir():
    return KAGGLE_DATA if os.path.isdir(KAGGLE_DATA) else None


def data_path(data_dir, name):
    if data_dir is None:
        raise DataError("no --data given: pass --data DIR (a folder holding train-metadata.csv, "
                        "train-image.hdf5, test-metadata.csv, test-image.hdf5), or make the demo set "
                        "with `python common.py demo demo_data` and pass --data demo_data")
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    return path


def parse_floats(values, path, column, rows=None):
    """Strings to float64: '45', '45.0', '8.05E-13', ' 3.2 ' parse; '', 'NA', 'nan' are missing.
    rows: their data rows (0-based; default: 0, 1, ...), for the error message."""
    text = np.char.lower(np.char.strip(np.asarray(values, dtype=str)))
    missing = np.isin(text, list(MISSING))
    out = np.full(len(text), np.nan)
    try:
        out[~missing] = text[~missing].astype(np.float64)
    except ValueError:
        for row, value, t in zip(range(len(values)) if rows is None else rows, values, text):
            if t not in MISSING:
                try:
                    float(t)
                except ValueError:
                    raise DataError(f"{path}: row {row + 2}, column {column}: {value!r} is not a number") from None
    return out


def parse_decimals(b):
    """Numbers [+-]digits[.digits] as float64, and a mask of the fields parsed: those whose digits
    make an integer up to 2**53 (any number of 15 significant digits). b (W, N) uint8: byte k of
    field n at [k, n], 0 past its end. Exact: that integer is a float64, and one division by an
    exact power of ten (up to 1e22) rounds correctly. Any other field (an exponent, more digits,
    text) is left to parse_floats; Python's float() is 3 times slower."""
    digit = b - np.uint8(48) < 10
    dot = b == 46
    body = (digit | dot | (b == 0))[1:].all(0)
    ok = body & (digit[0] | dot[0] | (b[0] == 45) | (b[0] == 43))
    n_digits = digit.sum(0)
    decimals = (digit & (np.cumsum(dot, 0, dtype=np.uint8) > 0)).sum(0)
    mantissa = np.zeros(b.shape[1], np.int64)
    for is_digit, byte in zip(digit, b):
        mantissa = np.where(is_digit, mantissa * 10 + (byte - 48), mantissa)
    ok &= (n_digits > 0) & (n_digits <= 18) & (mantissa <= 2 ** 53) & (decimals <= 22) & (dot.sum(0) <= 1)
    value = mantissa / 10.0 ** decimals
    return np.where(b[0] == 45, -value, value), ok


def csv_fields(path):
    """A CSV file's header, bytes and field boundaries, found by NumPy (the csv module's rows and
    their conversion took 12 s on a 400,000-row train-metadata.csv; read_metadata now takes 5).

    Returns (header, data, bounds): bounds (N, C + 1) for the N non-blank lines after the header, field
    j of a line being data[bounds[n, j] + 1:bounds[n, j + 1]] (the separators' positions). A comma or
    newline inside double quotes is text (RFC 4180); CRLF line ends and a UTF-8 BOM are accepted.
    Raises DataError for an empty file, a ragged line or an unclosed quote."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.endswith(b"\n"):
        data += b"\n"
    buf = np.frombuffer(data, np.uint8)
    with ThreadPoolExecutor(3) as pool:  # three scans of the whole file, side by side
        newlines, commas, quotes = pool.map(lambda c: np.flatnonzero(buf == ord(c)), '\n,"')
    if len(quotes) % 2:
        line = np.searchsorted(newlines, quotes[-1]) + 1
        raise DataError(f"{path}: line {line}: a double quote is never closed")
    if len(quotes):  # separators between an opening quote and its closing one are text

        def outside_quotes(sep):
            depth = np.zeros(len(sep) + 1, np.int8)
            at = np.searchsorted(sep, quotes)  # per quote, the number of separators before it
            np.add.at(depth, at[0::2], 1)
            np.add.at(depth, at[1::2], -1)
            return sep[np.cumsum(depth[:-1], dtype=np.int8) == 0]
        newlines, commas = outside_quotes(newlines), outside_quotes(commas)
    bom = 3 if data.startswith(codecs.BOM_UTF8) else 0
    start = np.r_[bom, newlines[:-1] + 1]
    end = newlines - (buf[np.maximum(newlines - 1, 0)] == 13)  # before a CRLF's CR
    if len(data) <= 1 + bom:
        raise DataError(f"{path}: the file is empty (no header line)")
    try:
        header = [h.strip() for h in next(csv.reader([data[start[0]:end[0]].decode("utf-8")]))]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: the header line is not UTF-8 text ({e})") from None
    n_fields = np.diff(np.searchsorted(commas, newlines), prepend=0) + 1
    lines = 1 + np.flatnonzero(end[1:] > start[1:])  # blank lines are skipped, as csv.reader does
    ragged = lines[n_fields[lines] != len(header)]
    if len(ragged):
        raise DataError(f"{path}: row {ragged[0] + 1} has {n_fields[ragged[0]]} fields, the header has {len(header)}")
    commas = commas[np.searchsorted(commas, newlines[0]):].reshape(len(lines), len(header) - 1)
    return header, data, np.column_stack([start[lines] - 1, commas, end[lines]])


def field_bytes(buf, starts, lengths):
    """(W, N) uint8: byte k of field n at [k, n], 0 past the field's end; W the longest field."""
    width = max(1, int(lengths.max(initial=0)))
    windows = np.lib.stride_tricks.sliding_window_view(buf, min(width, len(buf)))
    b = windows[np.minimum(starts, len(windows) - 1)]  # a field in the file's last bytes: fixed below
    for i in np.flatnonzero(starts > len(windows) - 1):
        b[i] = 0
        b[i, :lengths[i]] = buf[starts[i]:starts[i] + lengths[i]]
    b *= np.arange(width) < lengths[:, None]
    return np.ascontiguousarray(b.T)


HASH_MULTIPLIER = 1099511628211  # FNV's 64-bit prime


def distinct(b):
    """Rows of the first occurrence of each distinct field of b (W, N), and each field's index among
    them: a hash of the bytes, sorted as integers (strings sort slowly), every row checked against its
    first occurrence; the strings themselves are sorted only if two values share a hash."""
    h = np.zeros(b.shape[1], np.uint64)
    for byte in b:
        h = h * np.uint64(HASH_MULTIPLIER) + byte
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    if not (b == b[:, first[inverse]]).all():
        _, first, inverse = np.unique(np.ascontiguousarray(b.T).view(f"S{len(b)}")[:, 0], return_index=True,
                                      return_inverse=True)
    return first, inverse


def field_text(raw, path, column, row):
    """One field's bytes as text: decoded, stripped, unquoted ("" inside quotes is one "), stripped."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{path}: row {row + 2}, column {column}: {raw!r} is not UTF-8 text") from None
    if len(text) >= 2 and text[0] == '"' == text[-1]:
        text = text[1:-1].replace('""', '"').strip()
    return text


def read_metadata(path, required=None):
    """A Kaggle metadata CSV as {column: array}: numeric columns float64 (NaN = missing), others str.

    Raises DataError for a missing file or column, a ragged row or a duplicated isic_id."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    header, data, bounds = csv_fields(path)
    missing = [c for c in (required or ["isic_id"]) if c not in header]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(missing)}")
    buf = np.frombuffer(data, np.uint8)

    def column(j):  # columns run on threads: NumPy releases the GIL
        starts, ends = bounds[:, j] + 1, bounds[:, j + 1]
        b = field_bytes(buf, starts, ends - starts)
        if header[j] in FLOAT_COLUMNS:
            values, ok = parse_decimals(b)
            values[starts == ends] = np.nan
            rest = np.flatnonzero(~ok & (starts < ends))
            if len(rest):
                text = [field_text(data[starts[i]:ends[i]], path, header[j], i) for i in rest]
                values[rest] = parse_floats(text, path, header[j], rest)
            return values
        first, inverse = distinct(b)
        text = [field_text(data[starts[i]:ends[i]], path, header[j], i) for i in first]
        return np.array(text, dtype=object)[inverse]

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        table = dict(zip(header, pool.map(column, range(len(header)))))
    ids = table["isic_id"]
    if len(set(ids)) < len(ids):
        uniq, counts = np.unique(ids.astype(str), return_counts=True)
        raise DataError(f"{path}: duplicated isic_id {', '.join(uniq[counts > 1][:5])}")
    if "target" in table and np.isnan(table["target"]).any():
        row = int(np.flatnonzero(np.isnan(table["target"]))[0])
        raise DataError(f"{path}: isic_id {ids[row]} (row {row + 2}) has no target")
    return table


def read_train(data_dir):
    return read_metadata(data_path(data_dir, "train-metadata.csv"),
                         required=["isic_id", "patient_id", "target"] + NUMERIC + CATEGORICAL)


def read_test(data_dir):
    return read_metadata(data_path(data_dir, "test-metadata.csv"),
                         required=["isic_id", "patient_id"] + NUMERIC + CATEGORICAL)


def decode_image(raw, isic_id="?"):
    """JPEG (or PNG) bytes to an RGB uint8 array; grayscale, RGBA and CMYK are converted."""
    from PIL import Image
    if len(raw) == 0:
        raise DataError(f"isic_id {isic_id}: the image value is empty")
    try:
        with Image.open(io.BytesIO(raw)) as im:  # convert copies even an RGB image: a quarter of a decode
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as e:  # PIL raises several types for truncated or corrupt bytes
        raise DataError(f"isic_id {isic_id}: the image cannot be decoded ({e})") from None


def image_location(h5, isic_id):
    """(offset, nbytes) of an image's bytes in the file where they can be read raw, else (None, None).

    Kaggle stores each image as a contiguous (hence unfiltered) fixed-length byte string: read at its
    offset, a tile costs 3 microseconds against 125 for h5py's `h5[isic_id][()]`, which looks the
    dataset up again each time, and whose lookup, run between decodes, costs a third of a decode."""
    import h5py
    try:
        ds = h5py.h5d.open(h5.id, isic_id.encode())
    except KeyError:
        raise DataError(f"{h5.filename}: no image for isic_id {isic_id}") from None
    offset, kind = ds.get_offset(), ds.get_type()  # the type's class: ds.dtype would take as long as the rest
    is_bytes = (kind.get_class() == h5py.h5t.STRING and not kind.is_variable_str()
                or kind.get_class() == h5py.h5t.INTEGER and kind.get_size() == 1)
    if offset is not None and is_bytes and hasattr(os, "pread"):
        return offset, ds.get_storage_size()
    return None, None


def read_image_bytes(h5, isic_id, location=None):
    """The stored bytes of one image; `location` = image_location(h5, isic_id), when already known."""
    offset, nbytes = location or image_location(h5, isic_id)
    if offset is not None:
        return os.pread(h5.id.get_vfd_handle(), nbytes, offset)
    value = h5[isic_id][()]
    return value.tobytes() if isinstance(value, np.ndarray) else bytes(value)


def check_image_ids(h5_path, ids):
    """Every metadata isic_id must have an image, and the reverse."""
    import h5py
    with h5py.File(h5_path, "r") as h5:
        stored = set(h5.keys())
    lacking = [i for i in ids if i not in stored]
    if lacking:
        raise DataError(f"{h5_path}: no image for {len(lacking)} isic_id(s) of the metadata, "
                        f"e.g. {', '.join(lacking[:5])}")
    extra = sorted(stored - set(ids))
    if extra:
        raise DataError(f"{h5_path}: {len(extra)} image(s) whose isic_id is not in the metadata, "
                        f"e.g. {', '.join(extra[:5])}")


# ---------------------------------------------------------------- atomic writes, id-checked arrays

def atomic_write(path, write):
    """Calls write(file) on a temporary file beside `path`, then renames it: a crash or Ctrl-C leaves
    the old file or none, never half of one. No fsync: it guards against power loss only, and took
    1 to 2 s of the 2.4 s that the 850 MB feature matrix of 400,000 lesions takes to save."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs are for sharing
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(path, header, columns):
    def write(f):
        text = io.StringIO()
        w = csv.writer(text, lineterminator="\n")
        w.writerow(header)
        w.writerows(zip(*columns))
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def save_array(path, array, ids):
    """X.npy with its row ids in X_ids.txt; the ids go first so a reader never sees new rows
    with stale ids."""
    ids_path = path[:-4] + "_ids.txt"
    atomic_write(ids_path, lambda f: f.write(("\n".join(ids) + "\n").encode()))
    atomic_write(path, lambda f: np.save(f, array))


def load_array(path, expected_ids):
    """X.npy, checked against the ids beside it and against the rows the caller expects."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (run the stage that writes it first)")
    array = np.load(path)
    with open(path[:-4] + "_ids.txt") as f:
        ids = f.read().split()
    if len(ids) != len(array):
        raise DataError(f"{path}: {len(array)} rows but {len(ids)} ids beside it")
    check_ids(path, ids, expected_ids)
    return array


def check_ids(path, ids, expected_ids):
    ids, expected = np.asarray(ids, dtype=str), np.asarray(expected_ids, dtype=str)
    if len(ids) != len(expected) or (ids != expected).any():
        first = (int(np.flatnonzero(ids[:len(expected)] != expected[:len(ids)])[0])
                 if (ids[:len(expected)] != expected[:len(ids)]).any() else min(len(ids), len(expected)))
        raise DataError(f"{path}: its ids do not line up with this run's ({len(ids)} rows against "
                        f"{len(expected)}; first difference at row {first}): is it from another run?")


def write_args(path, args):
    write_json(path, {"argv": sys.argv, "args": vars(args), "time": time.strftime("%Y-%m-%d %H:%M:%S")})


# ---------------------------------------------------------------- folds and the metric

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


def load_folds(work, train, n_folds=5, seed=42):
    """WORK/folds.csv, made on first use; later stages check it matches the train metadata."""
    path = os.path.join(work, "folds.csv")
    ids = train["isic_id"].astype(str)
    if not os.path.exists(path):
        folds = make_folds(train["patient_id"], train["target"], n_folds, seed)
        write_csv(path, ["isic_id", "patient_id", "target", "fold"],
                  [ids, train["patient_id"], train["target"].astype(int), folds])
        log(f"wrote {path}: {n_folds} folds grouped by patient, seed {seed}")
    table = read_metadata(path, required=["isic_id", "fold"])
    check_ids(path, table["isic_id"], ids)
    return table["fold"].astype(int)


def roc_points(y_true, y_score):
    """FPR and TPR at each distinct threshold, (0, 0) first; tied scores form one point."""
    order = np.argsort(-y_score, kind="mergesort")
    y, s = y_true[order], y_score[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]


def pauc(y_true, y_pred, min_tpr=0.80):
    """Kaggle's ISIC 2024 score: the ROC area above TPR = min_tpr (0..0.2 for 0.8).

    Flip the labels, negate the predictions, cut the ROC curve at FPR = 1 - min_tpr with one
    interpolated point, and take the trapezoid area of that piece."""
    y_true = np.asarray(y_true, dtype=float)
    y_pred = np.asarray(y_pred, dtype=float)
    if len(y_true) != len(y_pred):
        raise ValueError(f"pauc: {len(y_true)} labels but {len(y_pred)} predictions")
    if np.isnan(y_pred).any():
        raise ValueError("pauc: the predictions contain NaN")
    if y_true.min() == y_true.max():
        raise ValueError("pauc: the labels hold one class only")
    max_fpr = 1.0 - min_tpr
    fpr, tpr = roc_points(1.0 - y_true, -y_pred)
    stop = np.searchsorted(fpr, max_fpr, "right")
    y_cut = np.interp(max_fpr, fpr[stop - 1:stop + 1], tpr[stop - 1:stop + 1])
    fpr = np.r_[fpr[:stop], max_fpr]
    tpr = np.r_[tpr[:stop], y_cut]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def codes(values, vocabulary=None):
    """Integer codes of a column of strings: the position in vocabulary (-1 where absent), or without
    one, distinct per distinct value. A dict lookup per row: sorting the strings takes longer."""
    if vocabulary is None:
        index = {}
        return np.fromiter(map(index.setdefault, values, itertools.count()), np.int64, len(values))
    index = {v: i for i, v in enumerate(vocabulary)}
    return np.fromiter(map(index.get, values, itertools.repeat(-1)), np.int64, len(values))


STATS = ("z", "pct", "dev", "is_max", "is_min")


def patient_normalize(x, patient_ids, out=None):
    """Each feature against the same patient's other lesions.

    Returns {"z", "pct", "dev", "is_max", "is_min"}, each (N, F): z-score (population std, 0 where
    the std is 0), average rank within the patient (ties averaged) / n, x - median, and 1.0 where x
    is the patient's max / min. Statistics skip missing values; a missing x gives NaN everywhere.
    Each feature is sorted within each patient (no loop over patients), the features in parallel
    threads (NumPy releases the GIL); the results are feature-major in memory, (F, N) transposed,
    computed in float64 and written into `out` (5, F, N) when given: rows of a float32 matrix, say."""
    xt = np.ascontiguousarray(np.asarray(x, dtype=np.float64).T)   # a feature's values contiguous
    n_feat, n_rows = xt.shape
    _, patient_codes = np.unique(codes(patient_ids), return_inverse=True)
    size = np.bincount(patient_codes)
    # patients renumbered by size, rows grouped by patient: all patients of one size sort as one
    # 2-D block, so the sort loop runs over the distinct sizes (a few hundred), not the patients
    by_size = np.argsort(size, kind="stable")
    patient = np.empty_like(by_size)
    patient[by_size] = np.arange(len(size))
    patient = patient[patient_codes]
    rows = np.argsort(patient, kind="stable")
    n_in = size[by_size]
    start = np.cumsum(n_in) - n_in
    patient_start = np.repeat(start, n_in)
    sizes, n_of_size = np.unique(n_in, return_counts=True)
    ends = np.cumsum(sizes * n_of_size)
    pos = np.arange(n_rows)
    out = dict(zip(STATS, np.empty((len(STATS), n_feat, n_rows)) if out is None else out))

    def feature(j):
        xj = xt[j]
        xg = xj[rows]
        order = np.empty(n_rows, dtype=np.int64)
        for m, a, b in zip(sizes, ends - sizes * n_of_size, ends):
            order[a:b] = (np.argsort(xg[a:b].reshape(-1, m), axis=1) + pos[a:b:m, None]).ravel()
        v = xg[order]                               # ascending within each patient, NaN last
        ok = v == v                                 # not missing
        n = np.add.reduceat(ok, start)
        n1 = np.maximum(n, 1)
        mean = np.add.reduceat(np.where(ok, v, 0.0), start) / n1
        d = v - np.repeat(mean, n_in)
        std = np.sqrt(np.add.reduceat(np.where(ok, d * d, 0.0), start) / n1)
        median = (v[start + (n1 - 1) // 2] + v[start + n1 // 2]) / 2
        # average rank: the first and last sorted position of each run of equal values
        new = np.ones(n_rows + 1, dtype=bool)
        np.not_equal(v[1:], v[:-1], out=new[1:-1])
        new[start] = True
        run_start = np.flatnonzero(new)
        run = np.cumsum(new[:-1]) - 1
        rank = (run_start[run] + run_start[run + 1] - 1) / 2 - patient_start + 1
        with np.errstate(divide="ignore", invalid="ignore"):  # a patient whose values are all missing
            out["pct"][j, rows[order]] = np.where(ok, rank / np.repeat(n, n_in), np.nan)
        # the other statistics in row order, from per-patient tables: no scatter needed;
        # a std of 0 divides as infinity, so z = 0 there (and stays NaN for a missing x)
        missing = np.isnan(xj)
        out["z"][j] = (xj - mean[patient]) / np.where(std > 0, std, np.inf)[patient]
        out["dev"][j] = xj - median[patient]
        out["is_max"][j] = np.where(missing, np.nan, xj == v[start + n1 - 1][patient])
        out["is_min"][j] = np.where(missing, np.nan, xj == v[start][patient])

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(feature, range(n_feat)))
    return {k: v.T for k, v in out.items()}


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


# ---------------------------------------------------------------- image models

# the design's backbones, and tiny ones for tests and the CPU demo
MODEL_CONFIGS = {
    "eva02_small": dict(model_name="eva02_small_patch14_336.mim_in22k_ft_in1k", feature_dim=384, img_size=336),
    "eva02_base": dict(model_name="eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", feature_dim=768, img_size=448),
    "convnext": dict(model_name="convnextv2_tiny.fcmae_ft_in22k_in1k", feature_dim=768, img_size=224),
    "eva02_tiny": dict(model_name="eva02_tiny_patch14_224.mim_in22k", feature_dim=192, img_size=56),
    "convnext_atto": dict(model_name="convnextv2_atto.fcmae_ft_in1k", feature_dim=320, img_size=64),
}
CANVAS = 256  # tiles (61 to 239 px) are placed, not resized, on a canvas this size; the GPU resizes


def build_model(arch, weights=None, pretrained=True, drop_path=0.1):
    """A timm backbone with a one-logit head. Weights come from `weights` (a .safetensors or .pth
    file), else timm's local cache; nothing is downloaded unless HF_HUB_OFFLINE=0 is set."""
    import timm
    cfg = MODEL_CONFIGS[arch]
    kwargs = dict(num_classes=1, drop_path_rate=drop_path)
    if cfg["model_name"].startswith("eva02"):
        kwargs["img_size"] = cfg["img_size"]
    if weights:
        if not os.path.exists(weights):
            raise DataError(f"{weights}: weights file not found")
        return timm.create_model(cfg["model_name"], pretrained=True, pretrained_cfg_overlay=dict(file=weights),
                                 **kwargs)
    try:
        return timm.create_model(cfg["model_name"], pretrained=pretrained, **kwargs)
    except Exception as e:  # offline hub misses raise several types
        raise DataError(f"no local pretrained weights for {cfg['model_name']} ({type(e).__name__}): pass "
                        "--weights PATH (a .safetensors or .pth file), or --no-pretrained") from None


def normalization(model):
    import timm
    cfg = timm.data.resolve_data_config({}, model=model)
    return cfg["mean"], cfg["std"]


class FocalLoss(torch.nn.Module):
    """Focal loss on logits, mean over the batch: alpha_t (1 - p_t)^gamma BCE, with 1 - p_t computed
    as sigmoid(-logit) for positives and sigmoid(logit) for negatives, exact at logits of +-50."""

    def __init__(self, alpha=0.25, gamma=2.0):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits, targets):
        targets = targets.to(logits.dtype)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        one_minus_pt = torch.sigmoid(logits * (1 - 2 * targets))
        alpha_t = self.alpha * targets + (1 - self.alpha) * (1 - targets)
        return (alpha_t * one_minus_pt ** self.gamma * bce).mean()


class H5Images(torch.utils.data.Dataset):
    """Tiles of an HDF5 file as uint8 canvases (CANVAS x CANVAS x 3, the tile top-left) with their
    height and width. The file is opened in the process that reads it, so DataLoader workers
    started by fork or spawn each get their own handle."""

    def __init__(self, h5_path, ids, labels=None):
        import h5py
        self.h5_path, self.ids = h5_path, list(ids)
        self.labels = np.zeros(len(self.ids), np.float32) if labels is None else np.asarray(labels, np.float32)
        self.h5, self.pid = None, None
        with h5py.File(h5_path, "r") as h5:  # found once, here: a missing image stops the run before it starts
            self.locations = [image_location(h5, i) for i in self.ids]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        import h5py
        if self.pid != os.getpid():
            self.h5, self.pid = h5py.File(self.h5_path, "r"), os.getpid()
        isic_id = self.ids[i]
        raw = read_image_bytes(self.h5, isic_id, self.locations[i])
        # left uninitialized: prepare_batch never samples outside the tile, and zero-filling the
        # 192 KB canvas took a third of the loader's time per tile
        canvas = np.empty((CANVAS, CANVAS, 3), np.uint8)
        try:
            image = decode_image(raw, isic_id)
        except DataError as e:  # a broken tile: size (0, 0), which every consumer leaves out
            print(f"warning: {self.h5_path}: {e}", file=sys.stderr, flush=True)
            return canvas, np.zeros(2, np.int64), self.labels[i], i
        if max(image.shape[:2]) > CANVAS:  # larger than any real tile: shrink on the CPU
            from PIL import Image
            scale = CANVAS / max(image.shape[:2])
            image = np.asarray(Image.fromarray(image).resize(
                (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))))
        canvas[:image.shape[0], :image.shape[1]] = image
        return canvas, np.array(image.shape[:2], np.int64), self.labels[i], i

    def __getstate__(self):  # an open h5py file cannot be pickled: workers reopen it
        return {**self.__dict__, "h5": None, "pid": None}


def image_loader(images, rows=None, batch_size=64, workers=2):
    """Batches of (canvases, sizes, labels, positions in images.ids) of an H5Images, in the order of
    rows (default: all of them)."""
    return torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=rows, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


def prepare_batch(canvas, sizes, out_size, mean, std, device, augment=False, generator=None):
    """uint8 canvases to normalized model input on the device: one grid_sample resizes each tile to
    out_size and, when augmenting, flips, rotates, zooms and shifts it; then colour jitter.
    Coordinates outside a tile are clamped to its border, so rotations add no black corners."""
    x = canvas.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    n = x.shape[0]
    h, w = sizes[:, 0].to(device).float(), sizes[:, 1].to(device).float()
    theta = torch.eye(2, device=device).repeat(n, 1, 1)
    shift = torch.zeros(n, 2, device=device)
    if augment:
        r = torch.rand(n, 6, generator=generator).to(device)
        angle = r[:, 0] * 2 * np.pi
        zoom = 0.75 + 0.25 * r[:, 1]                 # show 75-100% of the tile
        flip = torch.where(r[:, 2] < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos * flip, -sin], 1), torch.stack([sin * flip, cos], 1)], 1)
        theta = theta * zoom[:, None, None]
        shift = (r[:, 3:5] - 0.5) * 2 * (1 - zoom[:, None])
    # output grid in [-1, 1] -> tile coordinates in [-1, 1] -> canvas coordinates
    lin = torch.linspace(-1 + 1 / out_size, 1 - 1 / out_size, out_size, device=device)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    grid = torch.stack([gx, gy], -1).reshape(1, -1, 2)
    grid = torch.einsum("nij,npj->npi", theta, grid.expand(n, -1, -1)) + shift[:, None]
    half = torch.stack([w, h], 1)[:, None] / CANVAS
    edge = 1.001 / (half * CANVAS)  # just inside the outer pixel centres: never a pixel beyond the tile
    grid = -1 + half * (1 + grid.clamp(-1 + edge, 1 - edge))
    x = torch.nn.functional.grid_sample(x, grid.reshape(n, out_size, out_size, 2), mode="bilinear",
                                        padding_mode="border", align_corners=False)
    if augment:
        j = torch.rand(n, 3, generator=generator).to(device)[:, :, None, None, None]
        gray = x.mean(1, keepdim=True)
        x = gray + (x - gray) * (0.8 + 0.4 * j[:, 0])                                   # saturation
        x = x.mean((1, 2, 3), keepdim=True) + (x - x.mean((1, 2, 3), keepdim=True)) * (0.8 + 0.4 * j[:, 1])
        x = (x * (0.85 + 0.3 * j[:, 2])).clamp(0, 1)                                      # brightness
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def amp_dtype(device, cpu_amp=False):
    """bf16 where the GPU has it, fp16 (with a gradient scaler) on older GPUs, none on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_amp else None


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def forward_features_and_logit(model, x):
    """Pre-logits embedding and logit from one pass."""
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return feats, model.get_classifier()(feats).squeeze(1)


@torch.no_grad()
def split_broken(canvas, sizes, *rest):
    """Drops the broken tiles (size 0) of a batch; returns the kept tensors and the broken mask."""
    broken = sizes[:, 0] == 0
    return [t[~broken] for t in (canvas, sizes) + rest], broken


@torch.no_grad()
def predict(model, loader, out_size, mean, std, device, dtype, progress=""):
    """Embeddings (N, D) and logits (N,) of every image of the loader, in its order; NaN for a tile
    that cannot be decoded."""
    model.eval()
    n = len(loader.sampler)
    embs, logits = np.full((n, model.num_features), np.nan, np.float32), np.full(n, np.nan, np.float32)
    seen, t0 = 0, time.time()
    for batch, (canvas, sizes, _, _) in enumerate(loader):
        (canvas, sizes), broken = split_broken(canvas, sizes)
        rows = np.arange(seen, seen + len(broken))[~broken.numpy()]
        seen += len(broken)
        if len(rows):
            x = prepare_batch(canvas, sizes, out_size, mean, std, device)
            with autocast(device, dtype):
                f, z = forward_features_and_logit(model, x)
            embs[rows], logits[rows] = f.float().cpu().numpy(), z.float().cpu().numpy()
        if progress and ((batch + 1) % 50 == 0 or seen == n):
            log(f"{progress}: {seen}/{n} images, {seen / (time.time() - t0):.0f} images/s")
    return embs, logits


# ---------------------------------------------------------------- the demo data set

LOCATIONS = {"head/neck": ["Head & Neck"],
             "anterior torso": ["Torso Front Top Half", "Torso Front Bottom Half", "Torso Front"],
             "posterior torso": ["Torso Back Top Third", "Torso Back Middle Third", "Torso Back Bottom Third",
                                 "Torso Back"],
             "upper extremity": ["Left Arm - Upper", "Left Arm - Lower", "Right Arm - Upper",
                                 "Right Arm - Lower", "Left Arm", "Right Arm"],
             "lower extremity": ["Left Leg - Upper", "Left Leg - Lower", "Right Leg - Upper",
                                 "Right Leg - Lower", "Left Leg", "Right Leg"]}
ATTRIBUTIONS = ["Memorial Sloan Kettering Cancer Center", "ACEMID MIA",
                "ViDIR Group, Department of Dermatology, Medical University of Vienna",
                "Frazer Institute, The University of Queensland, Dermatology Research Centre",
                "Department of Dermatology, Hospital Clínic de Barcelona", "University Hospital of Basel",
                "Department of Dermatology, University of Athens, Andreas Syggros Hospital of Skin and "
                "Venereal Diseases, Alexandra Hospital"]


def simple_location(loc):
    for side in ("Left", "Right"):
        for limb in ("Arm", "Leg"):
            if loc.startswith(f"{side} {limb}"):
                return f"{side} {limb}"
    return {"Head & Neck": "Head & Neck"}.get(loc, "Torso Back" if "Back" in loc else "Torso Front")


def demo_lesions(rng, n_patients, first_patient, first_lesion, malignant_rate):
    """Metadata of a demo cohort. Patients differ more than their lesions do (skin tone, photo
    set-up, lesion load), so absolute values are confounded; a malignant lesion stands out from
    its own patient's lesions (larger, darker, more irregular) by less than patients differ."""
    rows = []
    for p in range(n_patients):
        pid = f"IP_{first_patient + p:07d}"
        n = int(np.clip(rng.lognormal(3.0, 0.8), 3, 300))
        age = float(rng.choice(np.arange(20, 90, 5))) if rng.random() > 0.01 else np.nan
        sex = rng.choice(["male", "female", ""], p=[0.52, 0.46, 0.02])
        attribution = ATTRIBUTIONS[rng.integers(len(ATTRIBUTIONS))]
        tile = rng.choice(["3D: XP", "3D: white"], p=[0.7, 0.3])
        skin = rng.normal([60.0, 15.0, 25.0], [9.0, 3.0, 4.0])          # the patient's L, A, B
        size_scale = rng.lognormal(0.0, 0.35)
        style = rng.normal(0, 1, 6)                                     # patient-level offsets
        n_mal = rng.binomial(n, malignant_rate) if rng.random() < 0.5 else 0
        mal = np.zeros(n, bool)
        mal[rng.choice(n, min(n_mal, max(1, n // 4)), replace=False)] = True
        for j in range(n):
            m = mal[j]
            site = rng.choice(list(LOCATIONS), p=[0.1, 0.22, 0.3, 0.16, 0.22])
            loc = rng.choice(LOCATIONS[site]) if rng.random() > 0.01 else "Unknown"
            d = rng.normal(0, 1, 8) + m * np.array([1.0, 0.8, 0.9, 0.7, 0.8, 0.6, 0.0, 0.0])
            diam = size_scale * np.exp(1.0 + 0.25 * d[0]) + 1.0
            L = skin[0] - 18 - 4 * d[1] + 6 * style[0]
            A, B = skin[1] + 3 + 1.5 * d[2] + 2 * style[1], skin[2] + 3 + 2 * rng.normal()
            area = np.pi * diam * diam / 4 * rng.uniform(0.55, 0.8)
            border = np.clip(4.0 + 1.2 * d[3] + 1.5 * style[2], 1, 10)
            perim = 2 * np.sqrt(np.pi * area) * (1 + 0.05 * border)
            color_std = max(0.0, 0.5 + 0.6 * d[4] + 0.5 * style[3])
            symm = np.clip(0.3 + 0.06 * d[5] + 0.05 * style[4], 0.05, 0.9)
            x, y, z = rng.normal(0, 150), rng.uniform(300, 1700), rng.normal(0, 60)
            Lext, Aext, Bext = skin + rng.normal(0, 1.5, 3)
            dL, dA, dB = L - Lext, A - Aext, B - Bext
            nevi = float(np.clip(100 / (1 + np.exp(-(1.5 - 1.2 * d[0] - d[4] + style[5]))), 0, 100))
            row = {"isic_id": None, "target": float(m), "patient_id": pid, "age_approx": age, "sex": sex,
                   "anatom_site_general": site if rng.random() > 0.015 else "",
                   "clin_size_long_diam_mm": round(diam, 2), "image_type": "TBP tile: close-up",
                   "tbp_tile_type": tile, "tbp_lv_A": A, "tbp_lv_Aext": Aext, "tbp_lv_B": B,
                   "tbp_lv_Bext": Bext, "tbp_lv_C": np.hypot(A, B), "tbp_lv_Cext": np.hypot(Aext, Bext),
                   "tbp_lv_H": np.degrees(np.arctan2(B, A)), "tbp_lv_Hext": np.degrees(np.arctan2(Bext, Aext)),
                   "tbp_lv_L": L, "tbp_lv_Lext": Lext, "tbp_lv_areaMM2": area,
                   "tbp_lv_area_perim_ratio": perim * perim / area, "tbp_lv_color_std_mean": color_std,
                   "tbp_lv_deltaA": dA, "tbp_lv_deltaB": dB, "tbp_lv_deltaL": dL,
                   "tbp_lv_deltaLB": np.hypot(dL, dB), "tbp_lv_deltaLBnorm": np.sqrt(dL ** 2 + dA ** 2 + dB ** 2),
                   "tbp_lv_eccentricity": float(np.clip(0.75 + 0.1 * d[6], 0.2, 0.99)),
                   "tbp_lv_location": loc, "tbp_lv_location_simple": simple_location(loc),
                   "tbp_lv_minorAxisMM": diam * rng.uniform(0.5, 0.9), "tbp_lv_nevi_confidence": nevi,
                   "tbp_lv_norm_border": border, "tbp_lv_norm_color": float(np.clip(2 + 2 * d[4], 0, 10)),
                   "tbp_lv_perimeterMM": perim, "tbp_lv_radial_color_std_max": color_std * rng.uniform(0.3, 1),
                   "tbp_lv_stdL": 1 + 0.4 * abs(d[1]), "tbp_lv_stdLExt": rng.uniform(1, 4),
                   "tbp_lv_symm_2axis": symm, "tbp_lv_symm_2axis_angle": float(rng.integers(0, 36) * 5),
                   "tbp_lv_x": x, "tbp_lv_y": y, "tbp_lv_z": z, "attribution": attribution,
                   "copyright_license": rng.choice(["CC-BY", "CC-BY-NC", "CC-0"]),
                   "lesion_id": f"IL_{rng.integers(10 ** 7):07d}" if m or rng.random() < 0.1 else "",
                   "iddx_full": "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive"
                   if m else "Benign",
                   "iddx_1": "Malignant" if m else "Benign",
                   "iddx_2": "Malignant melanocytic proliferations (Melanoma)" if m else "",
                   "iddx_3": "Melanoma Invasive" if m else "", "iddx_4": "", "iddx_5": "",
                   "mel_mitotic_index": "<1/mm^2" if m and rng.random() < 0.5 else "",
                   "mel_thick_mm": round(rng.uniform(0.2, 2), 2) if m and rng.random() < 0.5 else np.nan,
                   "tbp_lv_dnn_lesion_confidence": float(rng.uniform(50, 100))}
            rows.append(row)
    for k, row in enumerate(rows):
        row["isic_id"] = f"ISIC_{first_lesion + k:07d}"
    return rows


def demo_tile(rng, row, trait):
    """A lesion tile of 61 to 239 px: a dark blob coloured by the row's L/A/B on its patient's skin.
    `trait` adds a blue-white veil with dark dots, a malignant sign that no tabular column carries."""
    from PIL import Image, ImageDraw, ImageFilter
    size = int(np.clip(rng.normal(131, 30), 61, 239))
    skin = lab_to_rgb(row["tbp_lv_Lext"], row["tbp_lv_Aext"], row["tbp_lv_Bext"])
    lesion = lab_to_rgb(row["tbp_lv_L"], row["tbp_lv_A"], row["tbp_lv_B"])
    im = Image.new("RGB", (size, size), skin)
    draw = ImageDraw.Draw(im)
    r = size * np.clip(0.12 + 0.02 * row["clin_size_long_diam_mm"], 0.12, 0.4)
    c = size / 2 + rng.normal(0, size * 0.04, 2)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    wobble = 1 + rng.normal(0, 0.02 * row["tbp_lv_norm_border"], 24)
    draw.polygon([(c[0] + r * w * np.cos(a), c[1] + r * w * np.sin(a) * 0.8) for a, w in zip(angles, wobble)],
                 fill=lesion)
    if trait:
        draw.ellipse([c[0] - r * 0.6, c[1] - r * 0.5, c[0] + r * 0.6, c[1] + r * 0.5], fill=(120, 150, 215))
        for _ in range(10):
            q = c + rng.normal(0, r * 0.3, 2)
            draw.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=(40, 30, 60))
    im = im.filter(ImageFilter.GaussianBlur(1.0))
    noise = rng.normal(0, 6, (size, size, 3))
    arr = np.clip(np.asarray(im, dtype=float) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def lab_to_rgb(L, A, B):
    """CIELAB to 8-bit sRGB (D65), enough for drawing tiles."""
    fy = (L + 16) / 116
    f = np.array([fy + A / 500, fy, fy - B / 200])
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * [0.9505, 1.0, 1.089]
    rgb = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]) @ xyz
    rgb = np.where(rgb > 0.0031308, 1.055 * np.clip(rgb, 0, None) ** (1 / 2.4) - 0.055, 12.92 * rgb)
    return tuple(int(v) for v in np.clip(rgb * 255, 0, 255))


def write_metadata(path, rows, columns):
    def cell(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else repr(round(float(v), 10))
        return str(v)
    write_csv(path, columns, list(zip(*[[cell(r[c]) for c in columns] for r in rows])))


def write_images(path, ids, images):
    import h5py

    def write(f):
        with h5py.File(f, "w") as h5:
            for i, raw in zip(ids, images):
                h5.create_dataset(i, data=np.bytes_(raw))
    atomic_write(path, write)


def make_demo(out_dir, n_patients=120, n_test_patients=20, malignant_rate=0.05, trait_rate=0.9, seed=0):
    """The demo set in the exact Kaggle layout (file names, 55/44 columns in order, HDF5 JPEGs),
    plus demo_test_labels.csv (the hidden answers, so a demo run can be scored on its test set).

    90% of malignant tiles (and 3% of benign ones) carry a visual trait no tabular column has."""
    rng = np.random.default_rng(seed)
    train = demo_lesions(rng, n_patients, 1000000, 1000000, malignant_rate)
    test = demo_lesions(rng, n_test_patients, 2000000, 2000000, malignant_rate)
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        ids = [r["isic_id"] for r in rows]
        trait = [rng.random() < (trait_rate if r["target"] else 0.03) for r in rows]
        write_images(os.path.join(out_dir, f"{name}-image.hdf5"), ids,
                     [demo_tile(rng, r, t) for r, t in zip(rows, trait)])
        write_metadata(os.path.join(out_dir, f"{name}-metadata.csv"), rows,
                       TRAIN_COLUMNS if name == "train" else TEST_COLUMNS)
    write_csv(os.path.join(out_dir, "sample_submission.csv"), ["isic_id", "target"],
              [[r["isic_id"] for r in test], ["0.3"] * len(test)])
    write_csv(os.path.join(out_dir, "demo_test_labels.csv"), ["isic_id", "target"],
              [[r["isic_id"] for r in test], [int(r["target"]) for r in test]])
    n_pos = sum(r["target"] for r in train)
    log(f"demo set in {out_dir}: train {len(train)} lesions of {n_patients} patients ({int(n_pos)} malignant), "
        f"test {len(test)} lesions of {n_test_patients} patients")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write the demo data set in the Kaggle layout")
    demo.add_argument("out_dir")
    demo.add_argument("--patients", type=int, default=120)
    demo.add_argument("--test-patients", type=int, default=20)
    demo.add_argument("--malignant-rate", type=float, default=0.05)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_demo(args.out_dir, args.patients, args.test_patients, args.malignant_rate, seed=args.seed)


if __name__ == "__main__":
    main()
