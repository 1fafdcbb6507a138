"""Bytes each method moves per adapted weight per step, beyond ``lora``, counted over the dispatched ops.

Until a GPU times it, Flat-LoRA's noise path is judged by its memory traffic (SPEC §5): on a GPU the
path is bandwidth- and RNG-bound, so the bytes it reads and writes per adapted weight set its cost.
This script runs one real training step (forward + backward through ``method.backward``) of one
adapted layer (``nn.Linear`` ``--m`` × ``--n`` with a PEFT LoRA adapter, rank 8, a batch of tokens)
under a ``TorchDispatchMode`` that sees every ATen op the step dispatches, and reports, for each
method, ``noise_memory`` mode, precision (fp32; bf16 = frozen weights in bf16 under bf16 autocast)
and noise path, the bytes read + written and the normal draws, minus ``lora``'s, per adapted weight.

Counting rule (what an op reads and writes):

- every tensor argument is read once (its own storage size: ``numel × itemsize``; a broadcast
  ``(m, 1)`` row scale counts ``m`` elements), every tensor it returns is written once;
- an argument an op mutates is read and written (``add_``), except where the op only writes it
  (``normal_``, ``uniform_``, ``fill_``, ``zero_``, ``copy_``'s destination, ``out=`` arguments);
  a returned alias of a mutated argument is not counted again;
- a view (``t``, ``view``, ``detach``, ...) and an allocation (``empty``) move nothing;
- CPU only (the ``torch-cpu`` path): a pointwise op whose tensor operands differ in dtype casts each
  odd input into a temporary of the computation dtype and computes into a temporary it then copies
  to an output of another dtype (TensorIterator does this on CPU; CUDA kernels cast while loading).
  Those hidden copies are added: an odd input costs ``in + 2·common`` bytes per element instead of
  ``in``, an odd output ``2·common + out`` instead of ``out``;
- normal draws: the elements written by ``normal_``/``randn`` and by flatpeft's Triton noise op.

Noise paths (``--paths``):

- ``torch-cpu``: the plain PyTorch path as it runs here (CPU: noise drawn in fp32, CPU casting rule);
- ``torch-cuda``: the plain PyTorch path's CUDA op sequence (noise drawn in the compute dtype),
  executed on CPU with the CUDA counting rule (no hidden casts): the ops and sizes a GPU dispatches;
- ``triton``: the fused kernel (``flatpeft._noise_triton``, run by Triton's CPU interpreter here),
  dispatched as the custom op ``flatpeft::noisy_rows`` and counted by its operands: it reads W0 and
  the row scales and writes W0 + ε (the Philox words stay in registers); CUDA counting rule.

With ``--device cuda`` the ``torch-cuda`` and ``triton`` paths run on the GPU for real.

Row norms are part of the count (they are per-step work). The first (warm-up) step is not counted;
the counted step is the next optimizer step, so nothing cached for a step is reused.

    PYTHONPATH=src python benchmarks/noise_bytes.py --label after
    PYTHONPATH=src python benchmarks/noise_bytes.py --label before --paths torch-cpu torch-cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
# Ops that overwrite their mutated argument without reading it.
WRITE_ONLY = {"normal_", "uniform_", "fill_", "zero_", "copy_", "random_", "bernoulli_", "exponential_"}
DRAWS = {"normal", "normal_", "randn", "randn_like", "noisy_rows", "noisy_rows_normed"}
SPECS = {  # row name -> (registered method, config overrides, method class override or None)
    "lora": ("lora", {}),
    "flat_lora": ("flat_lora", {}),
    "flat_lora[keep]": ("flat_lora", {"noise_memory": "keep"}),
    "flat_lora[in-place]": ("flat_lora", {}),
}


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Bytes read + written and normal draws of every dispatched op (see the module's counting rule).

    Args:
        cpu_casts: Add the hidden cast copies of CPU TensorIterator for mixed-dtype pointwise ops.
    """

    def __init__(self, cpu_casts: bool = True):
        super().__init__()
        self.cpu_casts = cpu_casts
        self.read = self.written = self.hidden = self.draws = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if func.is_view or name.startswith(("empty", "_local_scalar")) or name in ("lift_fresh", "alias"):
            return out
        read = written = 0
        schema_args = func._schema.arguments
        mutated = set()
        for i, arg in enumerate(schema_args):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            writes = arg.alias_info is not None and arg.alias_info.is_write
            for t in tensors:
                if writes:
                    mutated.add(id(t))
                    written += _size(t)
                    if not (arg.is_out or name in WRITE_ONLY or (name == "copy_" and i == 0)):
                        read += _size(t)
                else:
                    read += _size(t)
        returns = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        fresh = [t for t in returns if id(t) not in mutated]
        written += sum(_size(t) for t in fresh)
        hidden = self._hidden_casts(func, args, kwargs, returns) if self.cpu_casts else 0
        self.read += read
        self.written += written
        self.hidden += hidden
        self.by_op[name] = self.by_op.get(name, 0) + read + written + hidden
        if name in DRAWS:  # noisy_rows_normed also returns the (m,) row stds: not draws
            drawn = returns[:1] if name == "noisy_rows_normed" else returns
            self.draws += sum(t.numel() for t in drawn)
        return out

    @staticmethod
    def _hidden_casts(func, args, kwargs, returns) -> int:
        if torch.Tag.pointwise not in func.tags:
            return 0
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not tensors or any(t.device.type != "cpu" for t in tensors):
            return 0
        common = tensors[0].dtype
        for t in tensors[1:]:
            common = torch.promote_types(common, t.dtype)
        if not common.is_floating_point:
            return 0
        c = torch.empty((), dtype=common).element_size()
        out_args = {id(t) for t in tree_flatten(kwargs.get("out"))[0] if isinstance(t, torch.Tensor)}
        returned = {id(t) for t in returns}
        extra = 0
        for t in tensors:
            if t.dtype == common:
                continue
            # An odd input: cast copy written (c) and read (c). An odd output: the temporary written (c)
            # and read back (c). A mutated ``self`` (``add_``) is both.
            roles = (id(t) not in out_args) + (id(t) in returned or id(t) in out_args)
            extra += t.numel() * 2 * c * roles
        return extra

    @property
    def total(self) -> int:
        return self.read + self.written + self.hidden


class _Layer(nn.Module):
    def __init__(self, n: int, m: int):
        super().__init__()
        self.lin = nn.Linear(n, m)

    def forward(self, x):
        return self.lin(x)


def build(spec: str, precision: str, m: int, n: int, seed: int = 0, device: str = "cpu"):
    """One adapted linear layer with ``spec`` attached (σ > 0 from the counted step on)."""
    import peft

    import flatpeft
    from flatpeft.registry import make_config

    name, overrides = SPECS.get(spec, (spec, {}))
    torch.manual_seed(seed)
    base = _Layer(n, m)
    if precision == "bf16":
        base = base.to(torch.bfloat16)
    for p in base.parameters():
        p.requires_grad_(False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"])).to(device)
    with torch.no_grad():
        model.base_model.model.lin.lora_B["default"].weight.normal_(0, 0.02)
    fields = {f for f, *_ in flatpeft.get_method(name).config_class.describe()}
    if "total_steps" in fields:
        overrides = {"total_steps": 4, **overrides}
    config = make_config(name, seed=seed, **overrides)
    cls = flatpeft.get_method(name)
    if spec == "flat_lora[in-place]":
        from inplace_flat_lora import InPlaceFlatLoRA

        cls = InPlaceFlatLoRA
    method = cls(model, config)
    return model, method


def count(
    spec: str, precision: str, m: int, n: int, tokens: int, cpu_casts: bool, device: str = "cpu"
) -> dict:
    """Bytes and draws of one counted training step (forward + backward) of ``spec``."""
    model, method = build(spec, precision, m, n, device=device)
    gen = torch.Generator().manual_seed(1)
    # A layer inside a network: its input needs a gradient, and in bf16 it is a bf16 activation.
    x = torch.randn(tokens, n, generator=gen).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    x = x.to(device).requires_grad_(True)
    kind = torch.device(device).type
    autocast = torch.autocast(kind, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def loss_fn():
        with autocast:
            return model(x).float().pow(2).mean()

    extra = {"upper_loss_fn": loss_fn} if method.needs_upper_loss else {}
    method.step = 1
    method.backward(loss_fn, **extra)  # warm-up: caches what is cached once
    model.zero_grad(set_to_none=True)
    method.step = 2
    counter = ByteCounter(cpu_casts=cpu_casts)
    with counter:
        method.backward(loss_fn, **extra)
    return {
        "bytes": counter.total,
        "read": counter.read,
        "written": counter.written,
        "hidden_casts": counter.hidden,
        "draws": counter.draws,
        "by_op": dict(sorted(counter.by_op.items(), key=lambda kv: -kv[1])),
    }


@contextlib.contextmanager
def noise_path(path: str, device: str = "cpu"):
    """Select the noise path ``path`` for the block (see the module docstring)."""
    saved = os.environ.get("FLATPEFT_NOISE_KERNEL")
    os.environ["FLATPEFT_NOISE_KERNEL"] = "triton" if path == "triton" else "torch"
    restore = None
    try:
        if path == "torch-cuda" and torch.device(device).type == "cpu":
            try:
                from flatpeft import _noise
            except ImportError:  # code from before the plain path: one dtype policy everywhere
                _noise = None
            if _noise is not None:
                restore = _noise._draw_dtype  # the dtype policy CUDA takes: z in the compute dtype
                _noise._draw_dtype = lambda device, dtype: dtype
        yield
    finally:
        if restore is not None:
            from flatpeft import _noise

            _noise._draw_dtype = restore
        if saved is None:
            os.environ.pop("FLATPEFT_NOISE_KERNEL", None)
        else:
            os.environ["FLATPEFT_NOISE_KERNEL"] = saved


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label", default="after", help="row label, e.g. before / after")
    parser.add_argument("--m", type=int, default=1024, help="rows (out features) of the adapted layer")
    parser.add_argument("--n", type=int, default=1024, help="fan-in of the adapted layer")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--precisions", nargs="*", default=["bf16", "fp32"])
    parser.add_argument("--paths", nargs="*", default=["torch-cpu", "torch-cuda", "triton"])
    parser.add_argument("--methods", nargs="*", default=None, help="default: flat_lora rows + every method")
    parser.add_argument(
        "--device", default="cpu", help="cpu, or cuda: the paths torch-cuda and triton for real"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if torch.device(args.device).type != "cpu" and "torch-cpu" in args.paths:
        parser.error("--paths torch-cpu needs --device cpu")
    warnings.filterwarnings("ignore", message=".*no optimizer is bound")  # one step, no optimizer
    if "triton" in args.paths and torch.device(args.device).type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: CPU interpreter
    from report import machine  # benchmarks/

    import flatpeft  # after TRITON_INTERPRET: PEFT imports Triton

    # A TorchDispatchMode sees the ops of its own thread only: one thread, so the CPU path's chunked
    # draws all run where the counter is (on more threads they move the same bytes).
    threads = torch.get_num_threads()
    specs = args.methods or [*SPECS, *(s for s in flatpeft.list_methods() if s not in SPECS)]
    specs = ["lora", *(s for s in specs if s != "lora")]
    weights = args.m * args.n
    rows, errors = [], {}
    torch.set_num_threads(1)
    try:
        for path in args.paths:
            for precision in args.precisions:
                with noise_path(path, args.device):
                    cpu_rule = path == "torch-cpu"
                    base = count("lora", precision, args.m, args.n, args.tokens, cpu_rule, args.device)
                    for spec in specs:
                        if path != "torch-cpu" and not spec.startswith("flat_lora"):
                            continue  # the other methods draw no weight noise: one path is enough
                        try:
                            got = count(
                                spec, precision, args.m, args.n, args.tokens, path == "torch-cpu", args.device
                            )
                        except Exception as err:  # one failed row must not lose the others
                            errors[f"{spec}/{precision}/{path}"] = repr(err)
                            continue
                        rows.append(
                            {
                                "method": spec,
                                "precision": precision,
                                "path": path,
                                "bytes_per_weight": (got["bytes"] - base["bytes"]) / weights,
                                "hidden_cast_bytes_per_weight": (got["hidden_casts"] - base["hidden_casts"])
                                / weights,
                                "draws_per_weight": (got["draws"] - base["draws"]) / weights,
                                "by_op_minus_lora": {
                                    k: v - base["by_op"].get(k, 0)
                                    for k, v in got["by_op"].items()
                                    if v != base["by_op"].get(k, 0)
                                },
                            }
                        )
                        print(
                            f"{args.label:>7} {path:>10} {precision} {spec:<22} "
                            f"{rows[-1]['bytes_per_weight']:7.2f} B/weight  "
                            f"{rows[-1]['draws_per_weight']:.2f} draws/weight",
                            flush=True,
                        )
    finally:
        torch.set_num_threads(threads)
    report = {
        "label": args.label,
        "device": args.device,
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "layer": {"m": args.m, "n": args.n, "tokens": args.tokens, "lora_rank": 8},
        "rule": "bytes read + written by every dispatched ATen op of one forward+backward, minus lora's, "
        "per adapted weight; see benchmarks/noise_bytes.py",
        "rows": rows,
        "errors": errors,
    }
    out = args.out or RESULTS / f"noise-bytes-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"written to {out}")
    return report


def markdown_table(report: dict) -> str:
    """Flat-LoRA rows: bytes per adapted weight per step beyond ``lora`` (draws in brackets)."""
    paths = dict.fromkeys(r["path"] for r in report["rows"])
    cols = [(p, prec) for p in paths for prec in ("bf16", "fp32")]
    cols = [c for c in cols if any((r["path"], r["precision"]) == c for r in report["rows"])]
    cells = {(r["method"], r["path"], r["precision"]): r for r in report["rows"]}
    layer = report["layer"]
    lines = [
        f"Bytes read + written per adapted weight per step beyond `lora` ({report['label']}; normal "
        f"draws per weight in brackets); one {layer['m']} × {layer['n']} layer, {layer['tokens']} tokens, "
        f"{report['device']}",
        "",
        "| method | " + " | ".join(f"{p} {prec}" for p, prec in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        if not method.startswith("flat_lora"):
            continue
        row = []
        for c in cols:
            cell = cells.get((method, *c))
            row.append(
                "–" if cell is None else f"{cell['bytes_per_weight']:.1f} ({cell['draws_per_weight']:.0f})"
            )
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
