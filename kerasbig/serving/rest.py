"""TF Serving's REST API over a `Repository`, on a small asyncio HTTP/1.1 server with limits.

One event loop reads every connection, so slow clients cost a socket, not a thread: the headers and body of
a request must arrive within `read_timeout` seconds, and a large body (over 1/16 of `max_request_bytes`) is
read only while the bodies being held stay under `max_buffered_bytes`; small ones always are, so ordinary
requests go on while large ones wait their turn. Complete requests run on a pool of `num_threads` workers; past
`max_in_flight` requests waiting or running, or `max_connections` open connections, the reply is 503.
Every reply, errors included, is JSON (`{"error": ...}` with TF Serving's status code).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import re
import traceback
import urllib.parse
from http import HTTPStatus
from typing import Callable

from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2

from kerasbig.serving import json_tensor
from kerasbig.serving.errors import ServingError, invalid, not_found, too_large
from kerasbig.serving.repository import Repository, serialized_examples

# TF Serving's URL grammar (model_servers/http_rest_api_util.cc), case-insensitive as there; [0-9], not \d.
_VERSION_OR_LABEL = r"(?:/versions/([0-9]+)|/labels/([^/:]+))?"
PREDICT_URL = re.compile(r"/v1/models/([^/:]+)" + _VERSION_OR_LABEL + r":(classify|regress|predict)", re.I)
STATUS_URL = re.compile(r"/v1/models(?:/([^/:]+))?" + _VERSION_OR_LABEL + r"(?:/(metadata))?", re.I)
INT64_MAX = 2 ** 63 - 1


@dataclasses.dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 16 << 20
    max_request_elements: int = 1 << 22
    num_threads: int = 8
    read_timeout: float = 30.0
    max_connections: int = 2048

    @property
    def max_in_flight(self) -> int:
        return 4 * self.num_threads  # a burst queues briefly; a flood gets 503 instead of unbounded memory

    @property
    def max_buffered_bytes(self) -> int:
        return 2 * self.max_request_bytes  # a maximal body costs ~20x its size while parsed: 2 at once < 1 GB


def _decode(part: str) -> str:
    """Percent-decoding as TF Serving's DecodeArg (curl_easy_unescape): `%xx` only, `+` stays `+`."""
    return urllib.parse.unquote(part, errors="surrogateescape")


def _version(text: str | None) -> int | None:
    """absl::SimpleAtoi on the digits of the URL: leading zeros are fine, past int64 is refused."""
    if not text:
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > 19 or int(digits) > INT64_MAX:  # checked on the length first: int() refuses 4300+ digits
        raise invalid(f"Failed to convert version: {text[:100]} to numeric.")
    return int(digits)


def _proto_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


class RestApi:
    """Answers one complete HTTP request: `(status, JSON text)` for method, target and body."""

    def __init__(self, repository: Repository, max_request_elements: int, log: Callable[[str], None] = print):
        self.repository = repository
        self.max_request_elements = max_request_elements
        self.log = log

    def __call__(self, method: str, target: str, body: bytes) -> tuple[int, str]:
        try:
            return HTTPStatus.OK, self._answer(method, target.split("?", 1)[0], body)
        except ServingError as e:
            return e.http_status, _error_text(str(e))
        except Exception as e:  # a bug: the client still gets JSON, the console the traceback
            self.log(traceback.format_exc())
            return HTTPStatus.INTERNAL_SERVER_ERROR, _error_text(f"{type(e).__name__}: {e}")

    def _answer(self, method: str, path: str, body: bytes) -> str:
        if not path.lower().startswith("/v1/"):  # outside TF Serving's kPathRegex, (?i)/v1/.*
            raise not_found(f"Malformed request: {method} {path[:200]} (TF Serving's API is under /v1/)")
        match = (PREDICT_URL if method == "POST" else STATUS_URL).fullmatch(path)
        if method not in ("GET", "POST") or not match:
            raise invalid(f"Malformed request: {method} {path[:200]}")
        name, version_text, label, verb = match.groups()
        name = _decode(name) if name else ""
        version, label = _version(version_text), None if label is None else _decode(label)
        if method == "POST":
            if verb not in ("predict", "classify", "regress"):  # the regex ignores case; TF Serving's dispatch not
                raise invalid(f"Malformed request: {method} {path[:200]}")
            return self._predict(name, version, label, body) if verb == "predict" else \
                self._on_examples(verb, name, version, label, body)
        if not name:
            raise invalid("Missing model name in request.")
        if verb == "metadata":  # TF Serving prints the Any's SignatureDefMap itself, without a @type
            metadata = self.repository.servable(name, version, label).metadata()
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            metadata.metadata["signature_def"].Unpack(signature_map)
            return json.dumps({"model_spec": _proto_json(metadata.model_spec),
                               "metadata": {"signature_def": _proto_json(signature_map)}})
        return json.dumps(_proto_json(self.repository.status(name, version, label)))

    def _predict(self, name: str, version: int | None, label: str | None, body: bytes) -> str:
        request = json_tensor.parse(body)
        signature = json_tensor.signature_name(request)
        servable = self.repository.servable(name, version, label)
        request_format, inputs = json_tensor.predict_inputs(request, servable.input_dtypes(signature),
                                                            self.max_request_elements)
        return json_tensor.predict_reply(servable.run(signature, inputs), request_format)

    def _on_examples(self, verb: str, name: str, version: int | None, label: str | None, body: bytes) -> str:
        """`:classify` and `:regress`: JSON examples as tf.Examples through a classify or regress signature."""
        request = json_tensor.parse(body)
        signature = json_tensor.signature_name(request)
        examples = serialized_examples(json_tensor.examples_input(request, self.max_request_elements))
        servable = self.repository.servable(name, version, label)
        if verb == "classify":
            return json_tensor.classify_reply(servable.classify(signature, examples))
        return json_tensor.regress_reply(servable.regress(signature, examples))


def _error_text(message: str) -> str:
    return json.dumps({"error": message})


class _Refusal(Exception):
    """A request refused before it reaches the API; `status` None closes the connection without a reply."""

    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class HttpServer:
    """The asyncio front end: parses HTTP/1.1 (Content-Length bodies, keep-alive) and applies `limits`."""

    def __init__(self, answer: Callable[[str, str, bytes], tuple[int, str]], limits: Limits):
        self.answer = answer
        self.limits = limits
        self._pool = concurrent.futures.ThreadPoolExecutor(limits.num_threads, thread_name_prefix="rest")
        self._connections = 0
        self._in_flight = 0
        self._buffered = 0

    async def start(self, host: str, port: int) -> asyncio.Server:
        # The listen backlog holds a burst of connections until the loop accepts them.
        return await asyncio.start_server(self._connection, host, port, backlog=1024, limit=64 << 10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > self.limits.max_connections:
                await self._reply(writer, HTTPStatus.SERVICE_UNAVAILABLE,
                                  _error_text("Too many open connections; retry later"), keep_alive=False)
                return
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or was too slow: nothing to answer
        finally:
            self._connections -= 1
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Reads one request and replies; True when the connection stays open for the next one."""
        deadline = asyncio.get_running_loop().time() + self.limits.read_timeout
        try:
            method, target, length, keep_alive = await self._read_head(reader)
            refusal = self._refuse_body(length)
            if refusal:
                await self._discard(reader, length, deadline)  # unread data at close would reset the connection
                raise _Refusal(refusal.http_status, str(refusal))
            self._buffered += length
            try:
                body = await asyncio.wait_for(reader.readexactly(length), self._left(deadline))
                status, text = await self._answer(method, target, body)
            finally:
                self._buffered -= length
        except _Refusal as refusal:
            if refusal.status:
                await self._reply(writer, refusal.status, _error_text(refusal.message), keep_alive=False)
            return False
        except TimeoutError:  # idle, or too slow: say so, as any request gets a status and a JSON error
            await self._reply(writer, HTTPStatus.REQUEST_TIMEOUT, _error_text(
                f"The request did not arrive within {self.limits.read_timeout:g} s (--rest_api_timeout_in_ms)"),
                keep_alive=False)
            return False
        await self._reply(writer, status, text, keep_alive)
        return keep_alive

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, int, bool]:
        """(method, target, Content-Length, keep-alive) of the next request; _Refusal for a malformed one."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.limits.read_timeout)
        except asyncio.IncompleteReadError as e:  # the client closed: answer only a half-sent request
            raise _Refusal(HTTPStatus.BAD_REQUEST if e.partial.strip() else None, "Incomplete request") from e
        except asyncio.LimitOverrunError as e:
            raise _Refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "The request headers exceed 64 KiB") from e
        lines = head.decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        headers = dict(self._header(line) for line in lines[1:] if line)
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/1.") or None in headers:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "Malformed HTTP request")
        method, target, version = request_line
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        if "transfer-encoding" in headers:
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, "Chunked bodies are not supported: send a Content-Length")
        length = headers.get("content-length", "0")
        if not (length.isascii() and length.isdigit()):
            raise _Refusal(HTTPStatus.BAD_REQUEST, "Content-Length is not a number of bytes")
        return method, target, int(length), keep_alive

    async def _answer(self, method: str, target: str, body: bytes) -> tuple[int, str]:
        """The reply from a worker, or 503 at once when `max_in_flight` requests are running or queued."""
        if self._in_flight >= self.limits.max_in_flight:
            return HTTPStatus.SERVICE_UNAVAILABLE, _error_text(
                f"The server is busy: {self._in_flight} requests in flight; retry later")
        self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.answer, method, target, body)
        finally:
            self._in_flight -= 1

    @staticmethod
    def _header(line: str) -> tuple[str | None, str]:
        name, colon, value = line.partition(":")
        return (name.strip().lower() if colon else None), value.strip()

    def _refuse_body(self, length: int) -> ServingError | None:
        if length > self.limits.max_request_bytes:
            return too_large(f"The request body has {length} bytes; this server takes at most "
                             f"{self.limits.max_request_bytes} (--max_request_bytes)")
        if length > self.limits.max_request_bytes // 16 and self._buffered + length > self.limits.max_buffered_bytes:
            return ServingError("UNAVAILABLE", "The server is holding too many large request bodies; retry later")
        return None

    @staticmethod
    def _left(deadline: float) -> float:
        return max(deadline - asyncio.get_running_loop().time(), 0.0)

    async def _discard(self, reader: asyncio.StreamReader, length: int, deadline: float) -> None:
        try:
            while length > 0 and (chunk := await asyncio.wait_for(reader.read(min(length, 1 << 16)),
                                                                    self._left(deadline))):
                length -= len(chunk)
        except TimeoutError:
            pass

    async def _reply(self, writer: asyncio.StreamWriter, status: int, text: str, keep_alive: bool) -> None:
        body = text.encode()
        head = [f"HTTP/1.1 {int(status)} {HTTPStatus(status).phrase}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", *([] if keep_alive else ["Connection: close"])]
        writer.write("\r\n".join([*head, "", ""]).encode() + body)
        await asyncio.wait_for(writer.drain(), self.limits.read_timeout)  # a client that never reads is dropped
