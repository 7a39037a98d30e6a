import pathlib, numpy as np, tensorflow as tf
from kerasbig.generate import load_language_model
from kerasbig import generation
from kerasbig.data import text
root = pathlib.Path("/tmp/lora-bt/s/test_served_generate_signature0")
task, model, step = load_language_model(root / "run")
prompt = [int(t) for t in text.encode("The for statement")]
sig = tf.saved_model.load(str(root / "saved_models/gpt/1")).signatures
specs = generation.input_signature()
for temp in (0.0, 0.9):
    inp = {"tokens": [prompt], "lengths": [len(prompt)], "max_new_tokens": 12, "temperature": temp, "top_k": 20, "top_p": 0.95, "seed": 5, "end_token": -1}
    served = sig["generate"](**{k: tf.constant(v, specs[k].dtype) for k, v in inp.items()})
    local = generation.signature(model)({k: tf.constant(v, specs[k].dtype) for k, v in inp.items()})
    print(temp, served["tokens"].numpy(), local["tokens"].numpy(), generation.generate(model, prompt, 12, temperature=temp, top_k=20, top_p=0.95, seed=5))
a = sig["serving_default"](tokens=tf.constant([prompt]))["logits"].numpy()
b = model(np.array([prompt]))[:, -1].numpy()
print(np.abs(a-b).max(), a.std())
