"""The processes of a tensor-parallel executor: rank 0 (the one serving gRPC) starts the followers,
joins them in one torch.distributed group and sends them its commands; a rank that dies takes the
executor down.

Commands go over one pipe per follower, pickled, not over the process group: a follower waits for
its next command for as long as the executor is idle, where a collective would time out, and a
closed pipe tells it that rank 0 is gone. The collectives of a forward (all-reduces, the logits
gather) carry a timeout, so a rank that stops answering fails the forward instead of hanging it;
a rank that exits is noticed at once (gloo reports the closed connection, and rank 0 watches the
followers' processes).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from services.common.ports import free_port
from services.executor.parallel import Rank

log = logging.getLogger("radixserve.executor")
RANK_EXIT_CODE = 4  # rank 0's exit status when another rank died or a collective failed
COLLECTIVE_TIMEOUT_S = 600.0  # a collective waiting this long fails (a rank alive but stuck)
JOIN_TIMEOUT_S = 10.0


def init_process_group(rank: Rank, port: int, device: torch.device, timeout_s: float) -> None:
    """Joins the ranks: NCCL between GPUs, gloo on the CPU; rank 0 hosts the rendezvous."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank.index,
        world_size=rank.size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def all_ranks_min(value: int) -> int:
    """The smallest of every rank's `value` (a collective: every rank must call it)."""
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class RankGroup:
    """Rank 0's handle on the follower ranks 1 .. size-1: their processes and command pipes.

    `start` spawns them running `target(rank, port, conn, *args)`; from then on a follower that
    exits before `close` ends this process with RANK_EXIT_CODE and a log line naming it (a
    watcher thread waits on their processes). `send` is called on the forward thread only."""

    def __init__(self, procs: list[Any], conns: list[Connection], port: int) -> None:
        self.procs, self.conns, self.port = procs, conns, port
        self.closing = False

    @classmethod
    def start(cls, size: int, target: Callable[..., None], args: tuple[Any, ...]) -> RankGroup:
        """Spawns the followers; returns with them starting up (rank 0 joins the process group
        next, with `init_process_group` on the group's `port`)."""
        ctx = multiprocessing.get_context("spawn")
        port = free_port()
        procs, conns = [], []
        for index in range(1, size):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=target,
                args=(Rank(index, size), port, receiver, *args),
                name=f"tp-rank-{index}",
                daemon=True,  # ended with rank 0 on a normal exit; a closed pipe ends them too
            )
            proc.start()
            receiver.close()
            procs.append(proc)
            conns.append(sender)
        group = cls(procs, conns, port)
        threading.Thread(target=group._watch, name="tp-watch", daemon=True).start()
        log.info("started tensor-parallel ranks 1..%d (pids %s)", size - 1, [p.pid for p in procs])
        return group

    def send(self, command: object) -> None:
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        for index, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as exc:
                self.abort(f"cannot reach tensor-parallel rank {index}: {exc}")

    def abort(self, reason: str) -> NoReturn:
        """Ends this process, and so every rank. A failed collective is most often the work of
        a follower that died: where one has exited (within a second), it is named instead."""
        reason = self._exited(timeout_s=1.0) or reason
        log.critical("%s; stopping the executor", reason)
        logging.shutdown()
        os._exit(RANK_EXIT_CODE)

    def _exited(self, timeout_s: float | None) -> str | None:
        """Waits up to `timeout_s` (None: for good) for a follower to exit; says which did."""
        by_sentinel = {p.sentinel: (i, p) for i, p in enumerate(self.procs, start=1)}
        ready = multiprocessing.connection.wait(list(by_sentinel), timeout_s)
        if not ready:
            return None
        index, proc = by_sentinel[ready[0]]  # type: ignore[index]
        proc.join(1.0)
        return f"tensor-parallel rank {index} (pid {proc.pid}) exited with code {proc.exitcode}"

    def _watch(self) -> None:
        reason = self._exited(timeout_s=None)
        if not self.closing:
            self.abort(reason or "a tensor-parallel rank exited")

    def close(self) -> None:
        """Stops the followers (a closed pipe ends them) and leaves the process group."""
        self.closing = True
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.join(JOIN_TIMEOUT_S)
            if proc.is_alive():
                log.warning("tensor-parallel rank %s did not stop; killing it", proc.name)
                proc.kill()
                proc.join()
        if dist.is_initialized():
            dist.destroy_process_group()


def receive(conn: Connection) -> object | None:
    """A follower's next command; None once rank 0 has closed the pipe (or died)."""
    try:
        return pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return None
