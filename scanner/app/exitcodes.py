"""felixscan's exit codes: the one place they are defined, and how errors and library
statuses map onto them. Only the application layer (`scanner.app`) exits; the library returns
statuses (`ScanOutcome.status`, `RemediationResult.done`) and raises the errors of
`scanner.core.errors`.
"""

from __future__ import annotations

from enum import IntEnum

from scanner.core.errors import (
    ClusterError,
    ConfigError,
    FelixscanError,
    RemediationError,
    RemediationRefused,
    ReportError,
    StoreError,
)


class ExitCode(IntEnum):
    OK = 0  # compliant; or the command did what it was asked
    NON_COMPLIANT = 1  # a cluster is non-compliant; a report does not verify; remediation failed
    USAGE = 2  # usage or configuration error; remediation refused; a report cannot be made
    CLUSTER_ERROR = 3  # a cluster could not be scanned (and none is non-compliant)
    STORE = 4  # the database cannot be used or a result was not stored (wins over 1 and 3)
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODES = (
    "Exit codes: 0 all compliant, 1 at least one non-compliant, 2 usage or configuration error, "
    "3 at least one cluster could not be scanned (none non-compliant), 4 the results database "
    "cannot be used or a result could not be stored (this wins over 1 and 3: the record is "
    "incomplete). A cluster whose only failures are waived by waivers in force counts as "
    "compliant.")

_SCAN = {"compliant": ExitCode.OK, "non_compliant": ExitCode.NON_COMPLIANT,
         "error": ExitCode.CLUSTER_ERROR, "not_stored": ExitCode.STORE}


def for_scan(status: str) -> ExitCode:
    """A scan run's status (`scanner.scan.ScanOutcome.status`)."""
    return _SCAN[status]


def for_error(exc: FelixscanError) -> ExitCode:
    """The exit code of an error that ended a command, most specific class first."""
    if isinstance(exc, ConfigError | ReportError | RemediationRefused):
        return ExitCode.USAGE
    if isinstance(exc, StoreError):
        return ExitCode.STORE
    if isinstance(exc, ClusterError):
        return ExitCode.CLUSTER_ERROR
    if isinstance(exc, RemediationError):
        return ExitCode.NON_COMPLIANT
    return ExitCode.USAGE
