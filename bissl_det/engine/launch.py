"""Multi-process launch on GPUs (Detectron2's NCCL launch) or on CPUs (gloo, same flags).

Detectron2's ``launch`` requires CUDA. On a CPU-only machine ``--num-gpus N`` here means N gloo
processes, so multi-process behaviour (all-reduces, gathers, sharded samplers) can be run and
tested anywhere with the same scripts.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

DEFAULT_TIMEOUT = timedelta(minutes=30)


def free_local_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine * num_machines`` processes."""
    if torch.cuda.is_available():
        detectron2_launch(
            main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url, args, timeout
        )
        return
    world_size = num_gpus_per_machine * num_machines
    if world_size == 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine: give tcp://HOST:PORT")
        dist_url = free_local_url()
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _cpu_worker(
    local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout
) -> None:
    rank = machine_rank * per_machine + local_rank
    dist.init_process_group(
        "gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
    )
    # Detectron2's comm.get_local_rank() needs the group of this machine's processes.
    for machine in range(world_size // per_machine):
        group = dist.new_group(list(range(machine * per_machine, (machine + 1) * per_machine)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_from_args(main_func: Callable, args) -> None:
    """``launch(main_func, ...)`` with detectron2's default_argument_parser flags, main(args)."""
    launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
