"""The server's policy: the lanes heavy work takes turns in, its CPU priority and boxes, each visitor's fair share
and rate, the caps on requests, uploads, sessions and disk (pasted images, bundles), the owner tokens, the door
(ASGI middleware) every request passes, errors in words without server paths, and the launch settings."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import types
from pathlib import Path

import gradio as gr
from PIL import Image as PILImage

from sr.box import BoxLimit, Exceeded, Limits, run_boxed
from sr.cost import CostLimits
from sr.model.models import is_uploaded
from sr.store import Memo, cache_root, remove_stale_temps, write_atomic
from ui.words import _VISITOR

log = logging.getLogger("app")
HEAVY = "heavy"  # one concurrency id for all CPU-heavy work: parallel users queue instead of oversubscribing
# Four lanes, one job running in each: "quick" (a comparison of the shipped models with settings this server has
# already run: it reads the cache, a second or two, in this process), "short" (a first calibration of the shipped
# models estimated under SHORT_SECONDS), "long" (the rest on the shipped models: big calibrations, diagnoses,
# bundles, int8-ready) and "uploaded" (anything touching an uploaded model). All but quick run in a box at a lower
# priority. A lane keeps at most WAITING[lane] requests waiting in a heavy slot (the rest are refused in words),
# and each visitor at most SHARE requests in each lane: one visitor's long jobs or floods cannot hold the slots,
# and a long job never delays a short one.
HEAVY_SLOTS = 16
_LANES = {lane: threading.Lock() for lane in ("uploaded", "long", "short", "quick")}
_WAITING: dict[str, list[object]] = {"long": [], "short": [], "quick": []}  # the requests waiting, first first
WAITING = {"long": 1, "short": 10, "quick": HEAVY_SLOTS}
SHORT_SECONDS = 30.0
# requests one visitor may have in each lane at once (and in the upload check, "probe")
SHARE = {"quick": 2, "short": 1, "long": 1, "uploaded": 1, "probe": 1}
_SHARES: dict[tuple[str, str], int] = {}  # (visitor, lane) -> requests in it now
_SHARES_LOCK = threading.Lock()
# and at most RATE heavy requests started in any RATE_SECONDS: a flood sent at once is answered in words at once,
# instead of taking turns in the slots ahead of everyone who came after it
RATE, RATE_SECONDS = 4, 10.0
_STARTS = Memo(4096)  # visitor -> the times of its latest heavy requests
_DONE = Memo(1024)  # the comparison settings this server has completed: run again, they read the cache
QUICK_DECODE_PIXELS = 4_000_000  # a larger image, or one of more than 8 bits, is decoded in the long lane


UPLOADED_NICE = 10  # the CPU priority of boxed work (CFS weight 110 against the quick lane's 1024)
# the box every uploaded model runs in (sr.box: a process of its own): memory and wall time the operator can set
BOX_MEMORY_BYTES = int(float(os.environ.get("SR_BOX_MEMORY_GB", "3")) * 2**30)
SHIPPED_BOX_BYTES = int(float(os.environ.get("SR_SHIPPED_BOX_MEMORY_GB", "8")) * 2**30)  # short and long lanes
PROBE_SECONDS = float(os.environ.get("SR_PROBE_SECONDS", "60"))  # an upload's check and contract probe
PROBES = 2  # uploads checked at once (each in its box): one visitor's upload waits at most PROBE_SECONDS for another


def _direct(work, *args, progress=None, stop=None, **kwargs):
    """Trusted work (the shipped models) in this process, as `_boxed` would run it: `stop` reaches work that
    polls a `should_stop` (the boxed work is killed instead)."""
    if progress is not None:
        kwargs["progress"] = progress
    if stop is not None and "should_stop" in inspect.signature(work).parameters:
        kwargs["should_stop"] = stop
    return work(*args, **kwargs)


def _boxed(seconds: float, memory: int | None = None, nice: int = UPLOADED_NICE):
    """How to run work in a box (sr.box) with `memory` (BOX_MEMORY_BYTES by default), `seconds` and `nice`,
    killed at its deadline; what it cost in words when it goes over."""

    def run(work, *args, progress=None, stop=None, **kwargs):
        return run_boxed(work, *args, box=Limits(memory or BOX_MEMORY_BYTES, seconds, nice),
                         progress=progress, should_stop=stop, **kwargs)

    return run


@contextlib.contextmanager
def _visitor_share(visitor: str | None, lane: str):
    """Count one request of `visitor` (a page session) in `lane`; over its SHARE it is refused in words."""
    if visitor is None:  # a direct call (tests, scripts): nobody to share with
        yield
        return
    with _SHARES_LOCK:
        now, starts = time.monotonic(), _STARTS.get(visitor, list)
        starts[:] = [t for t in starts if now - t < RATE_SECONDS]
        if len(starts) >= RATE:
            raise gr.Error(f"You sent more than {RATE} requests in {RATE_SECONDS:.0f} s; wait a moment (each visitor "
                           "gets a fair share of this server).")
        starts.append(now)
        held = _SHARES.get((visitor, lane), 0)
        if held >= SHARE[lane]:
            raise gr.Error(f"You already have {held} request(s) of this kind running; wait for {'it' if held == 1 else 'them'} "
                           "to finish (each visitor gets a fair share of this server).")
        _SHARES[(visitor, lane)] = held + 1
    try:
        yield
    finally:
        with _SHARES_LOCK:
            left = _SHARES.pop((visitor, lane)) - 1
            if left:
                _SHARES[(visitor, lane)] = left


def _wait_turn(lane: str, progress) -> None:
    """Take `lane`'s lock, showing the real place in line; a lane with WAITING[lane] waiting already is refused
    in words (a waiting request holds one of the heavy slots)."""
    me = object()
    with _SHARES_LOCK:
        if len(_WAITING[lane]) >= WAITING[lane] and _LANES[lane].locked():
            raise gr.Error(f"The server is busy with other visitors' {lane} jobs (first calibrations, diagnoses, "
                           "bundles): try again in a minute. Comparisons with settings already run answer at once.")
        _WAITING[lane].append(me)
    try:
        while not _LANES[lane].acquire(timeout=0.5):
            if progress is not None:
                progress(None, desc=f"waiting: number {_WAITING[lane].index(me) + 1} in line")
    finally:
        with _SHARES_LOCK:
            _WAITING[lane].remove(me)


@contextlib.contextmanager
def _lane(*models, progress=None, kind: str = "long", visitor: str | None = None):
    """Hold the lane of this work and yield how to run the work in it: "uploaded" when any model is an uploaded
    ONNX model (in a box: `_boxed`), else `kind` ("quick": the caller knows it reads the cache, in this process;
    "short" or "long": in a box too, for its priority and its kill). The uploaded lane does not wait inside a
    heavy slot: when another uploaded model is being worked on, this one is refused in words."""
    lane = "uploaded" if any(is_uploaded(m) for m in models) else kind
    with _visitor_share(visitor, lane):
        if lane == "uploaded" and not _LANES[lane].acquire(blocking=False):
            raise gr.Error("Another visitor's uploaded model is being processed (uploaded models take turns so that "
                           "nobody's comparison of the shipped models waits for them): try again in a minute.")
        if lane != "uploaded":
            _wait_turn(lane, progress)
        try:
            # short jobs (a first calibration of the shipped models, bounded) at the usual priority, so that the
            # long and uploaded ones take only the CPU they leave
            yield _direct if lane == "quick" else _boxed(MAX_REQUEST_SECONDS,
                                                         None if lane == "uploaded" else SHIPPED_BOX_BYTES,
                                                         0 if lane == "short" else UPLOADED_NICE)
        finally:
            _LANES[lane].release()


# Every heavy request stops (in words) after this many seconds: with the cost cap on uploaded models, ordinary
# work takes well under a minute; the operator can raise it (SR_MAX_REQUEST_SECONDS)
MAX_REQUEST_SECONDS = float(os.environ.get("SR_MAX_REQUEST_SECONDS", "300"))


def to_page(progress, words: str = "{}"):
    """The library's progress protocol (`sr.progress.Progress`: fraction, message) shown on gradio's bar: the one
    adapter the page has (`words` puts the library's message in the page's sentence)."""
    return lambda fraction, message: progress(fraction, desc=words.format(message))


def _capped(progress, what: str):
    """`progress` for one heavy request, which stops it once it has run MAX_REQUEST_SECONDS (the library calls it
    between batches, so the request ends there, its caches left whole)."""
    deadline = time.monotonic() + MAX_REQUEST_SECONDS

    def report(fraction, desc=None, **kwargs):
        if time.monotonic() > deadline:
            raise gr.Error(f"The {what} was stopped: it ran longer than {MAX_REQUEST_SECONDS:.0f} s, the limit for one "
                           "request on this server: try fewer calibration samples, a smaller image, or run it locally.")
        progress(fraction, desc=desc, **kwargs)

    return report


MAX_UPLOAD = "25mb"
# an uploaded model's cost, known from its graph before anything runs (sr.model.usermodel.macs_per_pixel); the operator
# can raise it (SR_MAX_MMAC_PER_PIXEL); ten 3x3 convolutions of 256 channels need 5.9 million
MAX_MACS_PER_PIXEL = float(os.environ.get("SR_MAX_MMAC_PER_PIXEL", "2.0")) * 1e6
# and the largest tensor it makes (values per input pixel: x4 at 256 channels is 4096) and its scale, the largest
# the page offers; a graph whose cost cannot be counted (control flow, sizes known only at run time) is refused
COST_LIMITS = CostLimits(MAX_MACS_PER_PIXEL, float(os.environ.get("SR_MAX_TENSOR_PER_PIXEL", "4096")),
                         float(os.environ.get("SR_MAX_SCALE", "4")))
MAX_CALIBRATION_FILES = 64
MAX_CALIBRATION_PIXELS = 4_000_000  # per calibration image file
# what a session keeps of each: at most this many pixels (downscaled on upload; the calibration crops 64x64
# patches after downscaling by the model's scale anyway), so that 64 uploads hold at most ~100 MB
KEPT_CALIBRATION_PIXELS = 500_000
SESSION_STATE_SECONDS = 3600  # per-session state (images, results) is freed this long after it was set
# and at most this many sessions keep state at once (Gradio drops the least recently active beyond it): memory
# for sessions is bounded however many ids clients make up
MAX_SESSIONS = int(os.environ.get("SR_MAX_SESSIONS", "48"))


def _untouched(component: gr.Image, payload):
    """The uploaded file's path; a pasted data URL is written to a file first, byte for byte."""
    if payload is None:
        return None
    if payload.url and payload.url.startswith("data:"):
        header, _, body = payload.url.partition(",")
        data = base64.b64decode(body) if ";base64" in header else body.encode()
        return str(_pasted(data))
    if payload.path is None:
        raise gr.Error("The upload arrived without a file.")
    return str(payload.path)


PASTED_KEEP = 32  # pasted images (data: URLs) kept on disk, newest first; the same bytes are one file


def _pasted(data: bytes) -> Path:
    """A pasted image's bytes as a file under the cache's pasted/ (named by their hash: pasting the same image
    again adds nothing), the oldest beyond PASTED_KEEP removed: pastes cannot fill the disk."""
    folder = cache_root() / "pasted"
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.upload"
    if not path.is_file():
        write_atomic(data, path)
    os.utime(path)
    kept = sorted(folder.glob("*.upload"), key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    for old in kept[PASTED_KEEP:]:
        old.unlink(missing_ok=True)
    return path


def untouched_image(**kwargs) -> gr.Image:
    """A gr.Image whose upload reaches the handler as the very file the user sent (a path): Gradio neither decodes
    nor converts it, so RGBA, 16-bit, CMYK and broken files all meet `sr.data.load_image` and its messages. (An
    instance override rather than a subclass: Gradio writes a .pyi stub beside any module defining a component.)"""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    component.preprocess = types.MethodType(_untouched, component)
    return component


@contextlib.contextmanager
def _user_errors(action: str):
    """Turn what the library raises into messages a person reads: its ValueError and FileNotFoundError as they
    are, anything else as "The <action> failed" (the traceback stays in the server log, never on the page)."""
    try:
        yield
    except gr.Error:
        raise
    except BoxLimit as error:
        log.warning("%s stopped in its box: %s", action, error)
        advice = {Exceeded.TIME: "try fewer calibration samples or a smaller image, or run it locally",
                  Exceeded.MEMORY: "try a smaller image, or run it locally",
                  Exceeded.DIED: "run it locally (python -m sr ...) to see why"}[error.exceeded]
        raise gr.Error(f"The {action} was stopped: it {error.words} (one request on this server gets at most "
                       f"{error.limits.memory_bytes / 2**30:.1f} GB and {error.limits.seconds:.0f} s); {advice}. "
                       "Nothing else was affected.") from None
    except FileNotFoundError as error:  # the library names files by their base name; never a server path
        raise gr.Error(_no_paths(str(error))) from None
    except ValueError as error:
        raise gr.Error(str(error)) from None
    except PermissionError:
        log.exception("%s failed", action)
        raise gr.Error(f"The {action} failed: the server cannot write its cache folder (read-only?). The operator "
                       "can point SR_CACHE_DIR at a writable one.") from None
    except Exception as error:
        log.exception("%s failed", action)
        raise gr.Error(f"The {action} failed: {type(error).__name__}: {_no_paths(str(error))}") from None


def _no_paths(message: str) -> str:
    """A message without absolute file paths (a visitor sees the file's name at most)."""
    return re.sub(r"(?<![\w.])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)", r"\1", message)


def _visitor(request) -> str | None:
    """Whose request this is (its page session; None for a direct call), for the fair shares and the names it
    gave its models (set for the rest of this request)."""
    visitor = getattr(request, "session_hash", None) or None
    _VISITOR.set(visitor)
    return visitor


def _light(image) -> bool:
    """Whether the image decodes cheaply (at most QUICK_DECODE_PIXELS, 8 bits a sample): priced from its header,
    before any pixel is decoded; a heavy one is decoded in the long lane, in the requester's share."""
    if not isinstance(image, (str, os.PathLike)):
        return True
    try:
        with PILImage.open(image) as header:
            return header.size[0] * header.size[1] <= QUICK_DECODE_PIXELS and header.mode in ("RGB", "RGBA", "L", "P",
                                                                                             "LA", "1")
    except Exception:  # noqa: BLE001 (unreadable: the decoder's own words come later, in the long lane)
        return False


BUNDLE_KEEP_SECONDS = 900  # a bundle's zip stays this long for its download, then the next bundle removes it


def _bundle_folder() -> Path:
    """A fresh folder for one bundle under the cache's bundles/, after removing those older than
    BUNDLE_KEEP_SECONDS (so bundles cannot fill the disk)."""
    root = _remove_old_bundles()
    return Path(tempfile.mkdtemp(prefix="bundle-", dir=root))


def _remove_old_bundles() -> Path:
    """Remove the bundles older than BUNDLE_KEEP_SECONDS (also every few minutes, from `_sweeper`)."""
    root = cache_root() / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        try:
            if time.time() - old.stat().st_mtime > BUNDLE_KEEP_SECONDS:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        except OSError:
            pass
    return root


def _sweeper(every: float = BUNDLE_KEEP_SECONDS / 3) -> None:
    """Remove old bundles every `every` seconds, whether or not anyone asks for a new one."""
    while True:
        time.sleep(every)
        with contextlib.suppress(OSError):
            _remove_old_bundles()


# Owner tokens: issued by this server to each browser when the page loads (kept in its localStorage), signed so
# that only tokens it issued are accepted. Jobs and cancellations belong to the token, never to the session hash
# a client sends (anyone can send anyone's). SR_OWNER_SECRET keeps tokens valid across restarts.
_OWNER_SECRET = os.environ.get("SR_OWNER_SECRET", "").encode() or secrets.token_bytes(32)


def _signature(ident: str) -> str:
    return hmac.new(_OWNER_SECRET, ident.encode(), hashlib.sha256).hexdigest()[:32]


def issue_owner(current=None) -> str:
    """This browser's owner token: the one it holds when this server issued it, else a fresh one."""
    if _verified_owner(current):
        return current
    ident = secrets.token_urlsafe(18)
    return f"{ident}.{_signature(ident)}"


def _verified_owner(token) -> str | None:
    """The owner a token names, when this server signed it (None otherwise)."""
    ident, _, signature = str(token or "").partition(".")
    # bytes, not str: compare_digest refuses a str with non-ASCII characters (a TypeError, not a refusal)
    return ident if ident and hmac.compare_digest(signature.encode(), _signature(ident).encode()) else None


def _owner(token) -> str:
    """The owner behind a request's token; a token this server did not issue is refused in words."""
    ident = _verified_owner(token)
    if ident is None:
        raise gr.Error("This page has no owner token from this server (it may have restarted): reload the page.")
    return ident


MAX_REQUEST_BYTES = 32 * 1024 * 1024  # any request but a file upload (which has MAX_UPLOAD per file)
MAX_UPLOAD_FILES = 64  # files in one upload request (the calibration uploads' cap)
MAX_UPLOAD_REQUEST_BYTES = 256 * 1024 * 1024  # one upload request in all
# what uploads may bring in an hour (Gradio keeps uploaded files an hour): from one client address, and in all;
# so the disk uploads take is bounded however many requests arrive
_CLIENT_UPLOADS = float(os.environ.get("SR_UPLOAD_MB_PER_HOUR", "2048")) * 2**20
UPLOAD_BYTES_PER_HOUR = {"client": _CLIENT_UPLOADS, "all": 4 * _CLIENT_UPLOADS}


class RequestSizeLimit:
    """ASGI middleware, the server's door: a request body over MAX_REQUEST_BYTES is refused (413, in words; a
    chunked one too: it is read here first, then handed on), an upload request over MAX_UPLOAD_FILES files or
    MAX_UPLOAD_REQUEST_BYTES in all likewise (Gradio caps each file itself), and a queue call naming an event the
    page does not have gets 404 in words instead of a server error. A queue call carries file references, not
    files: a `data:` URL of 100 MB in its payload used to pass the upload cap and land in Gradio's temp folder."""

    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES, events: frozenset = frozenset()):
        self.app, self.max_bytes, self.events = app, max_bytes, events

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        limit = MAX_UPLOAD_REQUEST_BYTES if path.endswith("/upload") else self.max_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, 413, self._too_large(limit))
        if path.endswith("/upload"):
            return await self._upload(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self._refuse(send, 413, self._too_large(limit))
        if path.endswith("/queue/join") and self.events and self._unknown_event(body):
            return await self._refuse(send, 404, "no such event on this page: reload it")
        replayed = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return replayed.pop() if replayed else await receive()

        return await self.app(scope, replay, send)

    def _unknown_event(self, body: bytes) -> bool:
        try:
            index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError):
            return False  # Gradio answers a malformed call itself (422)
        return index is not None and index not in self.events

    async def _upload(self, scope, receive, send):
        """An upload streamed on to Gradio, its files and bytes counted on the way (a multipart part each), its
        bytes charged to its client's and everyone's hourly budget."""
        headers = dict(scope.get("headers") or [])
        client = (headers.get(b"x-forwarded-for", b"").split(b",")[0].strip().decode(errors="replace")
                  or (scope.get("client") or ("?",))[0])
        if not _UPLOADS.allows(client):
            return await self._refuse(send, 429, "this server has taken all the uploads it takes in an hour (from "
                                                 "you, or from everyone): try again later")
        boundary = headers.get(b"content-type", b"").partition(b"boundary=")[2].strip(b'"')
        seen, parts, tail = 0, 0, b""

        async def counted():
            nonlocal seen, parts, tail
            message = await receive()
            chunk = message.get("body", b"")
            seen += len(chunk)
            _UPLOADS.charge(client, len(chunk))
            parts += (tail + chunk).count(b"--" + boundary) - tail.count(b"--" + boundary) if boundary else 0
            tail = (tail + chunk)[-(len(boundary) + 2):]
            if seen > MAX_UPLOAD_REQUEST_BYTES or parts > MAX_UPLOAD_FILES + 1:  # + the closing boundary
                raise _TooLarge()
            return message

        try:
            return await self.app(scope, counted, send)
        except _TooLarge:
            return await self._refuse(send, 413, f"an upload request may carry at most {MAX_UPLOAD_FILES} files and "
                                                 f"{MAX_UPLOAD_REQUEST_BYTES // 2**20} MB in all")

    @staticmethod
    def _too_large(limit: int) -> str:
        return (f"the request is larger than {limit // 2**20} MB; upload files through the page (up to 25 MB each) "
                "instead of inside the request")

    @staticmethod
    async def _refuse(send, status: int, words: str) -> None:
        body = json.dumps({"error": words}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """A streamed request body went over the limit."""


class _UploadBudget:
    """Bytes uploaded in the last hour, per client address and in all (UPLOAD_BYTES_PER_HOUR)."""

    def __init__(self):
        self.charges: list[tuple[float, str, int]] = []
        self.lock = threading.Lock()

    def _recent(self) -> list[tuple[float, str, int]]:
        hour_ago = time.monotonic() - 3600
        self.charges = [c for c in self.charges if c[0] > hour_ago]
        return self.charges

    def allows(self, client: str) -> bool:
        with self.lock:
            recent = self._recent()
            mine = sum(size for _, who, size in recent if who == client)
            return mine < UPLOAD_BYTES_PER_HOUR["client"] and sum(c[2] for c in recent) < UPLOAD_BYTES_PER_HOUR["all"]

    def charge(self, client: str, size: int) -> None:
        with self.lock:
            if self.charges and self.charges[-1][1] == client and time.monotonic() - self.charges[-1][0] < 1:
                when, who, total = self.charges[-1]
                self.charges[-1] = (when, who, total + size)  # one entry a second per client: the list stays short
            else:
                self.charges.append((time.monotonic(), client, size))


_UPLOADS = _UploadBudget()


def clean_up() -> None:
    """What a server does as it starts: remove what crashed writers left behind, and sweep old bundles from now on."""
    for folder in ("int8", "onnx"):
        remove_stale_temps(cache_root() / folder)  # what crashed writers left behind
    threading.Thread(target=_sweeper, name="bundle-sweeper", daemon=True).start()


def launch(demo: gr.Blocks, host: str, port: int, share: bool, css: str) -> None:
    """Serve `demo` behind the door (RequestSizeLimit), with this server's caps on uploads and sessions."""
    from starlette.middleware import Middleware

    door = Middleware(RequestSizeLimit, events=frozenset(demo.fns))
    demo.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=share,
                                                   max_file_size=MAX_UPLOAD, css=css, show_error=False,
                                                   state_session_capacity=MAX_SESSIONS,
                                                   app_kwargs={"middleware": [door]})
