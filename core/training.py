"""The one training core of the suite's own trainers (the anomaly models and SAM; YOLO keeps
Ultralytics' loop and takes :func:`resolve_device` and :func:`stage_done` from here).

Plain functions and small dataclasses, no trainer class to inherit from (torchvision references'
``utils.py``, nanoGPT's single loop):

* :func:`resolve_device`, :func:`amp_enabled`: the device a run trains on;
* :func:`rng`, :func:`epoch_generator`: named random streams per (seed, epoch, position), so a
  sample draws the same augmentation in one process or many, and after a resume;
* :func:`check_finite`, :func:`backward_step`, :func:`mean_over_processes`, :class:`LossModule`:
  the pieces of one optimizer step;
* :class:`RunState`, :class:`Checkpointer`, :func:`load_weights`: ``last.pt`` / ``best.pt`` in one
  schema, resume;
* :func:`fit_loop`: the epoch loop with validate-every, best-checkpoint selection and early stopping;
* :func:`stage_done` / :func:`mark_stage_done`: a cached stage (``done.json``) a rerun reuses;
* :func:`config_from_args`, :func:`write_run_args`: configs from parsed arguments, and their record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectkit.core.atomic import atomic_torch_save, atomic_write_json, load_checkpoint
from defectkit.core.config import write_run_config
from defectkit.core.errors import ConfigError, DataError, MissingFileError, TrainingError
from defectkit.core.progress import progress

log = logging.getLogger("defectkit.training")

# ------------------------------------------------------------------------------------------ device


def resolve_device(arg: str | None, style: str = "torch") -> str:
    """``arg`` when given, else the first GPU when there is one, else ``cpu``.  ``style="ultralytics"``
    names the GPU ``"0"``, as Ultralytics' ``device=`` does; ``"torch"`` names it ``"cuda"``."""
    if arg:
        return arg
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "0" if style == "ultralytics" else "cuda"


def amp_enabled(device: str) -> bool:
    """Mixed precision (autocast + GradScaler) on CUDA only; on CPU it is off."""
    return str(device).startswith("cuda")


# ------------------------------------------------------------------------------------------ random streams

#: Every random draw of a trainer belongs to one named stream.  The keys are fixed: a run of a given
#: seed must draw what earlier versions drew for it (the demo's table is a regression check), so a new
#: stream takes a new number and no number is ever reused.
STREAMS: dict[str, Callable[[int, int, int | None], list[int]]] = {
    "epoch": lambda seed, epoch, pos: [seed, epoch],  # an epoch's shuffle (SAM's instance order)
    "flip": lambda seed, epoch, pos: [seed, epoch, pos],  # a sample's flips
    "crop": lambda seed, epoch, pos: [seed, epoch, pos, 3],  # a sample's training crop
    "defect": lambda seed, epoch, pos: [seed, epoch, 7, pos],  # a sample's synthetic defect (DRAEM)
    "prompt": lambda seed, epoch, pos: [seed, epoch, 11, pos],  # an instance's box jitter and points (SAM)
}


def rng(seed: int, epoch: int, stream: str, position: int | None = None) -> np.random.Generator:
    """The generator of ``stream`` for (seed, epoch, position in the epoch): it depends on nothing
    else, so a sample gets the same draw whichever process takes it, and a resumed run replays it."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; streams: {sorted(STREAMS)}")
    return np.random.default_rng(STREAMS[stream](seed, epoch, position))


def epoch_generator(seed: int, epoch: int):
    """A torch generator for an epoch's sample order (the anomaly trainers' draw with replacement)."""
    import torch

    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# ------------------------------------------------------------------------------------------ one step


def check_finite(value, epoch: int, step: int, lr: float) -> None:
    """Stop on a NaN/inf loss (``epoch`` and ``step`` 1-based): continuing would only write a broken
    checkpoint."""
    v = float(value)
    if not math.isfinite(v):
        raise TrainingError(f"the training loss became {v} at epoch {epoch}, step {step}: lower the learning "
                            f"rate (--lr, now {lr:g}) or check the training images")


def backward_step(loss, optimizer, scaler=None) -> None:
    """``zero_grad``, backward and step, through a GradScaler when AMP is on."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def mean_over_processes(total: float, n: int, dist=None) -> float:
    """``total / n`` over every process of a torchrun job (this process's alone otherwise)."""
    if dist is not None and dist.active:
        import torch

        t = torch.tensor([total, float(n)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        total, n = float(t[0]), int(t[1])
    return total / max(n, 1)


def LossModule(model, objective: Callable):  # noqa: N802 (a factory of a torch module class)
    """``objective(model, *inputs)`` as one ``nn.Module`` around ``model``, so that
    DistributedDataParallel sees every forward of the step (DRAEM runs two subnetworks; SAM its encoder
    and decoder) and synchronises the gradients of all of them."""
    import torch

    class _Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return objective(self.model, *inputs)

    return _Loss()


# ------------------------------------------------------------------------------------------ state, checkpoints

FORMAT = "defectkit.checkpoint/1"


@dataclass
class RunState:
    """What a checkpoint holds besides the weights (plain values only)."""

    epoch: int = -1  # last finished epoch (0-based)
    best: float = -math.inf  # the best validation score so far
    stale: int = 0  # validations since it last improved
    history: list = field(default_factory=list)

    def record(self, epoch: int, row: dict, score: float | None, min_delta: float = 1e-4) -> bool:
        """Append the epoch's history row; on a validated epoch (``score`` not None) count patience.
        True when ``score`` is a new best."""
        improved = score is not None and score > self.best + min_delta
        if improved:
            self.best, self.stale = score, 0
        elif score is not None:
            self.stale += 1
        self.epoch = epoch
        self.history.append(row)
        return improved


class Checkpointer:
    """``last.pt`` (weights, optimizer and scheduler states, the run state: what ``--resume`` needs)
    and ``best.pt`` (weights and the run state at the best validation) in one schema:
    ``{"format", "weights": {name: state_dict}, "optim": {name: state_dict}, "epoch", "best", "stale",
    "history", **meta}``.  Only the ``writer`` (rank 0 of a torchrun job) writes."""

    def __init__(self, run: Path, modules: Mapping, optimizers: Mapping | None = None, meta: dict | None = None,
                 writer: bool = True, check: tuple[str, ...] = ()):
        self.run, self.modules, self.optimizers = Path(run), dict(modules), dict(optimizers or {})
        self.meta, self.writer = dict(meta or {}), writer
        self.expect = {k: self.meta[k] for k in check}  # meta a resumed checkpoint must match

    @property
    def last(self) -> Path:
        return self.run / "last.pt"

    @property
    def best(self) -> Path:
        return self.run / "best.pt"

    def _payload(self, state: RunState) -> dict:
        return {"format": FORMAT, "weights": {k: m.state_dict() for k, m in self.modules.items()},
                **dataclasses.asdict(state), **self.meta}

    def save(self, state: RunState, improved: bool) -> None:
        if not self.writer:
            return
        payload = self._payload(state)
        if improved:
            atomic_torch_save(payload, self.best)
        atomic_torch_save({**payload, "optim": {k: o.state_dict() for k, o in self.optimizers.items()}}, self.last)

    def resume(self, device: str = "cpu") -> RunState:
        """Load ``last.pt`` into the modules and optimizers; the run state to continue from."""
        ck = load_weights(require_resumable(self.last), self.modules, device, self.expect)
        for k, o in self.optimizers.items():
            o.load_state_dict(ck["optim"][k])
        state = RunState(ck["epoch"], ck["best"], ck["stale"], ck["history"])
        log.info("resumed from %s after epoch %d (best validation %.4f)", self.last, state.epoch + 1, state.best)
        return state

    def load_best(self, device: str = "cpu") -> dict:
        return load_weights(self.best, self.modules, device, self.expect)


def require_resumable(last: Path) -> Path:
    """``last`` (the checkpoint ``--resume`` continues), or the one error every trainer gives without it."""
    if not Path(last).is_file():
        raise MissingFileError(f"--resume: {last} does not exist; nothing to resume")
    return Path(last)


def load_weights(path: Path, modules: Mapping, device: str = "cpu", expect: Mapping | None = None) -> dict:
    """Load a checkpoint of :class:`Checkpointer`'s schema into ``modules`` (each one the file holds;
    a module it does not hold keeps its weights), checking that its ``expect`` entries (e.g. the base
    model's key) match; returns the checkpoint."""
    ck = load_checkpoint(path, device)
    if ck.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} checkpoint (written by another version?): retrain, or pass the "
                        "run it came from")
    for k, v in (expect or {}).items():
        if ck.get(k) != v:
            raise ConfigError(f"{path} was trained with {k} {ck.get(k)}, not {v}: pass the same --model/--checkpoint")
    for k, m in modules.items():
        if k in ck["weights"]:
            m.load_state_dict(ck["weights"][k])
    return ck


# ------------------------------------------------------------------------------------------ the epoch loop


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    patience: int
    val_every: int = 1  # validate every N epochs and after the last one
    val_name: str = "val"  # the history column of the validation value
    min_delta: float = 1e-4
    desc: str = "train"
    quiet: bool = False
    time: float | None = None  # hours (Ultralytics' ``time``): the epoch count becomes what fits in it


def epochs_that_fit(hours: float, seconds: list[float], at_least: int) -> int:
    """Ultralytics' rule for ``time``: the budget over the mean epoch time so far (``seconds``, not
    empty), never below the epochs already done."""
    return max(at_least, math.floor(hours * 3600 / (sum(seconds) / len(seconds))))


def share_time(hours: float | None, stage_epochs: int, all_epochs: int) -> float | None:
    """A stage's part of a run's ``--time``, in proportion to its epochs (synthetic pretraining + fine-tuning)."""
    return None if hours is None else hours * stage_epochs / max(1, all_epochs)


def fit_loop(cfg: LoopConfig, state: RunState, train_epoch: Callable[[int], float],
             validate: Callable[[int, float], tuple[float, float | None]], ckpt: Checkpointer, dist=None,
             on_epochs: Callable[[int], None] | None = None) -> RunState:
    """Epochs ``state.epoch + 1 .. cfg.epochs - 1``: ``train_epoch(epoch)`` gives the mean training loss;
    on a validation epoch ``validate(epoch, loss)`` gives ``(score used for selection, value for the
    history)``, computed by rank 0 and broadcast so every process agrees on the decision.  A checkpoint
    after every epoch (``best.pt`` on a new best), history rows ``{epoch, train_loss, <val_name>, seconds}``,
    and a stop after ``patience`` validations without gain.

    With ``cfg.time`` (hours) the epoch count is re-estimated after every epoch from the mean epoch time
    (the history's, so a resumed run keeps its budget) and ``on_epochs(n)`` is told, so the caller can
    stretch its schedule to the new end, as Ultralytics does for ``time``."""
    from defectkit.core.distributed import Dist

    dist = dist or Dist()
    total = cfg.epochs

    def refit(done: int, running: float | None = None) -> None:
        """The new epoch count from the finished epochs' times (and the running one's training time)."""
        nonlocal total
        seconds = [r["seconds"] for r in state.history] + ([running] if running is not None else [])
        if cfg.time is None or not seconds:
            return
        n = dist.broadcast(epochs_that_fit(cfg.time, seconds, done) if dist.is_main else None)
        if n != total:
            log.info("--time %.3gh: %d epochs fit (%.1fs each so far)", cfg.time, n, sum(seconds) / len(seconds))
            total = bar.total = n
            if on_epochs is not None:
                on_epochs(n)

    bar = progress(desc=cfg.desc, disable=cfg.quiet or not dist.is_main, initial=state.epoch + 1, total=total)
    refit(state.epoch + 1)
    epoch = state.epoch + 1
    while epoch < total:
        t0 = time.perf_counter()
        loss = train_epoch(epoch)
        refit(epoch + 1, time.perf_counter() - t0)  # before validating: is this the last epoch?
        score = logged = None
        if (epoch + 1) % max(1, cfg.val_every) == 0 or epoch == total - 1:
            score, logged = dist.broadcast(validate(epoch, loss) if dist.is_main else None)
        row = {"epoch": epoch + 1, "train_loss": loss, cfg.val_name: logged, "seconds": time.perf_counter() - t0}
        ckpt.save(state, state.record(epoch, row, score, cfg.min_delta))
        bar.set_postfix(loss=f"{loss:.4f}", val="-" if score is None else f"{score:.3f}", best=f"{state.best:.3f}")
        bar.update()
        if state.stale >= cfg.patience:
            log.info("early stop at epoch %d: no validation gain for %d validations", epoch + 1, state.stale)
            break
        epoch += 1
    bar.close()
    if dist.is_main:
        atomic_write_json(ckpt.run / "history.json", state.history)
    return state


# ------------------------------------------------------------------------------------------ stages, configs


def stage_done(folder: Path, info: dict, name: str = "done.json") -> bool:
    """True when the stage in ``folder`` finished with exactly ``info`` (its stamp ``name``): a rerun
    reuses it instead of computing it again."""
    done = Path(folder) / name
    if done.is_file() and json.loads(done.read_text()) == json.loads(json.dumps(info, default=str)):
        log.info("stage already done: %s", done)
        return True
    return False


def mark_stage_done(folder: Path, info: dict, name: str = "done.json") -> None:
    """Written last, once the stage's outputs are all on disk."""
    atomic_write_json(Path(folder) / name, info)


def config_from_args(cls, args: argparse.Namespace, **override):
    """A config dataclass whose fields are read from the parsed arguments of the same name."""
    return cls(**{f.name: override[f.name] if f.name in override else getattr(args, f.name)
                  for f in dataclasses.fields(cls)})


def write_run_args(run: Path, config) -> dict:
    """``<run>/run_args.json``: the resolved configuration of a run (a config dataclass or the parsed
    arguments), as plain JSON; for parsed arguments also ``<run>/config.yaml``."""
    obj = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else vars(config)
    plain = json.loads(json.dumps(obj, default=str))
    atomic_write_json(Path(run) / "run_args.json", plain)
    if isinstance(config, argparse.Namespace):  # the flags themselves: --config <run>/config.yaml reruns them
        write_run_config(run, config)
    return plain
