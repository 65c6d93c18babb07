"""Teacher-actor placement is read off each node, never the cluster's total (which no single
node may have): every actor asked for fits a node, and a request no node holds is one line
naming it and the largest node. The end-to-end cases run on a real 2-node loopback cluster
(tests/test_multinode.py, tests/test_bad_inputs_cluster.py)."""

from __future__ import annotations

import pytest

from cluster.executor import placement
from pipeline.config import TeacherConfig
from pipeline.errors import UserError


def nodes(*spec: tuple[float, float]) -> list[dict]:
    return [{"id": f"n{i}", "CPU": c, "GPU": g} for i, (c, g) in enumerate(spec)]


def fits(slots, cluster) -> bool:
    """Every actor's request fits its node, and no node is asked for more than it has."""
    used = {n["id"]: {"CPU": 0.0, "GPU": 0.0} for n in cluster}
    by_id = {n["id"]: n for n in cluster}
    for s in slots:
        node = s.node or next(n["id"] for n in cluster  # unpinned: first node with room, like Ray
                              if all(used[n["id"]][r] + v <= n[r] for r, v in s.request.items()))
        for r, v in s.request.items():
            used[node][r] += v
    return all(used[i][r] <= by_id[i][r] for i in used for r in ("CPU", "GPU"))


def test_default_cpu_actors_one_per_node_with_its_cpus():
    cluster = nodes((2, 0), (2, 0))  # `cluster up --nodes 2`: 4 CPUs in all, 2 per node
    slots, device = placement(cluster, TeacherConfig(), shards=10)
    assert device == "cpu" and len(slots) == 2
    assert sorted(s.node for s in slots) == ["n0", "n1"]
    assert [s.request for s in slots] == [{"CPU": 2.0}, {"CPU": 2.0}] and [s.threads for s in slots] == [2, 2]
    assert fits(slots, cluster)


def test_num_actors_spread_over_unequal_nodes():
    cluster = nodes((8, 0), (2, 0), (0, 0))  # a node without CPUs takes none
    slots, _ = placement(cluster, TeacherConfig(num_actors=3), shards=10)
    assert sorted((s.node, s.threads) for s in slots) == [("n0", 4), ("n0", 4), ("n1", 2)]
    assert fits(slots, cluster)
    one, _ = placement(cluster, TeacherConfig(), shards=1)  # never more actors than shards
    assert [(s.node, s.threads) for s in one] == [("n0", 8)]


def test_more_cpu_actors_than_cpus_is_one_line():
    with pytest.raises(UserError, match=r"teacher\.num_actors: 5 CPU actors need a CPU each; the 2 alive node\(s\) have 4 CPUs"):
        placement(nodes((2, 0), (2, 0)), TeacherConfig(num_actors=5), shards=10)


def test_gpu_actors_fit_the_nodes():
    cluster = nodes((16, 0), (96, 8), (96, 8))
    slots, device = placement(cluster, TeacherConfig(gpus_per_actor=2), shards=100)
    assert device == "cuda" and len(slots) == 8 and all(s.request == {"CPU": 1.0, "GPU": 2.0} for s in slots)
    assert fits(slots, cluster)
    unset, _ = placement(cluster, TeacherConfig(), shards=100)  # unset on a GPU cluster: 1 each
    assert len(unset) == 16 and fits(unset, cluster)
    cpu, device = placement(cluster, TeacherConfig(gpus_per_actor=0), shards=100)
    assert device == "cpu" and len(cpu) == 3


@pytest.mark.parametrize("cluster,per,largest", [
    (nodes((2, 0), (2, 0)), 1, "{'CPU': 2, 'GPU': 0}"),  # a GPU asked for on a CPU cluster
    (nodes((16, 0), (96, 8), (32, 4)), 16, "{'CPU': 96, 'GPU': 8}"),  # more GPUs than any node
])
def test_a_request_no_node_holds_names_it_and_the_largest_node(cluster, per, largest):
    with pytest.raises(UserError) as err:
        placement(cluster, TeacherConfig(gpus_per_actor=per), shards=10)
    msg = str(err.value)
    assert f"teacher actor of {{'CPU': 1, 'GPU': {per}}}" in msg and "teacher.gpus_per_actor" in msg
    assert f"the largest of the {len(cluster)} alive node(s) has {largest}" in msg
    # With an autoscaler a node may still come: the actors are asked for (and waited on, bounded).
    slots, _ = placement(cluster, TeacherConfig(gpus_per_actor=per), shards=10, may_grow=True)
    assert len(slots) == 1
