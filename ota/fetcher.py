"""The device's HTTP client for TUF: signed requests, bounded reads, resumable target downloads.

Rules:
- Every request carries the device's `ota.request_auth` signature over `GET` and the URL path with
  its query. Redirects are not followed and only 200 and 206 are successes; any other status is a
  `DownloadHTTPError` with that status (404 is how ngclient learns there is no newer root).
  The body of such an answer is read to its end when it declares at most `DRAIN_LIMIT` bytes,
  so the connection is kept for the next request; any other one is closed unread.
- No read is unbounded: bodies are read in chunks of at most `chunk_size`, a download stops with
  `DownloadLengthMismatchError` the moment it would exceed the length ngclient allows (a declared
  `Content-Length` that is too long is refused before the body is read), and a download that
  takes longer than `total_timeout` in all is abandoned, so a server that trickles bytes cannot
  hold the device forever. Bodies are taken as sent (no content decoding), so a length is a length.
- A connection that drops or stalls mid-body is resumed with `Range: bytes=<received>-`, at most
  `retries` times per download. The answer is used only if it is a 206 whose `Content-Range`
  starts exactly there; a 200, a 416 or any other range starts the file over from byte 0.
- Bodies are collected in memory (`download_bytes`), never in a temp file: metadata is small and
  bounded by ngclient's limits, and a target is bounded by its signed length and is needed in
  memory anyway.
- Target downloads, and only those (the updater announces each one with `expect_target`), are
  also written to `partial_dir/<sha256>.part` as they arrive, so a download cut by a crash or a
  power loss resumes where it stopped: the next download reads the stored prefix back and asks
  only for the rest. The file is keyed by the content hash that is already part of the target's
  URL, so it can only ever hold (a prefix of) that one file. A partial is never trusted: the
  updater checks the length and hashes of the whole body (stored prefix included) against the
  signed metadata, and deletes the partial once that check has run, whether it passed or failed
  (`discard_partial`), so a corrupt partial costs one refused download and never more. Metadata
  is never resumed from disk.
- The progress callback sees each target chunk after it has been written (and flushed) to the
  partial file.
- A target download carries the device's attestation result, when it has a current one
  (`passport`), in `PASSPORT_HEADER`: the controller serves runes only to devices with a fresh
  affirming result. A refusal's `error` text (from a short JSON body) is part of the
  `DownloadHTTPError`, so the device can say why it was refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO
from urllib.parse import urlsplit

import urllib3
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    SlowRetrievalError,
)
from tuf.ngclient.fetcher import FetcherInterface

from attestation.identity import DeviceIdentity
from ota.request_auth import PASSPORT_HEADER, sign_request

# (method, path with query) -> the headers that authenticate the request.
RequestSigner = Callable[[str, str], Mapping[str, str]]
# (url, bytes of the target stored so far) -> None.
Progress = Callable[[str, int], None]

DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_TOTAL_TIMEOUT_S = 900.0
DEFAULT_RETRIES = 3

DRAIN_LIMIT = 4096  # bytes of an error response's body read so its connection is kept
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def device_request_signer(
    signer: CryptoSigner, device_id: str, clock: Callable[[], float] = time.time
) -> RequestSigner:
    """Sign requests as `device_id` with its identity key, dated by `clock`."""

    def sign(method: str, path: str) -> Mapping[str, str]:
        return sign_request(signer, device_id, method, path, clock())

    return sign


class TufFetcher(FetcherInterface):
    """ngclient's fetcher for the fleet: one download at a time, from one updater."""

    def __init__(
        self,
        sign: RequestSigner | None,
        *,
        partial_dir: Path | None = None,
        progress: Progress | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        pool: urllib3.PoolManager | None = None,
        passport: Callable[[], str | None] | None = None,
    ) -> None:
        if retries < 0 or chunk_size < 1:
            raise ValueError("retries must be >= 0 and chunk_size >= 1")
        self._sign = sign
        self.partial_dir = partial_dir
        self._progress = progress
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._read_timeout = read_timeout
        self._total_timeout = total_timeout
        self._retries = retries
        self._chunk_size = chunk_size
        # urllib3 retries only getting a response (a refused connection, a reused connection the
        # server had closed); a body cut short is this class's business: resuming needs to know
        # what arrived.
        self._pool = pool or urllib3.PoolManager(
            retries=urllib3.Retry(total=3, connect=2, read=1, status=0, other=0, redirect=0),
            timeout=self._timeout,
        )
        self._expected_target: str | None = None
        # Gives the attestation result a target download presents (called for each such request).
        self.passport = passport
        self._request_retries: bool | None = None  # None: the pool's own retries

    @classmethod
    def for_device(cls, identity: DeviceIdentity, **options: Any) -> TufFetcher:
        """A fetcher that signs every request with `identity`'s key."""
        return cls(device_request_signer(identity.signer, identity.device_id), **options)

    @contextlib.contextmanager
    def limited(self, seconds: float) -> Iterator[None]:
        """Within this block a request gets at most `seconds` to connect, to answer and in all,
        and nothing is tried twice: for a check that must not hold the device up."""
        saved = (
            self._timeout,
            self._read_timeout,
            self._total_timeout,
            self._retries,
            self._request_retries,
        )
        self._timeout = urllib3.Timeout(connect=seconds, read=seconds)
        self._read_timeout = self._total_timeout = seconds
        self._retries, self._request_retries = 0, False
        try:
            yield
        finally:
            (
                self._timeout,
                self._read_timeout,
                self._total_timeout,
                self._retries,
                self._request_retries,
            ) = saved

    # The updater's side.

    @contextlib.contextmanager
    def expect_target(self, sha256: str) -> Iterator[None]:
        """Within this block, a download of the URL named by `sha256` is a target download."""
        if not _SHA256.match(sha256):
            raise ValueError(f"{sha256!r} is not a lowercase hex SHA-256 digest")
        self._expected_target = sha256
        try:
            yield
        finally:
            self._expected_target = None

    def partial_path(self, sha256: str) -> Path | None:
        """Where the partial download of the target with this digest is kept, if anywhere."""
        if self.partial_dir is None or not _SHA256.match(sha256):
            return None
        return self.partial_dir / f"{sha256}.part"

    def discard_partial(self, sha256: str) -> None:
        """Forget the stored bytes of a target download (after it was verified or refused)."""
        path = self.partial_path(sha256)
        if path is not None:
            path.unlink(missing_ok=True)

    # ngclient's side.

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """The body of `url`, at most `max_length` bytes, in memory (ngclient's metadata reads
        and `TufClient.fetch_target`); an announced target also goes to its partial file."""
        target = self._target_digest(url)
        partial = self.partial_path(target) if target else None
        if partial is None:
            return self._download(url, None, 0, b"", max_length, target is not None)
        partial.parent.mkdir(parents=True, exist_ok=True)
        # Opened to append: every write lands at the end of what is kept (see `_download`).
        with partial.open("a+b") as out:
            stored = out.seek(0, 2)
            if stored > max_length:
                out.truncate(0)
                stored = 0
            out.seek(0)
            prefix = out.read(stored) if stored else b""
            if len(prefix) == max_length:
                return prefix
            return self._download(url, out, len(prefix), prefix, max_length, True)

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """`download_bytes` as a file; an announced target's partial is deleted afterwards (its
        reader has checked it by then, or failed)."""
        target = self._target_digest(url)
        try:
            yield io.BytesIO(self.download_bytes(url, max_length))
        finally:
            if target is not None:
                self.discard_partial(target)

    def _fetch(self, url: str) -> Iterator[bytes]:
        """The body of `url`, resumed after drops; ngclient itself uses `download_bytes`."""
        return self._plain_chunks(url)

    def _plain_chunks(self, url: str) -> Iterator[bytes]:
        deadline = time.monotonic() + self._total_timeout
        delivered = 0
        for position, chunk in self._stream(url, 0, None, deadline):
            # A restarted body repeats bytes already delivered; skip them.
            skip = delivered - position
            if skip < len(chunk):
                yield chunk[max(skip, 0) :]
                delivered = position + len(chunk)

    # Internals.

    def _target_digest(self, url: str) -> str | None:
        expected = self._expected_target
        if expected is None:
            return None
        name = urlsplit(url).path.rpartition("/")[2]
        return expected if name.startswith(f"{expected}.") else None

    def _download(
        self,
        url: str,
        out: BinaryIO | None,
        start: int,
        prefix: bytes,
        limit: int,
        is_target: bool,
    ) -> bytes:
        """The body from byte `start` appended to `prefix` (its first `start` bytes); with `out`
        (a target's partial file), each chunk is also written and flushed there before
        `progress` sees it, so a crash leaves what arrived for a resume."""
        deadline = time.monotonic() + self._total_timeout
        chunks = [prefix] if prefix else []
        written = start
        for position, chunk in self._stream(url, start, limit, deadline):
            if position != written:
                # The server started over: keep only what precedes `position` (always 0 today).
                kept = b"".join(chunks)[:position]
                chunks = [kept] if kept else []
                if out is not None:
                    out.seek(position)
                    out.truncate()
            chunks.append(chunk)
            written = position + len(chunk)
            if out is not None:
                out.write(chunk)
                out.flush()
            if is_target and self._progress is not None:
                self._progress(url, written)
        return b"".join(chunks)

    def _stream(
        self, url: str, start: int, limit: int | None, deadline: float
    ) -> Iterator[tuple[int, bytes]]:
        """(offset, chunk) pairs of the body from `start`; an offset below the previous end
        means the server started over and the reader must drop what it had after it."""
        position = start
        failures = 0
        while True:
            response, position = self._open(url, position, limit)
            complete = False
            try:
                while True:
                    if time.monotonic() > deadline:
                        raise SlowRetrievalError(
                            f"downloading {_path(url)} took more than {self._total_timeout:g} s"
                        )
                    chunk = response.read1(self._chunk_size)
                    if not chunk:
                        complete = True
                        return
                    if limit is not None and position + len(chunk) > limit:
                        raise DownloadLengthMismatchError(
                            f"{_path(url)} sent more than the {limit} bytes allowed"
                        )
                    yield position, chunk
                    position += len(chunk)
            except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as exc:
                failures += 1
                if failures > self._retries:
                    raise _interrupted(url, position, failures, exc, self._read_timeout) from exc
            except urllib3.exceptions.HTTPError as exc:
                raise DownloadError(f"downloading {_path(url)} failed: {exc}") from exc
            finally:
                _finish(response, complete)

    def _open(
        self, url: str, position: int, limit: int | None
    ) -> tuple[urllib3.BaseHTTPResponse, int]:
        """A response whose body starts at the returned offset: `position`, or 0."""
        response = self._request(url, position)
        status = response.status
        if position and status in (200, 206, 416):
            if status == 206 and _range_start(response.headers.get("Content-Range")) == position:
                pass
            else:
                if status != 200:
                    _finish(response, False)
                    response = self._request(url, 0)
                    status = response.status
                position = 0
        if status not in (200, 206) or (status == 206 and position == 0):
            body = _drained(response)
            _finish(response, body is not None)
            raise DownloadHTTPError(f"HTTP {status} for {_path(url)}{_said(body)}", status)
        declared = response.headers.get("Content-Length")
        total = position + int(declared) if declared and declared.isdigit() else None
        if limit is not None and total is not None and total > limit:
            _finish(response, False)
            raise DownloadLengthMismatchError(
                f"{_path(url)} is {total} bytes, more than the {limit} allowed"
            )
        return response, position

    def _request(self, url: str, position: int) -> urllib3.BaseHTTPResponse:
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = dict(self._sign("GET", path)) if self._sign is not None else {}
        headers["Accept-Encoding"] = "identity"
        passport = self.passport() if self._expected_target and self.passport else None
        if passport:
            headers[PASSPORT_HEADER] = passport
        if position:
            headers["Range"] = f"bytes={position}-"
        try:
            return self._pool.request(
                "GET",
                url,
                headers=headers,
                preload_content=False,
                decode_content=False,
                redirect=False,
                timeout=self._timeout,
                retries=self._request_retries,
            )
        except urllib3.exceptions.MaxRetryError as exc:
            reason = exc.reason
            if isinstance(reason, urllib3.exceptions.NewConnectionError):
                # The message repeats the connection object before the cause; keep the cause.
                cause = str(reason).rpartition("): ")[2]
                raise DownloadError(f"cannot connect to {parts.netloc}: {cause}") from exc
            if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
                raise SlowRetrievalError(
                    f"cannot connect to {parts.netloc}: no answer within "
                    f"{self._timeout.connect_timeout} s"
                ) from exc
            if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
                raise SlowRetrievalError(
                    f"{parts.netloc} sent no response to GET {path} within {self._read_timeout:g} s"
                ) from exc
            raise DownloadError(f"GET {path} from {parts.netloc} failed: {reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise DownloadError(f"GET {path} from {parts.netloc} failed: {exc}") from exc


def _drained(response: urllib3.BaseHTTPResponse) -> bytes | None:
    """The short body of a refusal when it was read to its end, so that its connection can be
    reused (ngclient learns there is no newer root from a 404, on every refresh); else None."""
    declared = response.headers.get("Content-Length")
    if not declared or not declared.isdigit() or int(declared) > DRAIN_LIMIT:
        return None
    try:
        body = response.read(DRAIN_LIMIT + 1)
    except (urllib3.exceptions.HTTPError, OSError):
        return None
    return body if len(body) == int(declared) else None


def _said(body: bytes | None) -> str:
    """`: <error>` from a refusal's JSON body (`{"error": ...}`), one line, bounded; or ``."""
    try:
        error = json.loads(body or b"").get("error")
    except (ValueError, AttributeError):
        return ""
    return f": {' '.join(error.split())[:300]}" if isinstance(error, str) and error else ""


def _finish(response: urllib3.BaseHTTPResponse, complete: bool) -> None:
    """Give the connection back; one with an unread body is closed, never reused."""
    if not complete:
        response.close()
    response.release_conn()


def _path(url: str) -> str:
    return urlsplit(url).path


def _range_start(value: str | None) -> int | None:
    match = _CONTENT_RANGE.match(value or "")
    return int(match.group(1)) if match else None


def _interrupted(
    url: str, position: int, failures: int, exc: Exception, read_timeout: float
) -> DownloadError:
    tries = f"after {failures} attempt{'s' if failures > 1 else ''}"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return SlowRetrievalError(
            f"{_path(url)} stalled at byte {position}: no data for {read_timeout:g} s {tries}"
        )
    return DownloadError(f"the connection dropped at byte {position} of {_path(url)} {tries}")
