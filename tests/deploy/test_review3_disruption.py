"""The PodDisruptionBudget against the replica counts the autoscaler can reach.

A node drain or a cluster upgrade evicts as many server pods as the budget allows at once. The servers
hold one GPU each and take minutes to load their models, so an eviction is capacity lost for minutes:
at any replica count the HPA may have reached (the CPU one, and the queue-depth one of autoscaling/)
the budget must let one pod go at a time, never all but one of eight under load.
"""

from __future__ import annotations

import math

import pytest
import yaml

from tests.deploy.k8s_objects import K8S, Obj, load_all


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return load_all()


def allowed_disruptions(pdb_spec: dict, replicas: int) -> int:
    """How many ready pods of ``replicas`` the budget lets an eviction take (Kubernetes' disruption controller:
    a percentage of minAvailable rounds up, of maxUnavailable rounds up too)."""
    if "maxUnavailable" in pdb_spec:
        value = pdb_spec["maxUnavailable"]
        unavailable = math.ceil(replicas * int(value[:-1]) / 100) if isinstance(value, str) else int(value)
        return max(0, min(replicas, unavailable))
    value = pdb_spec["minAvailable"]
    available = math.ceil(replicas * int(value[:-1]) / 100) if isinstance(value, str) else int(value)
    return max(0, replicas - available)


def test_the_count_follows_kubernetes() -> None:
    assert allowed_disruptions({"minAvailable": 1}, 8) == 7
    assert allowed_disruptions({"maxUnavailable": 1}, 8) == 1
    assert allowed_disruptions({"maxUnavailable": "25%"}, 2) == 1
    assert allowed_disruptions({"minAvailable": "50%"}, 3) == 1


def test_evictions_take_one_server_at_a_time_at_every_scale(objects: list[Obj]) -> None:
    (pdb,) = [o.doc for o in objects if o.kind == "PodDisruptionBudget" and o.source == "."]
    (hpa,) = [o.doc for o in objects if o.kind == "HorizontalPodAutoscaler" and o.source == "."]
    queue_hpa = yaml.safe_load((K8S / "autoscaling" / "hpa-queue-depth.yaml").read_text())
    for scaler in (hpa, queue_hpa):
        for replicas in range(scaler["spec"]["minReplicas"], scaler["spec"]["maxReplicas"] + 1):
            assert allowed_disruptions(pdb["spec"], replicas) == 1, (scaler["metadata"]["name"], replicas, pdb["spec"])
