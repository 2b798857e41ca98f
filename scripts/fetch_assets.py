#!/usr/bin/env python3
"""Fetch benchmark images, calibration images and pretrained weights into the repo's ignored folders.

    python scripts/fetch_assets.py [--mirror DIR] [--only weights|datasets|GLOB ...] [--download]

Files come from a local read-only asset mirror (``benchmark/``, ``calib/``, ``weights/`` and a ``MANIFEST.sha256``)
and, with ``--download``, from the official URLs in ``scripts/assets_manifest.tsv`` for files the mirror lacks.
Destinations: ``benchmark/...`` -> ``datasets/benchmark/...``, ``calib/...`` -> ``datasets/calib/...``,
``weights/<f>`` -> ``experiments/pretrained_models/<f>``.

The expected sha256 of a file is the one in ``assets_manifest.tsv``, else the mirror's (so datasets added to the
mirror later are fetched too). Where no full sha256 is known, a torch.hub-style ``-<8 hex>`` suffix of the file name
is checked as a sha256 prefix; files with neither are fetched with a warning giving their computed sha256.
A file only reaches its destination after its hash has been checked (it is written to ``<dest>.part`` first).
Exit code 2 on any error.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import re
import shutil
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path("scripts") / "assets_manifest.tsv"
MANIFEST_HEADER = ["dest", "sha256", "url"]
MIRROR_MANIFEST = "MANIFEST.sha256"
MIRROR_ENV = "CONDIQUANT_ASSETS"
# Mirror top-level folder -> destination folder, relative to the repo root.
DEST_ROOTS = {"benchmark": "datasets/benchmark", "calib": "datasets/calib", "weights": "experiments/pretrained_models"}
KEYWORDS = {"weights": {"weights"}, "datasets": {"benchmark", "calib"}}

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HUB_SUFFIX = re.compile(r"-([0-9a-f]{8})\.[A-Za-z0-9]+$")
_USER_AGENT = "condiquant-fetch-assets"


class FetchError(Exception):
    """A problem that stops the whole run: no usable mirror, a malformed manifest, an ``--only`` matching nothing."""


@dataclass(frozen=True)
class Asset:
    """One file: where it lives in the mirror, where it goes in the repo, and how to check it."""

    source: str  # relative to the mirror root, e.g. "weights/IMDN_x2.pth"
    dest: str  # relative to the repo root, e.g. "experiments/pretrained_models/IMDN_x2.pth"
    sha256: str | None = None  # from scripts/assets_manifest.tsv
    mirror_sha256: str | None = None  # from the mirror's MANIFEST.sha256
    url: str | None = None

    @property
    def expected_sha256(self) -> str | None:
        """Full sha256 the file must have, if known."""
        return self.sha256 or self.mirror_sha256

    @property
    def sha256_prefix(self) -> str | None:
        """The ``-<8 hex>`` file-name suffix (torch.hub / BasicSR convention: first 8 hex digits of the sha256)."""
        match = _HUB_SUFFIX.search(self.dest)
        return match.group(1) if match else None

    @property
    def verifiable(self) -> bool:
        """Whether anything is known to check the file's content against."""
        return self.expected_sha256 is not None or self.sha256_prefix is not None

    def matches(self, digest: str) -> bool:
        """Whether a computed sha256 agrees with everything known about this file."""
        full, prefix = self.expected_sha256, self.sha256_prefix
        return (full is None or digest == full) and (prefix is None or digest.startswith(prefix))


@dataclass
class Summary:
    """What a run did; lists hold destination paths relative to the repo root."""

    copied: list[str] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # optional files no source could provide
    ignored: list[str] = field(default_factory=list)  # mirror files outside the known top-level folders
    unverified: dict[str, str] = field(default_factory=dict)  # dest -> computed sha256
    errors: list[str] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _relative(path: str, where: str) -> str:
    """Check that ``path`` is a plain relative POSIX path (a manifest must not write outside its folder)."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts:
        raise FetchError(f"{where}: bad path {path!r}")
    return pure.as_posix()


def dest_for(source: str) -> str | None:
    """Destination (relative to the repo root) of a mirror path, or None outside the known folders."""
    top, _, rest = source.partition("/")
    return f"{DEST_ROOTS[top]}/{rest}" if top in DEST_ROOTS and rest else None


def source_for(dest: str) -> str | None:
    """Mirror path of a destination, or None if it is in no destination folder."""
    for top, root in DEST_ROOTS.items():
        if dest.startswith(root + "/"):
            return f"{top}/{dest[len(root) + 1:]}"
    return None


def read_manifest(path: Path) -> dict[str, Asset]:
    """Parse ``assets_manifest.tsv`` (``dest<TAB>sha256<TAB>url``; ``-`` for unknown) into assets keyed by dest."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != MANIFEST_HEADER:
        raise FetchError(f"{path}: the first line must be dest<TAB>sha256<TAB>url")
    assets: dict[str, Asset] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3:
            raise FetchError(f"{path}:{number}: expected 3 tab-separated fields, got {len(fields)}")
        dest, sha, url = fields
        dest = _relative(dest, f"{path}:{number}")
        source = source_for(dest)
        if source is None:
            raise FetchError(f"{path}:{number}: {dest} is outside {', '.join(DEST_ROOTS.values())}")
        if sha != "-" and not _SHA256.fullmatch(sha):
            raise FetchError(f"{path}:{number}: sha256 must be 64 lowercase hex digits or '-'")
        assets[dest] = Asset(source, dest, None if sha == "-" else sha, url=None if url == "-" else url)
    return assets


def read_mirror_manifest(mirror: Path) -> dict[str, str]:
    """Parse the mirror's ``MANIFEST.sha256`` (``sha256sum`` output) into mirror path -> sha256."""
    path = mirror / MIRROR_MANIFEST
    if not path.is_file():
        raise FetchError(f"{mirror} is not an asset mirror: it has no {MIRROR_MANIFEST}")
    shas: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        # sha256sum writes "<hash><space><space or '*'><path>"; the path may contain spaces.
        sha, name = line[:64], line[66:]
        if not _SHA256.fullmatch(sha) or line[64:66] not in ("  ", " *"):
            raise FetchError(f"{path}:{number}: not a sha256sum line")
        shas[_relative(name.removeprefix("./"), f"{path}:{number}")] = sha
    return shas


def merge(manifest: dict[str, Asset], mirror_shas: dict[str, str]) -> tuple[list[Asset], list[str]]:
    """All known assets, sorted by dest, and the mirror paths outside the known top-level folders.

    The assets are the manifest's rows, with the mirror's sha256 attached, plus the files only the mirror lists.
    """
    assets = dict(manifest)
    ignored: list[str] = []
    for source, sha in mirror_shas.items():
        dest = dest_for(source)
        if dest is None:
            ignored.append(source)
        elif dest in assets:
            assets[dest] = Asset(source, dest, assets[dest].sha256, sha, assets[dest].url)
        else:
            assets[dest] = Asset(source, dest, mirror_sha256=sha)
    return [assets[dest] for dest in sorted(assets)], ignored


def _glob_matches(asset: Asset, pattern: str) -> bool:
    # A pattern naming a folder ("benchmark/Set5", "datasets/calib/") matches everything below it.
    folder = pattern.rstrip("/") + "/*"
    paths = (asset.dest, asset.source, PurePosixPath(asset.dest).name)
    return any(fnmatch.fnmatchcase(path, pat) for path in paths for pat in (pattern, folder))


def select(assets: list[Asset], only: list[str] | None) -> list[tuple[Asset, bool]]:
    """The assets ``--only`` asks for, each with whether a GLOB named it (as opposed to a keyword or no filter).

    ``weights`` and ``datasets`` select by mirror folder; anything else is a glob (``*`` crosses ``/``) on the
    destination path, the mirror path or the file name; a folder path selects everything below it.
    A glob that matches nothing raises FetchError.
    """
    if not only:
        return [(asset, False) for asset in assets]
    globs = [p for p in only if p not in KEYWORDS]
    for pattern in globs:
        if not any(_glob_matches(asset, pattern) for asset in assets):
            raise FetchError(f"--only {pattern!r} matches no known file")
    tops = set().union(*(KEYWORDS[p] for p in only if p in KEYWORDS))
    chosen = []
    for asset in assets:
        explicit = any(_glob_matches(asset, pattern) for pattern in globs)
        if explicit or asset.source.partition("/")[0] in tops:
            chosen.append((asset, explicit))
    return chosen


def _download(url: str, part: Path) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _fetch_one(asset: Asset, explicit: bool, mirror: Path | None, repo_root: Path, download: bool,
               summary: Summary) -> None:
    """Bring one asset up to date, recording the outcome in ``summary``."""
    if asset.sha256 and asset.mirror_sha256 and asset.sha256 != asset.mirror_sha256:
        summary.errors.append(f"{asset.source}: the mirror's {MIRROR_MANIFEST} has sha256 {asset.mirror_sha256}, "
                              f"{MANIFEST} has {asset.sha256}")
        return
    dest = repo_root / asset.dest
    stale = dest.is_file()
    if stale:
        digest = sha256_file(dest)
        if asset.matches(digest):
            _record_unverified(asset, digest, summary)
            summary.up_to_date.append(asset.dest)
            return
        # Never leave a file with the wrong content: it is replaced below, or gone if nothing can replace it.
        dest.unlink()
        _say(f"{asset.dest}: sha256 {digest} does not match; removed, fetching it again")

    origin: Path | str | None = None  # a mirror file or a URL
    if mirror is not None and (mirror / asset.source).is_file():
        origin = mirror / asset.source
    elif download and asset.url:
        origin = asset.url
    if origin is None:
        if explicit or stale:
            hint = "" if download or not asset.url else " (try --download)"
            summary.errors.append(f"{asset.dest}: not in the mirror and not downloaded{hint}")
        else:
            summary.missing.append(asset.dest)
        return

    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if isinstance(origin, Path):
            # copyfile, not copy2: the mirror is read-only and its permission bits must not follow the file.
            shutil.copyfile(origin, part)
        else:
            _download(origin, part)
        digest = sha256_file(part)
        if not asset.matches(digest):
            summary.errors.append(f"{asset.dest}: sha256 mismatch in {origin} (got {digest}); not installed")
            return
        os.replace(part, dest)
    except OSError as exc:  # urllib's URLError and HTTPError are OSErrors too
        summary.errors.append(f"{asset.dest}: {exc}")
        return
    finally:
        part.unlink(missing_ok=True)
    _record_unverified(asset, digest, summary)
    (summary.copied if isinstance(origin, Path) else summary.downloaded).append(asset.dest)


def _record_unverified(asset: Asset, digest: str, summary: Summary) -> None:
    if not asset.verifiable:
        summary.unverified[asset.dest] = digest
        _say(f"warning: {asset.dest} could not be verified (no known sha256); its sha256 is {digest}")


def fetch(mirror: Path | None, repo_root: Path, only: list[str] | None = None, download: bool = False) -> Summary:
    """Copy (or, with ``download``, download) the selected assets into ``repo_root``.

    ``mirror`` may be None only with ``download``. Per-file problems are collected in ``Summary.errors``;
    problems with the mirror, the manifest or ``only`` raise FetchError.
    """
    if mirror is None and not download:
        raise FetchError(f"no asset mirror: pass --mirror DIR, set ${MIRROR_ENV}, or use --download")
    if mirror is not None and not mirror.is_dir():
        raise FetchError(f"asset mirror {mirror} does not exist")
    mirror_shas = read_mirror_manifest(mirror) if mirror is not None else {}
    assets, ignored = merge(read_manifest(repo_root / MANIFEST), mirror_shas)
    summary = Summary(ignored=ignored)
    for asset, explicit in tqdm(select(assets, only), desc="assets", unit="file", leave=False, disable=None):
        _fetch_one(asset, explicit, mirror, repo_root, download, summary)
    return summary


def default_mirror(repo_root: Path) -> Path | None:
    """``$CONDIQUANT_ASSETS`` if set, else ``<repo_root>/../shared/assets`` if it exists, else None."""
    if os.environ.get(MIRROR_ENV):
        return Path(os.environ[MIRROR_ENV])
    candidate = repo_root.parent / "shared" / "assets"
    return candidate if candidate.is_dir() else None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0, or 2 on any error)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", type=Path, metavar="DIR",
                        help=f"asset mirror (default: ${MIRROR_ENV}, else ../shared/assets next to the repo)")
    parser.add_argument("--only", nargs="+", action="extend", metavar="weights|datasets|GLOB",
                        help="fetch only these; a GLOB matches destination path, mirror path or file name "
                             "('*' crosses '/'; a folder selects all below it)")
    parser.add_argument("--download", action="store_true",
                        help="download files the mirror lacks from their official URLs")
    args = parser.parse_args(argv)
    try:
        summary = fetch(args.mirror or default_mirror(REPO_ROOT), REPO_ROOT, args.only, args.download)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for error in summary.errors:
        print(f"error: {error}", file=sys.stderr)
    if summary.ignored:
        print(f"note: ignored {len(summary.ignored)} mirror files outside {', '.join(DEST_ROOTS)}/", file=sys.stderr)
    if summary.missing:
        hint = "" if args.download else "; --download fetches those with a URL"
        names = ", ".join(PurePosixPath(dest).name for dest in summary.missing)
        print(f"note: {len(summary.missing)} optional files not in the mirror{hint}: {names}", file=sys.stderr)
    parts = [f"copied {len(summary.copied)}", f"downloaded {len(summary.downloaded)}",
             f"up to date {len(summary.up_to_date)}", f"missing {len(summary.missing)}"]
    if summary.errors:
        parts.append(f"errors {len(summary.errors)}")
    print(", ".join(parts))
    return 2 if summary.errors else 0


if __name__ == "__main__":
    sys.exit(main())
