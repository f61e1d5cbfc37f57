"""LightGBM on the tabular features (optionally with an image model's scores and embeddings),
cross-validated on the patient-grouped folds of folds.csv.

The 1:1000 imbalance is handled per bag, as the top solutions did: positives are oversampled until
they are `--pos-rate` of the negatives, then negatives undersampled until positives are
`--neg-rate` of them; each bag draws its own sample with its own seed. A fixed number of rounds,
no early stopping: stopping on the validation fold would make the OOF score optimistic.

Reads:  WORK/folds.csv, WORK/features/{train,test}.npy, WORK/features/columns.txt;
        with --image A: WORK/preds/img_A_{oof,test}.csv; with --embeddings A: WORK/emb/A_{train,test}.npy
Writes: WORK/preds/NAME_oof.csv (isic_id,target,fold,pred), WORK/preds/NAME_test.csv (isic_id,pred),
        WORK/models/NAME/fold{k}_bag{b}.txt, importance.csv, args.json

    python gbdt.py --work work --name tabular --rounds 50 --bags 1             # tiny
    python gbdt.py --data DIR --work work --name tab_eva02 --image eva02_base --embeddings eva02_base
"""
import argparse
import os

import numpy as np

from common import (run_main, DataError, atomic_write, check_ids, default_data_dir, load_array, load_folds, log, pauc,
                    read_metadata, read_test, read_train, write_args, write_csv)
from features import patient_normalize


def image_score_features(work, arch, train, test):
    """An image model's score as three features: raw, divided by the patient's mean score, and
    z-scored within the patient. Train scores are out-of-fold."""
    blocks = []
    for split, table in (("oof", train), ("test", test)):
        path = os.path.join(work, "preds", f"img_{arch}_{split}.csv")
        preds = read_metadata(path, required=["isic_id", "pred"])
        check_ids(path, preds["isic_id"], table["isic_id"])
        score = preds["pred"].astype(float)[:, None]
        pid = table["patient_id"].astype(str)
        patients, codes = np.unique(pid, return_inverse=True)
        ok = ~np.isnan(score[:, 0])  # a tile that could not be decoded has no score
        mean = (np.bincount(codes[ok], weights=score[ok, 0], minlength=len(patients))
                / np.maximum(np.bincount(codes[ok], minlength=len(patients)), 1))[codes]
        ratio = np.where(mean != 0, score[:, 0] / np.where(mean != 0, mean, 1), np.nan)
        blocks.append(np.column_stack([score[:, 0], ratio, patient_normalize(score, pid)["z"][:, 0]]))
    names = [f"img_{arch}", f"img_{arch}_over_patient_mean", f"img_{arch}_pn_z"]
    return blocks[0], blocks[1], names


def load_features(args, train, test):
    fdir = os.path.join(args.work, "features")
    x_train = load_array(os.path.join(fdir, "train.npy"), train["isic_id"])
    x_test = load_array(os.path.join(fdir, "test.npy"), test["isic_id"])
    with open(os.path.join(fdir, "columns.txt")) as f:
        names = f.read().splitlines()
    if len(names) != x_train.shape[1] or x_test.shape[1] != x_train.shape[1]:
        raise DataError(f"{fdir}: columns.txt, train.npy and test.npy disagree on the feature count")
    extra_train, extra_test = [x_train], [x_test]
    if args.image:
        a, b, n = image_score_features(args.work, args.image, train, test)
        extra_train.append(a), extra_test.append(b)
        names += n
    if args.embeddings:
        edir = os.path.join(args.work, "emb")
        a = load_array(os.path.join(edir, f"{args.embeddings}_train.npy"), train["isic_id"])
        b = load_array(os.path.join(edir, f"{args.embeddings}_test.npy"), test["isic_id"])
        extra_train.append(a), extra_test.append(b)
        names += [f"emb_{args.embeddings}_{i}" for i in range(a.shape[1])]
    return (np.hstack(extra_train).astype(np.float32), np.hstack(extra_test).astype(np.float32), names)


def bag_sample(y, rng, pos_rate, neg_rate):
    """Row indices of one bag: positives oversampled (with replacement) to pos_rate x negatives,
    then negatives undersampled to (positives / neg_rate)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos = max(len(pos), int(np.ceil(pos_rate * len(neg))))
    pos = np.r_[pos, rng.choice(pos, n_pos - len(pos))] if n_pos > len(pos) else pos
    n_neg = min(len(neg), int(len(pos) / neg_rate))
    return np.sort(np.r_[pos, rng.choice(neg, n_neg, replace=False)])


def lgb_params(args, seed):
    return {"objective": "binary", "learning_rate": args.lr, "num_leaves": args.num_leaves,
            "max_depth": args.max_depth, "min_child_samples": 20, "feature_fraction": 0.5,
            "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l1": 0.1, "lambda_l2": 1.0,
            "seed": seed, "deterministic": True, "num_threads": args.threads, "verbose": -1}


def main(argv=None):
    import lightgbm as lgb
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=default_data_dir(), help="folder with the Kaggle files")
    parser.add_argument("--work", default="work")
    parser.add_argument("--name", default="tabular", help="names the outputs: preds/NAME_oof.csv, ...")
    parser.add_argument("--image", help="add this arch's image scores (preds/img_ARCH_*.csv)")
    parser.add_argument("--embeddings", help="add this arch's embeddings (emb/ARCH_*.npy)")
    parser.add_argument("--rounds", type=int, default=250)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--num-leaves", type=int, default=31)
    parser.add_argument("--max-depth", type=int, default=6)
    parser.add_argument("--bags", type=int, default=3)
    parser.add_argument("--pos-rate", type=float, default=0.003)
    parser.add_argument("--neg-rate", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    train, test = read_train(args.data), read_test(args.data)
    folds = load_folds(args.work, train)
    y = train["target"].astype(int)
    x_train, x_test, names = load_features(args, train, test)
    log(f"{args.name}: {x_train.shape[0]} train x {x_train.shape[1]} features, {y.sum()} positives, "
        f"{len(np.unique(folds))} folds x {args.bags} bags x {args.rounds} rounds")
    model_dir = os.path.join(args.work, "models", args.name)
    oof = np.full(len(y), np.nan)
    test_pred = np.zeros(len(x_test))
    gain = np.zeros(len(names))
    n_models = 0
    for k in np.unique(folds):
        trn, val = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        fold_pred = np.zeros(len(val))
        for b in range(args.bags):
            seed = args.seed + 100 * int(k) + b
            rows = trn[bag_sample(y[trn], np.random.default_rng(seed), args.pos_rate, args.neg_rate)]
            booster = lgb.train(lgb_params(args, seed), lgb.Dataset(x_train[rows], y[rows], feature_name=names,
                                                                     free_raw_data=True), args.rounds)
            fold_pred += booster.predict(x_train[val]) / args.bags
            if len(x_test):
                test_pred += booster.predict(x_test)
            gain += booster.feature_importance("gain")
            n_models += 1
            text = booster.model_to_string()
            atomic_write(os.path.join(model_dir, f"fold{k}_bag{b}.txt"), lambda f: f.write(text.encode()))
        oof[val] = fold_pred
        score = pauc(y[val], fold_pred) if 0 < y[val].sum() < len(val) else float("nan")
        log(f"{args.name} fold {k}: {len(trn)} train rows, {len(val)} validation rows, pAUC {score:.4f}")
    test_pred /= n_models
    log(f"{args.name}: OOF pAUC {pauc(y, oof):.4f}")
    pdir = os.path.join(args.work, "preds")
    write_csv(os.path.join(pdir, f"{args.name}_oof.csv"), ["isic_id", "target", "fold", "pred"],
              [train["isic_id"], y, folds, oof])
    write_csv(os.path.join(pdir, f"{args.name}_test.csv"), ["isic_id", "pred"], [test["isic_id"], test_pred])
    order = np.argsort(-gain)
    write_csv(os.path.join(model_dir, "importance.csv"), ["feature", "gain"],
              [np.array(names)[order], gain[order] / n_models])
    write_args(os.path.join(model_dir, "args.json"), args)


if __name__ == "__main__":
    run_main(main)
