"""Emulated Kubernetes API servers and Calico clusters for tests and `felixscan demo`.

`KubeEmulator` serves the Kubernetes REST API over real HTTP(S) to the real `kubernetes` client;
`build_calico_cluster` fills one with a Calico install; `add_typha` and `add_kube_controllers`
add Typha and calico-kube-controllers to it (`ComponentHandle`); `certs` makes throw-away TLS
material.
"""

from scanner.emulator.apiserver import (
    ApiError,
    Change,
    Fault,
    KubeEmulator,
    RecordedRequest,
    ResourceType,
    write_kubeconfig,
)
from scanner.emulator.certs import make_self_signed, write_pem_files
from scanner.emulator.components import ComponentHandle, add_kube_controllers, add_typha
from scanner.emulator.fleet import (
    ClusterHandle,
    NodeSpec,
    build_calico_cluster,
    find_fixture,
    make_nodes,
)

__all__ = [
    "ApiError",
    "Change",
    "ClusterHandle",
    "ComponentHandle",
    "Fault",
    "KubeEmulator",
    "NodeSpec",
    "RecordedRequest",
    "ResourceType",
    "add_kube_controllers",
    "add_typha",
    "build_calico_cluster",
    "find_fixture",
    "make_nodes",
    "make_self_signed",
    "write_kubeconfig",
    "write_pem_files",
]
