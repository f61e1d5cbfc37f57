"""The Kaggle notebooks: one that trains, run again and again until it says it is done (each run
within a notebook's 12 hours), and one that submits, generated from the scripts of this folder.

Each notebook carries the project's code as `%%writefile` cells, so that its stages run as files
(under torchrun, both GPUs of a "GPU T4 x2" notebook), then calls train_until_done or submit (below)
with the settings of its settings cell (tagged `parameters`, as papermill does). Inputs are found by
what they hold, anywhere under /kaggle/input (Kaggle has mounted them at more than one depth). A
stage that fails stops the notebook with its error: IPython's `!cmd` would run on past a failure and
could leave a stale submission.

Writes: OUT/train/isic-2024-train.ipynb and OUT/submit/isic-2024-submit.ipynb, each with the
        kernel-metadata.json that `kaggle kernels push -p OUT/train` reads (GPU T4 x2, internet
        off, the competition, the weights and models datasets)

    python notebooks.py notebooks --demo          # the demo set, tiny settings, own kernel ids, no sources
    python notebooks.py notebooks --user ME       # the real competition
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

from common import (KAGGLE_INPUT, DataError, atomic_copy, atomic_write, file_digest, find_input, found_data_dir,
                    input_folders, log, read_lesions, read_manifest, run_main, write_dataset_metadata, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
CODE = ["common.py", "demo.py", "features.py", "train_backbone.py", "extract.py", "gbdt.py", "reasons.py",
        "ensemble.py", "report.py", "run.sh", "notebooks.py"]
COMPETITION = "isic-2024-challenge"
KAGGLE_HOURS = 12  # a notebook's limit
# the training notebook's defaults: no fold or epoch starts that would end later than BUDGET_HOURS
# after the notebook's start, and the finishing stages (projected at 2.1 hours at the slow end of
# BENCHMARKS.md's range) start only if FINISH_HOURS are left
BUDGET_HOURS, FINISH_HOURS = 11.0, 3.0
MODELS_WHAT = "a models folder (features.json and folds.csv, with ARCH/fold*/manifest.json beside them)"


def run(*cmd, **env):
    """Runs a command with its output shown as it comes; a failure stops the notebook."""
    env = {k: str(v) for k, v in env.items() if v is not None}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE,
                            env={**os.environ, "PYTHON": sys.executable, **env})
    for line in proc.stdout:
        print(line, end="", flush=True)
    if proc.wait():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit status {proc.returncode}): its error is above")


def holds_models(folder, names):
    return "features.json" in names and bool(glob.glob(os.path.join(glob.escape(folder), "*", "fold*",
                                                                    "manifest.json")))


def find_models(root):
    """The models folder of earlier runs under `root` (at any depth), or None where no input holds
    one (a first run). A models dataset that cannot be used stops the run now, with the reason."""
    found = find_input(root, MODELS_WHAT, holds_models, required=False)
    if found:
        return found
    empty = input_folders(root, lambda folder, names: "features.json" in names)
    if empty:
        raise DataError(f"{empty[0]}: features.json without the fold models (ARCH/fold*/) beside it: the dataset "
                        "was made without its subfolders (kaggle datasets create and version skip them unless "
                        "--dir-mode is tar or zip)")
    loose = input_folders(root, lambda folder, names: "manifest.json" in names
                          and re.fullmatch(r"fold\d+", os.path.basename(folder)))
    if loose:
        raise DataError(f"{loose[0]}: a fold model without its models folder (features.json two levels up): make "
                        "the dataset from the whole WORK/models folder")
    return None


def find_weights(root, archs):
    """The folder under `root` (at any depth) that holds ARCH.safetensors for every one of `archs`."""
    return find_input(root, f"the pretrained weights ({', '.join(a + '.safetensors' for a in archs)})",
                      lambda folder, names: all(f"{a}.safetensors" in names for a in archs))


def copy_models_in(models_in, work):
    """Copies the models folder of earlier runs into WORK/models (writable) and its folds.csv to
    WORK/folds.csv, after checking that every fold model in it is complete and was trained on that
    folds.csv."""
    if not os.path.isdir(models_in) or not holds_models(models_in, set(os.listdir(models_in))):
        raise DataError(f"{models_in}: not {MODELS_WHAT}")
    folds = os.path.join(models_in, "folds.csv")
    if not os.path.exists(folds):
        raise DataError(f"{models_in}: no folds.csv beside features.json: the fold models cannot be matched to "
                        "their folds (a models folder from before folds.csv travelled with it?)")
    digest = file_digest(folds)
    for path in sorted(glob.glob(os.path.join(glob.escape(models_in), "*", "fold*", "manifest.json"))):
        fold_dir = os.path.dirname(path)
        arch, fold = os.path.basename(os.path.dirname(fold_dir)), os.path.basename(fold_dir)[4:]
        again = f"train_backbone.py --arch {arch} --fold {fold}, or attach the models dataset whole"
        if read_manifest(fold_dir, again, schema={"lesions": "digest"})["lesions"] != digest:
            raise DataError(f"{fold_dir}: made with another folds.csv than the one beside features.json (two runs' "
                            f"folders mixed): run {again}")
    target = os.path.join(work, "models")
    for folder, dirs, files in os.walk(models_in):  # files copied without their read-only modes
        out = os.path.join(target, os.path.relpath(folder, models_in))
        os.makedirs(out, exist_ok=True)
        for name in files:
            shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))
    if not os.path.exists(os.path.join(work, "folds.csv")):
        atomic_copy(folds, os.path.join(work, "folds.csv"))
    elif file_digest(os.path.join(work, "folds.csv")) != digest:
        raise DataError(f"{work}/folds.csv: not the folds.csv of {models_in}: use a new WORK folder")


def trained_folds(work, archs):
    """{arch: [the folds whose model WORK/models holds, committed]}, and the number of folds."""
    n = len(set(read_lesions(work, "train", recorded=False)["fold"]))
    return {a: [k for k in range(n) if os.path.exists(os.path.join(work, "models", a, f"fold{k}", "manifest.json"))]
            for a in archs}, n


def next_steps(work, user, models_dataset, kernel, done, n, finished):
    """What the user does after this run, printed last."""
    models = os.path.join(work, "models")
    upload = (f"make {os.path.abspath(models)} the new version of your dataset {user}/{models_dataset} (it holds "
              f"its dataset-metadata.json):\n    kaggle kernels output {user}/{kernel} -p out\n"
              f"    kaggle datasets version -p out/{models} --dir-mode tar -m 'fold models'\n"
              f"  (the first time: kaggle datasets create -p out/{models} --dir-mode tar; without --dir-mode its "
              "subfolders, the models, are left out)")
    n_done = sum(map(len, done.values()))
    if finished:
        return (f"done: every fold model, the GBDTs and the ensemble are in {models}; {work}/submission.csv and "
                f"{work}/report.html are this run's. Next, {upload}\nthen run the submission notebook with that "
                "dataset as its input and submit its output.")
    if n_done == n * len(done):
        return (f"every fold model is in, but the finishing stages (extraction, GBDTs, ensemble) would not end "
                f"within {KAGGLE_HOURS} hours of this run's start. Next, {upload}\nthen run this notebook again.")
    return (f"{n_done} of {n * len(done)} fold models are in. Next, {upload}\nthen run this notebook again: it "
            "continues where this run stopped.")


def train_until_done(started, archs, work="work", data=None, demo=False, weights_dir=None, models_in=None,
                     input_root=KAGGLE_INPUT, budget_hours=BUDGET_HOURS, finish_hours=FINISH_HOURS, ngpu=None,
                     extra=None, user="YOUR-KAGGLE-NAME", models_dataset="isic-2024-models", kernel="isic-2024-train"):
    """One run of the training notebook. Copies in the fold models of earlier runs (the models
    dataset), trains the missing folds of `archs` in that order, resuming an unfinished one, starting
    no fold or epoch that would end later than `budget_hours` after `started`; once every fold is in
    and `finish_hours` remain of the notebook's 12 hours, runs extraction, the GBDTs, the ensemble and
    the report. Ends by saying what to do next."""
    extra = extra or {}
    data_arg = [] if demo else [data or found_data_dir(input_root)]
    models_in = models_in or find_models(input_root)
    env = dict(WORK=work, ARCHS=" ".join(archs), NGPU=ngpu, **extra)
    if models_in:
        copy_models_in(models_in, work)
        done, n = trained_folds(work, archs)
        print(f"found {sum(map(len, done.values()))} of {n * len(archs)} fold models in {models_in}")
        missing = " ".join(f"{a}:{','.join(str(k) for k in range(n) if k not in done[a])}" for a in archs
                           if len(done[a]) < n)
    else:
        print("found no models dataset: a first run, every fold to train")
        missing = " ".join(f"{a}:all" for a in archs)
    if missing:
        if weights_dir is None and not demo:
            weights_dir = find_weights(input_root, archs)
        run("bash", "run.sh", *data_arg, TRAIN=missing, FINISH=0, RESUME=1, DEADLINE=int(started + budget_hours * 3600),
            WEIGHTS_DIR=weights_dir, **env)
        done, n = trained_folds(work, archs)
    write_dataset_metadata(os.path.join(work, "models"), models_dataset, "ISIC 2024 models", user)
    finished = (sum(map(len, done.values())) == n * len(archs)
                and time.time() + finish_hours * 3600 <= started + KAGGLE_HOURS * 3600)
    if finished:
        run("bash", "run.sh", *data_arg, TRAIN="", FINISH=1, **env)
    print(next_steps(work, user, models_dataset, kernel, done, n, finished))


def submit(archs, work="work", data=None, demo=False, models=None, input_root=KAGGLE_INPUT, ngpu=None, extra=None):
    """The submission notebook: the test lesions scored with the trained models (read-only), and
    ./submission.csv in place before the report runs, so that no report failure can void it."""
    out = os.path.join(HERE, "submission.csv")
    if os.path.exists(out):  # a stale submission never survives a failed run
        os.remove(out)
    models = models or find_input(input_root, MODELS_WHAT, holds_models)
    data_arg = [] if demo else [data or found_data_dir(input_root)]
    run("bash", "run.sh", "--predict-only", models, *data_arg, WORK=work, ARCHS=" ".join(archs), NGPU=ngpu,
        SUBMISSION=out, **(extra or {}))
    print(f"wrote {out}")


TRAIN_CELL = """import notebooks
notebooks.train_until_done(STARTED, ARCHS.split(), WORK, DATA, DEMO, WEIGHTS_DIR, MODELS_IN, INPUT, BUDGET_HOURS,
                           FINISH_HOURS, NGPU, EXTRA, USER, MODELS_DATASET, KERNEL)
"""
SUBMIT_CELL = """import notebooks
notebooks.submit(ARCHS.split(), WORK, DATA, DEMO, MODELS, INPUT, NGPU, EXTRA)
"""
COMMENTS = {
    "DATA": "the competition's folder; None: found under INPUT by its four files",
    "DEMO": "True: make and use the demo set (DATA unused)",
    "WEIGHTS_DIR": "ARCH.safetensors of each image model; None: found under INPUT",
    "MODELS_IN": "fold models of earlier runs (the models dataset); None: found under INPUT, if attached",
    "MODELS": "the trained models (the models dataset); None: found under INPUT",
    "INPUT": "where the inputs are searched for, at any depth",
    "ARCHS": "the image models, in the order they train",
    "BUDGET_HOURS": "no fold or epoch starts that would end later than this after the notebook's start",
    "FINISH_HOURS": "the finishing stages start only if this much is left of the 12 hours",
    "NGPU": "processes per image stage; None: every visible GPU (torchrun above 1)",
    "EXTRA": "extra run.sh settings: DEMO_ARGS, FEATURES_ARGS, TRAIN_ARGS, EXTRACT_ARGS, GBDT_ARGS",
    "USER": "your Kaggle user name, and the dataset and kernel names, for the next steps printed at the end"}
# the demo: the whole pipeline on a small demo set, with tiny settings, on any machine
DEMO_EXTRA = {"DEMO_ARGS": "--patients 40 --test-patients 10 --malignant-rate 0.06 --seed 1",
              "TRAIN_ARGS": "--no-pretrained --epochs 1 --neg-per-pos 3 --batch-size 16 --lr 3e-4 --workers 0",
              "EXTRACT_ARGS": "--workers 0", "GBDT_ARGS": "--rounds 10 --bags 1"}


def cell(kind, source, tags=()):
    """One nbformat-4 cell (its id, required from nbformat 4.5 on, is set by notebook())."""
    c = {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True)}
    if tags:
        c["metadata"]["tags"] = list(tags)
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def settings(values):
    return "\n".join(f"{k} = {v!r}" + (f"  # {COMMENTS[k]}" if k in COMMENTS else "") for k, v in values.items()) + "\n"


def notebook(title, intro, parameters, action):
    cells = [cell("markdown", f"# {title}\n\n{intro}"),
             cell("code", "import time\nSTARTED = time.time()  # the time budget counts from here\n"),
             cell("code", parameters, ["parameters"])]
    for name in CODE:
        with open(os.path.join(HERE, name)) as f:
            cells.append(cell("code", f"%%writefile {name}\n{f.read()}"))
    cells.append(cell("code", action))
    for i, c in enumerate(cells):
        c["id"] = f"cell-{i:02d}"
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}}}


def kernel_metadata(kernel_id, title, datasets, competition):
    return {"id": kernel_id, "title": title, "code_file": f"{kernel_id.split('/')[1]}.ipynb", "language": "python",
            "kernel_type": "notebook", "is_private": True, "enable_gpu": True, "enable_tpu": False,
            "machine_shape": "NvidiaTeslaT4", "enable_internet": False, "dataset_sources": datasets,
            "competition_sources": [competition] if competition else [], "kernel_sources": [], "model_sources": []}


def write_notebook(folder, nb, metadata):
    path = os.path.join(folder, metadata["code_file"])
    atomic_write(path, lambda f: f.write(json.dumps(nb, indent=1).encode()))
    write_json(os.path.join(folder, "kernel-metadata.json"), metadata)
    log(f"wrote {path} and kernel-metadata.json")


def kaggle_name(text):
    """An argparse type: a Kaggle user or dataset name (letters, digits, hyphens)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{1,49}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: 2 to 50 letters, digits or hyphens, as Kaggle names are")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for train/ and submit/")
    parser.add_argument("--demo", action="store_true",
                        help="the demo set and tiny settings, on any machine: kernels of their own, no inputs")
    parser.add_argument("--user", type=kaggle_name, default="YOUR-KAGGLE-NAME",
                        help="your Kaggle user name, for the kernel ids")
    parser.add_argument("--weights-dataset", type=kaggle_name, default="isic-2024-weights",
                        help="your dataset of ARCH.safetensors files (train_backbone.py --save-weights)")
    parser.add_argument("--models-dataset", type=kaggle_name, default="isic-2024-models",
                        help="your dataset made from a training run's work/models/")
    args = parser.parse_args(argv)
    prefix = "isic-2024-demo" if args.demo else "isic-2024"
    common = dict(DATA=None, DEMO=args.demo, INPUT=KAGGLE_INPUT,
                  ARCHS="eva02_tiny convnext_atto" if args.demo else "eva02_base convnext", NGPU=None, WORK="work",
                  EXTRA=DEMO_EXTRA if args.demo else {})
    train = dict(common, WEIGHTS_DIR=None, MODELS_IN=None, BUDGET_HOURS=BUDGET_HOURS, FINISH_HOURS=FINISH_HOURS,
                 USER=args.user,
                 MODELS_DATASET=args.models_dataset, KERNEL=f"{prefix}-train")
    submit_settings = dict(common, MODELS="work/models" if args.demo else None,
                           EXTRA={k: v for k, v in common["EXTRA"].items() if k in ("DEMO_ARGS", "EXTRACT_ARGS")})
    datasets = [f"{args.user}/{args.weights_dataset}", f"{args.user}/{args.models_dataset}"]
    sources = ([], None) if args.demo else (datasets, COMPETITION)
    write_notebook(os.path.join(args.out, "train"), notebook(
        "ISIC 2024: training",
        "Run it again and again until it says it is done: each run copies in the fold models of the earlier ones "
        "(the models dataset), trains the missing folds within the time budget, and says what to do next. Once "
        "every fold is in, it extracts the image scores, trains the GBDTs and writes the ensemble, a submission "
        "and the report. Settings: the next cell.", settings(train), TRAIN_CELL),
        kernel_metadata(f"{args.user}/{prefix}-train", "ISIC 2024 demo train" if args.demo else "ISIC 2024 train",
                        sources[0], sources[1]))
    write_notebook(os.path.join(args.out, "submit"), notebook(
        "ISIC 2024: submission",
        "Scores the test lesions with the trained models (read-only) and writes `submission.csv`. "
        "Settings: the next cell.", settings(submit_settings), SUBMIT_CELL),
        kernel_metadata(f"{args.user}/{prefix}-submit", "ISIC 2024 demo submit" if args.demo else "ISIC 2024 submit",
                        sources[0][1:], sources[1]))


if __name__ == "__main__":
    run_main(main)
