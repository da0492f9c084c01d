"""The ``fastvq`` command: ``train``, ``prior``, ``sample``, ``demo``, ``kmeans``, ``bench`` and ``info``.

    fastvq train --model vqvae --data digits --out runs/digits
    fastvq prior --run runs/digits
    fastvq sample --run runs/digits -n 64
    fastvq demo --out runs/digits          # the three above with their defaults, then a summary

``python -m fastvq ...`` is the same command. The README documents every flag.

Parsing the command line imports nothing beyond the standard library and the model table, so
``fastvq --help`` and ``fastvq --version`` answer without loading torch; each command imports what
it needs when it runs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .models.registry import MODEL_FLAGS, PRIORS, STAGE1

BENCH_SCRIPT_PREFIX = "bench_"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _points_per_centroid(text: str) -> Optional[int]:
    """``--max-points-per-centroid``: a positive integer, or ``all`` (every iteration on all rows)."""
    return None if text == "all" else _positive_int(text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


class _VersionAction(argparse.Action):
    """``--version``: prints ``fastvq X.Y.Z`` from ``fastvq._version`` (which imports nothing) and exits."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ._version import __version__

        print(f"fastvq {__version__}")
        parser.exit()


def _dist_timeout(args: argparse.Namespace) -> dict:
    return {} if args.dist_timeout is None else {"dist_timeout": args.dist_timeout}


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N; under torchrun each "
                             "process takes cuda:LOCAL_RANK")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="PyTorch intra-op threads per process (default: half the cores, shared among the "
                             "processes; 1 on a 2-core machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dist-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others in a collective before it gives "
                             "up with an error (600)")


DATA_FLAGS = ("val_fraction", "image_size", "image_channels")
TRAIN_FLAGS = ("batch_size", "lr", "seed", "eval_every", "adversarial_start", "perceptual_net")


def _model_overrides(args: argparse.Namespace) -> dict:
    """The model arguments the model flags given set, by the model table's names."""
    from .train import RunError

    targets = STAGE1[args.model].flags
    overrides = {}
    for flag in MODEL_FLAGS:
        value = getattr(args, flag)
        if value is None:
            continue
        if flag not in targets:
            raise RunError(f"--{flag.replace('_', '-')} does not apply to --model {args.model}")
        overrides[targets[flag]] = value
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvq",
        description="Train VQ models, their priors, and sample from them; benchmark fastvq's ops; show the set-up.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show fastvq's version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train a VQ model (stage 1) on a dataset",
        description="Train a VQ model; writes checkpoints, metrics.jsonl and pictures to --out.")
    train.add_argument("--model", choices=tuple(STAGE1), default=None,
                       help="the model (required for a new run)")
    train.add_argument("--data", default=None,
                       help="digits (embedded, the default), mnist:DIR, cifar10:DIR or images:DIR")
    train.add_argument("--out", required=True, type=Path, help="the run directory")
    train.add_argument("--epochs", type=_positive_int, default=None,
                       help="epochs (default: digits 60, mnist 10, cifar10 30, images 50); "
                            "with --resume, the new total")
    train.add_argument("--batch-size", type=_positive_int, default=None, help="batch size per process (64)")
    train.add_argument("--lr", type=float, default=None,
                       help="Adam learning rate (2e-3; vit-vqgan 1e-3 under 16 px, else 3e-4), cosine-decayed")
    train.add_argument("--seed", type=int, default=None, help="random seed (0)")
    train.add_argument("--eval-every", type=_positive_int, default=None,
                       help="evaluate and checkpoint every N epochs (1)")
    model_group = train.add_argument_group("model", "defaults depend on the image size: see the README")
    model_group.add_argument("--codebook-size", type=_positive_int, default=None, help="codes K per codebook")
    model_group.add_argument("--embedding-dim", type=_positive_int, default=None,
                             help="code dimension (vit-vqgan: the factorised lookup dimension)")
    model_group.add_argument("--channels", type=_positive_int, default=None,
                             help="encoder/decoder width (vit-vqgan: transformer width)")
    model_group.add_argument("--codebook", choices=("ema", "gradient"), default=None,
                             help="codebook training: EMA (conv models' default) or the codebook loss (vit-vqgan's)")
    model_group.add_argument("--beta", type=float, default=None, help="commitment weight (0.25)")
    model_group.add_argument("--decay", type=float, default=None,
                             help="EMA decay (0.9 for images under 16 px, else 0.99)")
    model_group.add_argument("--dead-code-threshold", type=float, default=None,
                             help="replace codes whose moving-average use per batch falls below this (1.0; 0 = never)")
    model_group.add_argument("--kmeans-init", action=argparse.BooleanOptionalAction, default=None,
                             help="initialise the codes by k-means on the first batch (on; vit-vqgan: off)")
    model_group.add_argument("--downsamples", type=int, default=None,
                             help="stride-2 stages to the (bottom) code map (1 for images under 16 px, else 2)")
    model_group.add_argument("--res-blocks", type=int, default=None, help="residual blocks per encoder/decoder (2)")
    model_group.add_argument("--depth", type=_positive_int, default=None, help="rqvae: codes per position (4)")
    model_group.add_argument("--patch-size", type=_positive_int, default=None, help="vit-vqgan: patch side (2 or 4)")
    model_group.add_argument("--layers", type=_positive_int, default=None,
                             help="vit-vqgan: transformer blocks (2 or 4)")
    model_group.add_argument("--logit-laplace-weight", type=float, default=None,
                             help="vit-vqgan: logit-Laplace loss weight (0.1)")
    model_group.add_argument("--adversarial-weight", type=float, default=None,
                             help="vit-vqgan: adversarial loss weight (0.1; 0 = no discriminator)")
    model_group.add_argument("--adversarial-start", type=int, default=None,
                             help="vit-vqgan: step at which the discriminator joins (half the steps)")
    model_group.add_argument("--perceptual-net", default=None, metavar="MODULE:CALLABLE",
                             help="vit-vqgan: a callable returning the feature network of the perceptual loss "
                                  "(with --resume: the run's own, which fastvq imports only when named here)")
    model_group.add_argument("--perceptual-weight", type=float, default=None,
                             help="vit-vqgan: perceptual loss weight (0.1)")
    data_group = train.add_argument_group("data")
    data_group.add_argument("--val-fraction", type=float, default=None,
                            help="share held out when the data has no test split (0.1)")
    data_group.add_argument("--image-size", type=_positive_int, default=None, help="images:DIR: side to resize to")
    data_group.add_argument("--image-channels", type=int, choices=(1, 3), default=None,
                            help="images:DIR: 1 (grey) or 3 (RGB); default grey when every image is")
    run_group = train.add_argument_group("run")
    run_group.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run_group.add_argument("--force", action="store_true", help="start over even if --out holds a run")
    _add_runtime_flags(run_group)

    prior = commands.add_parser(
        "prior", help="train a prior over a run's codes",
        description="Train a PixelCNN, Gated PixelCNN or GPT prior on the codes of a trained run.")
    prior.add_argument("--run", required=True, type=Path, help="the run directory of `fastvq train`")
    prior.add_argument("--model", choices=tuple(PRIORS), default=None,
                       help="the prior (gpt; rqvae runs need gpt or maskgit)")
    prior.add_argument("--epochs", type=_positive_int, default=None,
                       help="epochs (digits 15, mnist 10, cifar10 20, images 50)")
    prior.add_argument("--batch-size", type=_positive_int, default=64, help="batch size per process (64)")
    prior.add_argument("--lr", type=float, default=None, help="Adam learning rate (1e-3), cosine-decayed")
    prior.add_argument("--channels", type=_positive_int, default=None, help="PixelCNN width / GPT width")
    prior.add_argument("--layers", type=_positive_int, default=None,
                       help="masked-convolution layers / transformer blocks")
    prior.add_argument("--dropout", type=float, default=None, help="gpt, maskgit: dropout (0.1)")
    prior.add_argument("--seed", type=int, default=0, help="random seed (0)")
    _add_runtime_flags(prior)

    sample = commands.add_parser("sample", help="sample images from a run's prior",
                                 description="Draw codes from the run's prior, decode them and write RUN/samples.png.")
    sample.add_argument("--run", required=True, type=Path, help="the run directory")
    sample.add_argument("-n", type=_positive_int, default=64, help="number of samples (64)")
    sample.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (1.0; 0 = greedy)")
    sample.add_argument("--top-k", type=_positive_int, default=None, help="draw among the k most likely codes")
    sample.add_argument("--top-p", type=float, default=None, help="gpt, maskgit: nucleus sampling threshold")
    sample.add_argument("--steps", type=_positive_int, default=None,
                        help="maskgit: parallel decoding steps (8)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (0)")
    sample.add_argument("--out", type=Path, default=None, help="picture path (RUN/samples.png)")
    sample.add_argument("--columns", type=_positive_int, default=None, help="images per row (sqrt(n))")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sample.add_argument("--threads", type=_positive_int, default=None, help="PyTorch intra-op threads")

    demo = commands.add_parser("demo", help="train -> prior -> sample with the defaults, then a summary",
                               description="The README's main job: fastvq train, prior and sample with their defaults "
                                           "(the embedded digits unless --data says otherwise), then a summary.")
    demo.add_argument("--out", type=Path, default=Path("runs/digits"), help="the run directory (runs/digits); "
                      "a run already there is replaced")
    demo.add_argument("--model", choices=tuple(STAGE1), default="vqvae", help="vqvae")
    demo.add_argument("--data", default="digits", help="digits")
    demo.add_argument("--prior", choices=tuple(PRIORS), default=None,
                      help="as fastvq prior")
    demo.add_argument("-n", type=_positive_int, default=64, help="samples to draw (64)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    _add_runtime_flags(demo)

    bench = commands.add_parser("bench", help="run the benchmark scripts and print their tables",
                                description="Run benchmarks/bench_*.py from the source checkout (each prints a table "
                                            "and writes benchmarks/results/), then a summary table.")
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help="benchmarks to run, e.g. search layers (default: all of benchmarks/bench_*.py)")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--args", default="", metavar="'ARGS'",
                       help="arguments passed to every script, e.g. --args='--small'")

    clusters = commands.add_parser("kmeans", help="k-means on the rows of a .npy, .pt or .safetensors file",
                                   description="Cluster the rows of a matrix file with fastvq.kmeans (fused search, "
                                               "segment sums, k-means|| seeding) and write the centroids as .npy. "
                                               "Arrays of more than two dimensions are clustered over their last "
                                               "one; with --batched a 3-D array [B, N, D] is B problems.")
    clusters.add_argument("--data", required=True, type=Path,
                          help="FILE.npy (memory-mapped, never loaded whole), FILE.pt or FILE.safetensors")
    clusters.add_argument("--key", default=None,
                          help="the tensor to cluster in a .pt dict or .safetensors file holding several")
    clusters.add_argument("--k", required=True, type=_positive_int, help="number of clusters")
    clusters.add_argument("--out", required=True, type=Path,
                          help="where the centroids go (.npy, float32 [K, D]; --batched: [B, K, D])")
    clusters.add_argument("--assignments", type=Path, default=None,
                          help="also write each row's cluster here (.npy, int64 [N]; --batched: [B, N])")
    clusters.add_argument("--iters", type=_positive_int, default=25, help="most Lloyd iterations (25)")
    clusters.add_argument("--tol", type=float, default=1e-4,
                          help="stop once an iteration lowers the inertia by at most this fraction (1e-4; 0: only "
                               "when it stops falling)")
    clusters.add_argument("--init", choices=("k-means||", "k-means++", "random"), default="k-means||",
                          help="seeding: k-means|| (default: k-means++ on a sample, about half a Lloyd iteration), "
                               "k-means++ (exact greedy, one pass over the rows per cluster) or random")
    clusters.add_argument("--metric", choices=("l2", "cosine"), default="l2", help="l2 or cosine (spherical k-means)")
    clusters.add_argument("--batch-size", type=_positive_int, default=None,
                          help="mini-batch k-means with batches of this many rows (default: full Lloyd passes)")
    clusters.add_argument("--max-points-per-centroid", type=_points_per_centroid, default=128, metavar="M|all",
                          help="with more than M K rows, seed and iterate on M K rows drawn from them, then run the "
                               "last iteration on all rows (128; FAISS trains on 256 K and stops there); all: every "
                               "iteration on all rows")
    clusters.add_argument("--seed", type=int, default=0, help="random seed (0)")
    clusters.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    clusters.add_argument("--threads", type=_positive_int, default=None, help="PyTorch intra-op threads")
    clusters.add_argument("--no-progress", action="store_true", help="no progress bar")
    clusters.add_argument("--batched", action="store_true",
                          help="a 3-D array [B, N, D] holds B independent problems, clustered in one call: the "
                               "centroids are [B, K, D] and the assignments [B, N] (problem b seeded with seed + b)")

    commands.add_parser("info", help="versions, devices and which backend each op uses",
                        description="Print versions, devices, the backends fastvq can use and the one each op takes.")
    return parser


# --------------------------------------------------------------------------- commands


def _log(message: str) -> None:
    print(message, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    from . import train as training

    if args.resume:
        # --perceptual-net may be repeated: a run's own MODULE:CALLABLE is imported only when named here.
        given = [flag for flag in ("model", "data", *MODEL_FLAGS, *DATA_FLAGS, *TRAIN_FLAGS)
                 if flag != "perceptual_net" and getattr(args, flag) is not None]
        if given:
            names = ", ".join(f"--{flag.replace('_', '-')}" for flag in given)
            raise training.RunError(f"--resume continues {args.out} with its own configuration; drop {names} "
                                    "(only --epochs, --device, --threads, --dist-timeout and --no-progress may change; "
                                    "--perceptual-net repeats the run's own)")
        metrics = training.train(args.out, None, resume=True, device=args.device, threads=args.threads,
                                 progress=not args.no_progress, epochs=args.epochs, log=_log,
                                 perceptual_net=args.perceptual_net, **_dist_timeout(args))
    else:
        if args.model is None:
            raise training.RunError(f"--model is required for a new run ({', '.join(STAGE1)})")
        spec = args.data or "digits"
        data_args = {"val_fraction": args.val_fraction, "image_size": args.image_size, "channels": args.image_channels}
        data_args = {name: value for name, value in data_args.items() if value is not None}
        config = training.stage1_config(
            args.model, spec, training.load_data({"data": spec, "data_args": data_args}),
            model_overrides=_model_overrides(args), data_args=data_args, epochs=args.epochs,
            batch_size=args.batch_size or 64, lr=args.lr, seed=args.seed or 0, eval_every=args.eval_every or 1,
            adversarial_start=args.adversarial_start, perceptual_net=args.perceptual_net,
        )
        metrics = training.train(args.out, config, force=args.force, device=args.device, threads=args.threads,
                                 progress=not args.no_progress, log=_log, **_dist_timeout(args))
    if metrics:
        _log(_stage1_summary(args.out, metrics))
    return 0


def _stage1_summary(run: Path, metrics: dict) -> str:
    return (f"epoch {metrics['epoch']}: val_nmse {metrics['val_nmse']:.4f}, perplexity {metrics['perplexity']:.1f}, "
            f"codes used {metrics['codes_used']} of {metrics['codebook_size']} -> {run / 'metrics.jsonl'}, "
            f"{run / 'reconstructions.png'}, {run / 'codebook_usage.png'}")


def cmd_prior(args: argparse.Namespace) -> int:
    from . import train as training

    overrides = {"dropout": args.dropout, "num_layers": args.layers, "width": args.channels}
    metrics = training.train_prior(args.run, args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                   prior_overrides=overrides, seed=args.seed, device=args.device, threads=args.threads,
                                   progress=not args.no_progress, **_dist_timeout(args))
    if metrics:
        _log(f"prior: val {_prior_summary(metrics)} -> {args.run / 'prior.pt'}, {args.run / 'prior_metrics.jsonl'}")
    return 0


def _prior_summary(metrics: dict) -> str:
    if "val_masked_bits_per_code" in metrics:
        return f"{metrics['val_masked_bits_per_code']:.3f} bits per masked code (maskgit's masked-token loss)"
    return f"{metrics['val_bits_per_code']:.3f} bits per code"


def cmd_sample(args: argparse.Namespace) -> int:
    from . import train as training

    path = training.sample(args.run, args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           steps=args.steps, seed=args.seed, device=args.device, threads=args.threads, out=args.out,
                           columns=args.columns)
    _log(f"{args.n} samples -> {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import train as training

    started = time.perf_counter()
    progress = not args.no_progress
    _log(f"fastvq demo: {args.model} on {args.data} -> {args.out}")
    config = training.stage1_config(args.model, args.data, training.load_data({"data": args.data, "data_args": {}}),
                                    seed=args.seed)
    metrics = training.train(args.out, config, force=True, device=args.device, threads=args.threads,
                             progress=progress, log=_log, **_dist_timeout(args))
    trained = time.perf_counter()
    _log(_stage1_summary(args.out, metrics))
    prior = training.train_prior(args.out, args.prior, seed=args.seed, device=args.device, threads=args.threads,
                                 progress=progress, **_dist_timeout(args))
    fitted = time.perf_counter()
    path = training.sample(args.out, args.n, seed=args.seed, device=args.device, threads=args.threads)
    done = time.perf_counter()
    size = metrics["codebook_size"]
    ok = metrics["val_nmse"] <= 0.05 and metrics["perplexity"] >= (size if isinstance(size, int) else min(size)) / 2
    lines = [
        "",
        f"fastvq demo finished in {done - started:.0f} s (train {trained - started:.0f} s, "
        f"prior {fitted - trained:.0f} s, sample {done - fitted:.0f} s)",
        f"  held-out reconstruction: val_nmse {metrics['val_nmse']:.4f} (MSE / data variance)",
        f"  codebook: perplexity {metrics['perplexity']:.1f}, {metrics['codes_used']} of {size} codes used",
        f"  prior: {_prior_summary(prior)} on held-out codes",
        f"  target (val_nmse <= 0.05, perplexity >= half the codebook): {'met' if ok else 'NOT met'}",
        "  pictures:",
        f"    {args.out / 'reconstructions.png'}  (held-out originals over reconstructions)",
        f"    {args.out / 'codebook_usage.png'}  (how often each code is used)",
        f"    {path}  (samples from the prior, decoded)",
        f"  metrics: {args.out / 'metrics.jsonl'}, {args.out / 'prior_metrics.jsonl'}",
    ]
    _log("\n".join(lines))
    return 0


def benchmarks_dir() -> Optional[Path]:
    """The source checkout's ``benchmarks/`` folder, or None (a wheel install has none)."""
    candidate = Path(__file__).resolve().parent.parent / "benchmarks"
    return candidate if candidate.is_dir() and any(candidate.glob(f"{BENCH_SCRIPT_PREFIX}*.py")) else None


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    folder = benchmarks_dir()
    if folder is None:
        print("fastvq bench: the benchmark scripts live in the benchmarks/ folder of a source checkout, which this "
              "install does not have (a wheel carries only the package). Clone the repository, "
              "`pip install -e .` there, and run `fastvq bench` again.", file=sys.stderr)
        return 2
    scripts = {path.stem[len(BENCH_SCRIPT_PREFIX):]: path for path in sorted(folder.glob(f"{BENCH_SCRIPT_PREFIX}*.py"))}
    if args.list:
        for name, path in scripts.items():
            _log(f"{name:12s} {path}")
        return 0
    unknown = [name for name in args.names if name not in scripts]
    if unknown:
        print(f"fastvq bench: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(scripts)}",
              file=sys.stderr)
        return 2
    chosen = args.names or list(scripts)
    extra = shlex.split(args.args)
    summary = []
    for name in chosen:
        command = [sys.executable, str(scripts[name]), *extra]
        _log(f"\n=== {name}: {' '.join(command)}")
        started = time.perf_counter()
        status = subprocess.call(command, cwd=folder.parent)
        summary.append((name, status, time.perf_counter() - started))
    _log("\n| benchmark | status | seconds |\n| --- | --- | --- |")
    for name, status, seconds in summary:
        _log(f"| {name} | {'ok' if status == 0 else f'failed (exit {status})'} | {seconds:.1f} |")
    _log(f"each script writes its tables to {folder / 'results'} unless given --out")
    return 0 if all(status == 0 for _, status, _ in summary) else 1


def _load_matrix(path: Path, key: Optional[str], batched: bool = False):
    """The array in ``path`` (.npy memory-mapped; .pt and .safetensors as tensors), rows flattened
    over every dimension but the last (``batched``: a 3-D array as it is, B problems); a ``RunError``
    that says what is wrong otherwise."""
    import numpy as np
    import torch

    from .train import RunError

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".pt":
            array = _single_tensor(torch.load(path, map_location="cpu", weights_only=True), key, path)
        elif suffix == ".safetensors":
            try:
                from safetensors import safe_open
            except ImportError:
                raise RunError("reading .safetensors files needs the safetensors package: "
                               "pip install safetensors (or fastvq[safetensors])") from None
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
                array = handle.get_tensor(_pick_key(names, key, path))
        else:
            raise RunError(f"--data must be a .npy, .pt or .safetensors file, got {path}")
    except RunError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to read is the user's file, reported as such
        raise RunError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    if isinstance(array, torch.Tensor) and array.layout != torch.strided:
        raise RunError(f"{path} holds a {array.layout} tensor; k-means reads dense rows: save tensor.to_dense()")
    if array.ndim < 2:
        raise RunError(f"{path} holds an array of shape {tuple(array.shape)}; k-means needs rows: [N, D] or [..., D]")
    if array.shape[-1] == 0:
        raise RunError(f"{path} holds an array of shape {tuple(array.shape)}: its rows have no values (D = 0)")
    if isinstance(array, np.ndarray) and not array.dtype.isnative:
        # A big-endian file (written on another machine, or with dtype ">f4"): the same numbers in
        # this machine's byte order. This reads the array into memory instead of mapping it.
        array = array.astype(array.dtype.newbyteorder("="))
    if batched:
        if array.ndim != 3:
            raise RunError(f"{path} holds an array of shape {tuple(array.shape)}; --batched needs B problems of "
                           "rows: [B, N, D]")
        return array
    return array.reshape(-1, array.shape[-1])


def _pick_key(names: list, key: Optional[str], path: Path) -> str:
    from .train import RunError

    if key is not None:
        if key not in names:
            raise RunError(f"{path} has no tensor {key!r}; it holds {', '.join(map(str, names)) or 'none'}")
        return key
    if len(names) != 1:
        raise RunError(f"{path} holds {len(names)} tensors ({', '.join(map(str, names))}): choose one with --key")
    return names[0]


def _single_tensor(loaded, key: Optional[str], path: Path):
    import torch

    from .train import RunError

    if isinstance(loaded, torch.Tensor):
        if key is not None:
            raise RunError(f"{path} holds a single tensor, not a dict: drop --key")
        return loaded
    if isinstance(loaded, dict):
        tensors = {name: value for name, value in loaded.items() if isinstance(value, torch.Tensor)}
        return tensors[_pick_key(list(tensors), key, path)]
    raise RunError(f"{path} holds a {type(loaded).__name__}, not a tensor or a dict of tensors")


def cmd_kmeans(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .clustering import kmeans
    from .train import RunError
    from .train.distributed import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, 0)
    data = _load_matrix(args.data, args.key, args.batched)
    started = time.perf_counter()
    try:
        result = kmeans(data, args.k, iters=args.iters, init=args.init, metric=args.metric, tol=args.tol,
                        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress, device=device,
                        max_points_per_centroid=args.max_points_per_centroid)
    except (TypeError, ValueError) as error:
        raise RunError(str(error)) from None
    seconds = time.perf_counter() - started
    for path, tensor in ((args.out, result.centroids), (args.assignments, result.assignments)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, tensor.cpu().numpy())
    written = str(args.out) + (f" and {args.assignments}" if args.assignments else "")
    problems = f"{data.shape[0]} problems of " if args.batched else ""
    _log(f"k-means: {args.k} clusters of {problems}{data.shape[-2]} rows x {data.shape[-1]} on {device}, "
         f"{len(result.inertia)} iterations in {seconds:.1f} s, inertia {_final_inertia(result.inertia):.6g} -> "
         f"{written}")
    return 0


def _final_inertia(inertia) -> float:
    """The last inertia of one problem, or the sum of B problems' last ones (each its last non-NaN value)."""
    if inertia.dim() == 1:
        return float(inertia[-1])
    return sum(float(column[~column.isnan()][-1]) for column in inertia.T)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, backends

    lines = [f"fastvq {__version__} ({Path(__file__).resolve().parent})",
             f"python {platform.python_version()} on {platform.platform()}",
             f"torch {torch.__version__}"]
    for module in ("triton", "numpy", "PIL", "tqdm"):
        try:
            imported = __import__(module)
            lines.append(f"{module} {getattr(imported, '__version__', '?')}")
        except ImportError:
            lines.append(f"{module}: not installed")
    lines.append(f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            lines.append(f"cuda:{index}: {torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda})")
    else:
        built_with = f" (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else ""
        lines.append("cuda: not available" + built_with)
    lines.append(f"FASTVQ_BACKEND={os.environ.get('FASTVQ_BACKEND', 'auto')}  "
                 f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    _log("\n".join(lines))
    _log(_format_backend_info(backends.backend_info(), torch.cuda.is_available()))
    return 0


def _format_backend_info(info: dict, cuda_present: bool) -> str:
    """``backend_info()`` as text: the backends' state, what each op runs on now, and the table."""
    compiled = info.get("compiled", {})
    triton = info.get("triton", {})
    build = compiled.get("build") or {}
    built = ", ".join(f"{key} {value}" for key, value in build.items() if key not in ("built",))
    lines = [
        f"FASTVQ_BACKEND={info.get('requested', 'auto')}",
        "compiled fastvq._C: " + ("available" + (" with CUDA kernels" if compiled.get("cuda_kernels") else "")
                                  + (f" ({built})" if built else "")
                                  if compiled.get("available") else f"not available ({compiled.get('reason')})"),
        f"triton: {'installed' if triton.get('available') else 'not installed'}"
        + (" (interpreter on: TRITON_INTERPRET=1)" if triton.get("interpreting") else ""),
        "torch: always available (memory-bounded pure-PyTorch path)",
        "",
        "what runs each op now (fp32 tensors):",
        "",
        "| op | cpu | cuda |",
        "| --- | --- | --- |",
    ]
    for op, devices in info.get("ops", {}).items():
        lines.append(f"| {op} | {devices.get('cpu', '?')} | {devices.get('cuda', '?')} |")
    if not cuda_present:
        lines.append("(no CUDA device here: the cuda column is what CUDA tensors would take)")
    lines += ["", "the table: which backend runs each op when a backend is selected (-> marks a fallback):", ""]
    table = info.get("table", [])
    selected_names = list(dict.fromkeys(row["backend"] for row in table))
    lines += ["| op | " + " | ".join(selected_names) + " |", "|" + " --- |" * (len(selected_names) + 1)]
    reasons: list[str] = []
    for op in dict.fromkeys(row["op"] for row in table):
        cells = []
        for row in (row for row in table if row["op"] == op):
            if row["runs"] == row["backend"]:
                cells.append(row["runs"])
                continue
            if row["reason"] not in reasons:
                reasons.append(row["reason"])
            cells.append(f"-> {row['runs']} ({reasons.index(row['reason']) + 1})")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += [""] + [f"({number}) {reason}" for number, reason in enumerate(reasons, start=1)]
    return "\n".join(lines)


COMMANDS = {"train": cmd_train, "prior": cmd_prior, "sample": cmd_sample, "demo": cmd_demo, "bench": cmd_bench,
            "info": cmd_info, "kmeans": cmd_kmeans}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .train import RunError

    try:
        return COMMANDS[args.command](args)
    except RunError as error:
        print(f"fastvq {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file the run writes or reads failed under it (permissions, a full disk, ...)
        where = f"{error.filename}: " if error.filename else ""
        hint = "; the last checkpoint written, if any, is intact for --resume" if args.command == "train" else ""
        print(f"fastvq {args.command}: error: {where}{error.strerror or error}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
