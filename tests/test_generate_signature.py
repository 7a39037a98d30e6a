"""The SavedModel's `generate` signature end to end: a tiny LoRA GPT trained a few steps through the real command,
exported (merged), its graphs' ops all ones TF Serving registers, served by `kerasbig.serve` over REST, answering
with the tokens that `kerasbig.generate` prints for the same seed; bad requests are refused."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import kerasbig
from serving_helpers import call, running_server

from kerasbig import export, generation
from kerasbig.data import text
from kerasbig.data.spec import DataSpec
from kerasbig.models.gpt import build_gpt

TINY = ["--config=configs/gpt_small.py", "--config.model.width=32", "--config.model.depth=2",
        "--config.model.dropout=0.0", "--config.data.seq_len=32", "--config.data.batch_size=8",
        "--config.data.max_tokens=40000", "--config.train.jit_compile=False", "--config.train.steps=10",
        "--config.train.eval_every_steps=10", "--config.model.lora_rank=4"]
PROMPT = "The for statement"


def test_unservable_ops_are_named():
    assert export.unservable_ops({"MatMul", "While", "StatelessMultinomial"}) == []
    # A TF Text op (registered only by tensorflow_text's library) and an XLA-only op.
    assert export.unservable_ops({"MatMul", "FastWordpieceTokenizeWithOffsets", "XlaDynamicUpdateSlice"}) == [
        "FastWordpieceTokenizeWithOffsets", "XlaDynamicUpdateSlice"]


def test_generate_text_spells_the_tokens_of_its_utf8_prompts():
    keras.utils.set_random_seed(0)
    model = build_gpt(DataSpec("language_model", "tokens", (32,), "int32", text.BYTE_VOCAB), width=16, depth=1,
                      heads=2)
    embeddings = model.get_layer("token_embedding").embeddings  # the head too: mostly ASCII bytes are drawn
    embeddings.assign(np.where(np.arange(text.BYTE_VOCAB)[:, None] < 128, 10 * embeddings.numpy(), 0.0))
    settings = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 8, "top_p": 1.0, "seed": 3, "end_token": -1}
    signature = generation.text_signature(model)
    specs = signature.input_signature[0]
    for prompt in ("Grüße, ", "日本"):  # one at a time: a sampled row's draws depend on its place in the batch
        out = signature({"text": tf.constant([prompt]), **{
            name: tf.constant(value, specs[name].dtype) for name, value in settings.items()}})
        alone = generation.generate(model, text.encode(prompt), 6, temperature=1.0, top_k=8, seed=3)
        assert out["count"].numpy().tolist() == [6]
        assert out["tokens"].numpy()[0].tolist() == alone  # the prompt read as its UTF-8 bytes
        generated = out["text"].numpy()[0].decode()
        assert generated == text.decode(alone)  # U+FFFD where a byte is not UTF-8
        assert len(set(alone)) > 2


def _request(prompts: list[list[int]], **settings) -> dict:
    # top_p is not a multiple of 1/top_k: a barely trained model's top 20 are near-uniform, and a top_p on one of
    # their cumulative steps would leave the cut to the last bit of a float, which graphs may round differently.
    lengths = [len(p) for p in prompts]
    tokens = [p + [0] * (max(lengths) - len(p)) for p in prompts]
    inputs = {"tokens": tokens, "lengths": lengths, "max_new_tokens": 12, "temperature": 0.9, "top_k": 20,
              "top_p": 0.83, "seed": 5, "end_token": -1, **settings}
    return {"signature_name": "generate", "inputs": inputs}


def _as_printed(generated: str) -> str:
    """`generated` as a text-mode pipe reads it back: universal newlines turn a generated \\r into \\n."""
    return generated.replace("\r\n", "\n").replace("\r", "\n")


def _printed(workdir, *flags, prompt: str = PROMPT) -> str:
    """The text `python -m kerasbig.generate` prints after its header line."""
    stdout = kerasbig("generate", f"--workdir={workdir}", f"--prompt={prompt}", *flags).stdout
    return stdout.split("\n", 1)[1][:-1]  # print's newline


@pytest.mark.slow
def test_served_generate_signature_answers_what_kerasbig_generate_prints(tmp_path):
    workdir, saved = tmp_path / "run", tmp_path / "saved_models"
    kerasbig("train", *TINY, f"--workdir={workdir}", f"--export_dir={saved / 'gpt'}")
    version = saved / "gpt" / "1"
    assert {"generate", "generate_text", "serving_default"} <= set(tf.saved_model.load(str(version)).signatures)
    ops = export.graph_ops(version)
    assert {"While", "StatelessMultinomial"} <= ops and export.unservable_ops(ops) == []

    prompt = [int(token) for token in text.encode(PROMPT)]
    with running_server(saved, tmp_path / "serve.log") as url:
        predict = f"{url}/v1/models/gpt:predict"
        status, sampled = call(predict, _request([prompt]))
        assert status == 200, sampled
        status, greedy = call(predict, _request([prompt, prompt[:6]], temperature=0.0))
        assert status == 200, greedy
        as_text = _request([prompt])
        as_text["signature_name"] = "generate_text"
        as_text["inputs"] = {"text": [PROMPT], **{k: v for k, v in as_text["inputs"].items()
                                                  if k not in ("tokens", "lengths")}}
        status, texts = call(predict, as_text)
        assert status == 200, texts
        request = tmp_path / "request.json"
        request.write_text(json.dumps(_request([prompt])))
        client = kerasbig("predict", f"--server={url}", "--model_name=gpt", f"--input={request}")
        refused = call(predict, _request([prompt], top_p=0.0))
        too_long = call(predict, _request([list(range(33))]))

    tokens, count = sampled["outputs"]["tokens"][0], sampled["outputs"]["count"][0]
    assert count == 12 and len(tokens) == 12
    assert json.loads(client.stdout) == sampled["outputs"]
    # Text in, text out: the same tokens, as the text they spell.
    assert texts["outputs"]["tokens"] == [tokens] and texts["outputs"]["text"] == [text.decode(tokens)]
    printed = _printed(workdir, "--max_new_tokens=12", "--temperature=0.9", "--top_k=20", "--top_p=0.83", "--seed=5")
    assert printed == _as_printed(PROMPT + text.decode(tokens)), (list(printed.encode()), tokens)
    # A batch of padded prompts: each row is what that prompt generates alone.
    assert greedy["outputs"]["count"] == [12, 12]
    for row, prompt_text in enumerate((PROMPT, PROMPT[:6])):
        alone = _printed(workdir, "--max_new_tokens=12", "--temperature=0", prompt=prompt_text)
        assert alone == _as_printed(prompt_text + text.decode(greedy["outputs"]["tokens"][row]))
    assert refused[0] == 400 and "top_p must be in (0, 1]" in refused[1]["error"]
    assert too_long[0] == 400 and "longer than the context of the model (32)" in too_long[1]["error"]
