"""The champion as an MLflow model: a pyfunc logged with MLflow 3's models-from-code.

`model_code.py` defines the PythonModel and calls `mlflow.models.set_model(...)`, so nothing
is pickled: MLflow stores that source file and runs it at load time. The raybench model
directory (safetensors, config.json, tokenizer) travels as the pyfunc's artifact `model`:

    <pyfunc>/MLmodel  model_code.py  artifacts/model/{model.safetensors, config.json, tokenizer.json}

so `raybench deploy --model models:/...` serves the same registered version from the
files under artifacts/model (`model_files`), and `mlflow.pyfunc.load_model(...)` /
`mlflow models serve -m models:/raybench-vlm@champion --env-manager local` answer with
the `raybench ask` code path. Loading needs raybench importable (this repository installed).
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path

ARTIFACT = "model"              # the pyfunc artifact that holds the raybench model directory
DEFAULT_MAX_TOKENS = 8          # as `raybench ask`
CODE_FILE = Path(__file__).with_name("model_code.py")


def model_files(path: str | Path) -> Path:
    """The raybench model directory inside a downloaded registry version: the pyfunc's
    artifact for an MLflow model, the folder itself for raw artifacts (older versions)."""
    path = Path(path)
    if (path / "MLmodel").is_file():
        return path / "artifacts" / ARTIFACT
    return path


def decode_image(value: str) -> bytes:
    """A data URI (data:image/png;base64,...) or bare base64 -> image bytes."""
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    return base64.b64decode(payload, validate=True)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question")]),
                          outputs=Schema([ColSpec("string", "answer")]),
                          params=ParamSchema([ParamSpec("max_tokens", "long", DEFAULT_MAX_TOKENS)]))


def input_example(image_size: int):
    """One synthetic scene at the model's input size and its question, as a client sends them."""
    import pandas as pd

    from raybench.data.synthetic import render_scene, sample_scene

    scene, question, _ = sample_scene(random.Random(0), "color")
    buf = io.BytesIO()
    render_scene(scene, image_size).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return pd.DataFrame([{"image": uri, "question": question}])


def _requirements() -> list[str]:
    from importlib.metadata import version

    # Pinned to what saved the model; raybench itself comes from this repository (not on PyPI).
    names = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pillow", "pydantic",
             "pyyaml", "numpy", "pandas")
    return [f"{n}=={version(n).split('+')[0]}" for n in names]


def save_pyfunc(model_dir: str | Path, path: str | Path) -> Path:
    """Write the MLflow model for the raybench model in `model_dir` into `path` (new folder)."""
    import json

    import mlflow.pyfunc

    meta = json.loads((Path(model_dir) / "config.json").read_text())
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(CODE_FILE), artifacts={ARTIFACT: str(model_dir)},
        signature=signature(), input_example=input_example(meta["model"]["vision"]["image_size"]),
        pip_requirements=_requirements(), metadata={"raybench_format": meta.get("format")})
    return Path(path)
