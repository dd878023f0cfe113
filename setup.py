from setuptools import find_packages, setup

setup(
    name="minorsft-megatron",
    version="0.1.0",
    description="MinorSFT fine-tuning of GPT-style LLMs on NVIDIA Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["minorsft_megatron", "minorsft_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "megatron-core>=0.16.1,!=0.17.*,!=0.18.*,<0.20",  # tested: 0.16.1 and 0.19.2 (docs/megatron-versions.md)
        "sentencepiece",
        "pyyaml",
        "psutil",
        "numpy",
        "jinja2",
        "tensorboard",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "hf": ["transformers", "safetensors", "tokenizers"],
        "tiktoken": ["tiktoken"],
        "data": ["pyarrow", "datasets"],
        "dev": ["pytest", "transformers", "tokenizers", "tiktoken", "pyarrow", "datasets", "peft"],
    },
)
