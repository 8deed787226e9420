"""Real-sized SVD through svdbatch's memory presets: s/item, peak VRAM, compile speed-up.

Random weights of the real architecture (no download): UNet as in SVD-XT (1.5B params),
the real temporal VAE and a ViT-H/14 image encoder, saved once to a temporary folder and
loaded through svdbatch exactly like a local checkpoint (model.source=<folder>).

    python bench/gpu.py                 # on a GPU: 1024x576, 25 frames, 25 steps
    python bench/gpu.py --tiny          # anywhere: the tiny model at 96x64x8 (proves the script)
    python bench/gpu.py --steps 10 --items 3 --no-compile

Prints one row per preset and writes the table as JSON next to the script (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from overhead import make_manifest  # noqa: E402  (bench/overhead.py: sys.path[0] is bench/)

from svdbatch.core.compose import config_dir
from svdbatch.engine.driver import run
from svdbatch.models import loading as models
from svdbatch.models import tiny

PRESETS = {
    "full": [],
    "balanced": ["memory=balanced"],
    "low": ["memory=low"],
    "full+compile": ["memory.compile=true"],
}


def build_real_sized(folder: Path, device: torch.device) -> None:
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    with device:  # initialise on the GPU: minutes faster than on the CPU at this size
        unet = UNetSpatioTemporalConditionModel()  # the class defaults are SVD's config
        vae = AutoencoderKLTemporalDecoder(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=768,
        )
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_attention_heads=16,
                num_hidden_layers=32,
                patch_size=14,
                image_size=224,
                projection_dim=1024,
                hidden_act="gelu",
            )
        )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**tiny.TINY_COMPONENTS["scheduler"]),
        feature_extractor=CLIPImageProcessor(),
    ).to(torch.float16)
    pipe.save_pretrained(folder)


def cell(value, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{decimals}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny model at a tiny size (CPU check)")
    parser.add_argument("--items", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("gpu-results.json"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    root = Path(tempfile.mkdtemp(prefix="svdbatch-bench-gpu-"))
    models.quiet_libraries()
    try:
        if args.tiny:
            source, size = "tiny", ["conditioning=tiny"]
        else:
            start = time.perf_counter()
            build_real_sized(root / "model", device)
            print(f"built and saved the real-sized random pipeline in {time.perf_counter() - start:.0f} s")
            source, size = str(root / "model"), ["conditioning=svd_xt"]
        manifest = make_manifest(root, args.items, size=(1024, 576), first_seed=0)
        presets = [p for p in args.presets.split(",") if not (args.no_compile and "compile" in p)]
        rows = []
        for name in presets:
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                cfg = compose(
                    config_name="config",
                    overrides=[
                        f"manifest={manifest}",
                        f"run.dir={root / name}",
                        "run.progress=false",
                        "output=frames",
                        f"model.source={source}",
                        f"conditioning.num_inference_steps={args.steps}",
                        *size,
                        *PRESETS[name],
                    ],
                )
            models._loaded.clear()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            summary = run(cfg)
            sidecar = json.loads(next((root / name / "items").glob("*.json")).read_text())
            rows.append(
                {
                    "preset": name,
                    "s_per_item": statistics.median(summary.generate_seconds) if summary.generate_seconds else None,
                    "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                    "warmup_s": sidecar.get("warmup_s"),
                    "failed": summary.failed,
                }
            )
            print(rows[-1], flush=True)
        by_name = {row["preset"]: row for row in rows}
        if "full+compile" in by_name and by_name["full"]["s_per_item"] and by_name["full+compile"]["s_per_item"]:
            speedup = by_name["full"]["s_per_item"] / by_name["full+compile"]["s_per_item"]
        else:
            speedup = None
        params = cfg.conditioning
        header = {
            "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__,
            "size": f"{params.width}x{params.height}x{params.num_frames or 25} frames, {args.steps} steps",
            "model": "tiny" if args.tiny else "real-sized SVD-XT, random weights, fp16",
            "date": time.strftime("%Y-%m-%d"),
        }
        print(f"\n{header}")
        print(f"{'preset':<14} {'s/item':>8} {'peak VRAM GiB':>14} {'warm-up s':>10}")
        for row in rows:
            print(
                f"{row['preset']:<14} {cell(row['s_per_item'], 8, 2)} {cell(row['peak_vram_gib'], 14, 2)}"
                f" {cell(row['warmup_s'], 10, 1)}"
            )
        if speedup:
            print(f"compile speed-up (full / full+compile): {speedup:.2f}x")
        args.out.write_text(json.dumps({**header, "rows": rows, "compile_speedup": speedup}, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
