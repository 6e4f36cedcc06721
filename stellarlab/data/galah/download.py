"""galah4's download recipe: `python -m stellarlab.download data=galah`.

Fetches the `simbaswe/galah4` arrays (download.galah4.files) from the Hugging Face Hub into data.root,
where GALAH4DataModule reads them. The official DR4 release has no recipe: its spectra come from Data
Central's bulk download service.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from stellarlab.download.fetch import DOWNLOADED, FAILED, PLANNED, PRESENT, Fetcher, FileJob, FileResult, Report

log = logging.getLogger(__name__)


def download(cfg: DictConfig, fetcher: Fetcher) -> Report:
    """The galah4 arrays from Hugging Face, through huggingface_hub (not `fetcher`), into data.root.

    huggingface_hub streams each file to a temporary file and resumes a dropped connection itself;
    it downloads into `<root>/.hf-download/`, the file is checked here against the SHA256 the Hub
    publishes for it (the ETag of LFS files), and only then moved to its final name."""
    import huggingface_hub as hub

    opts, hf = cfg.download, cfg.download.galah4
    root = Path(str(cfg.data.root)).expanduser()
    report = Report(root=root)
    if not opts.progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    endpoint = str(hf.endpoint).rstrip("/")
    for name in [str(f) for f in hf.files]:
        url = hub.hf_hub_url(str(hf.repo_id), name, repo_type=str(hf.repo_type), revision=str(hf.revision), endpoint=endpoint)
        job = FileJob(url, root / name)
        if job.dest.exists():
            report.results.append(FileResult(job, PRESENT))
        elif opts.dry_run:
            report.results.append(FileResult(job, PLANNED))
            report.notes.append(f"dry run: {url} -> {job.dest}")
        else:
            report.results.append(_hub_fetch(job, name, hf, endpoint, opts, root / ".hf-download"))
    staging = root / ".hf-download"
    if staging.exists() and not any(p.is_file() for p in staging.iterdir()):
        shutil.rmtree(staging, ignore_errors=True)  # only huggingface_hub's bookkeeping is left
    return report


def _hub_fetch(job: FileJob, name: str, hf: DictConfig, endpoint: str, opts: DictConfig, staging: Path) -> FileResult:
    """One file through huggingface_hub, with the command's retries and backoff around it."""
    import huggingface_hub as hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    retries, reason = int(opts.retries), ""
    for attempt in range(1, retries + 2):
        try:
            path = Path(hub.hf_hub_download(
                str(hf.repo_id), name, repo_type=str(hf.repo_type), revision=str(hf.revision),
                local_dir=staging, endpoint=endpoint, etag_timeout=float(opts.timeout),
            ))
            verified = False
            if opts.verify:
                etag = (hub.get_hf_file_metadata(job.url, timeout=float(opts.timeout)).etag or "").lower()
                if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):  # LFS: the ETag is the SHA256
                    got = _sha256(path)
                    if got != etag:
                        path.unlink()
                        raise _HubChecksumError(f"SHA256 mismatch: expected {etag}, got {got}")
                    verified = True
            job.dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, job.dest)
            return FileResult(job, DOWNLOADED, "", job.dest.stat().st_size, verified, attempt)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
            return FileResult(job, FAILED, f"not found on the Hub ({type(err).__name__}): {job.url}", attempts=attempt)
        except Exception as err:  # noqa: BLE001 -- network, HTTP and checksum trouble all get the retries
            text = str(err).splitlines()[0] if str(err) else ""
            reason = text if isinstance(err, _HubChecksumError) else f"{type(err).__name__}: {text}"
            if attempt <= retries:
                delay = min(float(opts.backoff_max), float(opts.backoff) * 2 ** (attempt - 1))
                log.warning("%s: %s; retry %d/%d in %.1f s", job.url, reason, attempt, retries, delay)
                time.sleep(delay)
    return FileResult(job, FAILED, f"{reason} (after {retries + 1} attempts)", attempts=retries + 1)


class _HubChecksumError(Exception):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
