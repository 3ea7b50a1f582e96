"""The infer stage: outputs in the input's geometry for every layout, label conventions, options, failures."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_psp.checkpoint import save_checkpoint
from brats_psp.config import ConfigError, config_to_dict, load_config
from brats_psp.data.discovery import discover_cases
from brats_psp.data.transforms import preprocessing_params
from brats_psp.labels import RELEASES, Tissue
from brats_psp.networks import build_network
from brats_psp.segment import fill_core, fill_rim_hull, postprocess, segment_cases
from tests.conftest import CASE_IDS, REPO, write_case


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained smoke-sized model: enough to check geometry and plumbing."""
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.spacing=[2.0,2.0,2.0]", "infer.roi_size=[32,32]"])
    torch.manual_seed(0)
    model = build_network(cfg.model, cfg.data.in_channels)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(
        path,
        {"model": model.state_dict(), "config": config_to_dict(cfg), "preprocessing": preprocessing_params(cfg.data.spacing), "run_id": None},
    )
    return path


def test_output_geometry_equals_the_input_for_every_layout(layout_dataset: tuple[str, Path], checkpoint: Path, tmp_path: Path) -> None:
    layout, root = layout_dataset
    result = segment_cases(str(checkpoint), root, tmp_path / "out", progress=False)
    assert not result.failures and sorted(result.written) == CASE_IDS[layout]
    for case in discover_cases(root).cases:
        ref = nib.load(str(case.images[0]))
        out = nib.load(str(tmp_path / "out" / f"{case.case_id}.nii.gz"))
        assert out.shape == ref.shape[:3] and out.get_data_dtype() == np.uint8
        np.testing.assert_allclose(out.affine, ref.affine)
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
        assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= set(RELEASES[layout].values)
    info = json.loads((tmp_path / "out" / "inference.json").read_text())
    assert set(info["seconds_per_case"]) == set(CASE_IDS[layout])


def test_non_standard_affine_and_shape(checkpoint: Path, tmp_path: Path) -> None:
    affine = np.array([[0, 1.2, 0, -40], [0, 0, 0.9, -30], [1.5, 0, 0, 5], [0, 0, 0, 1]])
    write_case(tmp_path / "in", "brats2023", "BraTS-GLI-00042-000", shape=(37, 45, 29), affine=affine)
    result = segment_cases(str(checkpoint), tmp_path / "in", tmp_path / "out", progress=False)
    out = nib.load(str(result.written["BraTS-GLI-00042-000"]))
    assert out.shape == (37, 45, 29)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)


def test_options_tta_probabilities_and_label_convention(checkpoint: Path, tmp_path: Path) -> None:
    write_case(tmp_path / "in", "brats2021", "BraTS2021_00000")
    cfg = load_config(None, ["infer.tta=true", "infer.save_probabilities=true", "infer.labels=msd", "infer.roi_size=[32,32]"]).infer
    result = segment_cases(str(checkpoint), tmp_path / "in", tmp_path / "out", cfg, progress=False)
    labels = np.asarray(nib.load(str(result.written["BraTS2021_00000"])).dataobj)
    assert set(np.unique(labels).tolist()) <= set(RELEASES["msd"].values)
    probs = nib.load(str(tmp_path / "out" / "BraTS2021_00000_probabilities.nii.gz"))
    assert probs.shape == (40, 44, 24, 3)
    p = np.asarray(probs.dataobj)
    assert p.min() >= 0 and p.max() <= 1


def test_one_bad_case_is_reported_and_the_others_run(checkpoint: Path, tmp_path: Path) -> None:
    for i in range(3):
        write_case(tmp_path / "in", "brats2021", f"BraTS2021_{i:05d}", seed=i)
    bad = tmp_path / "in" / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz"
    bad.write_bytes(bad.read_bytes()[:64])
    result = segment_cases(str(checkpoint), tmp_path / "in", tmp_path / "out", progress=False)
    assert sorted(result.written) == ["BraTS2021_00000", "BraTS2021_00002"]
    assert [f.case_id for f in result.failures] == ["BraTS2021_00001"] and "flair" in str(result.failures[0])
    assert not (tmp_path / "out" / "BraTS2021_00001.nii.gz").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_postprocess_small_et_and_small_components() -> None:
    t = np.zeros((20, 20, 20), np.uint8)
    t[2:8, 2:8, 2:8] = Tissue.ED
    t[4:6, 4:6, 4:6] = Tissue.ET  # 8 voxels of ET
    t[15, 15, 15] = Tissue.ED  # an isolated voxel
    cfg = load_config(None, ["infer.small_et_voxels=10", "infer.min_component_voxels=5"]).infer
    out = postprocess(t.copy(), cfg)
    assert not (out == Tissue.ET).any() and (out == Tissue.NCR).sum() == 8
    assert out[15, 15, 15] == 0 and (out == Tissue.ED).sum() == (t == Tissue.ED).sum() - 1
    keep = load_config(None, ["infer.small_et_voxels=5"]).infer
    assert (postprocess(t.copy(), keep) == Tissue.ET).sum() == 8


def test_onnx_export_matches_pytorch(checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    from brats_psp.export import check_onnx, export_onnx

    path = export_onnx(str(checkpoint), tmp_path / "model.onnx", tile=(48, 40))
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [4, 48, 40] and dims[0].dim_param  # dynamic batch, fixed tile
    assert check_onnx(str(checkpoint), path, batch=3) < 1e-4
    assert not list(tmp_path.glob(".model.onnx*"))


@pytest.mark.parametrize("planes", [["axial"], ["axial", "coronal", "sagittal"]])
@pytest.mark.parametrize("tta", [False, True])
def test_predict_volume_shapes_with_tta_and_planes(checkpoint: Path, planes: list[str], tta: bool) -> None:
    from brats_psp.inference import predict_volume
    from brats_psp.runtime import setup_runtime
    from brats_psp.checkpoint import load_model

    loaded = load_model(str(checkpoint))
    cfg = load_config(None, [f"infer.planes={planes}".replace("'", ""), f"infer.tta={str(tta).lower()}", "infer.roi_size=[32,32]"]).infer
    image = torch.randn(4, 23, 30, 17)
    probs = predict_volume(loaded.network, image, cfg, setup_runtime("cpu", "fp32"))
    assert probs.shape == (3, 23, 30, 17) and float(probs.min()) >= 0 and float(probs.max()) <= 1


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_multiscale_testing_averages_zoomed_passes(checkpoint: Path, plane: str) -> None:
    """``infer.scales``: each zoom factor is a pass at that in-plane size, brought back to the
    volume's grid and averaged with the others; a factor of 1 alone is plain inference."""
    from brats_psp.checkpoint import load_model
    from brats_psp.inference import predict_volume, zoom_in_plane
    from brats_psp.runtime import setup_runtime

    loaded = load_model(str(checkpoint))
    runtime = setup_runtime("cpu", "fp32")
    image = torch.randn(4, 23, 30, 17)
    base = [f"infer.planes=[{plane}]", "infer.tta=false", "infer.roi_size=[32,32]"]
    plain = predict_volume(loaded.network, image, load_config(None, base).infer, runtime)
    one = predict_volume(loaded.network, image, load_config(None, [*base, "infer.scales=[1.0]"]).infer, runtime)
    torch.testing.assert_close(one, plain)
    zoomed = predict_volume(loaded.network, image, load_config(None, [*base, "infer.scales=[1.25]"]).infer, runtime)
    both = predict_volume(loaded.network, image, load_config(None, [*base, "infer.scales=[1.0,1.25]"]).infer, runtime)
    assert zoomed.shape == (3, 23, 30, 17) and not torch.allclose(zoomed, plain)
    torch.testing.assert_close(both, (plain + zoomed) / 2)
    # the helper keeps the slice axis and returns to the grid it is given
    axis = {"axial": 2, "coronal": 1}[plane]
    up = zoom_in_plane(image[None], axis, 1.25)
    assert up.shape[axis + 2] == image.shape[axis + 1] and up.shape[2:] != image.shape[1:]
    assert zoom_in_plane(up, axis, size=image.shape[1:]).shape == (1, *image.shape)
    with pytest.raises(ValueError, match="keeps the"):
        zoom_in_plane(image[None], axis, size=[5, 5, 5])


def test_multiscale_factors_are_validated() -> None:
    with pytest.raises(ValueError, match="infer.scales"):
        load_config(None, ["infer.scales=[]"])
    with pytest.raises(ValueError, match="infer.scales"):
        load_config(None, ["infer.scales=[0.0]"])


def test_context_along_any_axis() -> None:
    from brats_psp.inference import add_context

    image = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    for axis in range(3):
        out = add_context(image, 1, axis)
        assert out.shape == (6, 3, 4, 5)
        torch.testing.assert_close(out[2:4], image)  # the centre slice sits in the middle channels
        first = [slice(None)] * 4
        first[axis + 1] = 0
        torch.testing.assert_close(out[0:2][tuple(first)], image[tuple(first)])  # edge repeated


class _OutOfMemoryAbove(torch.nn.Module):
    """Fault injection: the wrapped network raises PyTorch's out-of-memory error on batches above ``limit``."""

    def __init__(self, net: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.net, self.limit, self.batches = net, limit, []

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected for {x.shape[0]} slices)")
        return self.net(x)


def test_out_of_memory_falls_back_to_smaller_batches(checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    from brats_psp.inference import predict_volume
    from brats_psp.runtime import setup_runtime
    from brats_psp.checkpoint import load_model

    net = load_model(str(checkpoint)).network
    image = torch.randn(4, 30, 30, 20)
    runtime = setup_runtime("cpu", "fp32")
    small = load_config(None, ["infer.roi_size=[32,32]", "infer.batch_size=5"]).infer
    expected = predict_volume(net, image, small, runtime)
    flaky = _OutOfMemoryAbove(net, limit=5)
    big = load_config(None, ["infer.roi_size=[32,32]", "infer.batch_size=20"]).infer
    with caplog.at_level("WARNING", logger="brats_psp.inference"):
        got = predict_volume(flaky, image, big, runtime)
    torch.testing.assert_close(got, expected)
    assert flaky.batches[:2] == [20, 10] and max(flaky.batches[2:]) == 5  # 20 -> 10 -> 5 slices per batch
    assert "out of memory at inference" in caplog.text and "retrying with 5 slices per batch" in caplog.text


def test_other_errors_at_inference_are_not_retried() -> None:
    from brats_psp.inference import predict_volume
    from brats_psp.runtime import setup_runtime

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    cfg = load_config(None, ["infer.roi_size=[32,32]"]).infer
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        predict_volume(Broken(), torch.randn(4, 30, 30, 6), cfg, setup_runtime("cpu", "fp32"))


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_whole_slice_batches_equal_monai_slice_inferer(checkpoint: Path, plane: str) -> None:
    """The direct path for slices that fit in one window gives what SliceInferer gives."""
    from brats_psp.inference import PLANE_AXES, RegionProbabilities, _predict_plane, _slice_inferer
    from brats_psp.checkpoint import load_model

    net = RegionProbabilities(load_model(str(checkpoint)).network, "sigmoid").eval()
    cfg = load_config(None, ["infer.roi_size=[32,32]", "infer.batch_size=7"]).infer
    x = torch.randn(1, 4, 23, 30, 17)
    axis = PLANE_AXES[plane]
    with torch.inference_mode():
        direct = _predict_plane(x, net, cfg, axis, cfg.batch_size)
        monai = _slice_inferer(cfg, axis, cfg.batch_size)(x, net).float()
    assert direct.shape == monai.shape == (1, 3, 23, 30, 17)
    torch.testing.assert_close(direct, monai, atol=1e-5, rtol=1e-4)


def test_slices_larger_than_the_window_slide_with_monai(checkpoint: Path) -> None:
    from brats_psp.inference import predict_volume
    from brats_psp.runtime import setup_runtime
    from brats_psp.checkpoint import load_model

    cfg = load_config(None, ["infer.roi_size=[16,16]", "infer.overlap=0.5"]).infer
    probs = predict_volume(load_model(str(checkpoint)).network, torch.randn(4, 40, 35, 5), cfg, setup_runtime("cpu", "fp32"))
    assert probs.shape == (3, 40, 35, 5) and 0 <= float(probs.min()) and float(probs.max()) <= 1


def _smooth_probabilities(shape: tuple[int, ...], seed: int, edge: bool) -> torch.Tensor:
    """3 × shape probabilities with a few blobs above 0.5 (one at the volume's edge if ``edge``)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(3, *shape)), sigma=(0, 3, 3, 3))
    probs = 1 / (1 + np.exp(-(field / field.std() - 1.5) * 3))
    if edge:
        probs[:, :4, :, :3] = 0.9
    return torch.from_numpy(probs.astype(np.float32))


@pytest.mark.parametrize(
    "affine, spacing, edge",
    [
        (None, [1.5, 1.5, 1.5], False),
        (None, [1.5, 1.5, 1.5], True),
        (np.diag([1.2, 0.9, 2.5, 1.0]), [2.0, 1.0, 1.5], True),  # anisotropic, RAS on disk
        (np.array([[0, 0, 1.0, 5], [-1.0, 0, 0, 3], [0, -1.1, 0, 7], [0, 0, 0, 1]]), [1.0, 1.5, 1.3], False),  # permuted axes
    ],
)
def test_labels_from_the_tumour_box_equal_the_whole_inverse(tmp_path: Path, affine: np.ndarray | None, spacing: list[float], edge: bool) -> None:
    """Resampling only the box around the tumour gives the labels of inverting every voxel."""
    from brats_psp.data.transforms import apply_transforms, volume_transforms
    from brats_psp.inference import probabilities_to_tissue
    from brats_psp.segment import probabilities_on_input_grid, tissue_on_input_grid

    kwargs = {} if affine is None else {"affine": affine}
    write_case(tmp_path / "raw", "brats2021", "BraTS2021_00000", shape=(44, 40, 30), **kwargs)
    case = discover_cases(tmp_path / "raw").cases[0]
    chain = volume_transforms(spacing, with_label=False)
    image = apply_transforms(chain, {"case": case})["image"]
    for seed in range(3):
        probs = _smooth_probabilities(tuple(image.shape[1:]), seed, edge)
        whole = probabilities_to_tissue(probabilities_on_input_grid(probs, image, chain), 0.5)
        box = tissue_on_input_grid(probs, image, chain, 0.5)
        assert box.shape == whole.shape == (44, 40, 30) and box.dtype == np.uint8
        assert (whole > 0).sum() > 50
        np.testing.assert_array_equal(box, whole)
        # with hysteresis, the box is that of the low threshold: still the whole inverse's labels
        grown = probabilities_to_tissue(probabilities_on_input_grid(probs, image, chain), 0.5, 0.25)
        np.testing.assert_array_equal(tissue_on_input_grid(probs, image, chain, 0.5, 0.25), grown)
        assert ((grown > 0) & (whole == 0)).any() and (grown[whole > 0] > 0).all()
    empty = tissue_on_input_grid(torch.zeros(3, *image.shape[1:]), image, chain, 0.5)
    assert empty.shape == (44, 40, 30) and not empty.any()
    full = tissue_on_input_grid(torch.ones(3, *image.shape[1:]), image, chain, 0.5)
    np.testing.assert_array_equal(full, probabilities_to_tissue(probabilities_on_input_grid(torch.ones(3, *image.shape[1:]), image, chain), 0.5))


def test_postprocess_min_component_fraction_keeps_large_foci() -> None:
    t = np.zeros((30, 30, 30), np.uint8)
    t[2:12, 2:12, 2:12] = Tissue.ED  # 1000 voxels: the main lesion
    t[5:8, 5:8, 5:8] = Tissue.ET
    t[20:26, 20:26, 20:26] = Tissue.NCR  # 216 voxels: a second focus (21.6 % of the largest)
    t[28, 2, 2] = Tissue.ET  # a stray voxel
    frac = load_config(None, ["infer.min_component_fraction=0.1", "infer.small_et_voxels=0"]).infer
    out = postprocess(t.copy(), frac)
    assert out[28, 2, 2] == 0
    np.testing.assert_array_equal(out[:27], t[:27])  # both foci kept whole
    strict = load_config(None, ["infer.min_component_fraction=0.5", "infer.small_et_voxels=0"]).infer
    out = postprocess(t.copy(), strict)
    assert (out[20:26, 20:26, 20:26] == 0).all() and (out[2:12, 2:12, 2:12] == t[2:12, 2:12, 2:12]).all()


def test_postprocess_default_drops_pieces_under_a_fifth_of_the_largest() -> None:
    """The default fraction (0.2): a far piece of 15 % goes (the false edema pieces the default
    models drew in a real low-grade glioma and in synthetic cases, README), one of 25 % stays."""
    t = np.zeros((40, 40, 40), np.uint8)
    t[2:12, 2:12, 2:12] = Tissue.ED  # 1000 voxels: the main lesion
    t[20:25, 20:25, 20:26] = Tissue.ED  # 150 voxels: 15 % of it
    t[30:35, 30:35, 30:40] = Tissue.ED  # 250 voxels: 25 %
    infer = load_config(None, []).infer
    assert infer.min_component_fraction == 0.2
    out = postprocess(t.copy(), infer)
    assert not out[20:25, 20:25, 20:26].any()
    np.testing.assert_array_equal(out[2:12, 2:12, 2:12], t[2:12, 2:12, 2:12])
    np.testing.assert_array_equal(out[30:35, 30:35, 30:40], t[30:35, 30:35, 30:40])


def test_postprocess_core_component_fraction_turns_stray_cores_into_edema() -> None:
    t = np.zeros((30, 30, 30), np.uint8)
    t[2:20, 2:20, 2:20] = Tissue.ED
    t[5:10, 5:10, 5:10] = Tissue.NCR  # the core, 125 voxels, with its enhancing wall
    t[5:10, 5:10, 5] = Tissue.ET
    t[15:17, 15:17, 15:17] = Tissue.ET  # a stray enhancing spot in the edema: 8 voxels (6.4 %)
    t[2:4, 16:19, 3:5] = Tissue.NCR  # a stray core at the edema's edge: 12 voxels (9.6 %)
    base = ["infer.small_et_voxels=0", "infer.fill_core=false", "infer.rim_hull=false"]
    np.testing.assert_array_equal(postprocess(t.copy(), load_config(None, [*base, "infer.core_component_fraction=0"]).infer), t)  # 0: off
    out = postprocess(t.copy(), load_config(None, [*base, "infer.core_component_fraction=0.08"]).infer)
    assert (out[15:17, 15:17, 15:17] == Tissue.ED).all() and (out[2:4, 16:19, 3:5] == Tissue.NCR).all()
    out = postprocess(t.copy(), load_config(None, [*base, "infer.core_component_fraction=0.2"]).infer)
    assert (out[15:17, 15:17, 15:17] == Tissue.ED).all() and (out[2:4, 16:19, 3:5] == Tissue.ED).all()
    np.testing.assert_array_equal(out[5:10, 5:10, 5:10], t[5:10, 5:10, 5:10])  # the main core stays whole
    assert ((out > 0) == (t > 0)).all()  # the whole tumour is unchanged
    default = postprocess(t.copy(), load_config(None, base).infer)  # the default, 0.1: the enhancing spot goes, the 9.6 % core too
    assert load_config(None, []).infer.core_component_fraction == 0.1 and (default[15:17, 15:17, 15:17] == Tissue.ED).all()
    assert (default[2:4, 16:19, 3:5] == Tissue.ED).all()


def test_core_neck_mm_splits_a_core_part_joined_by_a_thin_neck() -> None:
    """A small core joined to the main one by a bar 2 voxels wide is one 26-connected component
    (the fraction rule keeps it); with ``core_neck_mm`` 2 the opening cuts the bar and the small
    core becomes edema; the bar (thinner than the ball) and the main core stay."""
    from brats_psp.segment import necked_components

    t = np.zeros((40, 30, 30), np.uint8)
    t[2:38, 2:28, 2:28] = Tissue.ED
    t[4:18, 8:22, 8:22] = Tissue.NCR  # the main core: 14^3 = 2744 voxels
    t[26:32, 12:18, 12:18] = Tissue.NCR  # a small core, 216 voxels (7.9 %)
    t[18:26, 14:16, 14:16] = Tissue.ET  # the neck between them, 2 x 2 voxels
    base = ["infer.small_et_voxels=0", "infer.fill_core=false", "infer.rim_hull=false", "infer.core_component_fraction=0.1"]
    np.testing.assert_array_equal(postprocess(t.copy(), load_config(None, base).infer), t)  # 0 (the default): one component, kept
    out = postprocess(t.copy(), load_config(None, [*base, "infer.core_neck_mm=2"]).infer)
    assert (out[26:32, 12:18, 12:18] == Tissue.ED).all()
    np.testing.assert_array_equal(out[4:25], t[4:25])  # the main core and the neck unchanged (bar its last voxel, within the ball of the cut part)
    assert ((out > 0) == (t > 0)).all()  # the whole tumour unchanged
    core = (t == Tissue.NCR) | (t == Tissue.ET)
    assert necked_components(core, 1.5, 0.1).any()  # 1 mm voxels: the 2 mm neck is narrower than a 3 mm ball
    assert not necked_components(core, 1.5, 0.1, (2.0, 2.0, 2.0)).any()  # 2 mm voxels: the neck is 4 mm wide, the ball's 3 mm do not cut it
    assert necked_components(core, 2, 0.1, (1.0, 1.0, 1.0)).sum() < 216  # the opening rounds the small core's corners off (the 26-connected rule then takes them)
    assert not necked_components(core, 8, 0.1).any()  # nothing survives the erosion: nothing is judged
    with pytest.raises(ConfigError, match="core_neck_mm"):
        load_config(None, ["infer.core_neck_mm=-1"])


def test_postprocess_removes_the_components_a_whole_volume_labelling_removes() -> None:
    """Components are labelled inside the tumour's box only: the same voxels go as labelling the
    whole volume removes, on random multifocal maps that touch the volume's faces."""
    from scipy import ndimage

    from brats_psp.segment import foreground_box

    rng = np.random.default_rng(0)
    cfg = load_config(None, ["infer.min_component_fraction=0.2", "infer.min_component_voxels=5", "infer.small_et_voxels=0",
                             "infer.core_component_fraction=0", "infer.fill_core=false", "infer.rim_hull=false"]).infer
    for _ in range(5):
        t = (ndimage.gaussian_filter(rng.random((40, 36, 30)), 1.5) > 0.56).astype(np.uint8) * rng.integers(1, 4, (40, 36, 30)).astype(np.uint8)
        labelled, _ = ndimage.label(t > 0, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(labelled.ravel())
        sizes[0] = 0
        small = np.flatnonzero(sizes < max(5, 0.2 * sizes.max()))
        expected = np.where(np.isin(labelled, small[small > 0]), 0, t)
        assert (expected != t).any() and (expected > 0).any()
        np.testing.assert_array_equal(postprocess(t.copy(), cfg), expected)
    assert foreground_box(np.zeros((4, 4, 4), bool)) is None
    m = np.zeros((5, 6, 7), bool)
    m[1, 2, 3] = m[3, 4, 3] = True
    assert foreground_box(m) == (slice(1, 4), slice(2, 5), slice(3, 4))


def test_convex_hull_fills_the_pixels_qhull_finds() -> None:
    """segment._convex_hull (monotone chain) against scipy.spatial.ConvexHull's facets, on random
    blobs, thin lines and single pixels."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    from brats_psp.segment import _convex_hull

    def qhull(mask: np.ndarray) -> np.ndarray:
        try:
            hull = ConvexHull(np.argwhere(mask))
        except QhullError:  # collinear: the mask itself
            return mask
        grid = np.indices(mask.shape).reshape(2, -1).T.astype(np.float64)
        return mask | (grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-9).all(axis=1).reshape(mask.shape)

    rng = np.random.default_rng(0)
    for i in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 40, 2))
        mask = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 3)) > rng.uniform(0.4, 0.6)
        if i % 10 == 0:
            mask = np.zeros(shape, bool)
            mask[rng.integers(shape[0]), : rng.integers(1, shape[1] + 1)] = True
        if not mask.any():  # fill_rim_hull hulls components: never empty
            continue
        np.testing.assert_array_equal(_convex_hull(mask), qhull(mask), err_msg=f"mask {i}")
    ring = np.zeros((9, 9), bool)
    ring[1, 2:7] = ring[7, 2:7] = ring[2:7, 1] = True  # an open ring: the hull closes it
    assert _convex_hull(ring)[4, 4] and not _convex_hull(ring)[0, 0]


def _ring_case() -> np.ndarray:
    """Edema around a ring of enhancing tumour (a tube along z) whose inside looks like edema."""
    t = np.zeros((30, 30, 12), np.uint8)
    t[4:26, 4:26, 2:10] = Tissue.ED
    yy, xx = np.mgrid[:30, :30]
    r = np.hypot(yy - 15, xx - 15)
    t[(r >= 5) & (r < 7)] = Tissue.ET  # the rim, in every z
    t[:, :, :2] = t[:, :, 10:] = 0
    return t


def test_fill_core_makes_what_the_rim_encloses_necrosis() -> None:
    t = _ring_case()
    inside = (np.hypot(*(np.mgrid[:30, :30] - 15)) < 5)[..., None] & (t == Tissue.ED)
    out = fill_core(t.copy())
    assert (out[inside] == Tissue.NCR).all()
    np.testing.assert_array_equal(out[~inside], t[~inside])  # rim, outer edema, background kept
    # a gap of one voxel in the rim is bridged; background inside the rim stays background
    gapped = t.copy()
    gapped[15, 20:23, :] = Tissue.ED
    gapped[14:17, 14:17, 4] = 0
    out = fill_core(gapped.copy())
    assert (out[15, 13, 2:10] == Tissue.NCR).all() and (out[14:17, 14:17, 4] == 0).all()
    # an open rim (a quarter missing) encloses nothing: left as it is
    open_rim = t.copy()
    open_rim[15:, 15:, :][open_rim[15:, 15:, :] == Tissue.ET] = Tissue.ED
    np.testing.assert_array_equal(fill_core(open_rim.copy()), open_rim)
    empty = np.zeros((5, 5, 5), np.uint8)
    assert not fill_core(empty).any()


def test_rim_hull_fills_an_open_rim_but_does_not_bridge_two_foci() -> None:
    t = _ring_case()
    disc = (np.hypot(*(np.mgrid[:30, :30] - 15)) < 5)[..., None] & (t == Tissue.ED)
    # a rim open over a quarter (where it meets the brain's surface, say): its inside becomes core
    open_rim = t.copy()
    open_rim[15:, 15:, :][open_rim[15:, 15:, :] == Tissue.ET] = Tissue.ED
    out = fill_rim_hull(open_rim.copy())
    assert (out[:15, :15][disc[:15, :15]] == Tissue.NCR).all()  # the closed three quarters' inside
    assert out[16, 16, 5] == Tissue.NCR and out[18, 18, 5] == Tissue.ED  # the open quarter: up to the chord between the rim's ends
    assert (out[0:3, :, 2:10] == open_rim[0:3, :, 2:10]).all()  # outside the hull: kept
    assert set(np.unique(out[out != open_rim])) == {Tissue.NCR} and (open_rim[out != open_rim] == Tissue.ED).all()
    # two separate enhancing foci in the same slices: the edema between them is not bridged
    foci = np.full((40, 20, 6), Tissue.ED, np.uint8)
    foci[2:10, 5:15, :] = Tissue.ET
    foci[30:38, 5:15, :] = Tissue.ET
    np.testing.assert_array_equal(fill_rim_hull(foci.copy()), foci)
    # a component under the size limit is not hulled; nothing enhancing, nothing changes
    tiny = np.full((12, 12, 3), Tissue.ED, np.uint8)
    tiny[5, 3:8, 1] = tiny[3:8, 5, 1] = Tissue.ET  # a cross of 9 pixels
    np.testing.assert_array_equal(fill_rim_hull(tiny.copy()), tiny)
    assert (fill_rim_hull(tiny.copy(), min_pixels=5)[4, 4, 1]) == Tissue.NCR
    assert not fill_rim_hull(np.zeros((5, 5, 5), np.uint8)).any()


def test_postprocess_hulls_the_rim_by_default() -> None:
    t = _ring_case()
    t[15:, 15:, :][t[15:, 15:, :] == Tissue.ET] = Tissue.ED  # open
    hulled = load_config(None, ["infer.small_et_voxels=0"]).infer
    assert hulled.rim_hull
    np.testing.assert_array_equal(postprocess(t.copy(), hulled), fill_rim_hull(fill_core(t.copy())))
    assert (postprocess(t.copy(), hulled) != fill_core(t.copy())).any()
    off = load_config(None, ["infer.small_et_voxels=0", "infer.rim_hull=false"]).infer
    np.testing.assert_array_equal(postprocess(t.copy(), off), fill_core(t.copy()))


def test_postprocess_fills_the_core_by_default() -> None:
    t = _ring_case()
    off = load_config(None, ["infer.small_et_voxels=0", "infer.fill_core=false", "infer.rim_hull=false"]).infer
    np.testing.assert_array_equal(postprocess(t.copy(), off), t)
    on = load_config(None, ["infer.small_et_voxels=0"]).infer
    np.testing.assert_array_equal(postprocess(t.copy(), on), fill_core(t.copy()))
    assert (postprocess(t.copy(), on) == Tissue.NCR).sum() > 0


def test_infer_with_worker_processes_writes_the_same_labels_in_the_same_order(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``workers=2``: reading and preprocessing in spawned processes, writing in a thread; the same
    files, voxel for voxel, the same order of the log and of inference.json, and a bad case
    (an all-zero contrast, found on reading in a worker) stops only itself."""
    from brats_psp.io import save_nifti
    from tests.conftest import BRATS_AFFINE

    raw = tmp_path / "raw"
    for i in range(5):
        write_case(raw, "brats2021", f"BraTS2021_{i:05d}", shape=(40, 44, 24), seed=i)
    bad = raw / "BraTS2021_00002" / "BraTS2021_00002_t1.nii.gz"
    save_nifti(bad, np.zeros((40, 44, 24), np.int16), BRATS_AFFINE)
    runs = {}
    for workers in (0, 2):
        caplog.clear()
        with caplog.at_level("INFO", logger="brats_psp.segment"):
            runs[workers] = segment_cases(str(checkpoint), raw, tmp_path / f"w{workers}", progress=False, workers=workers)
        runs[workers].log = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "brats_psp.segment" and "BraTS2021_" in r.getMessage()]
    serial, parallel = runs[0], runs[2]
    assert list(parallel.written) == list(serial.written) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00003", "BraTS2021_00004"]
    assert [f.case_id for f in parallel.failures] == [f.case_id for f in serial.failures] == ["BraTS2021_00002"]
    assert "all zero" in str(parallel.failures[0]) and "BraTS2021_00002_t1.nii.gz" in str(parallel.failures[0])
    assert parallel.log == serial.log  # the log names the cases in the same order
    for case_id, path in serial.written.items():
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(parallel.written[case_id]).dataobj))
    info = [json.loads((tmp_path / f"w{w}" / "inference.json").read_text()) for w in (0, 2)]
    assert list(info[0]["seconds_per_case"]) == list(info[1]["seconds_per_case"]) and info[0]["failed"] == info[1]["failed"]


def test_per_region_thresholds() -> None:
    from brats_psp.inference import above_threshold, probabilities_to_tissue

    probs = np.zeros((3, 4, 1, 1), np.float32)
    probs[:, 0, 0, 0] = [0.45, 0.0, 0.0]  # WT only, between the thresholds 0.4 and 0.5
    probs[:, 1, 0, 0] = [0.9, 0.35, 0.0]  # TC at 0.35
    probs[:, 2, 0, 0] = [0.9, 0.9, 0.3]  # ET at 0.3
    probs[:, 3, 0, 0] = [0.2, 0.2, 0.2]
    assert probabilities_to_tissue(probs, 0.5)[:, 0, 0].tolist() == [0, Tissue.ED, Tissue.NCR, 0]
    per_region = probabilities_to_tissue(probs, [0.4, 0.3, 0.25])[:, 0, 0].tolist()
    assert per_region == [Tissue.ED, Tissue.NCR, Tissue.ET, 0]
    t = above_threshold(torch.from_numpy(probs), (0.4, 0.3, 0.25))
    assert isinstance(t, torch.Tensor) and t[:, :, 0, 0].tolist() == [[True, True, True, False], [False, True, True, False], [False, False, True, False]]
    cfg = load_config(None, ["infer.region_thresholds=[0.4,0.3,0.25]"]).infer
    assert cfg.thresholds == (0.4, 0.3, 0.25) and load_config(None, ["infer.threshold=0.45"]).infer.thresholds == (0.45,) * 3


def test_hysteresis_grows_confident_regions_over_their_uncertain_edge() -> None:
    from brats_psp.inference import hysteresis_masks, probabilities_to_tissue

    probs = np.zeros((3, 12, 5, 5), np.float32)
    probs[:, 1:4, 1:4, 1:4] = 0.3  # an uncertain blob with a confident voxel: grows whole
    probs[2, 1:4, 1:4, 1:4] = 0.1  # ET: its edge is below the low threshold of 0.25
    probs[:, 2, 2, 2] = 0.9
    probs[:, 4, 2, 2] = 0.3  # touches the blob (26-connected): grows
    probs[:, 7:10, 1:4, 1:4] = 0.3  # uncertain, touching nothing confident: stays out
    masks = hysteresis_masks(probs, 0.5, 0.25)
    assert masks[0].sum() == 28 and masks[0][1:5].sum() == 28 and not masks[0][7:].any()
    assert masks[2].sum() == 1  # only the confident voxel
    np.testing.assert_array_equal(hysteresis_masks(probs, 0.5, 0.5), probs > 0.5)  # low = threshold: plain thresholding
    per_region = hysteresis_masks(probs, [0.5, 0.5, 0.5], [0.25, 0.6, 0.05])  # one low threshold per region
    assert per_region[0].sum() == 28 and per_region[1].sum() == 1 and per_region[2].sum() == 28
    tissue = probabilities_to_tissue(probs, 0.5, 0.25)
    assert (tissue[2, 2, 2] == Tissue.ET) and (tissue[1:5] == Tissue.NCR).sum() == 27 and not tissue[7:].any()
    cfg = load_config(None, ["infer.region_thresholds=[0.4,0.2,0.3]", "infer.hysteresis=0.5"]).infer
    assert cfg.low_thresholds == (0.2, 0.1, 0.15) and load_config(None, ["infer.hysteresis=0"]).infer.low_thresholds is None
    # one factor per region (WT, TC, ET); a region whose factor is 0 keeps its threshold
    per = load_config(None, ["infer.region_thresholds=[0.4,0.2,0.3]", "infer.hysteresis=[0,0.5,0.25]"]).infer
    assert per.low_thresholds == (0.4, 0.1, 0.075) and load_config(None, ["infer.hysteresis=[0,0,0]"]).infer.low_thresholds is None
    grown = probabilities_to_tissue(probs, 0.5, load_config(None, ["infer.hysteresis=[0,0.5,0.5]"]).infer.low_thresholds)
    assert (grown > 0).sum() == 28 and (grown == Tissue.ED).sum() == 0  # TC grows over the blob; WT with it (nesting)
    for bad in ("1.5", "[0.5,0.5]", "[0,0.5,1.0]"):
        with pytest.raises(ConfigError, match="infer.hysteresis"):
            load_config(None, [f"infer.hysteresis={bad}"])


def test_class_gate_removes_a_region_from_the_slices_its_class_head_calls_empty() -> None:
    from brats_psp.inference import RegionProbabilities, predict_volume
    from brats_psp.networks.pspnet import PSPNetOutput
    from brats_psp.runtime import setup_runtime

    class Fixed(torch.nn.Module):
        """Every pixel logit 2 (p = 0.88); class logits per slice from its first channel's mean:
        WT present everywhere, TC where that mean is > 0, ET nowhere (p = 0.27)."""

        def forward(self, x: torch.Tensor) -> PSPNetOutput:
            b, _, h, w = x.shape
            masks = torch.full((b, 3, h, w), 2.0)
            tc = torch.where(x[:, 0].mean((1, 2)) > 0, 3.0, -3.0)
            return PSPNetOutput(masks, torch.stack([torch.full((b,), 3.0), tc, torch.full((b,), -1.0)], 1))

    x = torch.zeros(4, 4, 8, 8)
    x[:2, 0] = 1.0  # slices 0 and 1 contain "core"
    off, gated = RegionProbabilities(Fixed(), "sigmoid"), RegionProbabilities(Fixed(), "sigmoid", class_gate=0.5)
    np.testing.assert_allclose(off(x), torch.sigmoid(torch.tensor(2.0)).expand(4, 3, 8, 8))
    p = gated(x)
    assert (p[:, 0] > 0.8).all() and (p[:2, 1] > 0.8).all() and (p[2:, 1] == 0).all() and (p[:, 2] == 0).all()
    assert (RegionProbabilities(Fixed(), "sigmoid", class_gate=0.2)(x)[:, 2] > 0.8).all()  # 0.27 passes a gate of 0.2
    # through predict_volume: the axial slices of a volume, with TTA (the flips keep each slice's mean)
    volume = torch.zeros(4, 8, 8, 5)
    volume[0, ..., 1:3] = 1.0
    cfg = load_config(None, ["infer.roi_size=[16,16]", "infer.class_gate=0.5"]).infer
    probs = predict_volume(Fixed(), volume, cfg, setup_runtime("cpu", "fp32"))
    assert (probs[1, ..., 1:3] > 0.8).all() and (probs[1, ..., [0, 3, 4]] == 0).all() and (probs[2] == 0).all()
    with pytest.raises(ConfigError, match="infer.class_gate"):
        load_config(None, ["infer.class_gate=1.0"])


def _smoke_checkpoint(path: Path, seed: int, overrides: list[str]) -> Path:
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.spacing=[2.0,2.0,2.0]", "infer.roi_size=[32,32]", *overrides])
    torch.manual_seed(seed)
    model = build_network(cfg.model, cfg.data.in_channels)
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(cfg), "preprocessing": preprocessing_params(cfg.data.spacing), "run_id": None})
    return path


def test_an_ensemble_thresholds_the_mean_of_its_models_probabilities(tmp_path: Path) -> None:
    from brats_psp.segment import ensemble_config, load_models
    from tests.conftest import run_cli

    write_case(tmp_path / "in", "brats2021", "BraTS2021_00000")
    a = _smoke_checkpoint(tmp_path / "a.pt", 0, ["infer.region_thresholds=[0.5,0.4,0.3]"])
    b = _smoke_checkpoint(tmp_path / "b.pt", 1, ["data.context_slices=1", "infer.region_thresholds=[0.3,0.4,0.5]"])  # 2.5D: 12 channels
    models = load_models([str(a), str(b)])
    assert ensemble_config(models).infer.thresholds == (0.4, 0.4, 0.4)  # the mean of the models' own
    cfg = load_config(None, ["infer.save_probabilities=true", "infer.roi_size=[32,32]", "infer.tta=false"]).infer
    probs = {}
    for name, model in (("a", str(a)), ("b", str(b)), ("ab", [str(a), str(b)])):
        result = segment_cases(model, tmp_path / "in", tmp_path / name, cfg, progress=False)
        assert not result.failures
        probs[name] = np.asarray(nib.load(str(tmp_path / name / "BraTS2021_00000_probabilities.nii.gz")).dataobj)
    assert np.abs(probs["a"] - probs["b"]).max() > 0.05  # two different models ...
    np.testing.assert_allclose(probs["ab"], (probs["a"] + probs["b"]) / 2, atol=1e-5)  # ... and their mean
    info = json.loads((tmp_path / "ab" / "inference.json").read_text())
    assert info["checkpoint"] == [str(a), str(b)] and info["run_id"] is None
    # the CLI: --model repeated; the labels are the mean's, thresholded at the mean thresholds
    assert run_cli("infer", "--model", str(a), "--model", str(b), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "cli"), "infer.tta=false", "infer.fill_core=false", "infer.rim_hull=false", "infer.hysteresis=0", "infer.core_component_fraction=0") == 0
    labels = np.asarray(nib.load(str(tmp_path / "cli" / "BraTS2021_00000.nii.gz")).dataobj)
    expected = np.zeros(labels.shape, np.uint8)
    wt, tc, et = (probs["ab"][..., k] > 0.4 for k in range(3))
    expected[wt], expected[tc], expected[et] = 2, 1, 4  # ET over TC over WT (labels.regions_to_tissue); BraTS 2021: ED 2, NCR 1, ET 4
    assert (labels == expected).mean() > 0.999  # resampling only the tumour's box may differ at a few edge voxels
    assert json.loads((tmp_path / "cli" / "inference.json").read_text())["infer"]["region_thresholds"] == [0.4, 0.4, 0.4]


def test_an_ensemble_of_one_model_twice_segments_as_that_model(checkpoint: Path, tmp_path: Path) -> None:
    write_case(tmp_path / "in", "brats2023", "BraTS-GLI-00003-000")
    one = segment_cases(str(checkpoint), tmp_path / "in", tmp_path / "one", progress=False)
    two = segment_cases([str(checkpoint), str(checkpoint)], tmp_path / "in", tmp_path / "two", progress=False)
    path_one, path_two = one.written["BraTS-GLI-00003-000"], two.written["BraTS-GLI-00003-000"]
    np.testing.assert_array_equal(np.asarray(nib.load(path_one).dataobj), np.asarray(nib.load(path_two).dataobj))


def test_an_ensemble_of_models_trained_at_different_spacings_is_refused(tmp_path: Path) -> None:
    from brats_psp.errors import CheckpointError
    from brats_psp.segment import load_models

    a = _smoke_checkpoint(tmp_path / "a.pt", 0, [])
    b = _smoke_checkpoint(tmp_path / "b.pt", 0, ["data.spacing=[1.5,1.5,1.5]"])
    with pytest.raises(CheckpointError, match=r"same data.spacing.*a\.pt.*2\.0.*b\.pt.*1\.5"):
        load_models([str(a), str(b)])
    with pytest.raises(CheckpointError, match="no model"):
        load_models([])
    # the same spacing, but one clips the intensities before the z-score: refused as well
    c = _smoke_checkpoint(tmp_path / "c.pt", 0, ["data.intensity_percentiles=[1,99]"])
    with pytest.raises(CheckpointError, match=r"same data.intensity_percentiles.*a\.pt: None.*c\.pt: \[1\.0, 99\.0\]"):
        load_models([str(a), str(c)])


def test_a_model_trained_with_clipped_intensities_segments_with_them(tmp_path: Path) -> None:
    # infer runs the model's own preprocessing: the same weights segment differently when their
    # config clips the intensities, and clipping at the 0th and 100th percentiles changes nothing
    from brats_psp.segment import load_models, prepare_case

    write_case(tmp_path / "in", "brats2021", "BraTS2021_00000")
    case = discover_cases(tmp_path / "in").cases[0]
    plain = prepare_case(case, [2.0, 2.0, 2.0]).image
    clipped = prepare_case(case, [2.0, 2.0, 2.0], [1.0, 99.0]).image
    assert not torch.equal(plain, clipped) and torch.equal(plain != 0, clipped != 0)
    cfg = load_config(None, ["infer.save_probabilities=true", "infer.roi_size=[32,32]", "infer.tta=false"]).infer
    probs = {}
    for name, clip in (("plain", []), ("clip", ["data.intensity_percentiles=[1,99]"]), ("none", ["data.intensity_percentiles=[0,100]"])):
        path = _smoke_checkpoint(tmp_path / f"{name}.pt", 0, clip)  # seed 0: the same weights
        if clip:
            assert load_models(str(path))[0].config.data.intensity_percentiles is not None
        segment_cases(str(path), tmp_path / "in", tmp_path / name, cfg, progress=False)
        probs[name] = np.asarray(nib.load(str(tmp_path / name / "BraTS2021_00000_probabilities.nii.gz")).dataobj)
    assert np.abs(probs["clip"] - probs["plain"]).max() > 1e-3
    np.testing.assert_allclose(probs["none"], probs["plain"], atol=1e-5)