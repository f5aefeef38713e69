"""Start the Streamlit app on a study: ``circuits app STUDY`` calls ``launch``.

Binds to 127.0.0.1 unless another address is asked for explicitly; when it listens beyond
loopback, the URL may not point the app at another folder (``?study=`` is then ignored).
Neither the server nor the page makes a request beyond the machine (docs/app.md, "Offline").
The app (``app/`` in the repository, installed as ``circuits_app``) imports the library, never
the other way: it is found here by its file, not imported.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from circuits.errors import CircuitsError


def _app_main() -> Path:
    """The app's main file: in the package ``circuits_app`` where circuits is installed (a wheel,
    or ``pip install -e``), else ``app/main.py`` beside the package (a checkout on ``PYTHONPATH``,
    not installed). Found without importing the app: the library never imports it."""
    spec = importlib.util.find_spec("circuits_app")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "main.py"
    return Path(__file__).resolve().parents[1] / "app" / "main.py"


APP_MAIN = _app_main()
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::")




def command(study: str | Path, port: int = 8501, address: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line that serves ``study``, making no request beyond the
    machine: no usage statistics, and on a wildcard address the URL printed names this host
    (otherwise Streamlit asks checkip.amazonaws.com for the machine's external address)."""
    named = [f"--browser.serverAddress={socket.gethostname()}"] if address in WILDCARD else []
    return [sys.executable, "-m", "streamlit", "run", str(APP_MAIN), "--server.headless=true",
            f"--server.address={address}", f"--server.port={port}", "--browser.gatherUsageStats=false",
            "--client.toolbarMode=viewer", *named,
            "--", "--study", str(Path(study).resolve())]


def launch(study: str | Path, port: int = 8501, address: str = "127.0.0.1", wait: bool = True):
    """Serve the app on ``study`` at http://address:port; blocks until stopped when ``wait``.

    Returns the server's exit status, or the running ``Popen`` when ``wait`` is False.
    """
    if not APP_MAIN.exists():
        raise CircuitsError(f"the app's files are missing: {APP_MAIN} (reinstall circuits, or run from a "
                            "checkout of the repository)")
    if not 0 < port < 65536:
        raise CircuitsError(f"--port {port}: expected 1..65535")
    if not Path(study).exists():
        raise CircuitsError(f"no study at {study}: make one with `circuits sweep`")
    env = dict(os.environ)
    if address not in LOOPBACK:
        env["CIRCUITS_APP_LOCK_STUDY"] = "1"
    print(f"circuits app: serving {study} at http://{address}:{port}  (Ctrl+C to stop)", flush=True)
    process = subprocess.Popen(command(study, port, address), env=env)
    if not wait:
        return process
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, interrupt)  # stopping us stops the server too
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            return process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
