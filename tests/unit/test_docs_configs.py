"""docs/configs.md is generated from the config schemas and cannot drift from them: it must be
what `python scripts/config_reference.py` writes now, and every field must have words (its
comment in the code, or an entry in raybench/config_reference.py's DESCRIPTIONS)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydantic import Field

from raybench import config_reference as ref
from raybench.schema import Strict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("config_reference_script", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_field_has_a_description(script):
    missing = [m for root in script.ROOTS for m in ref.missing_descriptions(root)]
    assert missing == [], ("config fields with no words: put a comment beside the field in its config "
                           "class, or an entry in DESCRIPTIONS (raybench/config_reference.py):\n  "
                           + "\n  ".join(missing))


def test_descriptions_table_names_only_fields_without_a_comment(script):
    stale = ref.stale_descriptions(list(script.ROOTS))
    assert stale == [], f"DESCRIPTIONS entries for no field, or for a field whose comment now says it: {stale}"


def test_every_field_has_a_row_in_the_committed_reference(script):
    page = script.PAGE.read_text()
    rows = []
    for root in script.ROOTS:
        for section in ref.sections(root):
            heading = ref.section_markdown(section).splitlines()[0]
            body = page.split(heading + "\n", 1)[1].split("\n### ", 1)[0] if heading + "\n" in page else ""
            rows += [f"{section.paths[0] or root.__name__}.{name}" for name in section.cls.model_fields
                     if f"| `{name}` |" not in body]
    assert rows == [], f"fields with no row in docs/configs.md (run python scripts/config_reference.py): {rows}"


def test_the_committed_reference_is_current(script):
    assert script.main(["--check"]) == 0, "docs/configs.md is stale: run python scripts/config_reference.py"


def test_a_field_without_words_is_caught_and_a_comment_is_read():
    class Toy(Strict):
        """A toy section."""
        # what `a` is,
        # over two lines
        a: int = Field(1, ge=0)
        b: str = "x"  # what `b` is
        c: float = 0.5

    assert ref.field_comments(Toy) == {"a": "what `a` is, over two lines", "b": "what `b` is"}
    assert ref.missing_descriptions(Toy) == ["c (Toy.c)"]
    row = ref.section_markdown(ref.Section(Toy, [""])).splitlines()[-3]
    assert row == "| `a` | int | `1` | >= 0 | what `a` is, over two lines |"


def test_the_size_and_preset_tables_read_the_presets():
    sizes, presets = ref.size_table(), ref.preset_table()
    assert "| `model.llm.num_layers` | `4` | `4` | `28` |" in sizes
    assert "| `llava` | `\"mlp\"` | `0` | `false` |" in presets
