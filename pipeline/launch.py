"""``train``'s command-line options for resuming and for multi-process launches, and the torchrun launch.

More than one training process (``--num-processes``, ``--nnodes``) relaunches the same ``train`` command as
workers under torchrun (``torch.distributed.run``); the trainer (accelerate underneath) sets up DDP or FSDP from
the variables torchrun gives each worker. Checks that can fail (too few GPUs, a rendezvous address the recipe
does not allow, a run to resume) run here, before anything starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import JobFailed

if TYPE_CHECKING:  # the parser is built on every command, --help included: no pydantic import for it
    from pipeline.recipe import Recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``train``'s --resume, --num-processes, --nnodes, --node-rank, --master-addr and --master-port."""
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="RUN",
        help="continue RUN (a run directory; default: the newest run of the recipe) from its newest complete "
        "checkpoint, with optimizer, scheduler, RNG and data position restored; same recipe and --set required",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="training processes on this machine, one per GPU (default: hardware.num_gpus on a GPU, 1 on a CPU); "
        "above 1 the command relaunches itself under torchrun: DDP, or FSDP with hardware.distributed: fsdp",
    )
    p.add_argument("--nnodes", type=int, default=1, help="machines in a multi-node job (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index in a multi-node job, 0..nnodes-1")
    p.add_argument(
        "--master-addr",
        default="127.0.0.1",
        help="address of node 0 in a multi-node job; must be in the recipe's privacy.allowed_hosts",
    )
    p.add_argument("--master-port", type=int, default=29500, help="port for the rendezvous on node 0 (default 29500)")


def train_run_dir(args: argparse.Namespace, recipe: Recipe) -> Path | None:
    """The run directory for train: --run-dir, the run --resume names (checked), or None for a new one."""
    from pipeline import checkpoints, rundir

    if args.resume is None:
        if args.nnodes > 1 and not args.run_dir:
            raise checkpoints.ResumeError(
                "--nnodes: a multi-node job needs --run-dir on storage every node shares, so all ranks write "
                "and resume the same run"
            )
        return Path(args.run_dir) if args.run_dir else None
    if args.run_dir:
        raise checkpoints.ResumeError("--resume RUN names the run directory; drop --run-dir")
    run_dir = checkpoints.resolve_run(rundir.RUNS_ROOT, recipe.name, args.resume or None)
    checkpoints.check_resumable(run_dir, recipe.to_yaml())
    return run_dir


def num_processes(args: argparse.Namespace, recipe: Recipe) -> int:
    """Processes to start on this machine; checked against the GPUs it has before anything starts."""
    from pipeline.model import DeviceUnavailable

    if args.num_processes is not None and args.num_processes < 1:
        raise DeviceUnavailable(f"--num-processes {args.num_processes}: must be 1 or more")
    if "LOCAL_RANK" in os.environ:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # already a worker
    wanted = args.num_processes
    if wanted is None:
        wanted = 1 if recipe.hardware.device == "cpu" else recipe.hardware.num_gpus
    if wanted > 1 and recipe.hardware.device != "cpu":
        from pipeline.env import gather

        env = gather()
        if env.cuda and env.num_gpus < wanted:
            raise DeviceUnavailable(
                f"{wanted} processes (one per GPU) but this machine has {env.num_gpus} GPU(s); set "
                f"--num-processes {env.num_gpus} or hardware.num_gpus"
            )
        if not env.cuda and recipe.hardware.device == "cuda":
            raise DeviceUnavailable(f"{wanted} GPU processes requested but no CUDA GPU is visible")
    if args.nnodes > 1:
        from pipeline.egress import install_egress_guard

        allowed, _ = install_egress_guard(None).decide(args.master_addr)
        if not allowed:
            raise DeviceUnavailable(
                f"--master-addr {args.master_addr} is not loopback and not in privacy.allowed_hosts: add it there "
                "(the nodes of one job must reach each other) or run on one machine"
            )
    return wanted


def launch(args: argparse.Namespace, recipe: Recipe, run_dir: Path, processes: int) -> int:
    """Run this same train command as ``processes`` workers under torchrun and wait for them.

    torchrun (``torch.distributed.run``) starts the workers, gives each its RANK / LOCAL_RANK / WORLD_SIZE and
    a rendezvous; the trainer (accelerate underneath) then sets up DDP or FSDP from those variables. All ranks
    get the same run directory, chosen here, so they read and write one run.
    """
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    if args.nnodes > 1:
        command += [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}",
            f"--master-port={args.master_port}",
        ]
    else:
        command += ["--standalone"]  # a local rendezvous on a free loopback port
    command += ["-m", "pipeline", "train", args.recipe]
    for override in args.overrides:
        command += ["--set", override]
    command += ["--resume", str(run_dir)] if args.resume is not None else ["--run-dir", str(run_dir)]
    if args.force:
        command.append("--force")
    kind = recipe.hardware.distributed.upper()
    print(f"Launching {processes} x {args.nnodes} training processes ({kind}) with torchrun; run directory {run_dir}")
    code = subprocess.call(command)
    if code != 0:
        raise JobFailed(f"a training process failed (torchrun exit code {code}); see the messages above")
    print(f"Run directory: {run_dir}")
    return 0
