"""Loss landscapes (Li et al., NeurIPS 2018, https://arxiv.org/abs/1712.09913): the loss on a line or a
grid along filter-normalised random directions, in the full or the LoRA space, and their plots.
Public through :mod:`flatpeft.sharpness` (``loss_landscape``, ``plot_landscape``, ``Landscape``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._probe import (
    _LANDSCAPE,
    LossFn,
    Space,
    _bar,
    _check_finite,
    _count,
    _dump,
    _measurement,
    _positive,
    _rows_of,
)
from .perturb import mix_seed

__all__ = ["Landscape", "loss_landscape", "plot_landscape"]


@dataclass(frozen=True)
class Landscape:
    """Loss on a 1-D line or 2-D grid along filter-normalised random directions.

    Attributes:
        space: ``"full"`` or ``"lora"``.
        dims: 1 or 2.
        alphas: Coordinates along the first direction.
        betas: Coordinates along the second direction (empty for ``dims=1``).
        losses: ``losses[i]`` at ``alphas[i]`` (1-D) or ``losses[i][j]`` at ``(alphas[i], betas[j])``.
        base_loss: ``L(θ)`` at the clean point.
        config: The arguments of the measurement.
    """

    space: str
    dims: int
    alphas: list[float]
    betas: list[float]
    losses: list[Any]
    base_loss: float
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The landscape as JSON text (non-finite losses as ``null``), also written to ``path`` when given."""
        return _dump(self.to_dict(), path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Landscape:
        """Inverse of :meth:`to_dict` (``null`` losses, written for non-finite ones, read back as NaN)."""

        def floats(v: Any) -> Any:
            return [floats(x) for x in v] if isinstance(v, list) else (math.nan if v is None else v)

        return cls(**{**data, "losses": floats(data["losses"])})


def loss_landscape(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Iterable[Any],
    *,
    dims: int = 1,
    radius: float = 1.0,
    points: int = 21,
    space: Space = "full",
    seed: int = 0,
    progress: bool = True,
) -> Landscape:
    """Loss along 1 or 2 filter-normalised random directions (Li et al., 2018).

    Each direction ``d`` is a seeded Gaussian whose rows are rescaled to the norms of the weight
    rows, ``‖d_i‖ = ‖θ_i‖`` (so a coordinate of 1 moves every filter by its own length). The grid is
    ``points`` evenly spaced coordinates in ``[−radius, radius]`` per direction. Directions are
    regenerated from their seeds at every point, never stored. The model is put in ``eval()`` mode
    and left bit-identical.

    Args:
        model: A ``peft.PeftModel`` with LoRA adapters.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; ``None`` means ``model(**batch).loss``.
        batches: The evaluation batches (read once into a list; ``L`` is the mean over them).
        dims: 1 (a line) or 2 (a surface).
        radius: Half-width of the grid, in units of the filter norms.
        points: Grid points per direction (odd numbers include the clean point).
        space: ``"full"`` (effective weights of the adapted layers) or ``"lora"`` (adapter factors).
        seed: Seed of the directions.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`Landscape` (serialise with ``to_json``, draw with :func:`plot_landscape`).

    Raises:
        TypeError: ``model`` is not a PEFT model, or ``loss_fn`` does not return a scalar tensor.
        ValueError: invalid ``dims``, ``radius``, ``points`` or ``space``, empty ``batches``,
            non-finite loss.
    """
    if dims not in (1, 2) or isinstance(dims, bool):
        raise ValueError(f"dims must be 1 (a line) or 2 (a surface), got {dims!r}")
    _positive("radius", radius)
    _count("points", points, minimum=2)
    config = {"dims": dims, "radius": radius, "points": points, "seed": seed}
    coords = [-radius + 2.0 * radius * i / (points - 1) for i in range(points)]
    grid = [(a,) for a in coords] if dims == 1 else [(a, b) for a in coords for b in coords]
    values: list[float] = []
    with _measurement(model, loss_fn, batches, space) as ctx:
        sp = ctx.space
        # Row scale of direction k: ‖θ_i‖ / ‖g_i‖ for the unit Gaussian g regenerated from its seed.
        seeds = [[mix_seed(seed, _LANDSCAPE, k, j) for j in range(len(sp.shapes))] for k in range(dims)]
        scales = [
            [
                n / _rows_of(sp.noise(j, torch.ones_like(n), seeds[k][j])).norm(dim=1)
                for j, n in enumerate(sp.row_norms)
            ]
            for k in range(dims)
        ]

        def direction(j: int, ab: tuple[float, ...]) -> Callable[[], torch.Tensor]:
            def make() -> torch.Tensor:
                out = sp.noise(j, scales[0][j] * ab[0], seeds[0][j])
                for k in range(1, dims):
                    out.add_(sp.noise(j, scales[k][j] * ab[k], seeds[k][j]))
                return out

            return make

        base = ctx.mean_loss()
        _check_finite(base, "loss_landscape")
        with _bar(len(grid), f"loss landscape ({space}, {dims}-D)", progress) as bar:
            for ab in grid:
                with sp.perturbed([direction(j, ab) for j in range(len(sp.shapes))]):
                    values.append(ctx.mean_loss())
                bar.update(1)
    losses: list[Any] = (
        values if dims == 1 else [values[i * points : (i + 1) * points] for i in range(points)]
    )
    return Landscape(space, dims, coords, coords if dims == 2 else [], losses, base, config)


def plot_landscape(
    result: Landscape | Sequence[Landscape], path: str | Path, *, title: str | None = None
) -> Path:
    """Draw a :class:`Landscape` to a PNG: a line for 1-D, filled contours for 2-D.

    Several 1-D landscapes (e.g. the full and the LoRA space of one adapter) are drawn as one line
    each on shared axes. Uses matplotlib's object API (no pyplot, no global backend change).

    Args:
        result: The output of :func:`loss_landscape` (or ``Landscape.from_dict`` of its JSON), or a
            sequence of 1-D landscapes to overlay.
        path: Where to write the PNG (parent folders are created).
        title: Figure title (default: the space and dimension).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'flatpeft[plot]'``).
        TypeError: ``result`` is not a :class:`Landscape` (or a sequence of them).
        ValueError: an empty sequence, or a sequence that mixes in a 2-D landscape.
    """
    if isinstance(result, Landscape):
        results = [result]
    elif isinstance(result, Sequence) and all(isinstance(r, Landscape) for r in result):
        results = list(result)
    else:
        raise TypeError(
            "plot_landscape needs a Landscape from loss_landscape() (or a list of 1-D ones), "
            f"got {type(result).__name__}"
        )
    if not results:
        raise ValueError("plot_landscape got an empty list; pass at least one Landscape")
    if len(results) > 1 and any(r.dims != 1 for r in results):
        raise ValueError("only 1-D landscapes can be overlaid; plot each 2-D landscape to its own file")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_landscape needs matplotlib: pip install 'flatpeft[plot]'") from err
    fig = Figure(figsize=(5.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    first = results[0]
    if first.dims == 1:
        for r in results:
            ax.plot(r.alphas, r.losses, marker="o", markersize=3, label=f"{r.space} space")
        ax.axhline(first.base_loss, color="grey", linewidth=0.8, linestyle="--", label="clean loss")
        ax.set_xlabel("α (filter-normalised random direction)")
        ax.set_ylabel("loss")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend()
        default = f"loss landscape ({', '.join(r.space for r in results)} space{'s' * (len(results) > 1)})"
    else:
        # losses[i][j] is at (alphas[i], betas[j]): x = α runs along the first index.
        z = [list(col) for col in zip(*first.losses, strict=True)]
        filled = ax.contourf(first.alphas, first.betas, z, levels=20, cmap="viridis")
        ax.contour(first.alphas, first.betas, z, levels=20, colors="white", linewidths=0.3)
        bar = fig.colorbar(filled, ax=ax, label="loss")
        bar.formatter.set_useOffset(False)
        bar.update_ticks()
        ax.plot([0.0], [0.0], marker="+", color="red")
        ax.set_xlabel("α")
        ax.set_ylabel("β")
        default = f"loss landscape ({first.space} space, 2-D)"
    ax.set_title(title or default)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
