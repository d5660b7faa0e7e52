"""Make sure a run has its data and tokenizer: generate synthetic data into the run
directory when none is configured, build the tokenizer once from the training text."""

from __future__ import annotations

from pathlib import Path

from raybench.config import RunConfig
from raybench.data.loader import DataError, read_split, validate_dataset
from raybench.data.synthetic import write_curriculum, write_synthetic
from raybench.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_corpus


def ensure_data(cfg: RunConfig) -> dict[str, int]:
    """Rows per split; synthesises `<run_dir>/data` on first use, never a user's path: a
    `data.path` (local, `file://` or a URI such as `s3://bucket/prefix`) is only validated."""
    path = cfg.data_path
    if cfg.data.path is None and not path.exists():
        write_synthetic(path, num_train=cfg.data.num_train, num_val=cfg.data.num_val,
                        image_size=cfg.image_size, seed=cfg.data.seed, qtypes=cfg.data.qtypes,
                        questions_per_image=cfg.data.questions_per_image, mix=cfg.data.mix)
    counts = validate_dataset(path)
    for split in ("train", "val"):
        if counts.get(split, 0) == 0:
            raise DataError(f"{path}: no rows with split == {split!r}")
    if cfg.data.path is None:
        # A run directory rendered for another data config (an older default.yaml, say)
        # would otherwise be trained on silently.
        want = {"train": cfg.data.num_train, "val": cfg.data.num_val}
        got = {split: counts.get(split, 0) for split in want}
        if got != want:
            raise DataError(f"{path} holds {got} rows but data asks for {want}: it was rendered for "
                            f"another data config; delete it to render it again, or set data.path to it")
    for st in cfg.train.stages or []:
        if st.data is None:
            continue
        where = cfg.stage_path(st)
        if st.data.path is None and not where.exists():  # a stage's own data.path: validated only
            write_curriculum(where, st.data.num_examples, image_size=cfg.image_size, seed=cfg.data.seed,
                             qtypes=cfg.stage_qtypes(st), max_objects=st.data.max_objects,
                             questions_per_image=cfg.data.questions_per_image, name=st.name,
                             letter_share=st.data.letter_share)
        counts[f"stage-{st.name}"] = validate_dataset(where, splits=("curriculum",))["curriculum"]
    return counts


def tokenizer_dir(cfg: RunConfig) -> Path:
    return cfg.run_path / "tokenizer"


def ensure_tokenizer(cfg: RunConfig):
    """The run's tokenizer: loaded if saved, else trained on the train split's text and saved.

    With a pretrained LLM its own local tokenizer is used (plus an added `<image>`).
    """
    out = tokenizer_dir(cfg)
    if (out / "tokenizer.json").exists():
        return load_tokenizer(out)
    if cfg.model.llm.pretrained_path:
        tok = load_tokenizer(cfg.model.llm.pretrained_path)
    else:
        train = read_split(cfg.data_path, "train", columns=["messages"])
        tok = build_tokenizer(tokenizer_corpus(train), vocab_size=cfg.data.tokenizer_vocab_size)
    save_tokenizer(tok, out)
    return tok
