"""Checkpoints with megatron-core dist_checkpointing: loadable under another TP/PP, saved atomically.

Layout of a save directory (Megatron's):
  SAVE/iter_0000020/            a dist checkpoint: model, optimizer, and a common `state` entry holding the model
                                config, scheduler, iteration, consumed samples, identities and the distributed
                                optimizer's sharding type (`optimizer_sharding`); rng/ per-rank RNG
  SAVE/latest_checkpointed_iteration.txt
A LoRA run that starts from a checkpoint saves its adapters (and their optimizer state) alone, with the base's
path and identity in `state.base`: loading it loads that base first, refused in one line if it has changed.
A checkpoint is written to `iter_XXXXXXX.tmp`, renamed when every rank has finished, and only then named in
the tracker file (itself replaced by rename). A process killed while saving leaves the previous checkpoint
complete and selected; the stale `.tmp` is removed by the next save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import uuid

import torch
import torch.distributed as dist

from minorsft_megatron import compat
from minorsft_megatron.errors import UserError, lost_peer

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(UserError):
    """A checkpoint path that holds no usable checkpoint; one line naming it."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def resolve(path: str) -> str:
    """The checkpoint directory `path` names: itself if it is one, else the one its tracker file selects."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    tracker = os.path.join(path, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"{path}: neither a checkpoint nor a directory with {TRACKER}")
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, got {text!r}")
    selected = iteration_dir(path, int(text))
    if not os.path.isfile(os.path.join(selected, "metadata.json")):
        raise CheckpointError(f"{tracker}: selects {selected}, which is not a complete checkpoint")
    return selected


def latest(save_dir: str) -> str | None:
    """The complete checkpoint the tracker of `save_dir` selects, or None (no tracker, or a broken one)."""
    try:
        return resolve(save_dir) if has_checkpoint(save_dir) else None
    except CheckpointError:
        return None


def check_save_dir(save_dir: str) -> None:
    """Refuse a save directory holding checkpoints but no tracker: resuming would be impossible and a fresh run
    would overwrite them."""
    if not os.path.isdir(save_dir) or has_checkpoint(save_dir):
        return
    found = sorted(n for n in os.listdir(save_dir) if n.startswith("iter_") and n[5:].isdigit())
    if found:
        raise CheckpointError(
            f"{save_dir}: holds {', '.join(found)} but no {TRACKER}; write the iteration to resume from into it "
            f"(e.g. {int(found[-1][5:])}), or choose another checkpoint.save")


def _read_failures() -> tuple:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    return (Exception, CheckpointException)


READ_FAILURES = _read_failures()
"""What reading or writing a checkpoint can raise from deep inside torch and megatron-core."""


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C during a save takes effect once the save is written (the writer processes megatron-core forks keep
    this handler, so they finish too instead of printing tracebacks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _without_torch_metadata_fallback_notes():
    """torch's loader logs a traceback on the root logger when .metadata is missing, before it fails (megatron-core
    0.19 keeps the common state there, so reading it logs the same); the failure itself is reported (one line,
    with that reason)."""
    def drop(record):
        return record.module != "state_dict_loader" and not record.getMessage().startswith("Global metadata is not")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _first_line(err: BaseException) -> str:
    """`Type: first line` of an error, looking through torch's CheckpointException to the first rank's error."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))[0]  # (exception, traceback) per rank
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _damaged(path: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: cannot be read, the checkpoint is damaged or incomplete ({_first_line(err)})")


def has_checkpoint(path: str | None) -> bool:
    return path is not None and os.path.isfile(os.path.join(path, TRACKER))


def read_state(path: str) -> dict:
    """The common `state` entry of the checkpoint at `path` (no model needed): config, identities, counters."""
    import warnings

    from megatron.core import dist_checkpointing

    directory = resolve(path)
    try:
        with warnings.catch_warnings(), _without_torch_metadata_fallback_notes():  # one process reads, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            common = dist_checkpointing.load_common_state_dict(directory)
    except READ_FAILURES as err:  # a damaged file fails in many ways, deep inside torch
        raise _damaged(directory, err) from err
    if "state" not in common:
        raise CheckpointError(f"{path}: not a minorsft-megatron checkpoint (no 'state' entry)")
    return common["state"]


def _model_and_optimizer(model, optimizer, loading: bool, optimizer_sharding: str | None,
                         adapters: bool | None = None) -> dict:
    """The sharded state dicts to save or load. `optimizer_sharding`: the distributed optimizer's
    distrib_optim_sharding_type (None for the other optimizers). `adapters`: None, the whole model; False, the
    model without its LoRA adapters (a base checkpoint into an adapted model); True, the adapters alone."""
    from minorsft_megatron.lora import is_adapter_key

    model_sd = model.sharded_state_dict()
    if adapters is not None:
        model_sd = {k: v for k, v in model_sd.items() if is_adapter_key(k) == adapters}
    entries = {"model": model_sd}
    if optimizer is not None:
        metadata = None if optimizer_sharding is None else {"distrib_optim_sharding_type": optimizer_sharding}
        entries["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=metadata)
    return entries


def _rank_file(path: str) -> str:
    return os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(saved: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(saved["torch"])
    get_cuda_rng_tracker().set_states(saved["tracker"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


def new_checkpoint_id() -> str:
    """A fresh identity, the same on every rank."""
    ident = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(ident, src=0)
    return ident[0]


def save(save_dir: str, iteration: int, model, optimizer, state: dict, keep: int | None = None,
         optimizer_sharding: str | None = None, protect: int | None = None, best: dict | None = None) -> str:
    """Save on every rank (collective); returns the checkpoint directory. `state` must be the same on all ranks;
    `optimizer_sharding` is the distributed optimizer's sharding type (recorded in the state), None otherwise.
    A `state["base"]` ({"path", "checkpoint_id"} of the checkpoint a LoRA run adapts) saves the adapters alone.
    `keep` prunes all but the newest `keep` checkpoints, never the one of iteration `protect` (keep_best); `best`,
    when this save is the new best, is written to SAVE/best_checkpoint.json before anything is pruned."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(save_dir, iteration)
    tmp = f"{final}.tmp"
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    entries = _model_and_optimizer(model, optimizer, loading=False, optimizer_sharding=optimizer_sharding,
                                   adapters=True if state.get("base") else None)
    entries["state"] = dict(state, checkpoint_id=new_checkpoint_id(), iteration=iteration,
                            optimizer_sharding=optimizer_sharding)
    try:
        with _interrupts_deferred():
            dist_checkpointing.save(entries, tmp)
            os.makedirs(os.path.dirname(_rank_file(tmp)), exist_ok=True)
            torch.save(rng_state(), _rank_file(tmp))
    except READ_FAILURES as err:  # disk full, a vanished directory: one line, the previous checkpoint kept
        shutil.rmtree(tmp, ignore_errors=True)
        if lost_peer(err) is not None:  # another rank died meanwhile: its line says so (cli.run_main), not ours
            raise
        kept = latest(save_dir)
        raise CheckpointError(f"{save_dir}: saving iteration {iteration} failed ({_first_line(err)}); "
                              + (f"{kept} stays the latest complete checkpoint" if kept else "nothing was saved"))
    dist.barrier()
    if dist.get_rank() == 0:
        _commit(tmp, final, save_dir, iteration)
        if best is not None:
            write_best(save_dir, best)
        _prune(save_dir, keep, protect)
    dist.barrier()
    return final


def _commit(tmp: str, final: str, save_dir: str, iteration: int) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    tracker_tmp = os.path.join(save_dir, f"{TRACKER}.tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(save_dir, TRACKER))


def _prune(save_dir: str, keep: int | None, protect: int | None = None) -> None:
    if keep is None:
        return
    names = sorted(n for n in os.listdir(save_dir) if n.startswith("iter_") and n[5:].isdigit())
    kept = os.path.basename(iteration_dir(save_dir, protect)) if protect is not None else None
    for name in names[:-keep]:
        if name != kept:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


BEST = "best_checkpoint.json"


def write_best(save_dir: str, best: dict) -> None:
    """SAVE/best_checkpoint.json: {"keep_best", "iteration", "value", "path"}, written atomically."""
    tmp = os.path.join(save_dir, f"{BEST}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(best, f, indent=1)
    os.replace(tmp, os.path.join(save_dir, BEST))


def read_best(save_dir: str, keep_best: str) -> dict | None:
    """The best checkpoint a resumed run selected by `keep_best` so far; None when there is none (or it was chosen by
    another figure, or is gone)."""
    path = os.path.join(save_dir, BEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            best = json.load(f)
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); remove it to choose the best checkpoint anew")
    if best.get("keep_best") != keep_best or not has_iteration(save_dir, best.get("iteration")):
        return None
    return best


def has_iteration(save_dir: str, iteration) -> bool:
    return isinstance(iteration, int) and os.path.isfile(os.path.join(iteration_dir(save_dir, iteration),
                                                                      "metadata.json"))


def _load_part(model, state_dict: dict, adapters: bool, directory: str) -> None:
    """Load the model's adapters alone, or everything but them, from `state_dict`."""
    from minorsft_megatron.lora import is_adapter_key
    from minorsft_megatron.model import unwrap

    # the GPTModel's own: Float16Module's load_state_dict returns nothing
    missing, unexpected = unwrap(model).load_state_dict(state_dict, strict=False)
    left = [k for k in missing if is_adapter_key(k) == adapters]
    if unexpected or left:
        raise CheckpointError(f"{directory}: does not match the model: missing {left[:3]}, unexpected "
                              f"{unexpected[:3]}")


def base_of(directory: str, state: dict) -> str | None:
    """The base checkpoint an adapters-only checkpoint (`state` read from `directory`) needs, checked to be the one
    it was trained on; None for a checkpoint that holds its whole model."""
    base = state.get("base")
    if not base:
        return None
    path = base["path"]
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory}: holds LoRA adapters only and its base checkpoint {path} is gone")
    found = read_state(path)["checkpoint_id"]
    if found != base["checkpoint_id"]:
        raise CheckpointError(f"{directory}: its base checkpoint {path} has changed (checkpoint {found}, the "
                              f"adapters were trained on {base['checkpoint_id']})")
    return path


def load(path: str, model, optimizer=None, layout: dict | None = None, current_schedule: bool = False,
         base_only: bool = False) -> dict:
    """Load `path` (a checkpoint or a save directory) into `model` (and `optimizer`); returns its state.

    The RNG states are restored only when `layout` is the layout the checkpoint was saved under.
    `current_schedule`: the optimizer's parameter groups keep their current lr and wd values (a schedule
    recomputed from this run's config), not the checkpoint's. `base_only`: every weight but `model`'s LoRA
    adapters, which keep their starting values (a base checkpoint). An adapters-only checkpoint loads its base
    (base_of) first."""
    from megatron.core import dist_checkpointing

    directory = resolve(path)
    state = read_state(directory)
    base = base_of(directory, state)
    if base is not None:
        if base_only:
            raise CheckpointError(f"{directory}: holds LoRA adapters only, not a base model")
        load(base, model, base_only=True)
    part = False if base_only else (True if base else None)  # the model without, or only, its adapters
    entries = _model_and_optimizer(model, optimizer, loading=True,
                                   optimizer_sharding=state.get("optimizer_sharding"), adapters=part)
    try:
        with _without_torch_metadata_fallback_notes():
            loaded = dist_checkpointing.load(entries, directory)
    except READ_FAILURES as err:  # a damaged file fails in many ways, deep inside torch
        raise _damaged(directory, err) from err
    if part is None:
        model.load_state_dict(loaded["model"])
    else:
        _load_part(model, loaded["model"], adapters=part, directory=directory)
    if optimizer is not None:
        saved = loaded["optimizer"]
        optimizer.load_state_dict(compat.with_current_schedule(saved, optimizer.param_groups) if current_schedule
                                  else saved)
    rank_file = _rank_file(directory)
    if layout is not None and state.get("layout") == layout and os.path.isfile(rank_file):
        set_rng_state(torch.load(rank_file, weights_only=False))
    return state
