"""Compile every dispatch kernel for a GPU target ahead of time, on a machine without a GPU.

    python -m kernels.triton_aot [--arch 90] [--ptxas] [--quick]

The CPU test tier runs the kernels in triton's interpreter, which checks far less than the
compiler does (types of loop-carried values, constexpr use, layouts). This compiles each kernel,
in the specializations its launcher produces, through triton's real pipeline (TTIR -> TTGIR ->
LLVM IR -> PTX -> cubin with the ptxas that ships in triton's wheel) for an NVIDIA target, by
default the H200's sm_90, so a kernel that would not compile on the GPU fails here first.
``--ptxas`` also prints registers, spills and shared memory per kernel from ``ptxas -v``.

Run it in a process without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

# Pointer element types of the row tensors the launchers accept, as triton spells them.
_ROW_TYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}


@dataclass(frozen=True)
class Spec:
    """One compilation: a kernel, its argument types, the constexprs a launcher passes."""

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]

    @property
    def label(self) -> str:
        shown = {k: getattr(v, "name", v) for k, v in self.constexprs.items()}
        rows = next((v for k, v in self.signature.items() if k in ("src_ptr", "y_ptr")), "")
        return f"{self.kernel}[{rows}]{shown}"


def specs() -> list[Spec]:
    """The specializations the launchers produce on a GPU, for bf16/fp32 rows and typical D."""
    import triton.language as tl

    from . import triton_permute as tp
    from . import triton_positions as tq

    out: list[Spec] = []
    # positions, with the tiles expert_positions picks on a GPU; NB = 1 is specialized by the launcher.
    sub, n_sub = tq._default_tiles(1 << 20, 64, interp=False)
    for e_p2 in (8, 64, 256, tq.MAX_RUNNING_E):
        out.append(
            Spec(
                "_chunk_rank_kernel",
                {
                    "expert_ptr": "*i64",
                    "local_ptr": "*i64",
                    "hist_ptr": "*i32",
                    "R": "i32",
                    "E": "i32",
                    "SUB": "constexpr",
                    "N_SUB": "constexpr",
                    "E_P2": "constexpr",
                },
                {"SUB": sub, "N_SUB": n_sub, "E_P2": e_p2},
            )
        )
    out.append(
        Spec(
            "_block_rank_kernel",
            {
                "expert_ptr": "*i64",
                "local_ptr": "*i64",
                "hist_ptr": "*i32",
                "R": "i32",
                "E": "i32",
                "BLOCK_R": "constexpr",
            },
            {"BLOCK_R": tq._default_tiles(1 << 20, tq.MAX_RUNNING_E + 1, interp=False)[0]},
        )
    )
    for e_p2, nb in ((8, "i32"), (256, "i32"), (32, 1)):
        block_e = min(e_p2, 32)
        sig_nb = {"NB": "constexpr"} if nb == 1 else {"NB": nb}
        out.append(
            Spec(
                "_scan_blocks_kernel",
                {
                    "hist_ptr": "*i32",
                    "prefix_ptr": "*i32",
                    "counts_ptr": "*i64",
                    **sig_nb,
                    "E": "i32",
                    "BLOCK_B": "constexpr",
                    "BLOCK_E": "constexpr",
                },
                {"BLOCK_B": 2048 // block_e, "BLOCK_E": block_e, **({"NB": 1} if nb == 1 else {})},
            )
        )
    out.append(
        Spec(
            "_add_prefix_kernel",
            {
                "expert_ptr": "*i64",
                "rank_ptr": "*i64",
                "prefix_ptr": "*i32",
                "R": "i32",
                "E": "i32",
                "CHUNK": "constexpr",
                "BLOCK_R": "constexpr",
            },
            {"CHUNK": sub * n_sub, "BLOCK_R": 1024},
        )
    )
    out.append(
        Spec(
            "_offsets_kernel",
            {"counts_ptr": "*i64", "offsets_ptr": "*i64", "E": "i32", "BLOCK_E": "constexpr"},
            {"BLOCK_E": 256},
        )
    )
    for row in ("bf16", "fp32"):
        ptr = _ROW_TYPES[row]
        for dim in (4096, 13):  # D >= 1024 gives one tile shape; 13 the small-D one
            bm, bd = tp._tiles(1 << 20, dim, interp=False)
            for scale in (False, True):
                out.append(
                    Spec(
                        "_gather_rows_kernel",
                        {
                            "src_ptr": ptr,
                            "index_ptr": "*i64",
                            "scale_ptr": "*fp32" if scale else "*i64",
                            "out_ptr": ptr,
                            "M": "i32",
                            "D": "i32",
                            "stride_s": "i32",
                            "stride_o": "i32",
                            "HAS_SCALE": "constexpr",
                            "ACC": "constexpr",
                            "BLOCK_M": "constexpr",
                            "BLOCK_D": "constexpr",
                        },
                        {"HAS_SCALE": scale, "ACC": tl.float32, "BLOCK_M": bm, "BLOCK_D": bd},
                    )
                )
            for weight in (False, True):
                out.append(
                    Spec(
                        "_segment_sum_kernel",
                        {
                            "src_ptr": ptr,
                            "ptr_ptr": "*i64",
                            "index_ptr": "*i64",
                            "weight_ptr": "*fp32" if weight else ptr,
                            "widx_ptr": "*i64",
                            "out_ptr": ptr,
                            "T": "i32",
                            "D": "i32",
                            "stride_s": "i32",
                            "stride_o": "i32",
                            "HAS_WEIGHT": "constexpr",
                            "ACC": "constexpr",
                            "BLOCK_T": "constexpr",
                            "BLOCK_D": "constexpr",
                        },
                        {"HAS_WEIGHT": weight, "ACC": tl.float32, "BLOCK_T": bm, "BLOCK_D": bd},
                    )
                )
            bm, bd = tp._tiles(1 << 20, dim, interp=False, elems=2048)
            out.append(
                Spec(
                    "_combine_backward_kernel",
                    {
                        "grad_ptr": ptr,
                        "y_ptr": ptr,
                        "token_ptr": "*i64",
                        "nrow_ptr": "*i64",
                        "weight_ptr": "*fp32",
                        "grad_y_ptr": ptr,
                        "grad_w_ptr": "*fp32",
                        "M": "i32",
                        "D": "i32",
                        "stride_g": "i32",
                        "stride_y": "i32",
                        "stride_gy": "i32",
                        "ACC": "constexpr",
                        "BLOCK_M": "constexpr",
                        "BLOCK_D": "constexpr",
                    },
                    {"ACC": tl.float32, "BLOCK_M": bm, "BLOCK_D": bd},
                )
            )
    return out


def _ptxas_report(ptx: str, arch: int) -> str:
    """'regs=N spill=B smem=B' from the ptxas that ships with triton, or '' if it is missing."""
    try:  # the ptxas triton itself compiles with (3.6 and 3.9: get_ptxas(arch))
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:
        return ""
    if not os.path.exists(ptxas):
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run(
            [ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=False,
        )
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    smem = re.search(r"(\d+) bytes smem", text)
    return (
        f"regs={regs.group(1) if regs else '?'} spill={spill.group(1) if spill else '?'} "
        f"smem={smem.group(1) if smem else '0'}"
    )


def quick_specs() -> list[Spec]:
    """One specialization per kernel (the first listed): the CPU test tier's budget."""
    seen: dict[str, Spec] = {}
    for spec in specs():
        seen.setdefault(spec.kernel, spec)
    return list(seen.values())


def compile_all(arch: int = 90, ptxas: bool = False, verbose: bool = True, quick: bool = False) -> list[str]:
    """Compile every spec (one per kernel if ``quick``) for cuda sm_<arch>; return the failures."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run without TRITON_INTERPRET: the interpreter replaces the compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_permute, triton_positions

    kernels = {**vars(triton_positions), **vars(triton_permute)}
    target = GPUTarget("cuda", arch, 32)
    failures = []
    for spec in quick_specs() if quick else specs():
        fn = kernels[spec.kernel]
        try:
            compiled = triton.compile(ASTSource(fn, spec.signature, spec.constexprs), target=target)
            extra = _ptxas_report(compiled.asm["ptx"], arch) if ptxas else ""
            if verbose:
                print(f"ok   {spec.label} {extra}")
        except Exception as exc:  # report every failing kernel, not only the first
            failures.append(f"{spec.label}: {type(exc).__name__}: {exc}")
            if verbose:
                print(f"FAIL {failures[-1]}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--ptxas", action="store_true", help="print registers/spills/smem from ptxas -v")
    parser.add_argument("--quick", action="store_true", help="one specialization per kernel")
    args = parser.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}: compiling the dispatch kernels for sm_{args.arch}")
    failures = compile_all(args.arch, args.ptxas, quick=args.quick)
    total = len(quick_specs() if args.quick else specs())
    print(f"{total - len(failures)} compiled, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
