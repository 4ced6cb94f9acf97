"""Which models the zoo benchmark (tools/zoo.py) runs, and how each one is built.

Two sets, both with random weights (no downloads), batch 1:

* ``torchvision``: every classification model, ``torchvision.models.list_models(module=
  torchvision.models)`` (the detection, segmentation, video, optical-flow and quantized models live
  in submodules and are not listed). Names are prefixed ``tv_``.
* ``timm``: one model per architecture family. A family is a module of ``timm.models`` with
  registered models (``timm.list_modules()``). Rule: among the family's registered names, leave out
  timm's own unit-test models (names starting with ``test_``), build each remaining model on the
  meta device (no memory, no weights) and take the one with the fewest parameters, ties broken by
  name; a family whose models all fail to build on the meta device gets its first name in sorted
  order. Building ~1400 models takes minutes, so the result is stored in ``zoo_timm_sample.txt``
  next to this file (``python tools/zoo.py --refresh-timm-sample`` rebuilds it for the installed
  timm; the file records the timm version it was made with). Names are prefixed ``timm_``.

Input size: each model's own default (timm: ``pretrained_cfg["input_size"]``; torchvision: the
crop size of its default weights' transforms), capped at 224x224 where the model also runs at
224 (models with fixed position embeddings or a fixed flatten keep their own size). This keeps
the heaviest CNNs (EfficientNet-B7 at 600x600) affordable on a small CPU machine.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import import_torchvision  # noqa: E402

SAMPLE_FILE = Path(__file__).resolve().parent / "zoo_timm_sample.txt"
MAX_SIDE = 224
Builder = Callable[[], tuple[nn.Module, torch.Tensor]]


def torchvision_names() -> list[str]:
    """Every torchvision classification model, ``tv_``-prefixed, sorted."""
    tv = import_torchvision()
    return [f"tv_{n}" for n in sorted(tv.models.list_models(module=tv.models))]


def timm_names() -> list[str]:
    """The stored timm sample (one model per family), ``timm_``-prefixed."""
    if not SAMPLE_FILE.exists():
        raise FileNotFoundError(f"{SAMPLE_FILE} is missing: run tools/zoo.py --refresh-timm-sample")
    lines = [ln.split("#")[0].strip() for ln in SAMPLE_FILE.read_text().splitlines()]
    return [f"timm_{ln.split()[1]}" for ln in lines if ln]


def _meta_params(timm: Any, name: str) -> int | None:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def refresh_timm_sample(progress: bool = True) -> list[tuple[str, str, int | None]]:
    """Apply the module docstring's rule to the installed timm and write ``SAMPLE_FILE``."""
    import_torchvision()  # timm imports torchvision where it is installed
    import timm
    from tqdm import tqdm

    rows: list[tuple[str, str, int | None]] = []
    for module in tqdm(sorted(timm.list_modules()), desc="timm families", disable=not progress,
                       file=sys.stderr):
        names = sorted(n for n in timm.list_models(module=module) if not n.startswith("test_"))
        if not names:
            continue
        sized = [(p, n) for n in names if (p := _meta_params(timm, n)) is not None]
        rows.append((module, min(sized)[1], min(sized)[0]) if sized else (module, names[0], None))
    text = [f"# one timm model per family (tools/zoo_models.py's rule), timm {timm.__version__}",
            "# family model params"]
    text += [f"{m} {n} {p if p is not None else '?'}" for m, n, p in rows]
    SAMPLE_FILE.write_text("\n".join(text) + "\n")
    return rows


def _runs_at(model: nn.Module, side: int, channels: int) -> bool:
    with contextlib.suppress(Exception), torch.no_grad():
        model(torch.randn(1, channels, side, side))
        return True
    return False


def _sized(model: nn.Module, size: tuple[int, int, int]) -> torch.Tensor:
    """The example input: the model's own size, capped at MAX_SIDE where the model runs there."""
    c, h, w = size
    if max(h, w) > MAX_SIDE and _runs_at(model, MAX_SIDE, c):
        h = w = MAX_SIDE
    return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))


def _tv_size(tv: Any, name: str) -> tuple[int, int, int]:
    with contextlib.suppress(Exception):
        weights = next(iter(tv.models.get_model_weights(name)))
        crop = weights.transforms.keywords.get("crop_size", MAX_SIDE)
        crop = crop[0] if isinstance(crop, (list, tuple)) else crop
        return 3, int(crop), int(crop)
    return 3, MAX_SIDE, MAX_SIDE


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """Build ``tv_*`` / ``timm_*`` model ``name`` in eval mode with its example input."""
    torch.manual_seed(0)
    if name.startswith("tv_"):
        tv = import_torchvision()
        base = name[3:]
        kwargs: dict[str, Any] = {"weights": None}
        if base in ("googlenet", "inception_v3"):  # aux heads only exist in training; skip scipy init
            kwargs.update(aux_logits=False, init_weights=False)
        model = tv.models.get_model(base, **kwargs).eval()
        return model, _sized(model, _tv_size(tv, base))
    if name.startswith("timm_"):
        import_torchvision()
        import timm

        model = timm.create_model(name[5:], pretrained=False).eval()
        size = tuple(model.pretrained_cfg.get("input_size", (3, MAX_SIDE, MAX_SIDE)))
        return model, _sized(model, size)  # type: ignore[arg-type]
    raise ValueError(f"unknown model {name!r}: zoo names start with tv_ or timm_")
