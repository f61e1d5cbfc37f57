"""Rank averaging of the models' predictions, the submission file and a report.

Each model's predictions become ranks (ties averaged) divided by their count, and the ensemble is
their mean: only the ranking counts for pAUC, and ranks put models of different scales on one.

Reads:  WORK/folds.csv, WORK/preds/NAME_{oof,test}.csv for each model, DATA/test-metadata.csv
Writes: WORK/submission.csv (isic_id,target, in test-metadata order), WORK/report.md,
        WORK/preds/ensemble_{oof,test}.csv, WORK/ensemble_args.json

    python ensemble.py --data demo_data --work work --names tabular
    python ensemble.py --data DIR --work work --names tabular,tab_eva02,tab_convnext
    python ensemble.py --data DIR --work work --predict-only        # the submission alone
"""
import argparse
import glob
import os

import numpy as np

from common import (run_main, DataError, atomic_write, check_ids, default_data_dir, load_folds, log, pauc, rank01,
                    read_metadata, read_test, read_train, write_args, write_csv)


def rank_average(preds):
    """Mean over models of each model's ranks / n (ties averaged)."""
    return np.mean([rank01(p) for p in preds], axis=0)


def read_preds(work, name, split, ids):
    path = os.path.join(work, "preds", f"{name}_{split}.csv")
    table = read_metadata(path, required=["isic_id", "pred"])
    check_ids(path, table["isic_id"], ids)
    pred = table["pred"].astype(float)
    if np.isnan(pred).any():
        row = int(np.flatnonzero(np.isnan(pred))[0])
        raise DataError(f"{path}: isic_id {table['isic_id'][row]} has no prediction")
    return pred


def fold_scores(y, folds, pred):
    return [pauc(y[folds == k], pred[folds == k]) if 0 < y[folds == k].sum() < (folds == k).sum()
            else float("nan") for k in np.unique(folds)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data_dir(), help="folder with the Kaggle files")
    parser.add_argument("--work", default="work")
    parser.add_argument("--names", help="comma-separated model names in preds/; default: every model there "
                        "except the image models (img_*), which the GBDTs already use")
    parser.add_argument("--predict-only", action="store_true", help="only the test predictions: the submission")
    args = parser.parse_args(argv)
    test = read_test(args.data)
    names = (args.names.split(",") if args.names else
             sorted(os.path.basename(p)[:-9] for p in glob.glob(os.path.join(args.work, "preds", "*_test.csv"))
                    if not os.path.basename(p).startswith(("img_", "ensemble_"))))
    if not names:
        raise DataError(f"{args.work}/preds: no model predictions found (run gbdt.py first)")
    tst = [read_preds(args.work, n, "test", test["isic_id"]) for n in names]
    ens_test = rank_average(tst) if len(test["isic_id"]) else np.zeros(0)
    write_csv(os.path.join(args.work, "preds", "ensemble_test.csv"), ["isic_id", "pred"],
              [test["isic_id"], ens_test])
    write_csv(os.path.join(args.work, "submission.csv"), ["isic_id", "target"], [test["isic_id"], ens_test])
    log(f"wrote {args.work}/submission.csv: {len(ens_test)} rows, the rank average of {', '.join(names)}")
    if args.predict_only:
        return
    train = read_train(args.data)
    folds = load_folds(args.work, train)
    y = train["target"].astype(int)
    oof = [read_preds(args.work, n, "oof", train["isic_id"]) for n in names]
    ens_oof = rank_average(oof)
    rows = [(n, pauc(y, p), fold_scores(y, folds, p)) for n, p in zip(names, oof)]
    rows.append(("ensemble", pauc(y, ens_oof), fold_scores(y, folds, ens_oof)))
    for n, s, fs in rows:
        log(f"{n:>20s}: OOF pAUC {s:.4f}  per fold {' '.join(f'{f:.4f}' for f in fs)}")
    write_csv(os.path.join(args.work, "preds", "ensemble_oof.csv"), ["isic_id", "target", "fold", "pred"],
              [train["isic_id"], y, folds, ens_oof])
    n_folds = len(np.unique(folds))
    lines = ["# ISIC 2024 pipeline report", "",
             f"{len(y)} train lesions ({y.sum()} malignant) of {len(np.unique(train['patient_id']))} patients, "
             f"{len(test['isic_id'])} test lesions. Score: partial AUC above 80% TPR (max 0.2).", "",
             "| model | OOF pAUC | " + " | ".join(f"fold {k}" for k in range(n_folds)) + " |",
             "|---|---|" + "---|" * n_folds]
    lines += [f"| {n} | {s:.4f} | " + " | ".join(f"{f:.4f}" for f in fs) + " |" for n, s, fs in rows]
    atomic_write(os.path.join(args.work, "report.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    write_args(os.path.join(args.work, "ensemble_args.json"), args)
    log(f"wrote {args.work}/report.md")


if __name__ == "__main__":
    run_main(main)
