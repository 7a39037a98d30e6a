"""On PYTHONPATH, makes TensorFlow (and the packages built on it) unimportable, as on a machine without it: what
tests/test_jax.py runs kerasbig's JAX path under."""
import sys

BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorflow_serving", "tensorflow_text", "tf_keras")


class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (tests/no_tensorflow blocks it)", name=name)
        return None


sys.meta_path.insert(0, _NoTensorFlow())
