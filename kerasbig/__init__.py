"""kerasbig: train big Keras 3 models under tf.distribute, watch them in TensorBoard, serve them with TF Serving."""
import os
import sys


def _import_tensorflow_quietly() -> None:
    """TensorFlow 2.21 prints C++ start-up notices (oneDNN, absl pre-init, and on machines without a GPU driver a
    failed cuInit) that ignore TF_CPP_MIN_LOG_LEVEL; they would bury kerasbig's one-line errors, so stderr is muted
    while it loads and looks for GPUs (which leaves the logical devices unconfigured). KERASBIG_TF_LOGS=1 keeps them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("KERASBIG_TF_LOGS") == "1":
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow

        tensorflow.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _backend_from_command_line() -> str:
    """`--backend=NAME` (or `--backend NAME`) sets KERAS_BACKEND: it must be chosen before Keras is imported, which
    happens before a command parses its flags. Returns the backend Keras will load."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg.startswith("--backend="):
            os.environ["KERAS_BACKEND"] = arg.split("=", 1)[1]
        elif arg == "--backend" and i + 1 < len(argv):
            os.environ["KERAS_BACKEND"] = argv[i + 1]
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def require_tensorflow(feature: str):
    """TensorFlow, for `feature` of a JAX run (which otherwise never imports it); a one-line UsageError naming the
    install where it is missing."""
    try:
        _import_tensorflow_quietly()
    except ImportError:
        from kerasbig.errors import UsageError

        raise UsageError(f"{feature} needs TensorFlow, which is not installed here: pip install tensorflow "
                         "(without it, JAX trains the language-model datasets text_lm and corpus:)") from None
    import tensorflow

    return tensorflow


if _backend_from_command_line() == "tensorflow":  # a JAX run imports TensorFlow only for what needs it
    _import_tensorflow_quietly()
