"""One resolver for local paths and object-store URIs: what it accepts, the errors that name the
argument, and the folder writes that commit by writing one file last (against moto's S3 server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from segpipe import storage
from segpipe.files import LocalPathError, atomic_dir, atomic_path, check_local
from segpipe.storage import StorageError, require_local, resolve


def test_local_paths_and_file_uris_are_local_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = resolve("data/shards", "--out")
    assert here.local and here.uri == str(tmp_path / "data/shards") == here.path
    assert resolve(f"file://{tmp_path}/x", "--out").uri == str(tmp_path / "x")
    assert resolve("file://localhost/tmp/x", "--out").uri == "/tmp/x"
    assert resolve(tmp_path / "y", "--out").child("a", "b.txt").uri == str(tmp_path / "y/a/b.txt")
    assert require_local("rel", "--input") == tmp_path / "rel"


def test_object_store_uris_become_bucket_paths(monkeypatch):
    made = []
    monkeypatch.setattr(storage, "_filesystem", lambda scheme, bucket, config: made.append((scheme, bucket)) or "fs")
    loc = resolve("gs://bucket/a/b/", "--shards")
    assert (loc.uri, loc.path, loc.fs, loc.local) == ("gs://bucket/a/b", "bucket/a/b", "fs", False)
    assert loc.child("train", "part-00000.parquet").uri == "gs://bucket/a/b/train/part-00000.parquet"
    assert loc.parent.uri == "gs://bucket/a" and loc.parent.parent.parent.uri == "gs://bucket"
    assert resolve("S3://b", "--out").uri == "s3://b"
    assert made == [("gs", "bucket"), ("s3", "b")]


@pytest.mark.parametrize("value, message", [
    ("ftp://x", "--out: unsupported scheme 'ftp' in 'ftp://x'; valid: s3://, gs://, file:// or a local path"),
    ("hdfs://nn/x", "--out: unsupported scheme 'hdfs'"),
    (str(Path("s3://segpipe/shards")), "--out: 's3:/segpipe/shards' is not a URI (a '/' is missing after 's3:'"),
    ("s3:", "--out: 's3:' is not a URI"),
    ("s3:///key", "--out: 's3:///key' names no bucket"),
    ("s3://b/k?endpoint_override=x", "options in a URI are not read"),
    ("file://elsewhere/x", "a file:// URI names a path on this machine"),
    ("out/s3:/b", "--out: out/s3:/b: a URI turned into a local path (folder 's3:')"),
    ("", "--out: an empty path"),
])
def test_unusable_values_are_errors_naming_the_argument(value, message):
    with pytest.raises(StorageError) as e:
        resolve(value, "--out")
    assert message in str(e.value)


def test_require_local_refuses_object_stores_without_contacting_them():
    with pytest.raises(StorageError, match="--input: s3://bucket/raw is an object-store URI; only a local path"):
        require_local("s3://bucket/raw", "--input")
    with pytest.raises(StorageError, match="--registry: unsupported scheme 'ftp'"):
        require_local("ftp://x/y", "--registry")


def test_no_local_folder_is_ever_named_after_a_scheme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for mangled in (Path("s3://segpipe/shards"), Path("gs://b") / "x", tmp_path / "file:" / "y"):
        with pytest.raises(LocalPathError, match="a URI turned into a local path"):
            check_local(mangled)
        with pytest.raises(LocalPathError), atomic_dir(mangled):
            pass
        with pytest.raises(LocalPathError), atomic_path(mangled / "manifest.json"):
            pass
    assert list(tmp_path.iterdir()) == []
    assert check_local("data/s3_backup:old") == Path("data/s3_backup:old")  # a colon elsewhere is a name


# ----------------------------------------------------------------------------- on moto's S3 server


def test_files_on_s3(s3):
    root = resolve(s3.uri("dir"), "--out")
    assert not storage.exists(root) and storage.list_files(root) == []
    storage.write_bytes(root.child("a.txt"), b"alpha")
    storage.write_bytes(root.child("sub/b.bin"), b"\0" * 10)
    assert storage.read_bytes(root.child("a.txt")) == b"alpha" and storage.exists(root)
    assert storage.list_files(root) == ["a.txt", "sub/b.bin"] == s3.files("dir")
    assert storage.info(root.child("sub/b.bin")).size == 10
    assert storage.sha256(root.child("a.txt")) == "8ed3f6ad685b959ead7022518e1af76cd816f8e8ec7ccdda1ed4018e8f2223f8"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(root.child("nothing"))
    storage.delete(root.child("sub"))
    assert s3.files("dir") == ["a.txt"]
    with pytest.raises(StorageError, match="will not delete a whole bucket"):
        storage.delete(resolve(s3.uri(), "--out"))
    assert s3.files() == ["dir/a.txt"]


def _write(dest, files: dict[str, bytes], commit: str = "done.json", fail: bool = False) -> None:
    with storage.output_dir(dest, commit) as staging:
        for name, data in files.items():
            (staging.path / name).parent.mkdir(parents=True, exist_ok=True)
            (staging.path / name).write_bytes(data)
            if name != commit and name.startswith("early"):
                staging.send(staging.path / name)
                assert (staging.path / name).exists() == dest.local  # an uploaded file's local copy is dropped
        if fail:
            raise RuntimeError("killed")


def test_output_dir_on_s3_commits_last_and_replaces_the_old_content(s3):
    dest = resolve(s3.uri("out"), "--out")
    _write(dest, {"early/1.bin": b"1", "late/2.bin": b"2", "done.json": b"{}"})
    assert s3.files("out") == ["done.json", "early/1.bin", "late/2.bin"]
    _write(dest, {"late/2.bin": b"two", "done.json": b"{\"v\": 2}"})
    assert s3.files("out") == ["done.json", "late/2.bin"]  # files of the old content are gone
    assert s3.read("out/late/2.bin") == b"two"

    with pytest.raises(RuntimeError, match="killed"):
        _write(dest, {"early/3.bin": b"3", "done.json": b"{}"}, fail=True)
    # uncommitted: no commit file, nothing this write sent, and the marker of an unfinished write
    assert "done.json" not in s3.files("out") and "early/3.bin" not in s3.files("out")
    assert storage.WRITING in s3.files("out")
    _write(dest, {"a": b"a", "done.json": b"{}"})  # the next write replaces an unfinished one
    assert s3.files("out") == ["a", "done.json"]


def test_output_dir_on_s3_leaves_a_foreign_folder_alone(s3):
    storage.write_bytes(resolve(s3.uri("data/notes.txt"), "x"), b"mine")
    with pytest.raises(StorageError, match="holds 1 file.* but no done.json: not an output of this kind"):
        _write(resolve(s3.uri("data"), "--out"), {"done.json": b"{}"})
    assert s3.files("data") == ["notes.txt"]
    with pytest.raises(StorageError, match="will not write into a whole bucket"):
        _write(resolve(s3.uri(), "--out"), {"done.json": b"{}"})


def test_output_dir_locally_is_one_rename(tmp_path):
    dest = resolve(tmp_path / "out", "--out")
    _write(dest, {"early/1.bin": b"1", "done.json": b"{}"})
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == ["done.json", "early/1.bin"]  # send() keeps local files where they are
    with pytest.raises(RuntimeError):
        _write(dest, {"x": b"x", "done.json": b"{}"}, fail=True)
    assert (tmp_path / "out" / "early" / "1.bin").is_file() and not (tmp_path / "out" / "x").exists()
