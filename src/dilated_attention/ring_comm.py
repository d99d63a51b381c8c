"""All communication of ring dilated attention: agreement checks and packed P2P exchanges."""

from __future__ import annotations

import zlib
from typing import Sequence

import torch
import torch.distributed as dist


class RingCommError(RuntimeError):
    """Communication inside the process group failed: a rank died, timed out, or disagreed."""


def _device_for(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def fingerprint(value) -> int:
    """A stable 31-bit integer for any value with a deterministic repr."""
    return zlib.crc32(repr(value).encode()) & 0x7FFFFFFF


def check_agreement(group, fields: dict[str, int], local_error: Exception | None = None) -> None:
    """All-gather ``fields`` and whether this rank's local checks failed; raise on every rank at once.

    A rank whose checks failed re-raises its own error; the others raise a ValueError naming
    it. Otherwise, if any field differs, every rank raises the same ValueError.
    """
    names = ["local_error", *fields]
    values = [int(local_error is not None), *fields.values()]
    mine = torch.tensor(values, dtype=torch.int64, device=_device_for(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(gathered, mine, group=group)
    except Exception as e:  # gloo/NCCL raise RuntimeError or DistBackendError on a dead peer or timeout
        raise RingCommError(f"ring dilated attention: the agreement all_gather failed (a rank died or timed out): {e}") from e
    rows = torch.stack(gathered).cpu()
    failed = [r for r in range(rows.shape[0]) if rows[r, 0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"ring dilated attention: rank(s) {failed} of the group failed their input checks "
                         "(their own error says why); no rank attends")
    bad = [names[j] for j in range(1, len(names)) if not bool((rows[:, j] == rows[0, j]).all())]
    if bad:
        detail = "; ".join(f"{name}: {rows[:, names.index(name)].tolist()}" for name in bad)
        raise ValueError(f"ring dilated attention: ranks disagree on {', '.join(bad)} (per rank: {detail})")


class Exchange:
    """One packed P2P round: send flat buffers to peers and receive into others, asynchronously."""

    def __init__(self, group, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], stats: dict, phase: str):
        ops = []
        for peer, buf in sends.items():
            ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(group, peer), group))
            stats[phase] = stats.get(phase, 0) + buf.numel() * buf.element_size()
        for peer, buf in recvs.items():
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
        self.recvs = recvs
        self._keep = sends  # buffers must live until the sends complete
        try:
            self._requests = dist.batch_isend_irecv(ops) if ops else []
        except Exception as e:
            raise RingCommError(f"ring dilated attention: posting P2P exchange failed: {e}") from e

    def wait(self) -> dict[int, torch.Tensor]:
        try:
            for req in self._requests:
                req.wait()
        except Exception as e:
            raise RingCommError(
                f"ring dilated attention: P2P exchange failed (a rank died or timed out): {e}"
            ) from e
        return self.recvs


def pack(tensors: Sequence[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """Concatenate flattened tensors into one contiguous buffer of ``dtype``."""
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def unpack(buf: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Split a flat buffer into views of the given shapes."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [part.view(s) for part, s in zip(buf.split(sizes), shapes)]
