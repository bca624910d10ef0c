"""Ray for many experiments at once: a local instance with --workers/--gpus GPUs, or the cluster at --ray,
with its token taken out of the environment (harden_process) and handed only to Ray."""
from __future__ import annotations

import os
from pathlib import Path

from driver.common import FatalError, one_line
from driver.runner import RAY_AUTH

# what never travels to a cluster's nodes with the tool's files
RAY_EXCLUDES = ["runs/", ".git/", ".venv/", "*.pt", "*.gguf", "*.safetensors", "__pycache__/"]


def gpu_count(args) -> int:
    return len(args.gpus.split(",")) if args.gpus else args.workers


def ray_auth(args) -> dict:
    """`ray start` turns token authentication on; a client sends the token (~/.ray/auth_token, RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH) only in token mode, which Ray reads when it is imported (`--ray auto` finds it alone)."""
    auth = dict(RAY_AUTH)  # the token settings that harden_process took out of the environment
    if args.ray and "RAY_AUTH_MODE" not in os.environ and (auth or (Path.home() / ".ray" / "auth_token").exists()):
        auth["RAY_AUTH_MODE"] = "token"
    return auth


def start_ray(args):
    """Connect to the cluster at --ray, or start a local Ray instance with --workers/--gpus GPUs."""
    auth = ray_auth(args)
    os.environ.update(auth)
    try:
        import ray
    except ImportError:
        raise FatalError("--workers, --gpus and --ray need Ray: pip install -r requirements-cluster.txt "
                         "(the one-GPU night, --workers 1, does not)") from None
    quiet = {"log_to_driver": False, "configure_logging": False}
    try:
        if args.ray:
            # the tool's files travel to every node; the research repo's travel with each experiment
            runtime_env = {"working_dir": str(Path(__file__).resolve().parents[1]), "excludes": RAY_EXCLUDES}
            try:
                ray.init(address=args.ray, runtime_env=runtime_env, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise FatalError(f"--ray {args.ray}: cannot connect ({one_line(exc, 200)}); start the cluster first "
                                 "(`ray start --head --num-gpus N` on the head node), then pass its address or "
                                 "`auto`") from None
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if gpus == 0:
                raise FatalError(f"the Ray cluster at {args.ray} has no GPUs: start its nodes with "
                                 "`ray start ... --num-gpus N`")
            return ray, gpus
        if args.gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus  # Ray hands out these devices, one per task
        # address "local": an instance of its own, even where RAY_ADDRESS or a `ray start` on this host names a
        # cluster (Ray would join that one, and refuses num_gpus there): a cluster is --ray's
        ray.init(address="local", num_gpus=gpu_count(args), num_cpus=max(os.cpu_count() or 1, 1),
                 include_dashboard=False, **quiet)
        return ray, gpu_count(args)
    finally:
        for key in set(auth) - {"RAY_AUTH_MODE"}:  # no child of the driver inherits the token
            os.environ.pop(key, None)
