"""Codebooks under torch.distributed: two gloo ranks on shards behave like one process.

Each test spawns two CPU processes joined through a file store (no network), gives each rank a
shard of one batch (one shard may be empty), and compares what the ranks end with against one
process that saw the whole batch: EMA counts exactly, sums and codes to rounding, and the two
replicas bit-identical where randomness (k-means seeds, dead-code replacements, quantize dropout)
is involved.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastvq.nn import ResidualVQ, VectorQuantize, VectorQuantizerEMA

DIM, CODES = 8, 12
BATCH = 40


def _batches(steps):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, BATCH, DIM, generator=generator) + 0.5 * step for step in range(steps)]


def _make(kind, **kwargs):
    torch.manual_seed(0)
    if kind == "vq":
        return VectorQuantize(DIM, CODES, decay=0.7, rotation_trick=False, **kwargs)
    if kind == "sonnet":  # syncs through fastvq.ema_update_ whenever a process group is up
        return SonnetAdapter(VectorQuantizerEMA(DIM, CODES, commitment_cost=0.25, decay=0.7))
    return ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, decay=0.7, **kwargs)


class SonnetAdapter(torch.nn.Module):
    """Gives VectorQuantizerEMA's dict output the (quantized, indices, loss) shape of the others."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out = self.layer(x)
        return out["quantize"], out["encoding_indices"], out["loss"]


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _worker(rank, world, store, kind, kwargs, split, compile_model, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = _make(kind, **kwargs) if kind == "sonnet" else _make(kind, sync_codebook=True, **kwargs)
        runner = torch.compile(model, fullgraph=True) if compile_model else model
        for batch in _batches(3):
            shard = (batch[:, :split] if rank == 0 else batch[:, split:]).clone().requires_grad_()
            torch.manual_seed(1000 + rank)  # ranks draw different local randomness on purpose
            quantized, _, loss = runner(shard)
            (quantized.square().sum() + loss.sum()).backward()
        torch.save(_state(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # A rank that finished its work leaves at once: in a spawned gloo rank, torch 2.13 (CPU) can
    # abort during interpreter teardown ("terminate called without an active exception") after
    # everything has run and been saved, which would fail the test for nothing it checks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_ranks(tmp_path, kind, kwargs, split, compile_model=False):
    store = tmp_path / "store"
    mp.spawn(_worker, args=(2, str(store), kind, kwargs, split, compile_model, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]


def _single_process(kind, kwargs):
    model = _make(kind, **kwargs) if kind == "sonnet" else _make(kind, sync_codebook=False, **kwargs)
    for batch in _batches(3):
        quantized, _, loss = model(batch.clone().requires_grad_())
        (quantized.square().sum() + loss.sum()).backward()
    return _state(model)


@pytest.mark.parametrize("split", [17, BATCH], ids=["uneven-shards", "rank1-empty"])
def test_ema_sync_matches_one_process(tmp_path, split):
    ranks = _run_ranks(tmp_path, "vq", {}, split)
    whole = _single_process("vq", {})
    for name in ("_codebook.cluster_size", "_codebook.embed_avg", "_codebook.embed"):
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between replicas"
    # Counts are sums of integers: exactly those of the whole batch.
    assert torch.equal(ranks[0]["_codebook.cluster_size"], whole["_codebook.cluster_size"])
    torch.testing.assert_close(ranks[0]["_codebook.embed_avg"], whole["_codebook.embed_avg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["_codebook.embed"], whole["_codebook.embed"], rtol=1e-5, atol=1e-6)


def test_kmeans_and_dead_codes_keep_replicas_identical(tmp_path):
    kwargs = dict(kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2.0)
    ranks = _run_ranks(tmp_path, "vq", kwargs, 9)
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"{name} differs between replicas"
    assert bool(ranks[0]["_codebook.initted"])


def test_residual_dropout_and_compile_keep_replicas_identical(tmp_path):
    kwargs = dict(quantize_dropout=True, threshold_ema_dead_code=1.0)
    ranks = _run_ranks(tmp_path, "rvq", kwargs, 25, compile_model=True)
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"{name} differs between replicas"


def test_functional_ema_update_syncs_sonnet_layer(tmp_path):
    ranks = _run_ranks(tmp_path, "sonnet", {}, 23)
    whole = _single_process("sonnet", {})
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"{name} differs between replicas"
    assert torch.equal(ranks[0]["layer.counter"], whole["layer.counter"])
    torch.testing.assert_close(ranks[0]["layer.ema_cluster_size"], whole["layer.ema_cluster_size"],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ranks[0]["layer.embeddings"], whole["layer.embeddings"], rtol=1e-5, atol=1e-6)
