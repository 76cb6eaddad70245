"""`Storage` on S3 and S3-compatible services, through fsspec's s3fs (credentials and endpoint as botocore finds
them: AWS_* environment variables, profiles, AWS_ENDPOINT_URL for MinIO and the like)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import s3fs
from fsspec.asyn import sync

from ..errors import CkptError, UsageError
from .base import Blob, PreconditionFailed, Storage

_READ_BLOCK = 8 * 2**20
_BATCH = 1000
CONNECTIONS = 128  # requests one client keeps in flight at most (ckpt.store.TASKS_IN_FLIGHT)
COPY_CONCURRENCY = 32  # keys per LIST page and per DeleteObjects request (the S3 maximum)


def _code(e: BaseException) -> str:
    """The S3 error code behind an exception s3fs translated (its cause is botocore's ClientError)."""
    for err in (e, e.__cause__):
        resp = getattr(err, "response", None)
        if isinstance(resp, dict):
            return str(resp.get("Error", {}).get("Code", ""))
    return ""


def _conflict(e: BaseException) -> bool:
    # 412 PreconditionFailed; 409 ConditionalRequestConflict when two conditional writes race on AWS
    return _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _seconds(when: Any) -> float:
    return when.timestamp() if hasattr(when, "timestamp") else 0.0


def _missing(e: BaseException) -> bool:
    return isinstance(e, FileNotFoundError) or _code(e) in ("NoSuchKey", "404", "NotFound")


class S3Storage(Storage):
    """Objects under `s3://bucket/prefix/`."""

    def __init__(self, url: str):
        rest = url[len("s3://") :].strip("/")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"workspace URL {url!r} names no bucket", hint="use s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # no listings cache: every listing must see other machines' writes. The instance itself is shared by
        # fsspec (keyed by these arguments): a client costs ~0.3 s to build, once per process
        # connections: botocore's default of 10 would queue `tasks`' reads of 100 manifests ten deep
        self.fs = s3fs.S3FileSystem(use_listings_cache=False, config_kwargs={"max_pool_connections": CONNECTIONS})

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{self.prefix}{key}"

    def _url_of(self, kw: dict[str, Any]) -> str:
        return f"s3://{self.bucket}/{kw.get('Key', '')}"

    def _call(self, method: str, **kw: Any) -> Any:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, **kw)
        except OSError as e:
            if _conflict(e):
                raise PreconditionFailed(f"{self._url_of(kw)} changed or exists already") from None
            if _code(e) == "NoSuchBucket":
                raise CkptError(f"bucket '{self.bucket}' does not exist", hint="create it first") from None
            if _missing(e):
                raise FileNotFoundError(self._url_of(kw)) from None
            raise

    def get(self, key: str) -> tuple[bytes, str]:
        got = self._get(key)
        assert got is not None
        return got

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        limit = asyncio.Semaphore(COPY_CONCURRENCY)

        async def one(key: str) -> bytes | None:
            async with limit:
                try:
                    resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
                except OSError as e:
                    if _missing(e):
                        return None
                    raise
                async with resp["Body"] as body:
                    data: bytes = await body.read()
                    return data

        async def all_of() -> list[bytes | None]:
            return list(await asyncio.gather(*(one(k) for k in keys)))

        return sync(self.fs.loop, all_of)

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        return self._get(key, etag)

    def _get(self, key: str, etag: str | None = None) -> tuple[bytes, str] | None:
        cond = {"IfNoneMatch": etag} if etag else {}

        async def read() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key), **cond)
            async with resp["Body"] as body:
                return await body.read(), str(resp["ETag"])

        try:
            return sync(self.fs.loop, read)
        except OSError as e:
            if etag and _code(e) in ("304", "NotModified"):
                return None
            if _missing(e):
                raise FileNotFoundError(f"{self.url}/{key}") from None
            raise

    def head(self, key: str) -> Blob | None:
        try:
            resp = self._call("head_object", Key=self._key(key))
        except FileNotFoundError:
            return None
        return Blob(key, int(resp["ContentLength"]), str(resp["ETag"]), _seconds(resp.get("LastModified")))

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        cond: dict[str, str] = {}
        if if_match is not None:
            cond["IfMatch"] = if_match
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        return str(self._call("put_object", Key=self._key(key), Body=data, **cond)["ETag"])

    def upload(self, key: str, source: Path, *, if_none_match: bool = False) -> str:
        try:
            self.fs.put_file(str(source), self._path(key), mode="create" if if_none_match else "overwrite")
        except FileExistsError:
            raise PreconditionFailed(f"{self.url}/{key} exists already") from None
        except OSError as e:
            if _conflict(e):
                raise PreconditionFailed(f"{self.url}/{key} exists already") from None
            raise
        return ""

    def download(self, key: str, dest: Path) -> None:
        try:
            self.fs.get_file(self._path(key), str(dest))
        except OSError as e:
            if _missing(e):
                raise FileNotFoundError(f"{self.url}/{key}") from None
            raise

    def sha256(self, key: str) -> str:
        sha = hashlib.sha256()
        try:
            with self.fs.open(self._path(key), "rb", block_size=_READ_BLOCK) as f:
                while chunk := f.read(_READ_BLOCK):
                    sha.update(chunk)
        except OSError as e:
            if _missing(e):
                raise FileNotFoundError(f"{self.url}/{key}") from None
            raise
        return sha.hexdigest()

    def copy(self, src: str, dst: str) -> None:
        source = {"Bucket": self.bucket, "Key": self._key(src)}
        try:
            self._call("copy_object", Key=self._key(dst), CopySource=source)
        except OSError as e:
            if _code(e) not in ("InvalidRequest", "EntityTooLarge"):
                raise
            self.fs.copy(self._path(src), self._path(dst))  # over 5 GiB: s3fs copies part by part, still server-side

    def copy_many(self, pairs: list[tuple[str, str]]) -> None:
        # S3 has no batch copy: one CopyObject each, COPY_CONCURRENCY in flight (each is a server-side copy)
        small = asyncio.Semaphore(COPY_CONCURRENCY)
        large: list[tuple[str, str]] = []

        async def one(src: str, dst: str) -> None:
            async with small:
                try:
                    await self.fs._call_s3(
                        "copy_object",
                        Bucket=self.bucket,
                        Key=self._key(dst),
                        CopySource={"Bucket": self.bucket, "Key": self._key(src)},
                    )
                except OSError as e:
                    if _code(e) in ("InvalidRequest", "EntityTooLarge"):
                        large.append((src, dst))
                    elif _missing(e):
                        raise FileNotFoundError(f"s3://{self.bucket}/{self._key(src)}") from None
                    else:
                        raise

        async def all_of() -> None:
            await asyncio.gather(*(one(s, d) for s, d in pairs))

        sync(self.fs.loop, all_of)
        for src, dst in large:
            self.copy(src, dst)

    def incomplete_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        out: list[tuple[str, str, float]] = []
        kw: dict[str, Any] = {"Prefix": self._key(prefix)}
        while True:
            page = self._call("list_multipart_uploads", **kw)
            for u in page.get("Uploads", []):
                out.append((u["Key"][len(self.prefix) :], u["UploadId"], time.time() - _seconds(u.get("Initiated"))))
            if not page.get("IsTruncated"):
                return out
            kw.update(KeyMarker=page.get("NextKeyMarker", ""), UploadIdMarker=page.get("NextUploadIdMarker", ""))

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._call("abort_multipart_upload", Key=self._key(key), UploadId=upload_id)
        except FileNotFoundError:  # NoSuchUpload: completed or aborted meanwhile
            pass

    def children(self, prefix: str) -> list[str]:
        names: list[str] = []
        kw: dict[str, Any] = {"Prefix": self._key(prefix), "Delimiter": "/", "MaxKeys": _BATCH}
        cut = len(self._key(prefix))
        while True:
            resp = self._call("list_objects_v2", **kw)
            names += [p["Prefix"][cut:].rstrip("/") for p in resp.get("CommonPrefixes", [])]
            if not resp.get("IsTruncated"):
                return sorted(names)
            kw["ContinuationToken"] = resp["NextContinuationToken"]

    def list_prefix(self, prefix: str) -> list[Blob]:
        out: list[Blob] = []
        kw: dict[str, Any] = {"Prefix": self._key(prefix), "MaxKeys": _BATCH}
        cut = len(self.prefix)
        while True:
            resp = self._call("list_objects_v2", **kw)
            for o in resp.get("Contents", []):
                out.append(Blob(o["Key"][cut:], int(o["Size"]), str(o["ETag"]), _seconds(o.get("LastModified"))))
            if not resp.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = resp["NextContinuationToken"]

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), _BATCH):
            batch = [{"Key": self._key(k)} for k in keys[i : i + _BATCH]]
            resp = self._call("delete_objects", Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise CkptError(f"could not delete {first.get('Key')}: {first.get('Message')}")
