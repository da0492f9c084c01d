"""fastvq.nn.VectorQuantizerEMA against Sonnet's formulas (one-hot EMA with zero-debiasing)."""

import pytest
import torch
import torch.nn.functional as F
from _compile import assert_compiled_training_matches_eager

from fastvq import reference
from fastvq.nn import VectorQuantizerEMA

DIM, CODES = 6, 20


class _SonnetReference:
    """Sonnet's VectorQuantizerEMA written out: one-hot matrices, ExponentialMovingAverage with a
    hidden value starting at zero and a counter, Laplace smoothing on the debiased sizes."""

    def __init__(self, layer):
        self.embeddings = layer.embeddings.clone().double()
        self.hidden_size = torch.zeros(CODES, dtype=torch.float64)
        self.hidden_dw = torch.zeros(CODES, DIM, dtype=torch.float64)
        self.counter = 0
        self.decay, self.epsilon, self.beta = layer.decay, layer.epsilon, layer.commitment_cost

    def __call__(self, inputs, is_training):
        flat = inputs.reshape(-1, DIM)
        distances = reference.distance_matrix_ref(flat.detach(), self.embeddings)
        indices = distances.argmin(1)
        encodings = F.one_hot(indices, CODES).double()
        quantized = self.embeddings[indices].to(inputs.dtype).view(inputs.shape)
        loss = self.beta * torch.mean((quantized.detach() - inputs) ** 2)
        if is_training:
            self.counter += 1
            correction = 1 - self.decay**self.counter
            self.hidden_size -= (self.hidden_size - encodings.sum(0)) * (1 - self.decay)
            self.hidden_dw -= (self.hidden_dw - encodings.T @ flat.detach().double()) * (1 - self.decay)
            size, dw = self.hidden_size / correction, self.hidden_dw / correction
            n = size.sum()
            size = (size + self.epsilon) / (n + CODES * self.epsilon) * n
            self.embeddings = dw / size[:, None]
        quantized = inputs + (quantized - inputs).detach()
        avg_probs = encodings.mean(0)
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))
        return dict(
            quantize=quantized,
            loss=loss,
            perplexity=perplexity,
            encoding_indices=indices.view(inputs.shape[:-1]),
            encodings=encodings,
            distances=distances,
        )


@pytest.mark.parametrize("shape", [(4, 5, 7, DIM), (33, DIM), (DIM,)])
def test_matches_sonnet_over_training_steps(shape):
    torch.manual_seed(0)
    layer = VectorQuantizerEMA(DIM, CODES, commitment_cost=0.25, decay=0.9)
    ref = _SonnetReference(layer)
    for step in range(4):
        x = torch.randn(shape)
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = layer(x_ours)
        theirs = ref(x_ref, is_training=True)
        upstream = torch.randn(shape)
        ((ours["quantize"] * upstream).sum() + ours["loss"]).backward()
        ((theirs["quantize"] * upstream).sum() + theirs["loss"]).backward()
        assert set(ours) == {"quantize", "loss", "perplexity", "encoding_indices"}
        assert ours["encoding_indices"].shape == shape[:-1] and ours["encoding_indices"].dtype == torch.int64
        assert torch.equal(ours["encoding_indices"], theirs["encoding_indices"]), f"step {step}"
        torch.testing.assert_close(ours["quantize"], theirs["quantize"], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ours["perplexity"].double(), theirs["perplexity"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.embeddings.double(), ref.embeddings, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.ema_cluster_size.double(), ref.hidden_size, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.ema_dw.double(), ref.hidden_dw, rtol=1e-5, atol=1e-6)
        assert layer.counter.item() == step + 1


def test_matches_fastvq_reference_ema_update():
    torch.manual_seed(0)
    layer = VectorQuantizerEMA(DIM, CODES, 0.25, 0.95, epsilon=1e-3)
    state = (layer.embeddings, layer.ema_cluster_size, layer.ema_dw, layer.counter)
    codebook, sizes, sums, step = (t.clone() for t in state)
    for _ in range(3):
        x = torch.randn(40, DIM)
        indices, _, _ = reference.nearest_code_ref(x, codebook)
        reference.ema_update_ref_(codebook, sizes, sums, x, indices, decay=0.95, eps=1e-3, step=step)
        assert torch.equal(layer(x)["encoding_indices"], indices)
        torch.testing.assert_close(layer.embeddings, codebook, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.counter, step)


def test_unused_codes_become_zero_as_in_sonnet():
    torch.manual_seed(0)
    layer = VectorQuantizerEMA(DIM, CODES, 0.25, 0.99)
    indices = layer(torch.randn(3, DIM))["encoding_indices"]
    unused = torch.ones(CODES, dtype=torch.bool)
    unused[indices] = False
    assert unused.sum() >= CODES - 3
    assert (layer.embeddings[unused] == 0).all() and (layer.embeddings[~unused] != 0).any()


def test_eval_leaves_the_state_alone_and_still_reports_the_loss():
    torch.manual_seed(0)
    layer = VectorQuantizerEMA(DIM, CODES, 0.5, 0.99).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(10, DIM)
    out = layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    codes = layer.embeddings[out["encoding_indices"]]
    assert torch.equal(out["quantize"], codes)
    torch.testing.assert_close(out["loss"], 0.5 * F.mse_loss(x, codes), rtol=1e-6, atol=1e-8)


def test_dense_outputs_only_when_asked():
    torch.manual_seed(0)
    layer = VectorQuantizerEMA(DIM, CODES, 0.25, 0.99).eval()
    x = torch.randn(2, 3, DIM)
    out = layer(x, return_encodings=True, return_distances=True)
    indices = out["encoding_indices"].reshape(-1)
    assert out["encodings"].shape == (6, CODES) and out["encodings"].dtype == x.dtype
    assert torch.equal(out["encodings"], F.one_hot(indices, CODES).float())
    assert out["distances"].shape == (6, CODES) and out["distances"].dtype == torch.float32
    expected = reference.distance_matrix_ref(x.reshape(-1, DIM), layer.embeddings)
    torch.testing.assert_close(out["distances"].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["distances"].argmin(1), indices)
    assert torch.equal(layer.quantize(out["encoding_indices"]), out["quantize"])


def test_state_dict_round_trip():
    torch.manual_seed(0)
    layer = VectorQuantizerEMA(DIM, CODES, 0.25, 0.99)
    assert list(layer.state_dict()) == ["embeddings", "ema_cluster_size", "ema_dw", "counter"]
    layer(torch.randn(8, DIM))
    clone = VectorQuantizerEMA(DIM, CODES, 0.25, 0.99)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(8, DIM)
    a, b = layer(x), clone(x)
    assert torch.equal(a["encoding_indices"], b["encoding_indices"])
    for key, value in layer.state_dict().items():
        assert torch.equal(value, clone.state_dict()[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_trains_under_autocast_without_nan(dtype):
    torch.manual_seed(0)
    proj = torch.nn.Linear(DIM, DIM)
    layer = VectorQuantizerEMA(DIM, CODES, 0.25, 0.9)
    optim = torch.optim.Adam(proj.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            x = proj(torch.randn(2, 9, DIM))
            out = layer(x)
        assert out["quantize"].dtype == x.dtype == dtype
        (out["quantize"].float().square().mean() + out["loss"]).backward()
        optim.step()
        optim.zero_grad()
        assert torch.isfinite(out["loss"]) and torch.isfinite(out["perplexity"])
        assert all(torch.isfinite(t).all() for t in (layer.embeddings, proj.weight))


def test_trains_under_compile_fullgraph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, DIM), VectorQuantizerEMA(DIM, CODES, 0.25, 0.9))
    assert_compiled_training_matches_eager(model, (3, 7, 4), lambda out: out["quantize"].square().mean() + out["loss"])
    assert model[1].counter.item() == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(embedding_dim=0), "embedding_dim"),
        (dict(num_embeddings=2.0), "num_embeddings"),
        (dict(commitment_cost=-0.1), "commitment_cost"),
        (dict(decay=1.0), "decay"),
        (dict(decay=float("nan")), "decay"),
        (dict(epsilon=-1e-5), "epsilon"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    arguments = dict(embedding_dim=DIM, num_embeddings=CODES, commitment_cost=0.25, decay=0.99)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        VectorQuantizerEMA(**arguments)


def test_bad_inputs_name_the_shape():
    layer = VectorQuantizerEMA(DIM, CODES, 0.25, 0.99)
    with pytest.raises(ValueError, match=r"\[\.\.\., embedding_dim=6\].*\(2, 6, 3, 3\)"):
        layer(torch.randn(2, DIM, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, DIM, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[0.0] * DIM])
    with pytest.raises(TypeError, match="encoding_indices"):
        layer.quantize(torch.zeros(3))


def test_runs_on_the_triton_kernels(backend):
    torch.manual_seed(0)
    _, device = backend
    layer = VectorQuantizerEMA(3, 5, 0.25, 0.9).to(device)
    expected = layer.embeddings.clone()
    x = torch.randn(7, 3, device=device)
    out = layer(x)
    indices, _, _ = reference.nearest_code_ref(x, expected)
    sizes, sums = torch.zeros(5, device=device), torch.zeros(5, 3, device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    reference.ema_update_ref_(expected, sizes, sums, x, indices, decay=0.9, eps=1e-5, step=step)
    assert torch.equal(out["encoding_indices"], indices)
    torch.testing.assert_close(layer.embeddings, expected, rtol=1e-5, atol=1e-6)
