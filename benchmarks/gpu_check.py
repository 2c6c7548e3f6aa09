"""GPU check of the cluster path: the cluster profile's rewards and the fine-tuning job on one GPU, in one command.

    python benchmarks/gpu_check.py                       # on a GPU machine: full-size models, ~8 minutes
    python benchmarks/gpu_check.py --scale test --device cpu   # the same steps on CPU, real widths, 1-2 layers

No checkpoint is downloaded: every model is built from its release's config with random weights, written in the
release's file layout and loaded through the same code as the real checkpoint (`trainer/local_models/real_width.py`
`real_width_*` builders; `full_depth=True` at `--scale full`). Vicuna-7B runs in vLLM with `load_format="dummy"`
(random weights, no file) when vLLM is installed (`pip install .[vllm]`), else with transformers.

1. Build: BLIP-2 OPT-2.7B, CLIP ViT-L/14, SAM (ViT-H at full scale), Vicuna-7B, an alignment reward directory on the
   CLIP, Stable Diffusion 1.5.
2. Serve each reward application of deploy/cluster.yaml alone, one replica with the profile's own `num_gpus` and
   options, pointed at the built models; score batches of 32 raw 512x512 images over gRPC for `--seconds`, 4 in
   flight, and report images/s (after one warm-up batch) and the replica's GPU memory.
3. Fine-tune: 2 LoRA rounds of the cluster preset (trainer/configs/cluster.yaml: SD 1.5 at 512 px, `model.dtype:
   auto`, i.e. bf16 on GPUs with it) on one GPU worker, against the jpeg_compressibility reward; report the round
   times and the worker's peak GPU memory.

Results are printed and written to `--out` (JSON) after every step, so a run cut short keeps what it measured.
Record them in benchmarks/README.md ("GPU check").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.fleet import DEPLOY_DIR, load_serve_config, start_fleet, stop_fleet  # noqa: E402

BATCH = 32
SIDE = 512


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def build_models(work: Path, full: bool) -> dict[str, Path]:
    """Step 1: every model the check serves or trains, with random weights, in its release's layout."""
    from trainer.local_models import real_width as tm

    t0 = time.perf_counter()
    paths = {
        "blip2": tm.real_width_blip2(work / "blip2", full_depth=full),
        "clip": tm.real_width_clip_l14(work / "clip", full_depth=full),
        "llama": tm.real_width_llama7b(work / "llama", full_depth=full),
        "sam": build_sam_vit_h(work / "sam") if full else tm.real_width_sam_vit_b(work / "sam"),
        "sd15": tm.real_width_stable_diffusion(work / "sd15", full_depth=full),
    }
    paths["alignment"] = tm.real_width_alignment_reward(work / "alignment", paths["clip"])
    log(f"built the models in {time.perf_counter() - t0:.0f}s under {work}")
    return paths


def build_sam_vit_h(path: Path) -> Path:
    """The cluster profile's SAM: segment_anything's vit_h, random weights, saved as the release's state-dict .pth."""
    import torch
    from segment_anything import sam_model_registry

    path.mkdir(parents=True, exist_ok=True)
    checkpoint = path / "sam_vit_h_4b8939.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_h"]().state_dict(), checkpoint)
    return checkpoint


def reward_app(name: str, models: dict[str, Path], device: str, full: bool, vllm: bool) -> dict:
    """The cluster profile's application `name`, one replica, its model sources pointed at the built models."""
    from trainer.local_models.real_width import REAL_WIDTH_SAM

    profile = load_serve_config(DEPLOY_DIR / "cluster.yaml")
    app = copy.deepcopy(next(a for a in profile["applications"] if a["name"] == name))
    args, (deployment,) = app["args"], app["deployments"]
    deployment.pop("autoscaling_config", None)
    deployment["num_replicas"] = 1
    options = deployment.setdefault("ray_actor_options", {})
    options["num_cpus"] = min(options.get("num_cpus", 1), max(1, (os.cpu_count() or 2) // 2))
    if device == "cpu":
        options.pop("num_gpus", None)
        args["device"] = "cpu"
    reward = args.get("reward_config", {})
    if name == "caption":
        reward["captioner"] = str(models["blip2"])
        reward["text_encoder"]["source"] = str(models["clip"])
        if device == "cpu":
            reward["dtype"] = "float32"
    elif name == "semantic":
        reward["sam"]["checkpoint"] = str(models["sam"])
        if not full:  # vit_b widths, depth 2: the custom model type
            reward["sam"].update({k: list(v) if isinstance(v, tuple) else v for k, v in REAL_WIDTH_SAM.items()})
            # On CPU a 32x32 point grid takes minutes per image; random weights pass no quality threshold.
            reward["sam"].update(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        reward["labeler"]["clip"] = str(models["clip"])
        reward["llm"]["model"] = str(models["llama"])
        if vllm:
            reward["llm"]["vllm_load_format"] = "dummy"
        else:
            reward["llm"]["backend"] = "transformers"
            reward["llm"].pop("vllm_gpu_memory_utilization", None)
        if device == "cpu":
            reward["llm"]["dtype"] = "float32"
    elif name == "alignment":
        reward["model_dir"] = str(models["alignment"])
    return app


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Structured 512x512 images (gradients, a disc, noise patches), so segmenters and captioners have edges."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    out = []
    for _ in range(n):
        base = np.stack([x * rng.uniform(0, 0.5), y * rng.uniform(0, 0.5), (x + y) * rng.uniform(0, 0.25)], -1)
        cx, cy, r = rng.integers(100, 400, 2).tolist() + [int(rng.integers(40, 120))]
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < r**2)[..., None]
        image = np.where(disc, rng.integers(0, 256, 3), base).astype(np.uint8)
        image[:64, :64] = rng.integers(0, 256, (64, 64, 3))
        out.append(image)
    return out


def measure_reward(app: dict, seconds: float, port: int, batch_size: int = BATCH) -> dict:
    """Step 2 for one application: deploy it alone, score batches of `batch_size` for `seconds`, undeploy."""
    from services.client import RewardClient

    config = load_serve_config(DEPLOY_DIR / "cluster.yaml", grpc_port=port)
    config["applications"] = [app]
    config["proxy_location"] = "HeadOnly"
    t0 = time.perf_counter()
    fleet = start_fleet(config, timeout_s=900)
    ready_s = time.perf_counter() - t0
    batch = images(batch_size)
    prompts = (["two green dogs in the city", "a red disc in a blue sky"] * batch_size)[:batch_size]
    try:
        with RewardClient(fleet.grpc_target, app["name"], max_in_flight=4, timeout_s=600) as client:
            warm = client.score(batch, prompts)  # compiles, fills caches
            errors = sorted({r.error_code for r in warm if not r.ok})
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                results = client.score(batch * 4, prompts * 4)  # 4 requests of 32 in flight
                done += len(results)
                errors += sorted({r.error_code for r in results if not r.ok} - set(errors))
            elapsed = time.perf_counter() - start
        # The replica is the only GPU user now: the device's used memory is its footprint.
        memory = _nvidia_smi_used_gib() if app["args"].get("device") == "cuda" else None
    finally:
        stop_fleet(shutdown_ray=False)
    result = {
        "ready_s": round(ready_s, 1),
        "images_per_s": round(done / elapsed, 2),
        "images": done,
        "seconds": round(elapsed, 1),
        "errors": errors,
        "example": {"reward": warm[0].reward, "components": warm[0].components, "caption": warm[0].caption},
        "batch_size": batch_size,
        "num_gpus": app["deployments"][0]["ray_actor_options"].get("num_gpus", 0),
        "gpu_memory_used_gib": memory,
    }
    log(f"{app['name']}: {result['images_per_s']} images/s at batch {batch_size} (ready in {ready_s:.0f}s) {errors}")
    return result


def _nvidia_smi_used_gib() -> float | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return round(float(out.split()[0]) / 1024, 2)
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def finetune(models: dict[str, Path], work: Path, device: str, full: bool, port: int) -> dict:
    """Step 3: 2 LoRA rounds of the cluster preset on one worker, scored by jpeg_compressibility."""
    from trainer.config import load_finetune_config
    from trainer.finetune import run_finetune

    jpeg = load_serve_config(DEPLOY_DIR / "local.yaml", grpc_port=port)
    jpeg["applications"] = [a for a in jpeg["applications"] if a["name"] == "jpeg_compressibility"]
    fleet = start_fleet(jpeg)
    gpu = device == "cuda"
    overrides = [
        f"model.pretrained={models['sd15']}",
        f"model.resolution={SIDE if full else 64}",
        f"rewards.target={fleet.grpc_target}",
        "rewards.weights={jpeg_compressibility: 1.0}",
        "rewards.select_by=jpeg_compressibility",
        "selection.strategy=raft",
        "optim.method=lora",
        "prompts.generate=8",
        "prompts.eval_count=2",
        "prompts.eval_seeds=2",
        "sampling.samples_per_prompt=4",
        "sampling.prompts_per_batch=2",
        f"sampling.steps={20 if full else 2}",
        "run.rounds=2",
        "run.num_workers=1",
        f"run.use_gpu={str(gpu).lower()}",
        f"run.cpus_per_worker={4 if gpu else 1}",
        "run.torch_threads=4",
        f"run.output_dir={work / 'finetune'}",
        "run.name=gpu_check",
    ]
    config = load_finetune_config(ROOT / "trainer" / "configs" / "cluster.yaml", overrides)
    shutil.rmtree(work / "finetune", ignore_errors=True)
    t0 = time.perf_counter()
    try:
        run = run_finetune(config)
    finally:
        stop_fleet(shutdown_ray=False)
    rows = run.rows
    result = {
        "seconds": round(time.perf_counter() - t0, 1),
        "dtype": config.model.dtype,
        "resolution": config.model.resolution,
        "rounds": [
            {
                k: r.get(k)
                for k in ("round", "loss", "time/round_s", "time/sample_s", "time/train_s", "gpu/max_memory_gib")
            }
            for r in rows
        ],
    }
    log(f"fine-tuning: {len(rows) - 1} rounds in {result['seconds']}s; {result['rounds']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=["full", "test"], default="full", help="full-size or 1-2 layer models")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--seconds", type=float, default=20.0, help="scoring time per reward")
    parser.add_argument("--batch-size", type=int, default=None, help=f"images per request (default {BATCH}; 2 on CPU)")
    parser.add_argument("--rewards", default="caption,semantic,alignment", help="cluster-profile applications")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rewardfleet_gpu_check"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_check.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import torch

    full = args.scale == "full"
    report: dict = {"scale": args.scale, "device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            log("no CUDA device: run with --device cpu --scale test for the CPU version")
            return 2
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 1024**3, 1),
            "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
        }
    try:
        import vllm  # noqa: F401

        use_vllm = args.device == "cuda"
    except ImportError:
        use_vllm = False
    report["llm_backend"] = "vllm (load_format=dummy)" if use_vllm else "transformers"

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    args.work.mkdir(parents=True, exist_ok=True)
    models = build_models(args.work, full)
    save()
    ray.init(num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False, log_to_driver=False)
    port = 9100
    report["rewards"] = {}
    for name in [n for n in args.rewards.split(",") if n]:
        app = reward_app(name, models, args.device, full, use_vllm)
        try:
            batch_size = args.batch_size or (BATCH if args.device == "cuda" else 2)
            report["rewards"][name] = measure_reward(app, args.seconds, port, batch_size)
        except Exception as e:  # report and go on: one reward's failure must not hide the others' figures
            report["rewards"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"{name} FAILED: {e}")
        save()
    if not args.skip_training:
        try:
            report["finetune"] = finetune(models, args.work, args.device, full, port)
        except Exception as e:
            report["finetune"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"fine-tuning FAILED: {e}")
        save()
    ray.shutdown()
    log(f"wrote {args.out}")
    print(json.dumps(report, indent=2, default=str))
    failed = [k for k, v in report["rewards"].items() if "error" in v] + (
        ["finetune"] if "error" in report.get("finetune", {}) else []
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
