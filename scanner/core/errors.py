"""felixscan's own error tree. Library errors are wrapped here (`raise ... from exc`).

Only the application layer turns these into messages and exit codes (the mapping is
`scanner.app.exitcodes.for_error`, shown here in brackets)::

    FelixscanError                      [2]
    ├── ConfigError                     bad config file, kubeconfig or flag [2]
    ├── StoreError                      database unreachable, migration missing or failed [4]
    │   ├── SchemaMismatch              database revision differs from the code's head
    │   └── LockLost                    a cluster's lock was lost while held: nothing stored
    ├── ClusterError                    one cluster could not be scanned (stored as ERROR) [3]
    │   ├── ApiError                    the API answered with an error status or garbage
    │   │   └── ApiForbidden            401/403: credentials or RBAC
    │   ├── ApiUnreachable              connection refused, TLS failure, timeout, deadline
    │   └── CalicoNotFound              no calico-node DaemonSet where expected
    ├── ReportError                     a report cannot be made (empty period, unknown cluster) [2]
    │   └── SigningError                key, passphrase, certificate or TSA unusable: not signed
    └── RemediationError                remediation could not run or finish [1]
        └── RemediationRefused          a guard, the plan or the operator said no [2]
"""

from __future__ import annotations


class FelixscanError(Exception):
    """Base of every error felixscan raises on purpose."""


class ConfigError(FelixscanError):
    """The configuration (file, kubeconfig, flags or environment) is not usable."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        self.source = source
        self.key = key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class StoreError(FelixscanError):
    """The results database cannot be used."""


class LockLost(StoreError):
    """A lock was lost while held: another process may hold it now, so nothing is stored
    under it (the result is not stored: exit 4)."""


class SchemaMismatch(StoreError):
    """The database schema is not at the revision this version of felixscan needs."""


class ClusterError(FelixscanError):
    """One cluster could not be scanned; the scan stores it as an error and goes on."""


class ApiError(ClusterError):
    """The Kubernetes API answered, but with an error status or a body that is not valid."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ApiForbidden(ApiError):
    """The API refused the credentials (401) or the permission (403)."""


class ApiUnreachable(ClusterError):
    """The API could not be reached in time: refused, TLS failure, timeout or deadline."""


class CalicoNotFound(ClusterError):
    """The calico-node DaemonSet is not where the configuration or auto-detection looked."""


class ReportError(FelixscanError):
    """A report cannot be produced from what the database holds."""


class SigningError(ReportError):
    """A PDF could not be signed (unreadable or wrong key material, a refused input, a TSA
    failure), or a trust root for verifying one cannot be read. Messages never contain a
    passphrase or key material, and name the file concerned."""


class RemediationError(FelixscanError):
    """Remediation could not run or finish; what was changed is recorded in the database."""


    def __init__(self, message: str, *, action_id: int | None = None) -> None:
        self.action_id = action_id
        super().__init__(message)


class RemediationRefused(RemediationError):
    """A guard (enabled, window, rollout, NotReady share), the plan or the prompt said no.

    Nothing was changed in the cluster.
    """

