"""fastvq: fused vector quantization for PyTorch (search + argmin + gather, STE, EMA) on Triton
and a memory-bounded PyTorch path."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="fastvq",
    version="0.1.0",
    description="Fused vector quantization for PyTorch: nearest-code search, STE and EMA without an N x K matrix",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fastvq", "fastvq.*"]),
    # torch is left unpinned on purpose: install the build you want first (the README installs the
    # CPU build on CPU machines); a satisfied requirement pulls nothing more.
    install_requires=["torch>=2.4", "einops>=0.7"],
    extras_require={
        "triton": ["triton>=3.2; platform_system == 'Linux'"],
        "test": [
            "pytest>=8",
            "numpy",
            "triton>=3.2; platform_system == 'Linux'",
            # the layer tests compare against the original library directly
            "vector-quantize-pytorch==1.32.0",
        ],
        "bench": ["pytest-benchmark>=4", "numpy"],
    },
    entry_points={},
)
