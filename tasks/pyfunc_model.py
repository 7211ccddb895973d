"""The registered model's serving code: an MLflow pyfunc that generates text from a prompt.

Logged as "models from code" (MLflow reads this file, no pickle): the exported Hugging Face
folder travels inside the model version as the artifact ``hf_model`` and is loaded from there.
"""

from __future__ import annotations

import mlflow
import mlflow.pyfunc


def _prompts(model_input) -> list[str]:
    """Accept a DataFrame with a ``prompt`` column, a list of strings, a dict or a string."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", "")
        return [value] if isinstance(value, str) else [str(v) for v in value]
    if hasattr(model_input, "columns"):  # pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    return [str(v) for v in model_input]


class TextGenerator(mlflow.pyfunc.PythonModel):
    """Greedy (or sampled) continuation of each prompt with the exported byte-level model."""

    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["hf_model"]
        # The exported Bolmo folder carries its own modeling code, hence trust_remote_code:
        # it is our code, shipped inside the model version, not code fetched from a hub.
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()

    def predict(self, context, model_input, params=None):
        import torch

        params = params or {}
        max_new = int(params.get("max_new_tokens", 32))
        temperature = float(params.get("temperature", 0.0))
        outputs = []
        for prompt in _prompts(model_input):
            enc = self.tokenizer(prompt, return_tensors="pt")
            kwargs = {"max_new_tokens": max_new, "do_sample": temperature > 0}
            if temperature > 0:
                kwargs["temperature"] = temperature
            if self.tokenizer.pad_token_id is not None:
                kwargs["pad_token_id"] = self.tokenizer.pad_token_id
            with torch.no_grad():
                out = self.model.generate(**enc, **kwargs)
            new = out[0, enc["input_ids"].shape[1] :]
            outputs.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return outputs


mlflow.models.set_model(TextGenerator())
