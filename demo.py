"""The demo data set: synthetic lesions in the exact Kaggle layout (train-metadata.csv with 55
columns, test-metadata.csv with 44, train/test-image.hdf5 holding JPEG tiles, sample_submission.csv),
plus demo_test_labels.csv, the test set's hidden answers, so that a demo run can be scored.

Patients differ more than their lesions do (skin tone, photo set-up, lesion load), and a patient's
body sites differ too (lightness, size, colour spread), so absolute values are confounded by the
patient and the site; a malignant lesion stands out from its own patient's lesions. Each of two
visual traits that no tabular column has (a blue-white veil with dark dots; dark radial streaks)
marks 65% of malignant tiles and 3% of benign ones, drawn apart: what the image models can add.
3% of benign lesions look half malignant and are diagnosed Indeterminate (iddx_1).

Writes: OUT/{train,test}-metadata.csv, OUT/{train,test}-image.hdf5, OUT/sample_submission.csv,
        OUT/demo_test_labels.csv

    python demo.py tiny --patients 30 --test-patients 6     # a tiny set, for trying things
    python demo.py demo_data                                # the demo set of run.sh (about 15 s)
"""
import argparse
import io
import os

import numpy as np

from common import SEED, TEST_COLUMNS, TRAIN_COLUMNS, atomic_write, log, number, run_main, write_csv

LOCATIONS = {"head/neck": ["Head & Neck"],
             "anterior torso": ["Torso Front Top Half", "Torso Front Bottom Half", "Torso Front"],
             "posterior torso": ["Torso Back Top Third", "Torso Back Middle Third", "Torso Back Bottom Third",
                                 "Torso Back"],
             "upper extremity": ["Left Arm - Upper", "Left Arm - Lower", "Right Arm - Upper",
                                 "Right Arm - Lower", "Left Arm", "Right Arm"],
             "lower extremity": ["Left Leg - Upper", "Left Leg - Lower", "Right Leg - Upper",
                                 "Right Leg - Lower", "Left Leg", "Right Leg"]}
ATTRIBUTIONS = ["Memorial Sloan Kettering Cancer Center", "ACEMID MIA",
                "ViDIR Group, Department of Dermatology, Medical University of Vienna",
                "Frazer Institute, The University of Queensland, Dermatology Research Centre",
                "Department of Dermatology, Hospital Clínic de Barcelona", "University Hospital of Basel",
                "Department of Dermatology, University of Athens, Andreas Syggros Hospital of Skin and "
                "Venereal Diseases, Alexandra Hospital"]


def simple_location(loc):
    for side in ("Left", "Right"):
        for limb in ("Arm", "Leg"):
            if loc.startswith(f"{side} {limb}"):
                return f"{side} {limb}"
    return {"Head & Neck": "Head & Neck"}.get(loc, "Torso Back" if "Back" in loc else "Torso Front")


def demo_lesions(rng, n_patients, first_patient, first_lesion, malignant_rate):
    """Metadata rows (dicts) of a demo cohort. A malignant lesion stands out from its own patient's
    lesions (larger, darker, more irregular) by less than patients differ from each other."""
    rows = []
    for p in range(n_patients):
        pid = f"IP_{first_patient + p:07d}"
        n = int(np.clip(rng.lognormal(3.0, 0.8), 3, 300))
        age = float(rng.choice(np.arange(20, 90, 5))) if rng.random() > 0.01 else np.nan
        sex = rng.choice(["male", "female", ""], p=[0.52, 0.46, 0.02])
        attribution = ATTRIBUTIONS[rng.integers(len(ATTRIBUTIONS))]
        tile = rng.choice(["3D: XP", "3D: white"], p=[0.7, 0.3])
        skin = rng.normal([60.0, 15.0, 25.0], [9.0, 3.0, 4.0])          # the patient's L, A, B
        size_scale = rng.lognormal(0.0, 0.35)
        style = rng.normal(0, 1, 6)                                     # patient-level offsets
        # the patient's body sites differ (sun exposure, the camera's lighting): lightness, size and
        # colour spread shift by site, so a lesion is best compared with its own site's lesions
        by_site = dict(zip(LOCATIONS, rng.normal(0, 1, (len(LOCATIONS), 3))))
        n_mal = rng.binomial(n, malignant_rate) if rng.random() < 0.5 else 0
        mal = np.zeros(n, bool)
        mal[rng.choice(n, min(n_mal, max(1, n // 4)), replace=False)] = True
        # a few benign lesions look half malignant: diagnosed Indeterminate (iddx_1), a label detail
        # that training may weigh down
        unsure = ~mal & (rng.random(n) < 0.03)
        for j in range(n):
            m = mal[j]
            site = rng.choice(list(LOCATIONS), p=[0.1, 0.22, 0.3, 0.16, 0.22])
            loc = rng.choice(LOCATIONS[site]) if rng.random() > 0.01 else "Unknown"
            shift = 1.0 if m else 0.6 if unsure[j] else 0.0
            d = rng.normal(0, 1, 8) + shift * np.array([1.0, 0.8, 0.9, 0.7, 0.8, 0.6, 0.0, 0.0])
            s = by_site[site]
            diam = size_scale * np.exp(1.0 + 0.25 * d[0] + 0.2 * s[0]) + 1.0
            L = skin[0] - 18 - 4 * d[1] + 6 * style[0] + 4 * s[1]
            A, B = skin[1] + 3 + 1.5 * d[2] + 2 * style[1], skin[2] + 3 + 2 * rng.normal()
            area = np.pi * diam * diam / 4 * rng.uniform(0.55, 0.8)
            border = np.clip(4.0 + 1.2 * d[3] + 1.5 * style[2], 1, 10)
            perim = 2 * np.sqrt(np.pi * area) * (1 + 0.05 * border)
            color_std = max(0.0, 0.5 + 0.6 * d[4] + 0.5 * style[3] + 0.4 * s[2])
            symm = np.clip(0.3 + 0.06 * d[5] + 0.05 * style[4], 0.05, 0.9)
            x, y, z = rng.normal(0, 150), rng.uniform(300, 1700), rng.normal(0, 60)
            Lext, Aext, Bext = skin + rng.normal(0, 1.5, 3)
            dL, dA, dB = L - Lext, A - Aext, B - Bext
            nevi = float(np.clip(100 / (1 + np.exp(-(1.5 - 1.2 * d[0] - d[4] + style[5]))), 0, 100))
            row = {"isic_id": None, "target": float(m), "patient_id": pid, "age_approx": age, "sex": sex,
                   "anatom_site_general": site if rng.random() > 0.015 else "",
                   "clin_size_long_diam_mm": round(diam, 2), "image_type": "TBP tile: close-up",
                   "tbp_tile_type": tile, "tbp_lv_A": A, "tbp_lv_Aext": Aext, "tbp_lv_B": B,
                   "tbp_lv_Bext": Bext, "tbp_lv_C": np.hypot(A, B), "tbp_lv_Cext": np.hypot(Aext, Bext),
                   "tbp_lv_H": np.degrees(np.arctan2(B, A)), "tbp_lv_Hext": np.degrees(np.arctan2(Bext, Aext)),
                   "tbp_lv_L": L, "tbp_lv_Lext": Lext, "tbp_lv_areaMM2": area,
                   "tbp_lv_area_perim_ratio": perim * perim / area, "tbp_lv_color_std_mean": color_std,
                   "tbp_lv_deltaA": dA, "tbp_lv_deltaB": dB, "tbp_lv_deltaL": dL,
                   "tbp_lv_deltaLB": np.hypot(dL, dB), "tbp_lv_deltaLBnorm": np.sqrt(dL ** 2 + dA ** 2 + dB ** 2),
                   "tbp_lv_eccentricity": float(np.clip(0.75 + 0.1 * d[6], 0.2, 0.99)),
                   "tbp_lv_location": loc, "tbp_lv_location_simple": simple_location(loc),
                   "tbp_lv_minorAxisMM": diam * rng.uniform(0.5, 0.9), "tbp_lv_nevi_confidence": nevi,
                   "tbp_lv_norm_border": border, "tbp_lv_norm_color": float(np.clip(2 + 2 * d[4], 0, 10)),
                   "tbp_lv_perimeterMM": perim, "tbp_lv_radial_color_std_max": color_std * rng.uniform(0.3, 1),
                   "tbp_lv_stdL": 1 + 0.4 * abs(d[1]), "tbp_lv_stdLExt": rng.uniform(1, 4),
                   "tbp_lv_symm_2axis": symm, "tbp_lv_symm_2axis_angle": float(rng.integers(0, 36) * 5),
                   "tbp_lv_x": x, "tbp_lv_y": y, "tbp_lv_z": z, "attribution": attribution,
                   "copyright_license": rng.choice(["CC-BY", "CC-BY-NC", "CC-0"]),
                   "lesion_id": f"IL_{rng.integers(10 ** 7):07d}" if m or rng.random() < 0.1 else "",
                   "iddx_full": "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive"
                   if m else "Indeterminate" if unsure[j] else "Benign",
                   "iddx_1": "Malignant" if m else "Indeterminate" if unsure[j] else "Benign",
                   "iddx_2": "Malignant melanocytic proliferations (Melanoma)" if m else "",
                   "iddx_3": "Melanoma Invasive" if m else "", "iddx_4": "", "iddx_5": "",
                   "mel_mitotic_index": "<1/mm^2" if m and rng.random() < 0.5 else "",
                   "mel_thick_mm": round(rng.uniform(0.2, 2), 2) if m and rng.random() < 0.5 else np.nan,
                   "tbp_lv_dnn_lesion_confidence": float(rng.uniform(50, 100))}
            rows.append(row)
    for k, row in enumerate(rows):
        row["isic_id"] = f"ISIC_{first_lesion + k:07d}"
    return rows


def lab_to_rgb(L, A, B):
    """CIELAB to 8-bit sRGB (D65), enough for drawing tiles."""
    fy = (L + 16) / 116
    f = np.array([fy + A / 500, fy, fy - B / 200])
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * [0.9505, 1.0, 1.089]
    rgb = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]) @ xyz
    rgb = np.where(rgb > 0.0031308, 1.055 * np.clip(rgb, 0, None) ** (1 / 2.4) - 0.055, 12.92 * rgb)
    return tuple(int(v) for v in np.clip(rgb * 255, 0, 255))


def demo_tile(rng, row, veil, streaks):
    """A lesion tile of 61 to 239 px: a dark blob coloured by the row's L/A/B on its patient's skin.
    Two malignant signs that no tabular column carries: `veil`, a blue-white veil with dark dots (a
    colour), and `streaks`, dark radial streaks at the border (a shape)."""
    from PIL import Image, ImageDraw, ImageFilter
    size = int(np.clip(rng.normal(131, 30), 61, 239))
    skin = lab_to_rgb(row["tbp_lv_Lext"], row["tbp_lv_Aext"], row["tbp_lv_Bext"])
    lesion = lab_to_rgb(row["tbp_lv_L"], row["tbp_lv_A"], row["tbp_lv_B"])
    im = Image.new("RGB", (size, size), skin)
    draw = ImageDraw.Draw(im)
    r = size * np.clip(0.12 + 0.02 * row["clin_size_long_diam_mm"], 0.12, 0.4)
    c = size / 2 + rng.normal(0, size * 0.04, 2)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    wobble = 1 + rng.normal(0, 0.02 * row["tbp_lv_norm_border"], 24)
    draw.polygon([(c[0] + r * w * np.cos(a), c[1] + r * w * np.sin(a) * 0.8) for a, w in zip(angles, wobble)],
                 fill=lesion)
    if streaks:
        for a in rng.uniform(0, 2 * np.pi, 7):
            ray = np.array([np.cos(a), np.sin(a)])
            draw.line([tuple(c + r * 0.7 * ray), tuple(c + r * 1.35 * ray)], fill=(35, 25, 25),
                      width=max(2, size // 45))
    if veil:
        draw.ellipse([c[0] - r * 0.6, c[1] - r * 0.5, c[0] + r * 0.6, c[1] + r * 0.5], fill=(120, 150, 215))
        for _ in range(10):
            q = c + rng.normal(0, r * 0.3, 2)
            draw.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=(40, 30, 60))
    im = im.filter(ImageFilter.GaussianBlur(1.0))
    noise = rng.normal(0, 6, (size, size, 3))
    arr = np.clip(np.asarray(im, dtype=float) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_metadata(path, rows, columns):
    def cell(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else repr(round(float(v), 10))
        return str(v)
    write_csv(path, columns, list(zip(*[[cell(r[c]) for c in columns] for r in rows])))


def write_images(path, ids, images):
    import h5py

    def write(f):
        with h5py.File(f, "w") as h5:
            for i, raw in zip(ids, images):
                h5.create_dataset(i, data=np.bytes_(raw))
    atomic_write(path, write)


def make_demo(out_dir, n_patients=120, n_test_patients=20, malignant_rate=0.05, trait_rate=0.65, seed=0):
    """The demo set in OUT (see the module docstring); trait_rate: the share of malignant tiles
    with each visual trait (drawn apart: 88% have one or both)."""
    rng = np.random.default_rng(seed)
    train = demo_lesions(rng, n_patients, 1000000, 1000000, malignant_rate)
    test = demo_lesions(rng, n_test_patients, 2000000, 2000000, malignant_rate)
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        ids = [r["isic_id"] for r in rows]
        veil, streaks = ([rng.random() < (trait_rate if r["target"] else 0.03) for r in rows] for _ in range(2))
        write_images(os.path.join(out_dir, f"{name}-image.hdf5"), ids,
                     [demo_tile(rng, r, v, s) for r, v, s in zip(rows, veil, streaks)])
        write_metadata(os.path.join(out_dir, f"{name}-metadata.csv"), rows,
                       TRAIN_COLUMNS if name == "train" else TEST_COLUMNS)
    write_csv(os.path.join(out_dir, "sample_submission.csv"), ["isic_id", "target"],
              [[r["isic_id"] for r in test], ["0.3"] * len(test)])
    write_csv(os.path.join(out_dir, "demo_test_labels.csv"), ["isic_id", "target"],
              [[r["isic_id"] for r in test], [int(r["target"]) for r in test]])
    n_pos = sum(r["target"] for r in train)
    log(f"demo set in {out_dir}: train {len(train)} lesions of {n_patients} patients ({int(n_pos)} malignant), "
        f"test {len(test)} lesions of {n_test_patients} patients")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    # a synthetic set for trying the pipeline: a few thousand patients at most
    parser.add_argument("--patients", type=number(int, 5, 5000), default=120, help="train patients (5 folds)")
    parser.add_argument("--test-patients", type=number(int, 1, 5000), default=20)
    parser.add_argument("--malignant-rate", type=number(float, 0, 0.5, low_open=True), default=0.05)
    parser.add_argument("--seed", type=SEED, default=0)
    args = parser.parse_args(argv)
    make_demo(args.out_dir, args.patients, args.test_patients, args.malignant_rate, seed=args.seed)


if __name__ == "__main__":
    run_main(main)
