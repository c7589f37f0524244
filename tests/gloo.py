"""Run a function in N gloo processes on this machine (the multi-process tests' one set-up).

Every rank meets at a barrier before the group is torn down and frees its DDP wrappers first: a
rank that destroys its gloo group while a peer still holds a connection or a DDP reducer aborts
the process ("terminate called without an active exception"), which made these tests flaky on
2-core machines."""
import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, world, port, fn, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world, *args):
    """fn(rank, world, *args) in `world` processes (fn defined at a test module's top level)."""
    mp.spawn(_run, args=(world, free_port(), fn, args), nprocs=world, join=True)
