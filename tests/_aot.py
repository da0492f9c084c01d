"""Compiles fastvq's Triton kernels for GPUs that are not here: the machinery of test_aot_compile.py.

Runs in worker processes of their own: the test session sets ``TRITON_INTERPRET=1`` (_backends.py),
under which ``@triton.jit`` makes interpreted functions that cannot be compiled, so a worker drops it
before it imports Triton or fastvq. A worker launches each case the way its launcher does, through
Triton's own JIT (``warmup``: specialisation of the arguments, then ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32), options=...)``, no launch), with Triton's driver replaced by one
that names the target and its limits; reads the cubin's resources with the ``cuobjdump`` that Triton's wheel
carries, and the TTIR / TTGIR / PTX Triton wrote on the way.

What it costs (Triton 3.6, 202 cases, 707 compiles): about 0.6 s of CPU per compile, nearly all of it Triton's
lowering to LLVM and PTX and ptxas, each per target (the front end that sm_80 and sm_90 could share is under a
tenth); disassembling a cubin's SASS (nvdisasm) added 0.3 s more to each of the 595 with a ``tl.dot``, so the
tensor-core check reads the PTX's MMA instructions and disassembles one case per kernel and target to check
that they are what ptxas emits as ``HMMA`` / ``HGMMA``. Identical launches (22 of the 707, cases that share a
specialisation) compile once through the run's shared Triton cache.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import pkgutil
import re
import resource
import subprocess
import tempfile
import textwrap
import time
from types import SimpleNamespace

# arch, the opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) and the SM count
# of the A100 (sm_80) and the H100 / H200 (sm_90).
TARGETS = {
    "sm_80": {"arch": 80, "max_shared_mem": 166912, "multiprocessor_count": 108},
    "sm_90": {"arch": 90, "max_shared_mem": 232448, "multiprocessor_count": 132},
}
PACKAGE = "fastvq.backends.triton"
_SKIP_MODULES = {"common"}
# At most this many configs compiled per case and target (0 or unset: all). CI sets it for its second Triton
# (.ci/run), where compiling every config of every case twice would not fit its time; every case still
# compiles, with at least one config it launches.
CONFIGS_PER_CASE_VARIABLE = "FASTVQ_AOT_CONFIGS_PER_CASE"
# The tile lists are chosen with the Triton the project pins (.ci/run), where no launchable config may spill.
# Another Triton's code generation spills a few bytes in some of them: Triton 3.9 (ptxas 12.9) spills 4 to 16
# bytes in 13 of the 406 launchable configs, one at 56 of its 255 registers, so not register pressure that a
# smaller tile would relieve. There a spill up to SPILL_BYTES_ALLOWED_ELSEWHERE of stack (and no local memory)
# is reported, not failed; a larger one fails on every Triton.
TILES_CHOSEN_WITH_TRITON = (3, 6)
SPILL_BYTES_ALLOWED_ELSEWHERE = 16


def spill_bytes_allowed(triton_version: str) -> int:
    """The stack a launchable config may use with this Triton (``"3.9.0"``): 0 with the one the tiles are
    chosen with."""
    major_minor = tuple(int(part) for part in triton_version.split(".")[:2])
    return 0 if major_minor == TILES_CHOSEN_WITH_TRITON else SPILL_BYTES_ALLOWED_ELSEWHERE


def configs_per_case() -> int:
    value = os.environ.get(CONFIGS_PER_CASE_VARIABLE, "").strip() or "0"
    if not value.isdigit():
        raise ValueError(f"{CONFIGS_PER_CASE_VARIABLE} must be a count of configs (0: all), got {value!r}")
    return int(value)


def sample_configs(candidates: list, kept: list, limit: int, case_index: int) -> list:
    """``limit`` of a case's candidate configs, spread over the list from an offset that moves with the case
    (so that the cases of a kernel cover different tiles between them), with at least one that the launch
    keeps; all of them when ``limit`` is 0 or covers them."""
    if not limit or len(candidates) <= limit:
        return list(candidates)
    stride = len(candidates) / limit
    offset = case_index % max(1, int(stride))
    sample = [candidates[offset + int(i * stride)] for i in range(limit)]
    if kept and not any(config in kept for config in sample):
        sample[-1] = kept[case_index % len(kept)]
    return sample


def kept_by_launch(prune, configs, candidates, chosen, fits, case_index) -> tuple[list, list]:
    """``(kept, chosen)``: what the launch's prune keeps, as far as it concerns the ``chosen`` configs (compiled,
    ``fits(config)`` says whether one fits the target's shared memory), and ``chosen`` again, one it keeps
    swapped in where a sample has none. ``prune(some)`` runs the launch's prune over ``some`` of the
    autotuner's ``configs``; ``candidates`` are those its family prune passes.

    All candidates chosen: the prune over every config (it compiles nothing: the JIT's cache holds them). A
    sample: the prune over the sample alone, which compiles nothing more. Where that keeps exactly the sampled
    configs that fit, the launch keeps them too, since the shared-memory prune keeps every config that fits
    when one does. Otherwise the prune over every config decides (compiling the others)."""
    if len(chosen) == len(candidates):
        return prune(configs), chosen
    kept = prune(chosen)
    if kept == [config for config in chosen if fits(config)]:
        return kept, chosen
    kept = prune(configs)
    if not any(config in kept for config in chosen):
        chosen = chosen[:-1] + [kept[case_index % len(kept)]]
    return kept, chosen


def worker_init(cache_dir: str) -> None:
    """Compile for real, into a cache of this run only (nothing is reused across runs)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


class _TargetDriver:
    """Triton's driver, as far as compiling without launching reaches, for a GPU that is not here.

    ``get_current_device`` answers the arch, so each target gets its own JIT cache."""

    def __init__(self, target_name: str):
        from triton.backends.compiler import GPUTarget

        spec = TARGETS[target_name]
        self.target = GPUTarget("cuda", spec["arch"], 32)
        properties = {**spec, "max_num_regs": 65536, "warpSize": 32}
        self.utils = SimpleNamespace(get_device_properties=lambda device: dict(properties))

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@functools.lru_cache(maxsize=None)
def _cases(family: str) -> list:
    """A family's compile cases, built once per worker."""
    return _family_modules()[family].compile_cases()


def _family_modules():
    package = importlib.import_module(PACKAGE)
    names = [info.name for info in pkgutil.iter_modules(package.__path__) if info.name not in _SKIP_MODULES]
    return {name: importlib.import_module(f"{PACKAGE}.{name}") for name in sorted(names)}


def _unwrap(launcher):
    """``(autotuner or None, what the autotuner calls, the JITFunction)`` of a case's launcher."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    autotuner = launcher if isinstance(launcher, Autotuner) else None
    inner = launcher.fn if autotuner is not None else launcher
    jit = inner
    while isinstance(jit, Heuristics):
        jit = jit.fn
    return autotuner, inner, jit


def _called_jit_functions(jit_function) -> list:
    """The ``@triton.jit`` functions a kernel calls (its device helpers), transitively."""
    from triton.runtime.jit import JITFunction

    found, stack = [], [jit_function]
    while stack:
        function = stack.pop()
        tree = ast.parse(textwrap.dedent(function.src))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = function.__globals__.get(node.func.id)
                if isinstance(callee, JITFunction) and callee not in found:
                    found.append(callee)
                    stack.append(callee)
    return found


def list_cases() -> dict:
    """Every family's cases (names only), and what no case covers."""
    from triton.runtime.jit import JITFunction

    cases, uncovered, missing_function = [], [], []
    for family, module in _family_modules().items():
        kernels = [
            value for value in vars(module).values()
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__
        ]
        if not kernels:
            continue
        if not callable(getattr(module, "compile_cases", None)):
            missing_function.append(module.__name__)
            continue
        covered = []
        for index, case in enumerate(_cases(family)):
            jit = _unwrap(case.launcher)[2]
            cases.append({"family": family, "index": index, "name": case.name, "kernel": jit.__name__})
            covered += [jit, *_called_jit_functions(jit)]
        uncovered += [f"{module.__name__}.{k.__name__}" for k in kernels if k not in covered]
    return {"cases": cases, "uncovered": uncovered, "missing_compile_cases": missing_function}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _source_lines(ir: str) -> dict:
    """``#locN`` -> ``file:line`` from an MLIR module's location table, through names
    (``loc("x"(#locM))``), call sites of inlined helpers (``loc(callsite(#locA at #locB))``: the
    helper's line) and fused locations (the first)."""
    definitions = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)\s*$", ir, re.MULTILINE))

    def resolve(name, depth=0):
        body = definitions.get(name, "")
        found = re.match(r'"([^"]+)":(\d+)', body)
        if found:
            return f"{os.path.basename(found.group(1))}:{found.group(2)}"
        inner = re.search(r"#loc\d*", body)
        return resolve(inner.group(0), depth + 1) if inner and depth < 32 else "?"

    return {name: resolve(name) for name in definitions}


def _where(line: str, table: dict) -> str:
    match = re.search(r"loc\((#loc\d*)\)\s*$", line)
    return table.get(match.group(1), "?") if match else "?"


def analyse(kernel, dump_sass: bool = False) -> dict:
    """What the test asserts on, read from one compiled kernel; with ``dump_sass`` (and a ``tl.dot``) the
    tensor-core instructions of its SASS too (``hmma``, ``hgmma``; None without)."""
    ttir, ttgir, ptx = kernel.asm["ttir"], kernel.asm["ttgir"], kernel.asm["ptx"]
    source_dots = len(re.findall(r"= tt\.dot ", ttir))
    # One cuobjdump run. The SASS (nvdisasm: half as much CPU again as the compile) only where asked: the PTX's
    # tensor-core instructions are read for every kernel.
    sass = dump_sass and source_dots > 0
    flags = ["--dump-resource-usage"] + (["--dump-sass"] if sass else [])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([_cuobjdump(), *flags, cubin.name], capture_output=True, text=True, check=True).stdout
    resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump)
    registers, stack, static_shared, local = (int(value) for value in resources.groups())
    ttir_lines = _source_lines(ttir)
    # Pointer arithmetic: the offset operand's type is the last one in `tt.addptr %p, %o : P, O`. An
    # offset that is a compile-time constant (`p + 1`) cannot overflow, whatever its width.
    constants = set(re.findall(r"(%[\w.#]+) = arith\.constant", ttir))
    narrow_offsets = sorted({
        _where(line, ttir_lines)
        for line in ttir.splitlines()
        if "tt.addptr" in line and re.search(r",\s*(tensor<[^>]*xi32>|i32)\s+loc", line)
        and re.search(r"tt\.addptr\s+%[\w.#]+,\s*(%[\w.#]+)", line).group(1) not in constants
    })
    strong_atomics = sorted({
        _where(line, ttir_lines) for line in ttir.splitlines() if "tt.atomic_rmw" in line and "relaxed" not in line
    })
    atomics = sum("tt.atomic_rmw" in line for line in ttir.splitlines())
    # In TTGIR a dot on tensor cores is a Hopper warp-group dot or a tt.dot into an MMA layout;
    # a tt.dot into any other layout is computed with FMAs.
    dot_lines = [line for line in ttgir.splitlines() if re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", line)]
    mma_layouts = set(re.findall(r"^(#\w+) = #ttg\.nvidia_mma", ttgir, re.MULTILINE))
    fma_dots = [
        line for line in dot_lines
        if "ttng.warp_group_dot" not in line
        and not any(re.search(rf"{name}\b[^>]*>\s+loc", line) for name in mma_layouts)
    ]
    return {
        "shared": kernel.metadata.shared + static_shared,
        "registers": registers,
        "stack": stack,
        "local": local,
        "source_dots": source_dots,
        "dots": len(dot_lines),
        "fma_dots": [_where(line, _source_lines(ttgir)) for line in fma_dots],
        # PTX's tensor-core MMAs: mma.sync (ptxas: HMMA) and Hopper's wgmma.mma_async (HGMMA).
        "ptx_mma": len(re.findall(r"^\s*mma\.sync\b", ptx, re.MULTILINE)),
        "ptx_wgmma": len(re.findall(r"^\s*wgmma\.mma_async\b", ptx, re.MULTILINE)),
        "hgmma": len(re.findall(r"\bHGMMA\.", dump)) if sass else None,
        "hmma": len(re.findall(r"\bHMMA\.", dump)) if sass else None,
        "narrow_offsets": narrow_offsets,
        "atomics": atomics,
        "strong_atomics": strong_atomics,
    }


def _config_name(config) -> str:
    blocks = "x".join(str(value) for value in config.kwargs.values())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def compile_case(family: str, index: int, target_name: str, dump_sass: bool = False) -> dict:
    """Compiles one case for one target in every config it can launch with (or a sample of them, see
    :func:`configs_per_case`); one result per config compiled. ``dump_sass``: read their SASS too."""
    from triton.runtime import driver

    driver.set_active(_TargetDriver(target_name))
    case = _cases(family)[index]
    autotuner, inner, jit = _unwrap(case.launcher)
    limit = TARGETS[target_name]["max_shared_mem"]
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    result = {"family": family, "case": case.name, "kernel": jit.__name__, "target": target_name, "configs": [],
              "error": None, "prune": None,
              "int32_tile_offsets": getattr(_family_modules()[family], "INT32_TILE_OFFSETS", None)}
    try:
        if autotuner is not None:
            configs = list(autotuner.configs)
            named_args = dict(zip(autotuner.arg_names, case.args))
            prune = autotuner.early_config_prune
            family_prune = getattr(prune, "family_prune", None)
            if prune is None or family_prune is None:
                raise AssertionError(f"{family}: the autotuner of {jit.__name__} does not prune by shared memory "
                                     "(early_config_prune=fits_shared_memory(...))")
            candidates = family_prune(configs, named_args, **case.meta)
        else:
            candidates = list(case.configs)
            if not candidates:
                raise AssertionError(f"{case.name}: a launch that is not autotuned must name its configs")
        chosen = sample_configs(candidates, candidates, configs_per_case(), index)
        facts = {}

        def compile_and_read(config):
            compiled = inner.warmup(*case.args, grid=(1,), **case.meta, **config.all_kwargs())
            facts[config] = analyse(compiled.result() if hasattr(compiled, "result") else compiled, dump_sass)
            facts[config].update(config=_config_name(config), fits=facts[config]["shared"] <= limit)

        for config in chosen:
            compile_and_read(config)
        if autotuner is None:
            kept = candidates
        else:
            kept, chosen = kept_by_launch(lambda some: prune(some, named_args, **case.meta), configs, candidates,
                                          chosen, lambda config: facts[config]["fits"], index)
            for config in chosen:
                if config not in facts:
                    compile_and_read(config)
            result["prune"] = {"candidates": len(candidates), "kept": [_config_name(c) for c in kept]}
        for config in chosen:
            result["configs"].append({**facts[config], "kept": config in kept})
    except Exception as error:  # noqa: BLE001 - reported per case by the test
        result["error"] = f"{type(error).__name__}: {error}"
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = _cpu_seconds() - cpu_started
    return result


def _cpu_seconds() -> float:
    """CPU time of this worker and the tools it ran (ptxas, cuobjdump): on an idle machine, the wall time."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
