"""LightGBM on the tabular features (optionally with an image model's scores and embeddings),
cross-validated on the patient-grouped folds of folds.csv.

The 1:1000 imbalance is handled per bag, as the top solutions did: positives are oversampled until
they are `--pos-rate` of the negatives, then negatives undersampled until positives are
`--neg-rate` of them; each bag draws its own sample with its own seed. A fixed number of rounds,
no early stopping: stopping on the validation fold would make the OOF score optimistic.

Reads:  WORK/folds.csv, WORK/test_lesions.csv, WORK/features/{train,test}.npy, WORK/features/columns.txt;
        with --image A: WORK/preds/img_A_{oof,test}.csv; with --embeddings A: WORK/emb/A_{train,test}.npy
Writes: WORK/preds/NAME_oof.csv (isic_id,target,fold,pred), WORK/preds/NAME_test.csv (isic_id,pred),
        WORK/models/NAME/: fold{k}_bag{b}.txt, importance.csv, args.json, and manifest.json (written last:
        the features, folds, boosters, each file's sha256, the digests of the inputs), in place at once
        With --predict-only: reads the boosters from --models (after checking the manifest), writes only
        WORK/preds/NAME_test.csv. Last, WORK/records/NAME.json: the digests of the predictions and of the
        model folder's manifest

    python gbdt.py --work work --name tabular --rounds 50 --bags 1             # tiny
    python gbdt.py --work work --name tab_eva02 --image eva02_base
"""
import argparse
import os
import shutil

import lightgbm as lgb
import numpy as np

from common import (SEED, DataError, add_path_flags, atomic_write, check_ids, check_record, codes, commit_folder,
                    file_digest, finish_commit, gbdt_name, lesions_digest, load_array, log, models_folder, number,
                    patient_normalize, pauc, pauc_or_nan, read_csv, read_lesions, read_manifest, read_preds, run_main,
                    stage_locks, write_args, write_csv, write_preds, write_record)
from features import CONTEXT, CONTEXT_STATS, group_normalize


def site_codes(x, names):
    """Each lesion's anatom_site_general as a code, from its one-hot columns; -1 where none is set
    (missing, or never seen in train)."""
    cols = [i for i, n in enumerate(names) if n.startswith(f"{CONTEXT['site']}__")]
    onehot = x[:, cols]
    return np.where(onehot.any(1), onehot.argmax(1), -1)


def image_score_features(work, arch, split, lesions, site, scores_digest):
    """An image model's score (its standardized logit; out of fold for train) as five features: the
    score, its deviation from the patient's median score, its z-score within the patient, and its
    z-score and percentile within the patient's lesions of the same body site. scores_digest: that
    of the models folder's ARCH/scores.json, which the scores must come from."""
    score = read_preds(work, f"img_{arch}", split, lesions["isic_id"], scores_digest)  # a tile without a score: NaN
    patient = codes(lesions["patient_id"])
    pn = patient_normalize(score[:, None], patient, stats=("dev", "z"))
    by_site = np.empty((len(CONTEXT_STATS), 1, len(score)))
    group_normalize(score[:, None], patient, site, by_site)
    return (np.column_stack([score, pn["dev"][:, 0], pn["z"][:, 0], by_site[0, 0], by_site[1, 0]]),
            [f"img_{arch}", f"img_{arch}_pn_dev", f"img_{arch}_pn_z"]
            + [f"img_{arch}_site_{stat}" for stat in CONTEXT_STATS])


def load_features(args, split, lesions, inputs):
    """The feature matrix of one split ("train" or "test") and the feature names, each block checked
    against the record of the stage run that wrote it and against the models folder's files that
    run used (inputs: their digests)."""
    fdir = os.path.join(args.work, "features")
    path = os.path.join(fdir, f"{split}.npy")
    columns = os.path.join(fdir, "columns.txt")
    check_record(args.work, "features", [path, path[:-4] + "_ids.txt", columns], "features.py",
                 inputs["features.json"])
    blocks = [load_array(path, lesions["isic_id"], "features.py")]
    with open(columns) as f:
        names = f.read().splitlines()
    if len(names) != blocks[0].shape[1]:
        raise DataError(f"{fdir}: columns.txt names {len(names)} features, {split}.npy has {blocks[0].shape[1]}")
    site = site_codes(blocks[0], names)
    for arch in args.image:
        block, more = image_score_features(args.work, arch, split, lesions, site, inputs.get(f"{arch}/scores.json"))
        blocks.append(block)
        names += more
    for arch in args.embeddings:
        path = os.path.join(args.work, "emb", f"{arch}_{split}.npy")
        check_record(args.work, f"img_{arch}", [path, path[:-4] + "_ids.txt"], f"extract.py --arch {arch}")
        blocks.append(load_array(path, lesions["isic_id"], f"extract.py --arch {arch}"))
        names += [f"emb_{arch}_{i}" for i in range(blocks[-1].shape[1])]
    # row-major: each bag's and the validation rows are gathered as whole rows (gathering rows of a
    # feature-major matrix took a third of a run at 400,000 rows)
    return np.ascontiguousarray(np.hstack(blocks) if len(blocks) > 1 else blocks[0], dtype=np.float32), names


def input_digests(args, models_dir):
    """The digests of the models-folder files this model's features come from: features.json and,
    for image features, the scores.json that extract.py wrote for those image models."""
    path = os.path.join(models_dir, "features.json")
    if not os.path.exists(path):
        raise DataError(f"{path}: not found: run features.py on the training data (with this --models)")
    digests = {"features.json": file_digest(path)}
    for arch in sorted(set(args.image + args.embeddings)):
        path = os.path.join(models_dir, arch, "scores.json")
        if os.path.exists(path):
            digests[f"{arch}/scores.json"] = file_digest(path)
    return digests


GBDT_MANIFEST = {"features": ["text"], "folds": ["int"], "boosters": ["text"], "lesions": "digest",
                 "inputs": {"*": "digest"}}


def load_boosters(model_dir, names, inputs):
    """The boosters of a committed model folder ({file name: booster}: fold{k}_bag{b}.txt), checked
    against the features they get now."""
    rerun = f"gbdt.py --name {os.path.basename(model_dir)} on the training data, with the same options"
    manifest = read_manifest(model_dir, rerun, schema=GBDT_MANIFEST, agree=lambda m: (
        not m["boosters"] and "boosters is empty"
        or next((f"booster {b} is not one of its files" for b in m["boosters"] if b not in m["files"]), None)))
    if manifest["features"] != names:
        raise DataError(f"{model_dir}: trained on other features than these ({len(manifest['features'])} against "
                        f"{len(names)}): same feature options as in training?")
    changed = [k for k, v in manifest["inputs"].items() if inputs.get(k) != v]
    if changed:
        raise DataError(f"{model_dir}: trained on features from another {', '.join(changed)} than the models folder "
                        f"holds now (models of two runs mixed?): run {rerun}")
    return {f: lgb.Booster(model_file=os.path.join(model_dir, f)) for f in manifest["boosters"]}, manifest["digest"]


def arch_list(text):
    archs = [a for a in text.split(",") if a]
    if len(set(archs)) < len(archs) or not archs:
        raise argparse.ArgumentTypeError(f"{text!r}: one or more distinct --arch names, comma-separated")
    return archs


def bag_sample(y, rng, pos_rate, neg_rate):
    """Row indices of one bag: positives oversampled (with replacement) to pos_rate x negatives,
    then negatives undersampled to (positives / neg_rate)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos = max(len(pos), int(np.ceil(pos_rate * len(neg))))
    pos = np.r_[pos, rng.choice(pos, n_pos - len(pos))] if n_pos > len(pos) else pos
    n_neg = min(len(neg), int(len(pos) / neg_rate))
    return np.sort(np.r_[pos, rng.choice(neg, n_neg, replace=False)])


def bag_datasets(args, x, y, weight, trn, names, seeds):
    """The LightGBM Dataset of each bag of a fold whose training rows are `trn`, one bag a seed: the
    rows that bag_sample draws, as a subset of one Dataset that bins the rows of every bag once
    (binning each bag anew took most of its time besides the trees)."""
    bags = [trn[bag_sample(y[trn], np.random.default_rng(seed), args.pos_rate, args.neg_rate)] for seed in seeds]
    used = np.unique(np.concatenate(bags))
    fold_data = lgb.Dataset(x[used], y[used], weight=weight[used], feature_name=names,
                            params=lgb_params(args, args.seed)).construct()
    return [fold_data.subset(np.searchsorted(used, rows)) for rows in bags]


def lgb_params(args, seed):
    return {"objective": "binary", "learning_rate": args.lr, "num_leaves": args.num_leaves,
            "max_depth": args.max_depth, "min_child_samples": args.min_leaf, "feature_fraction": args.colsample_bytree,
            "feature_fraction_bynode": args.colsample_bynode, "bagging_fraction": 0.8, "bagging_freq": 1,
            "lambda_l1": 0.1, "lambda_l2": 1.0, "max_bin": args.max_bin, "bin_construct_sample_cnt": args.bin_sample,
            # column-wise histograms were the faster layout at every size measured (bench.py's levers);
            # left to choose, LightGBM times both layouts before each booster and still picks row-wise at times
            "force_col_wise": True, "seed": seed, "deterministic": True, "num_threads": args.threads, "verbose": -1}


def training_weights(args, train):
    """LightGBM's row weights: --indeterminate-weight for the negatives whose diagnosis (iddx_1 in
    WORK/train_diagnosis.csv) is Indeterminate, 1 for every other lesion."""
    path = os.path.join(args.work, "train_diagnosis.csv")
    check_record(args.work, "features", [path], "features.py")
    diagnosis = read_csv(path, ["isic_id", "iddx_1"])
    check_ids(path, diagnosis["isic_id"], train["isic_id"])
    indeterminate = (diagnosis["iddx_1"] == "Indeterminate") & (train["target"] == 0)
    weight = np.where(indeterminate, args.indeterminate_weight, 1.0)
    if not (weight[train["target"] == 0] > 0).any():
        raise DataError(f"{path}: every negative is Indeterminate, and --indeterminate-weight "
                        f"{args.indeterminate_weight:g} gives them no weight: nothing to learn from; pass a weight "
                        "above 0")
    return weight, int(indeterminate.sum())


def train_boosters(args, model_dir, names, test, x_test, inputs):
    """Boosters on every fold, bagged; out-of-fold and test predictions. The boosters are written
    into MODEL_DIR.partial, which replaces MODEL_DIR whole once every one is there."""
    train = read_lesions(args.work, "train")
    folds, y = train["fold"], train["target"]
    x_train, _ = load_features(args, "train", train, inputs)
    weight, n_indeterminate = training_weights(args, train)
    log(f"{args.name}: {x_train.shape[0]} train x {x_train.shape[1]} features, {y.sum()} positives, "
        f"{len(np.unique(folds))} folds x {args.bags} bags x {args.rounds} rounds; {n_indeterminate} Indeterminate "
        f"negatives weighted {args.indeterminate_weight:g}")
    partial = model_dir + ".partial"
    finish_commit(model_dir)  # a commit that a kill interrupted: its model is kept (or restored) until replaced
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
    os.makedirs(partial)
    oof = np.full(len(y), np.nan)
    test_pred = np.zeros(len(x_test))
    gain = np.zeros(len(names))
    boosters = []
    for k in np.unique(folds):
        trn, val = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        x_val, fold_pred = x_train[val], np.zeros(len(val))
        seeds = [args.seed + 100 * int(k) + b for b in range(args.bags)]
        for b, (seed, bag) in enumerate(zip(seeds, bag_datasets(args, x_train, y, weight, trn, names, seeds))):
            booster = lgb.train(lgb_params(args, seed), bag, args.rounds)
            fold_pred += booster.predict(x_val) / args.bags
            if len(x_test):
                test_pred += booster.predict(x_test)
            gain += booster.feature_importance("gain")
            boosters.append(f"fold{k}_bag{b}.txt")
            text = booster.model_to_string()
            atomic_write(os.path.join(partial, boosters[-1]), lambda f: f.write(text.encode()))
        if not np.isfinite(fold_pred).all() or np.ptp(fold_pred) == 0:  # ranks nothing: never committed
            shutil.rmtree(partial)
            what = (f"every prediction is {fold_pred[0]:g}: the boosters learned nothing (no split: --min-leaf above "
                    "a bag's rows?)" if np.isfinite(fold_pred).all() else "predictions that are not finite (--lr?)")
            raise DataError(f"{args.name} fold {k}: {what}: no model written")
        oof[val] = fold_pred
        score = pauc_or_nan(y[val], fold_pred)
        log(f"{args.name} fold {k}: {len(trn)} train rows, {len(val)} validation rows, pAUC {score:.4f}")
    test_pred /= len(boosters)
    log(f"{args.name}: OOF pAUC {pauc(y, oof):.4f}")
    order = np.argsort(-gain)
    write_csv(os.path.join(partial, "importance.csv"), ["feature", "gain"],
              [np.array(names)[order], gain[order] / len(boosters)])
    write_args(os.path.join(partial, "args.json"), args)
    commit_folder(partial, model_dir, {"stage": "gbdt.py", "features": names, "folds": np.unique(folds).tolist(),
                                       "boosters": boosters, "lesions": lesions_digest(args.work),
                                       "inputs": inputs})
    write_record(args.work, args.name, [write_preds(args.work, args.name, "train", train, oof),
                                        write_preds(args.work, args.name, "test", test, test_pred)],
                 file_digest(os.path.join(model_dir, "manifest.json")))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_path_flags(parser)
    parser.add_argument("--name", type=gbdt_name, default="tabular",
                        help="names the outputs: models/NAME/, preds/NAME_oof.csv, ... (not an image model's name, "
                             "img_*, features or ensemble)")
    parser.add_argument("--image", type=arch_list, default=[],
                        help="image models' --arch names, comma-separated: add their scores (preds/img_ARCH_*.csv)")
    parser.add_argument("--embeddings", type=arch_list, default=[],
                        help="image models' --arch names, comma-separated: add their embeddings (emb/ARCH_*.npy)")
    parser.add_argument("--predict-only", action="store_true",
                        help="only test predictions, from the boosters in --models: no training")
    # defaults from bench.py --ablation (BENCHMARKS.md): the winners' regularisation; 2 bags x 170
    # rounds at lr 0.06 and 63 bins (--ablation speed) were within 0.002 of 5 x 400 at 0.03 and 255 bins
    parser.add_argument("--rounds", type=number(int, 1, 100_000), default=170)
    parser.add_argument("--lr", type=number(float, 0, 1, low_open=True), default=0.06)
    # each leaf caches a histogram of every feature: memory grows with the leaves
    parser.add_argument("--num-leaves", type=number(int, 2, 1024), default=31)
    parser.add_argument("--max-depth", type=number(int, 1, 64, also=(-1,)), default=6, help="-1: no limit")
    parser.add_argument("--min-leaf", type=number(int, 1, 100_000), default=80, help="LightGBM's min_data_in_leaf")
    parser.add_argument("--colsample-bytree", type=number(float, 0, 1, low_open=True), default=0.5,
                        help="share of the features each tree may use (LightGBM's feature_fraction)")
    parser.add_argument("--colsample-bynode", type=number(float, 0, 1, low_open=True), default=0.5,
                        help="share of the tree's features each split may use (LightGBM's feature_fraction_bynode)")
    parser.add_argument("--bags", type=number(int, 1, 100), default=2)
    parser.add_argument("--max-bin", type=number(int, 2, 1023), default=63,
                        help="histogram bins a feature (LightGBM's max_bin): fewer are faster")
    # LightGBM's default of 200,000 took half of a fold's binning at 400,000 rows
    parser.add_argument("--bin-sample", type=number(int, 1000, 10 ** 9), default=50_000,
                        help="training rows whose values place the bins (LightGBM's bin_construct_sample_cnt)")
    # at most 1: more would make a bag larger than twice the training rows (--pos-rate), or leave it
    # fewer negatives than positives, none at all for a large one (--neg-rate)
    parser.add_argument("--pos-rate", type=number(float, 1e-4, 1), default=0.003,
                        help="positives oversampled to this share of the negatives")
    parser.add_argument("--neg-rate", type=number(float, 1e-4, 1), default=0.01,
                        help="then negatives undersampled until positives are this share of them")
    parser.add_argument("--indeterminate-weight", type=number(float, 0, 10), default=0.0,
                        help="training weight of negatives diagnosed Indeterminate (iddx_1; 0 drops them, 1 is off)")
    parser.add_argument("--threads", type=number(int, 1, 1024), default=os.cpu_count())
    parser.add_argument("--seed", type=SEED, default=42)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    models_dir = models_folder(args)
    model_dir = os.path.join(models_dir, args.name)
    reads = ["features"] + [f"image-{a}" for a in sorted(set(args.image + args.embeddings))]
    with stage_locks(args, [f"gbdt-{args.name}"], reads):
        test = read_lesions(args.work, "test")
        inputs = input_digests(args, models_dir)
        x_test, names = load_features(args, "test", test, inputs)
        if not args.predict_only:
            train_boosters(args, model_dir, names, test, x_test, inputs)
            return
        boosters, digest = load_boosters(model_dir, names, inputs)
        test_pred = sum(b.predict(x_test) for b in boosters.values()) / len(boosters) if len(x_test) else np.zeros(0)
        write_record(args.work, args.name, [write_preds(args.work, args.name, "test", test, test_pred)], digest)
        log(f"{args.name}: test predictions of {len(boosters)} boosters from {model_dir}")


if __name__ == "__main__":
    run_main(main)
