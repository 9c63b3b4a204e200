"""``servetune report serve [DIR]``: a local web app over every study (run directory) under DIR.

Pages: ``/`` lists the studies, ``/study/<id>`` is a study's report (the same page as the offline HTML, with
drill-downs fetched on demand), ``/compare?a=<id>&b=<id>`` draws two studies together. While a study runs,
the pages poll a small JSON endpoint and redraw when a trial file changes.

JSON / CSV endpoints:

- ``GET /api/studies``: every study with its version, trial counts and whether a driver is running it
- ``GET /api/studies/<id>``: one study's version and counts (what the page polls)
- ``GET /api/studies/<id>/trials.csv``: the trial table, one row per trial, flat columns
- ``GET /api/studies/<id>/trials/<n>``: one trial's drill-down
- ``GET /api/compare?a=<id>&b=<id>``: the pair's combined version

Studies are found by scanning DIR (a folder with ``trials/`` or ``study.yaml`` inside, up to
:data:`MAX_DEPTH` levels down); ids are their paths relative to DIR with ``/`` written ``~``, and only ids
from that scan are ever opened, so no request names a path. The server binds 127.0.0.1 unless told
otherwise, and then only answers requests whose Host header is that loopback name (a web page elsewhere
cannot reach it by DNS rebinding). Pages and data are rendered in a worker thread and cached per study
version, so a study that is not changing costs a few ``stat`` calls per poll.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web
from plotly.offline import get_plotlyjs

from servetune.optimizer import run_dir as rd
from servetune.reports.compare import render_compare
from servetune.reports.details import trial_detail
from servetune.reports.html import headlines, jinja_env, render_report
from servetune.reports.model import Run, load_run

log = logging.getLogger(__name__)

MAX_DEPTH = 4
SCAN_TTL_S = 5.0  # how long a directory scan is reused
ACTIVE_WINDOW_S = 120.0  # a study whose trial files changed this recently counts as running
_SKIP_DIRS = {"trials", "node_modules", "__pycache__", ".git", ".venv", "venv"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
DETAILS_CACHED = 256  # trial details kept per study (a request for each of a million numbers keeps 256)
# A Host header: a name or an IPv4 address, or a bracketed IPv6 address, then an optional port. Anything else
# ("localhost:1@evil.com") is refused rather than guessed at.
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::\d{1,5})?")


# -- finding studies --------------------------------------------------------------------------------------------

def is_run_dir(p: Path) -> bool:
    return rd.is_run_dir(p)


def discover(root: Path, max_depth: int = MAX_DEPTH) -> dict[str, Path]:
    """Study id → run directory, for every run directory at or under ``root``."""
    root = root.resolve()
    found: dict[str, Path] = {}

    def add(p: Path) -> None:
        rel = p.relative_to(root).as_posix()
        sid = (rel if rel != "." else p.name).replace("/", "~") or "study"
        base, k = sid, 2
        while sid in found:
            sid, k = f"{base}-{k}", k + 1
        found[sid] = p

    def walk(d: Path, depth: int) -> None:
        if is_run_dir(d):
            add(d)
        if depth >= max_depth:
            return
        try:
            children = sorted(c for c in d.iterdir() if c.is_dir() and not c.is_symlink())
        except OSError:
            return
        for c in children:
            if c.name in _SKIP_DIRS or c.name.startswith("."):
                continue
            walk(c, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def fingerprint(run_dir: Path) -> tuple[str, float, int]:
    """(version, newest change as a Unix time, trial directories): what changes when a trial is written."""
    h = hashlib.sha1()
    newest = 0.0
    n = 0
    for f in (rd.study_file(run_dir),):
        try:
            st = f.stat()
            h.update(f"{f.name}:{st.st_mtime_ns}:{st.st_size};".encode())
            newest = max(newest, st.st_mtime)
        except OSError:
            pass
    tdir = rd.trials_root(run_dir)
    try:
        entries = sorted(os.scandir(tdir), key=lambda e: e.name) if tdir.is_dir() else []
    except OSError:
        entries = []
    for e in entries:
        if not e.is_dir():
            continue
        n += 1
        try:
            st = os.stat(rd.record_path(e.path))
            h.update(f"{e.name}:{st.st_mtime_ns}:{st.st_size};".encode())
            newest = max(newest, st.st_mtime)
        except OSError:
            h.update(f"{e.name}:-;".encode())  # a trial started, its file not written yet
            try:
                newest = max(newest, e.stat().st_mtime)
            except OSError:
                pass
    return h.hexdigest()[:16], newest, n


def driver_running(run_dir: Path) -> bool:
    """True while a ``servetune run`` holds the study's lock file (it never creates the file)."""
    lock = rd.lock_path(run_dir)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# -- per-study cache ------------------------------------------------------------------------------------------

@dataclass
class Entry:
    version: str = ""
    run: Run | None = None
    page: str | None = None
    summary: dict[str, Any] | None = None
    details: OrderedDict[int, Any] = field(default_factory=OrderedDict)  # least recently used first
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Studies:
    """The studies under one folder, each loaded and rendered at most once per version."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self._scan: dict[str, Path] = {}
        self._scanned = 0.0
        self._cache: dict[str, Entry] = {}

    def all(self) -> dict[str, Path]:
        if time.monotonic() - self._scanned > SCAN_TTL_S:
            self._scan = discover(self.root)
            self._scanned = time.monotonic()
        return self._scan

    def path(self, sid: str) -> Path:
        p = self.all().get(sid)
        if p is None:
            self._scanned = 0.0  # a study created since the last scan
            p = self.all().get(sid)
        if p is None:
            raise web.HTTPNotFound(text=f"no study {sid!r} here")  # the server's own path stays private
        return p

    def entry(self, sid: str) -> Entry:
        return self._cache.setdefault(sid, Entry())

    async def run(self, sid: str) -> tuple[Run, Entry, str]:
        path = self.path(sid)
        e = self.entry(sid)
        version, _, _ = fingerprint(path)
        async with e.lock:
            if e.run is None or e.version != version:
                run = await asyncio.to_thread(load_run, path)
                e.version, e.run, e.page, e.summary, e.details = version, run, None, None, OrderedDict()
            return e.run, e, e.version

    @property
    def shown_root(self) -> str:
        """The folder as pages and the API name it: its own name, never its absolute path."""
        return self.root.name or "."

    def shown_path(self, run_dir: Path) -> str:
        """A run directory relative to the folder served."""
        try:
            return run_dir.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return run_dir.name

    def status(self, sid: str) -> dict[str, Any]:
        path = self.path(sid)
        version, newest, n = fingerprint(path)
        running = driver_running(path)
        # A local driver holds .lock while it runs; without one (a study copied here, or driven from another
        # host) recent trial files are the only sign of life.
        recent = not rd.lock_path(path).exists() and newest > 0 and time.time() - newest < ACTIVE_WINDOW_S
        return {"id": sid, "version": version, "trial_dirs": n,
                "updated": _iso(newest) if newest else None, "active": running or recent,
                "driver_running": running}


STUDIES = web.AppKey("studies", Studies)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, default=_default, allow_nan=False), status=status,
                        content_type="application/json", headers={"Cache-Control": "no-store"})


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _clean(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def study_summary(sid: str, run: Run, status: dict[str, Any], path: str) -> dict[str, Any]:
    hs = headlines(run)
    return {**status, "name": run.name, "model": run.model, "engines": run.engines, "gpu": run.gpu,
            "path": path, "trials": len(run.trials), "states": run.state_counts(),
            "skipped": run.skipped,
            "headline": ({"label": hs[0].label, "best": hs[0].best, "trial": hs[0].best_trial, "ratio": hs[0].ratio}
                         if hs else None)}


# -- the app -------------------------------------------------------------------------------------------------

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Plotly needs inline styles and eval-free scripts; everything is served from here, nothing from elsewhere.
    "Content-Security-Policy": ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
                                "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                                "connect-src 'self'; font-src 'self' data:; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'self'"),
}


def _loopback_host(header: str) -> bool:
    """Whether a Host header names this machine's loopback (a malformed header does not)."""
    m = _HOST.fullmatch(header.strip())
    return m is not None and _loopback((m["v6"] or m["name"]).lower())


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host in LOOPBACK_NAMES


def make_app(root: str | Path, *, host: str = "127.0.0.1") -> web.Application:
    studies = Studies(Path(root))
    loopback_only = _loopback(host)

    @web.middleware
    async def guard(request: web.Request, handler):
        if loopback_only and not _loopback_host(request.host or ""):
            return web.Response(status=403, text="this report server answers requests for localhost only")
        resp = await handler(request)
        resp.headers.update({k: v for k, v in SECURITY_HEADERS.items() if k not in resp.headers})
        return resp

    app = web.Application(middlewares=[guard])
    app[STUDIES] = studies
    base = ""

    async def index(request: web.Request) -> web.Response:
        rows = await _summaries(studies)
        html = jinja_env().get_template("index.html.j2").render(
            root=studies.shown_root, studies=rows, page={"mode": "serve", "poll": f"{base}/api/studies",
                                                         "version": _list_version(rows), "base": base},
            mode="serve")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def api_studies(request: web.Request) -> web.Response:
        rows = await _summaries(studies)
        return _json(_clean({"root": studies.shown_root, "version": _list_version(rows), "studies": rows}))

    async def study_page(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        run, e, version = await studies.run(sid)
        async with e.lock:
            if e.page is None or e.version != version:
                e.page = await asyncio.to_thread(render_report, run, mode="serve", study_id=sid, version=version,
                                                 base_url=base)
            page = e.page
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def api_study(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        st = await asyncio.to_thread(studies.status, sid)
        return _json(st)

    async def api_trials_csv(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        run, _, _ = await studies.run(sid)
        df = run.trials.copy()
        if "trial_dir" in df:
            df["trial_dir"] = [os.path.relpath(p, run.run_dir) if isinstance(p, str) else p for p in df["trial_dir"]]
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = [csv_safe(v) for v in df[c]]
        df.columns = [csv_safe(str(c)) for c in df.columns]  # a scenario named =HYPERLINK(...) names columns
        text = df.to_csv(index=False)
        return web.Response(text=text, content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{_safe_name(sid)}-trials.csv"',
                                     "Cache-Control": "no-store"})

    async def api_trial(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        try:
            n = int(request.match_info["n"])
        except ValueError:
            raise web.HTTPBadRequest(text="a trial number is an integer") from None
        run, e, version = await studies.run(sid)
        d = e.details.get(n)
        if d is None:
            d = await asyncio.to_thread(trial_detail, run, n)
            if d is None:  # not cached: numbers that name no trial must not grow the cache
                return _json({"error": f"no trial {n} in study {sid}"}, status=404)
            e.details[n] = d
            while len(e.details) > DETAILS_CACHED:
                e.details.popitem(last=False)
        e.details.move_to_end(n)
        return _json(_clean(d))

    async def compare_page(request: web.Request) -> web.Response:
        a, b = request.query.get("a", ""), request.query.get("b", "")
        if not a or not b:
            raise web.HTTPBadRequest(text="compare needs two studies: /compare?a=<id>&b=<id>")
        (ra, _, va), (rb, _, vb) = await studies.run(a), await studies.run(b)
        html = await asyncio.to_thread(
            render_compare, ra, rb, mode="serve", version=f"{va}{vb}", base_url=base,
            links=(f"{base}/study/{quote(a, safe='')}", f"{base}/study/{quote(b, safe='')}"),
            poll=f"{base}/api/compare?{urlencode({'a': a, 'b': b})}")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def api_compare(request: web.Request) -> web.Response:
        a, b = request.query.get("a", ""), request.query.get("b", "")
        sa, sb = await asyncio.to_thread(studies.status, a), await asyncio.to_thread(studies.status, b)
        return _json({"version": sa["version"] + sb["version"], "active": sa["active"] or sb["active"]})

    async def plotly(request: web.Request) -> web.Response:
        return web.Response(body=_plotly_bytes(), content_type="application/javascript", charset="utf-8",
                            headers={"Cache-Control": "public, max-age=86400"})

    app.router.add_get("/", index)
    app.router.add_get("/api/studies", api_studies)
    app.router.add_get("/api/studies/{sid}", api_study)
    app.router.add_get("/api/studies/{sid}/trials.csv", api_trials_csv)
    app.router.add_get("/api/studies/{sid}/trials/{n}", api_trial)
    app.router.add_get("/api/compare", api_compare)
    app.router.add_get("/study/{sid}", study_page)
    app.router.add_get("/compare", compare_page)
    app.router.add_get("/static/plotly.min.js", plotly)
    return app


_PLOTLY: bytes | None = None


def _plotly_bytes() -> bytes:
    global _PLOTLY
    if _PLOTLY is None:
        _PLOTLY = get_plotlyjs().encode("utf-8")
    return _PLOTLY


def csv_safe(v: Any) -> Any:
    """Text that a spreadsheet would run as a formula (=, +, -, @ first) gets a leading quote."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(v)
        except ValueError:
            return "'" + v
    return v


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s) or "study"


def _list_version(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha1("|".join(f"{r['id']}={r['version']}" for r in rows).encode()).hexdigest()[:16]


async def _summaries(studies: Studies) -> list[dict[str, Any]]:
    out = []
    for sid in list(studies.all()):
        try:
            st = await asyncio.to_thread(studies.status, sid)
            run, e, version = await studies.run(sid)
            if e.summary is None or e.summary.get("version") != version:
                e.summary = study_summary(sid, run, {**st, "version": version}, studies.shown_path(run.run_dir))
            out.append({**e.summary, **{k: st[k] for k in ("active", "driver_running", "updated")}})
        except web.HTTPNotFound:
            continue  # removed since the scan
    return out


def serve(root: str | Path = ".", host: str = "127.0.0.1", port: int = 8050, *, print_fn=print) -> None:
    """Run the app until interrupted (Ctrl-C)."""
    root = Path(root)
    app = make_app(root, host=host)
    shown = f"[{host}]" if ":" in host else host
    print_fn(f"servetune report server: http://{shown}:{port}/ (studies under {root.resolve()}; Ctrl-C stops it)")
    if not _loopback(host):
        print_fn(f"warning: bound to {host}: anyone who can reach this address can read every study under "
                 f"{root.resolve()} (logs and commands included)")
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)


__all__ = ["STUDIES", "make_app", "serve", "discover", "fingerprint", "driver_running", "Studies"]
