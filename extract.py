"""Image embeddings and image-model scores for every lesion.

Train lesions get theirs from the model of the fold that held them out, never from a model that
trained on them. Test lesions get theirs from the fold model with the best validation pAUC, of
those that have one (`--test-models best`, the default: one model, whose GPU time on 500,000
test lesions is hours for eva02_base on GPU T4 x2, see BENCHMARKS.md), or from the mean over the
fold models (`--test-models mean`, five times the GPU time). A score is the model's logit
standardized by the mean and spread of that model's own out-of-fold logits, so that train and
test scores mean the same whatever the fold model. `--frozen` embeds every lesion with the
pretrained backbone instead (no scores).
Under `torchrun --nproc_per_node=N` the lesions are split across the GPUs; process 0 writes.

Reads:  WORK/folds.csv and WORK/test_lesions.csv (from features.py), DATA/{train,test}-image.hdf5,
        WORK/models/ARCH/fold{k}/ (last.pt or best.pt of the folds it scores, checked against their manifests)
Writes: WORK/emb/ARCH_{train,test}.npy with ARCH_{train,test}_ids.txt beside them,
        WORK/preds/img_ARCH_oof.csv (isic_id,target,fold,pred), WORK/preds/img_ARCH_test.csv (isic_id,pred),
        WORK/models/ARCH/scores.json (the fold models' digests and logit statistics, which --predict-only
        reads back), WORK/emb/ARCH_args.json, and last WORK/records/img_ARCH.json (the digests of the
        embeddings and scores, and of scores.json); with --predict-only, the test files alone, from --models;
        while running, WORK/emb/parts/ARCH_fold{k}.npz (one per finished fold, which --resume reuses)

    python extract.py --arch eva02_tiny --data demo_data --work work --workers 0     # tiny
    python extract.py --arch eva02_base --data DATA_DIR --work work
    torchrun --nproc_per_node=2 extract.py --arch eva02_base --work work --predict-only --models MODELS
"""
import argparse
import contextlib
import os
import re
import shutil
import zipfile

import numpy as np
import torch

from common import (FOLD_MANIFEST, MODEL_CONFIGS, DataError, H5Images, add_path_flags, amp_settings, atomic_write,
                    broken_tiles, build_model, check_a_tile_decodes, check_ids, check_image_ids, data_path, file_digest,
                    image_loader, lesions_digest, log, models_folder, normalization, number, predict, process_device,
                    read_json, read_lesions, read_manifest, run_main, save_array, stage_locks, write_args, write_json,
                    write_preds, write_record)


def fold_manifests(args, models_dir, lesions):
    """The committed fold models of ARCH, {fold: manifest}: every fold of folds.csv when training
    rows are scored (each trained on exactly those folds), else every fold model in the folder
    (all from one training run's folds). Their files are checked where they are loaded."""
    arch_dir = os.path.join(models_dir, args.arch)
    if "train" in lesions:
        folds = sorted(set(lesions["train"]["fold"].tolist()))
    else:
        folds = sorted(int(d[4:]) for d in (os.listdir(arch_dir) if os.path.isdir(arch_dir) else [])
                       if re.fullmatch(r"fold\d+", d))
    if not folds:
        raise DataError(f"{arch_dir}: no fold models (fold*/); train them first, or use --frozen")
    manifests = {k: read_manifest(os.path.join(arch_dir, f"fold{k}"), f"train_backbone.py --arch {args.arch} "
                                  f"--fold {k}", files=(), schema=FOLD_MANIFEST, agree=lambda m, k=k: (
                                      m["arch"] != args.arch and f"arch is {m['arch']}, in the folder of {args.arch}"
                                      or m["fold"] != k and f"fold is {m['fold']}, in the folder fold{k}"))
                 for k in folds}
    trained_on = {m["lesions"] for m in manifests.values()}
    if "train" in lesions and trained_on != {lesions_digest(args.work)}:
        stale = [k for k, m in manifests.items() if m["lesions"] != lesions_digest(args.work)]
        raise DataError(f"{arch_dir}: fold model(s) {stale} were trained on other folds than {args.work}/folds.csv's "
                        f"(their held-out rows would not be out of fold): retrain them with train_backbone.py")
    if len(trained_on) > 1:
        raise DataError(f"{arch_dir}: its fold models come from training runs on different folds: copy the "
                        "fold*/ folders of one run")
    return manifests


def best_fold(manifests, checkpoint, arch_dir):
    """The fold whose model scored the best validation pAUC at `checkpoint`, of {fold: manifest};
    a fold without a positive in validation has NaN, which is no score, not a low or a high one."""
    scores = {k: m["val_pauc"][checkpoint] for k, m in manifests.items() if not np.isnan(m["val_pauc"][checkpoint])}
    if not scores:
        raise DataError(f"{arch_dir}: no fold model has a validation pAUC at its {checkpoint} checkpoint (no "
                        "positive in any fold's validation rows): pass --test-models mean")
    return max(sorted(scores), key=scores.get)


def load_fold_model(models_dir, arch, fold, device, checkpoint="last"):
    model = build_model(arch, pretrained=False, drop_path=0.0)
    path = os.path.join(models_dir, arch, f"fold{fold}", f"{checkpoint}.pt")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    return model.to(device).eval()


def process_rank():
    """This process's rank under torchrun, else 0."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def embed(args, model, images, rows, device, dtype, what):
    """Embeddings (N, D) and logits (N,) of the tiles `rows` of images (None: all), in that order.
    Under torchrun each process scores an equal share of the rows, and process 0 gathers the
    shares (through files in WORK/emb/parts/) and returns them whole; the others return None."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    rank, world = process_rank(), torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mean, std = normalization(model)
    loader = image_loader(images, np.array_split(rows, world)[rank], args.batch_size, args.workers)
    emb, logit = predict(model, loader, MODEL_CONFIGS[args.arch]["img_size"], mean, std, device, dtype,
                         progress=f"{args.arch} {what}" + (f", process {rank}" if world > 1 else ""),
                         lenient=args.predict_only)
    if world > 1:
        shard = os.path.join(args.work, "emb", "parts", f"{args.arch}_{what.replace(' ', '_')}_process{{}}.npz")
        atomic_write(shard.format(rank), lambda f: np.savez(f, emb=emb, logit=logit))
        torch.distributed.barrier()
        if rank:
            return None, None
        shards = [dict(np.load(shard.format(r))) for r in range(world)]
        for r in range(world):
            os.remove(shard.format(r))
        emb, logit = np.concatenate([s["emb"] for s in shards]), np.concatenate([s["logit"] for s in shards])
    check_a_tile_decodes(images, rows, logit, f"{args.arch} {what}")
    return emb, logit


def fold_part(args, models_dir, k, model_digest, images, rows, device, dtype):
    """Fold model k's embeddings and logits of the tiles rows[split] of each split, saved as
    WORK/emb/parts/ARCH_fold{k}.npz; with --resume, a part that an interrupted run finished with
    the same model (its manifest's digest) and checkpoint is reused. None in torchrun processes
    other than the first."""
    part = os.path.join(args.work, "emb", "parts", f"{args.arch}_fold{k}.npz")
    ids = {s: np.asarray(images[s].ids, str)[r] for s, r in rows.items()}
    model_id = np.array(f"{model_digest} {args.checkpoint}")
    if args.resume and os.path.exists(part):
        try:
            p = dict(np.load(part))
            reuse, why = p["model"] == model_id, "was made by another model or checkpoint"
        except (ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # truncated by a full disk, say
            reuse, why = False, f"cannot be read ({type(e).__name__}: {e})"
        if reuse:
            for s in rows:
                check_ids(part, p[f"{s}_ids"], ids[s])
            log(f"{args.arch} fold {k}: reusing {part}")
            return p
        log(f"{args.arch} fold {k}: {part} {why}; scoring again")
    model = load_fold_model(models_dir, args.arch, k, device, args.checkpoint)
    p = {"model": model_id}
    for s, r in rows.items():
        p[f"{s}_ids"] = ids[s]
        p[f"{s}_emb"], p[f"{s}_logit"] = (
            embed(args, model, images[s], r, device, dtype, f"fold {k} {'held-out train' if s == 'train' else s}")
            if len(r) else (np.zeros((0, model.num_features), np.float32), np.zeros(0)))
    if process_rank():
        return None
    atomic_write(part, lambda f: np.savez(f, **p))
    return p


SCORES_JSON = {"folds": {"*": "digest"}, "checkpoint": "text", "logit_stats": {"*": ["number"]}}


def logit_statistics(args, models_dir, made_with, train_logits):
    """Each fold model's mean and standard deviation of its out-of-fold logits, {fold: (mean, std)}:
    computed from train_logits ({fold: logits}), and recorded in MODELS/ARCH/scores.json with the
    fold models they come from; with --predict-only (no train_logits), read back from there."""
    path = os.path.join(models_dir, args.arch, "scores.json")
    if train_logits:
        stats = {k: (float(np.nanmean(z)), float(np.nanstd(z)) or 1.0) for k, z in train_logits.items()}
        write_json(path, {**made_with, "logit_stats": {str(k): v for k, v in stats.items()}})
        return stats
    rebuild = f"extract.py --arch {args.arch} on the training data"

    def agree(obj):  # a fold model without its statistics, or a std of 0, would fail after hours of scoring
        odd = [k for k in [*obj["folds"], *obj["logit_stats"]] if not k.isdigit()]
        missing = sorted(set(obj["folds"]) - set(obj["logit_stats"]))
        bad = [k for k, v in obj["logit_stats"].items() if len(v) != 2 or v[1] <= 0]
        return (f"{odd[0]!r} is not a fold number" if odd else f"logit_stats lacks fold {missing[0]}" if missing else
                f"logit_stats.{bad[0]} is not a mean and a std above 0" if bad else None)
    recorded = read_json(path, rebuild, SCORES_JSON, agree)
    if {k: recorded[k] for k in made_with} != made_with:
        raise DataError(f"{path}: made from other fold models, or another --checkpoint, than these (models of two "
                        f"runs mixed?): run {rebuild}")
    return {int(k): tuple(v) for k, v in recorded["logit_stats"].items()}


def standardize(logits, stats):
    """{fold: logits} to {fold: (logits - mean) / std}, by each fold model's own statistics."""
    return {k: (z - stats[k][0]) / stats[k][1] for k, z in logits.items()}


def fold_model_outputs(args, models_dir, images, lesions, device, dtype):
    """Out-of-fold embeddings and scores of the train lesions, and those of the test lesions from the
    test fold models (the best one, or the mean over all). Writes the scores to WORK/preds/ and
    returns the embeddings, the files written and the digest of the scores.json they come from;
    None in torchrun processes other than the first."""
    manifests = fold_manifests(args, models_dir, lesions)
    folds = sorted(manifests)
    test_folds = (folds if args.test_models == "mean"
                  else [best_fold(manifests, args.checkpoint, os.path.join(models_dir, args.arch))])
    dim = MODEL_CONFIGS[args.arch]["feature_dim"]
    emb = {s: np.zeros((len(t["isic_id"]), dim), np.float32) for s, t in lesions.items()}
    train_logits, test_logits = {}, {}
    scored = folds if "train" in lesions else test_folds  # predict-only reads no other fold model
    made_with = {"folds": {str(k): m["digest"] for k, m in manifests.items()}, "checkpoint": args.checkpoint}
    # predict-only: the recorded statistics are read and checked before hours of scoring, not after
    stats = None if "train" in lesions else logit_statistics(args, models_dir, made_with, {})
    for k in scored:  # before any work: a damaged copy fails now, not after hours of scoring
        read_manifest(os.path.join(models_dir, args.arch, f"fold{k}"), f"train_backbone.py --arch {args.arch} "
                      f"--fold {k}" + " --keep-best" * (args.checkpoint == "best"), files=[f"{args.checkpoint}.pt"])
    for k in scored:
        rows = {"test": np.arange(len(lesions["test"]["isic_id"]) if k in test_folds else 0)}
        if "train" in lesions:
            rows["train"] = np.flatnonzero(lesions["train"]["fold"] == k)
        p = fold_part(args, models_dir, k, manifests[k]["digest"], images, rows, device, dtype)
        if p is None:
            continue
        if "train" in lesions:
            emb["train"][rows["train"]] = p["train_emb"]
            train_logits[k] = p["train_logit"]
        if k in test_folds:
            emb["test"] += p["test_emb"] / len(test_folds)
            test_logits[k] = p["test_logit"]
    if process_rank():
        return None, None, None
    if stats is None:
        stats = logit_statistics(args, models_dir, made_with, train_logits)
    score = {"test": np.mean(list(standardize(test_logits, stats).values()), axis=0)}
    if "train" in lesions:
        score["train"] = np.zeros(len(lesions["train"]["isic_id"]))
        for k, z in standardize(train_logits, stats).items():
            score["train"][lesions["train"]["fold"] == k] = z
    written = [write_preds(args.work, f"img_{args.arch}", s, t, score[s]) for s, t in lesions.items()]
    log(f"{args.arch}: wrote image-model scores to preds/img_{args.arch}_*.csv (test: fold models {test_folds})")
    return emb, written, file_digest(os.path.join(models_dir, args.arch, "scores.json"))


def save_embeddings(args, emb, lesions, images):
    """WORK/emb/ARCH_{split}.npy with its ids; the tiles that could not be decoded are listed.
    Returns the files written."""
    written = []
    for split, e in emb.items():
        broken_tiles(images[split], np.flatnonzero(np.isnan(e).any(axis=1)), split,
                     "no image features: the GBDTs score them from their other features",
                     "missing, or that cannot be decoded" + ", or not finite" * args.predict_only)
        written += save_array(os.path.join(args.work, "emb", f"{args.arch}_{split}.npy"), e,
                              list(lesions[split]["isic_id"]))
    log(f"{args.arch}: wrote emb/{args.arch}_{{{','.join(emb)}}}.npy")
    return written


def extract(args, device):
    """The stage's work: every split's embeddings and scores, saved (by the first process alone)."""
    dtype, _ = amp_settings(device, args.cpu_amp)
    models_dir = models_folder(args)
    lesions = {s: read_lesions(args.work, s) for s in (["test"] if args.predict_only else ["train", "test"])}
    images = {}
    for split, t in lesions.items():
        path = data_path(args.data, f"{split}-image.hdf5")
        check_image_ids(path, list(t["isic_id"]), lenient=args.predict_only)
        images[split] = H5Images(path, t["isic_id"], missing_ok=args.predict_only)
    if args.frozen:
        model = build_model(args.arch, args.weights, pretrained=True, drop_path=0.0).to(device).eval()
        emb = {s: embed(args, model, images[s], None, device, dtype, f"frozen {s}")[0] for s in lesions}
        written, made_by = [], None
    else:
        emb, written, made_by = fold_model_outputs(args, models_dir, images, lesions, device, dtype)
    if process_rank():
        return
    written += save_embeddings(args, emb, lesions, images)
    write_args(os.path.join(args.work, "emb", f"{args.arch}_args.json"), args)
    write_record(args.work, f"img_{args.arch}", written, made_by)  # last: what gbdt.py checks its inputs against
    shutil.rmtree(os.path.join(args.work, "emb", "parts"), ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(MODEL_CONFIGS))
    add_path_flags(parser)
    parser.add_argument("--predict-only", action="store_true", help="only the test lesions, from --models")
    parser.add_argument("--test-models", choices=["best", "mean"], default="best",
                        help="test scores from the fold model of best validation pAUC, or the mean over all")
    parser.add_argument("--checkpoint", choices=["last", "best"], default="last",
                        help="last: the fixed epoch count; best: the epoch of best validation pAUC (trained with "
                             "--keep-best), whose OOF scores are optimistic, having been chosen on those very rows")
    parser.add_argument("--frozen", action="store_true", help="pretrained backbone, no fine-tuning")
    parser.add_argument("--weights", help="with --frozen: pretrained weights file")
    parser.add_argument("--resume", action="store_true", help="reuse the folds an interrupted run finished")
    parser.add_argument("--batch-size", type=number(int, 1, 4096), default=256)
    parser.add_argument("--workers", type=number(int, 0, 64), default=min(8, os.cpu_count()))
    parser.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on the CPU too")
    args = parser.parse_args(argv)
    device, rank, world = process_device()
    with stage_locks(args, [f"image-{args.arch}"], ["features"]) if rank == 0 else contextlib.nullcontext():
        try:
            extract(args, device)
        except torch.cuda.OutOfMemoryError:
            raise DataError(f"{device}: out of GPU memory scoring {args.arch} in batches of {args.batch_size}: pass "
                            "a smaller --batch-size") from None
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
