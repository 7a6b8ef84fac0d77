from setuptools import find_packages, setup

setup(
    name="sd-jax",
    version="0.1.0",
    description="Stable Diffusion text-to-image in JAX/Flax: fully compiled, multi-device, trainable.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sd_jax", "sd_jax.*"]),
    package_data={"sd_jax": ["assets/*", "serve/static/*"]},
    install_requires=[
        "jax>=0.8,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "transformers>=4.45,<6",
        "numpy>=1.26,<3",
        "pillow>=10,<14",
        "safetensors>=0.4,<1",
        "tqdm>=4.66,<5",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "torch>=2.4,<2.15",
            "diffusers>=0.35,<0.43",
            "accelerate>=1.0,<2",
            "nbclient>=0.10,<1",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
            "matplotlib>=3.8,<4",
            "fastapi>=0.110,<1",
            "uvicorn>=0.29,<1",
            "httpx>=0.27,<1",
            "webuiapi>=0.9.17,<0.10",
            "sd-parsers>=0.6,<0.7",
            "selenium>=4.20,<5",
            "invisible-watermark>=0.2,<0.3",   # the reference for sd_jax.watermark (pulls opencv, pywavelets)
            "opencv-python-headless>=4.8,<6",  # canny control images
            "peft>=0.17,<0.22",                # diffusers' load_lora_weights (the LoRA reference)
            "torchmetrics>=1.4,<2",            # CLIPScore (the CLIP score reference)
            "pytest-xdist>=3.5,<4",            # the suite on both cores (-n 2)
        ],
        "serve": ["fastapi>=0.110,<1", "uvicorn>=0.29,<1"],
        "canny": ["opencv-python-headless>=4.8,<6"],  # ControlNet canny control images
        "train": ["matplotlib>=3.8,<4"],  # loss.png
        "gpu": ["jax[cuda12]>=0.8,<0.11"],
    },
    entry_points={"console_scripts": ["sd-jax=sd_jax.cli:main"]},
)
