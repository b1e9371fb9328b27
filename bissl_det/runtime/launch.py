"""Multi-process launch on GPUs (NCCL) or on CPUs (gloo, same flags), safe to interrupt.

On a CPU-only machine ``--num-gpus N`` means N gloo processes, so multi-process behaviour
(all-reduces, gathers, sharded samplers) can be run and tested anywhere with the same scripts.

Signals (runtime/signals.py): the launcher forwards SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 to its
worker processes (a scheduler or ``kill`` may signal the launcher only; a signal that reaches
every process, as Slurm's do, arrives twice, which changes nothing); the workers stop at the
same step with a checkpoint and exit with EXIT_INTERRUPTED, and :func:`launch` raises
TrainingInterrupted; :func:`launch_from_args` turns it into that exit code. A worker that a
signal ended before it could handle it (while it was starting) counts as interrupted too.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

from ..utils.distributed import collective_timeout, cores_each
from .signals import (
    EXIT_INTERRUPTED,
    INTERRUPT_SIGNALS,
    SignalForwarder,
    TrainingInterrupted,
    interrupt_immediately,
    signal_name,
)

logger = logging.getLogger(__name__)

# When one worker ends (an interruption, an error), the others get this long to end by
# themselves (flush logs and metrics) before they are terminated.
GRACE_SECONDS = 20.0


def _tcp_address(dist_url: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp://HOST:PORT`` URL; None for other rendezvous (``file://``)."""
    if not dist_url.startswith("tcp://"):
        return None
    host, _, port = dist_url[len("tcp://") :].rpartition(":")
    return host, int(port)


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta | None = None,
    grace_s: float = GRACE_SECONDS,
) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine * num_machines`` processes.

    ``timeout``: how long a collective waits for a peer; default $BISSL_DIST_TIMEOUT seconds
    (10 minutes), see :func:`~bissl_det.utils.distributed.collective_timeout`. ``grace_s``: how
    long the other workers get to end by themselves once one has ended.

    Raises:
        TrainingInterrupted: a worker was interrupted (it exited with EXIT_INTERRUPTED).
    """
    world_size = num_gpus_per_machine * num_machines
    if world_size == 1:
        main_func(*args)
        return
    timeout = collective_timeout() if timeout is None else timeout
    store = None
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine: give tcp://HOST:PORT")
        store = dist.TCPStore("127.0.0.1", 0, world_size, True, timeout, wait_for_workers=False)
        dist_url = f"tcp://127.0.0.1:{store.port}"
    elif (address := _tcp_address(dist_url)) is not None and machine_rank == 0:
        store = dist.TCPStore(*address, world_size, True, timeout, wait_for_workers=False)
    # This process holds the rendezvous store, not rank 0 (torch's default): the ranks of a
    # run that stops together end in any order, and a rank 0 that ended first took the store
    # from a peer still shutting down its group (it aborted: "terminate called without an
    # active exception"). The store lives until every worker here has ended.
    with SignalForwarder() as forwarder:
        start_resource_tracker()
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
        forwarder.add(p.pid for p in context.processes)
        try:
            while not context.join(grace_period=grace_s):
                pass
        except mp.ProcessExitedException as e:
            if e.exit_code == EXIT_INTERRUPTED:
                raise TrainingInterrupted(
                    f"worker {e.error_index} was interrupted (exit {EXIT_INTERRUPTED}); its log "
                    "names the checkpoint; --resume continues"
                ) from None
            stopped_by = {signal_name(s) for s in INTERRUPT_SIGNALS} & {e.signal_name}
            if forwarder.received and stopped_by:
                raise TrainingInterrupted(
                    f"worker {e.error_index} was ended by {e.signal_name} before it handled "
                    "signals (starting up): --resume continues from the last checkpoint"
                ) from None
            raise


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (spawn uses it) with SIGUSR1/SIGUSR2 blocked.

    The tracker ignores SIGINT and SIGTERM itself, but a job-wide SIGUSR1/SIGUSR2 (Slurm's
    ``--signal``) would kill it: it restarts, forgets what it tracked and prints KeyErrors. A
    blocked signal stays pending for good: it never reaches the tracker.
    """
    from multiprocessing import resource_tracker

    warnings = {signal.SIGUSR1, signal.SIGUSR2}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, warnings)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def threads_per_process(per_machine: int) -> int | None:
    """CPU threads for each of a machine's ``per_machine`` processes (8 ranks must not each
    use all the cores); None when ``OMP_NUM_THREADS`` is set."""
    return cores_each(per_machine)


def _worker(
    local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout
) -> None:
    rank = machine_rank * per_machine + local_rank
    threads = threads_per_process(per_machine)
    if threads is not None:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    if cuda:
        if per_machine > torch.cuda.device_count():
            raise RuntimeError(f"--num-gpus {per_machine}: only {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local_rank)
    with interrupt_immediately():
        try:
            address = _tcp_address(dist_url)
            rendezvous = (
                {"init_method": dist_url}
                if address is None
                else {"store": dist.TCPStore(*address, world_size, False, timeout)}
            )
            dist.init_process_group(
                "nccl" if cuda else "gloo",
                world_size=world_size,
                rank=rank,
                timeout=timeout,
                **rendezvous,
            )
            # Detectron2's comm.get_local_rank() needs the group of this machine's processes.
            for machine in range(world_size // per_machine):
                ranks = list(range(machine * per_machine, (machine + 1) * per_machine))
                group = dist.new_group(ranks)
                if machine == machine_rank:
                    comm._LOCAL_PROCESS_GROUP = group
            # Every group the run uses, and a collective on each, before any long work: a
            # network misconfiguration between nodes fails now, not at the first checkpoint
            # (detectron2 makes its gloo group, which gathers checkpoint state, on first use).
            comm.synchronize()
            dist.barrier(group=comm._get_global_gloo_group())
            main_func(*args)
        except TrainingInterrupted as e:
            logger.warning("Rank %d: %s", rank, e)
            sys.exit(EXIT_INTERRUPTED)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def launch_from_args(main_func: Callable, args) -> None:
    """``launch(main_func, ...)`` with detectron2's default_argument_parser flags, main(args).

    On one machine without ``--dist-url``, a free local port is used (``auto``).

    An interrupted run (signals.py) exits with EXIT_INTERRUPTED; run it again with --resume.
    """
    dist_url = args.dist_url
    if args.num_machines == 1 and dist_url == default_argument_parser().get_default("dist_url"):
        # detectron2's default is one fixed port per user (in the ephemeral range): a second
        # run on the same machine would fail with "address already in use".
        dist_url = "auto"
    try:
        with interrupt_immediately():
            launch(
                main_func,
                args.num_gpus,
                num_machines=args.num_machines,
                machine_rank=args.machine_rank,
                dist_url=dist_url,
                args=(args,),
            )
    except TrainingInterrupted as e:
        logging.getLogger("bissl_det").warning("%s (exit code %d)", e, EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
