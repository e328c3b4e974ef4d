"""The training loop: a plain step (data -> losses -> backward -> optimizer step) and hooks that do the
periodic work around it, in the spirit of detectron2's ``SimpleTrainer`` + ``HookBase``.

Why hooks: logging, checkpointing, the non-finite-loss guard, debug records and the final evaluation
each need a moment of the loop, not a place inside it. Adding gradient clipping, EMA or periodic
evaluation is one more small hook object, not an edit in the middle of the loop.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator


def total_loss(losses: dict):
    """The sum of the terms named ``loss*`` (others, like ``acc``, are logged only), as mmengine's
    ``parse_losses``."""
    return sum(v for k, v in losses.items() if "loss" in k)


class HookBase:
    """Override the moments you need; ``self.trainer`` is set when the hook is registered.

    ``trainer.iter`` counts completed iterations: in ``after_forward`` the step being run is
    ``iter + 1``, in ``after_step`` it is ``iter``."""
    trainer: Trainer

    def before_train(self) -> None:
        pass

    def after_forward(self) -> None:
        """The step's losses are computed (``trainer.losses``, ``trainer.loss``), nothing is applied yet."""

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        """Called also when training stopped with an exception (``trainer.finished`` is False then)."""


class Trainer:
    """Runs ``max_iter - start_iter`` steps of ``losses_of(*next(data))`` with an SGD-style optimiser,
    a per-iteration scheduler and a (possibly disabled) AMP grad scaler, calling the hooks around each."""

    def __init__(self, data: Iterator, losses_of: Callable[..., dict], optimizer, scheduler, scaler,
                 sync: Callable[[], None] | None = None):
        self.data = data
        self.losses_of = losses_of
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.sync = sync  # torch.cuda.synchronize on the GPU: step_time is the step's device time
        self.hooks: list[HookBase] = []
        self.iter = self.start_iter = self.max_iter = 0

    def register_hooks(self, hooks) -> None:
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    @property
    def finished(self) -> bool:
        return self.iter >= self.max_iter

    def train(self, start_iter: int, max_iter: int) -> None:
        self.iter, self.start_iter, self.max_iter = start_iter, start_iter, max_iter
        try:
            for h in self.hooks:
                h.before_train()
            while self.iter < self.max_iter:
                self.run_step()
                self.iter += 1
                for h in self.hooks:
                    h.after_step()
        finally:
            for h in self.hooks:
                h.after_train()

    def run_step(self) -> None:
        t0 = time.perf_counter()
        self.images, self.targets = next(self.data)
        t1 = time.perf_counter()
        self.losses = self.losses_of(self.images, self.targets)
        self.loss = total_loss(self.losses)
        for h in self.hooks:
            h.after_forward()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(self.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.sync:
            self.sync()
        self.data_time, self.step_time = t1 - t0, time.perf_counter() - t1
