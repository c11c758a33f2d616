"""Report downloads of `felixscan serve`: `ReportCache` renders a report once per data hash and
serves the file after that; with `report.signing` configured, every PDF it serves is signed.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from reports.integrity import canonical_json, report_data, report_hash
from reports.render import render_html, render_pdf
from scanner.core.config import SigningSettings
from scanner.core.errors import ConfigError, SigningError
from scanner.db.queries.history import load_report
from scanner.db.store import Store

if TYPE_CHECKING:
    from reports.signing import SignerInfo

log = logging.getLogger(__name__)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# --- report downloads ----------------------------------------------------------------------


def _layout_pdf(html: str, raw: bytes) -> bytes:
    """In the child process: the PDF of a rendered report."""
    return render_pdf(html, attachment_json=raw)


@dataclass(frozen=True, slots=True)
class CachedReport:
    path: Path
    format: str
    sha256: str  # the integrity hash printed in (and embedded into) the report
    data_key: str  # the hash of the report data without its generation time: the cache key
    cached: bool  # served from the cache, not rendered for this request
    # The report's file, open: another request's eviction may unlink `path` at any time, the
    # open file stays readable. The caller closes it.
    file: BinaryIO
    size: int
    signed: bool = False  # a PDF with a PAdES signature (`report.signing`)

    def close(self) -> None:
        self.file.close()


class ReportCache:
    """Reports rendered on demand and kept by data hash: the same data is rendered once.

    The key is the SHA-256 of the report data without `generated_at`, so a report is made
    again exactly when a scan in its period changes. File names are made here from hex digests
    only; nothing a request sends ever becomes part of a path.
    """

    def __init__(self, directory: Path, *, entries: int = 64, parallel: int = 2,
                 signing: SigningSettings | None = None,
                 environ: Mapping[str, str] | None = None,
                 preparer: str | None = None, owner: str | None = None) -> None:
        self.signing = signing
        self.preparer, self.owner = preparer, owner  # on every report's cover
        self._environ = environ  # where `signing.passphrase_env` is looked up (os.environ)
        self._signer: SignerInfo | None = None
        if signing is not None:
            from reports.signing import check_signing  # pyHanko: only when signing

            # At start-up, not at the first download: a wrong passphrase or an expired
            # certificate stops `serve` with a clear message (SigningError, exit 2).
            self._signer = check_signing(signing, environ=environ)
            log.info("PDF downloads are signed by %s%s", self._signer.subject,
                     ", timestamped" if signing.tsa_url else "")
        self.directory = directory
        self.entries = entries
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
        # Files here are served as reports: nobody else may be able to put one there (a
        # directory in a shared /tmp could have been made by another user first).
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ConfigError(f"{directory} must belong to this user and be writable by no one "
                              "else", key="serve.report_cache_dir")
        self.parallel = parallel
        self._renders = threading.BoundedSemaphore(parallel)  # PDF layout is CPU and memory
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._keys: dict[str, threading.Lock] = {}
        self._keys_lock = threading.Lock()

    def get(self, store: Store, *, clusters: Sequence[str], since: date, until: date,
            fmt: str, now: datetime | None = None) -> CachedReport:
        """The report, its file open (the caller closes it); raises ReportError (unknown
        cluster, empty period) like the CLI."""
        data = replace(load_report(store, clusters=clusters, since=since, until=until, now=now),
                       preparer=self.preparer, owner=self.owner)
        key = hashlib.sha256(canonical_json(replace(data, generated_at=_EPOCH))).hexdigest()
        signer = self._signer if fmt == "pdf" else None
        if signer is not None:
            # Signed and unsigned copies (and copies by another signer) never share a file,
            # so turning signing on or changing the key takes effect in a cache kept on disk.
            key = hashlib.sha256(f"{key} signed-by {signer.fingerprint}".encode()).hexdigest()
        signed = signer is not None
        with self._key_lock(key):
            hit = self._open(key, fmt)
            if hit is not None:
                return replace(hit, signed=signed)
            with self._renders:
                raw = canonical_json(data)
                digest = report_hash(raw)
                # from the hashed bytes, as build_report does: `report verify` renders the
                # same pages again from the file
                html = render_html(report_data(raw), digest=digest)
                body = self._pdf(html, raw) if fmt == "pdf" else html.encode("utf-8")
                if signed:
                    body = self._sign(body, digest)
            path = self.directory / f"{key}.{digest}.{fmt}"
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".render-")
            # Opened before it gets its name: once named, another request may evict it.
            fh = os.fdopen(fd, "w+b")
            try:
                fh.write(body)
                fh.flush()
                fh.seek(0)
                os.replace(tmp, path)
            except BaseException:
                fh.close()
                Path(tmp).unlink(missing_ok=True)
                raise
        try:
            self._evict()
        except BaseException:
            fh.close()
            raise
        log.info("rendered %s report %s (%d bytes)", fmt, digest[:12], len(body))
        return CachedReport(path, fmt, digest, key, cached=False, file=fh, size=len(body),
                            signed=signed)

    def _sign(self, pdf: bytes, digest: str) -> bytes:
        # In this thread, not the layout child: signing a laid-out PDF is short next to the
        # layout, and the key material then never crosses a process boundary.
        from reports.signing import sign_report

        assert self.signing is not None
        try:
            return sign_report(pdf, signing=self.signing, environ=self._environ)
        except SigningError as exc:
            log.error("cannot sign report %s: %s", digest[:12], exc)
            raise

    def _pdf(self, html: str, raw: bytes) -> bytes:
        # PDF layout runs in a fresh child process per report: WeasyPrint holds the GIL for
        # seconds (the pages would stall meanwhile) and keeps tens of MB after a large report;
        # the child returns both to the system when it exits.
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.parallel, mp_context=multiprocessing.get_context("spawn"),
                    max_tasks_per_child=1)
            pool = self._pool
        return pool.submit(_layout_pdf, html, raw).result()

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def _key_lock(self, key: str) -> threading.Lock:
        with self._keys_lock:
            return self._keys.setdefault(key, threading.Lock())

    def _open(self, key: str, fmt: str) -> CachedReport | None:
        """The cached report, opened; None when there is none (or it was evicted meanwhile)."""
        for path in self.directory.glob(f"{key}.*.{fmt}"):
            try:
                fh = path.open("rb")
            except FileNotFoundError:
                continue
            os.utime(fh.fileno())  # most recently used: evicted last
            return CachedReport(path, fmt, path.name.split(".")[1], key, cached=True,
                                file=fh, size=os.fstat(fh.fileno()).st_size)
        return None

    def _evict(self) -> None:
        # Other requests evict and rename at the same time: a file may go between the listing
        # and its stat.
        files = sorted(((mtime, p) for p in self.directory.iterdir()
                        if not p.name.startswith(".") and (mtime := _mtime(p)) is not None),
                       reverse=True)
        for _, old in files[self.entries:]:
            old.unlink(missing_ok=True)
        # Temporary files of a render killed half-way.
        cutoff = time.time() - 3600
        for tmp in self.directory.glob(".render-*"):
            mtime = _mtime(tmp)
            if mtime is not None and mtime < cutoff:
                tmp.unlink(missing_ok=True)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None
