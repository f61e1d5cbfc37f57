"""Image embeddings and image-model scores for every lesion.

Train lesions get theirs from the model of the fold that held them out, never from a model that
trained on them. Test lesions get the mean over the fold models (`--test-models best`: only the
fold model with the best validation pAUC, about five times faster). `--frozen` embeds every lesion
with the pretrained backbone instead (one feature space, no fold models, no scores).

Reads:  DATA/{train,test}-metadata.csv, DATA/{train,test}-image.hdf5, WORK/folds.csv,
        WORK/models/ARCH/fold{k}/last.pt (or best.pt)
Writes: WORK/emb/ARCH_{train,test}.npy with ARCH_{train,test}_ids.txt beside them,
        WORK/preds/img_ARCH_oof.csv (isic_id,target,fold,pred), WORK/preds/img_ARCH_test.csv (isic_id,pred),
        WORK/emb/ARCH_args.json; with --predict-only, the test files alone, from the models in --models;
        while running, WORK/emb/parts/ARCH_fold{k}.npz (one per finished fold, which --resume reuses)

    python extract.py --arch eva02_tiny --data demo_data --work work --workers 0     # tiny
    python extract.py --arch eva02_base --data /kaggle/input/isic-2024-challenge --work work
"""
import argparse
import os
import re
import shutil

import numpy as np
import torch

from common import (MODEL_CONFIGS, amp_dtype, atomic_write, build_model, check_ids, check_image_ids,
                    data_path, DataError, default_data_dir, H5Images, image_loader, load_folds, log, normalization,
                    predict, read_test, read_train, run_main, save_array, write_args, write_csv)


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def fold_checkpoint(models_dir, arch, fold, checkpoint):
    path = os.path.join(models_dir, arch, f"fold{fold}", f"{checkpoint}.pt")
    if not os.path.exists(path):
        raise DataError(f"{path}: no trained model for fold {fold} (run train_backbone.py --arch {arch} "
                        f"--fold {fold} first, or use --frozen)")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_fold_model(models_dir, arch, fold, device, checkpoint="last"):
    model = build_model(arch, pretrained=False, drop_path=0.0)
    model.load_state_dict(fold_checkpoint(models_dir, arch, fold, checkpoint)["model"])
    return model.to(device).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--data", default=default_data_dir(), help="folder with the Kaggle files")
    parser.add_argument("--work", default="work")
    parser.add_argument("--models", help="folder of trained models (default WORK/models); may be read-only")
    parser.add_argument("--predict-only", action="store_true", help="only the test lesions, from --models")
    parser.add_argument("--test-models", choices=["mean", "best"], default="mean")
    parser.add_argument("--checkpoint", choices=["last", "best"], default="last",
                        help="last: the fixed epoch count; best: the epoch of best validation pAUC, whose "
                             "OOF scores are optimistic, having been chosen on those very rows")
    parser.add_argument("--frozen", action="store_true", help="pretrained backbone, no fine-tuning")
    parser.add_argument("--weights", help="with --frozen: pretrained weights file")
    parser.add_argument("--resume", action="store_true", help="reuse the folds an interrupted run finished")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count()))
    parser.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on the CPU too")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = amp_dtype(device, args.cpu_amp)
    size = MODEL_CONFIGS[args.arch]["img_size"]
    models_dir = args.models or os.path.join(args.work, "models")
    test = read_test(args.data)
    splits = ["test"] if args.predict_only else ["train", "test"]
    paths = {s: data_path(args.data, f"{s}-image.hdf5") for s in splits}
    test_ids = np.asarray(test["isic_id"], str)
    check_image_ids(paths["test"], list(test_ids))
    if args.predict_only:  # no train rows; the folds are those the models folder holds
        train_ids, folds = test_ids[:0], np.zeros(0, int)
        arch_dir = os.path.join(models_dir, args.arch)
        fold_models = sorted(int(d[4:]) for d in (os.listdir(arch_dir) if os.path.isdir(arch_dir) else [])
                             if re.fullmatch(r"fold\d+", d))
    else:
        train = read_train(args.data)
        folds = load_folds(args.work, train)
        train_ids = np.asarray(train["isic_id"], str)
        check_image_ids(paths["train"], list(train_ids))
        fold_models = sorted(set(folds.tolist()))

    images = {s: H5Images(paths[s], ids) for s, ids in (("train", train_ids), ("test", test_ids)) if s in splits}

    def run(model, split, rows, what):
        mean, std = normalization(model)
        loader = image_loader(images[split], rows, args.batch_size, args.workers)
        return predict(model, loader, size, mean, std, device, dtype, progress=f"{args.arch} {what}")

    edir = os.path.join(args.work, "emb")
    if args.frozen:
        model = build_model(args.arch, args.weights, pretrained=True, drop_path=0.0).to(device).eval()
        emb_train, _ = run(model, "train", None, "frozen train")
        emb_test, _ = run(model, "test", None, "frozen test")
    else:
        if not fold_models:
            raise DataError(f"{models_dir}/{args.arch}: no fold models (fold*/); train them first, or use --frozen")
        dim = MODEL_CONFIGS[args.arch]["feature_dim"]
        emb_train, prob_train = np.zeros((len(train_ids), dim), np.float32), np.zeros(len(train_ids))
        emb_test, prob_test = np.zeros((len(test_ids), dim), np.float32), np.zeros(len(test_ids))
        test_folds = fold_models if args.test_models == "mean" else [max(
            fold_models, key=lambda k: fold_checkpoint(models_dir, args.arch, k, args.checkpoint)["val_pauc"])]
        for k in fold_models:
            rows = np.flatnonzero(folds == k)
            part = os.path.join(edir, "parts", f"{args.arch}_fold{k}.npz")
            if args.resume and os.path.exists(part):  # this fold finished before an interruption
                p = dict(np.load(part))
                check_ids(part, p["train_ids"], train_ids[rows])
                check_ids(part, p["test_ids"], test_ids if k in test_folds else [])
                log(f"{args.arch} fold {k}: reusing {part}")
            else:
                model = load_fold_model(models_dir, args.arch, k, device, args.checkpoint)
                p = {"train_ids": train_ids[rows], "test_ids": test_ids if k in test_folds else test_ids[:0]}
                p["train_emb"], p["train_logit"] = (run(model, "train", rows, f"fold {k} held-out train") if len(rows)
                                                    else (emb_train[:0], prob_train[:0]))
                p["test_emb"], p["test_logit"] = (run(model, "test", None, f"fold {k} test") if k in test_folds
                                                  else (emb_test[:0], prob_test[:0]))
                atomic_write(part, lambda f: np.savez(f, **p))
            emb_train[rows], prob_train[rows] = p["train_emb"], sigmoid(p["train_logit"])
            if k in test_folds:
                emb_test += p["test_emb"] / len(test_folds)
                prob_test += sigmoid(p["test_logit"]) / len(test_folds)
        if not args.predict_only:
            header = ["isic_id", "target", "fold", "pred"]
            write_csv(os.path.join(args.work, "preds", f"img_{args.arch}_oof.csv"), header,
                      [train_ids, train["target"].astype(int), folds, prob_train])
        write_csv(os.path.join(args.work, "preds", f"img_{args.arch}_test.csv"), ["isic_id", "pred"],
                  [test_ids, prob_test])
        log(f"{args.arch}: wrote image-model scores to preds/img_{args.arch}_*.csv (test: fold models {test_folds})")
    for split, emb, ids in (("train", emb_train, train_ids), ("test", emb_test, test_ids)):
        broken = ids[np.isnan(emb).any(axis=1)]
        if len(broken):
            log(f"warning: {len(broken)} {split} image(s) cannot be decoded: {', '.join(broken[:20])}; their "
                "image features are missing (NaN) and the GBDTs score them from their other features")
        if split in splits:
            save_array(os.path.join(edir, f"{args.arch}_{split}.npy"), emb, list(ids))
    write_args(os.path.join(edir, f"{args.arch}_args.json"), args)
    shutil.rmtree(os.path.join(edir, "parts"), ignore_errors=True)
    log(f"{args.arch}: wrote emb/{args.arch}_{{{','.join(splits)}}}.npy")


if __name__ == "__main__":
    run_main(main)
