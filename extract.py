"""Image embeddings and image-model scores for every lesion.

Train lesions get theirs from the model of the fold that held them out, never from a model that
trained on them. Test lesions get the mean over the fold models (`--test-models best`: only the
fold model with the best validation pAUC, about five times faster). `--frozen` embeds every lesion
with the pretrained backbone instead (one feature space, no fold models, no scores).

Reads:  DATA/{train,test}-metadata.csv, DATA/{train,test}-image.hdf5, WORK/folds.csv,
        WORK/models/ARCH/fold{k}/last.pt (or best.pt)
Writes: WORK/emb/ARCH_{train,test}.npy with ARCH_{train,test}_ids.txt beside them,
        WORK/preds/img_ARCH_oof.csv (isic_id,target,fold,pred), WORK/preds/img_ARCH_test.csv (isic_id,pred),
        WORK/emb/ARCH_args.json; while running, WORK/emb/parts/ARCH_fold{k}.npz (one per finished fold,
        what --resume reuses after an interruption)

    python extract.py --arch eva02_tiny --data demo_data --work work --workers 0     # tiny
    python extract.py --arch eva02_base --data /kaggle/input/isic-2024-challenge --work work
"""
import argparse
import os
import shutil

import numpy as np
import torch

from common import (run_main, MODEL_CONFIGS, DataError, amp_dtype, atomic_write, check_ids, build_model, check_image_ids, data_path,
                    default_data_dir, image_loader, load_folds, log, normalization, predict, read_test,
                    read_train, save_array, write_args, write_csv)


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def load_fold_model(work, arch, fold, device, checkpoint="last"):
    path = os.path.join(work, "models", arch, f"fold{fold}", f"{checkpoint}.pt")
    if not os.path.exists(path):
        raise DataError(f"{path}: no trained model for fold {fold} (run train_backbone.py --arch {arch} "
                        f"--fold {fold} first, or use --frozen)")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(arch, pretrained=False, drop_path=0.0)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), ck["val_pauc"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--data", default=default_data_dir(), help="folder with the Kaggle files")
    parser.add_argument("--work", default="work")
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
    train, test = read_train(args.data), read_test(args.data)
    folds = load_folds(args.work, train)
    paths = {s: data_path(args.data, f"{s}-image.hdf5") for s in ("train", "test")}
    check_image_ids(paths["train"], list(train["isic_id"]))
    check_image_ids(paths["test"], list(test["isic_id"]))
    train_ids, test_ids = np.asarray(train["isic_id"], str), np.asarray(test["isic_id"], str)

    def run(model, split, ids, what):
        mean, std = normalization(model)
        loader = image_loader(paths[split], ids, None, args.batch_size, args.workers)
        return predict(model, loader, size, mean, std, device, dtype, progress=f"{args.arch} {what}")

    edir = os.path.join(args.work, "emb")
    if args.frozen:
        model = build_model(args.arch, args.weights, pretrained=True, drop_path=0.0).to(device).eval()
        emb_train, _ = run(model, "train", train_ids, "frozen train")
        emb_test, _ = run(model, "test", test_ids, "frozen test")
    else:
        dim = MODEL_CONFIGS[args.arch]["feature_dim"]
        emb_train, prob_train = np.zeros((len(train_ids), dim), np.float32), np.zeros(len(train_ids))
        emb_test, prob_test = np.zeros((len(test_ids), dim), np.float32), np.zeros(len(test_ids))
        fold_models = sorted(set(folds.tolist()))
        scores = {k: load_fold_model(args.work, args.arch, k, "cpu", args.checkpoint)[1] for k in fold_models}
        test_folds = fold_models if args.test_models == "mean" else [max(scores, key=scores.get)]
        for k in fold_models:
            rows = np.flatnonzero(folds == k)
            part = os.path.join(edir, "parts", f"{args.arch}_fold{k}.npz")
            if args.resume and os.path.exists(part):  # this fold finished before an interruption
                p = dict(np.load(part))
                check_ids(part, p["train_ids"], train_ids[rows])
                check_ids(part, p["test_ids"], test_ids if k in test_folds else [])
                log(f"{args.arch} fold {k}: reusing {part}")
            else:
                model, _ = load_fold_model(args.work, args.arch, k, device, args.checkpoint)
                p = {"train_ids": train_ids[rows], "test_ids": test_ids if k in test_folds else test_ids[:0]}
                p["train_emb"], p["train_logit"] = run(model, "train", train_ids[rows], f"fold {k} held-out train")
                p["test_emb"], p["test_logit"] = (run(model, "test", test_ids, f"fold {k} test") if k in test_folds
                                                  else (emb_test[:0], prob_test[:0]))
                atomic_write(part, lambda f: np.savez(f, **p))
            emb_train[rows], prob_train[rows] = p["train_emb"], sigmoid(p["train_logit"])
            if k in test_folds:
                emb_test += p["test_emb"] / len(test_folds)
                prob_test += sigmoid(p["test_logit"]) / len(test_folds)
        write_csv(os.path.join(args.work, "preds", f"img_{args.arch}_oof.csv"), ["isic_id", "target", "fold", "pred"],
                  [train_ids, train["target"].astype(int), folds, prob_train])
        write_csv(os.path.join(args.work, "preds", f"img_{args.arch}_test.csv"), ["isic_id", "pred"],
                  [test_ids, prob_test])
        log(f"{args.arch}: wrote preds/img_{args.arch}_oof.csv and _test.csv (test: fold models {test_folds})")
    for split, emb, ids in (("train", emb_train, train_ids), ("test", emb_test, test_ids)):
        broken = ids[np.isnan(emb).any(axis=1)]
        if len(broken):
            log(f"warning: {len(broken)} {split} image(s) cannot be decoded: {', '.join(broken[:20])}; their "
                "image features are missing (NaN) and the GBDTs score them from their other features")
    save_array(os.path.join(edir, f"{args.arch}_train.npy"), emb_train, list(train_ids))
    save_array(os.path.join(edir, f"{args.arch}_test.npy"), emb_test, list(test_ids))
    write_args(os.path.join(edir, f"{args.arch}_args.json"), args)
    shutil.rmtree(os.path.join(edir, "parts"), ignore_errors=True)
    log(f"{args.arch}: wrote emb/{args.arch}_train.npy {emb_train.shape} and emb/{args.arch}_test.npy {emb_test.shape}")


if __name__ == "__main__":
    run_main(main)
