"""Waivers (accepted risks) as plain data: which entries are in force, which are findings of
their own, and what applying them does to verdicts, findings and the cluster status."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime

import pytest

from scanner.core.evaluate import evaluate
from scanner.core.records import (
    ClusterResult,
    ClusterSnapshot,
    ConfigFile,
    Declared,
    Installation,
    Node,
    Pod,
    ProbeResult,
    Rollout,
)
from scanner.core.waivers import NO_WAIVERS, apply_waivers, covers, parse_waivers

TODAY = date(2026, 11, 29)
T0 = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)


def entry(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"finding": "FELIX-PORT-REACHABLE", "cluster": "prod",
                               "nodes": "gpu-*", "reason": "vendor agent scrapes Felix until Q1",
                               "approved_by": "ciso@example.com", "created": date(2026, 11, 1),
                               "expires": date(2027, 1, 31)}
    base.update(over)
    return base


def result(nodes: dict[str, tuple[bool | None, str, bool | None]], *,
           installation: Installation | None = None) -> ClusterResult:
    """An evaluated cluster "prod": node -> (declared enabled, probe state, felix)."""
    names = list(nodes)
    snap = ClusterSnapshot(
        cluster="prod", install="manifest", namespace="kube-system", daemonset="calico-node",
        container="calico-node", image="calico/node:v3.32.1", env=(),
        config_file=ConfigFile(known=True, values={}, origin="image default"),
        felix_configs=(), felix_crd=True, installation=installation,
        rollout=Rollout(2, 2, len(names), len(names), len(names), len(names), "new",
                        "RollingUpdate", "1"),
        pods=tuple(Pod(name=f"calico-node-{n}", node=n, phase="Running", revision="new",
                       ready=True, owner="calico-node") for n in names),
        nodes=tuple(Node(name=n, addresses=(("InternalIP", f"127.0.0.{i + 1}"),), ready=True)
                    for i, n in enumerate(names)),
        collected_at=T0)
    off = Declared(enabled=False, source="env FELIX_PROMETHEUSMETRICSENABLED", port=9091,
                   port_source="built-in default")
    declared = {n: replace(off, enabled=e, reason=None if e is not None else "secret missing")
                for n, (e, _s, _f) in nodes.items()}
    probes = [ProbeResult(node=n, address=f"127.0.0.{i + 1}", port=9091,
                          state=state,  # type: ignore[arg-type]
                          felix=felix, protocol="http" if state == "open" else None)
              for i, (n, (_e, state, felix)) in enumerate(nodes.items())]
    return evaluate(snap, declared, probes, cluster_declared=declared[names[0]],
                    started_at=T0, finished_at=T0)


def test_a_valid_entry_is_in_force_until_its_expiry_day() -> None:
    ws = parse_waivers([entry()], source="waivers.yaml", today=TODAY)
    assert [w.finding for w in ws.active] == ["FELIX-PORT-REACHABLE"] and ws.problems == ()
    [w] = ws.active
    assert w.id.startswith("W-") and w.source == "waivers.yaml entry 1"
    # The id names what is waived and when, so it is the same in every scan.
    assert parse_waivers([entry()], source="waivers.yaml", today=TODAY).active[0].id == w.id
    last_day = parse_waivers([entry()], source="w", today=date(2027, 1, 31))
    assert last_day.active and not last_day.problems
    after = parse_waivers([entry()], source="w", today=date(2027, 2, 1))
    assert after.active == ()
    assert [p.kind for p in after.problems] == ["expired"]
    assert "expired on 2027-01-31" in after.problems[0].message


@pytest.mark.parametrize(("change", "message"), [
    ({"expires": None}, "missing expires (an expiry date is required)"),
    ({"approved_by": ""}, "missing approved_by"),
    ({"finding": "NOT-A-FINDING"}, "unknown finding ID 'NOT-A-FINDING'"),
    ({"finding": "WAIVER-EXPIRED"}, "WAIVER-EXPIRED cannot be waived"),
    ({"expires": date(2028, 1, 1)}, "at most 365 days are allowed (waiver_max_days)"),
    ({"expires": date(2026, 10, 1)}, "is before created"),
    ({"created": "yesterday"}, "created: expected a date YYYY-MM-DD"),
    ({"nodes": ""}, "nodes: expected a glob"),
    ({"owner": "me"}, "unknown key(s) owner"),
    ({"created": date(2026, 12, 24), "expires": date(2027, 1, 2)}, "is in the future"),
])
def test_a_malformed_entry_applies_to_nothing_and_says_why(change: dict[str, object],
                                                            message: str) -> None:
    ws = parse_waivers([entry(**change), entry(nodes="*")], source="w.yaml", today=TODAY)
    assert len(ws.active) == 1  # the good entry still counts
    [problem] = ws.problems
    assert problem.kind == "invalid" and problem.entry == 1 and problem.cluster == "prod"
    assert message in problem.message and problem.message.startswith("w.yaml entry 1: ")


def test_the_maximum_term_is_configurable() -> None:
    long = entry(expires=date(2027, 12, 1))  # 395 days
    assert parse_waivers([long], source="w", today=TODAY).problems
    assert parse_waivers([long], source="w", today=TODAY, max_days=400).active


def test_quoted_dates_and_a_not_mapping_entry() -> None:
    ws = parse_waivers([entry(created="2026-11-01", expires="2027-01-31"), "nonsense"],
                       source="w", today=TODAY)
    assert ws.active[0].expires == date(2027, 1, 31)
    assert ws.problems[0].entry == 2 and ws.problems[0].cluster is None
    with pytest.raises(TypeError, match="expected a list of waivers"):
        parse_waivers({"finding": "x"}, source="w", today=TODAY)
    assert parse_waivers(None, source="w", today=TODAY).active == ()


def test_node_globs() -> None:
    [w] = parse_waivers([entry(nodes="gpu-[0-9]*")], source="w", today=TODAY).active
    assert covers(w, "gpu-1") and not covers(w, "gpu-a") and not covers(w, "cpu-1")
    assert not covers(w, None)  # a cluster-wide finding needs nodes: "*"
    [star] = parse_waivers([entry(nodes="*")], source="w", today=TODAY).active
    assert covers(star, None) and covers(star, "anything")


def test_a_waived_node_stays_visible_and_the_cluster_is_compliant() -> None:
    before = result({"gpu-1": (False, "open", True), "cpu-1": (False, "closed", None)})
    assert before.status == "non_compliant"
    after = apply_waivers(before, parse_waivers([entry()], source="w", today=TODAY))
    assert after.status == "compliant"
    verdicts = {n.node: n.verdict for n in after.nodes}
    assert verdicts == {"gpu-1": "waived", "cpu-1": "pass"}
    [gpu] = [n for n in after.nodes if n.node == "gpu-1"]
    [w] = after.waivers
    assert gpu.waiver == w.id
    reachable = [f for f in after.findings if f.id == "FELIX-PORT-REACHABLE"]
    assert reachable and all(f.waiver == w.id for f in reachable)
    # Other findings about the same node are not waived by a waiver for another ID.
    drift = [f for f in after.findings if f.id == "DRIFT-DISABLED-BUT-OPEN"]
    assert drift and all(f.waiver is None for f in drift)


def test_every_reason_a_node_fails_must_be_waived() -> None:
    enabled_open = result({"gpu-1": (True, "open", True)})
    only_port = apply_waivers(enabled_open, parse_waivers([entry()], source="w", today=TODAY))
    assert only_port.status == "non_compliant"
    assert only_port.nodes[0].verdict == "fail"
    both = apply_waivers(enabled_open, parse_waivers(
        [entry(), entry(finding="FELIX-METRICS-ENABLED", nodes="*")], source="w", today=TODAY))
    assert both.status == "compliant" and both.nodes[0].verdict == "waived"
    assert len(both.waivers) == 2
    # The cluster-wide FELIX-METRICS-ENABLED finding lists its nodes: waived as a whole.
    [enabled] = [f for f in both.findings if f.id == "FELIX-METRICS-ENABLED"]
    assert enabled.waiver is not None


def test_an_unwaived_node_or_another_cluster_keeps_it_non_compliant() -> None:
    two = result({"gpu-1": (False, "open", True), "cpu-1": (False, "open", True)})
    after = apply_waivers(two, parse_waivers([entry()], source="w", today=TODAY))
    assert after.status == "non_compliant"
    assert sorted(n.verdict for n in after.nodes) == ["fail", "waived"]
    other = apply_waivers(two, parse_waivers([entry(cluster="staging", nodes="*")],
                                             source="w", today=TODAY))
    assert other == two  # nothing for this cluster: the result is untouched


def test_an_expired_waiver_is_a_finding_and_waives_nothing() -> None:
    failing = result({"gpu-1": (False, "open", True)})
    late = parse_waivers([entry()], source="waivers.yaml", today=date(2027, 3, 1))
    after = apply_waivers(failing, late)
    assert after.status == "non_compliant" and after.nodes[0].verdict == "fail"
    [expired] = [f for f in after.findings if f.id == "WAIVER-EXPIRED"]
    assert expired.severity == "medium" and "expired on 2027-01-31" in expired.message
    assert expired.evidence["approved_by"] == "ciso@example.com"
    assert after.waivers == ()


def test_a_malformed_entry_naming_no_cluster_is_reported_on_every_cluster() -> None:
    ok = result({"a": (False, "closed", None)})
    after = apply_waivers(ok, parse_waivers([{"finding": "x"}], source="w", today=TODAY))
    assert after.status == "compliant"  # a problem with the file is not a failure of nodes
    assert [f.id for f in after.findings] == ["WAIVER-INVALID"]


def test_unknown_nodes_still_make_an_error_and_the_operator_port_needs_a_cluster_waiver() -> None:
    mixed = result({"gpu-1": (False, "open", True), "x": (None, "filtered", None)})
    after = apply_waivers(mixed, parse_waivers([entry()], source="w", today=TODAY))
    assert after.status == "error" and "1 of 2 nodes could not be verified" in (after.error or "")
    operator = result({"a": (False, "closed", None)},
                      installation=Installation(name="default", node_metrics_port=9091))
    assert operator.status == "non_compliant"
    waived = apply_waivers(operator, parse_waivers(
        [entry(finding="OPERATOR-METRICS-PORT-SET", nodes="*")], source="w", today=TODAY))
    assert waived.status == "compliant"
    glob_only = apply_waivers(operator, parse_waivers(
        [entry(finding="OPERATOR-METRICS-PORT-SET", nodes="a")], source="w", today=TODAY))
    assert glob_only.status == "non_compliant"


def test_no_waivers_is_a_no_op() -> None:
    r = result({"a": (False, "open", True)})
    assert apply_waivers(r, NO_WAIVERS) is r
