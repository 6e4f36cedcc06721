"""Robust HTTP downloads of many survey files: resume, retries, bounded parallelism, SHA1 checks.

Survey archives are big (the APOGEE allStar is ~4 GB, a training set is thousands of spectra) and
connections drop, so every file is streamed to `<final>.part`, resumed with an HTTP Range request
when a `.part` is already there, verified against the survey's published SHA1 where there is one,
and only then renamed to its final name: a file under its final name is always complete.

    fetcher = Fetcher(workers=4, retries=5)
    results = fetcher.fetch_all([FileJob(url, dest, sha1=...), ...])
    print(format_summary(results))

A survey's download recipe gets a Fetcher and returns a `Report` of what happened to every file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from stellarlab.errors import CommandInterrupted

log = logging.getLogger("stellarlab.download.command")

PART_SUFFIX = ".part"
DOWNLOADED, PRESENT, FAILED, PLANNED = "downloaded", "present", "failed", "planned"
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileJob:
    """One file to fetch: where from, where to, and the SHA1 the survey publishes for it (if any)."""

    url: str
    dest: Path
    sha1: str | None = None

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + PART_SUFFIX)


@dataclass
class FileResult:
    job: FileJob
    status: str  # downloaded | present | failed | planned
    reason: str = ""  # why it failed, or a note (e.g. "resumed at 1.2 MB")
    nbytes: int = 0  # bytes received over the network for this file
    verified: bool = False  # SHA1 checked against a published sum
    attempts: int = 0


class FetchError(Exception):
    """A download failed for good (after the retries, or at once for a 404/403)."""


class _Retryable(Exception):
    """A failure worth another attempt (dropped connection, 5xx, bad checksum); `wait`: the server's Retry-After."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class _Permanent(FetchError):
    """A failure no retry will fix (404, 403, ...)."""


class Interrupted(Exception):
    """Raised inside workers once the user pressed Ctrl-C: stop streaming, keep the `.part`."""


def sha1_file(path: Path, chunk: int = _CHUNK) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_sha1sums(text: str) -> dict[str, str]:
    """`sha1sum` output (`<hex>  <name>` or `<hex> *<name>`) -> {basename: hex}. Other lines are ignored."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 40:
            continue
        digest, name = parts
        try:
            int(digest, 16)
        except ValueError:
            continue
        name = name.strip().lstrip("*")
        sums[name.rsplit("/", 1)[-1]] = digest.lower()
    return sums


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 1000); `bytes */1000` -> (None, 1000); unknown parts are None."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = int(span.split("-")[0]) if span and span != "*" and span.split("-")[0].isdigit() else None
    return start, int(total) if total.isdigit() else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Fetcher:
    """Downloads files over HTTP(S) with resume, retries with exponential backoff and SHA1 checks.

    `workers` bounds the parallel connections (a courtesy to the survey's server); `retries` is the
    number of extra attempts per file after a failure. An attempt that grows the `.part` beyond
    anything received before does not use up a retry, so a long file over a flaky line still arrives.
    """

    def __init__(
        self,
        *,
        workers: int = 4,
        retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        timeout: float = 60.0,
        verify: bool = True,
        progress: bool = True,
        user_agent: str = "stellarlab-download",
    ):
        from stellarlab.checks import check_values
        from stellarlab.download.options import DownloadOptions  # the rules of the command's download.* options

        check_values(DownloadOptions, {"workers": workers, "retries": retries, "backoff": backoff, "backoff_max": backoff_max,
                                       "timeout": timeout, "verify": verify, "progress": progress}, "download")
        self.workers, self.retries = int(workers), int(retries)
        self.backoff, self.backoff_max = float(backoff), float(backoff_max)
        self.verify, self.progress = bool(verify), bool(progress)
        self.client = httpx.Client(
            timeout=httpx.Timeout(float(timeout)),
            limits=httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers),
            follow_redirects=True,
            # identity: the bytes on disk must be the file's bytes, and Range offsets must mean file offsets
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
        )
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ small text files (sums)
    def fetch_text(self, url: str) -> str | None:
        """GET a small text file (a sums list) with the same retries; None when the server says 404/410."""
        last = ""
        for attempt in range(self.retries + 1):
            self._check_stop()
            try:
                response = self.client.get(url)
                if response.status_code in (404, 410):
                    return None
                if response.status_code in _RETRY_STATUS:
                    raise _Retryable(f"HTTP {response.status_code}", _retry_after(response))
                if response.status_code >= 400:
                    raise _Permanent(f"HTTP {response.status_code} {response.reason_phrase}")
                return response.text
            except (httpx.TransportError, _Retryable) as err:
                last = _describe(err)
                if attempt < self.retries:
                    self._sleep(self._delay(attempt, getattr(err, "wait", None)), url, last, attempt + 1)
        raise _Permanent(f"{last} (after {self.retries + 1} attempts)")

    def fetch_first_texts(self, candidates: Sequence[Sequence[str]]) -> list[tuple[str | None, str | None, str | None]]:
        """For each list of candidate URLs, `(url, text, None)` for the first that exists, `(None, None, None)`
        when none exists, `(url, None, reason)` when one could not be fetched; `workers` at a time.

        Used for the sums files, whose exact name varies between directories of one survey."""

        def first(urls: Sequence[str]) -> tuple[str | None, str | None, str | None]:
            for url in urls:
                try:
                    text = self.fetch_text(url)
                except FetchError as err:
                    return url, None, str(err)
                if text is not None:
                    return url, text, None
            return None, None, None

        if not candidates:
            return []
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sums") as pool:
            try:
                return list(pool.map(first, candidates))
            except (KeyboardInterrupt, CommandInterrupted):
                self._stop.set()  # the workers give up at their next request
                raise

    # ------------------------------------------------------------------ files
    def fetch(self, job: FileJob, on_bytes: Callable[[int], None] | None = None,
              on_start: Callable[[int | None, int], None] | None = None) -> FileResult:
        """Fetch one file to `job.dest`; network trouble is reported in the result, never raised.

        `on_bytes(n)` is called per chunk received, `on_start(total, offset)` when a response starts."""
        job.dest.parent.mkdir(parents=True, exist_ok=True)
        if job.dest.exists():
            # only complete, verified files ever get the final name: trust it without a network round trip
            return FileResult(job, PRESENT)
        want_sha1 = job.sha1.lower() if (job.sha1 and self.verify) else None
        received = 0
        high_water = job.part.stat().st_size if job.part.exists() else 0
        resumed_from = high_water
        failures = attempts = 0
        while True:
            attempts += 1
            try:
                self._check_stop()
                received += self._attempt(job, want_sha1, on_bytes, on_start)
                os.replace(job.part, job.dest)
                note = f"resumed at {human_bytes(resumed_from)}" if resumed_from else ""
                return FileResult(job, DOWNLOADED, note, received, verified=want_sha1 is not None, attempts=attempts)
            except Interrupted:
                return FileResult(job, FAILED, "interrupted (the .part file is kept: run again to resume)", received, attempts=attempts)
            except _Permanent as err:
                return FileResult(job, FAILED, str(err), received, attempts=attempts)
            except (_Retryable, httpx.TransportError) as err:
                received += getattr(err, "nbytes", 0)
                size = job.part.stat().st_size if job.part.exists() else 0
                # a dropped connection that still brought new bytes is progress, not a failure
                progressed = size > high_water and not isinstance(err, _ChecksumError)
                high_water = 0 if isinstance(err, _ChecksumError) else max(high_water, size)
                failures += not progressed
                reason = _describe(err)
                if failures > self.retries:
                    return FileResult(job, FAILED, f"{reason} (after {attempts} attempts)", received, attempts=attempts)
                if progressed:
                    log.info("%s: %s; resuming at %s", job.url, reason, human_bytes(size))
                    delay = 0.0
                else:
                    delay = self._delay(failures - 1, getattr(err, "wait", None))
                    log.warning("%s: %s; retry %d/%d in %.1f s", job.url, reason, failures, self.retries, delay)
                if self._stop.wait(delay):
                    return FileResult(job, FAILED, "interrupted (the .part file is kept: run again to resume)", received, attempts=attempts)
            except OSError as err:  # disk full, permission denied: no retry helps
                return FileResult(job, FAILED, f"cannot write {job.part}: {err}", received, attempts=attempts)

    def _attempt(self, job: FileJob, want_sha1: str | None, on_bytes, on_start) -> int:
        """One GET (ranged when a `.part` exists) streamed into the `.part`, then verified; returns bytes received.

        Raises _PartialProgress (carrying the bytes received) when the transfer stops short."""
        offset = job.part.stat().st_size if job.part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        received = 0
        with self.client.stream("GET", job.url, headers=headers) as response:
            status = response.status_code
            if status == 416 and offset:
                _, total = _content_range(response.headers.get("Content-Range"))
                if total is not None and total == offset:
                    self._finish(job, want_sha1, 0)  # the .part was already complete
                    return 0
                job.part.unlink()
                raise _Retryable(f"the server cannot resume at byte {offset} (HTTP 416); starting over")
            if status in (404, 410):
                raise _Permanent(f"not found on the server (HTTP {status}): {job.url}")
            if status in _RETRY_STATUS:
                wait = _retry_after(response)
                raise _Retryable(f"HTTP {status}" + (f" (the server asks to wait {wait:.0f} s)" if wait else ""), wait)
            if status >= 400:
                raise _Permanent(f"HTTP {status} {response.reason_phrase} for {job.url}")
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    job.part.unlink()
                    raise _Retryable(f"the server resumed at byte {start}, not {offset}; starting over")
                if total is None and length is not None:
                    total = offset + length
                mode = "ab"
            else:  # 200: a fresh download, or a server that ignores Range: start again from byte 0
                if offset:
                    log.info("%s: the server ignored the Range request; downloading from the start", job.url)
                offset, mode, total = 0, "wb", length
            if on_start is not None:
                on_start(total, offset)
            try:
                with open(job.part, mode) as f:
                    for chunk in response.iter_bytes():  # no chunk_size: httpx would hold back a partial chunk on a drop
                        self._check_stop()
                        f.write(chunk)
                        received += len(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
            except httpx.TransportError as err:
                raise _PartialProgress(_describe(err), received) from err
        size = job.part.stat().st_size
        if total is not None and size != total:
            if size > total:
                job.part.unlink()
            raise _PartialProgress(f"the transfer stopped after {size} of {total} bytes", received)
        self._finish(job, want_sha1, received)
        return received

    def _finish(self, job: FileJob, want_sha1: str | None, received: int) -> None:
        """Verify a complete `.part`; a wrong SHA1 deletes it, so the retry starts clean."""
        if want_sha1 is not None:
            got = sha1_file(job.part)
            if got != want_sha1:
                job.part.unlink()
                raise _ChecksumError(f"SHA1 mismatch: expected {want_sha1}, got {got}", received)
        with open(job.part, "rb+") as f:  # the bytes are on disk before the file gets its final name
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ many files
    def fetch_all(self, jobs: Sequence[FileJob], desc: str = "files") -> list[FileResult]:
        """Fetch `jobs` with at most `workers` at once; results in job order.

        One job shows a byte progress bar, several a file-count bar. Ctrl-C or SIGTERM stops the
        workers at the next chunk, keeps their `.part` files and re-raises."""
        if not jobs:
            return []
        results: list[FileResult | None] = [None] * len(jobs)
        single = len(jobs) == 1
        bar = tqdm(
            total=None if single else len(jobs),
            desc=jobs[0].dest.name if single else desc,
            unit="B" if single else "file",
            unit_scale=single,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        got = {"bytes": 0, "failed": 0}

        def on_bytes(n: int) -> None:
            with self._lock:
                got["bytes"] += n
                if single:
                    bar.update(n)

        def on_start(total: int | None, offset: int) -> None:
            if single:
                bar.reset(total=total)
                bar.update(offset)

        try:
            if single:
                return [self.fetch(jobs[0], on_bytes, on_start)]
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fetch") as pool:
                futures = {pool.submit(self.fetch, job, on_bytes): i for i, job in enumerate(jobs)}
                try:
                    for future in as_completed(futures):
                        result = future.result()
                        results[futures[future]] = result
                        with self._lock:
                            got["failed"] += result.status == FAILED
                            bar.set_postfix_str(f"{human_bytes(got['bytes'])}, {got['failed']} failed", refresh=False)
                            bar.update(1)
                except (KeyboardInterrupt, CommandInterrupted):
                    self._stop.set()  # workers stop at their next chunk and keep their .part files
                    for future in futures:
                        future.cancel()
                    raise
            return results  # type: ignore[return-value]
        finally:
            bar.close()

    # ------------------------------------------------------------------ helpers
    def _delay(self, failures: int, server_wait: float | None = None) -> float:
        """Exponential backoff, or longer when the server asked (Retry-After), never above backoff_max."""
        return min(self.backoff_max, max(self.backoff * 2**failures, server_wait or 0.0))

    def _sleep(self, delay: float, url: str, reason: str, attempt: int) -> None:
        log.warning("%s: %s; retry %d/%d in %.1f s", url, reason, attempt, self.retries, delay)
        if self._stop.wait(delay):
            raise Interrupted()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise Interrupted()


class _PartialProgress(_Retryable):
    """The transfer stopped short; `nbytes` were received (and kept in the `.part`) first."""

    def __init__(self, message: str, nbytes: int = 0):
        super().__init__(message)
        self.nbytes = nbytes


class _ChecksumError(_PartialProgress):
    """The file arrived whole but its SHA1 is not the published one (the `.part` is deleted)."""


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, httpx.TimeoutException):
        return f"timed out ({type(err).__name__})"
    if isinstance(err, httpx.ConnectError):
        return f"cannot connect: {text}"
    if isinstance(err, httpx.TransportError):
        return f"connection error: {text}"
    return text


# ---------------------------------------------------------------------- summary
def count(results: Iterable[FileResult], status: str) -> int:
    return sum(r.status == status for r in results)


def format_summary(results: Sequence[FileResult], root: Path | None = None, title: str = "download summary") -> str:
    """Plain text for the terminal: counts, bytes, verification, then every failure with its reason."""

    def name(r: FileResult) -> str:
        if root is not None:
            try:
                return str(r.job.dest.relative_to(root))
            except ValueError:
                pass
        return str(r.job.dest)

    done = [r for r in results if r.status == DOWNLOADED]
    failed = [r for r in results if r.status == FAILED]
    planned = [r for r in results if r.status == PLANNED]
    nbytes = sum(r.nbytes for r in results)
    lines = [
        f"{title}: {len(done)} downloaded ({human_bytes(nbytes)}), "
        f"{count(results, PRESENT)} already present, {len(failed)} failed"
        + (f", {len(planned)} to download (dry run)" if planned else "")
    ]
    if done:
        verified = sum(r.verified for r in done)
        resumed = sum(r.reason.startswith("resumed") for r in done)
        lines.append(f"  checksum verified: {verified} of {len(done)} downloaded (the others have no published sum)"
                     + (f"; {resumed} resumed from a .part file" if resumed else ""))
    if failed:
        lines.append("failed:")
        lines += [f"  {name(r)}: {r.reason}" for r in failed]
    return "\n".join(lines)


@dataclass
class Report:
    """What a download did (a survey recipe returns one): one result per file, and the folder their names are relative to."""

    results: list[FileResult] = field(default_factory=list)
    root: Path | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == FAILED]

    def summary(self) -> str:
        took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
        return "\n".join([*self.notes, format_summary(self.results, self.root, title=f"download summary{took}")])
