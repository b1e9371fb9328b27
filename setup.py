from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("bissl_det/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="bissl_det",
    version=version["__version__"],
    description="BiSSL (bilevel self-supervised pretraining alignment) as a Detectron2 project",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=("bissl_det", "bissl_det.*")),
    # detectron2 is not on PyPI: tools/install_detectron2.py installs it (see docs/install.md).
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
        "matplotlib",
        "numpy",
        "Pillow",
    ],
    extras_require={
        # submitit: tools/submit.py (Slurm); optuna: parallel hyper-parameter search.
        "cluster": ["submitit>=1.5", "optuna>=4"],
        "dev": ["pytest", "pytest-xdist>=3.5", "ruff", "submitit>=1.5", "optuna>=4"],
    },
)
