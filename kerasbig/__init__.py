"""kerasbig: train big Keras 3 models under tf.distribute, watch them in TensorBoard, serve them with TF Serving."""
import os


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


_import_tensorflow_quietly()
