"""MLflow models-from-code: the champion's PythonModel. MLflow stores this file with the
model and runs it at load time (`set_model` below); nothing is pickled. Each row is answered
exactly as `raybench ask` answers it (one greedy generate per row, no padding across rows)."""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class RaybenchVLM(PythonModel):
    def load_context(self, context):
        from raybench.data.processor import VQAProcessor
        from raybench.data.tokenizer import load_tokenizer
        from raybench.model.vlm import HybridVLM
        from raybench.pyfunc import ARTIFACT

        path = context.artifacts[ARTIFACT]
        self.model = HybridVLM.from_pretrained(path).eval()
        self.proc = VQAProcessor(load_tokenizer(path), self.model.config.num_image_tokens,
                                 self.model.config.vision.image_size)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from raybench.pyfunc import DEFAULT_MAX_TOKENS, decode_image

        max_tokens = int((params or {}).get("max_tokens", DEFAULT_MAX_TOKENS))
        answers = []
        for image, question in zip(model_input["image"], model_input["question"]):
            prompt = self.proc.encode_prompts([question])
            pixels = self.proc.pixel_values([decode_image(image)])
            with torch.no_grad():
                out = self.model.generate(prompt["input_ids"], prompt["attention_mask"], pixels,
                                          max_new_tokens=max_tokens)
            answers.append(self.proc.decode_answer(out[0].tolist()))
        return pd.DataFrame({"answer": answers})


mlflow.models.set_model(RaybenchVLM())
