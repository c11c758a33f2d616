"""The catalogue of finding IDs: stable IDs, severity, title and remediation text.

docs/findings.md renders this same table; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from scanner.core.records import Install, Severity


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    severity: Severity
    title: str
    remediation: str


_MANIFEST_FIX = (
    "Set the env var on the calico-node container: `kubectl -n {namespace} set env "
    "ds/{daemonset} -c {container} FELIX_PROMETHEUSMETRICSENABLED=false` (or `felixscan "
    "remediate`), wait for `kubectl -n {namespace} rollout status ds/{daemonset}`, then scan "
    "again to verify the port is closed on every node."
)
_OPERATOR_FIX = (
    "Remove `spec.nodeMetricsPort` from the operator Installation `default` (`kubectl patch "
    "installation default --type=json "
    "-p '[{{\"op\":\"remove\",\"path\":\"/spec/nodeMetricsPort\"}}]'`)"
    " and set `prometheusMetricsEnabled: false` in FelixConfiguration `default`; an env edit on "
    "the DaemonSet would be reverted by the operator. Then scan again."
)
_FELIXCONFIG_FIX = (
    "Set `spec.prometheusMetricsEnabled: false` (and remove any "
    "`config.projectcalico.org/PrometheusMetricsEnabled` annotation) on the FelixConfiguration "
    "named in the evidence (`kubectl patch felixconfiguration <name> --type=merge -p "
    "'{{\"spec\":{{\"prometheusMetricsEnabled\":false}}}}'`). Felix restarts inside the pod; no "
    "rollout is needed. Then scan again."
)

RULES: dict[str, Rule] = {
    rule.id: rule
    for rule in (
        Rule("FELIX-METRICS-ENABLED", "high",
             "The Felix Prometheus metrics endpoint is enabled in configuration",
             "Disable it at the source that wins (see evidence). " + _MANIFEST_FIX.format(
                 namespace="kube-system", daemonset="calico-node", container="calico-node")),
        Rule("FELIX-PORT-REACHABLE", "critical",
             "Felix serves unauthenticated Prometheus metrics on a node",
             "Disable the endpoint in configuration (FELIX-METRICS-ENABLED) and, until then, "
             "deny the port with a HostEndpoint and a GlobalNetworkPolicy (Calico docs: "
             "secure-metrics)."),
        Rule("DRIFT-DISABLED-BUT-OPEN", "high",
             "Declared disabled, but the metrics port is open on the node",
             "Find out what still listens: a calico-node pod on an old template revision (finish "
             "the rollout: `kubectl -n <ns> rollout status ds/calico-node`, or delete the stale "
             "pod), a host-level Felix outside Kubernetes, or another service on the port."),
        Rule("DRIFT-ENABLED-BUT-CLOSED", "medium",
             "Declared enabled, but the port is not reachable from the scanner",
             "A firewall or policy hides the endpoint, but the configuration is still "
             "non-compliant: disable the endpoint in configuration too."),
        Rule("PORT-OPEN-NOT-FELIX", "high",
             "The metrics port is open on the node, served by something other than Felix",
             "Identify the listener on the node (`ss -ltnp 'sport = :<port>'`) and close it or "
             "restrict it; an open port fails the control whoever serves it."),
        Rule("EXTRA-PORT-OPEN", "medium",
             "A port configured as an extra check is open on the node",
             "Identify and close or restrict the listener (e.g. Typha 9093, kube-controllers "
             "9094: see Calico's secure-metrics guidance)."),
        Rule("ROLLOUT-INCOMPLETE", "medium",
             "The calico-node rollout is incomplete: some pods run an old template",
             "Wait for or repair the rollout (`kubectl -n <ns> rollout status ds/calico-node`); "
             "pods on the old revision may still serve metrics."),
        Rule("OPERATOR-METRICS-PORT-SET", "high",
             "The operator Installation requests Felix metrics (spec.nodeMetricsPort)",
             _OPERATOR_FIX.format()),
        Rule("FELIX-CONFIG-INVALID-VALUE", "low",
             "A metrics setting holds a value Felix does not accept",
             "Felix logs the value as invalid and uses false, but a typo hides intent: set an "
             "explicit `false`."),
        Rule("FELIX-CONFIG-UNRESOLVED", "high",
             "The declared metrics setting could not be determined",
             "Make the winning source readable to the scanner (grant get on the ConfigMap or "
             "Secret named in the evidence, fix the reference or the selector), then scan again."),
        Rule("FELIX-METRICS-LOOPBACK-ONLY", "low",
             "Felix metrics are enabled but bound to a loopback address only",
             "Loopback binding (PrometheusMetricsHost) keeps the port off the network, but any "
             "process on the node can read it and the control requires it disabled: disable the "
             "endpoint (FELIX-METRICS-ENABLED)."),
        Rule("FELIX-METRICS-RANDOM-PORT", "medium",
             "PrometheusMetricsPort is 0: Felix binds a random port no probe can aim at",
             "Set PrometheusMetricsPort back to a fixed port (or remove it) so that the node "
             "can be verified, and disable the endpoint."),
        Rule("FELIX-CONFIG-SELECTOR-INVALID", "medium",
             "A selector-scoped FelixConfiguration has a nodeSelector Felix cannot parse",
             "Felix ignores the whole resource, so the settings meant for those nodes do not "
             "apply: fix the selector (Calico selector syntax) or delete the resource."),
        Rule("CALICO-POD-OUTSIDE-DAEMONSET", "medium",
             "calico-node pods run outside the calico-node DaemonSet felixscan found",
             "Find out why (a second DaemonSet per OS or node pool, a pod created by hand, a "
             "leftover of an install migration); remediation changes only the DaemonSet it "
             "found, so fix the others' configuration at their own source."),
        Rule("FELIX-CONFIG-SELECTOR-IGNORED", "info",
             "Selector-scoped FelixConfigurations are ignored by this Calico version",
             "Selector-scoped FelixConfiguration needs calico-node v3.32 or later; until the "
             "upgrade, put the setting in FelixConfiguration `default` or `node.<name>`."),
        Rule("NODE-NOT-VERIFIED", "medium",
             "The node could not be probed, so compliance is not proven",
             "Make the node's address reachable from the scanner (address type, routing, "
             "scanner placement) or run the scanner as an in-cluster agent; then scan again."),
        Rule("NODE-NO-CALICO-POD", "info",
             "No calico-node pod runs on the node",
             "Nothing to remediate for Felix; check why the DaemonSet does not schedule there."),
        Rule("FELIX-TLS-SELF-SIGNED", "info",
             "The metrics endpoint uses TLS with a self-signed certificate",
             "TLS without client authentication does not protect the endpoint; disable it."),
        Rule("CLUSTER-SCAN-FAILED", "high",
             "The cluster could not be scanned",
             "Fix what the evidence names (API reachability, credentials, RBAC), then scan again;"
             " until then the cluster's compliance is unknown."),
        Rule("FELIX-LISTENING-NOT-REACHABLE", "high",
             "The metrics port listens on the node but the scanner cannot reach it",
             "The endpoint is hidden from this vantage point, not closed: disable it in "
             "configuration (FELIX-METRICS-ENABLED) and check from the other networks too."),
        Rule("PORT-OPEN-NOT-ON-NODE", "high",
             "The metrics port answers, but nothing listens on it on the node itself",
             "Something forwards the port to another listener (a NAT or DNAT rule, a hostPort, "
             "a proxy): find it on the node (`iptables-save`, `nft list ruleset`) and remove it."),
        Rule("NODE-VIEW-MISSING", "low",
             "node-check's view of some nodes is missing",
             "Deploy deploy/overlays/node-check on every node (it tolerates every taint), give "
             "the scanner `list pods` and `get pods/log` in its namespace, and check its pods "
             "run; until then those verdicts rest on the configuration and the probe."),
        Rule("NODE-VIEW-STALE", "low",
             "node-check's view of some nodes is older than node_check.max_age_seconds",
             "Check that the node-check pods on those nodes are running and logging (one line "
             "per --interval); raise max_age_seconds only if the interval is longer."),
        Rule("TYPHA-METRICS-ENABLED", "high",
             "The Typha Prometheus metrics endpoint is enabled in configuration",
             "Disable it at the source that wins (see evidence): `kubectl -n <ns> set env "
             "deploy/calico-typha -c calico-typha TYPHA_PROMETHEUSMETRICSENABLED=false` (or "
             "`felixscan remediate`), wait for the rollout, then scan again."),
        Rule("TYPHA-PORT-REACHABLE", "critical",
             "Typha's metrics port is open on a node it runs on",
             "Disable the endpoint in configuration (TYPHA-METRICS-ENABLED) and, until then, "
             "deny port 9093 with a HostEndpoint and a GlobalNetworkPolicy (Calico docs: "
             "secure-metrics)."),
        Rule("TYPHA-CONFIG-UNRESOLVED", "high",
             "Typha's declared metrics setting could not be determined",
             "Make the winning source readable to the scanner (the ConfigMap or Secret named in "
             "the evidence, or the config file's volume), or keep one spelling of the parameter "
             "where the evidence names several (which one Typha takes is random), then scan "
             "again."),
        Rule("TYPHA-CONFIG-INVALID-VALUE", "low",
             "A Typha metrics setting holds a value Typha does not accept",
             "Typha logs the value as invalid and uses false, but a typo hides intent: set an "
             "explicit `false`."),
        Rule("TYPHA-OPERATOR-METRICS-PORT-SET", "high",
             "The operator Installation requests Typha metrics (spec.typhaMetricsPort)",
             "Remove `spec.typhaMetricsPort` from the Installation `default` (`kubectl patch "
             "installation default --type=json "
             "-p '[{\"op\":\"remove\",\"path\":\"/spec/typhaMetricsPort\"}]'`); the operator "
             "then renders Typha without metrics. An env edit on the Deployment would be "
             "reverted. Then scan again."),
        Rule("KUBE-CONTROLLERS-METRICS-ENABLED", "high",
             "The calico-kube-controllers Prometheus metrics endpoint is enabled",
             "Set `spec.prometheusMetricsPort: 0` on KubeControllersConfiguration `default` "
             "(`kubectl patch kubecontrollersconfiguration default --type=merge -p "
             "'{\"spec\":{\"prometheusMetricsPort\":0}}'`, or `felixscan remediate`); "
             "kube-controllers restarts itself on the change. Do not delete the field: a Calico "
             "client fills an absent port with 9094. Then scan again."),
        Rule("KUBE-CONTROLLERS-PORT-REACHABLE", "critical",
             "calico-kube-controllers serves unauthenticated metrics on its pod IP",
             "Disable the endpoint (KUBE-CONTROLLERS-METRICS-ENABLED) and, until then, deny "
             "port 9094 to the kube-controllers pod with a NetworkPolicy."),
        Rule("KUBE-CONTROLLERS-CONFIG-UNRESOLVED", "high",
             "calico-kube-controllers' declared metrics port could not be determined",
             "Let the scanner get KubeControllersConfiguration `default` (see the evidence for "
             "why it could not); where kube-controllers reads it from etcd "
             "(DATASTORE_TYPE=etcdv3), check its prometheusMetricsPort with `calicoctl get "
             "kubecontrollersconfiguration default -o yaml`. Then scan again."),
        Rule("KUBE-CONTROLLERS-METRICS-PORT-ABSENT", "low",
             "KubeControllersConfiguration default has no prometheusMetricsPort",
             "kube-controllers reads an absent port as 0 (off), but every update through a "
             "Calico client fills in 9094: set an explicit `prometheusMetricsPort: 0`."),
        Rule("CONTROL-NOT-CHECKED", "high",
             "A control could not be checked: its Calico component could not be read",
             "Grant the scanner read access named in the evidence (deploy/rbac), or fix the "
             "API error, then scan again; until then the control's compliance is unknown."),
        Rule("COMPONENT-NOT-INSTALLED", "info",
             "The Calico component of this control is not deployed in the cluster",
             "Nothing serves these metrics, so nothing to remediate. If the component runs "
             "under another name or namespace, set it under `calico:` in the configuration."),
        Rule("WAIVER-EXPIRED", "medium",
             "A waiver (accepted risk) has expired and no longer applies",
             "Fix what it waived, or have the risk approved again with a new expiry in the "
             "waivers file (reviewed like code); until then the failures it covered count."),
        Rule("WAIVER-INVALID", "medium",
             "A waiver (accepted risk) is malformed and does not apply",
             "Correct the entry named in the message: finding, cluster, reason, approved_by, "
             "created and expires are required, expires at most waiver_max_days after created."),
    )
}
SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}

_ENV_REF_FIX = (
    "The value comes from {ref} through the calico-node container's env: set it to `false` "
    "there, or replace the env entry with a literal `FELIX_PROMETHEUSMETRICSENABLED=false` "
    "(`felixscan remediate` does the latter); then `kubectl -n {namespace} rollout restart "
    "ds/{daemonset}`, wait for the rollout, and scan again."
)
_CONFIG_FILE_FIX = (
    "The value comes from Felix's config file ({ref}): set `PrometheusMetricsEnabled = false` "
    "there (or remove the key and disable it in FelixConfiguration), restart the calico-node "
    "pods (`kubectl -n {namespace} rollout restart ds/{daemonset}`), and scan again."
)
_ANNOTATION_FIX = (
    "FelixConfiguration `{name}` carries the annotation `{key}`, which overrides its spec "
    "field: set it to `false` or remove it together with the field (`kubectl annotate "
    "felixconfiguration {name} {key}-` and `kubectl patch felixconfiguration {name} "
    "--type=merge -p '{{\"spec\":{{\"prometheusMetricsEnabled\":false}}}}'`). Felix restarts "
    "inside the pod; no rollout is needed. Then scan again."
)
_NAMED_FC_FIX = (
    "Set `spec.prometheusMetricsEnabled: false` on FelixConfiguration `{name}` (`kubectl patch "
    "felixconfiguration {name} --type=merge -p "
    "'{{\"spec\":{{\"prometheusMetricsEnabled\":false}}}}'`). Felix restarts inside the pod; "
    "no rollout is needed. Then scan again."
)


def remediation_for(rule_id: str, *, install: Install, source: str | None = None,
                    namespace: str = "kube-system", daemonset: str = "calico-node",
                    container: str = "calico-node", operator_port: bool = False) -> str:
    """The remediation text for a finding, naming the source that actually won.

    An operator install is told to remove `nodeMetricsPort` only when the Installation sets it
    (that is what renders the env); a FelixConfiguration, an annotation, a ConfigMap behind the
    env or the config file gets its own fix.
    """
    rule = RULES[rule_id]
    if rule_id != "FELIX-METRICS-ENABLED":
        return rule.remediation.replace("<ns>", namespace)
    names = {"namespace": namespace, "daemonset": daemonset, "container": container}
    source = source or ""
    if source.startswith("FelixConfiguration "):
        rest = source[len("FelixConfiguration "):]
        name = rest.split(" ", 1)[0]
        if " annotation " in rest:
            key = rest.rsplit(" annotation ", 1)[1].split(" ", 1)[0]
            return _ANNOTATION_FIX.format(name=name, key=key)
        if name.startswith("("):  # the group could not be read: no name to give
            return _FELIXCONFIG_FIX.format()
        return _NAMED_FC_FIX.format(name=name)
    if source.startswith("config file "):
        ref = source[len("config file "):]
        return _CONFIG_FILE_FIX.format(ref=ref, **names)
    if install == "operator" or operator_port:
        if operator_port:
            return _OPERATOR_FIX.format()
        return ("The env entry is on an operator-managed DaemonSet, but the Installation sets "
                "no nodeMetricsPort: find the operator setting that renders it (an env edit "
                "would be reverted), then scan again.")
    if source.startswith("env ") and source.endswith(")") and "(" in source:
        ref = source[source.rindex("(") + 1:-1]
        if ref.startswith(("configmap ", "secret ", "envFrom ")):
            return _ENV_REF_FIX.format(ref=ref, **names)
    return _MANIFEST_FIX.format(**names)


_TYPHA_ENV_FIX = (
    "Set the env var on the Typha container: `kubectl -n {namespace} set env deploy/{deployment} "
    "-c {container} TYPHA_PROMETHEUSMETRICSENABLED=false` (or `felixscan remediate`), wait for "
    "`kubectl -n {namespace} rollout status deploy/{deployment}`, then scan again."
)
_TYPHA_FILE_FIX = (
    "The value comes from Typha's config file ({ref}): set `PrometheusMetricsEnabled = false` "
    "there, spelled exactly so (another spelling overrides the environment), restart Typha "
    "(`kubectl -n {namespace} rollout restart deploy/{deployment}`), and scan again."
)


def component_remediation(rule_id: str, *, control: str, install: Install,
                          source: str | None = None, namespace: str = "kube-system",
                          deployment: str = "", container: str = "",
                          operator_port: bool = False) -> str:
    """The remediation text of a Typha or kube-controllers finding, for the winning source."""
    rule = RULES[rule_id]
    if rule_id != "TYPHA-METRICS-ENABLED":
        return rule.remediation.replace("<ns>", namespace)
    names = {"namespace": namespace, "deployment": deployment or "calico-typha",
             "container": container or "calico-typha"}
    source = source or ""
    if operator_port:
        return RULES["TYPHA-OPERATOR-METRICS-PORT-SET"].remediation
    if source.startswith("config file "):
        return _TYPHA_FILE_FIX.format(ref=source[len("config file "):], **names)
    if install == "operator":
        return ("The env entry is on an operator-managed Deployment, but the Installation sets "
                "no typhaMetricsPort: find the operator setting that renders it (an env edit "
                "would be reverted), then scan again.")
    return _TYPHA_ENV_FIX.format(**names)
