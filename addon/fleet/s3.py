"""The shared tier of fleet mode: blobs, manifests, tags and recordings in one S3 bucket
(`SharedStore`), and a Redis lock so that one node at a time fills a digest (`FleetLock`). A key
shows nothing or a whole object; what is read back is verified; every failure is one
`SharedStoreError` line. The bucket's layout is in docs/fleet.md."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import boto3
import redis
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import NewConnectionError

from ..registry.protocol import DIGEST_RE, MAX_MANIFEST, NAME_RE, TAG_RE, digest_of, parse_json
from ..storage.recordings import check_name
from ..storage.store import Manifest

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
CHUNK = 1 * MiB  # what open_blob yields at a time
CLOCK_SKEW = 300  # seconds a node's clock may run ahead of this one's


class SharedStoreError(OSError):
    """The shared store (or the fleet lock) failed. str() is one line for an operator."""


class NotInSharedStore(SharedStoreError):
    """open_blob: the store has no such blob (or not from that offset on)."""


@dataclass(frozen=True)
class SharedTag:
    digest: str
    media_type: str
    confirmed: float  # when upstream last confirmed (or gave) this digest for the tag (time.time())


class SharedBlob:
    """A blob being read from the shared store: iterate for chunks of at most CHUNK bytes. Close it
    (or use it as a context manager) to free the connection."""

    def __init__(self, body: Any, start: int, size: int, describe: str):
        self._body = body
        self.start = start  # offset of the first byte yielded
        self.size = size  # the whole blob's size
        self._describe = describe

    def __iter__(self) -> Iterator[bytes]:
        with _errors(self._describe):
            yield from self._body.iter_chunks(CHUNK)

    def read(self, n: int = -1) -> bytes:
        with _errors(self._describe):
            return self._body.read(None if n < 0 else n)

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> SharedBlob:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SharedStore:
    """One bucket (and key prefix) of an S3 endpoint, shared by every node of a fleet.

    Thread-safe: one boto3 client, whose connection pool the threads share.
    """

    def __init__(
        self,
        url: str,
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        verify: bool | str = True,
        timeout: float = 10.0,
        *,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
    ):
        """`url` is s3://bucket[/prefix]. `endpoint` None means AWS itself; credentials None
        means boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws). `verify`
        is True, False or a CA bundle's path; `timeout` bounds each connect and each read."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise SharedStoreError(f"shared store {url!r}: not an s3://bucket[/prefix] URL")
        self.url = url
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self._prefix = f"{prefix}/" if prefix else ""
        self.timeout = timeout
        try:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                # A self-hosted store has one region, which its signatures must name.
                region_name=region or ("us-east-1" if endpoint else None),
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                verify=verify,
                config=Config(
                    connect_timeout=timeout,
                    read_timeout=timeout,
                    # One retry: this is a cache tier; when it fails the node goes upstream instead.
                    retries={"total_max_attempts": 2, "mode": "standard"},
                    max_pool_connections=32,
                    # Self-hosted stores serve bucket names in the path, not as host names.
                    s3={"addressing_style": "path" if endpoint else "auto"},
                    # Stores other than AWS may not know the newer checksum trailers.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        except (BotoCoreError, ValueError) as e:
            raise SharedStoreError(f"shared store {endpoint or url}: {_reason(e)}") from None
        self.name = f"shared store {self._client.meta.endpoint_url}"
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=part_size,
            max_concurrency=4,
        )

    def check(self) -> None:
        """Raise SharedStoreError unless the endpoint answers, accepts the credentials and has
        the bucket."""
        with self._errors(""):
            self._client.head_bucket(Bucket=self.bucket)

    # --- blobs ------------------------------------------------------------------

    def blob_size(self, digest: str) -> int | None:
        head = self._head(self._digest_key("blobs", digest), f"blob {digest}")
        return None if head is None else int(head["ContentLength"])

    def put_blob(self, digest: str, path: str | os.PathLike[str]) -> bool:
        """Upload the local file at `path`, already verified to be `digest`, in parts when it is
        large. Returns False when the store already had it with that size (nothing sent)."""
        key = self._digest_key("blobs", digest)
        size = os.path.getsize(path)
        if self.blob_size(digest) == size:
            return False
        with self._errors(f"put blob {digest}"):
            self._client.upload_file(
                os.fspath(path),
                self.bucket,
                key,
                ExtraArgs={"ContentType": "application/octet-stream"},
                Config=self._transfer,
            )
        return True

    def delete_blob(self, digest: str) -> None:
        """Remove the blob (one that did not hash to its digest when a node read it)."""
        key = self._digest_key("blobs", digest)
        with self._errors(f"delete blob {digest}"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def open_blob(self, digest: str, start: int = 0) -> SharedBlob:
        """Stream the blob from byte `start` on. Raises NotInSharedStore when it is missing or
        shorter than `start` + 1 bytes."""
        describe = f"{self.name}: get blob {digest}"
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._digest_key("blobs", digest)}
        if start:
            args["Range"] = f"bytes={start}-"
        try:
            with _errors(describe):
                obj = self._client.get_object(**args)
        except SharedStoreError as e:
            if isinstance(e.__cause__, ClientError) and _code(e.__cause__) in ("NoSuchKey", "InvalidRange"):
                raise NotInSharedStore(f"{describe}: not there" + (f" from byte {start} on" if start else "")) from None
            raise
        size = int(obj["ContentRange"].rpartition("/")[2]) if start else int(obj["ContentLength"])
        return SharedBlob(obj["Body"], start, size, describe)

    # --- manifests --------------------------------------------------------------

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        if digest_of(body, digest.partition(":")[0]) != digest:
            raise ValueError(f"manifest bytes do not match {digest}")
        with self._errors(f"put manifest {digest}"):
            self._client.put_object(
                Bucket=self.bucket, Key=self._digest_key("manifests", digest), Body=body, ContentType=media_type
            )

    def get_manifest(self, digest: str) -> Manifest | None:
        """The manifest, or None when missing or when its bytes do not match `digest` (logged)."""
        found = self._get_small(self._digest_key("manifests", digest), f"manifest {digest}")
        if found is None:
            return None
        body, content_type = found
        if digest_of(body, digest.partition(":")[0]) != digest:
            logger.warning("%s: manifest %s read back does not match its digest; not used", self.name, digest)
            return None
        return Manifest(digest, content_type, body)

    # --- tags -------------------------------------------------------------------

    def put_tag(
        self, registry: str, name: str, tag: str, digest: str, media_type: str, confirmed: float | None = None
    ) -> None:
        if not DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a digest hubcache can verify: {digest!r}")
        when = time.time() if confirmed is None else confirmed
        record = {"digest": digest, "media_type": media_type, "confirmed": when}
        with self._errors(f"put tag {registry}/{name}:{tag}"):
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._tag_key(registry, name, tag),
                Body=json.dumps(record).encode(),
                ContentType="application/json",
            )

    def get_tag(self, registry: str, name: str, tag: str) -> SharedTag | None:
        """The tag's record, or None when missing or unreadable (logged)."""
        found = self._get_small(self._tag_key(registry, name, tag), f"tag {registry}/{name}:{tag}")
        if found is None:
            return None
        try:
            record = parse_json(found[0])
            shared = SharedTag(str(record["digest"]), str(record["media_type"]), float(record["confirmed"]))
        except (ValueError, KeyError, TypeError):
            shared = None
        if shared is None or not DIGEST_RE.fullmatch(shared.digest):
            logger.warning("%s: tag %s/%s:%s is not a readable tag record; not used", self.name, registry, name, tag)
            return None
        if not 0 <= shared.confirmed <= time.time() + CLOCK_SKEW:
            # A time to come would spare the tag revalidation for ever: count it as never confirmed.
            logger.warning("%s: tag %s/%s:%s claims an impossible confirmation time; revalidated", self.name, registry, name, tag)
            return SharedTag(shared.digest, shared.media_type, 0.0)
        return SharedTag(shared.digest, shared.media_type, min(shared.confirmed, time.time()))

    # --- recordings -------------------------------------------------------------

    def put_recording(self, name: str, text: str) -> None:
        with self._errors(f"put recording {name}"):
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._recording_key(name),
                Body=text.encode(),
                ContentType="application/yaml",
            )

    def get_recording(self, name: str) -> str | None:
        found = self._get_small(self._recording_key(name), f"recording {name}")
        return None if found is None else found[0].decode("utf-8", "replace")

    def recordings(self) -> list[str]:
        """Names of the recordings in the store, sorted."""
        folder = f"{self._prefix}recordings/"
        names: list[str] = []
        with self._errors("list recordings"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                for item in page.get("Contents", []):
                    name = item["Key"][len(folder) :]
                    if name.endswith(".yaml") and "/" not in name:
                        names.append(name.removesuffix(".yaml"))
        return sorted(names)

    # --- keys and requests ------------------------------------------------------

    def _digest_key(self, kind: str, digest: str) -> str:
        if not DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a digest hubcache can verify: {digest!r}")
        algorithm, _, hex_ = digest.partition(":")
        return f"{self._prefix}{kind}/{algorithm}/{hex_}"

    def _tag_key(self, registry: str, name: str, tag: str) -> str:
        # Names from the distribution grammar cannot climb out of their folder ("..", "//").
        if "/" in registry or registry in ("", ".", "..") or not NAME_RE.fullmatch(name) or not TAG_RE.fullmatch(tag):
            raise ValueError(f"not a tag reference: {registry}/{name}:{tag}")
        return f"{self._prefix}tags/{registry}/{name}/{tag}"

    def _recording_key(self, name: str) -> str:
        return f"{self._prefix}recordings/{check_name(name)}.yaml"

    def _head(self, key: str, what: str) -> dict[str, Any] | None:
        try:
            with self._errors(f"head {what}"):
                return self._client.head_object(Bucket=self.bucket, Key=key)
        except SharedStoreError as e:
            if isinstance(e.__cause__, ClientError) and _code(e.__cause__) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _get_small(self, key: str, what: str) -> tuple[bytes, str] | None:
        """A small object's bytes and Content-Type, or None when it is missing."""
        try:
            with self._errors(f"get {what}"):
                obj = self._client.get_object(Bucket=self.bucket, Key=key)
                with obj["Body"] as body:
                    if int(obj["ContentLength"]) > MAX_MANIFEST:
                        raise SharedStoreError(f"{self.name}: get {what}: {obj['ContentLength']} bytes, too large")
                    return body.read(), obj.get("ContentType", "")
        except SharedStoreError as e:
            if isinstance(e.__cause__, ClientError) and _code(e.__cause__) == "NoSuchKey":
                return None
            raise

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        with _errors(f"{self.name}: {what}" if what else self.name, self.bucket, self.timeout):
            yield


@contextmanager
def _errors(describe: str, bucket: str = "", timeout: float | None = None) -> Iterator[None]:
    """Turn what boto3, botocore and urllib3 raise into one SharedStoreError line; the original
    stays as __cause__ for callers that tell "missing" from "failed"."""
    try:
        yield
    except SharedStoreError:
        raise
    except (BotoCoreError, ClientError, Urllib3Error, OSError, boto3.exceptions.Boto3Error) as e:
        cause = _client_error(e) or e
        raise SharedStoreError(f"{describe}: {_reason(cause, bucket, timeout)}") from cause


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e`, then what it wraps: botocore keeps the underlying error in kwargs["error"]."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        kwargs = getattr(x, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        todo += [c for c in (inner, x.__cause__, x.__context__) if isinstance(c, BaseException)]


def _client_error(e: BaseException) -> ClientError | None:
    # boto3's S3UploadFailedError only carries the ClientError as its context.
    return next((x for x in _chain(e) if isinstance(x, ClientError)), None)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _reason(e: BaseException, bucket: str = "", timeout: float | None = None) -> str:
    if isinstance(e, ClientError):
        code = _code(e)
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code == "404" and e.operation_name == "HeadBucket"):
            return f"bucket {bucket!r} does not exist"
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return "access denied" + (f" ({code})" if code and code not in ("403", "AccessDenied") else "")
        message = " ".join(str(e.response.get("Error", {}).get("Message", "")).split())
        return f"{code or f'HTTP {status}'}" + (f": {message}" if message else "")
    if isinstance(e, IncompleteReadError):
        return f"connection closed after {e.kwargs['actual_bytes']} of {e.kwargs['expected_bytes']} bytes"
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials)"
    after = f" after {timeout:g} s" if timeout else ""
    connecting = any(isinstance(x, (EndpointConnectionError, NewConnectionError)) for x in _chain(e))
    for x in _chain(e):
        if isinstance(x, ConnectTimeoutError):
            return f"cannot connect (timed out{after})"
        if isinstance(x, (ReadTimeoutError, TimeoutError)):
            return f"no answer (timed out{after})"
        if isinstance(x, SSLError):
            break
        if isinstance(x, OSError) and x.strerror:
            return f"{'cannot connect' if connecting else 'failed'} ({x.strerror})"
    return " ".join(str(e).split()) or type(e).__name__


_LOCKLESS = ""  # the token of a lock granted while Redis was unreachable: nothing to refresh or free


class FleetLock:
    """Per-digest locks in Redis, so one node of the fleet fills a digest while the others wait
    for the shared store to have it.

    A lock is a key holding a random token with a TTL (SET NX PX): it frees itself when its
    holder dies. Only the holder's token releases or refreshes it. When Redis cannot be reached
    the lock is advisory and absent: acquire() answers True (and one warning line is logged per
    outage), so a node keeps working and at worst fetches what another node fetches too.
    """

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    _REFRESH = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
    )

    def __init__(self, url: str, timeout: float = 5.0, namespace: str = "hubcache"):
        """`url` is redis://host:port/db (or rediss:// for TLS). `namespace` separates fleets
        sharing one Redis (e.g. the shared store's URL)."""
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        except ValueError as e:
            raise SharedStoreError(f"fleet lock {url!r}: {e}") from None
        self.name = f"fleet lock {_without_password(url)}"
        self._namespace = namespace
        self._tokens: dict[str, str] = {}  # digest -> our token, for the locks this node holds
        self._mutex = threading.Lock()
        self._down = False

    def check(self) -> None:
        """Raise SharedStoreError unless Redis answers."""
        try:
            self._redis.ping()
        except redis.RedisError as e:
            raise SharedStoreError(f"{self.name}: {_redis_reason(e)}") from None

    def acquire(self, digest: str, ttl: float) -> bool:
        """Take the lock on `digest` for `ttl` seconds. False when another holder has it."""
        token = secrets.token_hex(16)
        try:
            won = bool(self._redis.set(self._key(digest), token, nx=True, px=max(1, int(ttl * 1000))))
        except redis.RedisError as e:
            self._unreachable(e)
            token, won = _LOCKLESS, True
        else:
            self._reachable()
        if won:
            with self._mutex:
                self._tokens[digest] = token
        return won

    def refresh(self, digest: str, ttl: float) -> bool:
        """Extend our lock on `digest` to `ttl` seconds from now. False when it is not ours (any
        more): it expired and another node may hold it."""
        with self._mutex:
            token = self._tokens.get(digest)
        if token is None:
            return False
        if token == _LOCKLESS:
            return True
        try:
            ours = bool(self._redis.eval(self._REFRESH, 1, self._key(digest), token, max(1, int(ttl * 1000))))
        except redis.RedisError as e:
            self._unreachable(e)
            return True
        self._reachable()
        return ours

    def release(self, digest: str) -> None:
        """Free our lock on `digest`; a lock that is not ours is left alone."""
        with self._mutex:
            token = self._tokens.pop(digest, None)
        if token is None or token == _LOCKLESS:
            return
        try:
            self._redis.eval(self._RELEASE, 1, self._key(digest), token)
        except redis.RedisError as e:
            self._unreachable(e)  # the TTL frees it
            return
        self._reachable()

    def held(self, digest: str) -> bool:
        """Whether any node holds the lock on `digest`. False when Redis cannot be reached: there
        is no lock then, and nobody to wait for."""
        try:
            found = bool(self._redis.exists(self._key(digest)))
        except redis.RedisError as e:
            self._unreachable(e)
            return False
        self._reachable()
        return found

    def close(self) -> None:
        self._redis.close()

    def _key(self, digest: str) -> str:
        return f"{self._namespace}:lock:{digest}"

    def _unreachable(self, e: redis.RedisError) -> None:
        if not self._down:
            self._down = True
            logger.warning("%s: %s; working without the lock", self.name, _redis_reason(e))

    def _reachable(self) -> None:
        if self._down:
            self._down = False
            logger.info("%s: reachable again", self.name)


def _redis_reason(e: redis.RedisError) -> str:
    if isinstance(e, redis.TimeoutError):
        return "no answer (timed out)"
    if isinstance(e, redis.ConnectionError):
        inner = next((x for x in _chain(e) if isinstance(x, OSError) and x.strerror), None)
        return f"cannot connect ({inner.strerror})" if inner else f"cannot connect ({' '.join(str(e).split())})"
    return " ".join(str(e).split()) or type(e).__name__


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
