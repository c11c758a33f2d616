"""The `controls` setting: which Calico metrics endpoints each cluster checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from scanner.core.config import load_settings
from scanner.core.errors import ConfigError
from scanner.core.records import CONTROL_IDS, FELIX, KUBE_CONTROLLERS, TYPHA
from tests.core.test_config import KUBECONFIG


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    return path


def _load(tmp_path: Path, kubeconfig: Path, body: str) -> list[tuple[str, ...]]:
    cfg = tmp_path / "felixscan.yaml"
    cfg.write_text(body.replace("KC", str(kubeconfig)))
    settings = load_settings(cfg, environ={"KUBECONFIG": str(kubeconfig)})
    return [c.controls for c in settings.clusters]


def test_every_control_by_default(tmp_path: Path, kubeconfig: Path) -> None:
    assert CONTROL_IDS == (FELIX, TYPHA, KUBE_CONTROLLERS)
    assert _load(tmp_path, kubeconfig, "clusters:\n  - {name: a, kubeconfig: KC}\n") \
        == [CONTROL_IDS]


def test_top_level_default_and_per_cluster_choice(tmp_path: Path, kubeconfig: Path) -> None:
    body = ("controls: [kube-controllers-metrics, felix-metrics]\nclusters:\n"
            "  - {name: a, kubeconfig: KC}\n"
            "  - {name: b, kubeconfig: KC, controls: typha-metrics}\n"
            "  - {name: c, kubeconfig: KC, controls: [felix-metrics]}\n")
    # catalogue order whatever order the file lists them in
    assert _load(tmp_path, kubeconfig, body) == [(FELIX, KUBE_CONTROLLERS), (TYPHA,), (FELIX,)]


@pytest.mark.parametrize(("body", "key", "expect"), [
    ("clusters:\n  - {name: a, kubeconfig: KC, controls: [felix]}\n", "clusters[0].controls[0]",
     "unknown control 'felix'"),
    ("clusters:\n  - {name: a, kubeconfig: KC, controls: []}\n", "clusters[0].controls",
     "non-empty list"),
    ("controls: {felix-metrics: true}\nclusters:\n  - {name: a, kubeconfig: KC}\n", "controls",
     "non-empty list"),
    ("clusters:\n  - {name: a, kubeconfig: KC, calico: {typha_deployment: x}}\n",
     "clusters[0].calico.typha_deployment", "unknown key"),
])
def test_bad_controls_get_one_clear_message(tmp_path: Path, kubeconfig: Path, body: str,
                                            key: str, expect: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, kubeconfig, body)
    assert key in str(info.value)
    assert expect in str(info.value)


def test_component_names_are_configurable(tmp_path: Path, kubeconfig: Path) -> None:
    cfg = tmp_path / "felixscan.yaml"
    cfg.write_text(f"clusters:\n  - name: a\n    kubeconfig: {kubeconfig}\n    calico: "
                   "{typha: typha, kube_controllers: kc, kube_controllers_container: main}\n")
    calico = load_settings(cfg, environ={}).clusters[0].calico
    assert (calico.typha, calico.typha_container, calico.kube_controllers,
            calico.kube_controllers_container) == ("typha", "calico-typha", "kc", "main")


def test_environment_picks_controls_without_a_file(kubeconfig: Path) -> None:
    env = {"KUBECONFIG": str(kubeconfig), "FELIXSCAN_CONTROLS": "typha-metrics, felix-metrics"}
    assert load_settings(None, environ=env).clusters[0].controls == (FELIX, TYPHA)
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOME": "/nonexistent",
                  "FELIXSCAN_CONTROLS": "kube-controllers-metrics"}
    assert load_settings(None, environ=in_cluster).clusters[0].controls == (KUBE_CONTROLLERS,)
    with pytest.raises(ConfigError, match="FELIXSCAN_CONTROLS: unknown control 'typha'"):
        load_settings(None, environ={**env, "FELIXSCAN_CONTROLS": "typha"})
