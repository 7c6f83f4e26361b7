"""Forward+backward throughput of sparse-MoE layers, side by side in one run.

Methods, all with SwiGLU-class experts of width H unless noted:
  gatelab            gatelab.moe.SparseMoE, eager (sort by expert, one custom op for the experts)
  gatelab-compiled   torch.compile(SparseMoE, fullgraph=True) (inductor)
  reference          loop over experts as in Hugging Face's Mixtral block (dropless)
  gshard             GShard dense one-hot dispatch/combine einsums, capacity factor 1.25
  st-moe             st-moe-pytorch 0.1.8 MoE (GEGLU experts, dense dispatch, top_n >= 2 only)
  lucidrains-moe     mixture-of-experts 0.2.3 MoE (ReLU experts: 2 of the 3 matmuls; top-2 only)
  ceiling            one dense SwiGLU FFN of width K*H on all tokens: the same active FLOPs
  ceiling-compiled   torch.compile(ceiling)
Tokens/s = tokens / (forward + backward seconds), median of --reps interleaved repetitions after
one warm-up (a method whose warm-up took over SLOW_STEP_S is timed once). On CPU the clock is the
process's CPU time (user + system) with one torch thread: the work done, whatever else runs on
the machine. The peers that create float32 tensors internally run under torch.autocast when the
dtype is a half type.

    python benchmarks/moe_layer.py          # make bench: 4096 tokens, E=64, K in {1,2}
    python benchmarks/moe_layer.py --full   # the grid tokens {4096,16384} x E {8,64} x K {1,2,4}
    python benchmarks/moe_layer.py --full --device cuda --dtype bfloat16 \
        --out benchmarks/results/moe_layer_h200_bf16.json   # GPU, about 3 min on an H200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gatelab
from gatelab.moe import SparseMoE
from gatelab.threads import torch_threads

D_MODEL, D_HIDDEN, SEED = 512, 1024, 0
# "cpu" = process CPU time (user + system): with --threads 1 it is the work done, immune to load
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DENSE_LIMIT = 3e8  # skip dense-dispatch methods whose (N, E, C) tensor has more elements
SLOW_STEP_S = 10.0  # a method whose warm-up step took longer is timed once
PEERS_UNDER_AUTOCAST = ("st-moe", "lucidrains-moe")  # they build float32 tensors internally


class ReferenceLoop(nn.Module):
    """Hugging Face Mixtral-style expert loop, dropless, on a SparseMoE's weights."""

    def __init__(self, moe: SparseMoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x):
        m = self.moe
        logits = x @ m.router.weight.T
        weights, indices = torch.topk(torch.softmax(logits.float(), -1), m.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        hit = torch.bincount(indices.reshape(-1), minlength=m.n_experts).nonzero().flatten()
        for e in hit.tolist():
            token, slot = torch.where(indices == e)
            h = F.silu(x[token] @ m.w_gate[e]) * (x[token] @ m.w_up[e])
            out.index_add_(0, token, (h @ m.w_down[e]) * weights[token, slot, None])  # as HF
        return out


class GShardDense(nn.Module):
    """GShard-style dispatch with dense one-hot (N, E, C) tensors and einsums (arXiv:2006.16668)."""

    def __init__(self, moe: SparseMoE, capacity_factor: float = 1.25) -> None:
        super().__init__()
        self.moe, self.capacity_factor = moe, capacity_factor

    def forward(self, x):
        m = self.moe
        n, e, k = x.shape[0], m.n_experts, m.top_k
        c = math.ceil(self.capacity_factor * n * k / e)
        logits = x @ m.router.weight.T
        weights, indices = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1)  # (N, K)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        mask = F.one_hot(indices.T.reshape(-1), e)  # (K N, E) choice-major
        position = (torch.cumsum(mask, 0) - 1) * mask  # (K N, E)
        keep = (position < c) & mask.bool()
        slot = F.one_hot(position.clamp(max=c - 1), c) * keep.unsqueeze(-1)  # (K N, E, C)
        dispatch = slot.view(k, n, e, c).sum(0).to(x.dtype)  # (N, E, C)
        combine = (slot.view(k, n, e, c) * weights.T.reshape(k, n, 1, 1)).sum(0)  # (N, E, C)
        xe = torch.einsum("nec,nd->ecd", dispatch, x)  # (E, C, D)
        h = F.silu(torch.bmm(xe, m.w_gate)) * torch.bmm(xe, m.w_up)
        ye = torch.bmm(h, m.w_down)  # (E, C, D)
        return torch.einsum("nec,ecd->nd", combine.to(x.dtype), ye)


class DenseCeiling(nn.Module):
    """A dense SwiGLU FFN of width K*H: the active FLOPs of a top-K layer, with no routing."""

    def __init__(self, top_k: int, **kw) -> None:
        super().__init__()
        self.w_gate = nn.Linear(D_MODEL, top_k * D_HIDDEN, bias=False, **kw)
        self.w_up = nn.Linear(D_MODEL, top_k * D_HIDDEN, bias=False, **kw)
        self.w_down = nn.Linear(top_k * D_HIDDEN, D_MODEL, bias=False, **kw)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def _peer_st_moe(e, k, kw):
    from st_moe_pytorch import MoE

    # expert_hidden_mult=3 gives GEGLU width int(512 * 3 * 2/3) = 1024 = H
    layer = MoE(D_MODEL, num_experts=e, gating_top_n=k, expert_hidden_mult=3).to(kw["device"])
    return lambda x: layer(x.unsqueeze(0)).outputs.squeeze(0)


def _peer_lucidrains(e, k, kw):
    from mixture_of_experts import MoE

    if k != 2:
        raise ValueError("top-2 gating only")
    layer = MoE(D_MODEL, num_experts=e, hidden_dim=D_HIDDEN).to(kw["device"])
    return lambda x: layer(x.unsqueeze(0))[0].squeeze(0)


def _autocast(name: str, kw: dict):
    """Peers keep float32 weights and run under autocast when the benchmark dtype is a half type."""
    half = kw["dtype"] in (torch.bfloat16, torch.float16)
    if name in PEERS_UNDER_AUTOCAST and half:
        return torch.autocast(kw["device"].type, dtype=kw["dtype"])
    return contextlib.nullcontext()


def build_methods(n, e, k, kw, args):
    """name -> callable(x) -> y, or a string saying why the method was skipped."""
    moe = SparseMoE(D_MODEL, D_HIDDEN, e, k, **kw)
    methods = {"gatelab": moe}
    if args.compile:
        methods["gatelab-compiled"] = torch.compile(moe, fullgraph=True)
    for backend in args.backends:
        variant = SparseMoE(D_MODEL, D_HIDDEN, e, k, backend=backend, **kw)
        variant.load_state_dict(moe.state_dict())
        methods[f"gatelab[{backend}]"] = variant
    methods["reference"] = ReferenceLoop(moe)
    dense_elements = n * e * math.ceil(1.25 * n * k / e) * k
    too_big = f"skipped: (K N, E, C) dispatch of {dense_elements:.1e} elements"
    methods["gshard"] = GShardDense(moe) if dense_elements <= DENSE_LIMIT else too_big
    for name, make in (("st-moe", _peer_st_moe), ("lucidrains-moe", _peer_lucidrains)):
        if dense_elements > DENSE_LIMIT:
            methods[name] = too_big
            continue
        try:
            methods[name] = make(e, k, kw)
            with _autocast(name, kw):  # probe: some top_k are unsupported
                methods[name](torch.randn(4 * e, D_MODEL, **kw))
        except Exception as error:  # noqa: BLE001 - a peer failing is a result, not a crash
            methods[name] = f"fails: {type(error).__name__}: {str(error)[:80]}"
    ceiling = DenseCeiling(k, **kw)
    methods["ceiling"] = ceiling
    if args.compile:
        methods["ceiling-compiled"] = torch.compile(ceiling, fullgraph=True)
    return methods


def time_step(name, fn, x, grad, sync, kw, clock):
    """One forward+backward: (seconds by ``clock``, user s, system s, minor page faults)."""
    x.grad = None
    for p in fn.parameters() if isinstance(fn, nn.Module) else []:
        p.grad = None
    sync()
    before, usage = clock(), resource.getrusage(resource.RUSAGE_SELF)
    with _autocast(name, kw):
        y = fn(x)
    y.backward(grad.to(y.dtype))
    sync()
    seconds, after = clock() - before, resource.getrusage(resource.RUSAGE_SELF)
    return (
        seconds,
        after.ru_utime - usage.ru_utime,
        after.ru_stime - usage.ru_stime,
        after.ru_minflt - usage.ru_minflt,
    )


def run_config(n, e, k, args, kw, sync):
    # a fresh dynamo cache per cell: past torch._dynamo.config.recompile_limit (8) compiled
    # modules fall back to eager without an error, so a 12-cell grid would time eager late cells
    torch._dynamo.reset()
    torch.manual_seed(SEED)
    methods = build_methods(n, e, k, kw, args)
    x = torch.randn(n, D_MODEL, **kw).requires_grad_()
    grad = torch.randn(n, D_MODEL, **kw)
    live = {name: fn for name, fn in methods.items() if not isinstance(fn, str)}
    samples = {name: [] for name in live}
    compile_s = {}
    for rep in range(args.reps + 1):  # rep 0 is warm-up (and compilation); methods interleaved
        for name, fn in live.items():
            if rep > 1 and samples[name] and samples[name][0][0] > SLOW_STEP_S:
                continue
            sample = time_step(name, fn, x, grad, sync, kw, CLOCKS[args.clock])
            if rep:
                samples[name].append(sample)
            elif name.endswith("-compiled"):
                compile_s[name] = sample[0]
    row = {"tokens": n, "n_experts": e, "top_k": k, "methods": {}}
    for name, fn in methods.items():
        if isinstance(fn, str):
            row["methods"][name] = {"status": fn}
            continue
        columns = zip(*samples[name], strict=True)
        seconds, user, system, faults = (statistics.median(c) for c in columns)
        row["methods"][name] = {
            "tokens_per_s": n / seconds,
            "seconds": [s[0] for s in samples[name]],
            "user_s": user,
            "system_s": system,
            "minor_faults": faults,
        }
        if name in compile_s:
            row["methods"][name]["first_call_s"] = compile_s[name]
    speed = {name: m.get("tokens_per_s") for name, m in row["methods"].items()}
    row["vs_reference"] = speed["gatelab"] / speed["reference"]
    row["vs_ceiling"] = speed["gatelab"] / speed["ceiling"]
    if speed.get("gshard"):
        row["vs_gshard"] = speed["gatelab"] / speed["gshard"]
    if args.compile:
        row["compiled_vs_ceiling"] = speed["gatelab-compiled"] / speed["ceiling"]
        row["compiled_vs_compiled_ceiling"] = speed["gatelab-compiled"] / speed["ceiling-compiled"]
    return row


RATIOS = {
    "vs_reference": "×reference",
    "vs_ceiling": "×ceiling",
    "compiled_vs_ceiling": "compiled ×ceiling",
    "compiled_vs_compiled_ceiling": "compiled ×compiled ceiling",
    "vs_gshard": "×gshard",
}


def paired_range(row, name="gatelab", peer="reference") -> str:
    """Min-max over repetitions of ``name``'s speed over ``peer``'s, each pair timed back to back.

    The noise of the median ratio: a cell whose range straddles a target is not resolved. A
    method timed once (over SLOW_STEP_S) pairs with the first repetition only.
    """
    ours, theirs = row["methods"][name].get("seconds"), row["methods"][peer].get("seconds")
    if not ours or not theirs:
        return "n/a"
    pairs = [t / o for o, t in zip(ours, theirs, strict=False)]
    return f"{min(pairs):.2f}–{max(pairs):.2f}" if len(pairs) > 1 else f"{pairs[0]:.2f}"


def markdown(rows, names):
    ratios = [key for key in RATIOS if any(key in r for r in rows)]
    head = "| tokens | E | K | " + " | ".join(names + [RATIOS[r] for r in ratios])
    head += " | ×reference per repetition |"
    lines = [head, "|" + "---|" * (len(names) + len(ratios) + 4)]
    for r in rows:
        cells = []
        for name in names:
            m = r["methods"].get(name, {"status": "-"})
            cells.append(f"{m['tokens_per_s']:,.0f}" if "tokens_per_s" in m else "n/a")
        cells += [f"{r[key]:.2f}" if key in r else "n/a" for key in ratios]
        cells.append(paired_range(r))
        lines.append(
            f"| {r['tokens']} | {r['n_experts']} | {r['top_k']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (1; --full: 3)")
    parser.add_argument("--full", action="store_true", help="the grid --tokens x E {8,64} x K 1-4")
    parser.add_argument("--backends", nargs="*", default=[], choices=["loop", "grouped_mm"])
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384], help="grid subset")
    parser.add_argument("--experts", type=int, nargs="*", default=[8, 64], help="grid subset")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's)")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default=None, help="default: cpu on CPU, wall on CUDA"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/moe_layer.json"))
    parser.add_argument("--table", type=Path, default=None, help="print a result JSON's table")
    args = parser.parse_args()
    if args.table:
        rows = json.loads(args.table.read_text())["rows"]
        print(markdown(rows, list(rows[0]["methods"])))
        return
    if args.reps is None:
        args.reps = 3 if args.full else 1
    if args.clock is None:  # one thread's CPU time is the work done, unaffected by other jobs
        args.clock = "wall" if args.device.startswith("cuda") else "cpu"
    with torch_threads(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Time every configuration of the grid and write the JSON."""
    start = time.perf_counter()
    kw = {"device": torch.device(args.device), "dtype": getattr(torch, args.dtype)}
    cuda = kw["device"].type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    grid = (
        [(n, e, k) for n in args.tokens for e in args.experts for k in (1, 2, 4)]
        if args.full
        else [(4096, 64, 1), (4096, 64, 2)]
    )
    rows, load_start = [], os.getloadavg()[0]
    for n, e, k in grid:
        rows.append(run_config(n, e, k, args, kw, sync))
        r = rows[-1]
        line = f"N={n} E={e} K={k}: x{r['vs_reference']:.2f} ref, x{r['vs_ceiling']:.2f} ceiling"
        if args.compile:
            line += f", compiled x{r['compiled_vs_ceiling']:.2f} ceiling"
        print(line, flush=True)
    names = list(rows[0]["methods"])
    table = markdown(rows, names)
    print(table)
    versions = {p: metadata.version(p) for p in ("torch", "st-moe-pytorch", "mixture-of-experts")}
    hardware = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg_1m_start_end": [load_start, os.getloadavg()[0]],
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    payload = {
        "config": {**vars(args), "out": str(args.out), "d_model": D_MODEL, "d_hidden": D_HIDDEN},
        "seed": SEED,
        "versions": {"gatelab": gatelab.__version__, **versions},
        "hardware": hardware,
        "run_time_s": time.perf_counter() - start,
        "rows": rows,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out} ({payload['run_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
