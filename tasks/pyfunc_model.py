"""The registered model's serving code: an MLflow pyfunc that continues each prompt.

Logged as "models from code" (MLflow reads this file, no pickle): the exported Hugging Face
folder travels inside the model version as the artifact ``hf_model`` and is loaded from there.
``predict`` is typed, so MLflow derives the signature from it and checks inputs against it.
"""

from __future__ import annotations

from typing import Any

import mlflow
import mlflow.pyfunc


class TextGenerator(mlflow.pyfunc.PythonModel):
    """Greedy (or sampled) continuation of each prompt with the exported byte-level model."""

    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = context.artifacts["hf_model"]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Loading weights" bars on the caller's stderr
        try:
            # The exported Bolmo folder carries its own modeling code, hence trust_remote_code:
            # it is our code, shipped inside the model version, not code fetched from a hub.
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """One continuation per prompt; params: max_new_tokens (16), temperature (0.0: greedy)."""
        import torch

        params = params or {}
        kwargs: dict[str, Any] = {"max_new_tokens": int(params.get("max_new_tokens", 16))}
        temperature = float(params.get("temperature", 0.0))
        kwargs["do_sample"] = temperature > 0
        if temperature > 0:
            kwargs["temperature"] = temperature
        if self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        outputs = []
        for prompt in model_input:
            enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            with torch.no_grad():
                out = self.model.generate(**enc, **kwargs)
            outputs.append(
                self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            )
        return outputs


mlflow.models.set_model(TextGenerator())
