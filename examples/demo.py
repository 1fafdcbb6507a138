"""`make demo`: lora vs flat_lora vs bi_lora on the embedded default (MiniLM + tweets), offline.

The same as ``flatpeft compare --config examples/demo.yaml --overwrite``; prints held-out accuracy and
seconds per step for each method and writes runs/demo/compare.{md,csv,json,png}.
"""

import sys
from pathlib import Path

from flatpeft.cli import main

config = Path(__file__).with_name("demo.yaml")
sys.exit(main(["compare", "--config", str(config), "--overwrite", *sys.argv[1:]]))
