"""The claims benchmark's child processes (`python -m photon.bench.claims ...`), started by `run.py`: an arm
trains in a fresh process so that each arm gets its own thread settings and memory, and the throughput probes
measure as many processes at once as the plan trains.

    --throughput CONFIG_JSON BATCHES SECONDS   one throughput probe; prints tokens/s per batch as JSON
    BASE_CONFIG_JSON ARM_JSON SEED RUN_DIR     one arm at one seed (`run_arm`)
"""

import json
import sys
from pathlib import Path

from photon.bench.claims.plan import Arm
from photon.bench.claims.run import run_arm, throughput_one
from photon.config import build_config

if sys.argv[1:2] == ["--throughput"]:
    print(json.dumps(throughput_one(build_config(json.loads(sys.argv[2])), [int(b) for b in sys.argv[3].split(",")],
                                    float(sys.argv[4]))))
else:
    _base, _arm, _seed, _dir = sys.argv[1:5]
    _a = json.loads(_arm)
    run_arm(build_config(json.loads(_base)), Arm(**{**_a, "overrides": tuple(_a["overrides"])}), int(_seed),
            Path(_dir))
