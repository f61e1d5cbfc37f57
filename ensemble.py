"""Rank averaging of the models' predictions, and the submission.

Each model's predictions become ranks (ties averaged) divided by their count, and the ensemble is
their weighted mean: only the ranking counts for pAUC, and ranks put models of different scales
on one. The weights (`--blend oof`, the default) are the grid point (tenths) whose rank average
scores the best out-of-fold pAUC; the ensemble's own out-of-fold scores rank each fold with the
weights chosen on the other folds, so that its OOF pAUC is an honest score of the choice.
`--blend equal` gives the plain mean; `--blend 1,2,0` sets them by hand.

Each patient's top 15 lesions get three reasons (reasons.py): the concepts whose TreeSHAP
contributions raise the score most, from the members' boosters, weighted as the members are.

Reads:  WORK/folds.csv, WORK/test_lesions.csv, WORK/preds/NAME_{oof,test}.csv for each model,
        WORK/models/NAME/ (manifest.json; for the reasons, the boosters and args.json) and what
        gbdt.py reads for the members with a weight above 0 (WORK/features/, image scores)
Writes: WORK/submission.csv (isic_id,target, in test-metadata order), WORK/triage.csv (isic_id,patient_id,
        score,rank_in_patient,reason_1,reason_2,reason_3: rank 1 = the patient's lesion to look at first;
        ties in metadata order; reasons "concept: phrase", empty outside each patient's top 15),
        WORK/triage_oof.csv (isic_id,patient_id,target,score,rank_in_patient,reason_1..3: the same out
        of fold, reasons also for every malignant lesion), WORK/preds/ensemble_{oof,test}.csv,
        WORK/models/ensemble.json (the models, their digests, the weights; what --predict-only reads
        back from --models, to rebuild the same submission; written first), WORK/ensemble_args.json,
        and last WORK/records/ensemble.json (the digests of the submission, triages and predictions, and of
        the ensemble.json they come from)

    python ensemble.py --work work --names tabular
    python ensemble.py --work work --names tabular,tab_eva02,tab_convnext
    python ensemble.py --work work --predict-only --models MODELS    # the submission alone
"""
import argparse
import glob
import itertools
import os
import re
import sys

import numpy as np

from common import (DataError, add_path_flags, file_digest, gbdt_name, log, models_folder, pauc, rank01,
                    rank_in_patient, read_json, read_lesions, read_manifest, read_preds, run_main, stage_locks,
                    write_args, write_csv, write_json, write_preds, write_record)
from reasons import REASONS, explain, member_images


def gbdt_names(text):
    """An argparse type: distinct GBDT names, comma-separated."""
    names = [gbdt_name(n) for n in text.split(",")]
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a name twice")
    return names


def rank_average(preds, weights):
    """The weighted mean over models of each model's ranks / n (ties averaged); weights sum to 1."""
    return np.asarray(weights) @ np.array([rank01(p) for p in preds]).reshape(len(preds), -1)


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
    """--blend: "oof" (None: chosen on the out-of-fold predictions), "equal", or one number a model."""
    if text == "oof":
        return None
    if text == "equal":
        return np.full(len(names), 1 / len(names))
    try:
        w = np.array([float(v) for v in text.split(",")])
    except ValueError:
        w = np.zeros(0)
    if len(w) != len(names) or not (np.isfinite(w).all() and (w >= 0).all() and w.max() > 0):
        raise DataError(f"--blend {text}: 'oof', 'equal', or {len(names)} finite non-negative numbers, not all 0, "
                        f"one for each of {', '.join(names)}")
    w = w / w.max()  # first: the sum of 1e308 and 1e308 is inf
    return w / w.sum()


def model_preds(work, name, split, ids, made_by):
    """A model's predictions, every lesion's present, made by the model whose manifest digest is `made_by`."""
    pred = read_preds(work, name, split, ids, made_by)
    if np.isnan(pred).any():
        raise DataError(f"{work}/preds/{name}: isic_id {ids[np.flatnonzero(np.isnan(pred))[0]]} has no prediction")
    return pred


def member_digests(models_dir, names):
    """{name: the digest of models/NAME's manifest}: what models/ensemble.json records, so that
    --predict-only rebuilds the same submission from the same models."""
    return {n: read_manifest(os.path.join(models_dir, n), f"gbdt.py --name {n}")["digest"] for n in names}


def read_ensemble_json(path, rebuild):
    """models/ensemble.json, checked: a weight and a manifest digest for each name, the weights of
    each fold a weight for each name; weights at least 0, summing above 0."""
    def agree(spec):
        n = len(spec["names"])
        lists = {"weights": spec["weights"], **{f"fold_weights.{k}": w for k, w in spec["fold_weights"].items()}}
        wrong = [k for k, w in lists.items() if len(w) != n or min(w, default=0) < 0 or sum(w) <= 0]
        return (f"{wrong[0]} is not {n} weights at least 0 summing above 0" if wrong else
                "members does not name the models of names" if sorted(spec["members"]) != sorted(spec["names"])
                else "names holds a name twice" if len(set(spec["names"])) < n else None)
    schema = {"names": ["text"], "weights": ["number"], "members": {"*": "digest"}, "fold_weights": {"*": ["number"]}}
    return read_json(path, rebuild, schema, agree)


def read_ensemble_spec(models_dir, names):
    """The training run's names and weights, after checking that the models folder holds its models."""
    path = os.path.join(models_dir, "ensemble.json")
    spec = read_ensemble_json(path, "ensemble.py on the training data")
    if names and names != spec["names"]:
        raise DataError(f"{path}: the submission was built from {', '.join(spec['names'])}, not {', '.join(names)}")
    if member_digests(models_dir, spec["names"]) != spec["members"]:
        raise DataError(f"{models_dir}: its GBDT models are not those the ensemble was built from (models of two runs "
                        "mixed?): run gbdt.py and ensemble.py on the training data again")
    return spec["names"], np.array(spec["weights"]), spec["members"]


def member_names(args):
    """The GBDTs the ensemble reads: --names; else with --predict-only those of ensemble.json; else
    every model in preds/ but the image models."""
    if args.names or args.predict_only:
        return args.names or read_ensemble_json(os.path.join(models_folder(args), "ensemble.json"),
                                                "ensemble.py on the training data")["names"]
    names = sorted(os.path.basename(p)[:-9] for p in glob.glob(os.path.join(args.work, "preds", "*_test.csv"))
                   if not os.path.basename(p).startswith(("img_", "ensemble_")))
    if not names:
        raise DataError(f"{args.work}/preds: no model predictions found (run gbdt.py first)")
    return names


def submission_reasons(args, models_dir, names, weights, members, test, ens_test):
    """The test lesions' reasons. In a submission run (--predict-only) they are a by-product: one
    that fails leaves them empty, with one warning line, and never costs the submission (whose
    rerun on the hidden test set shows no log)."""
    try:
        return explain(args.work, models_dir, names, np.tile(weights, (len(ens_test), 1)), members, "test", test,
                       ens_test)
    except Exception as e:
        if not args.predict_only:
            raise
        log(f"warning: triage.csv without reasons: {type(e).__name__}: {e}")
        return [np.full(len(ens_test), "", dtype=object) for _ in REASONS]


def ensemble(args):
    """The stage's work: read and check every input, then write the submission."""
    models_dir = models_folder(args)
    spec_path = os.path.join(models_dir, "ensemble.json")
    test = read_lesions(args.work, "test")
    names = member_names(args)
    if args.predict_only:
        names, weights, members = read_ensemble_spec(models_dir, names)
    else:
        members = member_digests(models_dir, names)
    # every input is read and checked before anything is written
    tst = [model_preds(args.work, n, "test", test["isic_id"], members[n]) for n in names]
    if not args.predict_only:
        train = read_lesions(args.work, "train")
        y, folds = train["target"], train["fold"]
        oof = [model_preds(args.work, n, "train", train["isic_id"], members[n]) for n in names]
        ranks = np.array([rank01(p) for p in oof])
        weights, fold_weights = parse_weights(args.blend, names), {}
        if weights is None:
            if len(names) > 6:
                raise DataError(f"--blend oof searches the weights of at most 6 models, not {len(names)}: pass "
                                "--names, or --blend")
            weights = choose_weights(ranks, y, np.ones(len(y), bool))
            fold_weights, ens_oof = nested_choice(ranks, y, folds)
        else:
            ens_oof = weights @ ranks
        # each fold's lesions explained with the weights that ranked them: chosen on the other folds
        row_weights = np.tile(weights, (len(folds), 1))
        for k, w in fold_weights.items():
            row_weights[folds == k] = w
        oof_reasons = explain(args.work, models_dir, names, row_weights, members, "train", train, ens_oof)
    ens_test = rank_average(tst, weights)
    test_reasons = submission_reasons(args, models_dir, names, weights, members, test, ens_test)
    if not args.predict_only:  # the models folder's record first, and the work folder's outputs checked against it
        write_json(spec_path, {"names": names, "weights": weights.tolist(), "members": members,
                               "fold_weights": {str(k): w.tolist() for k, w in fold_weights.items()}})
    written = [write_preds(args.work, "ensemble", "test", test, ens_test),
               os.path.join(args.work, "submission.csv"), os.path.join(args.work, "triage.csv")]
    write_csv(written[1], ["isic_id", "target"], [test["isic_id"], ens_test])
    write_csv(written[2], ["isic_id", "patient_id", "score", "rank_in_patient"] + REASONS,
              [test["isic_id"], test["patient_id"], ens_test, rank_in_patient(ens_test, test["patient_id"])]
              + test_reasons)
    if not args.predict_only:
        written += [write_preds(args.work, "ensemble", "train", train, ens_oof),
                    os.path.join(args.work, "triage_oof.csv")]
        write_csv(written[-1], ["isic_id", "patient_id", "target", "score", "rank_in_patient"] + REASONS,
                  [train["isic_id"], train["patient_id"], train["target"], ens_oof,
                   rank_in_patient(ens_oof, train["patient_id"])] + oof_reasons)
        write_args(os.path.join(args.work, "ensemble_args.json"), args)
    write_record(args.work, "ensemble", written, file_digest(spec_path))
    log(f"wrote {args.work}/submission.csv and triage.csv: {len(ens_test)} rows, the rank average of "
        + ", ".join(f"{n} (weight {w:g})" for n, w in zip(names, weights)))
    if args.predict_only:
        return
    for n, p in zip(names + ["ensemble"], oof + [ens_oof]):
        log(f"{n:>20s}: OOF pAUC {pauc(y, p):.4f}")
    if fold_weights:
        log("the ensemble's out-of-fold scores rank each fold with weights chosen on the other folds: "
            + ", ".join(f"fold {k} {'/'.join(f'{v:g}' for v in w)}" for k, w in fold_weights.items()))


def blend_joined(argv):
    """argv with "--blend -1,2" as "--blend=-1,2": argparse would take -1,2 for an option, and say
    only that --blend expects a value, where parse_weights names what is wrong."""
    joined = []
    for a in sys.argv[1:] if argv is None else argv:
        if joined and joined[-1] == "--blend" and re.match(r"-[0-9.]", a):
            joined[-1] = f"--blend={a}"
        else:
            joined.append(a)
    return joined


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_path_flags(parser)
    parser.add_argument("--names", type=gbdt_names,
                        help="comma-separated GBDT names (gbdt.py --name); default: every model in preds/ except "
                             "the image models (img_*), which the GBDTs already use")
    parser.add_argument("--blend", default="oof",
                        help="oof: chosen on the out-of-fold predictions (a grid of tenths); equal; or one number "
                             "a model, in --names order")
    parser.add_argument("--predict-only", action="store_true",
                        help="only the submission, with the models and weights of --models/ensemble.json")
    args = parser.parse_args(blend_joined(argv))
    # no GBDT that it reads is rewritten while it reads (a rerun stops with one line)
    names = member_names(args)
    with stage_locks(args, ["ensemble"], ["features"] + [f"gbdt-{n}" for n in names]
                     + [f"image-{a}" for a in member_images(models_folder(args), names)]):
        ensemble(args)


if __name__ == "__main__":
    run_main(main)
