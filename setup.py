"""SiMo / EqCo pretraining and detectron2 downstream transfer."""
from setuptools import find_packages, setup

setup(
    name="eqco-transfer",
    version="0.1.0",
    description="SiMo/EqCo self-supervised pretraining, linear eval and detectron2 detection transfer",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain", "pretrain.*", "transfer", "transfer.*"]),
    # detectron2 is not on PyPI: `make install` (tools/install_detectron2.sh) installs it.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools>=2.0.2",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "pyyaml",
        # the aug+ Gaussian blur (pretrain.data.gaussian_blur); detectron2 needs it too, and
        # tools/install_detectron2.sh installs the same package (headless: no GUI libraries)
        "opencv-python-headless",
        # SLURM submission with requeue on preemption (tools/submit.py)
        "submitit",
    ],
    extras_require={
        "dev": ["pytest", "ruff", "black"],
        # lightly: an independent oracle for our losses in tests/pretrain/test_lightly_oracle.py
        # (never imported at run time); pytest-xdist: `make test` runs the files in 2 processes
        "test": ["pytest", "pytest-xdist", "lightly"],
        # real photographs (the ones scikit-image ships) for bench/data_pipeline.py
        "bench": ["scikit-image"],
    },
)
