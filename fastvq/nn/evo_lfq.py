"""``EvoLFQ``: vector-quantize-pytorch's genetic search over LFQ's binary codes.

An encoder, an :class:`~fastvq.nn.LFQ` and a decoder; besides the autoencoder's forward, a
population of bit strings is evolved against a fitness function of the decoded outputs (tournament
selection, uniform crossover, bit-flip mutation, elitism). The random draws are made in
vector-quantize-pytorch's order, so a seeded run gives its populations.
"""

from __future__ import annotations

from collections import namedtuple
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_real
from .errors import raises_config_error
from .lfq import LFQ

__all__ = ["EvoLFQ", "EvoReturn", "EvoResult"]

EvoReturn = namedtuple("Return", ["reconstructed", "indices", "entropy_aux_loss"])
EvoResult = namedtuple("Result", ["pop_bits", "best_gene", "best_fitness", "best_decoded"])


@contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class EvoLFQ(nn.Module):
    """Genetic search over LFQ codes, a drop-in for vector-quantize-pytorch's ``EvoLFQ``.

    Args: ``encoder`` and ``decoder`` (modules), an ``lfq`` (else one is built from ``dim``,
    ``codebook_size``, ``num_codebooks`` and ``**lfq_kwargs``), and the search's defaults
    ``pop_size=64, mutation_rate=0.02, tournament_size=2, elitism_count=1, generations=50``.

    - ``forward(x, **lfq_kwargs)`` -> ``Return(reconstructed, indices, entropy_aux_loss)``; a 2-D
      latent ``[B, d]`` is quantized as one position.
    - ``encode(x, return_signs=False)``: the latents' bits (0/1, or -1/+1), in eval mode.
    - ``decode_bits(bits)``: bits ``[..., d]`` (0/1 or -1/+1; ``[..., num_codebooks * d]`` for
      several codebooks) -> the decoder's output for their codes.
    - ``init_random_population``, ``init_population_from_data``, ``uniform_crossover``,
      ``mutate``, ``tournament_selection``, ``step`` and ``evolve`` (a generator of
      ``Result(pop_bits, best_gene, best_fitness, best_decoded)`` per generation): as theirs.

    Raises:
        ValueError: ``pop_size <= elitism_count``, or neither ``lfq`` nor its sizes.
    """

    @raises_config_error
    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        lfq: Optional[LFQ] = None,
        *,
        dim: Optional[int] = None,
        codebook_size: Optional[int] = None,
        num_codebooks: int = 1,
        pop_size: int = 64,
        mutation_rate: float = 0.02,
        tournament_size: int = 2,
        elitism_count: int = 1,
        generations: int = 50,
        **lfq_kwargs,
    ):
        super().__init__()
        check_real("mutation_rate", mutation_rate, minimum=0.0, maximum=1.0)
        if pop_size <= elitism_count:
            raise ValueError(f"pop_size must be greater than elitism_count, got {pop_size} and {elitism_count}")
        self.encoder = encoder
        self.decoder = decoder
        if lfq is None:
            if dim is None and codebook_size is None:
                raise ValueError("give EvoLFQ an lfq, or dim / codebook_size to build one")
            lfq = LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, **lfq_kwargs)
        self.lfq = lfq
        self.pop_size = pop_size
        self.mutation_rate = mutation_rate
        self.tournament_size = tournament_size
        self.elitism_count = elitism_count
        self.generations = generations
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.zero.device

    def _quantize_latents(self, latents: Tensor, **kwargs):
        is_2d = latents.dim() == 2
        quantized, indices, aux_loss = self.lfq(latents[:, None] if is_2d else latents, **kwargs)
        if is_2d:
            quantized, indices = quantized[:, 0], indices[:, 0]
        return quantized, indices, aux_loss

    def forward(self, x: Tensor, **kwargs) -> EvoReturn:
        quantized, indices, aux_loss = self._quantize_latents(self.encoder(x), **kwargs)
        return EvoReturn(self.decoder(quantized), indices, aux_loss)

    @torch.no_grad()
    def encode(self, x: Tensor, return_signs: bool = False) -> Tensor:
        with _eval_mode(self):
            quantized, _, _ = self._quantize_latents(self.encoder(x))
            if return_signs:
                return torch.where(quantized > 0, 1.0, -1.0)
            return (quantized > 0).float()

    @torch.no_grad()
    def decode_bits(self, bits: Tensor) -> Tensor:
        with _eval_mode(self):
            bits = (bits > 0).int()
            leading = bits.shape[:-1]
            bits = bits.reshape(-1, bits.shape[-1])
            codebook_dim, num_codebooks = self.lfq.codebook_dim, self.lfq.num_codebooks
            if num_codebooks > 1 and bits.shape[-1] == codebook_dim * num_codebooks:
                bits = bits.unflatten(-1, (num_codebooks, codebook_dim))
            if bits.dim() == 2:
                bits = bits[:, None]
            weights = 2 ** torch.arange(codebook_dim - 1, -1, -1, device=self.device)
            indices = (bits * weights).sum(dim=-1)
            if not self.lfq.keep_num_codebooks_dim and indices.dim() >= 2 and indices.shape[-1] == 1:
                indices = indices[..., 0]
            codes = self.lfq.indices_to_codes(indices)
            if codes.dim() == 3 and codes.shape[1] == 1:
                codes = codes[:, 0]
            return self.decoder(codes.reshape(*leading, codes.shape[-1]))

    # ------------------------------------------------------------------ genetic algorithm

    def init_random_population(self, pop_size: Optional[int] = None, shape: Sequence[int] = (), device=None,
                               is_sign: bool = False) -> Tensor:
        pop_size = self.pop_size if pop_size is None else pop_size
        device = self.device if device is None else device
        bits = torch.randint(0, 2, (pop_size, *shape), device=device).float()
        return torch.where(bits > 0, 1.0, -1.0) if is_sign else bits

    def init_population_from_data(self, x: Tensor, pop_size: Optional[int] = None,
                                  mutation_rate: Optional[float] = None, is_sign: bool = False) -> Tensor:
        pop_size = self.pop_size if pop_size is None else pop_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        bits = self.encode(x, return_signs=is_sign)
        num_samples = bits.shape[0]
        if num_samples < pop_size:
            repeats = (pop_size + num_samples - 1) // num_samples
            bits = bits.repeat(repeats, *([1] * (bits.dim() - 1)))[:pop_size]
        else:
            bits = bits[:pop_size]
        if mutation_rate > 0:
            bits = self.mutate(bits, mutation_rate=mutation_rate, is_sign=is_sign)
        return bits

    def uniform_crossover(self, parent1: Tensor, parent2: Tensor) -> Tensor:
        return torch.where(torch.rand_like(parent1.float()) < 0.5, parent1, parent2)

    def mutate(self, population: Tensor, mutation_rate: Optional[float] = None, is_sign: bool = False) -> Tensor:
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand_like(population.float()) < mutation_rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def tournament_selection(
        self, population: Tensor, fitnesses: Tensor, tournament_size: Optional[int] = None
    ) -> Tensor:
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        pop_size = population.shape[0]
        contenders = torch.randint(0, pop_size, (pop_size, tournament_size), device=self.device)
        winners = contenders.gather(1, fitnesses[contenders].argmax(dim=-1, keepdim=True))
        return population[winners[:, 0]]

    @torch.no_grad()
    def step(self, pop_bits: Tensor, fitness_fn: Callable, tournament_size: Optional[int] = None,
             mutation_rate: Optional[float] = None, elitism_count: Optional[int] = None, is_sign: bool = False,
             batch_size: Optional[int] = None, **kwargs) -> tuple[Tensor, Tensor]:
        """One generation: ``(next population, this population's fitnesses)``."""
        tournament_size = self.tournament_size if tournament_size is None else tournament_size
        mutation_rate = self.mutation_rate if mutation_rate is None else mutation_rate
        elitism_count = self.elitism_count if elitism_count is None else elitism_count
        pop_size = pop_bits.shape[0]
        num_offspring = pop_size - elitism_count
        if batch_size is not None:
            decoded = torch.cat([self.decode_bits(chunk) for chunk in pop_bits.split(batch_size)])
        else:
            decoded = self.decode_bits(pop_bits)
        fitnesses = fitness_fn(decoded, pop_bits)
        if not torch.is_tensor(fitnesses):
            fitnesses = torch.tensor(fitnesses, device=self.device, dtype=torch.float32)
        elites = pop_bits[torch.argsort(fitnesses, descending=True)[:elitism_count]].clone()
        contenders = torch.randint(0, pop_size, (num_offspring, 2, tournament_size), device=self.device)
        winners = contenders.gather(-1, fitnesses[contenders].argmax(dim=-1, keepdim=True))[..., 0]
        parents = pop_bits[winners]
        offspring = self.uniform_crossover(parents[:, 0], parents[:, 1])
        offspring = self.mutate(offspring, mutation_rate=mutation_rate, is_sign=is_sign)
        return torch.cat([elites, offspring]), fitnesses

    @torch.no_grad()
    def evolve(self, fitness_fn: Callable, pop_bits: Optional[Tensor] = None, pop_size: Optional[int] = None,
               shape: Optional[Sequence[int]] = None, generations: Optional[int] = None, is_sign: bool = False,
               return_best_decoded: bool = False, **step_kwargs) -> Iterator[EvoResult]:
        """Yields one ``Result`` per generation; ``best_gene`` is the fittest individual seen so far,
        looked up in the population that follows its generation, as vector-quantize-pytorch does."""
        pop_size = self.pop_size if pop_size is None else pop_size
        generations = self.generations if generations is None else generations
        if pop_bits is None:
            if shape is None:
                raise ValueError("evolve needs pop_bits or the shape of an individual")
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)
        best_fitness, best_gene = float("-inf"), None
        for _ in range(generations):
            pop_bits, fitnesses = self.step(pop_bits, fitness_fn, is_sign=is_sign, **step_kwargs)
            best_index = torch.argmax(fitnesses)
            fitness = fitnesses[best_index].item()
            if fitness > best_fitness:
                best_fitness = fitness
                best_gene = pop_bits[best_index].clone()
            best_decoded = self.decode_bits(best_gene[None])[0] if return_best_decoded else None
            yield EvoResult(pop_bits, best_gene, best_fitness, best_decoded)
