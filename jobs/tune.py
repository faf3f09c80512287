"""Ray job: sweep temperatures, soft/hard mixes, loss weights and the learning rate with Ray Tune (the `tune` stage).

    ray job submit --working-dir . -- python jobs/tune.py --config configs/demo.yaml [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout, installed or not

from distillery.cli import job_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(job_main(stages="tune"))
