"""What a trainable detector gives the trainer, and what the trainer gives it back.

The detector owns its networks and its losses; the trainer owns the loop: devices, optimizers,
schedules, data order, augmentation, mixed precision, processes, checkpoints and logs. A step
of GAN-style alternation is the detector's own code, written once for one process or many:

    def training_step(self, batch, ctx):
        g, d = ctx.nets["generator"], ctx.nets["discriminator"]
        with ctx.autocast():
            fake = g(batch.image)
            real_fake = d(torch.cat([batch.image, fake.detach()]))  # one forward per module
            d_loss = bce(real_fake, targets)
        ctx.step("discriminator", d_loss)    # zero grads, backward, step D's optimizer only
        with ctx.autocast():
            g_loss = adversarial(d(fake)) + 50 * l1(fake, batch.image)
        ctx.step("generator", g_loss)
        return {"d_loss": d_loss.item(), "g_loss": g_loss.item()}

Networks are called through `ctx.nets` (under several processes these are the
DistributedDataParallel wrappers that average the gradients); randomness of the step (e.g.
anomaly synthesis) is drawn from `ctx.generator`, which is seeded per step so a resumed run
draws the same numbers.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from anomalyqc.types import Batch


@dataclass(frozen=True)
class OptimGroup:
    """An Adam optimizer over the parameters of the named networks."""

    networks: tuple[str, ...]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclass
class StepContext:
    """Handed to training_step and validation_step."""

    nets: dict[str, nn.Module]
    epoch: int
    global_step: int  # training steps completed before this one
    generator: torch.Generator  # this step's random stream, on the training device
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    _step_fn: Callable[[str, torch.Tensor, bool], None] | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision where the trainer enabled it (GPU only); a no-op otherwise."""
        if self.autocast_dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            yield

    def unwrapped(self, name: str) -> nn.Module:
        """Network `name` without its DistributedDataParallel wrapper, for a forward whose
        gradient of this network's own weights is thrown away: a GAN generator's step through
        the discriminator. Through the wrapper, DDP would wait to average gradients that
        part of the network (the real/fake head) never gets, and fail at the next forward."""
        net = self.nets[name]
        return net.module if isinstance(net, DistributedDataParallel) else net

    def step(self, optimizer: str, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Zero every network's gradients, backpropagate `loss` (scaled under mixed precision)
        and step the optimizer named `optimizer` (a key of optimizer_groups())."""
        if self._step_fn is None:
            raise RuntimeError("ctx.step is only available in training_step")
        self._step_fn(optimizer, loss, retain_graph)


class Trainable(ABC):
    """A detector trained by gradient descent (see anomalyqc.training.Trainer)."""

    # The validation_step key that early stopping and the plateau schedule watch (lower is
    # better); with no validation images, the training_step key of the same name.
    monitor: str = "loss"

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """The modules to train, by name (the names key the checkpoint's weights)."""

    @abstractmethod
    def optimizer_groups(self) -> dict[str, OptimGroup]:
        """One Adam optimizer per entry; each network in at most one."""

    @abstractmethod
    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """One step: forward, ctx.step(...) once per optimizer to update, and the losses to
        log (the same keys every step)."""

    @abstractmethod
    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """Losses on a validation batch (no gradients, networks in eval mode), as batch
        means; the trainer averages them over the validation images."""
