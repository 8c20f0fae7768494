"""The one training loop under every method: accumulation, evaluation points, early stopping,
tqdm progress and exact resume.

A method supplies ``loss_fn(batch, step_ctx) -> Tensor`` (one micro-batch) and ``val_fn() -> float``;
the loop owns order, accumulation, optimizer steps, evaluation every ``len(epoch)/evals_per_epoch``
micro-batches, patience, the best state, and the checkpoint in ``state/<tag>.pt``.

Resume is exact: the checkpoint stores trainable tensors, their accumulated ``.grad``, the optimizer,
the loop position (epoch, micro-batch), early-stopping state, best state and all RNG states; the data
order of each epoch is a pure function of (seed, epoch), so a killed run started again with the same
command reproduces the uninterrupted run bit for bit on the same machine.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from unlearn_fast.checkpoint import atomic_save, capture_rng, load_state, restore_rng
from unlearn_fast.data import make_loader

__all__ = ["LoopConfig", "LoopResult", "fit", "NonFiniteError", "LOG_HEADER"]

LOG_HEADER = "stage,epoch,micro,step,val,loss,time_s"


class NonFiniteError(ValueError):
    """A loss, gradient or trainable weight became NaN/Inf: the stage stops and saves nothing."""


@dataclass
class LoopConfig:
    batch_size: int = 256
    grad_accum: int = 1
    max_epochs: int = 100
    max_steps: int | None = None          # optimizer steps; None = until early stop / max_epochs
    evals_per_epoch: int = 1
    eval_every: int | None = None         # evaluate every k optimizer steps (replaces evals_per_epoch)
    restore_best: bool = True             # end on the best-scoring state (False: the last state)
    patience: int | None = 5              # in evaluations; None disables early stopping
    min_steps: int = 0                    # early stopping cannot fire before this many optimizer steps
    mode: str = "max"                     # "max" (val accuracy) or "min" (val loss)
    seed: int = 0
    drop_last: bool = False
    ckpt_interval_s: float = 30.0         # also checkpoint at every evaluation
    amp: bool = False                     # bf16 autocast of loss_fn on CUDA
    progress: bool = True
    desc: str = "train"


@dataclass
class LoopResult:
    best_score: float
    best_state: dict[str, Tensor]
    steps: int
    epochs: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _n_batches(n: int, bs: int, drop_last: bool) -> int:
    return n // bs if drop_last else math.ceil(n / bs)


def _to(batch: Any, device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def fit(*, params_owner: nn.Module | Sequence[nn.Module] | Callable[[], dict[str, Tensor]],
        trainable: Sequence[Tensor], optimizer: torch.optim.Optimizer, dataset, cfg: LoopConfig,
        loss_fn: Callable[[Any, dict], Tensor], val_fn: Callable[[], float] | None,
        state_path: str | Path, generators: dict[str, torch.Generator] | None = None,
        after_step: Callable[[], None] | None = None, device: torch.device | str = "cpu",
        log_path: str | Path | None = None, load_best: Callable[[dict[str, Tensor]], None] | None = None,
        batches: Callable[[int, int], Any] | None = None, n_batches: int | None = None,
        fingerprint: str | None = None) -> LoopResult:
    """Run the loop; resumes from ``state_path`` if it exists. ``params_owner`` gives the state dict
    that is checkpointed and kept as "best" (a module, modules, or a callable returning tensors).

    Data: either ``dataset`` (shuffled per epoch by :func:`make_loader`), or ``batches(epoch, start)``
    returning that epoch's micro-batches from index ``start`` on (deterministic in (epoch, start)),
    with ``n_batches`` per epoch - e.g. paired forget/retain batches.

    ``fingerprint`` identifies the settings of this stage: a checkpoint made under another fingerprint
    is stale and ignored (the stage starts over). Evaluation points only run after an optimizer step
    (never on an unchanged state), early stopping waits for ``cfg.min_steps`` optimizer steps, and a
    non-finite loss, gradient or weight raises :class:`NonFiniteError` at once."""
    generators = dict(generators or {})
    trainable = list(trainable)
    state_path = Path(state_path)

    def snapshot() -> dict[str, Tensor]:
        if callable(params_owner) and not isinstance(params_owner, nn.Module):
            sd = params_owner()
        elif isinstance(params_owner, nn.Module):
            sd = params_owner.state_dict()
        else:
            sd = {f"{i}.{k}": v for i, m in enumerate(params_owner) for k, v in m.state_dict().items()}
        return {k: v.detach().clone().cpu() for k, v in sd.items()}

    def restore(sd: dict[str, Tensor]) -> None:
        if load_best is not None:
            load_best(sd)
        elif isinstance(params_owner, nn.Module):
            params_owner.load_state_dict(sd)
        else:
            raise RuntimeError("fit(): pass load_best= to restore a non-module params_owner")

    n_micro = n_batches if batches is not None else _n_batches(len(dataset), cfg.batch_size, cfg.drop_last)
    if not n_micro:
        raise ValueError(f"{cfg.desc}: the data gives no batch (dataset of {len(dataset) if dataset is not None else 0} "
                         f"samples, batch {cfg.batch_size})")
    eval_points = sorted({max(1, round(n_micro * (k + 1) / cfg.evals_per_epoch)) for k in range(cfg.evals_per_epoch)})
    sign = 1.0 if cfg.mode == "max" else -1.0

    st = {"epoch": 0, "micro": 0, "accum": 0, "steps": 0, "best": -math.inf, "bad": 0, "last_eval_step": -1,
          "best_state": None, "history": [], "done": False, "stopped_early": False, "seconds": 0.0}
    ck = load_state(state_path)
    if ck is not None and fingerprint is not None and ck.get("fingerprint") != fingerprint:
        ck = None  # made under other settings: start this stage over (the file is replaced at the next save)
    if ck is not None:
        restore(ck["owner"])  # buffers too (BatchNorm running statistics)
        with torch.no_grad():
            for p, v, g in zip(trainable, ck["trainable"], ck["grads"]):
                p.copy_(v.to(p.device))
                p.grad = None if g is None else g.to(p.device).clone()
        optimizer.load_state_dict(ck["optimizer"])
        restore_rng(ck["rng"], generators)
        st = ck["loop"]
        st.setdefault("last_eval_step", -1)
        if st["done"]:
            restore(st["best_state"])
            return LoopResult(sign * st["best"], st["best_state"], st["steps"], st["epoch"], st["stopped_early"],
                              st["history"], st["seconds"])

    def save() -> None:
        atomic_save({"owner": snapshot(), "trainable": [p.detach().cpu() for p in trainable],
                     "grads": [None if p.grad is None else p.grad.detach().cpu() for p in trainable],
                     "optimizer": optimizer.state_dict(), "rng": capture_rng(generators), "loop": st,
                     "fingerprint": fingerprint}, state_path)

    interrupted = {"flag": False}

    def _on_term(signum, frame):  # SIGTERM: finish the micro-batch, checkpoint, exit
        interrupted["flag"] = True

    old_term = signal.signal(signal.SIGTERM, _on_term) if _is_main_thread() else None
    t_start = time.perf_counter() - st["seconds"]
    last_ckpt = time.perf_counter()
    total_micro = cfg.max_epochs * n_micro
    lines = cfg.progress and not _is_tty()  # no terminal: one line per evaluation instead of a bar
    bar = tqdm(total=total_micro, initial=st["epoch"] * n_micro + st["micro"], desc=cfg.desc,
               disable=not cfg.progress or lines, leave=False, dynamic_ncols=True)
    log_f = _open_log(log_path) if log_path else None
    try:
        while not st["done"] and st["epoch"] < cfg.max_epochs:
            if batches is not None:
                loader = batches(st["epoch"], st["micro"])
            else:
                loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=st["epoch"],
                                     start_batch=st["micro"], drop_last=cfg.drop_last)
            for batch in loader:
                batch = _to(batch, device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and torch.device(device).type == "cuda"):
                    loss = loss_fn(batch, {"epoch": st["epoch"], "micro": st["micro"], "step": st["steps"]})
                (loss / cfg.grad_accum).backward()
                st["micro"] += 1
                st["accum"] += 1
                bar.update(1)
                stepped = st["accum"] == cfg.grad_accum
                if stepped:
                    _check_finite(cfg.desc, loss, trainable, "loss or gradient", st)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    st["accum"] = 0
                    st["steps"] += 1
                    if after_step is not None:
                        after_step()
                    _check_finite(cfg.desc, None, trainable, "trainable weights", st)
                    bar.set_postfix(loss=f"{loss.item():.4g}", step=st["steps"])
                at_eval = (stepped and st["steps"] % cfg.eval_every == 0) if cfg.eval_every else st["micro"] in eval_points
                at_eval = at_eval and st["steps"] > st.get("last_eval_step", -1)  # nothing changed since the last one
                if at_eval and val_fn is not None:
                    st["last_eval_step"] = st["steps"]
                    score = float(val_fn())
                    rec = {"epoch": st["epoch"], "micro": st["micro"], "step": st["steps"], "val": score,
                           "loss": float(loss.item()), "time_s": time.perf_counter() - t_start}
                    st["history"].append(rec)
                    if log_f:
                        log_f.write(",".join([cfg.desc.replace(",", " ")] + [f"{rec[k]}" for k in LOG_HEADER.split(",")[1:]]) + "\n")
                        log_f.flush()
                    if lines:
                        print(f"{cfg.desc}: epoch {rec['epoch']} step {rec['step']} val {score:.4g} loss {rec['loss']:.4g} "
                              f"({rec['time_s']:.0f} s)", flush=True)
                    if sign * score > st["best"]:
                        st["best"], st["bad"], st["best_state"] = sign * score, 0, snapshot()
                    else:
                        st["bad"] += 1
                    if cfg.patience is not None and st["bad"] >= cfg.patience and st["steps"] >= cfg.min_steps:
                        st["done"] = st["stopped_early"] = True
                if cfg.max_steps is not None and st["steps"] >= cfg.max_steps:
                    st["done"] = True
                now = time.perf_counter()
                if st["done"] or interrupted["flag"] or at_eval or now - last_ckpt > cfg.ckpt_interval_s:
                    st["seconds"] = now - t_start
                    if not st["done"]:
                        save()
                    last_ckpt = now
                if st["done"] or interrupted["flag"]:
                    break
            if interrupted["flag"]:
                raise KeyboardInterrupt(f"{cfg.desc}: stopped by SIGTERM; state saved to {state_path}")
            if not st["done"]:
                st["epoch"] += 1
                st["micro"] = 0
        st["done"] = True
        if st["best_state"] is None or not cfg.restore_best:  # keep the last state
            st["best_state"] = snapshot()
            st["best"] = -math.inf
        st["seconds"] = time.perf_counter() - t_start
        restore(st["best_state"])
        save()
    finally:  # on Ctrl-C the last consistent checkpoint (evaluation point or interval) stands
        bar.close()
        if log_f:
            log_f.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return LoopResult(sign * st["best"], st["best_state"], st["steps"], st["epoch"], st["stopped_early"],
                      st["history"], st["seconds"])


def _check_finite(desc: str, loss: Tensor | None, trainable: Sequence[Tensor], what: str, st: dict) -> None:
    """One host sync per check: the loss, the accumulated gradients (``loss`` given) or the weights."""
    if loss is not None:
        vals = [loss.detach().float().reshape(1)] + [p.grad.detach().float().abs().amax().reshape(1)
                                                     for p in trainable if p.grad is not None]
    else:
        vals = [p.detach().float().abs().amax().reshape(1) for p in trainable if p.numel()]
    if vals and not bool(torch.isfinite(torch.cat([v.to(vals[0].device) for v in vals])).all()):
        raise NonFiniteError(f"{desc}: the {what} became NaN/Inf at optimizer step {st['steps'] + (loss is not None)} "
                             f"(epoch {st['epoch']}); the run is stopped and nothing was saved as a result - lower the "
                             "learning rate (lr) or check the data for NaN/Inf")


def _open_log(path: str | Path):
    """``log.csv`` in append mode, with the header written when the file is new or empty."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    f = open(path, "a")
    if new:
        f.write(LOG_HEADER + "\n")
        f.flush()
    return f


def _is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
