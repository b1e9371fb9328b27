"""Multi-process launch on GPUs (NCCL) or on CPUs (gloo, same flags), safe to interrupt.

On a CPU-only machine ``--num-gpus N`` means N gloo processes, so multi-process behaviour
(all-reduces, gathers, sharded samplers) can be run and tested anywhere with the same scripts.

Signals (engine/signals.py): the launcher forwards SIGTERM, SIGINT and SIGUSR1 to its worker
processes (a scheduler or ``kill`` may signal the launcher only); the workers stop at the same
step with a checkpoint and exit with EXIT_INTERRUPTED, and :func:`launch` raises
TrainingInterrupted; :func:`launch_from_args` turns it into that exit code.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from .signals import (
    EXIT_INTERRUPTED,
    INTERRUPT_SIGNALS,
    TrainingInterrupted,
    handling,
    interrupt_immediately,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
# When one worker ends (an interruption, an error), the others get this long to end by
# themselves (flush logs and metrics) before they are terminated.
GRACE_SECONDS = 20.0


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
    """Run ``main_func(*args)`` in ``num_gpus_per_machine * num_machines`` processes.

    Raises:
        TrainingInterrupted: a worker was interrupted (it exited with EXIT_INTERRUPTED).
    """
    world_size = num_gpus_per_machine * num_machines
    if world_size == 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine: give tcp://HOST:PORT")
        dist_url = free_local_url()
    workers: list = []
    pending: list[int] = []

    def forward(signum, frame) -> None:
        if not workers:  # still starting: replayed once they exist
            pending.append(signum)
        for process in workers:
            if process.is_alive():
                os.kill(process.pid, signum)

    with handling(INTERRUPT_SIGNALS, forward):
        context = mp.start_processes(
            _worker,
            nprocs=num_gpus_per_machine,
            args=(
                main_func,
                world_size,
                num_gpus_per_machine,
                machine_rank,
                dist_url,
                args,
                timeout,
            ),
            daemon=False,
            start_method="spawn",
            join=False,
        )
        workers.extend(context.processes)
        for signum in pending:  # arrived while the workers were starting
            forward(signum, None)
        try:
            while not context.join(grace_period=GRACE_SECONDS):
                pass
        except mp.ProcessExitedException as e:
            if e.exit_code == EXIT_INTERRUPTED:
                raise TrainingInterrupted(
                    f"worker {e.error_index} was interrupted (exit {EXIT_INTERRUPTED}); its log "
                    "names the checkpoint; --resume continues"
                ) from None
            raise


def _worker(
    local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout
) -> None:
    rank = machine_rank * per_machine + local_rank
    cuda = torch.cuda.is_available()
    if cuda:
        if per_machine > torch.cuda.device_count():
            raise RuntimeError(f"--num-gpus {per_machine}: only {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local_rank)
    with interrupt_immediately():
        try:
            dist.init_process_group(
                "nccl" if cuda else "gloo",
                init_method=dist_url,
                world_size=world_size,
                rank=rank,
                timeout=timeout,
            )
            # Detectron2's comm.get_local_rank() needs the group of this machine's processes.
            for machine in range(world_size // per_machine):
                ranks = list(range(machine * per_machine, (machine + 1) * per_machine))
                group = dist.new_group(ranks)
                if machine == machine_rank:
                    comm._LOCAL_PROCESS_GROUP = group
            comm.synchronize()
            main_func(*args)
        except TrainingInterrupted as e:
            logger.warning("Rank %d: %s", rank, e)
            sys.exit(EXIT_INTERRUPTED)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def launch_from_args(main_func: Callable, args) -> None:
    """``launch(main_func, ...)`` with detectron2's default_argument_parser flags, main(args).

    An interrupted run (signals.py) exits with EXIT_INTERRUPTED; run it again with --resume.
    """
    try:
        with interrupt_immediately():
            launch(
                main_func,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=args.dist_url,
                args=(args,),
            )
    except TrainingInterrupted as e:
        logging.getLogger("bissl_det").warning("%s (exit code %d)", e, EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
