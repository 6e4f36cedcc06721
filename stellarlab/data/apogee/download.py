"""APOGEE's download recipe: `python -m stellarlab.download data=apogee`.

Fetches the allStar catalogue (download.apogee.catalog_name on the server, saved as data.catalog),
applies data.cuts exactly as APOGEEDataModule does,
then fetches the spectra (data.source) of the stars that pass into data.spectra_dir as
{TELESCOPE}/{FIELD}/<file>, the layout of the SDSS server, checking each against the SHA1 list SDSS
keeps in its folder. A folder whose list cannot be fetched fails its files rather than fetching them
unverified. numpy and astropy only: no torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stellarlab.data.apogee import catalog as cat
from stellarlab.download.fetch import FAILED, PLANNED, PRESENT, Fetcher, FileJob, FileResult, Report, parse_sha1sums
from stellarlab.errors import ConfigError, StellarlabError

log = logging.getLogger(__name__)


def download(cfg: DictConfig, fetcher: Fetcher) -> Report:
    """The allStar catalogue, then the spectra of the stars that pass data.cuts, each SHA1-checked."""
    data, opts = cfg.data, cfg.download
    source = str(data.source)
    if source not in cat.SOURCES:
        raise ConfigError(f"data.source={source!r} is unknown; valid sources: {', '.join(cat.SOURCES)}")
    max_stars = opts.max_stars  # its rule: stellarlab.download.options
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
    # The server's name of the catalogue, not the local copy's: data.catalog may be renamed or elsewhere.
    remote = str(opts.apogee.get("catalog_name") or catalog.name)
    base = str(opts.apogee.catalog_base_url).rstrip("/")
    sums = OmegaConf.to_container(opts.apogee.catalog_sha1) if opts.apogee.get("catalog_sha1") else {}
    cat_job = FileJob(f"{base}/{remote}", catalog, sums.get(remote))
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
