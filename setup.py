"""vqmoe-megatron: VQMoE (vector-quantized mixture of experts) on megatron-core + DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

# torch is deliberately unpinned here: install it first (README), so that pip keeps the build you
# chose (CPU wheel for laptops and CI, CUDA wheel on clusters) instead of pulling another one.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core==0.16.1",
    "deepspeed==0.19.8",
    "webdataset==1.0.2",
    "sentencepiece==0.2.3",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "tensorboard>=2.14",
    "safetensors>=0.4",
    "zstandard>=0.22",
    "matplotlib>=3.7",
]

EXTRAS = {
    # Cluster installs: Transformer Engine (and apex, built from source) are used when present.
    "gpu": ["transformer-engine[pytorch]>=2.1"],
    # The exported modelling code targets the transformers 5 API (Cache objects passed as `cache`).
    "hf": ["transformers>=5.24,<6"],
    # lm-eval's HF model imports accelerate (its [hf] extra would also pull peft).
    "eval": ["transformers>=5.24,<6", "lm-eval==0.4.13", "accelerate>=0.26"],
    "mpi": ["mpi4py>=4.0", "openmpi>=5.0"],
    "test": [
        "pytest>=8.0",
        "pytest-timeout>=2.3",
        "psutil>=5.9",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "ruff>=0.6",
    ],
}

setup(
    name="vqmoe-megatron",
    version="0.1.0",
    description="Pretraining and fine-tuning of VQMoE language models with megatron-core and DeepSpeed",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vqmoe_megatron", "vqmoe_megatron.*"]),
    package_data={"vqmoe_megatron.eval_tasks": ["*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "vqmoe-convert=vqmoe_megatron.commands:convert",
            "vqmoe-evaluate=vqmoe_megatron.commands:evaluate",
            "vqmoe-compare=vqmoe_megatron.commands:compare",
        ]
    },
)
