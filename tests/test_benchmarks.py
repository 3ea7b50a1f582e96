"""The benchmark scripts still run (on tiny inputs; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_inference_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    _run("inference.py", "--config", "configs/smoke.yaml", "--repeats", "1", "--seed-depth", "18", "--seed-width", "8",
         "--shape", "64", "64", "20", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["case_shape"] == [64, 64, 20]
    assert result["slices"] > 0 and result["flops_per_volume"]["default"] > 0 and result["flops_per_volume"]["seed"] > 0
    assert 0 < result["ratios"]["network_alone_over_end_to_end"] and result["seconds"]["seed_way"][0] > 0
    assert result["peak_rss_gib"]["default_end_to_end"] > 0 and result["matmul_peak_flops_per_s"]["fp32"] > 0


def test_training_and_augment_benchmarks_run(tmp_path: Path) -> None:
    out = tmp_path / "training.json"
    _run("training.py", "--config", "configs/smoke.yaml", "--cases", "4", "--steps", "2", "--rounds", "1", "--out", str(out),
         f"data.cache_dir={tmp_path / 'cache'}", "--compare", "model.decoder=progressive")
    result = json.loads(out.read_text())
    assert result["ratio_data_path_over_in_memory"] > 0 and result["ratio_ema_over_in_memory"] > 0
    assert result["compare"]["overrides"] == ["model.decoder=progressive"] and result["compare"]["ratio_over_in_memory"] > 0
    assert len(result["slices_per_s"]["in_memory_with_ema"]) == 1
    assert result["preprocess_cases_per_s"]["cold"] > 0 and result["preprocess_cases_per_s"]["cached"] > 0
    # The augmentations alone, on the same built-in cases, against the checkout's own HEAD (the
    # same code, so its check that the outputs are equal passes).
    if (REPO / ".git").exists():
        out = tmp_path / "augment.json"
        _run("augment.py", "--config", "configs/smoke.yaml", "--cases", "4", "--batches", "2", "--rounds", "1",
             "--against", "HEAD", "--beside", "data.rerender=1.0", "--out", str(out), f"data.cache_dir={tmp_path / 'cache'}")
        result = json.loads(out.read_text())
        assert result["against"] == "HEAD" and result["ratio_against_over_this"] > 0
        assert len(result["ms_per_batch"]["this"]) == 1 and result["ms_per_batch"]["HEAD"][0] > 0
        assert result["beside"] == ["data.rerender=1.0"] and result["ms_per_batch"]["data.rerender=1.0"][0] > 0


@pytest.mark.slow
def test_scaling_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    before = sorted((REPO / "mlruns").rglob("*"))
    _run("scaling.py", "--config", "configs/smoke.yaml", "--cases", "1", "2", "--procs", "1", "--train-cases", "4",
         "--train-slices", "16", "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["inference"]["seconds"]) == {"1", "2"} and result["training"]["1"]["slices_per_s"] > 0
    assert not (REPO / "mlruns").exists() or before == sorted((REPO / "mlruns").rglob("*"))  # nothing written in the checkout


def test_threshold_benchmark_runs(tmp_path: Path) -> None:
    from tests.conftest import untrained_checkpoint, write_case

    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    for i in range(2):
        write_case(tmp_path / "cases", "brats2021", f"BraTS2021_{i:05d}", seed=i)
    _run("thresholds.py", "--model", str(ckpt), "--cases", str(tmp_path / "cases"), "--grid", "0.3", "0.5", "--out", str(tmp_path))
    result = json.loads((tmp_path / "thresholds.json").read_text())
    assert result["n"] == 2 and result["grid"] == [0.3, 0.5] and result["model_thresholds"] == [0.5, 0.5, 0.5]
    assert all(len(row) == 2 and all(0.0 <= d <= 1.0 for d in row) for row in result["dice"].values())


def test_postprocessing_benchmark_scores_variants_as_infer_labels_them(tmp_path: Path) -> None:
    """Its default variant's Dice is that of ``infer`` + ``evaluate`` on the same model, case by case;
    other variants change only the steps after the network; a network-side override is refused."""
    import shutil

    from brats_psp.config import load_config
    from brats_psp.evaluation import evaluate, evaluate_label
    from brats_psp.segment import segment_cases
    from tests.conftest import untrained_checkpoint, write_case

    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    for i in range(2):
        write_case(tmp_path / "syn", "brats2021", f"BraTS2021_{i:05d}", seed=i)
    case = write_case(tmp_path / "real", "brats2023", "BraTS-GLI-00007-000", seed=5)
    (tmp_path / "real" / "references").mkdir()
    shutil.move(case["paths"]["seg"], tmp_path / "real" / "references" / "BraTS-GLI-00007-000-seg.nii.gz")
    twin = tmp_path / "twin.pt"  # the same weights under another name: the case is prepared once for both
    shutil.copy(ckpt, twin)
    out = tmp_path / "out"
    _run("postprocessing.py", "--model", str(ckpt), "--model", str(twin), "--real", str(tmp_path / "real"), "--synthetic", f"syn={tmp_path / 'syn'}",
         "--variant", "default", "--variant", "strict", "infer.region_thresholds=[0.999,0.999,0.999]",
         "--variant", "grow", "infer.hysteresis=0.5", "--hd95", "--out", str(out))
    result = json.loads((out / "postprocessing.json").read_text())
    scored = result["models"][str(ckpt)]["variants"]
    assert result["models"][str(twin)]["variants"] == scored
    assert set(scored) == {"default", "strict", "grow"} and set(scored["default"]) == {"real:real", "syn"}
    assert set(scored["default"]["real:real"]) == {"BraTS-GLI-00007-000"} and len(scored["default"]["syn"]) == 2
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.spacing=[2.0,2.0,2.0]", "infer.roi_size=[32,32]", "infer.tta=false"]).infer
    segment_cases(str(ckpt), tmp_path / "syn", tmp_path / "pred", cfg, progress=False)
    rows = evaluate(tmp_path / "pred", tmp_path / "syn", out_dir=tmp_path / "eval").rows
    for row in rows:
        k = ("WT", "TC", "ET").index(row["region"])
        assert scored["default"]["syn"][row["case"]][k] == pytest.approx(row["dice"], abs=1e-4), (row, scored["default"]["syn"])
    assert scored["strict"] != scored["default"]  # an untrained model's probabilities are near 0.5: nothing is that sure
    hd = result["models"][str(ckpt)]["hd95"]  # --hd95: the real cases' only, as evaluate scores them
    assert set(hd["default"]) == {"real:real"}
    segment_cases(str(ckpt), tmp_path / "real", tmp_path / "pred_real", cfg, progress=False)
    ref = tmp_path / "real" / "references" / "BraTS-GLI-00007-000-seg.nii.gz"
    for row in evaluate_label("BraTS-GLI-00007-000", ref, "brats2023", tmp_path / "pred_real" / "BraTS-GLI-00007-000.nii.gz"):
        k = ("WT", "TC", "ET").index(row["region"])
        assert hd["default"]["real:real"]["BraTS-GLI-00007-000"][k] == pytest.approx(row["hd95"], abs=0.01)
    md = (out / "postprocessing.md").read_text()
    assert "| default |" in md and "| grow |" in md and "real mean" in md and "HD95 WT / TC / ET (mm)" in md
    proc = subprocess.run([sys.executable, "benchmarks/postprocessing.py", "--model", str(ckpt), "--synthetic", f"syn={tmp_path / 'syn'}",
                           "--variant", "tta", "infer.tta=true", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "infer.tta does not act after the network" in proc.stderr


def test_startup_benchmark_runs(tmp_path: Path) -> None:
    from tests.conftest import untrained_checkpoint, write_case

    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    write_case(tmp_path / "cases", "brats2021", "BraTS2021_00000")
    out = tmp_path / "startup.json"
    against = ["--against", "HEAD"] if (REPO / ".git").exists() else []
    _run("startup.py", "--model", str(ckpt), "--case", str(tmp_path / "cases" / "BraTS2021_00000"), "--rounds", "1", *against, "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["median_seconds"]) >= {"floor", "help", "infer"} and all(v > 0 for v in result["median_seconds"].values())
    assert result["ratios"]["infer_over_floor"] > 0 and len(result["case_seconds"]["infer"]) == 1
    if against:
        assert result["ratios"]["infer_over_infer@HEAD"] > 0 and len(result["seconds"]["infer@HEAD"]) == 1


def test_depth_benchmark_runs(tmp_path: Path) -> None:
    import shutil

    from tests.conftest import write_case

    paths = write_case(tmp_path / "cases", "brats2021", "BraTS2021_00000")["paths"]
    (tmp_path / "pred").mkdir()
    shutil.copy(paths["seg"], tmp_path / "pred" / "BraTS2021_00000.nii.gz")  # a perfect prediction
    proc = subprocess.run([sys.executable, "benchmarks/depth.py", "--pred", str(tmp_path / "pred"), "--cases", str(tmp_path / "cases")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line[:22].strip(): line[22:].split() for line in proc.stdout.splitlines()[1:]}
    assert {float(v) for v in rows["TC sensitivity"] if v != "nan"} == {1.0}
    assert sum(float(v) for v in rows["TC share of voxels"]) == pytest.approx(1.0, abs=0.02)
    # how the tumour looks per band (x white matter; "-" where a band has none of it)
    for name in ("ET on T1ce", "edema on FLAIR"):
        assert len(rows[name]) == len(rows["ET sensitivity"]), rows
        values = [float(v) for v in rows[name] if v != "-"]
        assert values and all(v > 0 for v in values), rows
    # and how heterogeneous the edema is, per case, on T2 and FLAIR
    spread = [line for line in proc.stdout.splitlines() if line.startswith("edema IQR / median on")]
    assert [line.split()[5] for line in spread] == ["t2,", "flair,"], proc.stdout
    assert all(float(line.split()[9].rstrip(",")) >= 0.0 and line.endswith("(1 case(s))") for line in spread), spread


def test_readers_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "readers.json"
    _run("readers.py", "--rounds", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["shape"] == [4, 240, 240, 155] and result["median_ratio_over_shipped"]["nibabel (shipped)"] == 1.0
    assert set(result["seconds"]) == {"nibabel (shipped)", "SimpleITK in the pipeline", "SimpleITK alone"}


def test_real_scan_check_scores_an_ensemble(tmp_path: Path) -> None:
    """``real_scans.py --model A --model B`` segments with both (any folder of cases: here a
    synthetic one with its reference beside it), and names both checkpoints in its results;
    ``--real`` repeated scores the cases of every folder (here a second one, in another layout)."""
    import shutil

    from tests.conftest import untrained_checkpoint, write_case

    case = write_case(tmp_path / "real", "brats2023", "BraTS-GLI-00007-000")
    (tmp_path / "real" / "references").mkdir()
    shutil.move(case["paths"]["seg"], tmp_path / "real" / "references" / "BraTS-GLI-00007-000-seg.nii.gz")
    other = write_case(tmp_path / "real2", "brats2021", "BraTS2021_00008")
    (tmp_path / "real2" / "references").mkdir()
    shutil.move(other["paths"]["seg"], tmp_path / "real2" / "references" / "BraTS2021_00008_seg.nii.gz")
    a, b = untrained_checkpoint(tmp_path / "a.pt"), untrained_checkpoint(tmp_path / "b.pt")
    _run("real_scans.py", "--model", str(a), "--model", str(b), "--real", str(tmp_path / "real"), "--real", str(tmp_path / "real2"),
         "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "real_scans.json").read_text())
    assert result["checkpoint"] == [str(a), str(b)] and result["model"] == [str(a), str(b)]
    assert result["cases"] == ["BraTS-GLI-00007-000", "BraTS2021_00008"]
    assert set(result["scored"]["BraTS-GLI-00007-000"]) == set(result["scored"]["BraTS2021_00008"]) == {"WT", "TC", "ET"}
    assert result["mean"]["WT"]["dice"] == pytest.approx(np.mean([result["scored"][c]["WT"]["dice"] for c in result["cases"]]))
    assert (tmp_path / "out" / "real_scans.png").is_file()
    # the contrast check: the same case with its T1ce replaced by its T1 (links to the files)
    swapped = tmp_path / "out" / "without_contrast" / "0" / "input" / "BraTS-GLI-00007-000" / "BraTS-GLI-00007-000"
    assert Path(f"{swapped}-t1c.nii.gz").resolve() == Path(f"{swapped}-t1n.nii.gz").resolve() == Path(case["paths"]["t1"]).resolve()
    assert Path(f"{swapped}-t2f.nii.gz").resolve() == Path(case["paths"]["flair"]).resolve()
    assert set(result["without_contrast"]) == {"BraTS-GLI-00007-000", "BraTS2021_00008"}
    volumes = result["without_contrast"]["BraTS-GLI-00007-000"]
    assert set(volumes) == {"WT", "TC", "ET"} and all(v >= 0 for v in volumes.values())
    assert set(result["predicted_ml"]["BraTS-GLI-00007-000"]) == {"WT", "TC", "ET"}
    # where the core and the enhancing tumour are missed, by distance from the brain's edge
    depth = result["by_depth"]["BraTS-GLI-00007-000"]
    assert depth["bands"][0] == "0-5 mm" and depth["bands"][-1] == ">= 30 mm"
    for region in ("TC", "ET"):
        assert len(depth[region]["share"]) == len(depth[region]["sensitivity"]) == len(depth["bands"])
        assert sum(depth[region]["share"]) == pytest.approx(1.0)
        assert all(v is None or 0.0 <= v <= 1.0 for v in depth[region]["sensitivity"])
        assert all((v is None) == (share == 0.0) for v, share in zip(depth[region]["sensitivity"], depth[region]["share"]))


def test_enhancement_probe_scales_t1ce_inside_the_reference_enhancing_tumour_only(tmp_path: Path) -> None:
    """``enhancement.py`` writes each case again with its T1ce multiplied inside the reference's
    ET (the rest of T1ce and the other contrasts are the scan's own: links), segments every
    version and scores it per factor; a case without enhancing tumour is skipped, said so."""
    import shutil

    import nibabel as nib

    from benchmarks.enhancement import scale_inside
    from brats_psp.io import save_nifti
    from brats_psp.labels import Tissue, tissue_to_release
    from tests.conftest import untrained_checkpoint, write_case

    case = write_case(tmp_path / "real", "brats2023", "BraTS-GLI-00007-000")
    (tmp_path / "real" / "references").mkdir()
    shutil.move(case["paths"]["seg"], tmp_path / "real" / "references" / "BraTS-GLI-00007-000-seg.nii.gz")
    low = write_case(tmp_path / "real", "brats2023", "BraTS-GLI-00008-000", seed=1)
    tissue = np.asarray(low["tissue"])
    tissue[tissue == Tissue.ET] = Tissue.NCR  # a low-grade glioma: no enhancing tumour
    save_nifti(tmp_path / "real" / "references" / "BraTS-GLI-00008-000-seg.nii.gz", tissue_to_release(tissue, "brats2023"),
               nib.load(low["paths"]["seg"]).affine, dtype=np.uint8)
    Path(low["paths"]["seg"]).unlink()
    model = untrained_checkpoint(tmp_path / "a.pt")
    proc = _run("enhancement.py", "--model", str(model), "--real", str(tmp_path / "real"), "--factors", "1.3", "1",
                "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "enhancement.json").read_text())
    assert result["factors"] == [1.0, 1.3]
    assert list(result["cases"]) == ["BraTS-GLI-00007-000"]
    assert "nothing to scale" in result["skipped"]["BraTS-GLI-00008-000"] and "skipped BraTS-GLI-00008-000" in proc.stdout
    et = case["tissue"] == Tissue.ET
    assert result["cases"]["BraTS-GLI-00007-000"]["et_voxels"] == int(et.sum()) > 0
    for factor in ("1.0", "1.3"):
        scores = result["cases"]["BraTS-GLI-00007-000"][factor]
        assert set(scores) == {"WT", "TC", "ET"}
        assert all(0.0 <= s[k] <= 1.0 for s in scores.values() for k in ("dice", "sensitivity"))
        assert (tmp_path / "out" / "predictions" / "0" / f"x{float(factor):g}" / "BraTS-GLI-00007-000.nii.gz").is_file()
    # the written T1ce: x1.3 inside the reference's ET only, the same header; the others are links
    folder = tmp_path / "out" / "input" / "0" / "x1.3" / "BraTS-GLI-00007-000"
    written = nib.load(folder / "BraTS-GLI-00007-000-t1c.nii.gz")
    original = nib.load(case["paths"]["t1ce"])
    data, before = np.asarray(written.dataobj), np.asarray(original.dataobj)
    assert data.dtype == before.dtype and np.array_equal(written.affine, original.affine)
    assert np.array_equal(data[~et], before[~et])
    assert np.array_equal(data[et], np.rint(before[et] * 1.3).astype(before.dtype))
    assert (folder / "BraTS-GLI-00007-000-t2f.nii.gz").resolve() == Path(case["paths"]["flair"]).resolve()
    assert (tmp_path / "out" / "input" / "0" / "x1" / "BraTS-GLI-00007-000" / "BraTS-GLI-00007-000-t1c.nii.gz").resolve() == Path(
        case["paths"]["t1ce"]).resolve()  # factor 1: the scan as it is
    assert (tmp_path / "out" / "enhancement.png").stat().st_size > 10_000
    # integers are rounded and clipped to their type
    assert scale_inside(np.array([100, 30000], np.int16), np.array([True, True]), 1.5).tolist() == [150, 32767]


def test_brainles_cases_arranges_a_tutorials_checkout(tmp_path: Path) -> None:
    """brainles_cases.py turns the BraTS-Toolkit folders of a BrainLesion/tutorials checkout into
    two BraTS 2021 cases with references that real_scans.py finds; a checkout without them is
    refused with the missing files named, and nothing is written."""
    import nibabel as nib

    from benchmarks.brainles_cases import CASES, TAGS
    from benchmarks.real_scans import find_reference
    from brats_psp.data.discovery import discover_cases

    tutorials = tmp_path / "tutorials"
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for folder in CASES.values():
        base = tutorials / "BraTS-Toolkit" / "data" / folder / f"{folder}_brainles"
        for sub, names in (("raw_bet", [f"{folder}_{t}_bet" for t in TAGS.values()]), ("fusion", ["mav"])):
            (base / sub).mkdir(parents=True)
            for name in names:
                data = np.full((8, 8, 4), 2 if name == "mav" else 100, np.int16)
                nib.save(nib.Nifti1Image(data, affine), str(base / sub / f"{name}.nii.gz"))
    empty = tmp_path / "not_tutorials"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "benchmarks/brainles_cases.py", "--tutorials", str(empty), "--out", str(tmp_path / "x")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "TCGA-DU-7294_fla_bet.nii.gz" in proc.stderr and not (tmp_path / "x").exists()

    out = tmp_path / "real2"
    _run("brainles_cases.py", "--tutorials", str(tutorials), "--out", str(out))
    found = discover_cases(out)
    assert sorted(c.case_id for c in found.cases) == sorted(CASES) and {c.layout for c in found.cases} == {"brats2021"}
    for case in found.cases:
        ref = find_reference(out / "references", case.case_id)
        assert ref is not None and np.asarray(nib.load(str(ref)).dataobj).max() == 2
        assert np.asarray(nib.load(str(case.images[1])).dataobj).max() == 100  # t1ce
    assert not list(out.rglob("*.tmp*"))  # brats_psp.io.atomic_path's temporaries, renamed into place

    # the third case, from a clone of BrainLesion/BraTS (here a repository with the same files)
    from benchmarks.brainles_cases import BRATS_CASE, BRATS_FILES, arrange_brats_case

    repo = tmp_path / "brats"
    for key, rel in BRATS_FILES.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        data = np.zeros((8, 8, 4), np.uint8 if key == "seg" else np.int16)
        data[2:4, 2:4, 1] = 3 if key == "seg" else 100
        data[5, 5, 2] = 2 if key == "seg" else 50
        nib.save(nib.Nifti1Image(data, affine), str(repo / rel))
    with pytest.raises(FileNotFoundError, match="data/preprocessed_case/t1n.nii.gz"):
        arrange_brats_case(repo, out)  # not a git repository yet
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "case"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    assert arrange_brats_case(repo, out, commit="HEAD") == BRATS_CASE
    ref = np.asarray(nib.load(str(find_reference(out / "references", BRATS_CASE))).dataobj)
    assert sorted(np.unique(ref).tolist()) == [0, 2, 4] and (ref == 4).sum() == 4  # 2023's ET (3) as 2021's (4)
    assert BRATS_CASE in [c.case_id for c in discover_cases(out).cases]


def test_tissue_contrasts_measures_a_phantom_of_known_intensities() -> None:
    """Normal tissue in stripes of known T1/T1ce/T2/FLAIR values and a lesion of known values:
    every ratio to white matter comes back as drawn (noise aside)."""
    from benchmarks.tissue_contrasts import case_contrasts
    from brats_psp.labels import Tissue

    rng = np.random.default_rng(0)
    shape = (64, 60, 40)
    values = {  # per contrast: csf, gm, wm, ed, ncr, et (WM brightest on T1, as the k-means assumes)
        "t1": (300, 600, 900, 700, 400, 650), "t1ce": (350, 650, 1000, 750, 420, 1300),
        "t2": (1500, 900, 700, 1300, 1800, 1100), "flair": (200, 800, 700, 1400, 900, 1250),
    }
    stripes = (np.arange(shape[1]) // 4) % 3  # csf, gm, wm along y
    tissue = np.zeros(shape, np.uint8)
    tissue[2:15, 2:-2, 2:-2] = Tissue.ED
    tissue[2:8, 2:20, 2:-2] = Tissue.NCR
    tissue[2:8, 20:30, 2:-2] = Tissue.ET
    image = np.zeros((4, *shape), np.float32)
    for c, m in enumerate(("t1", "t1ce", "t2", "flair")):
        normal = np.broadcast_to(np.array(values[m][:3], np.float32)[stripes][None, :, None], shape)
        vol = np.where(tissue == Tissue.ED, values[m][3], normal)
        vol = np.where(tissue == Tissue.NCR, values[m][4], vol)
        vol = np.where(tissue == Tissue.ET, values[m][5], vol) + rng.normal(0, 10, shape)
        image[c, 2:-2, 2:-2, 2:-2] = vol[2:-2, 2:-2, 2:-2]
    ratios = case_contrasts(image, tissue, (1.0, 1.0, 1.0), margin_mm=10.0, inset_mm=3.0)
    for m, drawn in values.items():
        expected = dict(zip(("csf", "gm", "wm", "ed", "ncr", "et"), np.array(drawn) / drawn[2]))
        assert ratios[m] == pytest.approx(expected, rel=0.03), m
    with pytest.raises(ValueError, match="normal-appearing brain"):  # a tumour filling the brain
        case_contrasts(image, np.where(image[0] > 0, Tissue.ED, 0).astype(np.uint8), (1.0, 1.0, 1.0))


def test_tissue_contrasts_compares_groups_of_cases(tmp_path: Path) -> None:
    """Two groups, references inside the case folders or in ``references/``; an absent folder is
    left out with a message; the JSON holds every case and each group's ranges, and the figure."""
    import shutil

    from tests.conftest import write_case

    write_case(tmp_path / "synthetic", "brats2021", "BraTS2021_00001")
    case = write_case(tmp_path / "real", "brats2023", "BraTS-GLI-00007-000", seed=1)
    (tmp_path / "real" / "references").mkdir()
    shutil.move(case["paths"]["seg"], tmp_path / "real" / "references" / "BraTS-GLI-00007-000-seg.nii.gz")
    write_case(tmp_path / "real", "brats2023", "BraTS-GLI-00008-000", seed=2, with_label=False)  # no reference: skipped
    out = tmp_path / "out"
    proc = _run("tissue_contrasts.py", "--cases", f"real={tmp_path / 'real'}", "--cases", f"synthetic={tmp_path / 'synthetic'}",
                "--cases", f"absent={tmp_path / 'nowhere'}", "--margin-mm", "2", "--inset-mm", "1", "--out", str(out))
    assert "left out" in proc.stdout
    result = json.loads((out / "tissue_contrasts.json").read_text())
    assert [(r["group"], r["case"]) for r in result["cases"]] == [("real", "BraTS-GLI-00007-000"), ("synthetic", "BraTS2021_00001")]
    for row in result["cases"]:  # the toy case: edema bright on FLAIR and T2, enhancement on T1ce
        assert row["ratios"]["t1"]["wm"] == 1.0
        assert row["ratios"]["flair"]["ed"] > 1.2 and row["ratios"]["t2"]["ed"] > 1.2 and row["ratios"]["t1ce"]["et"] > 1.2
    lo, hi = result["ranges"]["real"]["flair"]["ed"]
    assert lo == hi == result["cases"][0]["ratios"]["flair"]["ed"]
    assert (out / "tissue_contrasts.png").stat().st_size > 0 and result["failed"] == []


def test_trials_train_a_patched_variant_and_score_it(tmp_path: Path) -> None:
    """trials.py run: a variant in its own copy of the tree with a patch applied (and the config
    read from the copy), a training per seed, the model scored on a real-style folder and a
    synthetic set; the table has the model's row and the variant's mean. A second run reuses the
    training."""
    import shutil

    import torch

    from tests.conftest import write_case

    data = tmp_path / "data"
    for k in range(4):
        write_case(data, "brats2021", f"BraTS2021_{k:05d}", seed=k)
    case = write_case(tmp_path / "real", "brats2023", "BraTS-GLI-00007-000", seed=7)
    (tmp_path / "real" / "references").mkdir()
    shutil.move(case["paths"]["seg"], tmp_path / "real" / "references" / "BraTS-GLI-00007-000-seg.nii.gz")
    patch = tmp_path / "wide.diff"  # a change to the tree: the smoke config's network made wider
    patch.write_text("--- a/configs/smoke.yaml\n+++ b/configs/smoke.yaml\n@@ -9,3 +9,3 @@ data:\n model:\n-  width: 8\n+  width: 12\n   psp_channels: 32\n")
    out = tmp_path / "trials"
    args = ["run", "--out", str(out), "--seeds", "0", "--config", "configs/smoke.yaml", "--data", str(data),
            "--variant", "wide", "train.epochs=1", "--patch", f"wide={patch}",
            "--real", str(tmp_path / "real"), "--synthetic", f"toy={data}"]
    _run("trials.py", *args)
    result = json.loads((out / "trials.json").read_text())
    (model,) = result["models"]
    assert (model["variant"], model["seed"]) == ("wide", 0) and result["variants"] == {"wide": ["train.epochs=1"]}
    assert "width: 12" in (out / "wide" / "repo" / "configs" / "smoke.yaml").read_text()
    assert "width: 8" in (REPO / "configs" / "smoke.yaml").read_text()
    assert set(model["dice"]) == {"BraTS-GLI-00007-000", "toy"} and all(0.0 <= v <= 1.0 for d in model["dice"].values() for v in d)
    assert model["infer"]["region_thresholds"] == model["thresholds"] and model["infer"]["tta"] is False  # the settings scored with (smoke.yaml: no TTA)
    (best,) = (out / "wide" / "s0").glob("*/checkpoints/best.pt")
    ckpt = torch.load(best, weights_only=True, map_location="cpu")
    assert ckpt["config"]["model"]["width"] == 12 and ckpt["config"]["train"]["epochs"] == 1
    assert model["run"] == best.parents[1].name
    md = (out / "trials.md").read_text().splitlines()
    assert md[2].startswith(f"| wide, seed 0 ({model['run'][:8]}) | ") and md[3].startswith("| **wide: mean of 1** |") and len(md) == 4
    _run("trials.py", *args)  # the training is there: scored again, not trained again
    assert [m["run"] for m in json.loads((out / "trials.json").read_text())["models"]] == [model["run"]]


def test_trials_name_postprocessing_a_model_carries_from_an_older_default() -> None:
    """A model trained before a postprocessing default changed carries the old value; trials.py
    names it (it scores with it unless overridden), and not the calibrated thresholds."""
    import dataclasses

    from benchmarks.trials import stale_postprocessing
    from brats_psp.config import InferConfig

    today = InferConfig()
    assert stale_postprocessing(dataclasses.replace(today, region_thresholds=[0.2, 0.3, 0.4])) == []
    old = dataclasses.replace(today, min_component_fraction=today.min_component_fraction / 2, rim_hull=not today.rim_hull, tta=not today.tta)
    assert stale_postprocessing(old) == [
        ("min_component_fraction", today.min_component_fraction / 2, today.min_component_fraction),
        ("rim_hull", not today.rim_hull, today.rim_hull),
    ]  # tta acts on the network's pass: a setting of the score, not a postprocessing default
    assert stale_postprocessing(old, ["infer.rim_hull=false"]) == [("min_component_fraction", today.min_component_fraction / 2, today.min_component_fraction)]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the failing training asks for a GPU that is absent")
def test_trials_stop_the_other_trainings_when_one_fails(tmp_path: Path) -> None:
    """A bad override is refused before anything trains, naming the variant and the key; a
    training that fails (one asks for CUDA on a machine without it) ends the run with its name and
    log, and the training beside it is stopped, not left running."""
    from tests.conftest import write_case

    data = tmp_path / "data"
    for k in range(4):
        write_case(data, "brats2021", f"BraTS2021_{k:05d}", seed=k)

    def trials(out: Path, *variants: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "benchmarks/trials.py", "run", "--out", str(out), "--seeds", "0", "--config", "configs/smoke.yaml",
             "--data", str(data), *variants, "--parallel", "2"], cwd=REPO, capture_output=True, text=True, timeout=600,
        )

    proc = trials(tmp_path / "refused", "--variant", "typo", "train.no_such_key=1")
    assert proc.returncode != 0 and "typo: building the training cache failed" in proc.stderr and "no_such_key" in proc.stderr
    assert not (tmp_path / "refused" / "typo" / "s0").exists()
    out = tmp_path / "trials"
    proc = trials(out, "--variant", "long", "train.epochs=50", "--variant", "bad", "train.device=cuda")
    assert proc.returncode != 0 and "bad seed 0: training failed" in proc.stderr
    assert "train-s0.log" in proc.stderr and "CUDA" in (out / "bad" / "train-s0.log").read_text()
    alive = subprocess.run(["pgrep", "-f", f"train.output_dir={out / 'long' / 's0'}"], capture_output=True, text=True)
    assert alive.stdout.strip() == "", "the other training was left running"
