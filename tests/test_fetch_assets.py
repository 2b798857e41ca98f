"""Tests for scripts/fetch_assets.py, on a tiny fake mirror and a temporary repo root."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import REPO, load_script


fa = load_script("fetch_assets")

FILES = {
    "benchmark/Set5/HR/baby.png": b"baby",
    "calib/T91/t1.bmp": b"t1",
    "weights/IMDN_x2.pth": b"imdn",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_mirror(root: Path, files: dict[str, bytes]) -> Path:
    """A fake mirror holding ``files``, listed in its MANIFEST.sha256."""
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    lines = [f"{sha(data)}  ./{name}\n" for name, data in files.items()]
    (root / "MANIFEST.sha256").write_text("".join(lines))
    return root


def write_repo(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A fake repo root whose scripts/assets_manifest.tsv holds ``rows`` (dest, sha256, url)."""
    (root / "scripts").mkdir(parents=True)
    text = "dest\tsha256\turl\n" + "".join("\t".join(row) + "\n" for row in rows)
    (root / "scripts" / "assets_manifest.tsv").write_text(text)
    return root


@pytest.fixture
def fake_mirror(tmp_path: Path) -> Path:
    return write_mirror(tmp_path / "mirror", FILES)


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    rows = [(fa.dest_for(name), sha(data), "-") for name, data in FILES.items()]
    return write_repo(tmp_path / "repo", rows)


def test_copies_verifies_then_skips(fake_mirror: Path, fake_repo: Path) -> None:
    first = fa.fetch(fake_mirror, fake_repo)
    assert not first.errors
    assert sorted(first.copied) == sorted(fa.dest_for(name) for name in FILES)
    for name, data in FILES.items():
        assert (fake_repo / fa.dest_for(name)).read_bytes() == data
    assert (fake_repo / "experiments/pretrained_models/IMDN_x2.pth").is_file()
    assert not list(fake_repo.rglob("*.part"))

    second = fa.fetch(fake_mirror, fake_repo)
    assert second.copied == [] and not second.errors
    assert len(second.up_to_date) == len(FILES)


def test_corrupt_mirror_file_is_an_error_and_not_installed(fake_mirror: Path, fake_repo: Path) -> None:
    (fake_mirror / "calib/T91/t1.bmp").write_bytes(b"bit rot")
    summary = fa.fetch(fake_mirror, fake_repo)
    assert len(summary.errors) == 1 and "datasets/calib/T91/t1.bmp" in summary.errors[0]
    assert not (fake_repo / "datasets/calib/T91/t1.bmp").exists()
    assert not list(fake_repo.rglob("*.part"))
    assert len(summary.copied) == len(FILES) - 1


def test_cli_exit_code_and_message(fake_mirror: Path, fake_repo: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    (fake_mirror / "weights/IMDN_x2.pth").write_bytes(b"truncated")
    monkeypatch.setattr(fa, "REPO_ROOT", fake_repo)
    assert fa.main(["--mirror", str(fake_mirror)]) == 2
    err = capsys.readouterr().err
    assert "IMDN_x2.pth" in err and "sha256 mismatch" in err
    assert fa.main(["--mirror", str(fake_mirror / "absent")]) == 2


def test_corrupt_destination_is_replaced(fake_mirror: Path, fake_repo: Path) -> None:
    fa.fetch(fake_mirror, fake_repo)
    dest = fake_repo / "datasets/benchmark/Set5/HR/baby.png"
    dest.write_bytes(b"edited")
    summary = fa.fetch(fake_mirror, fake_repo)
    assert summary.copied == ["datasets/benchmark/Set5/HR/baby.png"]
    assert dest.read_bytes() == FILES["benchmark/Set5/HR/baby.png"]


def test_file_only_in_mirror_manifest_is_fetched(tmp_path: Path, fake_repo: Path) -> None:
    files = {**FILES, "benchmark/Urban100/HR/img_001.png": b"urban"}
    mirror = write_mirror(tmp_path / "mirror", files)
    summary = fa.fetch(mirror, fake_repo, only=["datasets"])
    assert "datasets/benchmark/Urban100/HR/img_001.png" in summary.copied
    assert "experiments/pretrained_models/IMDN_x2.pth" not in summary.copied
    assert (fake_repo / "datasets/benchmark/Urban100/HR/img_001.png").read_bytes() == b"urban"


def test_manifests_disagreeing_is_an_error(tmp_path: Path, fake_mirror: Path) -> None:
    rows = [(fa.dest_for(name), sha(data), "-") for name, data in FILES.items()]
    rows[0] = (rows[0][0], sha(b"something else"), "-")
    repo = write_repo(tmp_path / "repo", rows)
    summary = fa.fetch(fake_mirror, repo)
    assert len(summary.errors) == 1 and "MANIFEST.sha256" in summary.errors[0]
    assert fa.source_for(rows[0][0]) in summary.errors[0]
    assert not (repo / rows[0][0]).exists()


def test_missing_optional_file_is_a_note_unless_asked_for(fake_mirror: Path, tmp_path: Path) -> None:
    rows = [(fa.dest_for(name), sha(data), "-") for name, data in FILES.items()]
    swinir = "experiments/pretrained_models/SwinIR-S_x2.pth"
    repo = write_repo(tmp_path / "repo", [*rows, (swinir, "-", "https://example.invalid/SwinIR-S_x2.pth")])
    assert fa.fetch(fake_mirror, repo, only=["weights"]).missing == [swinir]
    asked = fa.fetch(fake_mirror, repo, only=["*SwinIR*"])
    assert len(asked.errors) == 1 and swinir in asked.errors[0]
    with pytest.raises(fa.FetchError):
        fa.fetch(fake_mirror, repo, only=["*no_such_file*"])


def _download_repo(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    """A repo whose manifest has one weight with unknown sha256, served from a file:// URL."""
    served = tmp_path / "served" / name
    served.parent.mkdir(parents=True)
    served.write_bytes(data)
    dest = f"experiments/pretrained_models/{name}"
    return write_repo(tmp_path / "repo", [(dest, "-", served.as_uri())]), dest


def test_sha256_prefix_in_file_name_is_checked(tmp_path: Path) -> None:
    data = b"edsr weights"
    repo, dest = _download_repo(tmp_path, f"EDSR_Mx2-{sha(data)[:8]}.pth", data)
    mirror = write_mirror(tmp_path / "mirror", {})
    assert fa.fetch(mirror, repo).missing == [dest]  # no --download: nothing fetched
    summary = fa.fetch(mirror, repo, download=True)
    assert summary.downloaded == [dest] and not summary.unverified and not summary.errors
    assert (repo / dest).read_bytes() == data


def test_wrong_sha256_prefix_is_rejected(tmp_path: Path) -> None:
    repo, dest = _download_repo(tmp_path, "EDSR_Mx2-00000000.pth", b"edsr weights")
    summary = fa.fetch(None, repo, download=True)
    assert len(summary.errors) == 1 and dest in summary.errors[0]
    assert not (repo / dest).exists() and not list(repo.rglob("*.part"))


def test_unverifiable_download_warns_with_its_sha256(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = b"swinir weights"
    repo, dest = _download_repo(tmp_path, "SwinIR-S_x2.pth", data)
    summary = fa.fetch(None, repo, download=True)
    assert summary.downloaded == [dest] and summary.unverified == {dest: sha(data)}
    assert f"{dest} could not be verified" in capsys.readouterr().err


def test_no_mirror_without_download_is_an_error(fake_repo: Path) -> None:
    with pytest.raises(fa.FetchError):
        fa.fetch(None, fake_repo)


def test_default_mirror_prefers_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fa.MIRROR_ENV, str(tmp_path / "elsewhere"))
    assert fa.default_mirror(tmp_path / "repo") == tmp_path / "elsewhere"
    monkeypatch.delenv(fa.MIRROR_ENV)
    assert fa.default_mirror(tmp_path / "repo") is None
    (tmp_path / "shared" / "assets").mkdir(parents=True)
    assert fa.default_mirror(tmp_path / "repo") == tmp_path / "shared" / "assets"


def test_committed_manifest_is_well_formed() -> None:
    assets = fa.read_manifest(REPO / fa.MANIFEST)
    for asset in assets.values():
        assert asset.verifiable or asset.url, asset.dest  # unknown-hash rows must at least be downloadable
    names = {Path(dest).name for dest in assets}
    assert {f"002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{s}.pth" for s in (2, 3, 4)} <= names
    assert sum(name.startswith("EDSR_") and fa._HUB_SUFFIX.search(name) is not None for name in names) == 6


def test_committed_manifest_covers_the_shared_mirror(mirror: Path) -> None:
    """``mirror`` (conftest) is the real asset mirror; the test skips without it."""
    assets = fa.read_manifest(REPO / fa.MANIFEST)
    mirror_shas = fa.read_mirror_manifest(mirror)
    assert len(mirror_shas) == len((mirror / "MANIFEST.sha256").read_text().splitlines())
    for source, digest in mirror_shas.items():
        dest = fa.dest_for(source)
        assert dest in assets, source
        assert assets[dest].sha256 == digest, source
