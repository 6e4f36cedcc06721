"""Download a survey's files into the folders the `data` config reads.

    python -m stellarlab.download data=apogee data.cuts.preset=rgb download.max_stars=5000
    python -m stellarlab.download data=galah
    python -m stellarlab.download data=apogee download.dry_run=true    # what would be fetched

APOGEE: fetches the allStar catalogue (data.catalog), applies data.cuts exactly as training does,
then fetches the spectra (data.source) of the stars that pass into data.spectra_dir, checking each
against the SHA1 list SDSS keeps in its folder. GALAH: fetches the galah4 arrays from Hugging Face
into data.root. Files already present are skipped; `.part` files are resumed. Exit status: 0 when
every file is in place, 1 when some failed (listed in the summary), 2 for a config or data error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stellarlab.download.fetch import (
    DOWNLOADED,
    FAILED,
    PLANNED,
    PRESENT,
    Fetcher,
    FileJob,
    FileResult,
    format_summary,
    parse_sha1sums,
)
from stellarlab.errors import ConfigError, StellarlabError

log = logging.getLogger("stellarlab.download.command")


@dataclass
class Report:
    """What a download did: one result per file, and the folder their names are relative to."""

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


def _fetcher(opts: DictConfig) -> Fetcher:
    for key in ("workers",):
        if int(opts[key]) < 1:
            raise ConfigError(f"download.{key} must be >= 1, got {opts[key]}")
    for key in ("retries", "backoff", "backoff_max"):
        if float(opts[key]) < 0:
            raise ConfigError(f"download.{key} must be >= 0, got {opts[key]}")
    if float(opts.timeout) <= 0:
        raise ConfigError(f"download.timeout must be > 0 seconds, got {opts.timeout}")
    return Fetcher(
        workers=int(opts.workers),
        retries=int(opts.retries),
        backoff=float(opts.backoff),
        backoff_max=float(opts.backoff_max),
        timeout=float(opts.timeout),
        verify=bool(opts.verify),
        progress=bool(opts.progress),
    )


def survey_of(data: DictConfig) -> str:
    """Which download recipe a `data` config needs: apogee, galah4, or synthetic (nothing to fetch)."""
    target = str(data.get("_target_", ""))
    if "catalog" in data and "spectra_dir" in data:
        return "apogee"
    if "galah4" in target.lower():
        return "galah4"
    if "synthetic" in target.lower():
        return "synthetic"
    raise ConfigError(
        f"the download command has no recipe for this data config ({target or 'no _target_'}); "
        "it fetches data=apogee (allStar + spectra) and data=galah (the galah4 arrays)"
    )


# ---------------------------------------------------------------------------------------- APOGEE
def download_apogee(cfg: DictConfig, fetcher: Fetcher) -> Report:
    from stellarlab.data import apogee_catalog as cat  # numpy + astropy

    data, opts = cfg.data, cfg.download
    source = str(data.source)
    if source not in cat.SOURCES:
        raise ConfigError(f"data.source={source!r} is unknown; valid sources: {', '.join(cat.SOURCES)}")
    max_stars = opts.max_stars
    if max_stars is not None and int(max_stars) < 1:
        raise ConfigError(f"download.max_stars must be >= 1 or null (all stars), got {max_stars}")
    # checked before anything is fetched: a typo must not cost a 4 GB download
    cuts = data.get("cuts")
    cuts = OmegaConf.to_container(cuts, resolve=True) if OmegaConf.is_config(cuts) else cuts
    try:
        resolved = cat.resolved_cuts(cuts)
    except (TypeError, ValueError) as err:
        if isinstance(err, StellarlabError):
            raise
        raise ConfigError(
            f"data.cuts={cuts!r} is not a set of cuts ({err}); give its keys, e.g. data.cuts.preset=rgb "
            "data.cuts.snr_min=70 (see conf/data/apogee.yaml)"
        ) from err
    cat.bit_value(resolved["aspcapflag_bits"], cat.ASPCAPFLAG_BITS, "data.cuts.aspcapflag_bits")
    cat.bit_value(resolved["starflag_bits"], cat.STARFLAG_BITS, "data.cuts.starflag_bits")
    catalog = Path(str(data.catalog)).expanduser()
    spectra_dir = Path(str(data.spectra_dir)).expanduser()
    report = Report(root=catalog.parent if catalog.parent == spectra_dir.parent else None)

    # 1. the catalogue
    base = str(opts.apogee.catalog_base_url).rstrip("/")
    sums = OmegaConf.to_container(opts.apogee.catalog_sha1) if opts.apogee.get("catalog_sha1") else {}
    cat_job = FileJob(f"{base}/{catalog.name}", catalog, sums.get(catalog.name))
    if not catalog.exists() and opts.dry_run:
        report.results.append(FileResult(cat_job, PLANNED))
        report.notes.append(
            f"dry run: the catalogue {catalog} would be downloaded from {cat_job.url}; "
            "the stars (and so the spectra) can only be chosen once it is here"
        )
        return report
    if not catalog.exists():
        log.info("downloading the APOGEE catalogue %s -> %s", cat_job.url, catalog)
    (cat_result,) = fetcher.fetch_all([cat_job])
    report.results.append(cat_result)
    if cat_result.status == FAILED:
        report.notes.append("the catalogue failed, so no spectra were fetched (run the command again to resume)")
        return report

    # 2. the stars that pass the cuts, exactly as APOGEEDataModule selects them
    labels = [str(x).upper() for x in data.get("labels") or []]
    columns = [*cat.IDENTITY_COLUMNS, *cat.QUALITY_COLUMNS, *labels, *resolved["ranges"]]
    table = cat.read_catalog(catalog, columns)
    n_rows = len(table)
    table, removed = cat.apply_cuts(table, cuts, labels=labels or None)
    relpaths = list(dict.fromkeys(cat.spectrum_relpaths(table, source)))  # catalogue order, each file once
    note = f"{len(table)} of {n_rows} catalogue rows pass data.cuts"
    if any(n for _, n in removed):
        note += " (" + "; ".join(f"{name}: -{n}" for name, n in removed if n) + ")"
    if max_stars is not None and len(relpaths) > int(max_stars):
        relpaths = relpaths[: int(max_stars)]
        note += f"; download.max_stars={int(max_stars)} keeps the first {len(relpaths)} in catalogue order"
    report.notes.append(note)
    log.info("%s", note)

    # 3. the spectra, each checked against the SHA1 list of its {TELESCOPE}/{FIELD} folder
    spectra_base = str(opts.apogee.spectra_base_url[source]).rstrip("/")
    jobs = [FileJob(f"{spectra_base}/{rel}", spectra_dir / rel) for rel in relpaths]
    missing = [j for j in jobs if not j.dest.exists()]
    if opts.dry_run:
        report.results += [FileResult(j, PRESENT if j.dest.exists() else PLANNED) for j in jobs]
        report.notes.append(
            f"dry run: {len(missing)} spectra to download from {spectra_base}/ into {spectra_dir}"
            + "".join(f"\n  {j.url}" for j in missing[:5]) + ("\n  ..." if len(missing) > 5 else "")
        )
        return report
    sha1, failures = _folder_sums(fetcher, opts, source, spectra_base, missing, spectra_dir) if opts.verify else ({}, {})
    results: list[FileResult | None] = [None] * len(jobs)
    todo: list[tuple[int, FileJob]] = []
    for i, job in enumerate(jobs):
        rel = job.dest.relative_to(spectra_dir).as_posix()
        folder = rel.rsplit("/", 1)[0]
        if folder in failures and not job.dest.exists():
            results[i] = FileResult(job, FAILED, failures[folder])  # never fetched unverified behind the survey's back
        else:
            todo.append((i, FileJob(job.url, job.dest, sha1.get(rel))))
    log.info("%d spectra: %d to download into %s", len(jobs), len(missing), spectra_dir)
    for (i, _), result in zip(todo, fetcher.fetch_all([j for _, j in todo], desc=f"{source} files")):
        results[i] = result
    report.results += results
    return report


def _folder_sums(fetcher, opts, source, base, missing, spectra_dir) -> tuple[dict[str, str], dict[str, str]]:
    """SHA1 per relative path from each folder's sha1sum list (only folders with files to fetch),
    and the folders whose list could not be fetched -> reason."""
    folders = sorted({j.dest.relative_to(spectra_dir).as_posix().rsplit("/", 1)[0] for j in missing})
    templates = [str(t) for t in opts.apogee.sums.get(source) or []]
    if not folders or not templates:
        return {}, {}
    candidates = []
    for folder in folders:
        telescope, _, fld = folder.partition("/")
        try:
            candidates.append([f"{base}/{folder}/{t.format(telescope=telescope, field=fld)}" for t in templates])
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"download.apogee.sums.{source}: {templates} may use only {{telescope}} and {{field}} ({err!r})"
            ) from err
    log.info("fetching the SHA1 lists of %d folders", len(folders))
    sha1: dict[str, str] = {}
    failures: dict[str, str] = {}
    unlisted = 0
    for folder, (url, text, error) in zip(folders, fetcher.fetch_first_texts(candidates)):
        if error is not None:
            failures[folder] = f"cannot fetch the SHA1 list {url}: {error}"
        elif text is None:
            unlisted += 1
        else:
            for name, digest in parse_sha1sums(text).items():
                sha1[f"{folder}/{name}"] = digest
    if unlisted:
        log.warning("%d of %d folders have no SHA1 list (tried %s); their files are not verified",
                    unlisted, len(folders), ", ".join(templates))
    return sha1, failures


# ---------------------------------------------------------------------------------------- GALAH
def download_galah4(cfg: DictConfig, fetcher: Fetcher) -> Report:
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


# ---------------------------------------------------------------------------------------- entry point
def download(cfg: DictConfig) -> Report:
    """Run the download `cfg` describes; the report says what happened to every file."""
    survey = survey_of(cfg.data)
    if survey == "synthetic":
        raise ConfigError(
            "the synthetic survey is generated on the fly and needs no download; "
            "use data=apogee or data=galah to fetch real spectra"
        )
    with _fetcher(cfg.download) as fetcher:
        start = time.perf_counter()
        report = download_apogee(cfg, fetcher) if survey == "apogee" else download_galah4(cfg, fetcher)
    report.seconds = time.perf_counter() - start
    return report


def run(cfg: DictConfig) -> int:
    """Download, print the summary; exit status 0 (all in place), 1 (files failed) or 2 (user error)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the log
    try:
        report = download(cfg)
    except StellarlabError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: partial files are kept as *.part; run the same command again to resume", file=sys.stderr)
        return 130
    print(report.summary())
    if report.failed:
        print(f"error: {len(report.failed)} file(s) failed (listed above); run the same command again to retry them",
              file=sys.stderr)
        return 1
    return 0


def _conf_dir() -> Path | None:
    """The project's conf/: beside the package (a checkout, editable install), $STELLARLAB_ROOT/conf, or ./conf."""
    candidates = [Path(__file__).resolve().parents[2] / "conf"]
    if os.environ.get("STELLARLAB_ROOT"):
        candidates.append(Path(os.environ["STELLARLAB_ROOT"]) / "conf")
    candidates.append(Path.cwd() / "conf")
    return next((c for c in candidates if (c / "download.yaml").is_file()), None)


def main() -> None:
    import hydra

    import stellarlab.config  # noqa: F401  (registers the run_id resolver the shared configs use)

    conf = _conf_dir()
    if conf is None:
        print("error: cannot find conf/download.yaml: run from the stellarlab checkout or set STELLARLAB_ROOT to it",
              file=sys.stderr)
        sys.exit(2)

    @hydra.main(version_base="1.3", config_path=str(conf), config_name="download")
    def _main(cfg: DictConfig) -> None:
        code = run(cfg)
        if code:
            sys.exit(code)

    _main()
