"""Ray job: prune and 8-bit-quantize the winning student, keep the smallest within budget, write the bundle (the `compress` stage).

    ray job submit --working-dir . -- python jobs/compress.py --config configs/demo.yaml [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout, installed or not

from distillery.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(stages="compress"))
