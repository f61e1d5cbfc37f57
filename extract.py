"""Image embeddings and image-model scores for every lesion.

Train lesions get theirs from the model of the fold that held them out, never from a model that
trained on them. Test lesions get the mean over the fold models (`--test-models best`: only the
fold model with the best validation pAUC, about five times faster). `--frozen` embeds every lesion
with the pretrained backbone instead (one feature space, no fold models, no scores).

Reads:  WORK/folds.csv and WORK/test_lesions.csv (from features.py), DATA/{train,test}-image.hdf5,
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

from common import (MODEL_CONFIGS, DataError, H5Images, amp_dtype, atomic_write, build_model, check_ids,
                    check_image_ids, data_path, default_data_dir, image_loader, log, normalization, predict,
                    read_lesions, run_main, save_array, write_args, write_preds)


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


def trained_folds(models_dir, arch):
    """The fold numbers of the models folder's ARCH/fold{k}/ directories."""
    arch_dir = os.path.join(models_dir, arch)
    return sorted(int(d[4:]) for d in (os.listdir(arch_dir) if os.path.isdir(arch_dir) else [])
                  if re.fullmatch(r"fold\d+", d))


def embed(args, model, images, rows, device, dtype, what):
    """Embeddings (N, D) and logits (N,) of the tiles `rows` of images (None: all), in that order."""
    mean, std = normalization(model)
    loader = image_loader(images, rows, args.batch_size, args.workers)
    return predict(model, loader, MODEL_CONFIGS[args.arch]["img_size"], mean, std, device, dtype,
                   progress=f"{args.arch} {what}")


def fold_part(args, models_dir, k, images, rows, device, dtype):
    """Fold model k's embeddings and logits of the tiles rows[split] of each split, saved as
    WORK/emb/parts/ARCH_fold{k}.npz; with --resume, a part an interrupted run finished is reused."""
    part = os.path.join(args.work, "emb", "parts", f"{args.arch}_fold{k}.npz")
    ids = {s: np.asarray(images[s].ids, str)[r] for s, r in rows.items()}
    if args.resume and os.path.exists(part):
        p = dict(np.load(part))
        for s in rows:
            check_ids(part, p[f"{s}_ids"], ids[s])
        log(f"{args.arch} fold {k}: reusing {part}")
        return p
    model = load_fold_model(models_dir, args.arch, k, device, args.checkpoint)
    p = {}
    for s, r in rows.items():
        p[f"{s}_ids"] = ids[s]
        p[f"{s}_emb"], p[f"{s}_logit"] = (
            embed(args, model, images[s], r, device, dtype, f"fold {k} {'held-out train' if s == 'train' else s}")
            if len(r) else (np.zeros((0, model.num_features), np.float32), np.zeros(0)))
    atomic_write(part, lambda f: np.savez(f, **p))
    return p


def fold_model_outputs(args, models_dir, images, lesions, device, dtype):
    """Out-of-fold embeddings and scores of the train lesions, and the test lesions' mean over the
    test fold models (all of them, or the best one). Writes the scores to WORK/preds/."""
    folds = sorted(set(lesions["train"]["fold"].tolist())) if "train" in lesions else trained_folds(models_dir,
                                                                                                    args.arch)
    if not folds:
        raise DataError(f"{models_dir}/{args.arch}: no fold models (fold*/); train them first, or use --frozen")
    test_folds = folds if args.test_models == "mean" else [max(
        folds, key=lambda k: fold_checkpoint(models_dir, args.arch, k, args.checkpoint)["val_pauc"])]
    dim = MODEL_CONFIGS[args.arch]["feature_dim"]
    emb = {s: np.zeros((len(t["isic_id"]), dim), np.float32) for s, t in lesions.items()}
    prob = {s: np.zeros(len(t["isic_id"])) for s, t in lesions.items()}
    for k in folds:
        rows = {"test": np.arange(len(prob["test"]) if k in test_folds else 0)}
        if "train" in lesions:
            rows["train"] = np.flatnonzero(lesions["train"]["fold"] == k)
        p = fold_part(args, models_dir, k, images, rows, device, dtype)
        for s, r in rows.items():
            emb[s][r] += p[f"{s}_emb"] / (len(test_folds) if s == "test" else 1)
            prob[s][r] += sigmoid(p[f"{s}_logit"]) / (len(test_folds) if s == "test" else 1)
    for s, t in lesions.items():
        write_preds(args.work, f"img_{args.arch}", s, t, prob[s])
    log(f"{args.arch}: wrote image-model scores to preds/img_{args.arch}_*.csv (test: fold models {test_folds})")
    return emb


def save_embeddings(args, emb, lesions):
    """WORK/emb/ARCH_{split}.npy with its ids; the tiles that could not be decoded are listed."""
    for split, e in emb.items():
        ids = np.asarray(lesions[split]["isic_id"], str)
        broken = ids[np.isnan(e).any(axis=1)]
        if len(broken):
            log(f"warning: {len(broken)} {split} image(s) cannot be decoded: {', '.join(broken[:20])}; their "
                "image features are missing (NaN) and the GBDTs score them from their other features")
        save_array(os.path.join(args.work, "emb", f"{args.arch}_{split}.npy"), e, list(ids))
    log(f"{args.arch}: wrote emb/{args.arch}_{{{','.join(emb)}}}.npy")


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
    models_dir = args.models or os.path.join(args.work, "models")
    lesions = {"test": read_lesions(args.work, "test")}
    if not args.predict_only:
        lesions["train"] = read_lesions(args.work, "train")
    images = {}
    for split, t in lesions.items():
        path = data_path(args.data, f"{split}-image.hdf5")
        check_image_ids(path, list(t["isic_id"]))
        images[split] = H5Images(path, t["isic_id"])
    if args.frozen:
        model = build_model(args.arch, args.weights, pretrained=True, drop_path=0.0).to(device).eval()
        emb = {s: embed(args, model, images[s], None, device, dtype, f"frozen {s}")[0] for s in lesions}
    else:
        emb = fold_model_outputs(args, models_dir, images, lesions, device, dtype)
    save_embeddings(args, emb, lesions)
    write_args(os.path.join(args.work, "emb", f"{args.arch}_args.json"), args)
    shutil.rmtree(os.path.join(args.work, "emb", "parts"), ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
