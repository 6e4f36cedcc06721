"""The download command against a local HTTP server on 127.0.0.1 that serves files these tests make.

The server honours Range requests (so resume is real), can cut a connection half-way through a
file, answer 503s first, ignore Range, and emulate the Hugging Face `resolve` endpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stellarlab.download.fetch import (
    DOWNLOADED,
    FAILED,
    PRESENT,
    Fetcher,
    FileJob,
    format_summary,
    parse_sha1sums,
)


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ at every offset, so a resume at the wrong place shows."""
    out = bytearray()
    block = seed.to_bytes(4, "little")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


class FileServer:
    """A ThreadingHTTPServer in a thread; behaviour per URL path is set through the attributes."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.extra_headers: dict[str, dict[str, str]] = {}
        self.drops: dict[str, list[int]] = {}  # path -> body bytes to send before cutting the connection, one per request
        self.statuses: dict[str, list] = {}  # path -> error statuses (or (status, headers)) to answer first, one per request
        self.ignore_range: set[str] = set()
        self.stalls: dict[str, int] = {}  # path -> body bytes to send before waiting for `release` (whole requests only)
        self.release = threading.Event()
        self.delay = 0.0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                with server.lock:
                    server.requests.append((self.command, path, rng))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    status = server.statuses[path].pop(0) if server.statuses.get(path) else None
                    drop = server.drops[path].pop(0) if body and server.drops.get(path) else None
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    self.respond(path, rng, status, drop, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def respond(self, path, rng, status, drop, body):
                if status is not None:
                    status, headers = status if isinstance(status, tuple) else (status, {})
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and path not in server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                for k, v in server.extra_headers.get(path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not body:
                    return
                chunk = data[start:]
                if drop is not None:  # half a file, then the connection goes away
                    self.wfile.write(chunk[:drop])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                stall = server.stalls.get(path) if not rng else None
                if stall is not None:  # part of the file, then nothing until the test releases the rest
                    self.wfile.write(chunk[:stall])
                    self.wfile.flush()
                    server.release.wait(30)
                    chunk = chunk[stall:]
                with contextlib.suppress(OSError):  # the client may be gone (stopped while the server stalled)
                    self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def gets(self, path: str) -> list[str | None]:
        """The Range header of every GET of `path`, in order."""
        return [r for m, p, r in self.requests if m == "GET" and p == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


def fetcher(**kw) -> Fetcher:
    opts = dict(workers=2, retries=2, backoff=0.01, backoff_max=0.02, timeout=5, progress=False)
    return Fetcher(**(opts | kw))


# ---------------------------------------------------------------------------------------- fetch.py


def test_downloads_verify_sha1_and_leave_no_part_files(server, tmp_path):
    a, b = payload(5000, 1), payload(123, 2)
    server.files = {"/d/a.fits": a, "/d/b.fits": b}
    jobs = [FileJob(server.url("/d/a.fits"), tmp_path / "x" / "a.fits", sha1(a)),
            FileJob(server.url("/d/b.fits"), tmp_path / "x" / "b.fits", sha1(b))]
    with fetcher() as f:
        results = f.fetch_all(jobs)
    assert [r.status for r in results] == [DOWNLOADED, DOWNLOADED]
    assert all(r.verified for r in results)
    assert (tmp_path / "x" / "a.fits").read_bytes() == a
    assert (tmp_path / "x" / "b.fits").read_bytes() == b
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["a.fits", "b.fits"]
    assert results[0].nbytes == 5000


def test_connection_dropped_mid_file_is_resumed_with_a_range_request(server, tmp_path):
    data = payload(10_000, 3)
    server.files["/f.fits"] = data
    server.drops["/f.fits"] = [3000]  # the first GET dies after 3000 bytes
    with fetcher(retries=0) as f:  # a drop that brought new bytes does not use up a retry
        (r,) = f.fetch_all([FileJob(server.url("/f.fits"), tmp_path / "f.fits", sha1(data))])
    assert r.status == DOWNLOADED and r.verified and r.attempts == 2
    assert server.gets("/f.fits") == [None, "bytes=3000-"]
    assert (tmp_path / "f.fits").read_bytes() == data
    assert r.nbytes == 10_000  # 3000 + 7000: nothing fetched twice
    assert not (tmp_path / "f.fits.part").exists()


def test_an_existing_part_file_is_resumed(server, tmp_path):
    data = payload(8000, 4)
    server.files["/f.fits"] = data
    (tmp_path / "f.fits.part").write_bytes(data[:4000])
    with fetcher(progress=True) as f:  # the byte bar starts at the resume offset
        (r,) = f.fetch_all([FileJob(server.url("/f.fits"), tmp_path / "f.fits", sha1(data))])
    assert r.status == DOWNLOADED and r.reason == "resumed at 4.0 kB" and r.nbytes == 4000
    assert server.gets("/f.fits") == ["bytes=4000-"]
    assert (tmp_path / "f.fits").read_bytes() == data


def test_a_complete_part_file_is_verified_and_renamed(server, tmp_path):
    data = payload(2000, 5)
    server.files["/f.fits"] = data
    (tmp_path / "f.fits.part").write_bytes(data)
    with fetcher() as f:
        (r,) = f.fetch_all([FileJob(server.url("/f.fits"), tmp_path / "f.fits", sha1(data))])
    assert r.status == DOWNLOADED and r.verified and r.nbytes == 0  # the server answered 416: nothing left
    assert (tmp_path / "f.fits").read_bytes() == data


def test_a_server_ignoring_range_gets_a_full_download(server, tmp_path):
    data = payload(6000, 6)
    server.files["/f.fits"] = data
    server.ignore_range.add("/f.fits")
    (tmp_path / "f.fits.part").write_bytes(b"x" * 2500)  # even garbage in the .part must not survive
    with fetcher() as f:
        (r,) = f.fetch_all([FileJob(server.url("/f.fits"), tmp_path / "f.fits")])
    assert r.status == DOWNLOADED and not r.verified
    assert server.gets("/f.fits") == ["bytes=2500-"]
    assert (tmp_path / "f.fits").read_bytes() == data


def test_wrong_checksum_is_retried_then_failed_with_no_file_left(server, tmp_path):
    data = payload(3000, 7)
    server.files["/f.fits"] = data
    wrong = sha1(b"something else")
    with fetcher(retries=2) as f:
        (r,) = f.fetch_all([FileJob(server.url("/f.fits"), tmp_path / "f.fits", wrong)])
    assert r.status == FAILED and r.attempts == 3
    assert r.reason == f"SHA1 mismatch: expected {wrong}, got {sha1(data)} (after 3 attempts)"
    assert server.gets("/f.fits") == [None, None, None]  # each retry starts clean, no resume of bad bytes
    assert list(tmp_path.iterdir()) == []


def test_transient_server_errors_are_retried_with_backoff(server, tmp_path):
    data = payload(100, 8)
    server.files["/f.fits"] = data
    server.statuses["/f.fits"] = [503, 500]
    with fetcher(retries=2, backoff=0.05, backoff_max=1) as f:
        t0 = time.perf_counter()
        (r,) = f.fetch_all([FileJob(server.url("/f.fits"), tmp_path / "f.fits")])
        elapsed = time.perf_counter() - t0
    assert r.status == DOWNLOADED and r.attempts == 3
    assert elapsed >= 0.05 + 0.10  # exponential: 0.05 s, then 0.1 s
    assert (tmp_path / "f.fits").read_bytes() == data

    server.statuses["/g.fits"] = [(429, {"Retry-After": "30"})]  # honoured, but never beyond backoff_max
    server.files["/g.fits"] = data
    with fetcher(retries=1, backoff=0.01, backoff_max=0.3) as f:
        t0 = time.perf_counter()
        (r,) = f.fetch_all([FileJob(server.url("/g.fits"), tmp_path / "g.fits")])
        elapsed = time.perf_counter() - t0
    assert r.status == DOWNLOADED and 0.29 <= elapsed < 5


def test_not_found_fails_at_once_and_drops_before_any_byte_exhaust_the_retries(server, tmp_path):
    server.files["/dead.fits"] = payload(500, 9)
    server.drops["/dead.fits"] = [0] * 10
    jobs = [FileJob(server.url("/missing.fits"), tmp_path / "missing.fits"),
            FileJob(server.url("/dead.fits"), tmp_path / "dead.fits")]
    with fetcher(retries=2) as f:
        missing, dead = f.fetch_all(jobs)
    assert missing.status == FAILED and missing.attempts == 1
    assert missing.reason == f"not found on the server (HTTP 404): {server.url('/missing.fits')}"
    assert dead.status == FAILED and dead.attempts == 3 and "after 3 attempts" in dead.reason
    assert len(server.gets("/missing.fits")) == 1 and len(server.gets("/dead.fits")) == 3
    assert not (tmp_path / "missing.fits").exists() and not (tmp_path / "dead.fits").exists()


def test_present_files_cost_no_request(server, tmp_path):
    (tmp_path / "f.fits").write_bytes(b"already here")
    with fetcher() as f:
        (r,) = f.fetch_all([FileJob(server.url("/f.fits"), tmp_path / "f.fits", sha1(b"other"))])
    assert r.status == PRESENT and server.requests == []


def test_parallel_connections_are_bounded(server, tmp_path):
    server.delay = 0.05
    jobs = []
    for i in range(12):
        server.files[f"/s/{i}.fits"] = payload(200, i)
        jobs.append(FileJob(server.url(f"/s/{i}.fits"), tmp_path / f"{i}.fits", sha1(payload(200, i))))
    with fetcher(workers=3, progress=True) as f:
        results = f.fetch_all(jobs)
    assert all(r.status == DOWNLOADED for r in results)
    assert 2 <= server.max_in_flight <= 3


def test_sha1sum_lists_parse_and_summary_lists_failures(tmp_path):
    a, b = "a" * 40, "B" * 40
    text = f"{a}  apStar-dr17-2M1.fits\n{b} *sub/dir/apStar-dr17-2M2.fits\nnot a sum line\n\n"
    assert parse_sha1sums(text) == {"apStar-dr17-2M1.fits": a, "apStar-dr17-2M2.fits": b.lower()}
    from stellarlab.download.fetch import FileResult

    results = [
        FileResult(FileJob("u1", tmp_path / "a" / "1.fits"), DOWNLOADED, nbytes=1500, verified=True),
        FileResult(FileJob("u2", tmp_path / "a" / "2.fits"), PRESENT),
        FileResult(FileJob("u3", tmp_path / "a" / "3.fits"), FAILED, "not found on the server (HTTP 404): u3"),
    ]
    assert format_summary(results, root=tmp_path).splitlines() == [
        "download summary: 1 downloaded (1.5 kB), 1 already present, 1 failed",
        "  checksum verified: 1 of 1 downloaded (the others have no published sum)",
        "failed:",
        "  a/3.fits: not found on the server (HTTP 404): u3",
    ]


# ---------------------------------------------------------------------------------------- the command

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ROOT = CONF_DIR.parent
FAST = ["download.progress=false", "download.retries=2", "download.backoff=0.01", "download.backoff_max=0.02",
        "download.timeout=5", "download.workers=3"]


def compose_download(overrides, tmp_path: Path):
    """The config `python -m stellarlab.download <overrides>` runs, with its folders under tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import stellarlab.config  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="download", overrides=[f"paths.root_dir={tmp_path}", *FAST, *overrides])


def run_cli(args, tmp_path: Path, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "stellarlab.download", f"paths.root_dir={tmp_path}", *FAST, *args],
        cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
    )


HF_REPO = "/datasets/simbaswe/galah4/resolve/main"


def serve_galah4(server: FileServer, wrong_sha256_for: str | None = None) -> dict[str, bytes]:
    """The Hugging Face `resolve` endpoint as huggingface_hub sees it: X-Repo-Commit and the LFS SHA256 as ETag."""
    files = {"spectra.npy": payload(40_000, 11), "labels.npy": payload(2_000, 12)}
    for name, data in files.items():
        digest = hashlib.sha256(b"not it" if name == wrong_sha256_for else data).hexdigest()
        server.files[f"{HF_REPO}/{name}"] = data
        server.extra_headers[f"{HF_REPO}/{name}"] = {"X-Repo-Commit": "c" * 40, "ETag": f'"{digest}"'}
    return files


def test_galah4_through_huggingface_hub_verified_then_present(server, tmp_path):
    from stellarlab.download.command import download

    files = serve_galah4(server)
    server.drops[f"{HF_REPO}/spectra.npy"] = [15_000]  # huggingface_hub retries within the call
    cfg = compose_download(["data=galah", f"download.galah4.endpoint={server.base}"], tmp_path)
    report = download(cfg)
    root = tmp_path / "data" / "galah4"
    assert [(r.job.dest.name, r.status, r.verified) for r in report.results] == [
        ("spectra.npy", DOWNLOADED, True), ("labels.npy", DOWNLOADED, True)]
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files  # no staging folder, no partial file left
    # it resumes at its 10 MB chunk boundaries, so a 40 kB file starts over
    assert server.gets(f"{HF_REPO}/spectra.npy") == [None, None]

    server.requests.clear()
    again = download(cfg)
    assert [r.status for r in again.results] == [PRESENT, PRESENT] and server.requests == []


def test_galah4_cli_wrong_sha256_exits_1_and_keeps_no_file_then_exits_0(server, tmp_path):
    files = serve_galah4(server, wrong_sha256_for="labels.npy")
    proc = run_cli(["data=galah"], tmp_path, env={"HF_ENDPOINT": server.base})
    root = tmp_path / "data" / "galah4"
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["spectra.npy"]
    assert (root / "spectra.npy").read_bytes() == files["spectra.npy"]
    want, got = hashlib.sha256(b"not it").hexdigest(), hashlib.sha256(files["labels.npy"]).hexdigest()
    assert "download summary" in proc.stdout and "1 downloaded (40.0 kB), 0 already present, 1 failed" in proc.stdout
    assert f"labels.npy: SHA256 mismatch: expected {want}, got {got} (after 3 attempts)" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: 1 file(s) failed (listed above); run the same command again to retry them")
    assert len(server.gets(f"{HF_REPO}/labels.npy")) == 3

    serve_galah4(server)  # the Hub now publishes the right SHA256
    proc = run_cli(["data=galah"], tmp_path, env={"HF_ENDPOINT": server.base})
    assert proc.returncode == 0, proc.stderr
    assert "1 downloaded (2.0 kB), 1 already present, 0 failed" in proc.stdout
    assert (root / "labels.npy").read_bytes() == files["labels.npy"]
    assert sorted(p.name for p in root.iterdir()) == ["labels.npy", "spectra.npy"]


# ---------------------------------------------------------------------------------------- APOGEE

SAS = "/sas/dr17/apogee/spectro/aspcap/dr17/synspec_rev1"
# rows 0-9: the stars; which {TELESCOPE}/{FIELD} folder each lives in (and so which SHA1 list covers it)
FOLDERS = ["apo25m/M67"] * 6 + ["lco25m/Hdeep_lco"] * 2 + ["apo25m/N6791"] * 2
KEPT = [0, 4, 5, 6, 7, 8, 9]  # 1: STAR_BAD, 2: Teff outside the rgb box, 3: no labels; rows 10-11 duplicates


class ApogeeSite:
    """A DR17-like SAS tree on the test server: allStar, aspcapStar files, per-folder sha1sum lists."""

    def __init__(self, server: FileServer, tmp_path: Path, catalog_name: str = "allStar-dr17-synspec_rev1.fits"):
        import numpy as np

        from stellarlab.data.apogee.catalog import spectrum_filename
        from stellarlab.data.apogee.mock import make_catalog, write_allstar, write_aspcapstar

        self.server = server
        cols, _ = make_catalog(10, seed=3)
        cols = {k: np.concatenate([v, v[[4, 6]]]) for k, v in cols.items()}  # rows 10, 11: duplicate entries
        cols["EXTRATARG"][10:] |= 16
        folders = FOLDERS + [FOLDERS[4], FOLDERS[6]]
        cols["TELESCOPE"] = np.array([f.split("/")[0] for f in folders])
        cols["FIELD"] = np.array([f.split("/")[1] for f in folders])
        cols["FILE"] = np.array([spectrum_filename(i, t, "apStar") for i, t in zip(cols["APOGEE_ID"], cols["TELESCOPE"])])
        cols["TEFF"][:], cols["LOGG"][:], cols["FE_H"][:] = 4600.0, 2.4, -0.2  # red giants
        cols["ASPCAPFLAG"][1] |= np.int64(1 << 23)
        cols["TEFF"][2] = 6500.0
        for c in ("TEFF", "LOGG", "FE_H"):
            cols[c][3] = np.nan
        src = tmp_path / "site"
        self.catalog = write_allstar(src / catalog_name, cols).read_bytes()
        server.files[f"{SAS}/{catalog_name}"] = self.catalog
        self.rel: list[str] = []
        self.spectra: dict[str, bytes] = {}
        for i in range(10):
            rel = f"{folders[i]}/aspcapStar-dr17-{cols['APOGEE_ID'][i]}.fits"
            flux = np.full(8575, 1.0 - 0.01 * i, np.float32)
            data = write_aspcapstar(src / rel, flux, np.full(8575, 0.01, np.float32), objid=cols["APOGEE_ID"][i]).read_bytes()
            self.rel.append(rel)
            self.spectra[rel] = data
            server.files[f"{SAS}/{rel}"] = data
        # SDSS names vary: M67 has only the second template's name, Hdeep_lco the first's, N6791 none
        self.sums_path = {"apo25m/M67": f"{SAS}/apo25m/M67/dr17_synspec_apo25m_M67.sha1sum",
                          "lco25m/Hdeep_lco": f"{SAS}/lco25m/Hdeep_lco/dr17_synspec_rev1_lco25m_Hdeep_lco.sha1sum"}
        self.write_sums()

    def write_sums(self, wrong: tuple[int, ...] = ()):
        for folder, path in self.sums_path.items():
            lines = [f"{sha1(b'corrupt') if i in wrong else sha1(self.spectra[rel])}  {rel.rsplit('/', 1)[1]}"
                     for i, rel in enumerate(self.rel) if rel.startswith(folder + "/")]
            self.server.files[path] = ("\n".join(lines) + "\n").encode()

    def overrides(self) -> list[str]:
        return ["data=apogee", "data.cuts.preset=rgb", f"download.apogee.catalog_base_url={self.server.url(SAS)}",
                f"download.apogee.spectra_base_url.aspcapStar={self.server.url(SAS)}"]


def apogee_cfg(site: ApogeeSite, tmp_path: Path, *extra: str):
    from omegaconf import open_dict

    cfg = compose_download([*site.overrides(), *extra], tmp_path)
    with open_dict(cfg):  # the test catalogue's own SHA1 in place of the real DR17 one
        cfg.download.apogee.catalog_sha1 = {"allStar-dr17-synspec_rev1.fits": sha1(site.catalog)}
    return cfg


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_apogee_catalogue_then_the_spectra_that_pass_the_cuts(server, tmp_path):
    from stellarlab.download.command import download

    site = ApogeeSite(server, tmp_path)
    site.write_sums(wrong=(5,))  # the published SHA1 of star 5's file is wrong
    server.drops[f"{SAS}/{site.rel[6]}"] = [40_000]  # star 6's connection dies half-way
    cfg = apogee_cfg(site, tmp_path)
    report = download(cfg)
    apogee = tmp_path / "data" / "apogee"

    by_name = {r.job.dest.relative_to(apogee).as_posix(): r for r in report.results}
    assert list(by_name) == ["allStar-dr17-synspec_rev1.fits", *(f"aspcapStar/{site.rel[i]}" for i in KEPT)]
    status = {name: (r.status, r.verified) for name, r in by_name.items()}
    assert status == {
        "allStar-dr17-synspec_rev1.fits": (DOWNLOADED, True),
        **{f"aspcapStar/{site.rel[i]}": (DOWNLOADED, True) for i in (0, 4, 6, 7)},
        f"aspcapStar/{site.rel[5]}": (FAILED, False),
        **{f"aspcapStar/{site.rel[i]}": (DOWNLOADED, False) for i in (8, 9)},  # N6791 publishes no sums
    }
    assert by_name[f"aspcapStar/{site.rel[5]}"].reason == (
        f"SHA1 mismatch: expected {sha1(b'corrupt')}, got {sha1(site.spectra[site.rel[5]])} (after 3 attempts)")
    assert server.gets(f"{SAS}/{site.rel[6]}") == [None, "bytes=40000-"]
    # on disk: exactly the verified catalogue and the good spectra, byte for byte; no .part anywhere
    assert files_under(apogee) == {
        "allStar-dr17-synspec_rev1.fits": site.catalog,
        **{f"aspcapStar/{site.rel[i]}": site.spectra[site.rel[i]] for i in (0, 4, 6, 7, 8, 9)},
    }
    for i in (1, 2, 3):  # stars that fail the cuts are never requested
        assert server.gets(f"{SAS}/{site.rel[i]}") == []
    summary = report.summary()
    assert "7 of 12 catalogue rows pass data.cuts" in summary
    assert "download summary" in summary and "7 downloaded" in summary and "0 already present, 1 failed" in summary
    assert f"aspcapStar/{site.rel[5]}: SHA1 mismatch" in summary

    # the next run fetches only what is missing: the catalogue and good spectra cost no request
    site.write_sums()
    server.requests.clear()
    again = download(cfg)
    assert [r.status for r in again.results] == [PRESENT, PRESENT, PRESENT, DOWNLOADED, PRESENT, PRESENT, PRESENT, PRESENT]
    assert again.results[3].verified and not again.failed
    assert sorted(p for m, p, _ in server.requests) == sorted(
        [f"{SAS}/{site.rel[5]}", f"{SAS}/apo25m/M67/dr17_synspec_rev1_apo25m_M67.sha1sum", site.sums_path["apo25m/M67"]])
    assert files_under(apogee)[f"aspcapStar/{site.rel[5]}"] == site.spectra[site.rel[5]]


def test_apogee_max_stars_and_dry_run(server, tmp_path):
    from stellarlab.download.command import download

    site = ApogeeSite(server, tmp_path)
    dry = download(apogee_cfg(site, tmp_path, "download.dry_run=true"))
    assert [r.status for r in dry.results] == ["planned"] and server.requests == []
    assert "the stars (and so the spectra) can only be chosen once it is here" in dry.summary()

    report = download(apogee_cfg(site, tmp_path, "download.max_stars=3"))
    spectra = tmp_path / "data" / "apogee" / "aspcapStar"
    assert sorted(files_under(spectra)) == sorted(site.rel[i] for i in KEPT[:3])  # the first 3 in catalogue order
    assert "download.max_stars=3 keeps the first 3 in catalogue order" in report.summary()

    server.requests.clear()
    dry = download(apogee_cfg(site, tmp_path, "download.dry_run=true", "download.max_stars=5"))
    assert server.requests == []  # a dry run never touches the network once the catalogue is here
    assert [r.status for r in dry.results] == [PRESENT, PRESENT, PRESENT, PRESENT, "planned", "planned"]
    assert f"dry run: 2 spectra to download from {server.url(SAS)}/" in dry.summary()


@pytest.mark.slow  # a fresh process imports torch through stellarlab.data: ~10 s on 2 cores
def test_cli_apogee_failure_exits_1_with_the_summary(server, tmp_path):
    site = ApogeeSite(server, tmp_path, catalog_name="allStar-test.fits")  # no pinned SHA1: unverified
    del server.files[f"{SAS}/{site.rel[9]}"]  # the server lacks one file
    catalog = tmp_path / "data" / "apogee" / "allStar-test.fits"
    proc = run_cli([*site.overrides(), f"data.catalog={catalog}", "download.apogee.catalog_name=allStar-test.fits"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"aspcapStar/{site.rel[9]}: not found on the server (HTTP 404): {server.url(SAS)}/{site.rel[9]}" in proc.stdout
    assert "7 downloaded" in proc.stdout and "1 failed" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 file(s) failed")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()  # no run folder


@pytest.mark.slow  # a fresh process imports torch through stellarlab.data: ~10 s on 2 cores
def test_cli_sigterm_mid_file_keeps_the_part_file_exits_143_and_the_next_run_resumes_it(server, tmp_path):
    import signal
    import subprocess
    import sys

    site = ApogeeSite(server, tmp_path, catalog_name="allStar-test.fits")
    stalled = site.rel[4]
    server.stalls[f"{SAS}/{stalled}"] = 5000
    catalog = tmp_path / "data" / "apogee" / "allStar-test.fits"
    args = [*site.overrides(), f"data.catalog={catalog}", "download.apogee.catalog_name=allStar-test.fits"]
    proc = subprocess.Popen([sys.executable, "-m", "stellarlab.download", f"paths.root_dir={tmp_path}", *FAST, *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = None
    for _ in range(1200):  # until the stalled file has its first 5000 bytes on disk
        part = next((p for p in (tmp_path / "data").rglob("*.part") if p.stat().st_size == 5000), None)
        if part is not None or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert part is not None and part.name == stalled.rsplit("/", 1)[1] + ".part", proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "interrupted: partial files are kept as *.part; run the same command again to resume")
    assert part.stat().st_size == 5000 and not part.with_suffix("").exists()

    server.release.set()
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert part.with_suffix("").read_bytes() == site.spectra[stalled] and not part.exists()
    assert server.gets(f"{SAS}/{stalled}")[-1] == "bytes=5000-"


def test_cli_config_errors_exit_2_with_one_line(tmp_path):
    proc = run_cli(["data=synthetic_apogee"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: the synthetic survey is generated on the fly and needs no download; "
        "use data=apogee or data=galah to fetch real spectra")
    proc = run_cli(["data=galah", "download.workers=0"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: download.workers=0 is not valid: it must be an integer >= 1; e.g. download.workers=4")


def _own_apogee_class():
    from stellarlab.data.apogee.datamodule import APOGEEDataModule

    class MyAPOGEE(APOGEEDataModule):  # a user's own subclass, under a name with no survey in it
        pass

    return MyAPOGEE


def test_the_recipe_is_the_one_the_datamodule_class_names(monkeypatch):
    from omegaconf import OmegaConf

    from stellarlab.data.apogee.download import download as apogee_recipe
    from stellarlab.data.galah.download import download as galah4_recipe
    from stellarlab.download.command import recipe_of
    from stellarlab.errors import ConfigError

    def recipe(target):
        return recipe_of(OmegaConf.create({} if target is None else {"_target_": target}))

    monkeypatch.setattr(__name__ + ".MyOwnSpectra", _own_apogee_class(), raising=False)
    assert recipe(__name__ + ".MyOwnSpectra") is apogee_recipe
    assert recipe("stellarlab.data.apogee.datamodule.APOGEEDataModule") is apogee_recipe
    assert recipe("stellarlab.data.galah.GALAH4DataModule") is galah4_recipe  # the package's lazy name: old configs
    with pytest.raises(ConfigError, match=r"needs no download"):
        recipe("stellarlab.data.synthetic.SyntheticDataModule")
    with pytest.raises(ConfigError, match=r"^the download command has no recipe for this data config "
                                          r"\(stellarlab\.data\.galah\.dr4\.GALAHDR4DataModule\); it fetches data=apogee"):
        recipe("stellarlab.data.galah.dr4.GALAHDR4DataModule")
    with pytest.raises(ConfigError, match=r"no recipe for this data config \(stellarlab\.data\.base\.SpectraDataModule\)"):
        recipe("stellarlab.data.base.SpectraDataModule")
    with pytest.raises(ConfigError, match=r"no recipe for this data config \(no _target_\)"):
        recipe(None)
    with pytest.raises(ConfigError, match=r"data\._target_=stellarlab\.data\.nope\.X cannot be imported"):
        recipe("stellarlab.data.nope.X")


def test_apogee_sha1_list_that_cannot_be_fetched_fails_its_folder_only(server, tmp_path):
    from stellarlab.download.command import download

    site = ApogeeSite(server, tmp_path)
    hdeep = site.sums_path["lco25m/Hdeep_lco"]
    server.statuses[hdeep] = [500] * 3  # retries=2: three answers, all 500
    report = download(apogee_cfg(site, tmp_path))
    failed = {r.job.dest.name: r.reason for r in report.failed}
    assert failed == {site.rel[i].rsplit("/", 1)[1]: f"cannot fetch the SHA1 list {server.url(hdeep)}: HTTP 500 (after 3 attempts)"
                      for i in (6, 7)}
    assert server.gets(f"{SAS}/{site.rel[6]}") == []  # never downloaded unverified behind the survey's back
    assert sum(r.status == DOWNLOADED for r in report.results) == 1 + 5


def test_apogee_config_mistakes_are_caught_before_any_download(server, tmp_path):
    from stellarlab.download.command import download
    from stellarlab.errors import ConfigError

    site = ApogeeSite(server, tmp_path)
    with pytest.raises(ConfigError, match=r"data.cuts.aspcapflag_bits: unknown bit name 'STAR_BADD'"):
        download(apogee_cfg(site, tmp_path, "data.cuts.aspcapflag_bits=[STAR_BADD]"))
    with pytest.raises(ConfigError, match=r"data.cuts=5 is not a set of cuts.*e.g. data.cuts.preset=rgb"):
        download(apogee_cfg(site, tmp_path, "data.cuts=5"))
    with pytest.raises(ConfigError, match=r"data.source='spectra' is unknown; valid sources: aspcapStar, apStar"):
        download(apogee_cfg(site, tmp_path, "data.source=spectra"))
    assert server.requests == []


def test_the_catalogue_url_is_the_servers_name_not_the_local_copys(server, tmp_path):
    """A local copy under another name (data.catalog) is fetched from the server's name (download.apogee.catalog_name)."""
    from stellarlab.download.command import download

    site = ApogeeSite(server, tmp_path)
    local = tmp_path / "mine" / "my-allstar.fits"
    dry = download(apogee_cfg(site, tmp_path, f"data.catalog={local}", "download.dry_run=true"))
    assert [r.job.url for r in dry.results] == [f"{server.url(SAS)}/allStar-dr17-synspec_rev1.fits"]
    assert [r.job.dest for r in dry.results] == [local]
    report = download(apogee_cfg(site, tmp_path, f"data.catalog={local}", "download.max_stars=1"))
    assert report.results[0].status == DOWNLOADED and report.results[0].verified  # the server name's SHA1 checked it
    assert local.read_bytes() == site.catalog
    assert server.gets(f"{SAS}/my-allstar.fits") == []


@pytest.mark.parametrize("override, message", [
    ("download.workers=abc", "download.workers=abc is not valid: it must be an integer >= 1; e.g. download.workers=4"),
    ("download.max_stars=0", "download.max_stars=0 is not valid: it must be an integer >= 1 or null; "
                             "e.g. download.max_stars=5000 (null: all stars)"),
    ("download.timeout=nan", "download.timeout=nan is not valid: it must be a number > 0; e.g. download.timeout=60.0 (seconds)"),
    ("download.retries=1.5", "download.retries=1.5 is not valid: it must be an integer >= 0; e.g. download.retries=5"),
    ("download.backoff=-1", "download.backoff=-1 is not valid: it must be a number >= 0; e.g. download.backoff=2.0 (seconds)"),
    ("download.verify=maybe", "download.verify=maybe is not valid: it must be true or false; e.g. download.verify=true"),
    ("download.dry_run=1", "download.dry_run=1 is not valid: it must be true or false; e.g. download.dry_run=true"),
    ("+download.wrkers=2", "download.wrkers is not an option of"),
])
def test_every_download_option_is_checked_before_any_request(server, tmp_path, override, message):
    from stellarlab.download.command import download
    from stellarlab.errors import ConfigError

    site = ApogeeSite(server, tmp_path)
    with pytest.raises(ConfigError) as info:
        download(apogee_cfg(site, tmp_path, override))
    assert str(info.value).startswith(message)
    assert server.requests == [] and not (tmp_path / "data").exists()


def test_the_fetcher_applies_the_same_rules_as_the_command():
    from stellarlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^download\.workers=0 is not valid: it must be an integer >= 1"):
        Fetcher(workers=0)
    with pytest.raises(ConfigError, match=r"^download\.timeout=nan is not valid"):
        Fetcher(timeout=float("nan"))
    with pytest.raises(ConfigError, match=r"^download\.verify=maybe is not valid: it must be true or false"):
        Fetcher(verify="maybe")
