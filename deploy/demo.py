"""`make demo`: start the local fleet, score example images over gRPC, print the scores, shut down.

Example images are generated (seeded) into demo_out/images: flat, gradients, shapes, noise, plus one corrupt file
to show that a bad image gets its own error while the others are scored.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from services.codec import encode_image

OUT = Path("demo_out")


def make_example_images(folder: Path, seed: int = 0) -> list[Path]:
    """Writes a few seeded images of increasing visual complexity (and one corrupt PNG); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = 256
    y, x = np.mgrid[0:size, 0:size]
    images = {
        "01_flat_grey": np.full((size, size, 3), 128, np.uint8),
        "02_gradient": np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8),
        "03_red_disc_on_sky": np.where(
            ((x - 128) ** 2 + (y - 140) ** 2 < 60**2)[..., None], [220, 30, 30], [120, 170, 230]
        ).astype(np.uint8),
        "04_checkerboard": (((x // 16 + y // 16) % 2) * 255)[..., None].repeat(3, axis=2).astype(np.uint8),
        "05_noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
    }
    paths = []
    for name, array in images.items():
        path = folder / f"{name}.png"
        path.write_bytes(encode_image(array, "PNG"))
        paths.append(path)
    corrupt = folder / "06_corrupt.png"
    corrupt.write_bytes(paths[1].read_bytes()[:300])  # a truncated PNG
    return [*paths, corrupt]


def main() -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from deploy.cli import format_table, score_files
    from deploy.fleet import LOCAL_PROFILE, start_fleet, stop_fleet

    # 1. Example images.
    images = make_example_images(OUT / "images")
    print(f"[demo] wrote {len(images)} example images to {OUT / 'images'}")

    # 2. The local fleet (embedded profile: CPU, weight-free / tiny models).
    t0 = time.perf_counter()
    fleet = start_fleet(LOCAL_PROFILE, num_cpus=4)
    elapsed = time.perf_counter() - t0
    print(f"[demo] fleet up on {fleet.grpc_target} in {elapsed:.1f}s: {', '.join(fleet.applications)}")
    print("[demo] local profile: caption and semantic run tiny random-weight models (captions are random words),")
    print("[demo] alignment was trained on the synthetic feedback testbed; cluster.yaml serves real checkpoints.")
    try:
        # 3. Score every example image with every reward application, over gRPC.
        prompt = "a red disc in a blue sky"
        pairs = [(p.name, p, prompt) for p in images]
        for application in fleet.applications:
            rows = score_files(pairs, fleet.grpc_target, application, progress=False)
            print(f"\n[demo] {application} (prompt: {prompt!r})")
            print(format_table(rows))
            scored = [r for r in rows if r["reward"] is not None]
            print(f"[demo] {len(scored)} scored, {len(rows) - len(scored)} with a per-sample error")
            if len(rows) != len(images):
                print("[demo] FAILED: not every image came back", file=sys.stderr)
                return 1
    finally:
        # 4. Shut down.
        stop_fleet()
        print("\n[demo] fleet stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
