"""Storage beyond the local disk: the one module that knows URLs (fsspec: s3://, gs://, az://, ...).

Inputs (data.path, data.corpus, data.queries, data.qrels_dir) are read where they are, streamed
through the URL's fsspec filesystem, never copied whole to the local disk; errors name the URL as
the user wrote it. Outputs (output_dir, cache_dir) given as URLs are written in a local staging
folder, one per URL so that a rerun resumes (``storage.staging_dir``, default
``~/.cache/curate/staging``), and uploaded when the run ends: each object whole (an object
store replaces an object atomically on PUT, as os.replace does a file), the manifest last, so its
presence marks the shards complete there as on a disk. The folder rule of curate.outdir holds for
the prefix: curate writes into an empty one or one holding its marker object, and deletes only
objects its own records list. ``file://`` URLs are local paths.

How a URL is reached: ``storage.options`` of the config, per protocol (fsspec keyword arguments,
e.g. ``{s3: {endpoint_url: "http://127.0.0.1:9000"}}``), on top of what the filesystem reads
itself: for s3fs the AWS variables and files (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_PROFILE, ~/.aws/), for gcsfs
GOOGLE_APPLICATION_CREDENTIALS, and fsspec's own config (FSSPEC_S3_ENDPOINT_URL=...,
~/.config/fsspec/). Credentials belong there, not in the config, which the manifest copies.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import fsspec

from curate.errors import ConfigError, DataError, OutputDirError

log = logging.getLogger(__name__)

Options = Mapping[str, Mapping[str, Any]]  # protocol -> fsspec keyword arguments

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MARKER = ".curate-run"  # curate.outdir.MARKER (outdir imports the shard module; this stays light)
_MANIFEST = "manifest.json"  # curate.batch.shards.MANIFEST
_LEDGER = ".shards-written.json"  # the record curate.batch.shards keeps beside shards/
_READ_BUFFER = 1 << 20  # line reads come from this buffer, not one fsspec read per line


def is_url(path: str | Path) -> bool:
    """A URL curate reaches through fsspec: any ``scheme://`` but ``file://`` (a local path)."""
    found = _SCHEME.match(str(path))
    return bool(found) and found.group(1).lower() != "file"


def local_path(path: str) -> str:
    """``file:///data/x`` -> ``/data/x``; anything else as given."""
    return path[len("file://") :] if path.lower().startswith("file://") else path


def filesystem(url: str, options: Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url``, built with ``options`` of its protocol, and the path in
    it (no protocol)."""
    protocol = url.split("://", 1)[0].lower()
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as err:
        raise ConfigError(
            f"{url}: curate cannot open {protocol}:// URLs ({err}); install the fsspec package "
            "that serves them (s3fs for s3://, gcsfs for gs://, adlfs for az://)"
        ) from None
    names = cls.protocol if isinstance(cls.protocol, (tuple, list)) else (cls.protocol,)
    kwargs = {k: v for name in names for k, v in (options or {}).get(name, {}).items()}
    return fsspec.core.url_to_fs(url, **kwargs)


# --- inputs: a file or folder, local or behind a URL ------------------------------------------


@dataclass(frozen=True, order=True)
class Location:
    """An input file or folder. ``str()`` is what errors name: the URL as the user wrote it (with
    ``/name`` for what lies below it), or the local path as pathlib spells it."""

    text: str
    options: Options = field(default_factory=dict, compare=False, repr=False)

    @property
    def remote(self) -> bool:
        return is_url(self.text)

    def __str__(self) -> str:
        return self.text

    def __truediv__(self, name: str) -> Location:
        if self.remote:
            return Location(f"{self.text.rstrip('/')}/{name}", self.options)
        return Location(str(Path(self.text) / name), self.options)

    @property
    def name(self) -> str:
        return PurePosixPath(self.text.split("://", 1)[-1]).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return filesystem(self.text, self.options)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """A store that refuses (credentials, endpoint) named with the URL that was asked for."""
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as err:
            raise DataError(
                self.text,
                f"cannot reach it ({type(err).__name__}: {err})",
                "check the URL, the credentials (for s3: AWS_ACCESS_KEY_ID or AWS_PROFILE) and "
                "the endpoint (AWS_ENDPOINT_URL or storage.options.s3.endpoint_url)",
            ) from None

    def is_file(self) -> bool:
        if not self.remote:
            return Path(self.text).is_file()
        fs, path = self._fs()
        with self._reaching():
            return fs.isfile(path)

    def is_dir(self) -> bool:
        if not self.remote:
            return Path(self.text).is_dir()
        fs, path = self._fs()
        with self._reaching():
            return fs.isdir(path)

    def iterdir(self) -> list[Location]:
        if not self.remote:
            return [self / p.name for p in Path(self.text).iterdir()]
        fs, path = self._fs()
        with self._reaching():
            found = fs.ls(path, detail=False)
        return [self / PurePosixPath(p).name for p in found if p.rstrip("/") != path.rstrip("/")]

    def open(self) -> IO[bytes]:
        """The file for reading, in bytes, streamed (a remote one in fsspec's blocks)."""
        if not self.remote:
            return open(self.text, "rb")
        fs, path = self._fs()
        return io.BufferedReader(fs.open(path, "rb"), _READ_BUFFER)

    def read_parquet(self, columns: list[str] | None = None):
        """A Parquet file (``columns`` of it: None, all) as a polars frame; a remote one read by
        pyarrow through fsspec (range requests for the footer and the column chunks, no local
        copy)."""
        import polars as pl

        if not self.remote:
            return pl.read_parquet(self.text, columns=columns)
        import pyarrow.parquet as pq

        fs, path = self._fs()
        return pl.from_arrow(pq.read_table(path, filesystem=fs, columns=columns))

    def parquet_batches(self, columns: list[str], rows: int) -> Iterator:
        """``columns`` of a Parquet file as polars frames of up to ``rows`` rows, in order; one
        empty frame (the file's schema) when it holds none."""
        import polars as pl
        import pyarrow.parquet as pq

        # No pre-buffering: its cache of read ranges grows with the file (+6 MB a 100k-row
        # batch, 0.6 GB over a 10M-doc corpus's texts), and each batch is read once anyway.
        if self.remote:
            fs, path = self._fs()
            pf = pq.ParquetFile(path, filesystem=fs, pre_buffer=False)
        else:
            pf = pq.ParquetFile(self.text, pre_buffer=False)
        seen = False
        for batch in pf.iter_batches(batch_size=rows, columns=columns):
            seen = True
            yield pl.from_arrow(batch)
        if not seen:
            yield pl.from_arrow(pf.schema_arrow.empty_table().select(columns))

    def parquet_columns(self) -> list[str]:
        """The column names in a Parquet file's footer (nothing else is read)."""
        import pyarrow.parquet as pq

        if not self.remote:
            return pq.read_schema(self.text).names
        fs, path = self._fs()
        return pq.read_schema(path, filesystem=fs).names


def location(path: str | Path | Location, options: Options | None = None) -> Location:
    if isinstance(path, Location):
        return path
    text = local_path(str(path))
    return Location(text if is_url(text) else str(Path(text)), options or {})


# --- outputs: a staging folder per URL, uploaded when the run ends ----------------------------


def staging_folder(url: str, staging_dir: str | None = None) -> Path:
    """The local folder a URL output is written in before upload: one per URL (its readable tail
    plus a hash), so a rerun of the same URL finds its work and its stage caches."""
    url = url.rstrip("/")
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "curate" / "staging"
    base = Path(staging_dir).expanduser() if staging_dir else home
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])[-80:]
    return base / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def output_folder(cfg) -> Path:
    """Where a run writes: ``output_dir``, or for a URL its local staging folder."""
    out = local_path(cfg.output_dir)
    return staging_folder(out, cfg.storage.staging_dir) if is_url(out) else Path(out)


class Remote:
    """An output folder (prefix) on an object store."""

    def __init__(self, url: str, options: Options | None = None):
        self.url = url.rstrip("/")
        self.fs, root = filesystem(self.url, options)
        self.root = root.rstrip("/")

    def names(self, sub: str = "") -> list[str]:
        """Names directly under the prefix (or its folder ``sub``); [] when there is none."""
        where = f"{self.root}/{sub}".rstrip("/")
        self.fs.invalidate_cache(where)  # another process may have written since
        try:
            found = self.fs.ls(where, detail=False)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(p).name for p in found if p.rstrip("/") != where)

    def json(self, name: str) -> dict:
        try:
            obj = json.loads(self.fs.cat_file(f"{self.root}/{name}"))
        except (FileNotFoundError, ValueError):
            return {}
        return obj if isinstance(obj, dict) else {}

    def put(self, local: Path, name: str) -> None:
        self.fs.put_file(str(local), f"{self.root}/{name}")
        log.debug("uploaded %s/%s", self.url, name)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(f"{self.root}/{name}")
        except FileNotFoundError:
            pass

    def check(self, overwrite: bool, what: str = "output_dir") -> None:
        """curate.outdir's rule on the prefix: empty, new, or curate's (its marker object)."""
        if self.fs.isfile(self.root):
            raise OutputDirError(f"{what}: {self.url} is an object, not a folder; pick a prefix")
        entries = self.names()
        if not entries or _MARKER in entries:
            return
        if overwrite:
            log.warning("%s: writing into %s, which holds no curate run (overwrite is set)",
                        what, self.url)  # fmt: skip
            return
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise OutputDirError(
            f"{what}: {self.url} is not empty ({len(entries)} "
            f"{'entry' if len(entries) == 1 else 'entries'}: {shown}) and is not a curate run (no "
            f"{_MARKER} object), so curate would replace objects there; pick an empty or new "
            "prefix, or pass --overwrite (--set overwrite=true) to write into it anyway (objects "
            "of the names curate writes are replaced; nothing else is deleted)"
        )


def check_output(cfg, out: Path) -> None:
    """The output folder rule (curate.outdir) before anything is written: on the prefix of a URL
    output_dir, and on the local folder the run writes in; creates nothing."""
    from curate import outdir

    if is_url(local_path(cfg.output_dir)):
        Remote(cfg.output_dir, cfg.storage.options).check(cfg.overwrite)
    outdir.check(out, cfg.overwrite)


def claim(cfg, out: Path) -> None:
    """The marker uploaded as soon as the run has claimed its staging folder (curate.outdir
    .claim): the prefix is then curate's, and an unwritable one fails before any work."""
    if not is_url(local_path(cfg.output_dir)):
        return
    remote = Remote(cfg.output_dir, cfg.storage.options)
    if _MARKER in remote.names():
        return
    try:
        remote.put(out / _MARKER, _MARKER)
    except OSError as err:
        raise OutputDirError(
            f"output_dir: cannot write {remote.url}/{_MARKER} ({type(err).__name__}: {err}); "
            "check that the bucket exists and that these credentials may write there (for s3: "
            "AWS_ACCESS_KEY_ID / AWS_PROFILE, and AWS_ENDPOINT_URL or storage.options.s3."
            "endpoint_url for a server other than AWS)"
        ) from None


def named(cfg, out: Path, result: dict) -> dict:
    """``result`` naming the URL where it names the staging folder (output_dir, shards, model)."""
    url = local_path(cfg.output_dir).rstrip("/")
    if not is_url(url):
        return result
    local = str(out)

    def of(v: Any) -> Any:
        under = isinstance(v, str) and (v == local or v.startswith(local + os.sep))
        return url + v[len(local) :].replace(os.sep, "/") if under else v

    return {k: of(v) for k, v in result.items()}


def publish(cfg, out: Path, result: dict) -> dict:
    """The end of a run with a URL output_dir or cache_dir: upload what the run wrote for its
    users, the manifest last (``result`` says what: shards, model, report.json unless it stopped
    early), and new cache files; -> ``result`` naming URLs. Local folders: nothing to do."""
    result = named(cfg, out, result)
    if cfg.cache_dir and is_url(local_path(cfg.cache_dir)):
        _push(cache_folder(cfg, out, pull=False), Remote(cfg.cache_dir, cfg.storage.options))
    if not is_url(local_path(cfg.output_dir)):
        return result
    remote = Remote(cfg.output_dir, cfg.storage.options)
    files = []
    if "model" in result:  # the trained model and its log (the report reads it), no checkpoints
        final = sorted(p for p in (out / "model" / "final").rglob("*") if p.is_file())
        files += [str(p.relative_to(out)) for p in final] + ["model/train_log.jsonl"]
    if "stopped_after" not in result:
        files.append("report.json")
    if "shards" in result:
        _publish_shards(remote, out, files)
    else:
        _put(remote, out, files)
    log.info("uploaded the run to %s", remote.url)
    return result


def put_back(cfg, out: Path, names: list[str]) -> None:
    """For a URL output_dir: upload these files of the staging folder (those that exist), in
    this order; e.g. report.html, written after the run."""
    if is_url(local_path(cfg.output_dir)):
        _put(Remote(cfg.output_dir, cfg.storage.options), out, names)


def _put(remote: Remote, out: Path, names: list[str]) -> None:
    for name in names:
        if (out / name).is_file():
            remote.put(out / name, name)


def _publish_shards(remote: Remote, out: Path, files: list[str]) -> None:
    """Shards, forbidden pairs and ``files`` uploaded, stale shards removed, manifest last."""
    manifest = json.loads((out / _MANIFEST).read_text())
    new = [f["path"] for f in manifest["files"]]
    ours = _written_there(remote)  # read before the manifest that lists them goes
    # A record of every shard object curate has or will have there, before any changes: a crash
    # below then leaves no shard that a rerun would not know to be curate's.
    _put_json(remote, out, _LEDGER, {"files": sorted(ours | set(new))})
    remote.remove(_MANIFEST)  # an old manifest must never stand over new shards
    _put(remote, out, [f"shards/{name}" for name in new] + ["forbidden.parquet", *files])
    present = set(remote.names("shards"))
    for name in sorted((ours - set(new)) & present):  # a rerun may write fewer shards
        remote.remove(f"shards/{name}")
    if others := sorted(n for n in present - ours - set(new) if n.endswith(".parquet")):
        log.warning("%s/shards: %s not written by curate, left in place", remote.url,
                    ", ".join(others[:5]))  # fmt: skip
    _put_json(remote, out, _LEDGER, {"files": new})
    remote.put(out / _MANIFEST, _MANIFEST)  # last: marks the shards complete


def _written_there(remote: Remote) -> set[str]:
    """The shard objects curate's records there list (its ledger and its manifest)."""
    names: set[str] = set()
    for name in (_LEDGER, _MANIFEST):
        record = remote.json(name)
        if name == _LEDGER or str(record.get("format", "")).startswith("curate-shards"):
            names |= {r["path"] if isinstance(r, dict) else r for r in record.get("files", [])}
    return {n for n in names if isinstance(n, str) and re.fullmatch(r"shard-\d+\.parquet", n)}


def _put_json(remote: Remote, out: Path, name: str, obj: dict) -> None:
    from curate.files import write_json

    local = out / "work" / f"upload-{name.lstrip('.')}"
    local.parent.mkdir(parents=True, exist_ok=True)
    write_json(local, obj)
    remote.put(local, name)


# --- the embeddings cache at a URL: pulled into staging at the start, pushed at the end --------


def cache_folder(cfg, out: Path, pull: bool = True) -> Path:
    """The embeddings cache folder: cache_dir (for a URL its staging folder, first filled with the
    files the store holds that it lacks), else ``<out>/cache``."""
    if not cfg.cache_dir:
        return out / "cache"
    cache = local_path(cfg.cache_dir)
    if not is_url(cache):
        return Path(cache)
    local = staging_folder(cache, cfg.storage.staging_dir)
    if pull:
        _pull(Remote(cache, cfg.storage.options), local)
    return local


def _cache_files(remote: Remote) -> set[str]:
    remote.fs.invalidate_cache(remote.root)
    try:
        found = remote.fs.find(remote.root)
    except FileNotFoundError:
        return set()
    return {p[len(remote.root) + 1 :] for p in found if p.startswith(remote.root + "/")}


def _pull(remote: Remote, local: Path) -> None:
    from curate.files import atomic_path

    got = 0
    for name in sorted(_cache_files(remote)):
        if name.endswith(".tmp") or (local / name).is_file():
            continue
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(local / name) as tmp:  # cache files are content-addressed: never stale
            remote.fs.get_file(f"{remote.root}/{name}", str(tmp))
        got += 1
    log.info("cache: %d files from %s", got, remote.url)


def _push(local: Path, remote: Remote) -> None:
    there = _cache_files(remote)
    mine = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    _put(remote, local, [n for n in mine if n not in there and not n.endswith(".tmp")])
