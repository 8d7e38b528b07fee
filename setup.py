"""Install: `pip install .` or `pip install -e .` (add `[test]` for the test suite, `[gpu]` for liger-kernel, `[hf]`
for `repbend.integrations.hf` (transformers.Trainer needs accelerate), `[wandb]` for --train.report_to wandb).

`repbend.kernels` lives in `repbend/kernels/`: a top-level `kernels` folder would shadow Hugging Face's own
`kernels` package (which transformers requires and imports) whenever the repository root is on `sys.path`.
"""
from setuptools import find_packages, setup

setup(
    name="repbend",
    version="0.1.0",
    description="Fast, exact Representation Bending (RepBend) LoRA training for LLM safety",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["repbend", "repbend.*"]),
    package_data={"repbend": ["configs/*.yaml", "demo/templates/*.jinja"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "peft>=0.13",
        "numpy",
        "pyyaml",
        "tqdm",
        "tokenizers",
        "safetensors",
        "pyarrow",
        "matplotlib",
    ],
    extras_require={
        # accelerate: transformers.Trainer (repbend.integrations.hf); wandb: the W&B sink's offline test
        "test": ["pytest>=7", "accelerate>=1.1.0", "wandb"],
        "gpu": ["liger-kernel"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "hf": ["accelerate>=1.1.0"],
    },
    entry_points={"console_scripts": ["repbend = repbend.cli:console_main"]},
)
