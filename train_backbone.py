"""Fine-tune one image backbone on the training patients of one fold (or of every fold in turn).

Balanced epochs: every training positive plus --neg-per-pos negatives per positive, the negatives
redrawn each epoch. Focal loss, AdamW with warm-up and cosine decay, stochastic depth, augmentation
and resizing on the device in batches, mixed precision (bf16, or fp16 with a gradient scaler on
GPUs without bf16). Validation pAUC on the fold's held-out patients picks the best checkpoint.
Under `torchrun --nproc_per_node=N` it trains with DistributedDataParallel, rank 0 writing.

Reads:  WORK/folds.csv (from features.py), DATA/train-image.hdf5
Writes: WORK/models/ARCH/fold{k}/best.pt (weights of the best epoch), last.pt (everything needed
        to resume), log.csv (one row per epoch), args.json

    python train_backbone.py --arch eva02_tiny --fold 0 --data demo_data --no-pretrained \\
        --epochs 6 --neg-per-pos 4 --batch-size 32 --lr 5e-4 --workers 0             # tiny, CPU
    python train_backbone.py --arch eva02_base --fold all --weights eva02_base.safetensors
    torchrun --nproc_per_node=2 train_backbone.py --arch convnext --fold 0 --weights convnext.safetensors
"""
import argparse
import math
import os
import time

import numpy as np
import torch

from common import (MODEL_CONFIGS, FocalLoss, H5Images, amp_dtype, atomic_write, autocast, build_model,
                    check_image_ids, data_path, default_data_dir, image_loader, log, normalization, pauc, predict,
                    prepare_batch, read_csv, read_lesions, run_main, split_broken, write_args, write_csv)


def epoch_rows(y, neg_per_pos, seed_key):
    """Rows of one balanced epoch: all positives, a draw of negatives seeded by seed_key, shuffled."""
    rng = np.random.default_rng(seed_key)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    neg = rng.choice(neg, min(len(neg), neg_per_pos * len(pos)), replace=False)
    return rng.permutation(np.r_[pos, neg])


def lr_at(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_checkpoint(path, obj):
    atomic_write(path, lambda f: torch.save(obj, f))


LOG_HEADER = ["epoch", "train_loss", "val_loss", "val_pauc", "lr", "seconds", "train_images_per_s"]


def write_epoch_log(path, row):
    """Rewrites log.csv with the rows of earlier epochs (a resumed run drops any it will redo)."""
    old = read_csv(path, LOG_HEADER, LOG_HEADER) if os.path.exists(path) else {c: np.zeros(0) for c in LOG_HEADER}
    keep = old["epoch"] < row[0]
    columns = [np.r_[old[c][keep], v] for c, v in zip(LOG_HEADER, row)]
    write_csv(path, LOG_HEADER, [columns[0].astype(int)] + columns[1:])


def check_ranks_in_sync(model):
    """Largest difference of any weight between the DDP ranks (0 when DDP works)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    torch.distributed.all_reduce(hi, torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, torch.distributed.ReduceOp.MIN)
    return (hi - lo).abs().max().item()


def train_fold(args, fold, train, folds, images, device, rank, world):
    arch_cfg = MODEL_CONFIGS[args.arch]
    out_dir = os.path.join(args.work, "models", args.arch, f"fold{fold}")
    y = train["target"]
    ids = np.asarray(train["isic_id"], dtype=str)
    trn, val = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    if args.val_neg_per_pos:  # a subsample of validation negatives keeps validation fast
        val = val[epoch_rows(y[val], args.val_neg_per_pos, [args.seed, fold, 0])]
        val.sort()
    torch.manual_seed(args.seed + fold)  # the head (and everything, without weights) starts the same
    model = build_model(args.arch, args.weights, not args.no_pretrained, args.drop_path).to(device)
    mean, std = normalization(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    dtype = amp_dtype(device, args.cpu_amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = FocalLoss(0.25, 2.0)
    steps_per_epoch = math.ceil(len(epoch_rows(y[trn], args.neg_per_pos, 0)) / world / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    start, best, step = 0, -1.0, 0
    last_path = os.path.join(out_dir, "last.pt")
    if args.resume and os.path.exists(last_path):
        ck = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start, best, step = ck["epoch"] + 1, ck["best"], ck["step"]
        log(f"{args.arch} fold {fold}: resuming after epoch {ck['epoch']} (best pAUC {best:.4f})")
    log(f"{args.arch} fold {fold}: {len(trn)} training rows ({y[trn].sum()} positives), {len(val)} validation "
        f"rows, {steps_per_epoch} steps/epoch, device {device}, precision {dtype or 'float32'}")
    for epoch in range(start, args.epochs):
        t0 = time.time()
        torch.manual_seed(args.seed * 1000 + epoch)  # drop path: the same draws after a resume
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch + rank)
        rows = trn[epoch_rows(y[trn], args.neg_per_pos, [args.seed, fold, epoch + 1])]
        rows = rows[:len(rows) // world * world][rank::world]  # equal shards: DDP ranks step together
        loader = image_loader(images, rows, args.batch_size, args.workers)
        ddp.train()
        losses, skipped = [], []
        for canvas, sizes, target, index in loader:
            (canvas, sizes, target), broken = split_broken(canvas, sizes, target)
            skipped += ids[index[broken].numpy()].tolist()
            if len(target) == 0:
                continue
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, args.lr)
            x = prepare_batch(canvas, sizes, arch_cfg["img_size"], mean, std, device, augment=True, generator=gen)
            with autocast(device, dtype):
                logit = ddp(x).squeeze(1)
                loss = loss_fn(logit.float(), target.to(device))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            step += 1
        train_s = time.time() - t0
        if skipped:
            log(f"warning: skipped {len(skipped)} training image(s) that cannot be decoded: {', '.join(skipped)}")
        if rank != 0:
            continue
        val_loader = image_loader(images, val, args.batch_size * 2, args.workers)
        _, logits = predict(model, val_loader, arch_cfg["img_size"], mean, std, device, dtype)
        ok = ~np.isnan(logits)  # a tile that cannot be decoded has no score
        yv = y[val][ok]
        val_loss = loss_fn(torch.from_numpy(logits[ok]), torch.from_numpy(yv.astype(np.float32))).item()
        score = pauc(yv, logits[ok]) if 0 < yv.sum() < len(yv) else float("nan")
        if score > best or best < 0:
            best = score
            save_checkpoint(os.path.join(out_dir, "best.pt"), {"arch": args.arch, "fold": fold, "epoch": epoch,
                                                               "val_pauc": score, "model": model.state_dict()})
        save_checkpoint(last_path, {"arch": args.arch, "fold": fold, "epoch": epoch, "val_pauc": score,
                                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "scaler": scaler.state_dict(), "best": best, "step": step})
        row = [epoch, np.mean(losses), val_loss, score, opt.param_groups[0]["lr"], round(time.time() - t0, 1),
               round(len(rows) / train_s, 1)]
        write_epoch_log(os.path.join(out_dir, "log.csv"), row)
        log(f"{args.arch} fold {fold} epoch {epoch + 1}/{args.epochs}: train loss {row[1]:.4f}, val loss "
            f"{val_loss:.4f}, val pAUC {score:.4f} (best {best:.4f}), {row[6]:.0f} train images/s, {row[5]:.0f}s")
    if world > 1:
        log(f"rank {rank}: weights differ between ranks by at most {check_ranks_in_sync(model):.3g}")
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--fold", default="all", help="a fold number, or 'all' for every fold in turn")
    parser.add_argument("--data", default=default_data_dir(), help="folder with the Kaggle files")
    parser.add_argument("--work", default="work")
    parser.add_argument("--weights", help="pretrained weights file (.safetensors or .pth)")
    parser.add_argument("--no-pretrained", action="store_true", help="random initialization")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--neg-per-pos", type=int, default=20, help="negatives per positive in each epoch")
    parser.add_argument("--val-neg-per-pos", type=int, default=50,
                        help="validation negatives per positive, drawn once (0: all; all of a real fold is "
                             "about 80,000 tiles, half an hour an epoch for eva02_base on a P100)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count()))
    parser.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on the CPU too")
    parser.add_argument("--resume", action="store_true", help="continue from last.pt")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
              else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    train = read_lesions(args.work, "train")
    h5_path = data_path(args.data, "train-image.hdf5")
    check_image_ids(h5_path, list(train["isic_id"]))
    images = H5Images(h5_path, train["isic_id"], train["target"])
    folds = train["fold"]
    todo = sorted(set(folds.tolist())) if args.fold == "all" else [int(args.fold)]
    for fold in todo:
        if rank == 0:
            write_args(os.path.join(args.work, "models", args.arch, f"fold{fold}", "args.json"), args)
        best = train_fold(args, fold, train, folds, images, device, rank, world)
        if rank == 0:
            log(f"{args.arch} fold {fold}: best validation pAUC {best:.4f}")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
