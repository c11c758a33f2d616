"""scanner/web/rules/controls.rules.yaml, the alerts per control on
`felixscan_control_status`, run through promtool with series that make each fire and series
that keep it quiet; and deploy/overlays/monitoring's rules still pass with the new series."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.paths import ROOT
from tests.web.test_metrics import JOB, promtool

RULES = ROOT / "scanner" / "web" / "rules" / "controls.rules.yaml"


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def fired(name: str, cluster: str, control: str) -> dict[str, Any]:
    rule = rules()[name]
    return {"exp_labels": {**rule["labels"], "cluster": cluster, "control": control},
            "exp_annotations": {
                k: v.replace("{{ $labels.cluster }}", cluster)
                    .replace("{{ $labels.control }}", control)
                for k, v in rule["annotations"].items()}}


def test_control_rules_fire_and_stay_quiet(tmp_path: Path) -> None:
    check = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 2 rules found" in check.stdout

    def series(cluster: str, control: str, values: str) -> dict[str, str]:
        return {"series": f'felixscan_control_status{{cluster="{cluster}",control="{control}",'
                          f"{JOB}}}", "values": values}

    tests = [{"interval": "1m", "input_series": [
        series("good", "felix-metrics", "1x60"), series("good", "typha-metrics", "1x60"),
        # Typha turns non-compliant at 20 min; Felix stays compliant
        series("mixed", "felix-metrics", "1x60"), series("mixed", "typha-metrics", "1x20 0x40"),
        # kube-controllers cannot be read from the start
        series("blind", "kube-controllers-metrics", "-1x60"),
    ], "alert_rule_test": [
        {"eval_time": "10m", "alertname": "FelixscanControlNonCompliant", "exp_alerts": []},
        {"eval_time": "30m", "alertname": "FelixscanControlNonCompliant",
         "exp_alerts": [fired("FelixscanControlNonCompliant", "mixed", "typha-metrics")]},
        {"eval_time": "5m", "alertname": "FelixscanControlNotVerified", "exp_alerts": []},
        {"eval_time": "15m", "alertname": "FelixscanControlNotVerified",
         "exp_alerts": [fired("FelixscanControlNotVerified", "blind",
                              "kube-controllers-metrics")]},
    ]}]
    (tmp_path / RULES.name).write_text(RULES.read_text())
    path = tmp_path / "controls.test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [RULES.name], "evaluation_interval": "1m",
                                    "tests": tests}))
    proc = subprocess.run([promtool(), "test", "rules", path.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
