"""kerasbig: train big Keras 3 models under tf.distribute, watch them in TensorBoard, serve them with TF Serving."""
from setuptools import find_packages, setup

TF_RANGE = ">=2.20,<2.22"

setup(
    name="kerasbig",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The shipped configs travel inside the package, so that an installed kerasbig has its default config.
    packages=find_packages(include=["kerasbig", "kerasbig.*"]) + ["kerasbig.configs"],
    package_dir={"kerasbig.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.10,<4",
        "tensorboard" + TF_RANGE,
        "tensorflow-datasets>=4.9,<5",
        "absl-py>=2.0,<3",
        "ml-collections>=0.1.1,<2",
        "scikit-learn>=1.3,<2",
        "numpy>=1.26,<3",
        "sentencepiece>=0.2,<0.3",  # BPE and unigram tokenizers trained on corpus: data
        "safetensors>=0.4,<1",  # model.init_from: Hugging Face weights, and --export_format=hf
        "regex>=2023.0",  # GPT-2's pre-tokenizer needs Unicode classes (\p{L}, \p{N}) that `re` lacks
        # TF Serving's own protos (warmup records, models.config, the gRPC API) come only with
        # tensorflow-serving-api, which requires the `tensorflow` distribution by name: with `tensorflow-cpu`
        # beside it pip would install both, one overwriting the other. So the base is the full `tensorflow`
        # wheel, which runs as it is on machines without GPUs; the CUDA libraries come only with [gpu].
        "tensorflow" + TF_RANGE,
        "tensorflow-serving-api" + TF_RANGE,
        "grpcio>=1.60,<2",
    ],
    extras_require={
        "cpu": [],  # kept so that `pip install kerasbig[cpu]` keeps working: the base already runs on CPUs
        "gpu": ["tensorflow[and-cuda]" + TF_RANGE],
        "profile": ["tensorboard-plugin-profile>=2.15"],
        # The JAX backend (keras.distribution data and model parallel); 0.4.34 is the oldest jax keras 3.10 runs on.
        "jax": ["jax>=0.4.34,<0.11"],
        # keras-hub's generate beside kerasbig's in `bench --suite=generation`. Its tensorflow-text 2.21 matches the
        # base tensorflow wheel, so `pip install kerasbig[hub]` keeps the installed TensorFlow (checked with pip's
        # --dry-run: it adds tensorflow-text, tokenizers and huggingface_hub, and replaces nothing).
        "hub": ["keras-hub>=0.32,<0.33"],
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "pytest-timeout>=2.3,<3", "jax>=0.4.34,<0.11"],
    },
)
