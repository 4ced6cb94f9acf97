"""Compact a Hugging Face checkpoint folder shard by shard, without ever holding the model.

A 70B model does not fit in memory twice, often not once. Everything graphprune needs to plan
is the architecture (built from ``config.json`` on the meta device: shapes, no weights) and,
for magnitude importance, one number per position of every tensor dimension. So:

1. read ``config.json`` and the shards' headers (``model.safetensors`` or an index + shards);
2. build the model on the meta device and analyse it (``make_plan`` runs meta models on fake
   tensors);
3. score: read each shard (memory-mapped by safetensors), reduce every tensor to its
   per-position L1/L2 sums, release the shard; the criterion then reads those sums instead of
   weights (``Magnitude.position_values``), so the plan is the one ``compact`` makes on the
   loaded model;
4. write: for each input shard, read it, rescale and slice the tensors the plan names, write
   the output shard of the same name; config.json gets the new widths where the config can
   describe them, and ``graphprune_plan.json`` always goes beside the weights.

Peak memory is about one shard plus its compact copy, whatever the model size. Everything is
written to a temporary folder next to ``dst_dir`` and renamed at the end: ``dst_dir`` either
does not exist or holds the whole result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphprune.errors import GraphPruneError, InputError
from graphprune.graph.trace import canonical_names
from graphprune.planning.plan import Plan
from graphprune.planning.scoring import Importance, Magnitude, per_position
from graphprune.surgery.slicing import scaled, sliced

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
PLAN_FILE = "graphprune_plan.json"
MEASURED = ("activation", "apoz")  # data-driven criteria measured block by block
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
           "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class Checkpoint:
    """A checkpoint folder: shard file -> {tensor name: (dtype, shape)}."""

    root: Path
    shards: dict[str, dict[str, tuple[str, list[int]]]]
    indexed: bool  # written with an index file (else one model.safetensors)
    index_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> dict[str, str]:
        return {name: shard for shard, tensors in self.shards.items() for name in tensors}


@dataclass
class CheckpointResult:
    """What ``compact_checkpoint`` wrote: the folder, the plan and what config.json says."""

    path: Path
    plan: Plan
    config_updated: bool
    bytes_in: int
    bytes_out: int
    notes: list[str] = field(default_factory=list)
    peak_resident_bytes: int = 0  # with data=: most weight bytes materialised at once (calibration)

    def __str__(self) -> str:
        cfg = "config.json updated" if self.config_updated else (
            f"config.json unchanged (widths it cannot describe): load with {PLAN_FILE}, see docs/llm.md")
        size = f"{self.bytes_out / 2**30:.2f} GiB written from {self.bytes_in / 2**30:.2f} GiB"
        return f"{self.path}: {size}; {cfg}"


def read_checkpoint(src: Path) -> Checkpoint:
    """Headers of every shard (no weights read); clear errors for what is not a checkpoint."""
    from safetensors import safe_open

    if not src.is_dir():
        raise InputError(f"{src} is not a folder; pass a Hugging Face checkpoint folder "
                         "(config.json + safetensors)")
    if not (src / CONFIG).is_file():
        raise InputError(f"{src} has no {CONFIG}: not a Hugging Face checkpoint folder")
    if (src / INDEX).is_file():
        try:
            index = json.loads((src / INDEX).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{src / INDEX} is not a safetensors index ({exc})") from exc
        indexed, meta = True, dict(index.get("metadata") or {})
    elif (src / SINGLE).is_file():
        files, indexed, meta = [SINGLE], False, {}
    else:
        raise InputError(f"{src} has neither {INDEX} nor {SINGLE}; only safetensors checkpoints "
                         "are supported")
    shards: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise InputError(f"shard {name} listed in {INDEX} is missing from {src}")
        try:
            with safe_open(str(path), framework="pt") as f:
                shards[name] = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape()))
                                for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise InputError(f"shard {path} cannot be read as safetensors ({exc})") from exc
    if indexed:
        where = {k: s for s, ts in shards.items() for k in ts}
        wrong = [k for k, s in index["weight_map"].items() if where.get(k) != s]
        if wrong:
            raise InputError(f"{INDEX} lists tensors its shards do not hold: {wrong[:3]}")
    return Checkpoint(src, shards, indexed, meta)


def build_meta_model(src: Path, real_buffers: bool = False) -> nn.Module:
    """The checkpoint's architecture on the meta device, from config.json (no weights).

    ``real_buffers``: only the parameters on meta, computed buffers (rotary tables) real, for
    running the model block by block (graphprune.surgery.checkpoint_calib)."""
    import transformers

    from graphprune.surgery.checkpoint_calib import params_on_meta

    try:
        config = transformers.AutoConfig.from_pretrained(str(src))
    except Exception as exc:  # noqa: BLE001
        why = f"{type(exc).__name__}: {exc}"
        raise InputError(f"{src / CONFIG} cannot be read by transformers ({why})") from exc
    names = list(getattr(config, "architectures", None) or [])
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise InputError(
            f"{src / CONFIG} names no transformers model class (architectures={names}); graphprune builds "
            "the model from it. Add the class name to config.json's 'architectures'."
        )
    try:
        with params_on_meta() if real_buffers else torch.device("meta"):
            model = cls(config)
    except Exception as exc:  # noqa: BLE001
        why = f"{type(exc).__name__}: {exc}"
        raise InputError(f"{cls.__name__} cannot be built from {src / CONFIG} ({why})") from exc
    return model.eval()


class ShardMagnitude(Magnitude):
    """L1/L2 magnitude from per-position sums computed shard by shard (``position_sums``)."""

    def __init__(self, p: int, sums: dict[tuple[str, int], np.ndarray]) -> None:
        super().__init__(p)
        self.sums = sums

    def position_values(self, model: nn.Module, name: str, dim: int) -> np.ndarray:
        try:
            return self.sums[(name, dim)]
        except KeyError:
            raise GraphPruneError(f"the checkpoint has no tensor {name}, which the model's importance needs; "
                                  "are its tensor names those of the model class in config.json?") from None


def _shard_bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not progress, leave=False)


def position_sums(
    ckpt: Checkpoint, names: dict[str, str], p: int, progress: bool
) -> dict[tuple[str, int], np.ndarray]:
    """Per-position |w|^p sums of every dim of every model tensor, one shard resident at a time."""
    from safetensors import safe_open

    sums: dict[tuple[str, int], np.ndarray] = {}
    for shard, tensors in ckpt.shards.items():
        with safe_open(str(ckpt.root / shard), framework="pt") as f, \
                _shard_bar(len(tensors), f"scoring {shard}", progress) as bar:
            for key in tensors:
                bar.update()
                name = names.get(key)
                if name is None:
                    continue
                t = f.get_tensor(key)
                for dim in range(t.dim()):
                    sums[(name, dim)] = per_position(t, dim, p)
                del t
    return sums


def _out_tensor(t: torch.Tensor, name: str | None, plan: Plan, scales: dict[str, list[dict]]) -> torch.Tensor:
    if name is None:
        return t
    for entry in scales.get(name, []):
        t = scaled(t, entry)
    dims = plan.slices.get(name)
    return sliced(t, {int(d): k for d, k in dims.items()}, name) if dims else t


def _out_shape(shape: list[int], dims: dict[int, list[int]] | None) -> list[int]:
    out = list(shape)
    for d, kept in (dims or {}).items():
        out[int(d)] = len(kept)
    return out


def _check_plan_covers(ckpt: Checkpoint, names: dict[str, str], plan: Plan, persistent: set[str],
                       extra: dict[str, str]) -> None:
    present = {names.get(k, k) for k in ckpt.location} | set(extra)
    missing = [n for n in plan.slices if n in persistent and n not in present]
    if missing:
        raise GraphPruneError(f"the plan slices {missing[:3]} but no shard holds them; the checkpoint's "
                              "tensor names do not match the model class in config.json")


def _persistent_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return names | set(model.state_dict().keys())


def _bytes(ckpt: Checkpoint, names: dict[str, str], plan: Plan) -> tuple[int, int]:
    b_in = b_out = 0
    for tensors in ckpt.shards.values():
        for key, (dtype, shape) in tensors.items():
            size = _DTYPES.get(dtype, 4)
            b_in += size * int(np.prod(shape))
            name = names.get(key)
            b_out += size * int(np.prod(_out_shape(shape, plan.slices.get(name) if name else None)))
    return b_in, b_out


def _write_shards(ckpt: Checkpoint, tmp: Path, names: dict[str, str], plan: Plan, progress: bool,
                  refit: dict[str, Path] | None = None, extra: dict[str, str] | None = None) -> int:
    """``refit``: tensor name -> file holding its reconstructed value (read instead of the
    shard's); ``extra``: tensors the source lacks (biases reconstruction added) -> their shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    refit, extra = refit or {}, extra or {}

    def value(f: Any, key: str) -> torch.Tensor:
        name = names.get(key, key)
        if name in refit:
            with safe_open(str(refit[name]), framework="pt") as r:
                return r.get_tensor(name)
        return f.get_tensor(key)

    scales: dict[str, list[dict]] = {}
    for entry in plan.scales:
        scales.setdefault(entry["tensor"], []).append(entry)
    total = 0
    for shard, tensors in ckpt.shards.items():
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(ckpt.root / shard), framework="pt") as f, \
                _shard_bar(len(tensors), f"writing {shard}", progress) as bar:
            meta = f.metadata()
            for key in [*tensors, *(k for k, at in extra.items() if at == shard)]:
                out[key] = _out_tensor(value(f, key), names.get(key, key), plan, scales).contiguous()
                bar.update()
        save_file(out, str(tmp / shard), metadata=meta)
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out
    return total


def _write_index(ckpt: Checkpoint, tmp: Path, total: int, extra: dict[str, str]) -> None:
    if not ckpt.indexed:
        return
    meta = dict(ckpt.index_metadata)
    meta["total_size"] = total
    index = {"metadata": meta, "weight_map": dict(sorted({**ckpt.location, **extra}.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _write_config(small_meta: nn.Module, plan: Plan, tmp: Path, src: Path) -> bool:
    """config.json with the new widths if the config can describe them (else the source's)."""
    from graphprune.surgery.hf import update_config

    if plan.biases:  # no config field adds a bias to just these layers
        plan.notes.append(f"config.json unchanged: reconstruction added biases to {len(plan.biases)} layers")
        updated = False
    else:
        notes = update_config(small_meta, plan, None, shapes_only=True)
        plan.notes.extend(notes)
        updated = any(n.startswith("model.config updated") for n in notes)
    if updated:
        small_meta.config.save_pretrained(str(tmp))
    else:
        shutil.copy2(src / CONFIG, tmp / CONFIG)
    return updated


def _copy_other_files(src: Path, tmp: Path, ckpt: Checkpoint) -> None:
    """Tokenizer files, generation config...: everything that is not weights, index or config."""
    skip = {CONFIG, INDEX, *ckpt.shards}
    for item in src.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, tmp / item.name)
        elif item.is_dir():
            shutil.copytree(item, tmp / item.name)


def _check_dst(dst: Path, src: Path) -> None:
    if dst.resolve() == src.resolve():
        raise InputError("dst_dir must differ from src_dir: the source is read while the result is written")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(f"{dst} already exists and is not an empty folder; choose a new dst_dir (nothing "
                         "is ever written over)")


def compact_checkpoint(
    src_dir: str | Path,
    dst_dir: str | Path,
    ratio: float = 0.3,
    *,
    example_input: Any = None,
    importance: str | None = None,
    data: Any = None,
    reconstruct: Any = None,
    progress: bool = True,
    **compact_options: Any,
) -> CheckpointResult:
    """Compact the Hugging Face checkpoint in ``src_dir`` into ``dst_dir``, shard by shard.

    The result equals ``graphprune.compact(loaded_model, example_input, ratio, importance=...,
    data=..., **compact_options)`` saved with the source's shard layout: same plan, same weights.
    Memory is about one shard, whatever the model size (see the module docstring). ``importance``
    is "l1" or "l2" (weights read from the shards); ``compact_options`` are make_plan's
    (attention, prune_hidden, ignored_layers, global_pruning, ratios, round_to...).
    ``example_input`` defaults to 16 token ids (``dict(input_ids=...)``) on the meta device.

    ``data`` (calibration batches of token ids; with no ``importance`` named this means
    ``reconstruct=True``, as in ``compact``) reconstructs block by block with one decoder block
    in memory (graphprune.surgery.checkpoint_calib); the refit layers gain biases, so the folder
    is loaded with its ``graphprune_plan.json`` (docs/llm.md).
    """
    from graphprune.api import apply_plan, make_plan
    from graphprune.reconstruct.hook import check_request, defaults

    src, dst = Path(src_dir), Path(dst_dir)
    importance, reconstruct = defaults(importance, reconstruct, data)
    measured = importance in MEASURED and data is not None and not reconstruct
    if importance not in ("l1", "l2") and not measured:
        raise InputError(f"compact_checkpoint takes importance 'l1' or 'l2' (weights read from the shards), "
                         f"or {' / '.join(MEASURED)} with data= (measured block by block); got "
                         f"{importance!r}. "
                         "Other data-driven criteria need the model loaded: use graphprune.compact. "
                         "With data= and no importance, reconstruct=True runs at checkpoint scale.")
    unknown = {"loss_fn", "inplace", "verify"} & set(compact_options)
    if unknown:
        raise InputError(f"compact_checkpoint does not take {sorted(unknown)} (it never loads the model)")
    ckpt = read_checkpoint(src)
    _check_dst(dst, src)
    model = build_meta_model(src)
    x = example_input if example_input is not None else _default_example(
        data if reconstruct or measured else None)
    opts = check_request(reconstruct or measured, data, x)  # bad data: refused before any work
    if opts is not None:
        _check_dtypes(data, x)
    opts = opts if reconstruct else None
    p = 1 if importance == "l1" else 2
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch: Path | None = None
    tmp: Path | None = None
    try:
        refit: dict[str, Path] = {}
        extra: dict[str, str] = {}
        peak = 0
        if measured:
            names = canonical_names(model)
            criterion, peak = _measured(src, ckpt, names, importance, data, progress)
            plan = make_plan(model, x, ratio, importance=criterion, **compact_options)
            small = None
        elif opts is None:
            names = canonical_names(model)  # tied weights: the name the plan uses
            criterion = ShardMagnitude(p, position_sums(ckpt, names, p, progress))
            criterion.name = importance
            plan = make_plan(model, x, ratio, importance=criterion, **compact_options)
            small = None
        else:
            scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.calib-", dir=dst.parent))
            plan, small, names, refit, peak = _calibrated(src, ckpt, model, x, ratio, p, data, opts,
                                                          compact_options, scratch, progress)
            where = {names.get(k, k): s for k, s in ckpt.location.items()}
            extra = {f"{b}.bias": where[f"{b}.weight"] for b in plan.biases}
        _check_plan_covers(ckpt, names, plan, _persistent_names(model) | set(extra), extra)
        b_in, b_out = _bytes(ckpt, names, plan)
        free = shutil.disk_usage(dst.parent).free
        if free < b_out + 2**20:
            raise InputError(f"{dst.parent} has {free / 2**30:.2f} GiB free, the compact checkpoint needs "
                             f"{b_out / 2**30:.2f} GiB; free some space or choose another dst_dir")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
        written = _write_shards(ckpt, tmp, names, plan, progress, refit, extra)
        _write_index(ckpt, tmp, written, extra)
        small = apply_plan(model, plan) if small is None else small
        updated = _write_config(small, plan, tmp, src)
        (tmp / PLAN_FILE).write_text(plan.to_json())
        _copy_other_files(src, tmp, ckpt)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return CheckpointResult(dst, plan, updated, b_in, written, list(plan.notes), peak)


class BlockMeasured(Importance):
    """An activation criterion whose statistics were measured block by block (``measure_blocks``);
    a group it saw nothing of is an error (a whole-model run would score it by weights)."""

    def __init__(self, measured: Any) -> None:
        super().__init__()
        self.measured = measured
        self.name = measured.name

    def __call__(self, group: Any, model: nn.Module) -> np.ndarray:
        if not any((m.name, m.dim) in self.measured.stats for m in group.members):
            raise InputError(f"importance={self.name!r} at checkpoint scale measures inside the decoder "
                             f"blocks only, and group {group.index} ({group.members[0].name}, ...) lies "
                             "outside them; list its layers in ignored_layers or leave out prune_hidden")
        return self.measured(group, model)


def _measured(src: Path, ckpt: Checkpoint, names: dict[str, str], importance: str, data: Any,
              progress: bool) -> tuple[BlockMeasured, int]:
    """The activation criterion measured block by block on the original model."""
    from graphprune.planning.measured import Activation
    from graphprune.surgery.checkpoint_calib import ShardReader, calibration_batches, measure_blocks

    crit = Activation("mean" if importance == "activation" else "apoz")
    cal = build_meta_model(src, real_buffers=True)
    reader = ShardReader(ckpt.root, ckpt.location, names)
    try:
        peak = measure_blocks(cal, crit, calibration_batches(data, None), reader, progress)
    finally:
        reader.close()
    return BlockMeasured(crit), peak


def _default_example(data: Any) -> Any:
    """16 token ids on the meta device, passed the way the calibration batches pass them (a bare
    tensor, as ``--calib`` gives, or ``input_ids=``)."""
    from graphprune.planning.calibration import split_batch

    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    first = next(iter(data), None) if isinstance(data, (list, tuple)) else None
    return ids if isinstance(split_batch(first)[0] if first is not None else None, torch.Tensor) else {
        "input_ids": ids}


def _check_dtypes(data: Any, example: Any) -> None:
    """Token ids must be integers: a float batch is refused before the model is analysed."""
    from graphprune.graph.inputs import normalize_inputs
    from graphprune.planning.calibration import split_batch

    ea, ek = normalize_inputs(example)
    want = [*ea, *(ek[k] for k in sorted(ek))]
    for b, batch in enumerate(data):
        da, dk = normalize_inputs(split_batch(batch)[0])
        for e, t in zip(want, [*da, *(dk[k] for k in sorted(dk))]):
            if isinstance(e, torch.Tensor) and isinstance(t, torch.Tensor) and \
                    e.is_floating_point() != t.is_floating_point():
                raise InputError(f"calibration batch {b} does not fit the model: a {t.dtype} tensor where "
                                 f"the model takes {e.dtype} (token ids are integers)")


def _calibrated(src: Path, ckpt: Checkpoint, model: nn.Module, x: Any, ratio: float, p: int, data: Any,
                opts: Any, options: dict[str, Any], scratch: Path, progress: bool
                ) -> tuple[Plan, nn.Module, dict[str, str], dict[str, Path], int]:
    """Plan as ``compact(reconstruct=True)`` does, reconstructing block by block: (plan, compact
    meta model, tensor names, refit tensor files, peak bytes of weights resident at once)."""
    from graphprune.engine import Engine
    from graphprune.planning.options import AUTO, CutOptions, StructureOptions
    from graphprune.reconstruct.biases import strip_unused, with_biases
    from graphprune.reconstruct.hook import plan_for
    from graphprune.surgery.checkpoint_calib import ShardReader, calibrate_blocks, calibration_batches

    options = dict(options)
    structure = StructureOptions(options.pop("attention", "heads"), bool(options.pop("prune_hidden", False)))
    ignored, fallback = options.pop("ignored_layers", ()), options.pop("fallback", "freeze")
    cut = CutOptions(global_pruning=bool(options.pop("global_pruning", False)),
                     max_ratio=options.pop("max_ratio", None), ratios=options.pop("ratios", None),
                     round_to=options.pop("round_to", AUTO))
    if options:
        raise InputError(f"compact_checkpoint(data=...) does not take {sorted(options)}")
    work, added = with_biases(model)  # zero biases for bias compensation, as compact adds them
    names = canonical_names(work)
    sums = position_sums(ckpt, names, p, progress)
    for path in added:
        n = work.get_submodule(path).bias.shape[0]
        sums[(f"{path}.bias", 0)] = np.zeros(n)
    criterion = ShardMagnitude(p, sums)
    criterion.name = f"l{p}"
    engine = Engine(work, x, importance=criterion, ignored_layers=ignored, structure=structure)
    first = engine.plan(ratio, cut=cut)
    planned = {g.index: list(g.removed) for g in first.groups if g.removed}
    cal = build_meta_model(src, real_buffers=True)
    reader = ShardReader(ckpt.root, ckpt.location, names)
    try:
        calib = calibration_batches(data, opts.max_batches)
        done = calibrate_blocks(cal, engine.analysis.groups, planned, calib, reader, opts, scratch, progress)
    finally:
        reader.close()
    plan = plan_for(engine.analysis, first, done.rec, opts, cut)
    small, plan, _ = engine.realize(plan, fallback=fallback, cut=cut, replan=False, last=True)
    moved = [g.index for g in plan.groups if g.removed != done.rec.chosen.get(g.index, g.removed)]
    if moved:
        raise GraphPruneError(f"groups {moved[:5]} cannot run at the reconstructed widths in this model "
                              "class; list their layers in ignored_layers")
    strip_unused(small, plan, added, _nonzero_biases(added, done.refit, plan))
    return plan, small, names, done.refit, done.peak_resident_bytes


def _nonzero_biases(added: list[str], refit: dict[str, Path], plan: Plan) -> set[str]:
    """The added biases that reconstruction made non-zero where the plan keeps them."""
    from safetensors import safe_open

    out = set()
    for path in added:
        name = f"{path}.bias"
        if name in refit:
            with safe_open(str(refit[name]), framework="pt") as f:
                t = _out_tensor(f.get_tensor(name), name, plan, {})
            if bool((t != 0).any()):
                out.add(path)
    return out
