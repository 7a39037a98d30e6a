"""SavedModels for the server's tests that are not kerasbig exports: users point the dev server at any SavedModel.

- `export_half_plus_two`: TF1-style (SavedModelBuilder), like TF Serving's own test model: `y = 0.5 x + 2` as
  `serving_default` (x of any shape), `regress_x_to_y` and `classify_x_to_y` on serialized tf.Examples.
- `export_multi`: TF2 `tf.Module` with several named inputs of several dtypes, several outputs, scalar outputs
  and non-default signatures.
- `export_slow`: a signature that runs `n` matrix products, to keep workers busy on purpose.
"""
from __future__ import annotations

import pathlib

import tensorflow as tf


def export_half_plus_two(path: pathlib.Path) -> None:
    v1 = tf.compat.v1
    with tf.Graph().as_default(), v1.Session() as session:
        a, b = v1.Variable(0.5, name="a"), v1.Variable(2.0, name="b")
        examples = v1.placeholder(tf.string, [None], name="tf_example")
        x_of_example = tf.io.parse_example(examples, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
        y_of_example = tf.add(a * x_of_example, b, name="y_of_example")
        x = v1.placeholder(tf.float32, None, name="x")  # any shape, as the instances of TF Serving's tests
        y = tf.add(a * x, b, name="y")
        signatures = {
            "serving_default": v1.saved_model.predict_signature_def({"x": x}, {"y": y}),
            "regress_x_to_y": v1.saved_model.regression_signature_def(examples, y_of_example),
            "classify_x_to_y": v1.saved_model.classification_signature_def(examples, None, y_of_example),
        }
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
        builder.save()


class _Multi(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a"),
                                  tf.TensorSpec([None], tf.int64, name="b"),
                                  tf.TensorSpec([None], tf.string, name="text")])
    def serve(self, a, b, text):
        return {"sum": tf.reduce_sum(a, axis=1) + tf.cast(b, tf.float32),
                "length": tf.cast(tf.strings.length(text), tf.int64), "text_bytes": text}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def scalars(self, x):
        return {"total": tf.reduce_sum(x), "label": tf.constant("tf")}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def tenth(self, x):
        return {"y": x * 0.1}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name="i32"),
                                  tf.TensorSpec([None], tf.int64, name="i64"),
                                  tf.TensorSpec([None], tf.float64, name="f64"),
                                  tf.TensorSpec([None], tf.bool, name="flag"),
                                  tf.TensorSpec([None], tf.uint8, name="u8"),
                                  tf.TensorSpec([None], tf.int8, name="i8")])
    def dtypes(self, i32, i64, f64, flag, u8, i8):
        return {"i32": i32, "i64": i64, "f64": f64, "flag": flag, "u8": u8, "i8": i8}


def export_multi(path: pathlib.Path) -> None:
    module = _Multi()
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.serve, "scalars": module.scalars, "tenth": module.tenth,
        "dtypes": module.dtypes})


class _Slow(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name="n")])
    def serve(self, n):
        matrix = tf.eye(128) * 0.5

        def step(i, product):
            return i + 1, tf.linalg.matmul(product, matrix) * 2.0

        _, product = tf.while_loop(lambda i, _: i < n[0], step, (tf.constant(0), matrix))
        return {"trace": tf.fill(tf.shape(n), tf.linalg.trace(product))}


def export_slow(path: pathlib.Path) -> None:
    module = _Slow()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
