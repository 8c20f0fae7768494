"""The one training loop under every method: accumulation, evaluation points, early stopping,
tqdm progress and exact resume.

A method supplies ``loss_fn(batch, step_ctx) -> Tensor`` (one micro-batch) and ``val_fn() -> float``;
the loop owns order, accumulation, optimizer steps, evaluation every ``len(epoch)/evals_per_epoch``
micro-batches, patience, the best state, and the checkpoint in ``state/<tag>.pt``.

Resume is exact: the checkpoint stores trainable tensors, their accumulated ``.grad``, the optimizer,
the loop position (epoch, micro-batch), early-stopping state, best state and all RNG states; the data
order of each epoch is a pure function of (seed, epoch), so a killed run started again with the same
command reproduces the uninterrupted run bit for bit on the same machine.

Data parallel (``torchrun``, :mod:`unlearn_fast.distributed`): with an initialised process group of
N ranks, global micro-batch ``b`` (the 1-process one) is split into N slices; rank ``r`` backpropagates
its loss scaled by its share ``n_r / n``, and at each optimizer step one SUM all-reduce of a flat bucket
(the ``trainable`` tensors' gradients, the loss, the checkpoint / SIGTERM flags and the owner modules'
floating buffers, e.g. BatchNorm running statistics, averaged) gives every rank the gradient of the
global batch - what DDP does, over the trainable part only (a frozen reference never enters the bucket).
Ranks start from rank 0's trainable values (broadcast once). Validation runs on every rank over the
whole split (identical weights, identical score; rank 0's is broadcast so the early-stopping decisions
agree bit for bit). The checkpoint is written by rank 0 and holds every rank's RNG state and (mid
accumulation) local gradients, so a resumed N-process run continues exactly; ``log.csv`` and the
progress output are rank 0's. Losses that are means over their samples give the 1-process result up
to float summation order; a loss with batch-level terms (WF's ``1 / S_u``, random draws per batch) gets
its slice's place in the global batch (``step_ctx["slice"]``) and computes the global terms itself
(:func:`fit`: ``collective_loss``, ``shared_generators``), matching 1 process up to round-off too.
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

from unlearn_fast import distributed as ddp
from unlearn_fast.checkpoint import atomic_save, capture_rng, load_state, restore_rng
from unlearn_fast.data import make_loader

__all__ = ["LoopConfig", "LoopResult", "fit", "NonFiniteError", "LOG_HEADER"]

LOG_HEADER = "stage,epoch,micro,step,val,loss,time_s,img_s"
LOG_HEADER_V1 = "stage,epoch,micro,step,val,loss,time_s"  # before img_s; rows appended to such a file keep its columns


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
    num_workers: int = 0                  # DataLoader worker processes (dataset= path)
    pin_memory: bool | None = None        # page-locked batches; None: on when the device is CUDA
    channels_last: bool = False           # 4-D inputs (and a module owner) in torch.channels_last


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


def _to(batch: Any, device, channels_last: bool = False) -> Any:
    if torch.is_tensor(batch):
        if channels_last and batch.dim() == 4:
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device, channels_last) for v in batch)
    return batch


def _owner_modules(params_owner) -> list[nn.Module]:
    if isinstance(params_owner, nn.Module):
        return [params_owner]
    if callable(params_owner):
        return []
    return list(params_owner)


def _float_buffers(modules: Sequence[nn.Module]) -> list[Tensor]:
    """Floating buffers (BatchNorm running statistics) of the owner modules, each once."""
    seen, out = set(), []
    for m in modules:
        for b in m.buffers():
            if b.is_floating_point() and id(b) not in seen:
                seen.add(id(b))
                out.append(b)
    return out


def fit(*, params_owner: nn.Module | Sequence[nn.Module] | Callable[[], dict[str, Tensor]],
        trainable: Sequence[Tensor], optimizer: torch.optim.Optimizer, dataset, cfg: LoopConfig,
        loss_fn: Callable[[Any, dict], Tensor], val_fn: Callable[[], float] | None,
        state_path: str | Path, generators: dict[str, torch.Generator] | None = None,
        after_step: Callable[[], None] | None = None, device: torch.device | str = "cpu",
        log_path: str | Path | None = None, load_best: Callable[[dict[str, Tensor]], None] | None = None,
        batches: Callable[[int, int], Any] | None = None, n_batches: int | None = None,
        fingerprint: str | None = None, shared_generators: Sequence[str] = (),
        collective_loss: bool = False) -> LoopResult:
    """Run the loop; resumes from ``state_path`` if it exists. ``params_owner`` gives the state dict
    that is checkpointed and kept as "best" (a module, modules, or a callable returning tensors).

    Data: either ``dataset`` (shuffled per epoch by :func:`make_loader`), or ``batches(epoch, start)``
    returning that epoch's micro-batches from index ``start`` on (deterministic in (epoch, start)),
    with ``n_batches`` per epoch - e.g. paired forget/retain batches. In a process group of N ranks
    each rank takes its slice of every global micro-batch (module docstring): the ``dataset`` path
    loads only that slice; a ``batches`` callable yields the global batch, which is sliced here (every
    tensor of it by its own length, e.g. the forget and the retain part of a paired batch).

    ``fingerprint`` identifies the settings of this stage: a checkpoint made under another fingerprint
    is stale and ignored (the stage starts over). Evaluation points only run after an optimizer step
    (never on an unchanged state), early stopping waits for ``cfg.min_steps`` optimizer steps, and a
    non-finite loss, gradient or weight raises :class:`NonFiniteError` at once.

    ``step_ctx`` (the second argument of ``loss_fn``) holds epoch, micro, step, rank, world_size and
    ``slice = (start, stop, n)``: this rank's rows ``[start, stop)`` of the global micro-batch of ``n``
    rows (``(0, n, n)`` in 1 process). A loss that is not a mean over samples uses it to compute the
    1-process loss exactly (WF: :func:`unlearn_fast.methods.wf.wf_loss`); it then sets
    ``collective_loss=True`` (called on every rank for every micro-batch, also with an empty slice -
    batch None, share 0, not backpropagated - so collectives inside it never deadlock) and names in
    ``shared_generators`` the ``generators`` that must stay identical on every rank (not decorrelated)."""
    generators = dict(generators or {})
    trainable = list(trainable)
    state_path = Path(state_path)
    world, rank = ddp.world_size(), ddp.rank()
    dist_on = ddp.is_distributed()
    main = rank == 0
    dev = torch.device(device)
    owners = _owner_modules(params_owner)
    buffers = _float_buffers(owners) if dist_on else []
    if cfg.num_workers < 0:
        raise ValueError(f"{cfg.desc}: num_workers must be >= 0, got {cfg.num_workers}")
    pin = (dev.type == "cuda") if cfg.pin_memory is None else bool(cfg.pin_memory)
    if cfg.channels_last:
        for m in owners:
            m.to(memory_format=torch.channels_last)

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
    ddp.barrier()  # every rank has read the checkpoint before rank 0 may replace it
    if ck is not None and fingerprint is not None and ck.get("fingerprint") != fingerprint:
        ck = None  # made under other settings: start this stage over (the file is replaced at the next save)
    if ck is not None:
        restore(ck["owner"])  # buffers too (BatchNorm running statistics)
        grads = _rank_grads(ck, rank, world)
        with torch.no_grad():
            for p, v, g in zip(trainable, ck["trainable"], grads):
                p.copy_(v.to(p.device))
                p.grad = None if g is None else g.to(p.device).clone()
        optimizer.load_state_dict(ck["optimizer"])
        rngs = ck.get("rng_ranks")
        if rngs is not None and len(rngs) == world:
            restore_rng(rngs[rank], generators)
        else:  # 1-process checkpoint (or another world size): rank 0's streams, other ranks decorrelated
            restore_rng(ck["rng"], generators)
            if rank:
                _decorrelate(generators, rank, shared_generators)
        st = ck["loop"]
        st.setdefault("last_eval_step", -1)
        if st["done"]:
            restore(st["best_state"])
            return LoopResult(sign * st["best"], st["best_state"], st["steps"], st["epoch"], st["stopped_early"],
                              st["history"], st["seconds"])
    elif dist_on:
        ddp.broadcast_(trainable + buffers)  # identical start on every rank
        if rank:
            _decorrelate(generators, rank, shared_generators)

    def save() -> None:  # collective in a process group (the RNG states / local gradients of every rank)
        grads = [None if p.grad is None else p.grad.detach().cpu() for p in trainable]
        rng = capture_rng(generators)
        obj = {"owner": snapshot(), "trainable": [p.detach().cpu() for p in trainable], "grads": grads,
               "optimizer": optimizer.state_dict(), "rng": rng, "loop": st, "fingerprint": fingerprint}
        if dist_on:
            every = ddp.all_gather_object((rng, grads if st["accum"] else None))
            obj["rng_ranks"] = [r for r, _ in every]
            obj["world_size"] = world
            if st["accum"]:
                obj["grads_ranks"] = [g for _, g in every]
        atomic_save(obj, state_path)

    interrupted = {"flag": False}

    def _on_term(signum, frame):  # SIGTERM: finish the micro-batch, checkpoint, exit
        interrupted["flag"] = True

    old_term = signal.signal(signal.SIGTERM, _on_term) if _is_main_thread() else None
    t_start = time.perf_counter() - st["seconds"]
    last_ckpt = time.perf_counter()
    total_micro = cfg.max_epochs * n_micro
    show = cfg.progress and main
    lines = show and not _is_tty()  # no terminal: one line per evaluation instead of a bar
    bar = tqdm(total=total_micro, initial=st["epoch"] * n_micro + st["micro"], desc=cfg.desc,
               disable=not show or lines, leave=False, dynamic_ncols=True)
    log_f = _open_log(log_path) if log_path and main else None
    imgs, t_tp = 0, time.perf_counter()  # images since the last evaluation (all ranks), and since when
    try:
        while not st["done"] and st["epoch"] < cfg.max_epochs:
            sampler, stop = None, False
            if batches is not None:
                loader = batches(st["epoch"], st["micro"])
            else:
                loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=st["epoch"],
                                     start_batch=st["micro"], drop_last=cfg.drop_last, num_workers=cfg.num_workers,
                                     pin_memory=pin, rank=rank, world_size=world)
                sampler = loader.batch_sampler
            for batch in loader:
                if dist_on:
                    if sampler is not None:
                        n_glob = n_img = sampler.global_size(st["micro"])
                    else:
                        n_glob, n_img = ddp.leading_size(batch) or 0, _images(batch)
                        batch = ddp.shard_batch(batch, rank, world)
                    n_loc = (ddp.leading_size(batch) or 0) if batch is not None else 0
                    share = n_loc / n_glob if n_glob else 0.0
                    lo = ddp.shard_range(n_glob, rank, world)[0]
                    slc = (lo, lo + n_loc, n_glob)
                else:
                    n_img, share = _images(batch), 1.0
                    n_glob = ddp.leading_size(batch) or 0
                    slc = (0, n_glob, n_glob)
                imgs += n_img
                loss = None
                if share > 0 or collective_loss:
                    batch = _to(batch, device, cfg.channels_last)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and dev.type == "cuda"):
                        loss = loss_fn(batch, {"epoch": st["epoch"], "micro": st["micro"], "step": st["steps"],
                                               "rank": rank, "world_size": world, "slice": slc})
                    if share > 0:
                        (loss * share / cfg.grad_accum if dist_on else loss / cfg.grad_accum).backward()
                st["micro"] += 1
                st["accum"] += 1
                bar.update(1)
                stepped = st["accum"] == cfg.grad_accum
                ck_due = stop = False
                if dist_on and stepped:  # one all-reduce: gradients, loss, flags, buffers
                    flags = torch.tensor([time.perf_counter() - last_ckpt > cfg.ckpt_interval_s,
                                          interrupted["flag"]], dtype=torch.float32)
                    lw = (loss.detach().float() * share).reshape(1) if loss is not None and share > 0 else torch.zeros(1)
                    flat = ddp.flat_grads(trainable, [lw, flags] + [b / world for b in buffers])
                    rest = ddp.unflatten_grads_(trainable, ddp.allreduce_sum_(flat))
                    loss = rest[0]
                    ck_due, stop = bool(rest[1] > 0), bool(rest[2] > 0)
                    off = 3
                    with torch.no_grad():
                        for b in buffers:
                            b.copy_(rest[off:off + b.numel()].view_as(b).to(b.dtype))
                            off += b.numel()
                elif not dist_on:
                    ck_due = time.perf_counter() - last_ckpt > cfg.ckpt_interval_s
                    stop = interrupted["flag"]
                if stepped:
                    _check_finite(cfg.desc, loss, trainable, "loss or gradient", st)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    st["accum"] = 0
                    st["steps"] += 1
                    if after_step is not None:
                        after_step()
                    _check_finite(cfg.desc, None, trainable, "trainable weights", st)
                    bar.set_postfix(loss=f"{loss.item():.4g}", step=st["steps"],
                                    img_s=f"{imgs / max(time.perf_counter() - t_tp, 1e-9):.0f}")
                at_eval = (stepped and st["steps"] % cfg.eval_every == 0) if cfg.eval_every else st["micro"] in eval_points
                at_eval = at_eval and st["steps"] > st.get("last_eval_step", -1)  # nothing changed since the last one
                if at_eval and val_fn is not None:
                    st["last_eval_step"] = st["steps"]
                    if dist_on and not stepped:  # mid accumulation: the global batch's loss, not this slice's
                        lw = (loss.detach().float() * share).reshape(1) if loss is not None and share > 0 else torch.zeros(1)
                        loss = ddp.allreduce_sum_(lw.to(dev))[0]
                    now = time.perf_counter()
                    img_s = imgs / max(now - t_tp, 1e-9)
                    score = float(val_fn())
                    if dist_on:
                        score = float(ddp.broadcast_object(score))
                    rec = {"epoch": st["epoch"], "micro": st["micro"], "step": st["steps"], "val": score,
                           "loss": float(loss.item()) if loss is not None else math.nan, "time_s": time.perf_counter() - t_start, "img_s": img_s}
                    st["history"].append(rec)
                    if log_f:
                        log_f.write(",".join([cfg.desc.replace(",", " ")] + [f"{rec[k]}" for k in log_f.columns[1:]]) + "\n")
                        log_f.flush()
                    if lines:
                        print(f"{cfg.desc}: epoch {rec['epoch']} step {rec['step']} val {score:.4g} loss {rec['loss']:.4g} "
                              f"{img_s:.0f} img/s ({rec['time_s']:.0f} s)", flush=True)
                    if sign * score > st["best"]:
                        st["best"], st["bad"], st["best_state"] = sign * score, 0, snapshot()
                    else:
                        st["bad"] += 1
                    if cfg.patience is not None and st["bad"] >= cfg.patience and st["steps"] >= cfg.min_steps:
                        st["done"] = st["stopped_early"] = True
                    imgs, t_tp = 0, time.perf_counter()
                if cfg.max_steps is not None and st["steps"] >= cfg.max_steps:
                    st["done"] = True
                now = time.perf_counter()
                if st["done"] or stop or at_eval or ck_due:
                    st["seconds"] = now - t_start
                    if not st["done"]:
                        save()
                    last_ckpt = now
                if st["done"] or stop:
                    break
            if stop and not st["done"]:
                raise KeyboardInterrupt(f"{cfg.desc}: stopped by SIGTERM; state saved to {state_path}")
            if not st["done"]:
                st["epoch"] += 1
                st["micro"] = 0
        st["done"] = True
        if st["best_state"] is None or not cfg.restore_best:  # keep the last state
            st["best_state"] = snapshot()
            st["best"] = -math.inf
        st["seconds"] = time.perf_counter() - t_start
        if dist_on:
            st["seconds"] = float(ddp.broadcast_object(st["seconds"]))
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


def _images(batch: Any) -> int:
    """Images in a batch: the rows of its 4-D tensors (both parts of a paired forget/retain batch), else
    the rows of its first tensor."""
    def walk(b: Any) -> int:
        if torch.is_tensor(b):
            return int(b.shape[0]) if b.dim() == 4 else 0
        if isinstance(b, dict):
            return sum(walk(v) for v in b.values())
        if isinstance(b, (list, tuple)):
            return sum(walk(v) for v in b)
        return 0

    return walk(batch) or (ddp.leading_size(batch) or 0)


def _rank_grads(ck: dict, rank: int, world: int) -> list[Tensor | None]:
    """This rank's accumulated gradients from a checkpoint: its own when the world size matches; else
    rank 0 takes the sum of every saved rank's (the all-reduce is a SUM, so the step is unchanged)."""
    per = ck.get("grads_ranks")
    if per is None:
        per = [ck["grads"]]
    if len(per) == world:
        return per[rank]
    if rank:
        return [None] * len(ck["grads"])
    out = []
    for gs in zip(*per):
        gs = [g for g in gs if g is not None]
        out.append(torch.stack(gs).sum(0) if gs else None)
    return out


def _decorrelate(generators: dict[str, torch.Generator], rank: int, shared: Sequence[str] = ()) -> None:
    """Rank ``rank`` > 0 draws its own random streams (augmentation, dropout); rank 0 keeps the
    1-process streams. Generators named in ``shared`` stay as they are (the same on every rank)."""
    for name, g in generators.items():
        if name in shared:
            continue
        g.manual_seed((g.initial_seed() * 1_000_003 + rank) % (1 << 63))
    torch.manual_seed((torch.initial_seed() * 1_000_003 + rank) % (1 << 63))


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


class _Log:
    """``log.csv`` opened for appending; ``columns``: the file's header (an existing file made before a
    column was added keeps its columns, so its readers keep working)."""

    def __init__(self, path: Path) -> None:
        new = not path.exists() or path.stat().st_size == 0
        head = "" if new else path.open().readline().strip()
        self.columns = (head if head in (LOG_HEADER, LOG_HEADER_V1) else LOG_HEADER).split(",")
        self.f = open(path, "a")
        if new:
            self.write(LOG_HEADER + "\n")

    def write(self, text: str) -> None:
        self.f.write(text)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _open_log(path: str | Path) -> _Log:
    """``log.csv`` in append mode, with the header written when the file is new or empty."""
    log = _Log(Path(path))
    log.flush()
    return log


def _is_tty() -> bool:
    import sys

    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
