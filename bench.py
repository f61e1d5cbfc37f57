"""Speed benchmark: reading the metadata and building the features, the image loader against a bare
decode, the predict loop against a bare forward, gbdt.py against rows and features; the GPU stages
projected for Kaggle's GPU T4 x2 (--gpu-estimate) or measured on this machine's GPU (--gpu).

Synthetic data at the real train-metadata.csv's size (about 400,000 lesions of about 1,040
patients, 55 columns in the Kaggle order, from the demo generator), cached under --cache so
reruns skip making it. Not part of the test suite; BENCHMARKS.md holds the figures and how long
each run took.

    python bench.py                 # full size, every CPU figure
    python bench.py --no-gbdt       # without the gbdt.py scaling runs
    python bench.py --rows 40000    # a quick run
    python bench.py --gpu-estimate  # GPU T4 x2 time and memory projected from counted FLOPs (no GPU needed)
    python bench.py --gpu           # measured on this machine's GPU
    python bench.py --ablation ingredients  # the tabular ingredients one at a time, on a larger demo set
    python bench.py --ablation speed        # gbdt.py's speed levers, over the folds of two seeds
    python bench.py --gbdt-rows 400000 --gbdt-before 9bc826e  # gbdt.py today beside that commit's
    python bench.py --reasons       # the triage's reasons (reasons.py) at 500,000 test lesions

Prints a markdown table of every figure.
"""
import argparse
import copy
import io
import os
import subprocess
import sys
import tempfile
import time

# LightGBM's OpenMP threads spin while they wait: when anything else runs on the same cores a
# booster slows down several times (BENCHMARKS.md). Passive waiting keeps the figures meaningful
# on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402 (after the OpenMP setting)
import torch  # noqa: E402

import common  # noqa: E402
import ensemble  # noqa: E402
import features  # noqa: E402
import gbdt  # noqa: E402
import notebooks  # noqa: E402
import reasons  # noqa: E402
import train_backbone  # noqa: E402
from demo import demo_lesions, make_demo, write_metadata  # noqa: E402

FULL_ROWS, FULL_PATIENTS = 400_000, 1_040
DISCRETE = {"age_approx", "tbp_lv_symm_2axis_angle"}


def synthetic_train(rows, seed=0):
    """`rows` lesion rows (dicts, as demo.write_metadata takes them) shaped like the real file.

    The demo generator gives about 27 lesions a patient where a real patient has about 385, and
    its per-row loop takes minutes at 400,000 rows: so it makes the real number of patients (scaled
    to `rows`), and each patient's lesions are copied, with a few percent of multiplicative noise
    on the measured columns, until the patient has about 14 times as many. Then the rows are
    shuffled, since patients interleave in the real file (sorted by isic_id). Only the first copy
    of a malignant lesion is positive: the demo's 3% malignant rate then gives about the real
    1:1,000, spread over as many patients as the demo has. Measurements have 15 significant digits
    (exponents below 1e-4), as in the real file."""
    rng = np.random.default_rng(seed)
    n_patients = max(5, round(FULL_PATIENTS * rows / FULL_ROWS))
    base = demo_lesions(rng, n_patients, 1_000_000, 0, malignant_rate=0.03)
    reps = np.full(len(base), rows // len(base))
    reps[rng.permutation(len(base))[:rows % len(base)]] += 1
    take = rng.permutation(np.repeat(np.arange(len(base)), reps))
    cols = {}
    for c in common.TRAIN_COLUMNS:
        col = np.array([r[c] for r in base], dtype=object)[take]
        if c in common.NUMERIC and c not in DISCRETE:  # written as the real file writes them: 15 digits
            col = col.astype(float) * rng.lognormal(0.0, 0.05, len(col))
            col = np.array(["" if np.isnan(v) else f"{v:.15g}" for v in col], dtype=object)
        cols[c] = col
    first_copy = np.zeros(len(take), dtype=bool)
    first_copy[np.unique(take, return_index=True)[1]] = True
    cols["target"] = np.where(first_copy, cols["target"], 0.0)
    cols["isic_id"] = np.array([f"ISIC_{k:07d}" for k in range(len(take))], dtype=object)
    return [dict(zip(common.TRAIN_COLUMNS, values)) for values in zip(*cols.values())]


def data_dir(cache, rows):
    """cache/rowsN/: a synthetic train-metadata.csv and a small test-metadata.csv (20 demo patients)."""
    out = os.path.join(cache, f"rows{rows}")
    if not os.path.exists(os.path.join(out, "train-metadata.csv")):
        t0 = time.perf_counter()
        os.makedirs(out, exist_ok=True)
        test = demo_lesions(np.random.default_rng(1), 20, 2_000_000, 2_000_000, 0.01)
        write_metadata(os.path.join(out, "test-metadata.csv"), test, common.TEST_COLUMNS)
        write_metadata(os.path.join(out, "train-metadata.csv"), synthetic_train(rows), common.TRAIN_COLUMNS)
        common.log(f"made {out} in {time.perf_counter() - t0:.0f} s")
    return out


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def csv_to_matrix(data, out_dir):
    """The path from CSV to saved feature matrix, step by step: seconds of each step, the train table, the shape."""
    t = {}
    t["read"], train = timed(common.read_train, data)
    t["build"], (x, _) = timed(features.build_features, train, features.fit_vocabularies(train))
    t["save"], _ = timed(common.save_array, os.path.join(out_dir, "train.npy"), x, list(train["isic_id"]))
    return t, train, x.shape


def bench_patient_normalize(train, repeats=3):
    """Seconds of common.patient_normalize on the train table's numeric features: each call."""
    _, eng = features.engineered_features(train)
    x = np.hstack([np.column_stack([train[c] for c in common.NUMERIC]), eng])  # row-major, as a caller may pass
    pid = train["patient_id"].astype(str)
    return x.shape, [timed(common.patient_normalize, x, pid)[0] for _ in range(repeats)]


# runs a script as `python SCRIPT` does, then prints its peak resident memory (VmHWM, KiB): getrusage's
# maxrss would count the forking parent's memory, which Linux carries across exec
PEAK_MEMORY = """import runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")), file=sys.stderr)"""


def run_stage(script, args):
    """Seconds and peak memory (GiB, the process's largest resident set) of `python SCRIPT ARGS`."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PEAK_MEMORY, script] + args, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode:
        raise RuntimeError(f"{script} {' '.join(args)} failed: {r.stderr[-500:]}")
    return time.perf_counter() - t0, int(r.stderr.split()[-1]) / 2 ** 20


def features_and_gbdt(data, work, extra=()):
    """features.py then gbdt.py (default settings) on one data set, each as its own process: their
    seconds and peak memory, the feature count."""
    t_feat, mem_feat = run_stage("features.py", ["--data", data, "--work", work, *extra])
    with open(os.path.join(work, "features", "columns.txt")) as f:
        n_feat = len(f.read().split())
    t_gbdt, mem_gbdt = run_stage("gbdt.py", ["--work", work, "--name", "bench"])
    return t_feat, t_gbdt, n_feat, mem_feat, mem_gbdt


def feature_figures(data, tmp):
    """Table rows (what, rows, features, seconds, note) of CSV to feature matrix, on data/train-metadata.csv."""
    steps, train, shape = csv_to_matrix(data, tmp)
    total = sum(steps.values())
    table = [(what, *shape, steps[step], "") for step, what in (
        ("read", "common.read_train (csv module, columns converted by NumPy)"),
        ("build", "features.build_features (with patient normalization)"),
        ("save", "common.save_array"))]
    table += [("**CSV to saved matrix**", *shape, total, "")]
    pn_shape, pn_times = bench_patient_normalize(train)
    table += [("common.patient_normalize, first call", *pn_shape, pn_times[0], "5 statistics"),
              ("common.patient_normalize, best of next calls", *pn_shape, min(pn_times[1:]), "")]
    return table


def gbdt_figures(cache, rows, gbdt_rows, tmp, before=None):
    """Table rows of the scaling runs: features.py and gbdt.py at each of gbdt_rows; at the largest,
    gbdt.py as it was at commit `before` (its code and defaults) beside today's when given, the
    levers one at a time (gbdt_levers), and both stages with --no-patient-norm --no-context;
    gbdt.py at `rows` extrapolated linearly when it is not among them."""
    table, fit = [], []
    for n in gbdt_rows:
        work = os.path.join(tmp, f"w{n}")
        t_feat, t_gbdt, n_feat, mem_feat, mem_gbdt = features_and_gbdt(data_dir(cache, n), work)
        table.append(("features.py (train + test, folds)", n, n_feat, t_feat, f"peak memory {mem_feat:.1f} GiB"))
        table.append(("**gbdt.py, default settings**", n, n_feat, t_gbdt,
                      f"peak memory {mem_gbdt:.1f} GiB; OOF pAUC {oof_pauc(work, 'bench'):.4f}"))
        fit.append((n, t_gbdt, n_feat))
    for (n0, t0, _), (n1, t1, _) in zip(fit, fit[1:]):
        table.append((f"gbdt ratio {n1:,} / {n0:,} rows", "", "", t1 / t0, f"rows x{n1 / n0:.1f}"))
    if fit[-1][0] != rows:
        slope, icpt = np.polyfit([n for n, _, _ in fit], [t for _, t, _ in fit], 1)
        table.append(("**gbdt.py (extrapolated linearly)**", rows, fit[-1][2], slope * rows + icpt, "not measured"))
    n, t_new, n_feat = fit[-1]
    if before:
        script = os.path.join(tmp, "gbdt_before.py")  # run from this folder: it imports today's common.py
        with open(script, "w") as f:
            f.write(subprocess.run(["git", "show", f"{before}:gbdt.py"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                   capture_output=True, text=True, check=True).stdout)
        t_old, mem_old = run_stage(script, ["--work", work, "--name", "bench_before"])
        table.append((f"**gbdt.py of commit {before}, its default settings**", n, n_feat, t_old,
                      f"peak memory {mem_old:.1f} GiB; OOF pAUC {oof_pauc(work, 'bench_before'):.4f}"))
        table.append((f"**gbdt.py time, today / commit {before}**", "", "", t_new / t_old, "same data, this run"))
    table += gbdt_levers(work)
    t_feat, t_gbdt, n_feat, mem_feat, mem_gbdt = features_and_gbdt(data_dir(cache, n), os.path.join(tmp, f"w{n}_nopn"),
                                                                   ["--no-patient-norm", "--no-context"])
    table.append(("features.py --no-patient-norm --no-context", n, n_feat, t_feat, f"peak memory {mem_feat:.1f} GiB"))
    table.append(("gbdt.py on those features", n, n_feat, t_gbdt, f"peak memory {mem_gbdt:.1f} GiB"))
    table.append((f"gbdt ratio {fit[-1][2]} / {n_feat} features", "", "", fit[-1][1] / t_gbdt,
                  f"features x{fit[-1][2] / n_feat:.1f}"))
    return table


def oof_pauc(work, name):
    train = common.read_lesions(work, "train")
    return common.pauc(train["target"], common.read_preds(work, name, "train", train["isic_id"]))


def gbdt_levers(work, rounds=50):
    """Table rows of gbdt.py's levers, one at a time, on fold 0 of a features.py work folder with
    its default bags: each bag's rows binned on their own against gbdt.bag_datasets (the rows of
    every bag binned once, each bag a subset); LightGBM's column-wise, row-wise or own choice of
    histogram layout, `rounds` rounds; 255 against 63 bins, placed on LightGBM's default sample of
    rows or on gbdt.py's; predicting the validation rows."""
    train = common.read_lesions(work, "train")
    x = np.asfortranarray(np.load(os.path.join(work, "features", "train.npy")))
    y, fold, weight = train["target"], train["fold"], np.ones(len(x))
    trn, val = np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
    table = []

    def add(what, rows, seconds, note):
        table.append((f"gbdt lever: {what}", rows, x.shape[1], seconds, note))
        common.log(" | ".join(str(c) for c in table[-1]))

    for max_bin, sample in ((255, 200_000), (63, 200_000), (63, 50_000)):
        args = gbdt.build_parser().parse_args(["--work", work, "--max-bin", str(max_bin), "--bin-sample", str(sample)])
        what = f"{max_bin} bins placed on {sample:,} rows"
        seeds = range(args.bags)
        bags = [trn[gbdt.bag_sample(y[trn], np.random.default_rng(s), args.pos_rate, args.neg_rate)] for s in seeds]
        params = gbdt.lgb_params(args, 0)
        t = sum(timed(lambda: gbdt.lgb.Dataset(x[rows], y[rows], params=params).construct())[0] for rows in bags)
        add(f"{what}, each of {args.bags} bags binned on its own", len(bags[0]), t, "seconds, all bags")
        t, subsets = timed(lambda: [d.construct() for d in gbdt.bag_datasets(args, x, y, weight, trn, None, seeds)])
        add(f"{what}, gbdt.bag_datasets: every bag's rows binned once, each bag a subset", len(bags[0]), t,
            "seconds, all bags")
        for col_wise, row_wise, layout in ((True, False, "column-wise histograms (gbdt.py's)"),
                                           (False, True, "row-wise histograms"),
                                           (False, False, "LightGBM chooses the layout")):
            p = {**params, "force_col_wise": col_wise, "force_row_wise": row_wise}
            t, booster = timed(gbdt.lgb.train, p, subsets[0], rounds)
            add(f"{what}, {layout}", len(bags[0]), 1000 * t / rounds, "ms a round")
        t, _ = timed(booster.predict, x[val])
        add(f"{what}, predicting the validation rows", len(val), 1000 * t / rounds, "ms a tree")
    return table


def image_figures(cache, n=2000, batch=64):
    """Table rows of image loading and prediction on demo tiles (61 to 239 px JPEGs in the Kaggle HDF5 layout):
    the loader's per-image work against a bare PIL decode of bytes already in memory, and the
    predict loop (loader + device-side resize + model) against the bare model forward on
    pre-loaded tensors, convnext_atto at 64 px, fp32, on the CPU."""
    import h5py
    from PIL import Image
    data = os.path.join(cache, "demo_images")
    if not os.path.exists(os.path.join(data, "train-image.hdf5")):
        make_demo(data)
    path = os.path.join(data, "train-image.hdf5")
    ids = list(common.read_train(data)["isic_id"][:n])
    with h5py.File(path, "r") as h5:
        raw = [common.read_image_bytes(h5, i) for i in ids]

    def bare_decode():  # the least PIL can do: the tiles are RGB JPEGs, decoded straight to an array
        for r in raw:
            with Image.open(io.BytesIO(r)) as im:
                np.asarray(im)

    def loader_items(ds=None):  # a new H5Images first finds every tile's offset in the file
        ds = common.H5Images(path, ids) if ds is None else ds
        for i in range(len(ds)):
            ds[i]
        return ds
    t_bare, _ = timed(bare_decode)
    t_load, ds = timed(loader_items)
    t_again, _ = timed(loader_items, ds)
    with h5py.File(path, "r") as h5:  # the loader's HDF5 steps alone, and h5py's usual read
        t_find, locations = timed(lambda: [common.image_location(h5, i) for i in ids])
        t_pread, _ = timed(lambda: [common.read_image_bytes(h5, i, at) for i, at in zip(ids, locations)])
        t_h5py, _ = timed(lambda: [h5[i][()] for i in ids])
    torch.set_num_threads(os.cpu_count())
    model = common.build_model("convnext_atto", pretrained=False).eval()
    mean, std = common.normalization(model)
    cpu = torch.device("cpu")
    batches = [common.prepare_batch(c, s, 64, mean, std, cpu) for c, s, _, _ in
               common.image_loader(ds, None, batch, workers=0)]

    def bare_forward():
        with torch.no_grad():
            for x in batches:
                common.forward_features_and_logit(model, x)
    bare_forward()  # warm-up
    t_fwd, _ = timed(bare_forward)
    t_pred, _ = timed(common.predict, model, common.image_loader(ds, None, batch, workers=0), 64, mean, std,
                      cpu, None)
    return [("bare PIL decode, bytes in memory", n, "", n / t_bare, "images/s, one core"),
            ("loader: HDF5 read + decode + canvas, first pass", n, "", n / t_load, "images/s, one core"),
            ("ratio loader / bare decode, first pass", "", "", t_bare / t_load, "target 0.8 or more (extraction)"),
            ("ratio loader / bare decode, later passes", "", "", t_bare / t_again, "training epochs"),
            ("HDF5: finding a tile's offset (image_location)", n, "", t_find / n * 1e6, "microseconds a tile"),
            ("HDF5: reading a tile at its offset (os.pread)", n, "", t_pread / n * 1e6, "microseconds a tile"),
            ("HDF5: h5py's h5[isic_id][()], for comparison", n, "", t_h5py / n * 1e6, "microseconds a tile"),
            ("bare model forward, pre-loaded tensors", n, "", n / t_fwd, f"images/s, batch {batch}"),
            ("predict loop: loader + resize + forward", n, "", n / t_pred, "images/s, same core(s)"),
            ("ratio predict / bare forward", "", "", t_fwd / t_pred, "target 0.9 or more (on a GPU)")]


# dense bf16 (fp16 where the GPU has no bf16) tensor-core peaks, TFLOP/s, by a part of the device name
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40": 181.0, "L4": 121.0, "A10": 125.0,
               "V100": 125.0, "T4": 65.0}
REAL_POSITIVES, REAL_TILES = 393, 401_059


# the recipe projected: train_backbone.py's defaults
RECIPE = train_backbone.build_parser().parse_args(["--arch", "eva02_base"])


def projected_hours(train_rate, fwd_rate, folds=5):
    """Hours of one architecture's full run at these images/s, with train_backbone.py's defaults
    (RECIPE): per fold, its epochs of the training positives (4/5 of the real 393) with
    --neg-per-pos negatives each, and a validation pass over the fold's positives with
    --val-neg-per-pos negatives each; then extract.py over every train tile (each by its own fold's
    model)."""
    train_pos = REAL_POSITIVES * (folds - 1) // folds
    val_tiles = REAL_POSITIVES // folds * (1 + RECIPE.val_neg_per_pos)
    fold_s = RECIPE.epochs * (train_pos * (1 + RECIPE.neg_per_pos) / train_rate + val_tiles / fwd_rate)
    return folds * fold_s / 3600, REAL_TILES / fwd_rate / 3600


def counted_training_forward(model, size, dtype=None):
    """(FLOPs, bytes saved for the backward pass) per image of one training forward of `model` at
    `size` px, as a CUDA GPU runs it under `dtype` autocast, counted without one: on fake CUDA tensors
    (no memory, no compute) under CUDA's autocast rules (layer and vector norms in float32), with
    attention as the memory-efficient SDPA kernel that a T4 runs (it saves no attention matrix;
    FlopCounterMode counts its FLOPs, which it skips in the CPU's SDPA op). Per image: the batch of
    2 minus the batch of 1, so what does not grow with the batch (the weights' casts) drops out."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    dtype = dtype or torch.float16

    def efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        q, k, v = (t.to(dtype) for t in (q, k, v))  # what autocast does to SDPA's inputs
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, True, dropout_p,
                                                                      is_causal, scale=scale)[0]

    def count(batch):
        storages = {}

        def pack(t):
            storages[t.untyped_storage()._cdata] = t  # kept alive, so that no storage's address is reused
            return t
        x = torch.zeros(batch, 3, size, size, device="cuda")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as flops:
            model(x)
        return flops.get_total_flops(), sum(t.untyped_storage().nbytes() for t in storages.values())
    sdpa, was_enabled = torch.nn.functional.scaled_dot_product_attention, torch.is_autocast_enabled("cuda")
    # torch.autocast("cuda") turns itself off without a GPU: set the switch it would set
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.nn.functional.scaled_dot_product_attention = efficient_sdpa
    try:
        model = copy.deepcopy(model)  # the caller's model keeps its real weights
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to("cuda").train()
            (f1, b1), (f2, b2) = count(1), count(2)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        torch.set_autocast_enabled("cuda", was_enabled)
    return f2 - f1, b2 - b1


def counted(arch):
    """(forward FLOPs, saved activation bytes, the same with gradient checkpointing, parameters) of
    one image of ARCH at its training size, as a CUDA GPU's fp16 autocast runs it."""
    model = common.build_model(arch, pretrained=False)
    size = common.MODEL_CONFIGS[arch]["img_size"]
    flops, act = counted_training_forward(model, size)
    model.set_grad_checkpointing(True)
    return flops, act, counted_training_forward(model, size)[1], sum(p.numel() for p in model.parameters())


# Kaggle's GPU T4 x2: the dense fp16 tensor peak of one T4, TFLOP/s, and the range of shares of it
# that the projections assume until bench.py --gpu measures one (eager PyTorch on a throttling
# 70 W card; training at three times the forward's FLOPs)
T4_PEAK, T4_COUNT, SHARES = 65.0, 2, (0.10, 0.25)
KAGGLE_CORES, DECODES_PER_CORE = 4, 7100  # a Kaggle notebook's CPU cores; JPEG decodes a second on one core
GBDT_TRAIN_S = 190  # gbdt.py at 400,000 rows, default settings: `python bench.py --gbdt-rows 400000` on 2 idle cores


def memory_figures(archs, costs):
    """Table rows: per architecture at its training size, what training holds in GPU memory, and the
    largest micro-batch (train_backbone.largest_micro_batch) on a 16 GB T4 and on 80 GB."""
    table = []
    for arch in archs:
        _, act, act_ckpt, n_params = costs[arch]
        cfg = common.MODEL_CONFIGS[arch]
        table += [(f"{arch} ({cfg['img_size']} px): parameters, millions", "", "", n_params / 1e6, ""),
                  (f"{arch}: weights + gradients + AdamW state, GiB", "", "", 16 * n_params / 2 ** 30,
                   "fp32, 16 bytes a parameter"),
                  (f"{arch}: saved activations per image, MiB", "", "", act / 2 ** 20,
                   f"counted (fp16 autocast on fake CUDA tensors); MODEL_CONFIGS act_mib: {cfg['act_mib']}"),
                  (f"{arch}: the same with gradient checkpointing, MiB", "", "", act_ckpt / 2 ** 20,
                   f"MODEL_CONFIGS act_mib_ckpt: {cfg['act_mib_ckpt']}")]
        for gb in (16, 80):
            plain, ckpt = (train_backbone.largest_micro_batch(gb * 1e9, n_params, a) for a in (act, act_ckpt))
            table.append((f"{arch}: largest micro-batch on {gb} GB", "", "", float(plain),
                          f"{ckpt} with gradient checkpointing"))
    return table


def cpu_minutes(test_lesions, cache):
    """Minutes of the submission notebook's CPU stages for test_lesions lesions, measured here on
    40,000 rows and scaled: features.py --predict-only, the prediction of four GBDTs of 5 folds and
    gbdt.py's default bags and rounds, ensemble.py."""
    n = 40_000
    data = os.path.join(cache, f"submission{n}")
    if not os.path.exists(os.path.join(data, "test-metadata.csv")):
        os.makedirs(data, exist_ok=True)
        write_metadata(os.path.join(data, "test-metadata.csv"), synthetic_train(n), common.TEST_COLUMNS)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        t0 = time.perf_counter()
        test = common.read_test(data)
        x, _ = features.build_features(test, features.fit_vocabularies(test))
        common.save_array(os.path.join(tmp, "test.npy"), x, list(test["isic_id"]))
    t_features = (time.perf_counter() - t0) * test_lesions / n
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.02).astype(int)
    defaults = gbdt.build_parser().parse_args([])
    booster = gbdt.lgb.train({"objective": "binary", "num_leaves": 31, "max_depth": 6, "verbose": -1},
                             gbdt.lgb.Dataset(x[:20_000], y), defaults.rounds)
    t_gbdt = 4 * 5 * defaults.bags * timed(booster.predict, x)[0] * test_lesions / n
    t_ensemble = timed(ensemble.rank_average, [rng.random(test_lesions) for _ in range(3)], [0.2, 0.3, 0.5])[0]
    return (t_features + t_gbdt + t_ensemble) / 60


def reason_figures(cache, test_lesions, gbdts=4, per_patient=FULL_ROWS / FULL_PATIENTS):
    """Table rows of the reasons' cost (reasons.explain's steps) at test_lesions lesions, measured
    at that size: the feature matrix (the demo's feature rows tiled) saved and loaded
    back as gbdt.load_features does, once a GBDT; each patient's top 15 (per_patient lesions a
    patient, as in the real train file) taken; their TreeSHAP contributions from `gbdts` GBDTs of
    5 folds x gbdt.py's default bags (boosters of the default settings, trained on 20,000 of the rows
    against random labels: a booster's cost is its trees'), combined, and the phrases; and TreeSHAP
    for 20,000 lesions, scaled to every lesion, for comparison."""
    data = os.path.join(cache, "reasons_demo")
    if not os.path.exists(os.path.join(data, "test-metadata.csv")):
        os.makedirs(data, exist_ok=True)
        write_metadata(os.path.join(data, "test-metadata.csv"),
                       demo_lesions(np.random.default_rng(1), 40, 2_000_000, 2_000_000, 0.01), common.TEST_COLUMNS)
    test = common.read_test(data)
    x, names = features.build_features(test, features.fit_vocabularies(test))
    rng = np.random.default_rng(0)
    x = np.resize(np.ascontiguousarray(x), (test_lesions, x.shape[1]))
    patients = np.arange(test_lesions) // int(per_patient)
    defaults = gbdt.build_parser().parse_args([])
    n_boosters = 5 * defaults.bags
    booster = gbdt.lgb.train(gbdt.lgb_params(defaults, 0), gbdt.lgb.Dataset(x[:20_000], rng.random(20_000) < 0.02),
                             defaults.rounds)
    ids = [f"ISIC_{i:07d}" for i in range(test_lesions)]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        common.save_array(os.path.join(tmp, "test.npy"), x, ids)
        t_load = timed(lambda: [common.load_array(os.path.join(tmp, "test.npy"), ids) for _ in range(gbdts)])[0]
    t_select, rows = timed(lambda: np.flatnonzero(common.rank_in_patient(rng.random(test_lesions), patients)
                                                  <= reasons.TOP_K))
    t_shap, phi = timed(lambda: [reasons.contributions([booster] * n_boosters, x[rows]) for _ in range(gbdts)])
    t_phrases = timed(lambda: reasons.top_reasons(sum(phi)[:, :-1] / gbdts, x[rows], names))[0]
    t_all = timed(reasons.contributions, [booster], x[:20_000])[0] * gbdts * n_boosters * test_lesions / 20_000
    total = t_load + t_select + t_shap + t_phrases
    what = f"{gbdts} GBDTs x {n_boosters} boosters of {defaults.rounds} rounds"
    return [(f"reasons: loading the test features, once a GBDT ({gbdts})", test_lesions, x.shape[1], t_load, ""),
            ("reasons: each patient's top 15", len(rows), "", t_select, f"{len(np.unique(patients)):,} patients"),
            (f"reasons: TreeSHAP contributions of the top 15s, {what}", len(rows), x.shape[1], t_shap, ""),
            ("reasons: concepts and phrases", len(rows), x.shape[1], t_phrases, ""),
            (f"**reasons for the triage, {test_lesions:,} test lesions**", test_lesions, x.shape[1], total,
             "measured"),
            (f"reasons for every test lesion: TreeSHAP alone, {what}", test_lesions, x.shape[1], t_all,
             "measured on 20,000 lesions, scaled")]


def notebook_runs(folds, finish_h):
    """The runs of the training notebook (notebooks.train_until_done) for folds [(arch, fold, hours)]
    in plan order, as (what it runs, hours): a fold starts only if it would end within BUDGET_HOURS
    of the run's start, and the finishing stages only if FINISH_HOURS are left of the 12."""
    runs, run, t = [], [], 0.0
    for arch, k, h in folds:
        if run and t + h > notebooks.BUDGET_HOURS:
            runs.append((run, t))
            run, t = [], 0.0
        run, t = run + [(arch, k)], t + h
    if t + notebooks.FINISH_HOURS > notebooks.KAGGLE_HOURS:
        runs.append((run, t))
        run, t = [], 0.0
    runs.append((run + [("finishing stages", None)], t + finish_h))
    described = []
    for run, h in runs:
        parts = []  # [(arch, [folds])], in order
        for arch, k in run:
            if parts and parts[-1][0] == arch:
                parts[-1][1].append(k)
            else:
                parts.append((arch, [k]))
        described.append((", ".join(a if ks == [None] else f"{a} folds {','.join(map(str, ks))}"
                                    for a, ks in parts), h))
    return described


def gpu_estimate(archs, test_lesions, cache):
    """Table rows of the GPU cost on Kaggle's GPU T4 x2, projected from counted FLOPs at each share
    of SHARES: per architecture, training and extraction; the training memory; each run of the
    training notebook and the submission notebook for test_lesions lesions. Estimates, not measurements."""
    costs = {arch: counted(arch) for arch in archs}
    rates = {share: T4_PEAK * 1e12 * T4_COUNT * share for share in SHARES}
    hours = {}  # (share, arch): (training hours per fold, extraction hours of every train tile)
    table = [(f"{arch} forward GFLOP per image, {common.MODEL_CONFIGS[arch]['img_size']} px", "", "",
              costs[arch][0] / 1e9, "counted, attention included") for arch in archs]
    for share, rate in rates.items():
        for arch in archs:
            train_h, extract_h = projected_hours(rate / (3 * costs[arch][0]), rate / costs[arch][0])
            hours[share, arch] = train_h / 5, extract_h
            table += [(f"T4 x2 at {share:.0%}: {arch} training, hours per fold ({RECIPE.epochs} epochs)", "", "",
                       train_h / 5, "projected"),
                      (f"T4 x2 at {share:.0%}: {arch} extraction of every train tile, hours", REAL_TILES, "",
                       extract_h, "projected")]
    table += memory_figures(archs, costs)
    cpu = cpu_minutes(test_lesions, cache) / 60
    decode_h = test_lesions / (KAGGLE_CORES * DECODES_PER_CORE) / 3600
    for share in SHARES:
        folds = [(arch, k, hours[share, arch][0]) for arch in archs for k in range(5)]
        finish_h = sum(hours[share, arch][1] for arch in archs) + (len(archs) + 2) * GBDT_TRAIN_S / 3600
        for i, (what, h) in enumerate(notebook_runs(folds, finish_h), 1):
            table.append((f"**training notebook, run {i} ({what}), T4 x2 at {share:.0%}, hours**", "", "", h,
                          f"projected; a fold starts if it ends within {notebooks.BUDGET_HOURS:g} h, the finishing "
                          f"stages ({finish_h:.2f} h) if {notebooks.FINISH_HOURS:g} h are left of "
                          f"{notebooks.KAGGLE_HOURS} h"))
    for share, rate in rates.items():
        gpu_h = sum(max(test_lesions * costs[arch][0] / rate / 3600, decode_h) for arch in archs)
        table.append((f"**submission notebook ({test_lesions:,} lesions, one fold model an architecture), T4 x2 at "
                      f"{share:.0%}, hours**", test_lesions, "", gpu_h + cpu,
                      f"projected; the CPU stages {cpu * 60:.1f} min measured here and scaled"))
    return table


def gpu_figures(cache, archs=("eva02_base", "convnext"), compile_modes=(False, True), steps=10, n_tiles=2048):
    """Table rows measured on this machine's GPU (the CPU without one): per architecture, the predict
    loop (real loader, demo tiles, device-side resize) against the bare forward on the same batches;
    training images/s of train_backbone.train_step on batches of 64 in the micro-batches that
    train_backbone.memory_plan picks for this GPU, with its peak memory against the projection;
    extraction images/s, eager and torch.compile'd; each rate's share of the device's peak, and the
    full five-fold run projected from them. Each row is also printed as it is measured, and a
    failed compile is a row, so a run cut short still reports."""
    from argparse import Namespace
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = next((t * 1e12 for k, t in PEAK_TFLOPS.items() if k in name), None)
    dtype, scale_loss = common.amp_settings(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    data = os.path.join(cache, "demo_images")
    if not os.path.exists(os.path.join(data, "train-image.hdf5")):
        make_demo(data)
    images = common.H5Images(os.path.join(data, "train-image.hdf5"), common.read_train(data)["isic_id"][:n_tiles])
    n, table = len(images), []

    def add(*row):
        table.append(row)
        common.log(" | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in row))
    add(f"device: {name}, peak TFLOP/s (dense bf16, fp16 without bf16)", "", "",
        peak / 1e12 if peak else 0.0, "from PEAK_TFLOPS" if peak else "not known: shares left out")

    def images_per_s(step, batch):  # the first calls compile and warm up: timed apart
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return batch * steps / (time.perf_counter() - t0), warm

    def training_rate(arch, model, size, act):
        """train_backbone's step, in its memory plan's micro-batches, and the peak memory it took."""
        micro, checkpointing = train_backbone.memory_plan(
            Namespace(batch_size=64, micro_batch=None, grad_checkpointing=False, arch=arch), model, device)
        model.set_grad_checkpointing(checkpointing)
        opt, loss_fn = torch.optim.AdamW(model.parameters(), lr=1e-5), common.focal_loss
        scaler = torch.amp.GradScaler(device.type, enabled=scale_loss)
        x = torch.randn(64, 3, size, size, device=device).contiguous(memory_format=fmt)
        y = (torch.rand(64, device=device) < 0.05).float()
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rate = images_per_s(lambda: train_backbone.train_step(model, model, opt, scaler, loss_fn, x, y, micro,
                                                              device, dtype), 64)
        if device.type == "cuda":
            n_params = sum(p.numel() for p in model.parameters())
            projected = 16 * n_params + micro * act + 64 * 3 * size * size * 4  # + the batch itself, fp32
            add(f"{arch} training in micro-batches of {micro}{' with checkpointing' if checkpointing else ''}: peak "
                "GPU memory, GiB", "", "", torch.cuda.max_memory_allocated(device) / 2 ** 30,
                f"projected {projected / 2 ** 30:.1f} GiB: 16 bytes a parameter + micro-batch x counted activations")
        model.set_grad_checkpointing(False)
        return rate

    def extraction_rate(model, size, compiled):
        infer_fn = torch.compile(common.forward_features_and_logit) if compiled else common.forward_features_and_logit
        xi = torch.randn(256, 3, size, size, device=device).contiguous(memory_format=fmt)

        @torch.no_grad()
        def infer_step():
            with common.autocast(device, dtype):
                infer_fn(model, xi)
        model.eval()
        return images_per_s(infer_step, 256)

    total = 0.0
    for arch in archs:
        size = common.MODEL_CONFIGS[arch]["img_size"]
        fwd, act, _, _ = counted(arch)
        model = common.build_model(arch, pretrained=False).to(device).eval().to(memory_format=fmt)
        mean, std = common.normalization(model)
        loader = common.image_loader(images, None, 256, workers=min(8, os.cpu_count()))
        batches = [common.prepare_batch(c, s, size, mean, std, device) for c, s, _, _ in loader]

        @torch.no_grad()
        def bare_forward():
            for xb in batches:
                with common.autocast(device, dtype):
                    common.forward_features_and_logit(model, xb)
            sync()
        bare_forward()
        t_bare, _ = timed(bare_forward)
        t_pred, _ = timed(common.predict, model, loader, size, mean, std, device, dtype)
        add(f"{arch} bare forward on prepared batches, eager", n, "", n / t_bare, "images/s")
        add(f"{arch} predict loop (loader + resize + forward)", n, "", n / t_pred, "images/s")
        add(f"{arch} ratio predict / bare forward", "", "", t_bare / t_pred, "target 0.9 or more")
        best = [0.0, 0.0]

        def report(what, mode, rate, warm, flops):
            share = f"{rate * flops / peak:.0%} of peak" if peak else "no peak known"
            add(f"{arch} {size} px {what}, {mode}", "", "", rate, f"images/s; {share}; first 3 steps {warm:.0f} s")
        try:
            best[0], warm = training_rate(arch, model, size, act)
            report("training (train_backbone.train_step)", "eager", best[0], warm, 3 * fwd)
        except torch.cuda.OutOfMemoryError as e:  # the memory plan is wrong for this GPU: a finding
            add(f"{arch} training out of memory", "", "", float("nan"), str(e)[:150])
        for compiled in compile_modes:
            mode = "torch.compile" if compiled else "eager"
            try:
                rate, warm = extraction_rate(model, size, compiled)
            except Exception as e:  # a compiler failure is a finding, not the end of the run
                add(f"{arch} {mode} failed", "", "", float("nan"), f"{type(e).__name__}: {str(e)[:150]}")
                continue
            best[1] = max(best[1], rate)
            report("extraction", mode, rate, warm, fwd)
        if min(best) > 0:
            train_h, extract_h = projected_hours(*best)
            total += train_h + extract_h
            add(f"{arch} hours: 5 folds x {RECIPE.epochs} epochs, projected", "", "", train_h, f"on this {name}")
            add(f"{arch} hours: extracting every train tile, projected", REAL_TILES, "", extract_h, "")
    add(f"**{' + '.join(archs)}, hours on this {name}, projected**", "", "", total, "")
    return table


# the tabular ablation: each ingredient's features.py and gbdt.py options, added one at a time
PREVIOUS_GBDT = ["--min-leaf", "20", "--colsample-bynode", "1", "--lr", "0.05", "--rounds", "250", "--bags", "3",
                 "--indeterminate-weight", "1", "--max-bin", "255"]
WINNERS_GBDT = ["--min-leaf", "80", "--colsample-bynode", "0.5", "--lr", "0.03", "--rounds", "400", "--bags", "5",
                "--indeterminate-weight", "1", "--max-bin", "255"]
ABLATION = [("patient normalization only (the previous default)", ["--no-context", "--no-outlier"], PREVIOUS_GBDT),
            ("+ z-score summary and outlier distance", ["--no-context"], PREVIOUS_GBDT),
            ("+ body-site context", [], PREVIOUS_GBDT),
            ("+ winners' GBDT settings: min leaf 80, colsample by node 0.5, lr 0.03 x 400 rounds, 5 bags", [],
             WINNERS_GBDT),
            ("+ Indeterminate negatives weighted 0.5", [], WINNERS_GBDT + ["--indeterminate-weight", "0.5"]),
            ("+ Indeterminate negatives dropped (weight 0): the new default", [],
             WINNERS_GBDT + ["--indeterminate-weight", "0"]),
            ("body-site context off, winners' GBDT settings", ["--no-context"], WINNERS_GBDT)]
# gbdt.py's defaults before issue 26 (5 folds x 5 bags x 400 rounds, 255 bins on LightGBM's default sample)
FIVE_BAGS_400_ROUNDS = ["--rounds", "400", "--lr", "0.03", "--bags", "5", "--max-bin", "255", "--bin-sample", "200000"]
# the speed levers, one at a time from the previous defaults to the new ones, then one left out. --bin-sample changes
# nothing here: the demo set has fewer rows than it. The histogram layout changes the time, not the trees.
SPEED_ABLATION = [
    ("the previous defaults: 5 bags x 400 rounds at lr 0.03, 255 bins", [], FIVE_BAGS_400_ROUNDS),
    ("170 rounds at lr 0.06", [], ["--rounds", "170", "--lr", "0.06", "--bags", "5", "--max-bin", "255"]),
    ("+ 3 bags", [], ["--rounds", "170", "--lr", "0.06", "--bags", "3", "--max-bin", "255"]),
    ("+ 63 bins", [], ["--rounds", "170", "--lr", "0.06", "--bags", "3", "--max-bin", "63"]),
    ("+ 2 bags: the new defaults", [], []),
    ("3 bags x 115 rounds at lr 0.09, 63 bins", [], ["--rounds", "115", "--lr", "0.09", "--bags", "3",
                                                     "--max-bin", "63"])]


def ablation_figures(cache, patients, test_patients, variants, seeds):
    """Table rows of an ablation on a demo set of `patients` train patients (the default demo's
    generator, its images unused): per variant, over the folds of each of `seeds`, gbdt.py's mean
    seconds, the OOF pAUC (mean, and each seed's), the spread (standard deviation) of its fold
    pAUCs, the pAUC on the demo test lesions."""
    data = os.path.join(cache, f"ablation_demo{patients}")
    if not os.path.exists(os.path.join(data, "train-metadata.csv")):
        make_demo(data, patients, test_patients, seed=3)
    answers = common.read_csv(os.path.join(data, "demo_test_labels.csv"), ["isic_id", "target"], ["target"])
    table, works = [], {}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for i, (what, feature_args, gbdt_args) in enumerate(variants):
            runs = []
            for seed in seeds:
                work = works.get((tuple(feature_args), seed))
                if work is None:  # features.py once for each feature set and seed of the folds
                    work = works[tuple(feature_args), seed] = os.path.join(tmp, f"w{len(works)}")
                    features.main(["--data", data, "--work", work, "--seed", str(seed)] + feature_args)
                name = f"variant{i}"
                t_gbdt, _ = timed(gbdt.main, ["--work", work, "--name", name] + gbdt_args)
                train, test = common.read_lesions(work, "train"), common.read_lesions(work, "test")
                oof = common.read_preds(work, name, "train", train["isic_id"])
                fold_scores = [common.pauc_or_nan(train["target"][train["fold"] == k], oof[train["fold"] == k])
                               for k in np.unique(train["fold"])]
                test_score = common.pauc(answers["target"], common.read_preds(work, name, "test", test["isic_id"]))
                runs.append((t_gbdt, common.pauc(train["target"], oof), np.nanstd(fold_scores), test_score))
            with open(os.path.join(work, "features", "columns.txt")) as f:
                n_feat = len(f.read().split())
            t, oof, spread, test = np.mean(runs, axis=0)
            each = ", ".join(f"{r[1]:.4f}" for r in runs)
            table.append((what, len(train["isic_id"]), n_feat, t,
                          f"gbdt.py seconds; OOF pAUC {oof:.4f} (folds of seed {', '.join(map(str, seeds))}: {each}), "
                          f"folds' spread {spread:.3f}; demo test pAUC {test:.3f}"))
            common.log(" | ".join(str(c) for c in table[-1]))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=common.number(int, 1000, 10_000_000), default=FULL_ROWS,
                        help="train rows of the full-size runs")
    parser.add_argument("--cache", default="bench_data", help="folder for the generated CSVs (reused)")
    parser.add_argument("--gbdt-rows", type=common.number(int, 1000, 10_000_000), nargs="+",
                        help="row counts of the gbdt scaling runs (default: rows/4, rows/2, rows); "
                             "without --rows among them, gbdt at --rows is extrapolated linearly")
    parser.add_argument("--no-gbdt", action="store_true", help="without the gbdt.py scaling runs")
    parser.add_argument("--gbdt-before", metavar="COMMIT",
                        help="also time gbdt.py as it was at this git commit (code and defaults), side by side")
    parser.add_argument("--gpu-estimate", action="store_true",
                        help="only the projections for Kaggle's GPUs: time from counted FLOPs, training memory, "
                             "the submission notebook's time (no GPU needed)")
    parser.add_argument("--test-lesions", type=common.number(int, 1000, 10_000_000), default=500_000,
                        help="with --gpu-estimate or --reasons: hidden test size")
    parser.add_argument("--gpu", action="store_true",
                        help="only the GPU measurements: training and extraction images/s, the predict loop, "
                             "the projected full run")
    parser.add_argument("--archs", nargs="+", default=["eva02_base", "convnext"], help="with --gpu or --gpu-estimate")
    parser.add_argument("--no-compile", action="store_true", help="with --gpu: eager mode only")
    parser.add_argument("--ablation", choices=["ingredients", "speed"],
                        help="only an ablation on a larger demo set: the tabular ingredients (features and GBDT "
                             "settings), or gbdt.py's speed levers from the previous defaults to the new ones")
    parser.add_argument("--ablation-seeds", type=common.SEED, nargs="+", default=[42, 7],
                        help="with --ablation: the seeds of the folds, each a features.py run")
    parser.add_argument("--ablation-patients", type=common.number(int, 20, 100_000), default=400,
                        help="with --ablation: train patients")
    parser.add_argument("--reasons", action="store_true",
                        help="only the cost of the triage's reasons at --test-lesions test lesions")
    args = parser.parse_args(argv)
    if args.reasons:
        os.makedirs(args.cache, exist_ok=True)
        load = f"{os.getloadavg()[0]:.1f}"
        table = reason_figures(args.cache, args.test_lesions)
        print(f"\n{os.cpu_count()} CPU cores, load average {load} at the start, {os.getloadavg()[0]:.1f} at the end\n")
        print_table(table)
        return
    if args.ablation:
        os.makedirs(args.cache, exist_ok=True)
        print_table(ablation_figures(args.cache, args.ablation_patients, args.ablation_patients // 4,
                                     ABLATION if args.ablation == "ingredients" else SPEED_ABLATION,
                                     args.ablation_seeds))
        return
    if args.gpu_estimate or args.gpu:
        print_table(gpu_estimate(args.archs, args.test_lesions, args.cache) if args.gpu_estimate else
                    gpu_figures(args.cache, args.archs, (False,) if args.no_compile else (False, True)))
        return
    gbdt_rows = [] if args.no_gbdt else sorted(args.gbdt_rows or [args.rows // 4, args.rows // 2, args.rows])
    load = f"{os.getloadavg()[0]:.1f}"

    full = data_dir(args.cache, args.rows)
    for n in gbdt_rows:
        data_dir(args.cache, n)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        common.log("CSV to feature matrix")
        table = feature_figures(full, tmp)
        common.log("image loading and extraction")
        table += image_figures(args.cache)
        if gbdt_rows:
            common.log("gbdt.py against rows and feature count")
            table += gbdt_figures(args.cache, args.rows, gbdt_rows, tmp, args.gbdt_before)

    print(f"\n{os.cpu_count()} CPU cores, load average {load} at the start, {os.getloadavg()[0]:.1f} at the end "
          "(1 min; other processes shared the cores if above 0 at the start); "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          "seconds are wall time, ratios from this run\n")
    print_table(table)


def print_table(table):
    print("| what | rows | features | seconds (or what the note says) | note |\n|---|---:|---:|---:|---|")
    for what, rows, n_feat, sec, note in table:
        rows = f"{rows:,}" if rows != "" else ""
        print(f"| {what} | {rows} | {n_feat} | {sec:.2f} | {note} |")


if __name__ == "__main__":
    main()
