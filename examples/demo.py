"""`make demo`: lora vs flat_lora vs bi_lora on the embedded default (MiniLM + tweets), offline.

The same as ``flatpeft compare --config examples/demo.yaml --overwrite``; prints held-out accuracy and
seconds per step for each method and writes runs/demo/compare.{md,csv,json,png}. Other ``flatpeft
compare`` flags pass through; ``--smoke`` runs the same pipeline on the tiny random model for 2 steps
(seconds instead of minutes, as CI does).
"""

import sys
from pathlib import Path

from flatpeft.cli import main

SMOKE = ["--model", "tiny", "--train-size", "30", "--test-size", "30", "--max-steps", "2", "--no-progress"]

config = Path(__file__).with_name("demo.yaml")
args = sys.argv[1:]
if "--smoke" in args:
    args = [a for a in args if a != "--smoke"] + SMOKE
sys.exit(main(["compare", "--config", str(config), "--overwrite", *args]))
