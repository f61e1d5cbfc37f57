"""The Kaggle notebooks: one that trains (in runs, each within a notebook's 12 hours) and one that
submits, generated from the scripts of this folder.

Each notebook carries the project's code as `%%writefile` cells, so that its stages run as files
(under torchrun, both GPUs of a "GPU T4 x2" notebook), and calls run.sh with the settings of its
first code cell (tagged `parameters`, as papermill does). A stage that fails stops the notebook
with its error: IPython's `!cmd` would run on past a failure and could leave a stale submission.

Writes: OUT/train/isic-2024-train.ipynb and OUT/submit/isic-2024-submit.ipynb, each with the
        kernel-metadata.json that `kaggle kernels push -p OUT/train` reads (GPU T4 x2, internet
        off, the competition, the weights and models datasets)

    python notebooks.py notebooks --demo          # the demo set, tiny settings: both run in one folder
    python notebooks.py notebooks --user ME       # the real competition
"""
import argparse
import json
import os

from common import atomic_write, log, run_main, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
CODE = ["common.py", "demo.py", "features.py", "train_backbone.py", "extract.py", "gbdt.py", "ensemble.py",
        "report.py", "run.sh"]
COMPETITION = "isic-2024-challenge"

# The training runs of the default plan: each fits a T4 x2 notebook's 12 hours with a third to spare
# at the slow end of BENCHMARKS.md's projection (bench.py --gpu-estimate). After each run, its
# work/models/ becomes (a new version of) the models dataset, which the next run reads.
PLAN = {1: dict(TRAIN="eva02_base:0,1,2", FINISH=False),
        2: dict(TRAIN="eva02_base:3,4 convnext:all", FINISH=True)}
# The demo: the whole pipeline in one run, tiny settings, on a small demo set
DEMO_PLAN = {1: dict(TRAIN="eva02_tiny:all convnext_atto:all", FINISH=True)}
DEMO_EXTRA = {"DEMO_ARGS": "--patients 40 --test-patients 10 --malignant-rate 0.06 --seed 1",
              "TRAIN_ARGS": "--no-pretrained --epochs 1 --neg-per-pos 3 --batch-size 16 --lr 3e-4 --workers 0",
              "EXTRACT_ARGS": "--workers 0", "GBDT_ARGS": "--rounds 10 --bags 1"}

RUN_CELL = '''import os, subprocess, sys

def run(*cmd, **env):
    """Runs a command with its output shown as it comes; a failure stops the notebook."""
    env = {k: str(v) for k, v in env.items() if v is not None}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHON": sys.executable, **env})
    for line in proc.stdout:
        print(line, end="")
    if proc.wait():
        raise RuntimeError(f"{' '.join(cmd)} failed (exit status {proc.returncode}): its error is above")
'''

TRAIN_CELL = '''# fold models of earlier runs (a read-only dataset) are copied in, writable, then this run's part
if MODELS_IN and os.path.isdir(MODELS_IN):
    os.makedirs(f"{WORK}/models", exist_ok=True)
    run("cp", "-r", "--no-preserve=mode", f"{MODELS_IN}/.", f"{WORK}/models")
part = PLAN[RUN]
run("bash", "run.sh", *([DATA] if DATA else []), WORK=WORK, TRAIN=part["TRAIN"], FINISH=int(part["FINISH"]),
    ARCHS=ARCHS, NGPU=NGPU, WEIGHTS_DIR=WEIGHTS_DIR, **EXTRA)
print(f"run {RUN} of {len(PLAN)} done: {WORK}/models/ holds the fold models"
      + (f"; next, save it as the models dataset and run with RUN = {RUN + 1}" if RUN < len(PLAN) else ""))
'''

SUBMIT_CELL = '''# a stale submission never survives a failed run
if os.path.exists("submission.csv"):
    os.remove("submission.csv")
run("bash", "run.sh", "--predict-only", MODELS, *([DATA] if DATA else []), WORK=WORK, ARCHS=ARCHS, NGPU=NGPU,
    **EXTRA)
with open(f"{WORK}/submission.csv", "rb") as f, open("submission.csv", "wb") as out:
    out.write(f.read())
print("wrote submission.csv")
'''


def cell(kind, source, tags=()):
    """One nbformat-4 cell (its id, required from nbformat 4.5 on, is set by notebook())."""
    c = {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True)}
    if tags:
        c["metadata"]["tags"] = list(tags)
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def settings(values, comments):
    return "\n".join(f"{k} = {v!r}" + (f"  # {comments[k]}" if k in comments else "") for k, v in values.items()) + "\n"


def notebook(title, intro, parameters, action):
    cells = [cell("markdown", f"# {title}\n\n{intro}"), cell("code", parameters, ["parameters"])]
    for name in CODE:
        with open(os.path.join(HERE, name)) as f:
            cells.append(cell("code", f"%%writefile {name}\n{f.read()}"))
    cells += [cell("code", RUN_CELL), cell("code", action)]
    for i, c in enumerate(cells):
        c["id"] = f"cell-{i:02d}"
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}}}


def kernel_metadata(user, slug, title, datasets):
    return {"id": f"{user}/{slug}", "title": title, "code_file": f"{slug}.ipynb", "language": "python",
            "kernel_type": "notebook", "is_private": True, "enable_gpu": True, "enable_tpu": False,
            "machine_shape": "NvidiaTeslaT4", "enable_internet": False, "dataset_sources": datasets,
            "competition_sources": [COMPETITION], "kernel_sources": [], "model_sources": []}


def write_notebook(folder, slug, nb, metadata):
    atomic_write(os.path.join(folder, f"{slug}.ipynb"), lambda f: f.write(json.dumps(nb, indent=1).encode()))
    write_json(os.path.join(folder, "kernel-metadata.json"), metadata)
    log(f"wrote {folder}/{slug}.ipynb and kernel-metadata.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for train/ and submit/")
    parser.add_argument("--demo", action="store_true", help="the demo set and tiny settings, on any machine")
    parser.add_argument("--user", default="YOUR-KAGGLE-NAME", help="your Kaggle user name, for the kernel ids")
    parser.add_argument("--weights-dataset", default="isic-2024-weights",
                        help="your dataset of ARCH.safetensors files (train_backbone.py --save-weights)")
    parser.add_argument("--models-dataset", default="isic-2024-models",
                        help="your dataset made from a training run's work/models/")
    args = parser.parse_args(argv)
    weights, models = f"{args.user}/{args.weights_dataset}", f"{args.user}/{args.models_dataset}"
    if args.demo:
        train = dict(DATA=None, WEIGHTS_DIR=None, MODELS_IN=None, ARCHS="eva02_tiny convnext_atto", RUN=1,
                     PLAN=DEMO_PLAN, NGPU=None, WORK="work", EXTRA=DEMO_EXTRA)
        submit = dict(DATA=None, MODELS="work/models", ARCHS=train["ARCHS"], NGPU=None, WORK="work_submit",
                      EXTRA={k: v for k, v in DEMO_EXTRA.items() if k == "EXTRACT_ARGS"})
    else:
        data, inputs = f"/kaggle/input/{COMPETITION}", "/kaggle/input"
        train = dict(DATA=data, WEIGHTS_DIR=f"{inputs}/{args.weights_dataset}",
                     MODELS_IN=f"{inputs}/{args.models_dataset}", ARCHS="eva02_base convnext", RUN=1, PLAN=PLAN,
                     NGPU=None, WORK="work", EXTRA={})
        submit = dict(DATA=data, MODELS=f"{inputs}/{args.models_dataset}", ARCHS=train["ARCHS"], NGPU=None,
                      WORK="work", EXTRA={})
    comments = {"DATA": "the competition's files (None: make the demo set)",
                "WEIGHTS_DIR": "ARCH.safetensors of each image model",
                "MODELS_IN": "fold models of earlier runs (the models dataset); absent on the first run",
                "MODELS": "the trained models: a training run's work/models/",
                "RUN": "which run of PLAN this is: set it, and update the models dataset, between runs",
                "NGPU": "processes per image stage; None: every visible GPU (torchrun above 1)",
                "EXTRA": "extra options: DEMO_ARGS, TRAIN_ARGS, EXTRACT_ARGS, GBDT_ARGS (see run.sh)"}
    write_notebook(os.path.join(args.out, "train"), "isic-2024-train", notebook(
        "ISIC 2024: training",
        "Trains the image models' folds of this run of the plan (`PLAN[RUN]`), on every GPU; the last run "
        "then extracts the image scores, trains the GBDTs and writes the ensemble, the submission and the "
        "report. Settings: the next cell.", settings(train, comments), TRAIN_CELL),
        kernel_metadata(args.user, "isic-2024-train", "ISIC 2024 train", [weights, models]))
    write_notebook(os.path.join(args.out, "submit"), "isic-2024-submit", notebook(
        "ISIC 2024: submission",
        "Scores the test lesions with the trained models (read-only) and writes `submission.csv`. "
        "Settings: the next cell.", settings(submit, comments), SUBMIT_CELL),
        kernel_metadata(args.user, "isic-2024-submit", "ISIC 2024 submit", [models]))


if __name__ == "__main__":
    run_main(main)
