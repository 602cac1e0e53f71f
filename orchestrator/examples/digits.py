"""The self-contained example on the distributed pipeline (`make run`): local Ray, 2 synthesis actors, 2
DeepSpeed ranks, no download and no data set on disk; a few minutes on 2 CPU cores.

    python -m orchestrator.examples.digits                       # train the digits teacher if needed, then distill
    python -m orchestrator.examples.digits name=d2 cluster.synth_workers=1   # any orchestrator.run key=value
    python -m orchestrator.examples.digits --help                # every key, its default

Same steps and config (configs/digits.yaml) as `python -m nayer.examples.digits`, the single-process runner.
"""

from nayer.examples import digits
from orchestrator.cluster import root_cause
from orchestrator.config import PipelineConfig
from orchestrator.run import run

if __name__ == "__main__":
    digits.main(schema=PipelineConfig, runner=run, doc=__doc__, explain=root_cause)
