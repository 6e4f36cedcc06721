"""A process killed (SIGKILL) while it writes a cache, a checkpoint or a download leaves nothing under the
final name that a later run would trust, and the next run rebuilds or resumes and succeeds."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from stellarlab.errors import DataError
from tests.conftest import ROOT


def child(code: str) -> subprocess.Popen:
    """A Python process running `code` from the repository root; its stdout is read line by line."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after(proc: subprocess.Popen, line: str, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as it prints `line` (it then waits to be killed)."""
    deadline = time.monotonic() + timeout
    for out in proc.stdout:
        if out.strip() == line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]


# -- the synthetic survey cache ---------------------------------------------------------------------------
SURVEY = dict(survey="apogee", n_stars=40, snr=50.0, seed=7, progress=False)


@pytest.mark.slow
def test_survey_cache_killed_mid_write_is_not_trusted_and_the_next_run_rebuilds_it(tmp_path):
    from stellarlab.synthetic.survey import (
        _canonical_params,
        _load_cache,
        cache_key,
        make_survey,
    )

    params = _canonical_params("apogee", 40, 50.0, 7, 1, False, 3)
    final = tmp_path / f"apogee-{cache_key(params)}"
    # The child writes the cache as make_survey does, but stops after the first array (flux) until killed.
    proc = child(
        "import time, numpy as np\n"
        "import stellarlab.synthetic.survey as s\n"
        "save = np.save\n"
        "def slow_save(path, arr, *a, **k):\n"
        "    save(path, arr, *a, **k)\n"
        "    print('saved', flush=True)\n"
        "    time.sleep(120)\n"
        "s.np.save = slow_save\n"
        f"s.make_survey(cache_dir={str(tmp_path)!r}, **{SURVEY!r})\n"
    )
    kill_after(proc, "saved")
    assert not final.exists()  # nothing under the final name
    (partial,) = tmp_path.glob(f".{final.name}.tmp-*")  # what the kill left: a temporary folder no loader reads
    assert (partial / "flux.npy").exists() and not (partial / "params.json").exists()
    assert _load_cache(final) is None

    survey = make_survey(cache_dir=tmp_path, **SURVEY)  # the next run: builds it, publishes it
    assert survey.cache_path == str(final) and (final / "params.json").exists()
    assert not partial.exists()  # and removes what the killed build left
    again = make_survey(cache_dir=tmp_path, **SURVEY)  # and the one after reads it
    assert isinstance(again.flux, np.memmap) and np.array_equal(np.asarray(again.flux), survey.flux)
    assert np.array_equal(survey.flux, make_survey(cache_dir=None, **SURVEY).flux)  # what no cache would give


# -- the preprocessed-array cache (APOGEE, GALAH DR4) ------------------------------------------------------
@pytest.mark.slow
def test_array_cache_killed_mid_build_is_not_trusted_and_the_stale_build_is_cleaned(tmp_path):
    from stellarlab.data.cache import ArrayCache

    config = {"survey": "test", "n": 400}
    rows = np.arange(400 * 256, dtype=np.float32).reshape(400, 256)
    proc = child(
        "import time, numpy as np\n"
        "from stellarlab.data.cache import ArrayCache\n"
        f"cache = ArrayCache({str(tmp_path)!r}, 'spectra', {config!r})\n"
        "rows = np.arange(400 * 256, dtype=np.float32).reshape(400, 256)\n"
        "with cache.writer({'flux': ((400, 256), 'float32'), 'id': ((400,), 'int64')}) as w:\n"
        "    for a in range(0, 400, 50):\n"
        "        w['flux'][a:a + 50] = rows[a:a + 50]\n"
        "        w['id'][a:a + 50] = np.arange(a, a + 50)\n"
        "        if a == 200:\n"
        "            print('half', flush=True)\n"
        "            time.sleep(120)\n"
    )
    kill_after(proc, "half")
    cache = ArrayCache(tmp_path, "spectra", config)
    assert not cache.exists() and not cache.path.exists()
    (stale,) = tmp_path.glob(f".{cache.path.name}.tmp-*-{proc.pid}-*")
    assert not (stale / "meta.json").exists()

    with cache.writer({"flux": ((400, 256), "float32"), "id": ((400,), "int64")}) as w:  # the next build
        w["flux"][0:400] = rows
        w["id"][0:400] = np.arange(400)
    assert cache.exists() and not stale.exists()  # published, and the killed build's folder removed
    arrays = cache.load()
    assert np.array_equal(arrays["flux"], rows) and np.array_equal(arrays["id"], np.arange(400))


# -- checkpoints ------------------------------------------------------------------------------------------
def test_trainer_writes_checkpoints_through_the_atomic_plugin(tmp_path):
    import hydra

    from stellarlab.run.callbacks import AtomicCheckpointIO
    from tests.conftest import compose_config

    cfg = compose_config(["trainer.accelerator=cpu"], tmp_path=tmp_path)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_failing_checkpoint_save_keeps_the_previous_file(tmp_path, monkeypatch):
    from stellarlab.run.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, fh, *a, **k):  # half the bytes, then the disk is full
        fh.write(b"\x80\x02half a pickle")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(DataError, match=r"^the disk is full: writing .*last\.ckpt failed \(OSError: \[Errno 28\] No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left


def test_a_full_disk_is_one_line_whatever_the_writer_raises(tmp_path, monkeypatch):
    """torch's checkpoint writer reports a full disk as a RuntimeError and numpy as an OSError without errno: the
    free space left tells. The same error with room to spare is a bug, and stays as it was."""
    import shutil as shutil_module
    from collections import namedtuple

    from stellarlab import files

    def torch_on_a_full_disk(fh):
        fh.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 11600000 vs 11599888")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    fix = (r"free space there, or point paths\.log_dir \(outputs\) or paths\.cache_dir \(surveys\) at a disk with room; "
           r"the files written before are intact")
    with pytest.raises(DataError, match=r"^the disk is full: writing .*best\.ckpt failed \(RuntimeError: .*unexpected pos.*\); " + fix):
        files.write_bytes_atomic(tmp_path / "best.ckpt", torch_on_a_full_disk)
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(DataError, match=r"^the disk is full: writing .*apogee-survey failed \(OSError: Not enough free space"):
        with files.atomic_folder(tmp_path / "apogee-survey", "params.json") as folder:
            (folder / "labels.npy").write_bytes(b"x")
            raise OSError("Not enough free space to write 68600000 bytes after offset 128")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**6, 10**9 - 10**6))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room to spare: not a full disk
        files.write_bytes_atomic(tmp_path / "best.ckpt", torch_on_a_full_disk)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_checkpoint_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    from stellarlab.run.callbacks import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(4)}, path)
    proc = child(
        "import time, torch\n"
        "from stellarlab.run.callbacks import AtomicCheckpointIO\n"
        "def slow_save(obj, fh, *a, **k):\n"
        "    fh.write(b'x' * 1_000_000)\n"
        "    fh.flush()\n"
        "    print('half', flush=True)\n"
        "    time.sleep(120)\n"
        "torch.save = slow_save\n"
        f"AtomicCheckpointIO().save_checkpoint({{'step': 2}}, {str(path)!r})\n"
    )
    kill_after(proc, "half")
    assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint, whole
    (partial,) = tmp_path.glob(f".last.ckpt.tmp-*-{proc.pid}-*")
    assert partial.stat().st_size == 1_000_000

    AtomicCheckpointIO().save_checkpoint({"step": 3, "w": torch.ones(4)}, path)  # the resumed run's next save
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the killed save's temporary removed


# -- downloads ----------------------------------------------------------------------------------------------
class StallingServer:
    """Serves one file; a request without Range gets half of it, then the connection stalls."""

    def __init__(self, data: bytes):
        self.data, self.release = data, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers.get("Range") else 0
                body = server.data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if start:
                    self.wfile.write(body)
                    return
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                server.release.wait(120)  # the client is killed meanwhile
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.npy"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.slow
def test_download_killed_mid_transfer_leaves_only_a_part_file_that_the_next_run_resumes(tmp_path):
    from stellarlab.download.fetch import DOWNLOADED, Fetcher, FileJob

    data = np.random.default_rng(0).bytes(8 << 20)
    sha1 = hashlib.sha1(data).hexdigest()
    server = StallingServer(data)
    dest = tmp_path / "spectra.npy"
    try:
        proc = child(
            "import sys\n"
            "from pathlib import Path\n"
            "from stellarlab.download.fetch import Fetcher, FileJob\n"
            f"Fetcher(workers=1, retries=0, timeout=120, progress=False).fetch_all([FileJob({server.url!r}, Path({str(dest)!r}), {sha1!r})])\n"
        )
        part = dest.with_name(dest.name + ".part")
        deadline = time.monotonic() + 120
        while not (part.exists() and part.stat().st_size >= 2 << 20):  # at least a quarter arrived
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not dest.exists()  # never a partial file under the final name
        kept = part.stat().st_size
        assert 0 < kept < len(data)

        (result,) = Fetcher(workers=1, retries=0, timeout=30, progress=False).fetch_all([FileJob(server.url, dest, sha1)])
    finally:
        server.close()
    assert result.status == DOWNLOADED and result.verified and "resumed at" in result.reason
    assert result.nbytes == len(data) - kept  # only the missing bytes were fetched
    assert dest.read_bytes() == data and not part.exists()
