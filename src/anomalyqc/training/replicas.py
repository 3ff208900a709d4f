"""Checks that the processes of a distributed run hold the same networks.

DistributedDataParallel averages gradients and broadcasts batch-norm buffers, so replicas
stay bit-identical only while nothing changes a weight outside that path (an in-place edit on
one rank, a rank-dependent random draw in a module, processes on different library
versions). A divergence would not fail by itself: each rank would go on training its own
model and rank 0 would save one of them. The trainer compares SHA-256 digests of every
network's state (parameters and buffers) across ranks after each epoch and at the end, and
stops the run with the networks and ranks that differ.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from anomalyqc import distributed
from anomalyqc.errors import ConfigError


class ReplicaError(ConfigError):
    """The processes of one training run hold different weights."""


def network_digest(net: nn.Module) -> bytes:
    """SHA-256 of a network's state: names, dtypes, shapes and bytes of every tensor, in
    name order (so a state read back from a file, sorted, gives the same digest)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.digest()


def weights_digest(nets: dict[str, nn.Module]) -> str:
    """Hex SHA-256 of all networks (sorted by name): equal digests, equal weights."""
    return _combined({name: network_digest(net) for name, net in nets.items()})


def _combined(digests: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode() + b"\n" + digests[name])
    return h.hexdigest()


def differences(digests: list[dict[str, bytes]]) -> list[str]:
    """'network (ranks a, b)' for every network some rank holds differently from rank 0."""
    out = []
    for name in sorted(digests[0]):
        ranks = [r for r, d in enumerate(digests) if d.get(name) != digests[0][name]]
        if ranks:
            out.append(f"{name!r} (rank{'s' if len(ranks) > 1 else ''} "
                       f"{', '.join(map(str, ranks))})")
    return out


def check_replicas(nets: dict[str, nn.Module], when: str) -> list[str]:
    """Every rank's weights_digest, in rank order; raises ReplicaError when a rank's
    networks differ from rank 0's. A collective: every rank must call it."""
    names = sorted(nets)
    own = {name: network_digest(nets[name]) for name in names}
    overall = _combined(own)
    if not distributed.active():
        return [overall]
    # one row per network, then the overall digest: (networks + 1, 32) bytes as int64
    rows = torch.tensor([list(own[n]) for n in names] + [list(bytes.fromhex(overall))],
                        dtype=torch.int64)
    gathered = [[bytes(r.tolist()) for r in g] for g in distributed.all_gather_rows(rows)]
    bad = differences([dict(zip(names, g[:-1], strict=True)) for g in gathered])
    if bad:
        raise ReplicaError(f"the training processes diverged {when}: network {', '.join(bad)} "
                           f"no longer equal to rank 0's; something changed weights outside "
                           f"the optimizer on some ranks, or the processes run different "
                           f"library versions: train with --nproc 1 until it is fixed")
    return [g[-1].hex() for g in gathered]


__all__ = ["ReplicaError", "check_replicas", "differences", "network_digest", "weights_digest"]
