"""Whole-volume inference on one BraTS-sized case, side by side in one process.

    python benchmarks/inference.py [--checkpoint CKPT] [--config configs/default.yaml] [--device auto]

Measures on one synthetic BraTS 2023 case (4 × 240 × 240 × 155, NIfTI in, NIfTI out):

* **default, end to end**: :func:`brats_psp.segment.segment_cases` (load, MONAI transforms,
  slice-wise windows, inverse transforms, postprocessing, writing), with the time spent inside
  the network measured by forward hooks;
* **network alone**: the same network on exactly the slices the default run fed it (recorded),
  so ``1 - network / end-to-end`` is the overhead outside the network;
* **the seed's way**: the seed's PSPNet (ResNet-34, 4-channel stem, the project's
  :class:`~brats_psp.networks.SeedPSPNet`) on every one of the 155 slices at 240 × 240, fp32,
  batches of 16, no cropping, z-scored in numpy, argmax, written with nibabel;
* FLOPs per volume (``torch.utils.flop_counter``) and the achieved FLOP/s against the measured
  matmul peak (fp32, bf16);
* peak resident memory of the process during each.

Without ``--checkpoint`` the network has the config's architecture with random weights (the
time does not depend on the weights). Prints a table and writes ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import PeakMemory, machine, matmul_peak, median, section, table, timed, write_result  # noqa: I001

from brats_psp.config import config_to_dict, load_config
from brats_psp.data.discovery import discover_cases
from brats_psp.data.synthetic import generate_case, write_case
from brats_psp.networks import SeedPSPNet, build_network, count_parameters
from brats_psp.runtime import autocast, setup_runtime
from brats_psp.checkpoint import LoadedModel, load_model
from brats_psp.segment import segment_cases


class NetworkClock:
    """Forward hooks that add up the time spent inside a module and can record its inputs."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.seconds, self.calls, self.record = 0.0, 0, False
        self.inputs: list[torch.Tensor] = []
        self.device = device
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self.record:
            self.inputs.append(args[0].detach().clone())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def make_case(folder: Path, index: int = 0, seed: int = 4242, shape: tuple[int, int, int] | None = None) -> Path:
    """One synthetic BraTS 2023 case (240 × 240 × 155, int16) in ``folder/<case id>/``.

    ``shape`` centre-crops it (for a quick check of the script, not for numbers).
    """
    case = generate_case(index, seed=seed, fmt="brats2023")
    if shape is not None:
        box = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(case.tissue.shape, shape))
        case = dataclasses.replace(case, images={m: v[box] for m, v in case.images.items()}, tissue=case.tissue[box])
    write_case(case, folder, fmt="brats2023", with_label=False)
    return folder


def seed_way(files: list[Path], out: Path, model: torch.nn.Module, device: torch.device, batch: int = 16) -> None:
    """The seed's inference: every slice at full size, fp32, fixed batches, argmax, no cropping."""
    imgs = [nib.load(str(f)) for f in files]
    vol = np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in imgs])  # 4 × X × Y × Z
    for c in range(vol.shape[0]):
        brain = vol[c] > 0
        v = vol[c][brain]
        vol[c][brain] = (v - v.mean()) / (v.std() + 1e-8)
    x = torch.from_numpy(vol).permute(3, 0, 1, 2).contiguous()  # Z × 4 × X × Y
    preds = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            masks = model(x[i : i + batch].to(device)).masks
            preds.append(masks.argmax(1).to(torch.uint8).cpu())
    seg = torch.cat(preds).permute(1, 2, 0).numpy()
    nib.save(nib.Nifti1Image(seg, imgs[0].affine), str(out))


def count_flops(fn: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: the config's network, random weights)")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed-depth", type=int, default=34, help="the seed's ResNet depth (34 as published)")
    ap.add_argument("--seed-width", type=int, default=64, help="the seed's ResNet width (64 as published)")
    ap.add_argument("--seed-repeats", type=int, default=1)
    ap.add_argument("--no-seed", action="store_true", help="skip the seed's way (for quick before/after comparisons of the default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the project's network (GPU)")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="centre-crop the case (a quick check, not a benchmark)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/inference[_cuda].json)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. infer.tta=true)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.checkpoint:
        loaded = load_model(args.checkpoint)
        if args.overrides:
            from brats_psp.config import apply_overrides

            loaded.config = apply_overrides(loaded.config, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        torch.manual_seed(0)
        net = build_network(cfg.model, cfg.data.in_channels).eval()
        loaded = LoadedModel(net, cfg, Path("<random weights>"), None)
    loaded.config.train.device = args.device
    cfg = loaded.config
    runtime = setup_runtime(cfg.train.device, cfg.train.precision, cfg.train.threads)
    device = runtime.device
    print(f"device {device} ({runtime.precision}), {machine()['cpu']}, {torch.get_num_threads()} threads")

    result: dict[str, Any] = {"device": str(device), "precision": runtime.precision, "config": args.config,
                              "checkpoint": args.checkpoint, "overrides": args.overrides, "infer": config_to_dict(cfg)["infer"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with section("writing one synthetic BraTS 2023 case"):
            make_case(tmp / "in", shape=tuple(args.shape) if args.shape else None)
        case = discover_cases(tmp / "in").cases[0]
        shape = nib.load(str(case.images[0])).shape
        net = loaded.network.to(device)
        if args.compile:  # the clock's hooks go on the compiled wrapper, outside the compiled graph
            loaded.network = torch.compile(net)
        clock = NetworkClock(loaded.network, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        with section("default inference, end to end"):
            def run_default() -> None:
                res = segment_cases(loaded, tmp / "in", tmp / "out", progress=False)
                if res.failures:
                    raise RuntimeError(res.failures)

            with PeakMemory() as mem_default:
                clock.record = True
                run_default()  # warm-up, and records the network's inputs
                clock.record = False
                clock.reset()
                t_default = timed(run_default, repeats=args.repeats, warmup=0, device=device)
            net_inside = clock.seconds / args.repeats
            clock.remove()
        gpu_peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        slices = sum(x.shape[0] for x in clock.inputs)
        shapes = sorted({tuple(x.shape[1:]) for x in clock.inputs})
        print(f"   {np.round(t_default, 2).tolist()} s; network inside {net_inside:.2f} s; {slices} slices of {shapes}")

        with section("network alone on the same slices"):
            def run_network() -> None:
                with torch.inference_mode(), autocast(runtime):
                    for x in clock.inputs:
                        loaded.network(x)

            with PeakMemory() as mem_network:
                t_network = timed(run_network, repeats=args.repeats, warmup=1, device=device)
            flops_default = count_flops(run_network)

        t_seed, flops_seed, seed_params, mem_seed_gib = [float("nan")], 0, 0, float("nan")
        if not args.no_seed:
            with section(f"the seed's way: ResNet-{args.seed_depth} width {args.seed_width}, every slice at full size, fp32, batch 16"):
                torch.manual_seed(0)
                seed_net = SeedPSPNet(4, args.seed_depth, args.seed_width, (1, 2, 3, 6), "softmax").eval().to(device)
                files = list(case.images)
                with PeakMemory() as mem_seed:
                    t_seed = timed(lambda: seed_way(files, tmp / "seed.nii.gz", seed_net, device), repeats=args.seed_repeats, warmup=0, device=device)
                x = torch.zeros(1, 4, shape[0], shape[1], device=device)
                with torch.no_grad():
                    flops_seed = count_flops(lambda: seed_net(x)) * shape[2]
                print(f"   {np.round(t_seed, 2).tolist()} s")
                seed_params, mem_seed_gib = count_parameters(seed_net), mem_seed.gib

    with section("matmul peak"):
        peak32 = matmul_peak(torch.float32, device)
        peak16 = matmul_peak(torch.bfloat16, device)

    e2e, net_t, seed_t = median(t_default), median(t_network), median(t_seed)
    result.update(
        {
            "case_shape": list(shape),
            "seconds": {"default_end_to_end": t_default, "network_inside_end_to_end": net_inside, "network_alone": t_network, "seed_way": t_seed},
            "slices": slices, "slice_shapes": shapes,
            "parameters": {"default": count_parameters(net), "seed": seed_params},
            "flops_per_volume": {"default": flops_default, "seed": flops_seed},
            "flops_per_s": {"default_network": flops_default / net_t, "seed": flops_seed / seed_t},
            "matmul_peak_flops_per_s": {"fp32": peak32, "bf16": peak16},
            "peak_rss_gib": {"default_end_to_end": mem_default.gib, "network_alone": mem_network.gib, "seed_way": mem_seed_gib},
            "peak_gpu_allocated_gib_default": gpu_peak_gib,
            "compiled": args.compile,
            "ratios": {
                "seed_over_default": seed_t / e2e,
                "overhead_fraction": 1 - net_inside / e2e,
                "network_alone_over_end_to_end": net_t / e2e,
                "default_fraction_of_fp32_peak": flops_default / net_t / peak32,
                "seed_fraction_of_fp32_peak": flops_seed / seed_t / peak32,
            },
        }
    )
    r = result["ratios"]
    rows = [
        ["default, end to end", e2e, 1.0, mem_default.gib, flops_default / 1e9, flops_default / net_t / 1e9],
        ["network alone (same slices)", net_t, net_t / e2e, mem_network.gib, flops_default / 1e9, flops_default / net_t / 1e9],
        ["seed's way", seed_t, seed_t / e2e, mem_seed_gib, flops_seed / 1e9, flops_seed / seed_t / 1e9],
    ]
    print()
    print(table(rows, ["per volume", "seconds", "× default", "peak RSS GiB", "GFLOP", "GFLOP/s"]))
    print(
        f"\nseed / default: {r['seed_over_default']:.1f}× (goal ≥ 3); overhead outside the network {100 * r['overhead_fraction']:.0f} % "
        f"(goal ≤ 15 %); matmul peak fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s; "
        f"network at {100 * r['default_fraction_of_fp32_peak']:.0f} % of fp32 peak, seed at {100 * r['seed_fraction_of_fp32_peak']:.0f} %"
    )
    if gpu_peak_gib is not None:
        print(f"GPU: {torch.cuda.get_device_name(device)}; peak GPU memory allocated by the default run {gpu_peak_gib:.2f} GiB")
    name = "inference" if device.type == "cpu" else "inference_cuda"
    write_result(name, result, args.out)
    return result


if __name__ == "__main__":
    main()
