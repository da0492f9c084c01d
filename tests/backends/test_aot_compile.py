"""Every Triton kernel fastvq can launch, compiled for sm_80 (A100) and sm_90 (H100/H200) without a GPU.

Triton's interpreter, which runs the kernels' arithmetic in CI, sees no shared memory, registers,
tensor cores, atomic orderings or int32 overflow. This test compiles each launch that the op
families list (``compile_cases()`` in each ``fastvq/backends/triton/<family>.py``; the convention is
in ``fastvq/backends/triton/__init__.py``) for both targets, in every config the launch can take on
that target, and asserts on the cubin (read with the ``cuobjdump`` in Triton's wheel) and the IR:

- it compiles, and the shared memory it asks for fits the target's per-block limit;
- the launch-time prune keeps exactly the configs that fit (and keeps at least one);
- no register spills: no stack frame and no local memory;
- every ``tl.dot`` lowers to tensor-core MMAs: PTX ``mma.sync`` (sm_80; ``wgmma.mma_async`` too on sm_90), which
  the SASS of one case per kernel and target shows as ``HMMA`` (``HGMMA``);
- every pointer offset is int64 (a column-major view of N rows has column stride N, and N * (D - 1)
  overflows int32 long before memory runs out); every atomic add is ``relaxed``;
- and every ``@triton.jit`` kernel of the package is launched by some case.

The compiles run in a pool of worker processes (one per core, at most 8) with a fresh Triton cache,
so nothing carries over from an earlier run. The per-target counts are printed. With
``FASTVQ_AOT_CONFIGS_PER_CASE=N`` each case compiles at most N of its configs, one that it launches among
them (CI's run with the newest Triton, ``.ci/run``): every family and case still compiles.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import _aot
import pytest

triton = pytest.importorskip("triton")


def _workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


@pytest.fixture(scope="module")
def aot():
    cache_dir = tempfile.mkdtemp(prefix="fastvq-aot-")
    started = time.perf_counter()
    try:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(_workers(), mp_context=context, initializer=_aot.worker_init,
                                 initargs=(cache_dir,)) as pool:
            listing = pool.submit(_aot.list_cases).result()
            # Each kernel's first case is disassembled (its SASS), on each target: the others' PTX suffices.
            first_cases = {}
            for case in listing["cases"]:
                first_cases.setdefault(case["kernel"], (case["family"], case["index"]))
            sass = set(first_cases.values())
            tasks = [(case["family"], case["index"], target, (case["family"], case["index"]) in sass)
                     for case in listing["cases"] for target in _aot.TARGETS]
            results = list(pool.map(_aot.compile_case, *zip(*tasks))) if tasks else []
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {"listing": listing, "results": results, "seconds": time.perf_counter() - started}


def _launchable(aot):
    """``(result, config facts)`` of every config a case can launch with on its target."""
    return [(result, facts) for result in aot["results"] for facts in result["configs"] if facts["kept"]]


def _label(result, facts):
    return f"{result['target']} {result['kernel']} [{result['case']}] {facts['config']}"


def test_every_triton_kernel_has_compile_cases(aot):
    listing = aot["listing"]
    assert not listing["missing_compile_cases"], (
        f"{listing['missing_compile_cases']} define @triton.jit kernels but no compile_cases() "
        "(see fastvq/backends/triton/__init__.py)"
    )
    assert not listing["uncovered"], f"no compile case launches {listing['uncovered']}"
    assert listing["cases"], "no compile cases found"


def test_every_case_compiles_for_sm80_and_sm90(aot, capsys):
    errors = [f"{r['target']} {r['kernel']} [{r['case']}]: {r['error']}" for r in aot["results"] if r["error"]]
    counts = collections.Counter(result["target"] for result, _ in _launchable(aot))
    cases = collections.Counter(result["target"] for result in aot["results"])
    compiled = collections.Counter(result["target"] for result in aot["results"] for _ in result["configs"])
    limit = _aot.configs_per_case()
    with capsys.disabled():
        cpu = sum(result["cpu_seconds"] for result in aot["results"])
        print(f"\nAOT compile with Triton {triton.__version__}"
              + (f" (at most {limit} configs per case, {_aot.CONFIGS_PER_CASE_VARIABLE})" if limit else "")
              + f": {len(aot['listing']['cases'])} cases, {aot['seconds']:.0f} s on {_workers()} workers "
              f"({cpu:.0f} s of CPU compiling); "
              + "; ".join(f"{target}: {counts[target]} launchable configs ({compiled[target]} compiled) over "
                          f"{cases[target]} cases"
                          for target in _aot.TARGETS))
    assert not errors, "\n".join(errors)
    assert all(counts[target] > 0 for target in _aot.TARGETS)


def test_shared_memory_fits_and_the_prune_keeps_what_fits(aot):
    problems = []
    for result in aot["results"]:
        for facts in result["configs"]:
            if facts["kept"] and not facts["fits"]:
                problems.append(f"{_label(result, facts)} needs {facts['shared']} B of shared memory, over "
                                f"{_aot.TARGETS[result['target']]['max_shared_mem']} B")
            if not facts["kept"] and facts["fits"]:
                problems.append(f"{_label(result, facts)} fits ({facts['shared']} B) but the prune dropped it")
        if result["prune"] is not None and not result["prune"]["kept"]:
            problems.append(f"{result['target']} {result['kernel']} [{result['case']}]: the prune kept nothing")
    assert not problems, "\n".join(problems)


def test_no_config_spills_registers(aot, capsys):
    """None with the Triton the tiles are chosen with; a few bytes are reported, not failed, with another
    (``_aot.TILES_CHOSEN_WITH_TRITON``)."""
    allowed = _aot.spill_bytes_allowed(triton.__version__)
    spills = [(f"{_label(r, f)}: {f['registers']} registers, stack {f['stack']} B, local {f['local']} B",
               f["stack"] > allowed or f["local"]) for r, f in _launchable(aot) if f["stack"] or f["local"]]
    if spills:
        with capsys.disabled():
            print(f"\nTriton {triton.__version__}: {len(spills)} configs spill (up to {allowed} B of stack allowed):\n"
                  + "\n".join(label for label, _ in spills))
    failing = [label for label, too_much in spills if too_much]
    assert not failing, f"{len(failing)} configs spill:\n" + "\n".join(failing)


def test_spills_are_allowed_only_away_from_the_triton_the_tiles_are_chosen_with():
    chosen = ".".join(map(str, _aot.TILES_CHOSEN_WITH_TRITON))
    assert _aot.spill_bytes_allowed(f"{chosen}.0") == 0 and _aot.spill_bytes_allowed(f"{chosen}.1") == 0
    assert 0 < _aot.spill_bytes_allowed("3.9.0") <= 16


def test_every_dot_runs_on_tensor_cores(aot):
    """Every config's TTGIR puts each ``tl.dot`` in an MMA layout and its PTX has tensor-core MMAs; where the
    SASS was read (one case per kernel and target), ptxas made them ``HMMA`` / ``HGMMA``."""
    problems, disassembled = [], collections.Counter()
    for result, facts in _launchable(aot):
        if not facts["source_dots"]:
            continue
        hopper = result["target"] == "sm_90"
        mma = facts["ptx_mma"] + (facts["ptx_wgmma"] if hopper else 0)
        sass_mma = None if facts["hmma"] is None else facts["hmma"] + (facts["hgmma"] if hopper else 0)
        if sass_mma is not None:
            disassembled[result["target"], result["kernel"]] += 1
        if facts["fma_dots"] or facts["dots"] < facts["source_dots"] or not mma or sass_mma == 0:
            problems.append(f"{_label(result, facts)}: {facts['source_dots']} tl.dot, FMA dots at "
                            f"{facts['fma_dots']}, PTX {facts['ptx_mma']} mma.sync {facts['ptx_wgmma']} wgmma, "
                            f"SASS {facts['hmma']} HMMA {facts['hgmma']} HGMMA")
    assert not problems, "\n".join(problems)
    with_dots = {(r["target"], r["kernel"]) for r, f in _launchable(aot) if f["source_dots"]}
    assert with_dots and with_dots == set(disassembled), f"no SASS read for {sorted(with_dots - set(disassembled))}"


def test_every_pointer_offset_is_int64(aot):
    """Except in a family that declares ``INT32_TILE_OFFSETS`` (why its int32 offsets are bounded):
    soft_quantize moves 64-bit tile pointers and indexes inside a tile in int32."""
    narrow = sorted({f"{r['kernel']} at {where}" for r, f in _launchable(aot) for where in f["narrow_offsets"]
                     if not r["int32_tile_offsets"]})
    assert not narrow, "int32 pointer offsets (overflow past 2**31 elements):\n" + "\n".join(narrow)
    declared = {r["family"] for r in aot["results"] if r["int32_tile_offsets"] is not None}
    assert all(len(r["int32_tile_offsets"]) > 40 for r in aot["results"] if r["family"] in declared), (
        "INT32_TILE_OFFSETS must say why the family's int32 offsets cannot overflow")


def test_atomic_adds_are_relaxed(aot):
    assert any(f["atomics"] for _, f in _launchable(aot)), "no case compiles an atomic add"
    strong = sorted({f"{r['kernel']} at {where}" for r, f in _launchable(aot) for where in f["strong_atomics"]})
    assert not strong, "atomics with an ordering a sum does not need:\n" + "\n".join(strong)


def test_a_sample_of_configs_is_spread_and_keeps_a_launchable_one():
    configs = list(range(10))
    assert _aot.sample_configs(configs, configs, 0, 3) == configs  # 0: every config
    assert _aot.sample_configs(configs, configs, 12, 3) == configs
    for index in range(6):
        sample = _aot.sample_configs(configs, [9], 3, index)
        assert len(set(sample)) == 3 and 9 in sample
    # Cases of one kernel cover different configs between them.
    assert len({config for index in range(4) for config in _aot.sample_configs(configs, configs, 3, index)}) > 3


def test_a_sample_is_kept_as_the_launch_keeps_it():
    """With a sample (FASTVQ_AOT_CONFIGS_PER_CASE), the launch's prune runs over the sample alone unless that
    would keep a config the launch does not: then over every config, and the sample takes one it keeps."""
    shared = {"a": 9, "b": 5, "c": 7, "d": 3}  # "a" and "c" over a limit of 6
    calls = []

    def prune(some):  # fits_shared_memory's rule: those that fit, else the smallest
        calls.append(list(some))
        return [config for config in some if shared[config] <= 6] or [min(some, key=shared.__getitem__)]

    configs = list(shared)
    fits = lambda config: shared[config] <= 6  # noqa: E731
    assert _aot.kept_by_launch(prune, configs, configs, configs, fits, 0) == (["b", "d"], configs)
    assert calls == [configs]
    calls.clear()
    assert _aot.kept_by_launch(prune, configs, configs, ["b"], fits, 0) == (["b"], ["b"])
    assert calls == [["b"]]  # the sample alone: nothing else compiled
    calls.clear()
    # A sample of one that does not fit: the prune over the sample would keep it, the launch does not.
    assert _aot.kept_by_launch(prune, configs, configs, ["a"], fits, 1) == (["b", "d"], ["d"])
    assert calls == [["a"], configs]
    assert _aot.kept_by_launch(prune, configs, configs, ["a", "b"], fits, 0) == (["b"], ["a", "b"])
