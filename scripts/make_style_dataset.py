"""Render a captioned style dataset from the procedural world (see sdlora/eval/world.py) in any look
of sdlora/eval/looks.py (world's sketch, pastel and halftone among them).

    python scripts/make_style_dataset.py --style sketch --count 24 --size 128 --seed 0 --out datasets/sketch
    python scripts/make_style_dataset.py --style neon --out output/neon    # trigger "sks neon"
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdlora.eval.datasets import main, write_dataset  # noqa: E402,F401
from sdlora.eval.looks import ALL_LOOKS, look_caption, render_look  # noqa: E402,F401 - any look, for the same scripts
from sdlora.eval.world import *  # noqa: E402,F403 - re-exported for scripts that load this file

if __name__ == "__main__":
    main()
