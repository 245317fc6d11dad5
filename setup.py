"""Install IBISAgent: the core library, the training package and the console entry points."""

from setuptools import find_packages, setup

VLM = ["torch>=2.4", "torchvision", "transformers>=4.57", "accelerate"]
extras = {
    "sam2": ["torch>=2.4", "torchvision", "sam2"],
    "sam": ["torch>=2.4", "torchvision", "segment-anything"],
    "vlm": VLM,
    "io": ["nibabel", "SimpleITK", "pydicom<3"],
    "eval": ["matplotlib"],
    "train": VLM + ["trl>=1.0", "peft", "monai", "datasets", "pyyaml"],
    "server": ["monailabel==0.8.5", "pydicom<3", "nibabel", "requests"],
    "test": ["pytest", "pytest-timeout", "hypothesis", "requests", "ruff", "psutil"],
}
extras["all"] = sorted({dep for name, deps in extras.items() if name != "test" for dep in deps})

setup(
    name="ibisagent",
    version="0.1.0",
    description="Agentic interactive biomedical segmentation: a vision-language policy that clicks, a segmentation tool that answers.",
    python_requires=">=3.10",
    # The repository's training/ folder is installed as `ibisagent_training`: sam2 ships its own top-level
    # package named `training`, and the two must coexist in one environment.
    packages=find_packages(include=["ibisagent", "ibisagent.*"])
    + ["ibisagent_training"]
    + [f"ibisagent_training.{p}" for p in find_packages(where="training")],
    package_dir={"ibisagent_training": "training"},
    package_data={"ibisagent": ["templates/*.txt", "templates/*.jinja"]},
    install_requires=["numpy", "scipy", "pillow", "scikit-image", "threadpoolctl", "tqdm"],
    extras_require=extras,
    entry_points={
        "console_scripts": [
            "ibisagent=ibisagent.cli:main",
            "ibisagent-train=ibisagent_training.cli:main",
        ]
    },
)
