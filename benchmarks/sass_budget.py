"""The instruction budget of the InfoNCE kernels, read from their sm_90 machine code (no GPU needed).

    python benchmarks/sass_budget.py --out DIR            # DIR/<variant>.sass and DIR/budget.json
    python benchmarks/sass_budget.py --variants self_all --n 8192

Each variant is one ``contrastkit.info_nce`` call at the benchmark's settings (bf16, D = 128,
N = M = 32,768 by default), forward and backward, on CPU tensors. The call runs the launchers'
real host code; every kernel launch is intercepted instead of run, and compiled for sm_90 with
exactly the specialisation (constexprs, 16-byte divisibility of pointers and integers) that the
launch would have had on a GPU, with Triton's bundled ptxas. Per compiled kernel the tool writes
the SASS (``cuobjdump -sass``) and one JSON row:

- ``registers``, ``stack_bytes`` (``cuobjdump -res-usage``) and ``spill_instructions`` (LDL/STL
  anywhere in the kernel): no spills means both are 0;
- the **hot loops**: every loop of the SASS whose body (from a branch target up to the backward
  branch that jumps to it) holds a tensor-core instruction (``HGMMA``/``HMMA``);
- ``instr_per_logit``: for each hot loop, its instructions issued per tile iteration by every
  thread, ``body instructions x 32 x num_warps``, divided by the tile's logits ``BLOCK_N x BLOCK_M``,
  weighted by the share of tile iterations that loop runs, summed over the hot loops;
- ``mufu_per_logit``: the same for ``MUFU.*`` instructions (exp2, log2, reciprocal, ...);
- ``async_copies``: whether every hot loop issues asynchronous copies (``LDGSTS``, cp.async) or
  tensor-memory-accelerator loads (``UTMALDG``).

The weights: a kernel runs its loops over tiles chosen per program (see docs/kernels.md); each
loop's weight is the number of tile iterations it runs over the whole grid at the variant's size,
divided by the number of tiles the kernel must visit. A loop the kernel does not say how often it
runs counts once per visited tile. Instructions outside the hot loops (prologue, epilogue) and
the static body count (not a profile: every instruction of the body issued once per iteration)
are the definition; docs/kernels.md shows the resulting table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARCH = 90
BIN = None  # Triton's bundled CUDA tools, found on first use

# Per-kernel budgets of the "all" variants (instructions and MUFU ops per logit, see the issue's
# accounting: one logit's share of Q·Kᵀ at D = 128 costs an SM what ~8 issued thread-instructions do).
BUDGETS = {"forward": 12.0, "backward": 16.0}
MUFU_BUDGET = 1.5


@dataclasses.dataclass(frozen=True)
class Variant:
    """One info_nce call: self-contrast or query/key, a denominator, optional per-image groups, rows
    or a (B, C, H, W) feature map."""

    mode: str  # "self" or "qk"
    denominator: str = "all"
    group_rows: int = 0  # rows per image (contiguous groups in image order), 0 for none
    feature_map: bool = False
    classes: int = 8  # 0: paired views, query i's one positive is key i
    temperature: float = 0.1


VARIANTS = {
    "self_all": Variant("self"),  # SupCon, the benchmark's supcon8 case
    "self_each_positive": Variant("self", "each_positive"),
    "self_negatives": Variant("self", "negatives"),
    "qk_all": Variant("qk"),
    # the benchmark's cross_level case: 16 x 16 cells per image, paired, negatives within the image
    "qk_grouped": Variant("qk", group_rows=256, classes=0, temperature=0.07),
    "qk_grouped_each_positive": Variant("qk", "each_positive", group_rows=1024),
    "fmap_self_all": Variant("self", feature_map=True),
}
# The variants the budgets apply to (tests/kernels/test_sass_budget.py): "all" against the absolute
# budgets, the others against their "all" counterpart; a forward is the forward pass (the forward
# kernel plus each_positive's positive pass).
CHECKED = ("self_all", "self_each_positive", "self_negatives", "qk_all", "qk_grouped", "qk_grouped_each_positive",
           "fmap_self_all")
BASELINE = {"self_all": "self_all", "self_each_positive": "self_all", "self_negatives": "self_all",
            "qk_all": "qk_all", "qk_grouped": "qk_all", "qk_grouped_each_positive": "qk_all",
            "fmap_self_all": "self_all"}
RATIO = 1.5

# Outputs of the forward that the backward's host code reads: zero, not left uninitialised, since
# the launches that would write them are only recorded.
RECORDED_OUTPUTS = ("loss_ptr", "lse_ptr", "pos_sigmoid_ptr")


def tool(name: str) -> str:
    global BIN
    if BIN is None:
        import triton

        BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(BIN / name)


# ----------------------------------------------------------------------------- capture


@dataclasses.dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


def capture(variant: Variant, n: int, d: int = 128, dtype=torch.bfloat16, seed: int = 0) -> list[Launch]:
    """The kernel launches of one forward + backward of ``variant``, intercepted, in launch order."""
    import contrastkit.kernels as kernels
    import triton.runtime.jit as jit
    from contrastkit.kernels import info_nce as ops

    from contrastkit import info_nce

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))
        for name, value in zip(self.arg_names, args, strict=False):
            if name in RECORDED_OUTPUTS and isinstance(value, torch.Tensor):
                value.zero_()

    # No GPU here: the launchers run on CPU tensors and every launch is recorded, not run.
    saved = jit.JITFunction.run, ops._check_device, kernels.unavailable_reason
    jit.JITFunction.run, ops._check_device, kernels.unavailable_reason = record, lambda x: None, lambda: None
    try:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, variant.classes, (n,), generator=g) if variant.classes else torch.arange(n)
        kwargs = dict(labels=labels, denominator=variant.denominator, temperature=variant.temperature,
                      backend="triton")
        if variant.group_rows:
            kwargs["groups"] = torch.arange(n) // variant.group_rows
        if variant.feature_map:
            side = int(round((n // 8) ** 0.5))
            q = torch.randn(8, d, side, n // 8 // side, generator=g).to(dtype).requires_grad_(True)
        else:
            q = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
        leaves = [q]
        k = None
        if variant.mode == "qk":
            k = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
            leaves.append(k)
            kwargs["key_labels"] = torch.randint(0, variant.classes, (n,), generator=g) if variant.classes else labels
            if variant.group_rows:
                kwargs["key_groups"] = kwargs["groups"]
        loss = info_nce(q, k, **kwargs)
        torch.autograd.grad(loss, leaves)
    finally:
        jit.JITFunction.run, ops._check_device, kernels.unavailable_reason = saved
    return launches


def compile_launch(launch: Launch, arch: int = ARCH):
    """The launch compiled for ``arch`` with the specialisation a GPU launch would give it."""
    import triton
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.fn
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, {fn.arg_names[path[0]]: value for path, value in constexprs.items()}, bound


# ----------------------------------------------------------------------------- SASS


_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    text: str  # predicate, opcode and operands

    @property
    def opcode(self) -> str:
        words = self.text.split()
        return words[1] if words and words[0].startswith("@") else words[0]


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch
    instructions: tuple

    @property
    def size(self) -> int:
        return sum(1 for i in self.instructions if not i.opcode.startswith("NOP"))

    def count(self, prefixes: tuple[str, ...]) -> int:
        return sum(1 for i in self.instructions if i.opcode.startswith(prefixes))


MMA = ("HGMMA", "HMMA")
MUFU = ("MUFU",)
ASYNC = ("LDGSTS", "UTMALDG", "UBLKCP")
SPILL = ("LDL", "STL")


def parse_sass(text: str) -> list[Instruction]:
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            out.append(Instruction(int(match.group(1), 16), match.group(2)))
    return out


def _branch_target(instruction: Instruction) -> int | None:
    if instruction.opcode != "BRA":
        return None
    match = re.search(r"BRA\s+(?:`\()?[^0-9]*0x([0-9a-f]+)", instruction.text)
    return int(match.group(1), 16) if match else None


def hot_loops(instructions: list[Instruction]) -> list[Loop]:
    """Loops (a backward branch and the instructions from its target to it) that hold an MMA,
    innermost first where they nest, in address order."""
    index = {i.address: k for k, i in enumerate(instructions)}
    loops = []
    for k, instruction in enumerate(instructions):
        target = _branch_target(instruction)
        if target is None or target > instruction.address or target not in index:
            continue
        body = tuple(instructions[index[target]:k + 1])
        loop = Loop(index[target], k, body)
        if loop.count(MMA):
            loops.append(loop)
    # A loop around another (e.g. an outer persistent loop) is not a hot loop of its own.
    inner = [a for a in loops if not any(b is not a and a.start <= b.start and b.end <= a.end for b in loops)]
    return sorted(inner, key=lambda loop: loop.start)


def sass_of(cubin: bytes) -> tuple[str, dict]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    resources = {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return sass, resources


# ----------------------------------------------------------------------------- rows


def hot_loop_weights(kernel_name: str, args: dict, forward_logits: dict) -> list[float] | None:
    """Share of a launch's visited tiles that each of its tile loops runs, in source order, read from
    the launch's arguments (``args``: name -> value); None for a kernel without tile loops.

    The tile-loop kernels take per program the counts of clean, positive and masked tiles
    (``counts_ptr``, see kernels/_plan.py). each_positive's positive pass takes its chunk table
    (``chunks_ptr``: rows, two key ranges, exact) and counts per logit its forward kernel visits:
    the forward's launch (which comes first) records that number in ``forward_logits``."""
    block_n, block_m = args.get("BLOCK_N"), args.get("BLOCK_M")
    if kernel_name == "info_nce_fwd_positive_kernel":  # loops: exact chunks, then the others
        chunks = args["chunks_ptr"].to(torch.int64)
        tiles = -(-(chunks[:, 3] - chunks[:, 2]) // block_m) - (-(chunks[:, 5] - chunks[:, 4]) // block_m)
        exact = chunks[:, 6] != 0
        logits = block_n * block_m / forward_logits["visited"]
        return [float(tiles[exact].sum()) * logits, float(tiles[~exact].sum()) * logits]
    counts = args.get("counts_ptr")
    if counts is None:
        return None
    clean, positive, masked = (float(v) for v in counts.to(torch.float64).sum(0))
    total = max(clean + positive + masked, 1.0)
    if kernel_name == "info_nce_fwd_kernel":
        forward_logits["visited"] = total * block_n * block_m
    return [clean / total, positive / total, masked / total]


def loop_weights(launch: Launch, bound: dict, loops: int, forward_logits: dict) -> list[float]:
    """Share of the visited tiles that each hot loop runs (1 each where the kernel says nothing)."""
    found = hot_loop_weights(launch.fn.__name__, bound, forward_logits)
    return [1.0] * loops if found is None else found


def kernel_kind(name: str) -> str:
    return "forward" if "fwd" in name else "backward"


def budget_row(variant_name: str, launch: Launch, forward_logits: dict) -> tuple[dict, str] | None:
    compiled, constexprs, bound = compile_launch(launch)
    sass, resources = sass_of(compiled.asm["cubin"])
    instructions = parse_sass(sass)
    loops = hot_loops(instructions)
    if not loops:
        return None  # not a tile-loop kernel (row norms, gathers)
    block_n, block_m = constexprs["BLOCK_N"], constexprs["BLOCK_M"]
    warps = compiled.metadata.num_warps
    weights = loop_weights(launch, bound, len(loops), forward_logits)
    if len(weights) != len(loops):
        raise RuntimeError(f"{launch.fn.__name__}: {len(loops)} hot loops in the SASS, "
                           f"{len(weights)} loop weights from hot_loop_weights")
    per_logit = 32 * warps / (block_n * block_m)
    spills = sum(1 for i in instructions if i.opcode.startswith(SPILL))
    row = dict(
        variant=variant_name, kernel=launch.fn.__name__, kind=kernel_kind(launch.fn.__name__),
        BLOCK_N=block_n, BLOCK_M=block_m, num_warps=warps, num_stages=compiled.metadata.num_stages,
        registers=resources.get("REG"), stack_bytes=resources.get("STACK", 0), spill_instructions=spills,
        shared_bytes=compiled.metadata.shared,
        loops=[dict(instructions=loop.size, mufu=loop.count(MUFU), mma=loop.count(MMA),
                    async_copies=loop.count(ASYNC), weight=round(w, 4))
               for loop, w in zip(loops, weights, strict=True)],
        instr_per_logit=round(sum(w * loop.size for loop, w in zip(loops, weights, strict=True)) * per_logit, 2),
        mufu_per_logit=round(sum(w * loop.count(MUFU) for loop, w in zip(loops, weights, strict=True)) * per_logit, 3),
        async_copies=all(loop.count(ASYNC) > 0 for loop in loops),
        constexprs={k: v for k, v in constexprs.items() if k.isupper()},
    )
    return row, sass


def measure_variant(name: str, n: int) -> tuple[list[dict], str]:
    """The rows of one variant's tile-loop kernels and their SASS."""
    start = time.perf_counter()
    rows, dumps, forward_logits = [], [], {}
    for launch in capture(VARIANTS[name], n):
        result = budget_row(name, launch, forward_logits)
        if result is None:
            continue
        row, sass = result
        row["compile_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        dumps.append(f"// ===== {row['kernel']} {row['constexprs']} num_warps={row['num_warps']}\n{sass}")
    return rows, "\n".join(dumps)


def _measure_star(args):
    return measure_variant(*args)


def measure(variants: list[str], n: int, out: Path | None, jobs: int = 1) -> list[dict]:
    work = [(name, n) for name in variants]
    if jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(jobs)
        results = pool.imap(_measure_star, work)
    else:
        pool, results = None, map(_measure_star, work)
    rows = []
    try:
        for name, (variant_rows, sass) in zip(variants, results, strict=True):
            for row in variant_rows:
                print(json.dumps({k: v for k, v in row.items() if k != "constexprs"}), flush=True)
            rows += variant_rows
            if out is not None:
                (out / f"{name}.sass").write_text(sass)
    finally:
        if pool is not None:
            pool.close()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | kernel | tile (N×M, warps) | instr/logit | MUFU/logit | regs | stack B | spill instr "
             "| async in every hot loop | hot loops (instr × weight) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        loops = ", ".join(f"{loop['instructions']}×{loop['weight']:g}" for loop in r["loops"])
        lines.append(f"| {r['variant']} | {r['kernel']} | {r['BLOCK_N']}×{r['BLOCK_M']}, {r['num_warps']} "
                     f"| {r['instr_per_logit']:.1f} | {r['mufu_per_logit']:.2f} | {r['registers']} "
                     f"| {r['stack_bytes']} | {r['spill_instructions']} | {'yes' if r['async_copies'] else 'no'} "
                     f"| {loops} |")
    passes = forward_passes(rows)
    lines += ["", '| variant | forward pass: kernels | instr/logit | MUFU/logit | × its "all" |',
              "|---|---|---:|---:|---:|"]
    for name, total in passes.items():
        base = passes.get(BASELINE.get(name, name))
        ratio = f"{total['instr_per_logit'] / base['instr_per_logit']:.2f}" if base else "–"
        lines.append(f"| {name} | {' + '.join(total['kernels'])} | {total['instr_per_logit']:.1f} "
                     f"| {total['mufu_per_logit']:.2f} | {ratio} |")
    return "\n".join(lines)


def forward_passes(rows: list[dict]) -> dict[str, dict]:
    """Per variant, its forward pass: the forward kernel plus each_positive's positive pass, whose
    loops are weighted per logit the forward kernel visits, so the two add up."""
    passes: dict[str, dict] = {}
    for r in rows:
        if r["kind"] == "forward":
            total = passes.setdefault(r["variant"], dict(instr_per_logit=0.0, mufu_per_logit=0.0, kernels=[]))
            total["instr_per_logit"] = round(total["instr_per_logit"] + r["instr_per_logit"], 2)
            total["mufu_per_logit"] = round(total["mufu_per_logit"] + r["mufu_per_logit"], 3)
            total["kernels"].append(r["kernel"])
    return passes


def over_budget(rows: list[dict]) -> list[str]:
    """Every way the rows of the checked variants break the budgets (empty when all are met): per
    kernel, spills and asynchronous copies; per forward pass and per backward kernel, MUFU ops and
    instructions per logit (the "all" variants against the absolute budgets, the others against
    their "all" counterpart)."""
    problems = []
    passes = forward_passes(rows)
    by_kernel = {(r["variant"], r["kernel"]): r for r in rows}
    checks = [(f"{name} forward pass", "forward", total, passes.get(BASELINE[name]), BASELINE[name] == name)
              for name, total in passes.items() if name in CHECKED]
    for r in rows:
        if r["variant"] not in CHECKED:
            continue
        where = f"{r['variant']} {r['kernel']}"
        if r["stack_bytes"] or r["spill_instructions"]:
            problems.append(f"{where}: spills ({r['stack_bytes']} stack bytes, {r['spill_instructions']} LDL/STL)")
        if not r["async_copies"]:
            problems.append(f"{where}: a hot loop without asynchronous copies")
        if r["kind"] == "backward":
            base = by_kernel.get((BASELINE[r["variant"]], r["kernel"]))
            checks.append((where, "backward", r, base, base is None or base is r))
    for where, kind, measured, base, absolute in checks:
        if measured["mufu_per_logit"] > MUFU_BUDGET:
            problems.append(f"{where}: {measured['mufu_per_logit']} MUFU per logit > {MUFU_BUDGET}")
        budget = BUDGETS[kind] if absolute else RATIO * base["instr_per_logit"]
        if measured["instr_per_logit"] > budget:
            problems.append(f"{where}: {measured['instr_per_logit']} instructions per logit > {budget:.2f}")
    return problems


def toolchain() -> dict:
    import triton

    ptxas = subprocess.run([tool("ptxas"), "--version"], capture_output=True, text=True).stdout.strip()
    return dict(triton=triton.__version__, torch=torch.__version__, ptxas=ptxas.splitlines()[-1] if ptxas else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write <variant>.sass and budget.json here")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--n", type=int, default=32768, help="N = M of the variants (sets the loop weights)")
    parser.add_argument("--jobs", type=int, default=1, help="variants measured in parallel (worker processes)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("sass_budget.py compiles for the GPU: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.variants, args.n, args.out, args.jobs)
    if args.out is not None:
        record = dict(n=args.n, arch=ARCH, toolchain=toolchain(), rows=rows)
        (args.out / "budget.json").write_text(json.dumps(record, indent=1) + "\n")
    print(table(rows))
    problems = over_budget(rows)
    for problem in problems:
        print("over budget:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
