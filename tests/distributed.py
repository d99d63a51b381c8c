"""Run a function on several CPU processes joined by a gloo process group."""

import datetime
import faulthandler
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, port, timeout_s, fn, args):
    faulthandler.enable()  # a native abort prints the Python stack it happened under
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    if not getattr(fn, "leaves_early", False):
        dist.barrier()  # no rank tears its gloo context down while a peer still talks to it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # The rank's work is done and checked: leave without interpreter teardown, where gloo's
    # IO threads have been seen to abort ("terminate called without an active exception").
    os._exit(0)


def run_world(world, fn, *args, timeout_s=60):
    """Call ``fn(rank, world, *args)`` on ``world`` gloo processes; any exception fails the caller.

    Ranks meet at a barrier before tearing down, unless ``fn.leaves_early`` (a rank that dies on purpose).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(world, port, timeout_s, fn, args), nprocs=world, join=True)
