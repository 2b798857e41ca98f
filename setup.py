from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [line.split("#")[0].strip() for line in (here / "requirements.txt").read_text().splitlines()]

setup(
    name="condiquant",
    version="0.1.0",
    description="Low-bit post-training quantization of image super-resolution networks (CondiQuant, 2DQuant, OAQ)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["condiquant", "condiquant.*"]),
    package_data={"condiquant": ["*.yml"]},
    python_requires=">=3.9",
    install_requires=[r for r in requirements if r],
    entry_points={"console_scripts": [
        "condiquant-train=condiquant.cli:main_train", "condiquant-test=condiquant.cli:main_test",
        "condiquant-reproduce=condiquant.cli:main_reproduce", "condiquant-quickstart=condiquant.cli:main_quickstart",
        "condiquant-export=condiquant.cli:main_export", "condiquant-infer-onnx=condiquant.cli:main_infer_onnx",
        "condiquant-compare=condiquant.cli:main_compare"]},
    extras_require={"test": ["pytest>=7", "scikit-image>=0.21", "scipy>=1.10"],
                    "deploy": ["onnx>=1.16", "onnxruntime>=1.18"]},
)
