"""Write docs/configs.md, the config reference, from the pydantic schemas.

    python scripts/config_reference.py           # rewrite docs/configs.md
    python scripts/config_reference.py --check   # exit 1 if it is out of date

The generator is `raybench/config_reference.py` (base layer); this script hands it the two
root configs, the run config and the serving config (serve layer), so the package's layering
stays one-way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raybench.config import RunConfig
from raybench.config_reference import page
from raybench.serve.config import ServeConfig

ROOTS = (RunConfig, ServeConfig)
PAGE = Path(__file__).resolve().parent.parent / "docs" / "configs.md"


def main(argv: list[str]) -> int:
    text = page(*ROOTS)
    if "--check" in argv:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
