"""What the stages of the ISIC 2024 pipeline share: reading the CSV files and the HDF5 tiles,
atomic writes and id-checked arrays, the lesions and folds that features.py records in the work
directory, the competition metric, patient normalization, the image-model table, focal loss, the
image loader with device-side resizing and augmentation, and the mixed-precision predict loop.

torch is imported inside the functions that use it, so that the tabular stages (features.py,
gbdt.py, ensemble.py, report.py) run where it is not installed. notebooks.py carries this file and
the scripts into Kaggle notebooks as files.
"""
import argparse
import contextlib
import csv
import errno
import fcntl
import functools
import gc
import glob
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network for weights

KAGGLE_INPUT = "/kaggle/input"  # where Kaggle mounts a notebook's inputs, at a depth that has changed over time
DATA_FILES = ("train-metadata.csv", "train-image.hdf5", "test-metadata.csv", "test-image.hdf5")

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
METADATA_NUMBERS = NUMERIC + ["target", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence"]
MISSING = {"", "na", "nan", "n/a", "null", "none"}


class DataError(Exception):
    """Bad input: the message names the file, the row or isic_id, and what is wrong."""


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def run_main(main):
    """The scripts' entry point: bad input, or a file-system error on a named path (a folder that
    cannot be written, a full disk, a folder where a file should be, a symlink loop, no
    permission), ends with one `error:` line and exit status 2, no traceback. An OSError naming
    no path is a bug or a device failure, and keeps its traceback."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:
            raise
        # the folder at fault, of --work or --models: the path itself where it is a file, else the folder holding it
        folder = e.filename if e.errno in (errno.EEXIST, errno.ENOTDIR) else os.path.dirname(e.filename) or "."
        full = "free some space, or pass a --work on another disk"
        what = {errno.ENOSPC: full, errno.EDQUOT: full,
                errno.EISDIR: "a folder where a file should be: remove or rename it",
                errno.ELOOP: "a symlink that loops: remove it",
                errno.ENOENT: "remove it if it is a dangling symlink, or run the stage that makes it"}.get(
                    e.errno, f"is {folder} a folder you can write to?")
        print(f"error: {e.filename}: {e.strerror}: {what}", file=sys.stderr)
        sys.exit(2)


def number(kind, low=None, high=None, low_open=False, high_open=False, also=()):
    """An argparse type: a finite number of type `kind` from low to high (None: no bound; an open end
    excludes its bound), or one of the values `also` (-1 for "no limit", say). The message names the
    range: "inf" or "nan" would pass a bare comparison, or overflow later."""
    span = " and ".join([f"{'above' if low_open else 'at least'} {low}"] * (low is not None)
                        + [f"{'below' if high_open else 'at most'} {high}"] * (high is not None))
    span = " or ".join([str(v) for v in also] + [span])

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of type {kind.__name__}") from None
        if value in also:
            return value
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, not {text}")
        if (low is not None and not (value > low if low_open else value >= low)
                or high is not None and not (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"must be {span}, not {text}")
        return value
    parse.bounds = (low, high, low_open, high_open)  # for the tests' matrix of every option's bounds
    return parse


SEED = number(int, 0, 2 ** 30)  # NumPy refuses a negative seed; LightGBM's (seed + fold and bag) is a C int

# the names that other stages' outputs already take, in WORK/models, WORK/preds and WORK/records:
# the image models keep their --arch name (models/ARCH/) and extract.py writes img_ARCH; features.py
# and ensemble.py write under their own names
TAKEN_NAMES = ("features", "ensemble")


def gbdt_name(text):
    """An argparse type: the name of a GBDT model, a plain word (letters, digits, _ and -) that no
    other stage's outputs take: models/NAME/, preds/NAME_*.csv and records/NAME.json are its own."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a GBDT name is a plain word of letters, digits, _ and - "
                                         "(64 at most), as the names of its files are")
    taken = ("an image model's --arch name (its fold models are models/ARCH/)" if text in MODEL_CONFIGS
             else "extract.py's name for an image model's scores" if text.startswith("img_")
             else f"{text}.py's name for its outputs" if text in TAKEN_NAMES else None)
    if taken:
        raise argparse.ArgumentTypeError(f"{text!r} is {taken}: choose another name")
    return text


# ---------------------------------------------------------------- atomic writes, id-checked arrays

def atomic_write(path, write):
    """Calls write(file) on a temporary file beside `path`, then renames it: a crash or Ctrl-C leaves
    the old file or none, never half of one. A run killed outright leaves its temporary file
    (.NAME.tmp-*), which the next write of the same file removes. No fsync: it guards against power
    loss only, and would double the time to save the largest feature matrix.

    write gets a stand-in for the file that passes every write through f.write: given the real file,
    np.save writes with tofile, which reports a full disk as an OSError without its errno, and
    torch.save reports it as a RuntimeError. Through write, NumPy writes in 16 MiB pieces (no copy
    of the array), and the first OSError of a write is the one raised, naming `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for leftover in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.tmp-*")):
        os.unlink(leftover)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.tmp-")
    failed = []

    def write_through(data):
        try:
            return f.write(data)
        except OSError as e:
            failed.append(e)
            raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(types.SimpleNamespace(write=write_through, **{m: getattr(f, m) for m in (
                "read", "readinto", "seek", "tell", "truncate", "flush")}))
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs are for sharing
        fault_point(f"writing {tmp}")
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        e = failed[0] if failed else e
        if isinstance(e, OSError) and e.filename is None:  # a full disk, say: name the file being written
            raise OSError(e.errno, e.strerror, path) from None
        raise
    fault_point(f"renaming it to {path}")


def kaggle_user():
    """The Kaggle user name as the kaggle CLI finds it (KAGGLE_USERNAME, else its kaggle.json), or a
    placeholder to replace."""
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    for path in ("~/.kaggle/kaggle.json", "~/.config/kaggle/kaggle.json"):
        try:
            with open(os.path.expanduser(path)) as f:
                return json.load(f)["username"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "YOUR-KAGGLE-NAME"


def write_dataset_metadata(folder, slug, title, user=None):
    """FOLDER/dataset-metadata.json, which `kaggle datasets create -p FOLDER` (and `version`) reads."""
    user = user or kaggle_user()
    write_json(os.path.join(folder, "dataset-metadata.json"),
               {"title": title, "id": f"{user}/{slug}", "licenses": [{"name": "other"}]})
    log(f"wrote {folder}/dataset-metadata.json: the dataset {user}/{slug}")


def atomic_copy(src, dst):
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


KILL_AT = "PIPELINE_KILL_AT"
fault_points = 0  # the points this process has passed


def fault_point(what):
    """Marks a point where a kill leaves a state that the next run must handle: after each temporary
    file is written, and after each rename or removal of outputs. With the environment variable
    PIPELINE_KILL_AT=N the process ends at its Nth point at once, as SIGKILL would (no cleanup, no
    exit handlers): the fault-injection test walks N over every point of each stage."""
    global fault_points
    fault_points += 1
    if os.environ.get(KILL_AT) == str(fault_points):
        print(f"{KILL_AT}={fault_points}: killed after {what}", file=sys.stderr, flush=True)
        os._exit(137)


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


# A JSON state file's schema: a leaf kind (a key of LEAVES), [S] (a list of S), {KEY: S, ...} (an
# object with at least those keys), {"*": S} (an object of any keys, each S), or (S1, S2, ...) (any one)
LEAVES = {"text": (lambda v: isinstance(v, str), "text"),
          "digest": (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None, "a sha256 digest"),
          "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
          "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                     "a finite number"),
          "nan": (lambda v: isinstance(v, float) and math.isnan(v), "NaN"),
          "bool": (lambda v: isinstance(v, bool), "true or false"),
          "null": (lambda v: v is None, "null"),
          "any": (lambda v: True, "anything")}


def schema_text(schema):
    return (LEAVES[schema][1] if isinstance(schema, str) else " or ".join(map(schema_text, schema))
            if isinstance(schema, tuple) else "a list" if isinstance(schema, list) else "an object")


def schema_problem(value, schema, where="the file"):
    """What makes `value` not fit `schema` (None: nothing), naming the place: "weights[2] is "x", not
    a finite number"."""
    fits = (LEAVES[schema][0](value) if isinstance(schema, str)
            else any(schema_problem(value, s, where) is None for s in schema) if isinstance(schema, tuple)
            else isinstance(value, list if isinstance(schema, list) else dict))
    if not fits:
        return f"{where} is {json.dumps(value)[:40]}, not {schema_text(schema)}"
    if isinstance(schema, list):
        items = [(f"{where}[{i}]", v, schema[0]) for i, v in enumerate(value)]
    elif isinstance(schema, dict):
        missing = [k for k in schema if k != "*" and k not in value]
        if missing:
            return f"{where} has no {missing[0]!r}"
        inner = "" if where == "the file" else f"{where}."
        items = [(f"{inner}{k}", v, schema["*"]) for k, v in value.items()] if "*" in schema else [
            (f"{inner}{k}", value[k], s) for k, s in schema.items()]
    else:
        return None
    return next((p for w, v, s in items if (p := schema_problem(v, s, w))), None)


def path_problem(path, folder=False):
    """What stops `path` from being read as a file (as a folder, with folder=True), in words; None:
    nothing. A dangling or looping symlink, or a folder where a file should be, is named as such
    rather than as the operating system's error of whatever reads it next."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if os.path.islink(path):
            return ("a symlink that loops" if e.errno == errno.ELOOP
                    else f"a symlink to {os.readlink(path)}, which does not exist")
        return "not found" if e.errno == errno.ENOENT else e.strerror
    if stat.S_ISDIR(mode) != folder:
        return "a folder where a file should be" if not folder else "a file where a folder should be"
    return None


def read_json(path, rebuild, schema=None, agree=None):
    """A JSON state file written by write_json, checked against `schema` (its types and, through
    agree(obj) -> problem or None, its lists agreeing with one another); a missing, empty,
    truncated, foreign or inconsistent one is a DataError naming the file and `rebuild`, the
    command that makes it."""
    problem = path_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}: run {rebuild}")
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: damaged ({e}): run {rebuild}") from None
    problem = schema_problem(obj, {} if schema is None else schema) or (agree and agree(obj))
    if problem:
        raise DataError(f"{path}: not the file this stage expects ({problem}): run {rebuild}")
    return obj


def save_array(path, array, ids):
    """X.npy with its row ids in X_ids.txt; the ids go first so a reader never sees new rows
    with stale ids."""
    ids_path = path[:-4] + "_ids.txt"
    atomic_write(ids_path, lambda f: f.write(("\n".join(ids) + "\n").encode()))
    atomic_write(path, lambda f: np.save(f, array))
    return [ids_path, path]


def load_array(path, expected_ids, rebuild="the stage that writes it"):
    """X.npy, checked against the ids beside it and against the rows the caller expects; a missing,
    empty or truncated one is a DataError naming the file and `rebuild`, the command that writes it."""
    ids_path = path[:-4] + "_ids.txt"
    for p in (path, ids_path):
        problem = path_problem(p)
        if problem:
            raise DataError(f"{p}: {problem}: run {rebuild}")
    try:
        array = np.load(path)
    except (ValueError, EOFError) as e:  # empty, truncated, or not an .npy file
        raise DataError(f"{path}: damaged ({e}): run {rebuild}") from None
    with open(ids_path) as f:
        ids = f.read().split()
    if len(ids) != len(array):
        raise DataError(f"{path}: {len(array)} rows but {len(ids)} ids in {ids_path}: run {rebuild}")
    check_ids(path, ids, expected_ids)
    return array


def check_ids(path, ids, expected_ids):
    ids, expected = np.asarray(ids, dtype=str), np.asarray(expected_ids, dtype=str)
    if len(ids) != len(expected) or (ids != expected).any():
        first = (int(np.flatnonzero(ids[:len(expected)] != expected[:len(ids)])[0])
                 if (ids[:len(expected)] != expected[:len(ids)]).any() else min(len(ids), len(expected)))
        reordered = len(ids) == len(expected) and (np.sort(ids) == np.sort(expected)).all()
        raise DataError(f"{path}: its ids do not line up with this run's ({len(ids)} rows against "
                        f"{len(expected)}; first difference at row {first}): "
                        + ("the same lesions in another order: is it from a run on the metadata in another order?"
                           if reordered else "is it from another run?"))


def write_args(path, args):
    write_json(path, {"argv": sys.argv, "args": vars(args), "time": time.strftime("%Y-%m-%d %H:%M:%S")})


# ---------------------------------------------------------------- model folders: locked, committed whole, checked

def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lock_file(folder, name, shared):
    """An flock on FOLDER/.lock-NAME, exclusive or shared, held until the process ends however it
    ends (a killed run leaves no stale lock); None where the lock file cannot be made (a read-only
    models folder, which no run can write either)."""
    path = os.path.join(folder, f".lock-{name}")
    if os.path.islink(path) or os.path.isdir(path):  # a lock through a symlink would lock its target's file
        raise DataError(f"{path}: a {'symlink' if os.path.islink(path) else 'folder'} where the lock file of {name} "
                        "should be: remove it")
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(path, "a")
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES):
            return None
        raise
    try:
        fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise DataError(f"{folder}: another run is {'writing' if shared else 'writing or reading'} {name} now; wait "
                        "for it to end, or use another --work and --models") from None
    return f


@contextlib.contextmanager
def stage_locks(args, writes, reads=()):
    """Held while a stage runs: an exclusive lock on each unit it writes, a shared one on each it
    reads, in the work folder and in the models folder alike. Two runs writing one unit stop
    whichever --work or --models each uses, and no unit is rewritten while a run reads it (a fold
    model committed while extract.py scores with it, say). Units: features, image-ARCH (the fold
    models of ARCH together), image-ARCH-foldK, gbdt-NAME, ensemble, report."""
    with contextlib.ExitStack() as held:  # released however the stage ends, a lock it failed to take included
        for shared, units in ((False, writes), (True, reads)):
            for unit in units:
                for folder in dict.fromkeys([args.work, models_folder(args)]):
                    f = lock_file(folder, unit, shared)
                    if f is not None:
                        held.callback(f.close)
        for unit in writes:  # before any work: an output that cannot be written is named now, not after the commit
            check_outputs(args, unit)
        yield


def unit_outputs(args, unit):
    """The files and the folders that the stage writing `unit` may write (see stage_locks)."""
    w, m = args.work, models_folder(args)
    kind, _, name = unit.partition("-")
    arch, _, fold = name.partition("-")
    join = os.path.join
    files = {"features": [join(w, "folds.csv"), join(w, "train_diagnosis.csv"), join(w, "test_lesions.csv")]
             + [join(w, "features", f"{s}{e}") for s in ("train", "test") for e in (".npy", "_ids.txt")]
             + [join(w, "features", "columns.txt"), join(w, "features", "args.json"), join(m, "features.json"),
                join(m, "folds.csv")],
             "gbdt": [join(w, "preds", f"{name}_{s}.csv") for s in ("oof", "test")],
             "image": [] if fold else [join(w, "preds", f"img_{arch}_{s}.csv") for s in ("oof", "test")]
             + [join(w, "emb", f"{arch}_{s}{e}") for s in ("train", "test") for e in (".npy", "_ids.txt")]
             + [join(w, "emb", f"{arch}_args.json"), join(m, arch, "scores.json")],
             "ensemble": [join(w, f) for f in ("submission.csv", "triage.csv", "triage_oof.csv", "ensemble_args.json")]
             + [join(w, "preds", f"ensemble_{s}.csv") for s in ("oof", "test")] + [join(m, "ensemble.json")],
             "report": [join(w, f) for f in ("report.md", "report.html", "report_args.json")]}[kind]
    record = {"features": "features", "gbdt": name, "image": f"img_{arch}", "ensemble": "ensemble"}.get(kind)
    files += [join(w, "records", f"{record}.json")] * (record is not None and not fold)
    models = {"gbdt": [join(m, name)], "image": [join(m, arch, fold)] if fold else []}.get(kind, [])
    folders = [f + end for f in models for end in ("", ".partial", ".old")]
    return files, folders + [join(w, "emb", "parts")] * (kind == "image" and not fold)


def check_outputs(args, unit):
    """Refuses, with one line naming the path, an output of `unit` that could not be replaced: a
    folder where a file should be, a file or a dangling symlink where a folder should be, or a file
    in the place of a folder above them."""
    files, folders = unit_outputs(args, unit)
    for path, folder in [(p, False) for p in files] + [(p, True) for p in folders]:
        above = os.path.dirname(path)
        while above and not os.path.isdir(above) and not os.path.lexists(above):
            above = os.path.dirname(above)
        if above and not os.path.isdir(above):
            raise DataError(f"{above}: {path_problem(above, folder=True)}: remove it, or pass another --work or "
                            "--models")
        problem = path_problem(path, folder) if os.path.lexists(path) else None
        if problem and not (problem.startswith("a symlink") and not folder):  # a file's symlink is replaced
            raise DataError(f"{path}: {problem}: remove it, or pass another --work or --models")


def remove_folder(path):
    """Removes a model folder; a symlink in its place is unlinked, leaving what it points to alone."""
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def commit_folder(partial, final, manifest, leave_out=()):
    """Puts the finished folder `partial` in place of `final`, with manifest.json written into it
    first: what makes the folder, the sha256 of each of its files (but `leave_out` and the
    temporary files of killed writes, which are dropped), and `manifest`'s facts (arguments,
    features, folds, the digests of its inputs). An older `final` is removed whole."""
    files = sorted(f for f in os.listdir(partial) if f not in leave_out and not f.startswith("."))
    manifest["files"] = {f: file_digest(os.path.join(partial, f)) for f in files}
    write_json(os.path.join(partial, "manifest.json"), manifest)
    finish_commit(final)


def finish_commit(final):
    """Completes a commit from wherever a kill stopped it: a FINAL.partial whose manifest is written
    and checks is complete, and goes in place of FINAL (which becomes FINAL.old on the way, then is
    removed); a complete FINAL.old with no FINAL (a second run killed after removing the .partial)
    goes back; a FINAL.old beside a FINAL is removed. A .partial without a manifest is a run still
    in progress (or one to --resume), and is left alone. Every stage that uses a model folder calls
    this first (readers too, where they can write), so a kill at any instant loses no model."""
    partial, old = final + ".partial", final + ".old"
    if folder_problem(partial) is None:
        manifest = os.path.join(partial, "manifest.json")
        with open(manifest) as f:
            listed = set(json.load(f)["files"])
        for name in set(os.listdir(partial)) - listed - {"manifest.json"}:  # resume.pt, temporary files
            os.remove(os.path.join(partial, name))
            fault_point(f"removing {name} from {partial}")
        if os.path.lexists(final):
            remove_folder(old)
            os.rename(final, old)
            fault_point(f"renaming {final} to {old}")
        os.rename(partial, final)
        fault_point(f"renaming {partial} to {final}")
    elif not os.path.isdir(final) and folder_problem(old) is None:  # the new one gone before it was in: the old back
        os.rename(old, final)
        fault_point(f"renaming {old} to {final}")
    if os.path.lexists(old) and folder_problem(final) is None:
        remove_folder(old)
        fault_point(f"removing {old}")


MANIFEST = {"files": {"*": "digest"}}
# what train_backbone.py adds to a fold model's manifest, which extract.py and notebooks.py read
FOLD_MANIFEST = {"arch": "text", "fold": "int", "lesions": "digest", "val_pauc": {"*": ("number", "nan")}}


def folder_problem(folder, files=None):
    """What stops `folder` from being a complete committed folder (None: nothing): its manifest.json
    missing or damaged, or a file it lists (of `files`, where given) missing or changed."""
    path = os.path.join(folder, "manifest.json")
    problem = path_problem(path)
    if problem:
        return ("not a complete trained model (no manifest.json)" if problem == "not found"
                else f"its manifest.json: {problem}")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode())
    except (UnicodeDecodeError, ValueError):
        return "its manifest.json is damaged"
    problem = schema_problem(manifest, MANIFEST)
    if problem:
        return f"its manifest.json is damaged ({problem})"
    listed = manifest["files"].items()
    absent = [name for name in files or () if name not in manifest["files"]]
    if absent:
        return f"{absent[0]} is not one of the files it was made with"
    for name, digest in listed:
        if files is not None and name not in files:
            continue
        p = os.path.join(folder, name)
        if not os.path.exists(p) or file_digest(p) != digest:
            return (f"{name} is missing or is not the file this model was trained with (an incomplete copy, or "
                    "the files of two runs mixed)")
    return None


def read_manifest(folder, rerun, files=None, schema=None, agree=None):
    """A committed folder's manifest, with its digest ("digest": what a consumer records), after
    finishing a commit that a kill interrupted (where the folder can be written) and checking every
    file it lists (or the listed `files` only: a consumer reads and hashes only what it uses) and
    the stage's facts in it (`schema` and `agree`, as read_json takes them); `rerun` is the command
    that makes the folder, for the message."""
    if os.access(os.path.dirname(os.path.abspath(folder)), os.W_OK):
        finish_commit(folder)
    problem = folder_problem(folder, files)
    if problem:
        raise DataError(f"{folder}: {problem}: run {rerun}")
    path = os.path.join(folder, "manifest.json")
    return {**read_json(path, rerun, {**MANIFEST, **(schema or {})}, agree), "digest": file_digest(path)}


RECORD = {"files": {"*": "digest"}, "made_by": ("digest", "null")}


def write_record(work, name, paths, made_by=None):
    """WORK/records/NAME.json, written after the outputs `paths` of one run of a stage: each one's
    sha256, and `made_by`, the digest of the model they come from. Readers check what they read
    against it (check_record): outputs that a killed run left half rewritten, or that two runs
    mixed, are refused rather than used."""
    write_json(os.path.join(work, "records", f"{name}.json"),
               {"files": {os.path.relpath(p, work): file_digest(p) for p in paths}, "made_by": made_by})


def check_record(work, name, paths, rebuild, made_by=None):
    """Checks that the outputs `paths` are those that the last complete run of NAME wrote (and, with
    `made_by`, that they come from that model); `rebuild` names the command that remakes them."""
    record = read_json(os.path.join(work, "records", f"{name}.json"), rebuild, RECORD)
    for p in paths:
        problem = path_problem(p)
        if problem:
            raise DataError(f"{p}: {problem}: run {rebuild}")
        if record["files"].get(os.path.relpath(p, work)) != file_digest(p):
            raise DataError(f"{p}: not the file that the last complete run of {rebuild} wrote (a run killed while "
                            f"writing, or the files of two runs mixed): run {rebuild} again")
    if made_by is not None and record["made_by"] != made_by:
        raise DataError(f"{work}/records/{name}.json: these outputs come from another model than the models folder "
                        f"holds now (a run killed between its model and its outputs?): run {rebuild} again")


# ---------------------------------------------------------------- reading CSV files

def parse_floats(values, path, column, lines):
    """Strings to float64: '45', '45.0', '8.05E-13', ' 3.2 ' parse; '', 'NA', 'nan' are missing; 'inf'
    or 1e39 (beyond float32) is an error. lines: each value's line in the file, for the message."""
    try:
        out = np.array(values, dtype=np.float64)  # every field a number (or 'nan'): NumPy parses them at once
    except ValueError:  # missing values, or text
        out = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            if v.strip().lower() not in MISSING:
                try:
                    out[i] = float(v)
                except ValueError:
                    raise DataError(f"{path}: line {lines[i]}, column {column}: {v!r} is not a number") from None
    unmeasurable = np.flatnonzero(~np.isnan(out) & ~(np.abs(out) <= np.finfo(np.float32).max))
    if len(unmeasurable):  # inf, or a number the float32 feature matrix cannot hold
        i = unmeasurable[0]
        raise DataError(f"{path}: line {lines[i]}, column {column}: {values[i]!r} is not a finite number")
    return out


def csv_problem(error):
    """What a csv.Error means, in this file's terms."""
    if "unexpected end of data" in str(error) or "field larger than field limit" in str(error):
        return "a double quote opened in this row is never closed"
    if "expected after" in str(error):
        return "a closing double quote is followed by more text: is a quote in this row unbalanced?"
    return str(error)


def read_csv(path, required=(), numbers=(), keys=(), only_required=False):
    """A CSV file as {column: array}, in file order (only_required: the required columns alone, the
    others left unconverted): the columns named in `numbers` as float64 (NaN = missing), the others
    as object arrays of str; every field stripped of surrounding spaces. Each field of the `keys`
    columns (ids) must be non-empty, with no space inside.

    Python's csv module reads it, strict, so that a broken quote is an error. Quoted fields may hold
    commas, quotes and line breaks; CRLF or CR line ends, a UTF-8 BOM and blank lines are fine.
    Anything else is a DataError naming the file, the line (where its record starts) and the column."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text, undecodable = raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:  # kept as surrogates, so that the message below can name the field
        text, undecodable = raw.decode("utf-8-sig", errors="surrogateescape"), True
    with gc_paused():
        return csv_columns(path, text, undecodable, required, numbers, keys, only_required)


@contextlib.contextmanager
def gc_paused():
    """Python's cycle collector paused while millions of fields become lists and tuples: it would
    rescan the growing heap again and again, which doubles the time to read a large CSV."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def csv_columns(path, text, undecodable, required, numbers, keys, only_required):
    """read_csv's work on the decoded text (undecodable: it holds bytes that were not UTF-8)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, skipinitialspace=True)
    rows, lines, line = [], [], 0  # line: the last line of the record before
    try:
        for row in reader:
            if row:  # a blank line
                rows.append(row)
                lines.append(line + 1)
            line = reader.line_num
    except csv.Error as e:
        raise DataError(f"{path}: line {line + 1}: {csv_problem(e)}") from None
    if not rows:
        raise DataError(f"{path}: the file is empty (no header line)")
    header, rows, lines = [h.strip() for h in rows[0]], rows[1:], lines[1:]
    separator = next((s for s in ";\t|" if len(header) == 1 and s in header[0]), None)
    if separator:
        raise DataError(f"{path}: the header has 1 field: is the file separated by {separator!r}? It must be "
                        "separated by commas")
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise DataError(f"{path}: column {twice[0]} appears {header.count(twice[0])} times in the header")
    if undecodable:
        for i, row in enumerate([header] + rows):
            for name, value in zip(header, row):
                if re.search("[\udc80-\udcff]", value):
                    where = f"line {lines[i - 1]}, column {name}" if i else "the header line"
                    raise DataError(f"{path}: {where}: {value.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text")
    ragged = next((i for i, row in enumerate(rows) if len(row) != len(header)), None)
    if ragged is not None:
        raise DataError(f"{path}: line {lines[ragged]} has {len(rows[ragged])} fields, the header has {len(header)}")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(missing)}")
    columns = zip(*rows) if rows else [()] * len(header)
    # text is interned: a category's 400,000 fields become one string, hashed once (features.codes)
    table = {name: parse_floats(values, path, name, lines) if name in numbers
             else np.array([sys.intern(v.strip()) for v in values], dtype=object)
             for name, values in zip(header, columns) if name in required or not only_required}
    for name in keys:
        bad = next((i for i, v in enumerate(table[name]) if not v or " " in v), None)
        if bad is not None:
            value = table[name][bad]
            raise DataError(f"{path}: line {lines[bad]}, column {name}: "
                            + (f"{value!r} has a space inside" if value else "empty"))
    return table


def read_metadata(path, required, numbers=METADATA_NUMBERS, only_required=False):
    """A Kaggle metadata CSV as {column: array}: numeric columns float64 (NaN = missing), others str."""
    table = read_csv(path, required, numbers, [c for c in ("isic_id", "patient_id") if c in required], only_required)
    ids = table["isic_id"]
    if len(set(ids)) < len(ids):
        uniq, counts = np.unique(ids.astype(str), return_counts=True)
        raise DataError(f"{path}: duplicated isic_id {', '.join(uniq[counts > 1][:5])}")
    return table


def input_folders(root, holds, max_depth=6):
    """The folders under `root`, at any depth down to max_depth, that hold(folder, names) accepts
    (names: the files and folders in it), shallowest first, each once (Kaggle may link one input
    under two paths)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        if os.path.relpath(folder, root).count(os.sep) + 1 >= max_depth:
            dirs[:] = []
        real = os.path.realpath(folder)
        if real not in seen and holds(folder, set(files) | set(dirs)):
            seen.add(real)
            found.append(folder)
    return sorted(found, key=lambda f: (f.count(os.sep), f))


def find_input(root, what, holds, required=True):
    """The one folder under `root` (at any depth) that holds `what`, printed. None found: a DataError
    that says what was searched for and where (None when not `required`); more than one: a
    DataError naming them all."""
    found = input_folders(root, holds)  # none where root does not exist
    if len(found) > 1:
        raise DataError(f"{len(found)} folders under {root} hold {what}: {', '.join(found)}: set the one to use "
                        "in the settings")
    if not found:
        if required:
            raise DataError(f"no folder under {root}, at any depth, holds {what}: add it as an input, or set its "
                            "path in the settings")
        return None
    log(f"found {what} in {found[0]}")
    return found[0]


def holds_data(folder, names):
    return all(f in names for f in DATA_FILES)


def default_data_dir():
    """The competition's folder where no --data is given: on Kaggle, the one under KAGGLE_INPUT that
    holds its four files (searched once a process); elsewhere None."""
    return found_data_dir(KAGGLE_INPUT) if os.path.isdir(KAGGLE_INPUT) else None


@functools.lru_cache
def found_data_dir(root):
    return find_input(root, f"the competition's files ({', '.join(DATA_FILES)})", holds_data)


def add_path_flags(parser, models=True):
    """--data, --work and (models=True) --models: one meaning and one default in every stage."""
    parser.add_argument("--data", help=f"folder with the Kaggle files (default: on Kaggle, the folder under "
                                       f"{KAGGLE_INPUT} that holds them)")
    parser.add_argument("--work", default="work", help="folder of the stages' outputs (default: work)")
    if models:
        parser.add_argument("--models", help="folder of trained models (default: WORK/models); may be read-only")


def models_folder(args):
    return getattr(args, "models", None) or os.path.join(args.work, "models")


def data_path(data_dir, name):
    data_dir = data_dir or default_data_dir()
    if data_dir is None:
        raise DataError("no --data given: pass --data DIR (a folder holding train-metadata.csv, "
                        "train-image.hdf5, test-metadata.csv, test-image.hdf5), or make the demo set "
                        "with `python demo.py demo_data` and pass --data demo_data")
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    return path


def check_labels(path, ids, target):
    """Every label 0 or 1."""
    bad = np.flatnonzero(~np.isin(target, (0.0, 1.0)))
    if len(bad):
        value = "empty" if np.isnan(target[bad[0]]) else f"{target[bad[0]]:g}"
        raise DataError(f"{path}: isic_id {ids[bad[0]]}: target is {value}, not 0 or 1 ({len(bad)} such row(s))")


def check_classes(path, target, rows="the training lesions", needs="training needs"):
    """Training (or scoring) needs both classes."""
    classes = np.unique(target)
    if len(classes) < 2:
        held = f"only lesions of target {int(classes[0])}" if len(classes) else "no lesion"
        raise DataError(f"{path}: {rows} hold {held}: {needs} malignant and benign lesions")


def check_folds(path, target, folds):
    """Every training fold (the rows of every other fold) must hold both classes."""
    for k in np.unique(folds):
        check_classes(path, target[folds != k], f"the training rows of fold {k} (too few patients with a "
                                                  "malignant lesion for the folds?)")


def read_train(data_dir):
    """The train metadata's columns that the pipeline uses (iddx_1, the diagnosis: for training
    weights only, never a feature)."""
    path = data_path(data_dir, "train-metadata.csv")
    table = read_metadata(path, ["isic_id", "patient_id", "target", "iddx_1"] + NUMERIC + CATEGORICAL,
                          only_required=True)
    check_labels(path, table["isic_id"], table["target"])
    check_classes(path, table["target"])
    return table


def read_test(data_dir):
    """The test metadata's columns that the pipeline uses (train-only ones a test file may carry are
    left unread)."""
    return read_metadata(data_path(data_dir, "test-metadata.csv"), ["isic_id", "patient_id"] + NUMERIC + CATEGORICAL,
                         only_required=True)


def read_lesions(work, split, recorded=True):
    """The lesions of one split in metadata order, as features.py recorded them: isic_id, patient_id
    and, for train, target and fold (WORK/folds.csv); for test, WORK/test_lesions.csv. Checked
    against features.py's record (recorded=False: features.py rereading the folds it made)."""
    path = os.path.join(work, "folds.csv" if split == "train" else "test_lesions.csv")
    if not os.path.exists(path):
        raise DataError(f"{path}: not found: run features.py first (it records the lesions of each split)")
    if recorded:
        check_record(work, "features", [path], "features.py")
    numbers = ["target", "fold"] if split == "train" else []
    lesions = read_csv(path, ["isic_id", "patient_id"] + numbers, numbers, keys=["isic_id", "patient_id"])
    if split == "train":
        check_labels(path, lesions["isic_id"], lesions["target"])
        check_folds(path, lesions["target"], lesions["fold"])
    for c in numbers:
        lesions[c] = lesions[c].astype(int)
    if split == "train":  # a patient in two folds would be scored by a model trained on its other lesions
        _, first, patient = np.unique(codes(lesions["patient_id"]), return_index=True, return_inverse=True)
        fold_of = lesions["fold"][first]  # each patient's fold at its first lesion
        apart = np.flatnonzero(lesions["fold"] != fold_of[patient])
        if len(apart):
            i = apart[0]
            raise DataError(f"{path}: patient_id {lesions['patient_id'][i]} is in fold {fold_of[patient[i]]} and in "
                            f"fold {lesions['fold'][i]} (isic_id {lesions['isic_id'][i]}): each patient's lesions must "
                            "be in one fold: delete folds.csv, then run features.py and every later stage again")
    return lesions


def lesions_digest(work):
    """What identifies the training lesions and their folds: model manifests record it, so that a
    fold model is never used on folds other than those it was trained with."""
    return file_digest(os.path.join(work, "folds.csv"))


def read_preds(work, name, split, ids, made_by=None):
    """A model's predictions (WORK/preds/NAME_{oof,test}.csv), checked against the split's ids and
    against the record of the run that wrote them (with `made_by`: that it ran the model whose
    digest that is); NaN where the model has none."""
    path = preds_path(work, name, split)
    check_record(work, name, [path], preds_stage(name), made_by)
    table = read_csv(path, ["isic_id", "pred"], ["pred"])
    check_ids(path, table["isic_id"], ids)
    return table["pred"]


def preds_stage(name):
    """The command that writes preds/NAME_*.csv."""
    return (f"extract.py --arch {name[4:]}" if name.startswith("img_") else "ensemble.py" if name == "ensemble"
            else f"gbdt.py --name {name}")


def preds_path(work, name, split):
    return os.path.join(work, "preds", f"{name}_{'oof' if split == 'train' else 'test'}.csv")


def write_preds(work, name, split, lesions, pred):
    """WORK/preds/NAME_oof.csv (isic_id,target,fold,pred) for train, NAME_test.csv (isic_id,pred) for
    test; returns its path, for the stage's record."""
    path = preds_path(work, name, split)
    if split == "train":
        write_csv(path, ["isic_id", "target", "fold", "pred"], [lesions["isic_id"], lesions["target"], lesions["fold"], pred])
    else:
        write_csv(path, ["isic_id", "pred"], [lesions["isic_id"], pred])
    return path


# ---------------------------------------------------------------- the metrics

MIN_TPR = 0.80  # the competition's score is the ROC area above this true positive rate


def roc_points(y_true, y_score):
    """FPR and TPR at each distinct threshold, (0, 0) first; tied scores form one point."""
    order = np.argsort(-y_score, kind="mergesort")
    y, s = y_true[order], y_score[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]


def pauc(y_true, y_pred, min_tpr=MIN_TPR):
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


def pauc_or_nan(y_true, y_pred):
    """pAUC, or NaN where the rows hold one class (a fold or validation set without positives)."""
    y_true = np.asarray(y_true)
    return pauc(y_true, y_pred) if 0 < y_true.sum() < len(y_true) else float("nan")


def rank_in_patient(score, patients):
    """1 for each patient's highest-scored lesion, 2 for the next, ...; ties in the given order."""
    n = len(score)
    patient = codes(patients)
    order = np.lexsort((np.arange(n), -score, patient))
    first = np.r_[True, patient[order][1:] != patient[order][:-1]]
    rank = np.empty(n, int)
    rank[order] = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0)) + 1
    return rank


# ---------------------------------------------------------------- patient normalization

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


def codes(values, vocabulary=None):
    """Integer codes of a column of strings: the position in vocabulary (-1 where absent), or without
    one, distinct per distinct value. A dict lookup per row: sorting the strings takes longer."""
    if vocabulary is None:
        index = {}
        return np.fromiter(map(index.setdefault, values, itertools.count()), np.int64, len(values))
    index = {v: i for i, v in enumerate(vocabulary)}
    return np.fromiter(map(index.get, values, itertools.repeat(-1)), np.int64, len(values))


STATS = ("z", "pct", "dev", "is_max", "is_min")


def patient_normalize(x, patient_ids, out=None, stats=STATS):
    """Each feature against the same patient's other lesions.

    Returns {"z", "pct", "dev", "is_max", "is_min"}, each (N, F): z-score (population std, 0 where
    the std is 0), average rank within the patient (ties averaged) / n, x - median, and 1.0 where x
    is the patient's max / min. Statistics skip missing values; a missing x gives NaN everywhere.
    Each feature is sorted within each patient (no loop over patients), the features in parallel
    threads (NumPy releases the GIL); the results are feature-major in memory, (F, N) transposed,
    computed in float64 and written into `out` (len(stats), F, N) when given: rows of a float32
    matrix, say. `stats`: a subset of STATS, to compute only those."""
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
    out = dict(zip(stats, np.empty((len(stats), n_feat, n_rows)) if out is None else out))

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
        if "pct" in out:
            with np.errstate(divide="ignore", invalid="ignore"):  # a patient whose values are all missing
                out["pct"][j, rows[order]] = np.where(ok, rank / np.repeat(n, n_in), np.nan)
        # the other statistics in row order, from per-patient tables: no scatter needed;
        # a std of 0 divides as infinity, so z = 0 there (and stays NaN for a missing x)
        missing = np.isnan(xj)
        if "z" in out:
            out["z"][j] = (xj - mean[patient]) / np.where(std > 0, std, np.inf)[patient]
        if "dev" in out:
            out["dev"][j] = xj - median[patient]
        if "is_max" in out:
            out["is_max"][j] = np.where(missing, np.nan, xj == v[start + n1 - 1][patient])
        if "is_min" in out:
            out["is_min"][j] = np.where(missing, np.nan, xj == v[start][patient])

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(feature, range(n_feat)))
    return {k: v.T for k, v in out.items()}


# ---------------------------------------------------------------- HDF5 tiles

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


def open_h5(path):
    import h5py
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: cannot be read as an HDF5 file ({e}): is it complete, and the Kaggle image "
                        "file?") from None


def check_image_ids(h5_path, ids, lenient=False):
    """Every metadata isic_id must have an image, and the reverse. lenient (a submission): images
    that the metadata does not list are ignored, and lesions without an image are scored without
    image features (NaN), each with one warning line."""
    with open_h5(h5_path) as h5:
        stored = set(h5.keys())
    lacking = [i for i in ids if i not in stored]
    extra = sorted(stored - set(ids))
    if lacking and lenient:
        log(f"warning: {h5_path}: no image for {len(lacking)} isic_id(s) of the metadata (scored without image "
            f"features): {', '.join(lacking[:5])}")
    elif lacking:
        raise DataError(f"{h5_path}: no image for {len(lacking)} isic_id(s) of the metadata, "
                        f"e.g. {', '.join(lacking[:5])}")
    if extra and lenient:
        log(f"warning: {h5_path}: {len(extra)} image(s) whose isic_id is not in the metadata, ignored: "
            f"{', '.join(extra[:5])}")
    elif extra:
        raise DataError(f"{h5_path}: {len(extra)} image(s) whose isic_id is not in the metadata, "
                        f"e.g. {', '.join(extra[:5])}")


# ---------------------------------------------------------------- image models

# the design's backbones, and tiny ones for tests and the CPU demo
# act_mib(_ckpt): MiB that autograd saves per image in a training forward at img_size, without (with)
# gradient checkpointing, as bench.counted_training_forward counts them; train_backbone.py sizes its micro-batches by
# them
MODEL_CONFIGS = {
    "eva02_small": dict(model_name="eva02_small_patch14_336.mim_in22k_ft_in1k", feature_dim=384, img_size=336,
                        act_mib=115.9, act_mib_ckpt=10.8),
    "eva02_base": dict(model_name="eva02_base_patch14_448.mim_in22k_ft_in22k_in1k", feature_dim=768, img_size=448,
                       act_mib=524.5, act_mib_ckpt=37.2),
    "convnext": dict(model_name="convnextv2_tiny.fcmae_ft_in22k_in1k", feature_dim=768, img_size=224,
                     act_mib=103.0, act_mib_ckpt=10.3),
    "eva02_tiny": dict(model_name="eva02_tiny_patch14_224.mim_in22k", feature_dim=192, img_size=56,
                       act_mib=1.7, act_mib_ckpt=0.17),
    "convnext_atto": dict(model_name="convnextv2_atto.fcmae_ft_in1k", feature_dim=320, img_size=64,
                          act_mib=2.5, act_mib_ckpt=0.30),
}


CANVAS = 256  # tiles (61 to 239 px) are placed, not resized, on a canvas this size; the GPU resizes


def build_model(arch, weights=None, pretrained=True, drop_path=0.1, one_logit=True):
    """A timm backbone with a one-logit head (one_logit=False: the head it was pretrained with).
    Weights come from `weights` (a .safetensors or .pth file), else timm's local cache; nothing is
    downloaded unless HF_HUB_OFFLINE=0 is set."""
    import timm
    import torch
    cfg = MODEL_CONFIGS[arch]
    kwargs = dict(drop_path_rate=drop_path, **({"num_classes": 1} if one_logit else {}))
    if cfg["model_name"].startswith("eva02"):
        kwargs["img_size"] = cfg["img_size"]
    if weights and not os.path.exists(weights):
        raise DataError(f"{weights}: weights file not found")
    try:
        model = timm.create_model(cfg["model_name"], pretrained=pretrained or bool(weights),
                                  **(dict(pretrained_cfg_overlay=dict(file=weights)) if weights else {}), **kwargs)
    except (FileNotFoundError, ConnectionError) as e:  # not in the local cache, and the hub offline or unreachable
        raise DataError(f"no local pretrained weights for {cfg['model_name']} ({type(e).__name__}): pass "
                        "--weights PATH (a .safetensors or .pth file), or --no-pretrained; with internet, "
                        "HF_HUB_OFFLINE=0 lets timm download them") from None
    if one_logit:
        assert type(model.get_classifier()) is torch.nn.Linear, type(model.get_classifier())
        head = model.get_classifier()
        head.forward = types.MethodType(float32_linear, head)  # same parameters, same state_dict keys
    return model


def float32_linear(linear, x):
    """A linear layer's forward in float32 under autocast too. The one-logit head: an fp16 or bf16
    logit has 11 or 8 significant bits, so a patient's lesions would tie in score."""
    import torch
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), linear.weight, linear.bias)


def normalization(model):
    import timm
    cfg = timm.data.resolve_data_config({}, model=model)
    return cfg["mean"], cfg["std"]


def focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    """Focal loss on logits, mean over the batch: alpha_t (1 - p_t)^gamma BCE, with 1 - p_t computed
    as sigmoid(-logit) for positives and sigmoid(logit) for negatives, exact at logits of +-50."""
    import torch
    targets = targets.to(logits.dtype)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    one_minus_pt = torch.sigmoid(logits * (1 - 2 * targets))
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * one_minus_pt ** gamma * bce).mean()


MISSING_IMAGE = (None, 0)  # H5Images' location of an image that the file lacks


class H5Images:
    """Tiles of an HDF5 file as uint8 canvases (CANVAS x CANVAS x 3, the tile top-left) with their
    height and width: a map-style dataset for torch's DataLoader. The file is opened in the process
    that reads it, so DataLoader workers started by fork or spawn each get their own handle."""

    def __init__(self, h5_path, ids, labels=None, missing_ok=False):
        self.h5_path, self.ids = h5_path, list(ids)
        self.labels = np.zeros(len(self.ids), np.float32) if labels is None else np.asarray(labels, np.float32)
        self.h5, self.pid = None, None
        with open_h5(h5_path) as h5:  # found once, here: a missing image stops the run before it starts
            stored = set(h5.keys()) if missing_ok else ()  # missing_ok: a missing image is a broken tile
            self.locations = [image_location(h5, i) if not missing_ok or i in stored else MISSING_IMAGE
                              for i in self.ids]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if self.pid != os.getpid():
            self.h5, self.pid = open_h5(self.h5_path), os.getpid()
        isic_id = self.ids[i]
        raw = b"" if self.locations[i] is MISSING_IMAGE else read_image_bytes(self.h5, isic_id, self.locations[i])
        # left uninitialized: prepare_batch never samples outside the tile, and zero-filling the
        # 192 KB canvas was a large share of the loader's time per tile (BENCHMARKS.md)
        canvas = np.empty((CANVAS, CANVAS, 3), np.uint8)
        try:
            image = decode_image(raw, isic_id)
        except DataError:  # a broken tile: size (0, 0), which every consumer leaves out and reports
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

    def problem(self, i):
        """Why tile i cannot be decoded."""
        if self.locations[i] is MISSING_IMAGE:
            return f"isic_id {self.ids[i]}: no image in the file"
        with open_h5(self.h5_path) as h5:
            try:
                decode_image(read_image_bytes(h5, self.ids[i], self.locations[i]), self.ids[i])
            except DataError as e:
                return str(e)
        return f"isic_id {self.ids[i]}: decodes"


def broken_tiles(images, positions, what, consequence, problem="cannot be decoded"):
    """One warning line for the tiles (positions in images.ids) that cannot be decoded."""
    if len(positions) == 0:
        return
    ids = [images.ids[i] for i in positions[:5]]
    log(f"warning: {len(positions)} {what} image(s) {problem} ({consequence}): {', '.join(ids)}"
        + (", ..." if len(positions) > 5 else ""))


def image_loader(images, rows=None, batch_size=64, workers=2):
    """Batches of (canvases, sizes, labels, positions in images.ids) of an H5Images, in the order of
    rows (default: all of them)."""
    import torch
    return torch.utils.data.DataLoader(images, batch_size=batch_size, sampler=rows, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


# uniform numbers per tile that prepare_batch's augmentation uses: 0 rotation, 1 zoom, 2 flip, 3-4 shift,
# 5 blur, 6-8 colour, 9 noise, 10 the noise's seed, 11 cutout, 12-13 where the cutout goes
AUGMENT_DRAWS = 14
BLUR_P, NOISE_P, CUTOUT_P = 0.25, 0.25, 0.5  # the share of tiles that each of them changes
CENTRE_KEPT = 0.25  # cutout never covers this half-side (output units, [-1, 1] across) around the tile's centre


def prepare_batch(canvas, sizes, out_size, mean, std, device, draws=None):
    """uint8 canvases to normalized model input on the device: one grid_sample resizes each tile to
    out_size and, given draws (n, AUGMENT_DRAWS) uniform numbers, flips, rotates, zooms and shifts
    it, then jitters its colour, blurs it, adds noise and cuts a square out of it (pixels_aug,
    cutout_mask). The draws come from the caller, so that a batch split across processes is
    augmented as it would be whole. Coordinates outside a tile are clamped to its border, so
    rotations add no black corners."""
    import torch
    x = canvas.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    n = x.shape[0]
    h, w = sizes[:, 0].to(device).float(), sizes[:, 1].to(device).float()
    theta = torch.eye(2, device=device).repeat(n, 1, 1)
    shift = torch.zeros(n, 2, device=device)
    if draws is not None:
        r = draws.to(device)
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
    if draws is not None:
        x = pixels_aug(x, r, draws.float().cpu(), sizes)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if draws is not None:  # 0 after normalization: the normalization's mean colour
        x = x.masked_fill(cutout_mask(r, theta, shift, lin)[:, None], 0.0)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def pixels_aug(x, r, cpu_draws, sizes):
    """Colour jitter, then, for the tiles whose draw says so, Gaussian blur of 0.5 to 1.5 of the
    tile's own pixels (a focus a little off) and Gaussian noise of standard deviation 0.02 to 0.08.
    x: (n, 3, S, S) in [0, 1], r: the draws on x's device; cpu_draws, sizes: on the CPU, where the
    blur's kernels, the noise's seeds and the tiles' indices (a boolean mask on a GPU would wait for
    it) are made without waiting for the device."""
    j = r[:, 6:9, None, None, None]
    gray = x.mean(1, keepdim=True)
    x = gray + (x - gray) * (0.8 + 0.4 * j[:, 0])                                   # saturation
    x = x.mean((1, 2, 3), keepdim=True) + (x - x.mean((1, 2, 3), keepdim=True)) * (0.8 + 0.4 * j[:, 1])
    x = (x * (0.85 + 0.3 * j[:, 2])).clamp(0, 1)                                      # brightness
    blur = cpu_draws[:, 5] < BLUR_P
    if blur.any():
        on = blur.nonzero().flatten().to(x.device)
        sigma = 0.5 + cpu_draws[blur, 5, None] / BLUR_P    # in tile pixels
        zoom = 0.75 + 0.25 * cpu_draws[blur, 1, None]      # prepare_batch's, on the CPU
        x[on] = gaussian_blur(x[on], sigma * x.shape[-1] / (zoom * sizes[blur].float()))  # output pixels, y and x
    noise = cpu_draws[:, 9] < NOISE_P
    if noise.any():
        on = noise.nonzero().flatten().to(x.device)
        sd = 0.02 + 0.06 * r[on, 9, None, None, None] / NOISE_P
        seeds = (cpu_draws[noise, 10] * 2 ** 24).long().tolist()
        x[on] = (x[on] + sd * seeded_normal(x.shape[1:], seeds, x.device)).clamp(0, 1)
    return x


def gaussian_blur(x, sigma_yx):
    """Each image of x (m, C, H, W) blurred by its own Gaussian, sigma_yx (m, 2) pixels along y and
    x (a CPU tensor): separable, the edges replicated."""
    import torch
    m, c = x.shape[:2]
    radius = max(1, int(np.ceil(3 * sigma_yx.max().item())))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    y = x.reshape(1, m * c, *x.shape[2:])
    for axis, shape, pad in ((0, (-1, 1), (0, 0, radius, radius)), (1, (1, -1), (radius, radius, 0, 0))):
        sigma = sigma_yx[:, axis, None]
        # each kernel cut at its own 3 sigma, not the batch's: a tile is blurred alike in any batch
        k = torch.exp(-0.5 * (t / sigma) ** 2) * (t.abs() <= torch.ceil(3 * sigma))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).view(m * c, 1, *shape).to(x.device)
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, pad, mode="replicate"), k, groups=m * c)
    return y.reshape(x.shape)


def seeded_normal(shape, seeds, device):
    """One standard normal tensor of `shape` for each seed, each from its own generator: a tile gets
    the same noise whichever batch (or process) it is in."""
    import torch
    return torch.stack([torch.randn(shape, generator=torch.Generator(device).manual_seed(s), device=device)
                        for s in seeds])


def cutout_mask(r, theta, shift, lin):
    """(n, S, S) True where a tile's cutout hides the output: for the tiles whose draw says so, a
    square of half-side 0.1 to 0.25 (output units) kept more than CENTRE_KEPT away (along x or y)
    from where the tile's centre lands, as the lesion is centred. theta, shift: the output-to-tile
    map of prepare_batch; lin: the output's pixel centres."""
    import torch
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    # the output point that theta maps onto the tile's centre: theta @ p + shift = 0
    centre = -torch.stack([d * shift[:, 0] - b * shift[:, 1], a * shift[:, 1] - c * shift[:, 0]], 1) \
        / (a * d - b * c)[:, None]
    on = r[:, 11] < CUTOUT_P
    side = 0.1 + 0.15 * r[:, 11] / CUTOUT_P
    angle = r[:, 12] * 2 * np.pi
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    direction = direction / direction.abs().amax(1, keepdim=True)  # on the unit square: max(|x|, |y|) = 1
    away = side + CENTRE_KEPT + r[:, 13] * (1 - side - CENTRE_KEPT)
    spot = centre + away[:, None] * direction
    inside_x = (lin[None, None, :] - spot[:, 0, None, None]).abs() < side[:, None, None]
    inside_y = (lin[None, :, None] - spot[:, 1, None, None]).abs() < side[:, None, None]
    return inside_x & inside_y & on[:, None, None]


def check_gpu_kernels(device):
    """Stops where the installed torch has no kernels for the GPU: there torch.cuda.is_available()
    still says yes, and the first kernel dies with "no kernel image is available" (a P100, compute
    capability 6.0, under a torch built for 7.5 and up, as Kaggle's is). A kernel built for sm_XY
    runs on capability X.Z for Z >= Y; PTX (compute_XY) is compiled by the driver for any capability
    from X.Y up."""
    import torch
    major, minor = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    for arch in archs:
        kind, number = re.fullmatch(r"(sm|compute)_(\d+)[a-z]?", arch).groups()
        a_major, a_minor = int(number[:-1]), int(number[-1])
        if (kind == "sm" and a_major == major and a_minor <= minor
                or kind == "compute" and (a_major, a_minor) <= (major, minor)):
            return
    raise DataError(f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): this torch "
                    f"{torch.__version__} has GPU kernels for {', '.join(archs) or 'no GPU'} only: on Kaggle choose "
                    "the accelerator GPU T4 x2; elsewhere install a torch built for compute capability "
                    f"{major}.{minor}")


def process_device():
    """(device, rank, world size) of this process. Under torchrun (WORLD_SIZE above 1) the process
    group is started (NCCL on GPUs, gloo on the CPU) and each process takes its LOCAL_RANK's GPU,
    after checking that this torch has kernels for it."""
    import torch
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not torch.cuda.is_available():
        if world > 1:
            torch.distributed.init_process_group("gloo")
        return torch.device("cpu"), rank, world
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    check_gpu_kernels(device)
    torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl", device_id=device)
    return device, rank, world


def amp_settings(device, cpu_amp=False):
    """The autocast dtype, and whether training needs a gradient scaler (fp16 alone: its narrow range
    underflows small gradients). bf16 where the GPU computes it natively (compute capability 8.0
    and up: A100, L4, H100); fp16 below (T4 7.5, P100 6.0), where torch.cuda.is_bf16_supported()
    may say yes but bf16 is emulated, slowly, and cuDNN has no bf16 convolutions; float32 on the
    CPU unless cpu_amp. Logs the choice."""
    import torch
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        dtype = torch.bfloat16 if capability >= (8, 0) else torch.float16
        why = f"{torch.cuda.get_device_name(device)}, compute capability {capability[0]}.{capability[1]}"
    else:
        dtype, why = (torch.bfloat16 if cpu_amp else None), "CPU" + (", --cpu-amp" if cpu_amp else "")
    log(f"precision: {str(dtype or torch.float32)[6:]}{' with a gradient scaler' if dtype == torch.float16 else ''} "
        f"({why})")
    return dtype, dtype == torch.float16


def autocast(device, dtype):
    import torch
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def forward_features_and_logit(model, x):
    """Pre-logits embedding and logit from one pass."""
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return feats, model.get_classifier()(feats).squeeze(1)


def split_broken(canvas, sizes, *rest):
    """Drops the broken tiles (size 0) of a batch; returns the kept tensors and the broken mask."""
    broken = sizes[:, 0] == 0
    return [t[~broken] for t in (canvas, sizes) + rest], broken


NONFINITE_AT = "PIPELINE_NONFINITE"  # fault injection, as PIPELINE_KILL_AT: see forced_nonfinite


def forced_nonfinite(ids, index, reduced):
    """Fault injection for the tests of a hidden test set: with PIPELINE_NONFINITE="ID1 ID2!" the
    output for tile ID1 is made inf in reduced precision (as an fp16 overflow would), that for ID2
    in every precision. The mask of the batch rows affected."""
    spec = os.environ.get(NONFINITE_AT, "").split()
    return np.array([ids[i] in spec and reduced or ids[i] + "!" in spec for i in index], bool)


def check_finite_outputs(embs, logits, ids, index, what, lenient=False):
    """A tile that decodes must get a finite embedding and logit, in float32 at the last (predict
    scores again in float32 what reduced precision left not finite): NaN means "no image"
    downstream. lenient (a submission): the tiles whose outputs are not finite get NaN, with one
    warning line. ids[index[i]] names row i of the batch."""
    bad = ~(np.isfinite(logits) & np.isfinite(embs).all(1))
    if bad.any() and lenient:
        log(f"warning: {what or 'prediction'}: the model's output for {bad.sum()} tile(s) that decode is not finite, "
            f"in float32 too: scored without image features (NaN): {', '.join(ids[i] for i in index[bad][:5])}")
        embs[bad], logits[bad] = np.nan, np.nan
    elif bad.any():
        first = np.flatnonzero(bad)[0]
        raise DataError(f"{what or 'prediction'}: the model's output for {ids[index[first]]} (a tile that decodes) is "
                        f"not finite (logit {logits[first]}; {bad.sum()} of the {len(index)} tiles of its batch) in "
                        "float32: the weights hold NaN or inf, or the forward pass overflows")


def score_batch(model, x, device, dtype, ids, index):
    """Embeddings and logits of one prepared batch (the tiles ids[index]), as float32 NumPy arrays."""
    import torch
    with torch.no_grad(), autocast(device, dtype):
        f, z = forward_features_and_logit(model, x)
    f, z = f.float().cpu().numpy(), z.float().cpu().numpy()
    z[forced_nonfinite(ids, index, dtype is not None)] = np.inf
    return f, z


def predict(model, loader, out_size, mean, std, device, dtype, progress="", lenient=False):
    """Embeddings (N, D) and logits (N,) of every image of the loader, in its order; NaN for a tile
    that cannot be decoded (whether any of the split decodes is check_a_tile_decodes's to say). A
    tile whose output in reduced precision is not finite (an fp16 overflow) is scored again in
    float32; one still not finite is an error, or with `lenient` (a submission) NaN and a warning."""
    import torch
    model.eval()
    n = len(loader.sampler)
    embs, logits = np.full((n, model.num_features), np.nan, np.float32), np.full(n, np.nan, np.float32)
    seen, t0, ids = 0, time.time(), loader.dataset.ids
    for batch, (canvas, sizes, _, index) in enumerate(loader):
        (canvas, sizes, index), broken = split_broken(canvas, sizes, index)
        rows = np.arange(seen, seen + len(broken))[~broken.numpy()]
        seen += len(broken)
        if len(rows):
            index = index.numpy()
            x = prepare_batch(canvas, sizes, out_size, mean, std, device)
            f, z = score_batch(model, x, device, dtype, ids, index)
            bad = ~(np.isfinite(z) & np.isfinite(f).all(1))
            if bad.any() and dtype is not None:
                f[bad], z[bad] = score_batch(model, x[torch.from_numpy(bad).to(device)], device, None, ids, index[bad])
            check_finite_outputs(f, z, ids, index, progress, lenient)
            embs[rows], logits[rows] = f, z
        if progress and ((batch + 1) % 50 == 0 or seen == n):
            log(f"{progress}: {seen}/{n} images, {seen / (time.time() - t0):.0f} images/s")
    return embs, logits


def check_a_tile_decodes(images, rows, logits, what):
    """A split none of whose tiles `rows` decodes (all its logits NaN) is an error; some broken ones
    are not. Called on the whole split, gathered from every process: under torchrun a process
    whose share holds broken tiles alone is no error, as in one process."""
    if len(rows) and np.isnan(logits).all():
        raise DataError(f"{images.h5_path}: none of the {len(rows)} images of {what} can be decoded; "
                        f"the first: {images.problem(rows[0])}")
