"""`python -m flexllm.operator`: runs the operator cluster-wide.

With FLEXLLM_PEERING set (the chart's default), replicas join kopf peering with a random priority:
only the highest-priority replica handles objects, the others stand by and take over when it goes.
"""

from __future__ import annotations

import random

import kopf

from flexllm.operator import main as _handlers  # noqa: F401  (registers the handlers)
from flexllm.operator.config import CONFIG


def run() -> None:
    kopf.configure(verbose=False)
    kopf.run(
        clusterwide=True,
        standalone=not CONFIG.peering,
        peering_name=CONFIG.peering or None,
        priority=random.SystemRandom().randint(1, 2**31 - 1),
        liveness_endpoint=CONFIG.liveness or None,
    )


if __name__ == "__main__":
    run()
