"""Fine-tune one image backbone on the training patients of one fold (or of every fold in turn).

Balanced epochs: every training positive plus --neg-per-pos negatives per positive (1:4 over 40
epochs by default), the negatives redrawn each epoch. Focal loss; AdamW with warm-up and cosine
decay, the new head at its own learning rate (--head-lr, 10 x --lr), optionally layer-wise decay
down the backbone (--layer-decay); stochastic depth; augmentation (flip, rotation, zoom, shift,
colour, blur, noise, a cutout that spares the tile's centre) and resizing on the device in batches;
mixed precision (bf16, or fp16 with a gradient scaler on GPUs without bf16); optionally a moving
average of the weights (--ema), which is then what is validated and saved. Validation pAUC on the
fold's held-out patients picks the best checkpoint. Under `torchrun --nproc_per_node=N` it trains
with DistributedDataParallel, rank 0 writing. With --deadline it starts no fold or epoch that would
end after that time (a Kaggle notebook's 12 hours): the next run continues with --resume.

Reads:  WORK/folds.csv (from features.py), DATA/train-image.hdf5
Writes: WORK/models/ARCH/fold{k}/: last.pt (weights of the last epoch), with --keep-best best.pt (of the
        best), log.csv (one row per epoch), args.json, manifest.json: what a user uploads. A fold trains in
        fold{k}.partial/, whose resume.pt (weights, optimizer, scaler and average state, saved every epoch)
        --resume continues from, with the settings recorded in its args.json (others are an error), and
        which replaces fold{k}/ whole, without resume.pt, once its last epoch is done

    python train_backbone.py --arch eva02_tiny --fold 0 --data demo_data --no-pretrained \\
        --epochs 6 --neg-per-pos 4 --batch-size 32 --lr 5e-4 --workers 0             # tiny, CPU
    python train_backbone.py --arch eva02_base --fold all --weights eva02_base.safetensors
    torchrun --nproc_per_node=2 train_backbone.py --arch convnext --fold 0 --weights convnext.safetensors
"""
import argparse
import contextlib
import copy
import math
import os
import pickle
import re
import shutil
import time

import numpy as np
import torch

from common import (AUGMENT_DRAWS, FOLD_MANIFEST, MODEL_CONFIGS, SEED, DataError, H5Images, add_path_flags,
                    amp_settings, atomic_write, autocast, broken_tiles, build_model, check_a_tile_decodes,
                    check_image_ids, commit_folder, data_path, finish_commit, focal_loss, image_loader, lesions_digest,
                    log, normalization, number, path_problem, pauc_or_nan, predict, prepare_batch, process_device,
                    read_csv, read_json, read_lesions, run_main, schema_problem, split_broken, stage_locks, write_args,
                    write_csv, write_dataset_metadata)


def epoch_rows(y, neg_per_pos, seed_key):
    """Rows of one balanced epoch: all positives, a draw of negatives seeded by seed_key, shuffled."""
    rng = np.random.default_rng(seed_key)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    neg = rng.choice(neg, min(len(neg), neg_per_pos * len(pos)), replace=False)
    return rng.permutation(np.r_[pos, neg])


def lr_factor(step, total, warmup):
    """The schedule, a factor of each parameter group's base learning rate: linear warm-up over
    `warmup` steps, then cosine decay to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def param_groups(model, lr, head_lr, weight_decay, layer_decay):
    """AdamW's parameter groups, each with its "base_lr": the classifier head at head_lr (it starts
    from random weights), a backbone parameter at depth i of L (timm's layer grouping, the last
    layer L holding the final norm) at lr * layer_decay^(L - i). No weight decay on 1-D parameters
    (norms, biases)."""
    from timm.optim import param_groups_layer_decay
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for g in param_groups_layer_decay(model, weight_decay, layer_decay=layer_decay):
        for in_head, base_lr in ((False, lr * g["lr_scale"]), (True, head_lr)):
            params = [p for p in g["params"] if (id(p) in head) == in_head]
            if params:
                groups.append({"params": params, "weight_decay": g["weight_decay"], "base_lr": base_lr})
    return groups


def set_lr(opt, factor):
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def update_ema(ema, model, decay):
    """After an optimizer step: each of ema's parameters becomes decay * itself + (1 - decay) * the
    model's; buffers are copied, as they are not learned."""
    with torch.no_grad():
        for e, w in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(w, alpha=1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


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


def largest_micro_batch(memory, n_params, per_image, bytes_per_param=16):
    """The most images (a power of 2) whose saved activations (`per_image` bytes each) fit in 85% of
    `memory` bytes beside bytes_per_param a parameter (16: fp32 weights and gradients, AdamW's two
    moments; 20 with an EMA copy) and 1 GiB for the CUDA context and workspaces; 0 if not even one
    does."""
    room = 0.85 * memory - bytes_per_param * n_params - 2 ** 30
    return 2 ** int(np.log2(room / per_image)) if room >= per_image else 0


def memory_plan(args, model, device, world=1):
    """(micro-batch, gradient checkpointing) for training, within this process's share of the
    batch (batch_size / world): the flags, where given; on a GPU, the
    largest micro-batch that its memory holds by the arch's saved activations per image
    (MODEL_CONFIGS, measured by bench.py --gpu-estimate), with checkpointing only where not even
    one image fits without; on the CPU, the whole batch."""
    share = args.batch_size // world
    if args.micro_batch or device.type != "cuda":
        return min(args.micro_batch or share, share), args.grad_checkpointing
    memory = torch.cuda.get_device_properties(device).total_memory
    n_params = sum(p.numel() for p in model.parameters())
    for checkpointing in (True,) if args.grad_checkpointing else (False, True):
        per_image = MODEL_CONFIGS[args.arch]["act_mib_ckpt" if checkpointing else "act_mib"] * 2 ** 20
        micro = largest_micro_batch(memory, n_params, per_image, 20 if getattr(args, "ema", 0) else 16)
        if micro:
            return min(micro, share), checkpointing
    raise DataError(f"{torch.cuda.get_device_name(device)}: too little memory to train {args.arch} on even one image")


def train_step(model, ddp, opt, scaler, loss_fn, x, y, micro, device, dtype, world=1):
    """One optimizer step on the batch (x, y), in micro-batches whose gradients add up to the
    whole batch's (each loss weighted by its share); DDP synchronizes on the last one only.
    Returns the loss of the whole step (every process's batch), and whether the gradient scaler
    skipped the step (inf or NaN gradients; the same in every process, as the gradients are)."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(0, len(y), micro):
        last = i + micro >= len(y)
        with contextlib.nullcontext() if last or ddp is model else ddp.no_sync():
            with autocast(device, dtype):
                logit = ddp(x[i:i + micro]).squeeze(1)
                loss = loss_fn(logit.float(), y[i:i + micro]) * (len(logit) / len(y))
            scaler.scale(loss).backward()
        total = total + loss.detach()  # read once, after the step: .item() would wait for the GPU each time
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    if world > 1:  # every process sees the same loss, so every process stops on the same step
        torch.distributed.all_reduce(total)
        total = total / world
    return total.item(), scaler.get_scale() < scale


def skip_step(kept, device, world):
    """Whether a batch left with `kept` decodable tiles is skipped: by every process together when any
    process's share has none, as one that skipped alone would leave the others waiting in DDP's
    gradient all-reduce, and their steps out of step from then on."""
    if world == 1:
        return kept == 0
    least = torch.tensor(float(kept), device=device)
    torch.distributed.all_reduce(least, torch.distributed.ReduceOp.MIN)
    return least.item() == 0


MAX_SKIPPED_STEPS = 20  # the scale halves at each skip: 20 in a row take it from 2^16 to 2^-4


def check_step(loss, skipped_in_row, where, dtype):
    """Stops training that no longer learns, instead of letting it run on and save its weights."""
    if not math.isfinite(loss):
        raise DataError(f"{where}: the training loss is {loss}: try a lower --lr, or pretrained weights (--weights)"
                        + ("; fp16 may overflow in the forward pass, which bf16 (a GPU of compute capability 8.0 "
                           "and up) does not" if dtype == torch.float16 else ""))
    if skipped_in_row >= MAX_SKIPPED_STEPS:
        raise DataError(f"{where}: the fp16 gradient scaler skipped the last {skipped_in_row} steps (inf or NaN "
                        "gradients), so none of them changed the weights: try a lower --lr, or train on a GPU with "
                        "bf16 (compute capability 8.0 and up)")


def validate(model, images, val, y, loss_fn, micro, mean, std, device, dtype, args, fold, rank, world):
    """Validation loss and pAUC of the fold's held-out rows (undecodable tiles left out). Under
    torchrun each process scores its share and every process gets all the logits: no process
    waits in a collective while another validates alone (NCCL times out after 10 minutes)."""
    share = np.array_split(val, world)[rank]
    _, logits = predict(model, image_loader(images, share, 2 * micro, args.workers),
                        MODEL_CONFIGS[args.arch]["img_size"], mean, std, device, dtype)
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, logits)
        logits = np.concatenate(shares)
    check_a_tile_decodes(images, val, logits, f"{args.arch} fold {fold} validation")
    ok = ~np.isnan(logits)
    yv = y[val][ok]
    loss = loss_fn(torch.from_numpy(logits[ok]), torch.from_numpy(yv.astype(np.float32))).item()
    return loss, pauc_or_nan(yv, logits[ok])


def check_a_positive_decodes(images, rows, fold):
    """Training rows none of whose positives decodes would train a model that never sees one. Reads
    the positives alone (a few hundred tiles), up to the first that decodes."""
    pos = rows[images.labels[rows] == 1]
    if not any(images[i][1][0] for i in pos):  # a broken tile's size is (0, 0)
        raise DataError(f"{images.h5_path}: none of the {len(pos)} positives (target 1) of the training rows of "
                        f"fold {fold} can be decoded, and a model trained on negatives alone learns nothing: "
                        f"replace the broken tiles; the first: {images.problem(pos[0])}")


# flags a resume may change: they change the speed, the paths or which folds run, not the weights it ends
# with (resume.pt holds the weights, so the pretrained ones are not read again)
RESUME_MAY_CHANGE = ("resume", "workers", "micro_batch", "grad_checkpointing", "fold", "data", "work", "save_weights",
                     "weights", "no_pretrained", "deadline")


ARGS_JSON = {"args": {"*": "any"}}  # what write_args writes, as resuming reads it
RESUME_STATE = {"arch": "text", "fold": "int", "settings": {"*": "any"}, "lesions": "digest", "epoch": "int",
                "best": ("number", "nan"), "step": "int", "val_pauc": ("number", "nan"), "model": {"*": "any"},
                "optimizer": {"*": "any"}, "scaler": {"*": "any"}}


def weight_settings(args):
    """The settings that decide a fold's weights (all but RESUME_MAY_CHANGE)."""
    return {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}


def settings_differ(args, recorded):
    """The settings, as "--flag recorded -> now", that differ from a recorded run's."""
    return [f"--{k.replace('_', '-')} {recorded.get(k)} -> {v}" for k, v in weight_settings(args).items()
            if recorded.get(k) != v]


def check_resume_settings(args, out_dir, fold):
    """A resumed fold continues with the settings its interrupted run recorded in args.json, never
    a mix of two runs' settings."""
    path = os.path.join(out_dir, "args.json")
    recorded = read_json(path, f"train_backbone.py --arch {args.arch} --fold {fold} without --resume (to start the "
                         "fold again)", ARGS_JSON)["args"]
    differ = settings_differ(args, recorded)
    if differ:
        raise DataError(f"{path}: the interrupted run of fold {fold} was started with other settings "
                        f"({', '.join(differ)}): resume with the recorded settings, or run without --resume to "
                        "start the fold again")


def check_committed_fold(args, final, fold):
    """Under --resume a committed fold is kept only if it was trained with these settings on these
    folds; else the run stops, naming the fold and what differs."""
    again = f"train_backbone.py --arch {args.arch} --fold {fold} without --resume (to train the fold again)"
    recorded = read_json(os.path.join(final, "args.json"), again, ARGS_JSON)["args"]
    differ = settings_differ(args, recorded)
    if read_json(os.path.join(final, "manifest.json"), again, FOLD_MANIFEST)["lesions"] != lesions_digest(args.work):
        differ.append(f"the folds of {args.work}/folds.csv")
    if differ:
        raise DataError(f"{final}: trained with other settings than these ({', '.join(differ)}): run {again} with "
                        "these settings, or resume with its own")


def load_resume_state(args, resume_path, fold):
    """resume.pt, checked to be this architecture's, fold's, settings' and folds' resume state."""
    again = "run without --resume to start the fold again"
    problem = path_problem(resume_path)
    if problem:
        raise DataError(f"{resume_path}: {problem}: {again}")
    try:  # to the CPU: a GPU out of memory here is not a damaged file
        ck = torch.load(resume_path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{resume_path}: damaged ({str(e).splitlines()[0]}): {again}") from None
    problem = schema_problem(ck, RESUME_STATE)
    if problem:
        raise DataError(f"{resume_path}: not a resume state of train_backbone.py ({problem}): {again}")
    differ = ([f"--arch {ck['arch']}"] * (ck["arch"] != args.arch) + [f"fold {ck['fold']}"] * (ck["fold"] != fold)
              + ["the folds of another folds.csv"] * (ck["lesions"] != lesions_digest(args.work))
              + settings_differ(args, ck["settings"]))
    if differ:
        raise DataError(f"{resume_path}: the resume state of another run ({', '.join(differ)}), not of "
                        f"{args.arch} fold {fold} with these settings: {again}")
    return ck


def out_of_time(args, measured, epochs, device, world):
    """Whether `epochs` more epochs would end past --deadline, judged from the longest epoch measured
    in this process: the first epoch of a process starts unjudged (an earlier run's times may come
    from another machine). Every process takes the same decision: one that stopped alone would
    leave the others waiting."""
    if args.deadline is None:
        return False
    late = bool(measured) and time.time() + epochs * max(measured) > args.deadline
    if world > 1:
        flag = torch.tensor(float(late), device=device)
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
        late = flag.item() > 0
    return late


def train_fold(args, fold, train, images, device, rank, world, measured):
    """Trains fold `fold` in MODEL_DIR/fold{k}.partial (resumable), which replaces MODEL_DIR/fold{k}
    whole, with its manifest, once the last epoch is done. Returns the best validation pAUC (None:
    nothing trained, or stopped for --deadline). measured: the seconds of this process's epochs, to
    which the fold adds its own."""
    size = MODEL_CONFIGS[args.arch]["img_size"]
    final = os.path.join(args.work, "models", args.arch, f"fold{fold}")
    out_dir = final + ".partial"
    resume_path = os.path.join(out_dir, "resume.pt")
    if rank == 0:
        finish_commit(final)  # a commit that a kill interrupted: finished, so that no trained fold is lost
    if world > 1:
        torch.distributed.barrier()  # every process decides on the folder as process 0 left it
    if args.resume and not os.path.lexists(resume_path) and os.path.exists(os.path.join(final, "manifest.json")):
        check_committed_fold(args, final, fold)
        log(f"{args.arch} fold {fold}: already trained ({final}), with these settings; nothing to resume")
        return None
    resuming = args.resume and os.path.lexists(resume_path)  # a resume.pt that is no file is an error
    if resuming:
        check_resume_settings(args, out_dir, fold)
    # a fold starts only if all its epochs would end before --deadline; a resumed one, if its next epoch would
    if out_of_time(args, measured, 1 if resuming else args.epochs, device, world):
        log(f"{args.arch} fold {fold}: not {'resumed' if resuming else 'started'}: "
            f"{'its next epoch' if resuming else f'its {args.epochs} epochs'} would end after --deadline")
        return None
    if rank == 0 and not args.resume:
        shutil.rmtree(out_dir, ignore_errors=True)  # what a killed run left
    if rank == 0 and not resuming:  # a resume keeps the record of the run it continues
        write_args(os.path.join(out_dir, "args.json"), args)
    y = train["target"]
    trn, val = np.flatnonzero(train["fold"] != fold), np.flatnonzero(train["fold"] == fold)
    if args.val_neg_per_pos:  # a subsample of validation negatives keeps validation fast
        val = np.sort(val[epoch_rows(y[val], args.val_neg_per_pos, [args.seed, fold, 0])])
    torch.manual_seed(args.seed + fold)  # the head (and everything, without weights) starts the same
    model = build_model(args.arch, args.weights, not args.no_pretrained, args.drop_path).to(device)
    micro, checkpointing = memory_plan(args, model, device, world)
    model.set_grad_checkpointing(checkpointing)
    mean, std = normalization(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # with --ema the average of the weights is what is validated and saved as the fold model
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None
    scored = ema if args.ema else model
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.head_lr or 10 * args.lr, args.weight_decay,
                                         args.layer_decay))
    dtype, scale_loss = amp_settings(device, args.cpu_amp)
    scaler = torch.amp.GradScaler(device.type, enabled=scale_loss)
    loss_fn = focal_loss  # alpha 0.25, gamma 2
    # --batch-size images per optimizer step whatever the number of processes, each taking an equal
    # share: one GPU and two train the same recipe (steps, learning rates, augmentation)
    steps_per_epoch = math.ceil(len(epoch_rows(y[trn], args.neg_per_pos, 0)) // world * world / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    start, best, step, score, skipped_in_row = 0, -1.0, 0, float("nan"), 0
    if resuming:
        ck = load_resume_state(args, resume_path, fold)
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            if args.ema:
                ema.load_state_dict(ck["ema"])
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{resume_path}: does not fit {args.arch} ({str(e).splitlines()[0][:200]}): run without "
                            "--resume to start the fold again") from None
        start, best, step, score = ck["epoch"] + 1, ck["best"], ck["step"], ck["val_pauc"]
        log(f"{args.arch} fold {fold}: resuming after epoch {ck['epoch']} (best pAUC {best:.4f})")
    log(f"{args.arch} fold {fold}: {len(trn)} training rows ({y[trn].sum()} positives), {len(val)} validation "
        f"rows, {steps_per_epoch} steps/epoch of {args.batch_size} images"
        f"{f' ({world} processes of {args.batch_size // world})' if world > 1 else ''} in micro-batches of {micro}"
        f"{' with gradient checkpointing' if checkpointing else ''}, device {device}")
    for epoch in range(start, args.epochs):
        if epoch > start and out_of_time(args, measured, 1, device, world):
            log(f"{args.arch} fold {fold}: stopped after epoch {epoch} of {args.epochs}, as the next would end after "
                f"--deadline: --resume continues from {resume_path}")
            return None
        t0 = time.time()
        torch.manual_seed(args.seed * 1000 + epoch)  # drop path: the same draws after a resume
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        rows = trn[epoch_rows(y[trn], args.neg_per_pos, [args.seed, fold, epoch + 1])]
        # process r takes rows r, r + world, ... of the epoch, in batches of batch_size / world: its
        # batch i is its share of the one-process batch i, and so are its augmentation draws
        rows = rows[:len(rows) // world * world][rank::world]
        ddp.train()
        losses, skipped = [], []
        for canvas, sizes, target, index in image_loader(images, rows, args.batch_size // world, args.workers):
            draws = torch.rand(len(target) * world, AUGMENT_DRAWS, generator=gen)[rank::world]
            (canvas, sizes, target, draws), broken = split_broken(canvas, sizes, target, draws)
            skipped += index[broken].tolist()
            if skip_step(len(target), device, world):
                continue
            factor = lr_factor(step, total, warmup)
            set_lr(opt, factor)
            x = prepare_batch(canvas, sizes, size, mean, std, device, draws)
            loss, scaler_skipped = train_step(model, ddp, opt, scaler, loss_fn, x, target.to(device), micro, device,
                                              dtype, world)
            step += 1
            if args.ema and not scaler_skipped:
                update_ema(ema, model, args.ema)
            skipped_in_row = skipped_in_row + 1 if scaler_skipped else 0
            check_step(loss, skipped_in_row, f"{args.arch} fold {fold}, epoch {epoch + 1}, step {step}", dtype)
            losses.append(loss)
        train_s = time.time() - t0
        if not losses:
            raise DataError(f"{images.h5_path}: none of the {len(rows)} training images of fold {fold} can be "
                            f"decoded; the first: {images.problem(rows[0])}")
        broken_tiles(images, skipped, "training", "skipped")
        train_loss = np.mean(losses)
        val_loss, score = validate(scored, images, val, y, loss_fn, micro, mean, std, device, dtype, args, fold,
                                   rank, world)
        if rank != 0:
            measured.append(time.time() - t0)
            continue
        if score > best or best < 0:
            best = score
            if args.keep_best:
                save_checkpoint(os.path.join(out_dir, "best.pt"), {"arch": args.arch, "fold": fold, "epoch": epoch,
                                                                   "val_pauc": score, "model": scored.state_dict()})
        row = [epoch, train_loss, val_loss, score, args.lr * factor, round(time.time() - t0, 1),
               round(len(rows) / train_s, 1)]
        # the log row before the resume state: a kill between them redoes the epoch and rewrites its row
        write_epoch_log(os.path.join(out_dir, "log.csv"), row)
        save_checkpoint(resume_path, {"arch": args.arch, "fold": fold, "settings": weight_settings(args),
                                      "lesions": lesions_digest(args.work), "epoch": epoch, "val_pauc": score,
                                      "model": model.state_dict(), "optimizer": opt.state_dict(),
                                      "scaler": scaler.state_dict(), "best": best, "step": step,
                                      **({"ema": ema.state_dict()} if args.ema else {})})
        measured.append(time.time() - t0)
        log(f"{args.arch} fold {fold} epoch {epoch + 1}/{args.epochs}: train loss {row[1]:.4f}, val loss "
            f"{val_loss:.4f}, val pAUC {score:.4f} (best {best:.4f}), {row[6]:.0f} train images/s, {row[5]:.0f}s")
    if world > 1:
        log(f"rank {rank}: weights differ between ranks by at most {check_ranks_in_sync(model):.3g}")
    if rank == 0:  # the uploaded folder holds weights alone: the optimizer state would double its size
        save_checkpoint(os.path.join(out_dir, "last.pt"), {"arch": args.arch, "fold": fold, "epoch": args.epochs - 1,
                                                           "val_pauc": score, "model": scored.state_dict()})
        commit_folder(out_dir, final, {"stage": "train_backbone.py", "arch": args.arch, "fold": fold,
                                       "epochs": args.epochs, "val_pauc": {"best": best, "last": score},
                                       "lesions": lesions_digest(args.work)}, leave_out=["resume.pt"])
    return best


def save_weights(arch, out_dir, pretrained=True):  # pretrained=False: the tests' random weights
    """OUT/ARCH.safetensors: the pretrained weights of ARCH's timm model, as --weights and run.sh's
    WEIGHTS_DIR take them. Needs timm's download (internet, HF_HUB_OFFLINE=0) or its cache."""
    from safetensors.torch import save
    model = build_model(arch, pretrained=pretrained, drop_path=0.0, one_logit=False)
    data = save({k: v.contiguous() for k, v in model.state_dict().items()})
    path = os.path.join(out_dir, f"{arch}.safetensors")
    atomic_write(path, lambda f: f.write(data))
    log(f"wrote {path}: {MODEL_CONFIGS[arch]['model_name']}, {len(data) / 2 ** 20:.0f} MiB")
    write_dataset_metadata(out_dir, "isic-2024-weights", "ISIC 2024 pretrained weights")


def train(args):
    """The stage's work: the folds asked for, in turn."""
    device, rank, world = process_device()
    train = read_lesions(args.work, "train")
    h5_path = data_path(args.data, "train-image.hdf5")
    check_image_ids(h5_path, list(train["isic_id"]))
    images = H5Images(h5_path, train["isic_id"], train["target"])
    if args.batch_size % world:
        raise DataError(f"--batch-size {args.batch_size} does not split evenly over {world} processes: pass a "
                        f"multiple of {world}")
    known = sorted(set(train["fold"].tolist()))
    asked = args.fold.split(",")
    if args.fold != "all" and not all(re.fullmatch(r"\d+", k) and int(k) in known for k in asked):
        raise DataError(f"--fold {args.fold}: the folds of {args.work}/folds.csv are {known[0]} to {known[-1]}: one "
                        "fold, several comma-separated, or 'all'")
    folds = known if args.fold == "all" else list(dict.fromkeys(int(k) for k in asked))
    measured = []  # the seconds of each epoch of this process: the time left for --deadline is judged from them
    for fold in folds:  # before any fold trains: not after hours of training the others
        check_a_positive_decodes(images, np.flatnonzero(train["fold"] != fold), fold)
    for fold in folds:
        locks = stage_locks(args, [f"image-{args.arch}-fold{fold}"], ["features", f"image-{args.arch}"])
        with locks if rank == 0 else contextlib.nullcontext():
            try:
                best = train_fold(args, fold, train, images, device, rank, world, measured)
            except torch.cuda.OutOfMemoryError:
                raise DataError(f"{device}: out of GPU memory training {args.arch}: pass a smaller --micro-batch, "
                                "or --grad-checkpointing") from None
        if rank == 0 and best is not None:
            log(f"{args.arch} fold {fold}: best validation pAUC {best:.4f}")
    if world > 1:
        torch.distributed.barrier()  # right after a collective, gloo could abort a process at destroy
        torch.distributed.destroy_process_group()


def build_parser():
    """The flags; bench.py projects the GPU time of their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--fold", default="all",
                        help="a fold number, several comma-separated (0,2,3), or 'all': each in turn")
    add_path_flags(parser, models=False)
    parser.add_argument("--weights", help="pretrained weights file (.safetensors or .pth)")
    parser.add_argument("--no-pretrained", action="store_true", help="random initialization")
    # 40 epochs of every positive with 4 fresh negatives each (1:3 to 1:5 in the winning solutions): 40 x (1 + 4)
    # = 200 training images per positive, fewer than 12 epochs at 1:20 (252)
    parser.add_argument("--epochs", type=number(int, 1, 1000), default=40)
    parser.add_argument("--neg-per-pos", type=number(int, 1, 10_000), default=4,
                        help="negatives per positive in each epoch, drawn afresh each epoch (default 4 with 40 "
                             "epochs: 200 training images per positive)")
    parser.add_argument("--val-neg-per-pos", type=number(int, 0, 1_000_000), default=50,
                        help="validation negatives per positive, drawn once (0: all; all of a real fold is "
                             "about 80,000 tiles: 17 times the FLOPs of a training epoch at 1:4)")
    parser.add_argument("--batch-size", type=number(int, 1, 4096), default=64,
                        help="images per optimizer step, all processes together under torchrun (a multiple of "
                             "their number)")
    parser.add_argument("--micro-batch", type=number(int, 1, 4096),
                        help="images per forward pass (default: as many as the GPU's memory holds, by powers of 2)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, about 30%% more compute")
    parser.add_argument("--lr", type=number(float, 0, 1, low_open=True), default=5e-5,
                        help="the backbone's peak learning rate")
    parser.add_argument("--head-lr", type=number(float, 0, 1, low_open=True),
                        help="the classifier head's peak learning rate (default: 10 x --lr)")
    parser.add_argument("--layer-decay", type=number(float, 0, 1, low_open=True), default=1.0,
                        help="layer-wise learning rate decay: the backbone layer at depth i of L learns at "
                             "--lr x DECAY^(L - i) (default 1: every layer at --lr)")
    parser.add_argument("--weight-decay", type=number(float, 0, 1), default=0.05)
    parser.add_argument("--warmup-epochs", type=number(float, 0, 1000), default=1.0, help="at most --epochs")
    parser.add_argument("--drop-path", type=number(float, 0, 1, high_open=True), default=0.1)
    parser.add_argument("--ema", type=number(float, 0, 1, high_open=True), default=0.0, metavar="DECAY",
                        help="validate and save an exponential moving average of the weights, updated after "
                             "every optimizer step with this decay (e.g. 0.999; default 0: off)")
    parser.add_argument("--workers", type=number(int, 0, 64), default=min(8, os.cpu_count()))
    parser.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on the CPU too")
    parser.add_argument("--resume", action="store_true", help="continue from the resume.pt of fold{k}.partial/")
    parser.add_argument("--deadline", type=number(float, 0, 1e11, low_open=True), metavar="UNIX_TIME",
                        help="start no fold, and no epoch of a resumed or started one, that would end after this "
                             "time (seconds since 1970, as `date +%%s` prints), judged from the longest epoch "
                             "measured; the fold's resume.pt stays for --resume")
    parser.add_argument("--keep-best", action="store_true",
                        help="also keep best.pt, the weights of the epoch with the best validation pAUC (extract.py "
                             "--checkpoint best): as large again as last.pt, in every upload")
    parser.add_argument("--seed", type=SEED, default=42)
    parser.add_argument("--save-weights", metavar="DIR",
                        help="only write DIR/ARCH.safetensors, timm's pretrained weights (run with internet and "
                             "HF_HUB_OFFLINE=0), for --weights and run.sh's WEIGHTS_DIR")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup_epochs > args.epochs:  # the schedule would never reach its peak
        parser.error(f"argument --warmup-epochs: must be at most --epochs ({args.epochs}), not {args.warmup_epochs:g}")
    if args.save_weights and args.no_pretrained:  # random weights under the pretrained model's name
        parser.error("argument --save-weights: writes timm's pretrained weights; with --no-pretrained it would "
                     "write random ones under their name")
    if args.save_weights:
        save_weights(args.arch, args.save_weights)
        return
    train(args)


if __name__ == "__main__":
    run_main(main)
