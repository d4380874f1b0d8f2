"""Output directories: nothing of the user's is lost, nothing is left behind, and bad paths
fail before Stage I."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fair_calib_llmc import quantize
from fair_calib_llmc.io.checkpoint import (
    OutputDirError,
    check_output_dir,
    expected_checkpoint_bytes,
    output_lock,
    save_atomically,
)

from .helpers import fixture_texts, output_locked_by_another_process, saved

RECIPE = "rtn_w4a4"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def no_stage_one(monkeypatch):
    """Fail the test if quantize() got as far as Stage I."""

    def stage_one(*args, **kwargs):
        raise AssertionError("Stage I ran before the output directory was checked")

    monkeypatch.setattr("fair_calib_llmc.pipeline.build_calibration_dataset", stage_one)


@pytest.fixture
def fp_model(llada, tokenizer, tmp_path):
    return saved(llada, tokenizer, tmp_path / "fp")


@pytest.mark.unit
def test_non_empty_output_is_refused_before_stage_one(fp_model, tokenizer, tmp_path, no_stage_one):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="exists and is not empty.*--overwrite"):
        quantize(fp_model, tokenizer, RECIPE, ["text"], output_dir=out)
    assert _tree(out) == {"notes.txt": b"mine"}


@pytest.mark.unit
@pytest.mark.parametrize("overwrite", [False, True])
def test_model_directory_and_its_ancestors_are_refused(
    fp_model, tokenizer, tmp_path, no_stage_one, overwrite
):
    before = _tree(tmp_path)
    for target in (tmp_path / "fp", tmp_path, tmp_path / "fp" / ".."):
        with pytest.raises(OutputDirError, match="the model's own directory"):
            quantize(fp_model, tokenizer, RECIPE, ["t"], output_dir=target, overwrite=overwrite)
    assert _tree(tmp_path) == before


@pytest.mark.unit
def test_working_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "work.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    for target in (".", "..", str(tmp_path)):
        with pytest.raises(OutputDirError, match="working directory"):
            check_output_dir(target, overwrite=True)
    assert (tmp_path / "work.txt").read_text() == "keep"
    assert check_output_dir("sub/out") == tmp_path / "sub" / "out"  # below it is fine


@pytest.mark.unit
def test_existing_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputDirError, match="is an existing file"):
        check_output_dir(tmp_path / "out", overwrite=True)


@pytest.mark.unit
@pytest.mark.parametrize("target", ["/proc/fair-calib-out", "/sys/fair-calib-out/ckpt"])
def test_unwritable_places_are_refused(target):
    with pytest.raises(OutputDirError, match="is not writable"):
        check_output_dir(target)


@pytest.mark.unit
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permission bits")
def test_read_only_parent_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    try:
        with pytest.raises(OutputDirError, match="is not writable"):
            check_output_dir(parent / "out")
    finally:
        parent.chmod(0o755)


@pytest.mark.unit
def test_full_disk_is_refused_before_stage_one(fp_model, tokenizer, tmp_path, monkeypatch):
    usage = os.statvfs(tmp_path)
    with pytest.raises(OutputDirError, match="not enough disk space"):
        check_output_dir(tmp_path / "out", expected_bytes=usage.f_bavail * usage.f_frsize * 2)
    # the estimate: int4 linears, full-precision embeddings and LM head
    embeddings = 2 * fp_model.get_input_embeddings().weight.numel() * 4
    assert embeddings < expected_checkpoint_bytes(fp_model) < embeddings * 1.5


@pytest.mark.integration
def test_overwrite_replaces_only_after_the_new_checkpoint_exists(
    fp_model, tokenizer, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    seen_during_save = []
    original = type(tokenizer).save_pretrained

    def save_and_look(self, path, **kwargs):
        seen_during_save.append(_tree(out))  # the old checkpoint is still in place
        return original(self, path, **kwargs)

    monkeypatch.setattr(type(tokenizer), "save_pretrained", save_and_look)
    result = quantize(
        fp_model, tokenizer, RECIPE, _texts(), output_dir=out, overwrite=True, max_prompts=2
    )
    assert seen_during_save == [{"old.txt": b"old"}]
    assert result.output_dir == out and (out / "config.json").exists()
    assert not (out / "old.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["fp", "out"]  # nothing left aside


@pytest.mark.integration
def test_permissions_follow_the_umask(fp_model, tokenizer, tmp_path):
    old = os.umask(0o027)
    try:
        quantize(fp_model, tokenizer, RECIPE, _texts(), output_dir=tmp_path / "q", max_prompts=2)
    finally:
        os.umask(old)
    assert (tmp_path / "q").stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "q").iterdir()}
    assert set(modes.values()) == {0o640}, modes


@pytest.mark.unit
def test_stale_leftovers_of_killed_runs_are_cleared(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    partial = tmp_path / f".out.partial-{dead}-abcd"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".out.old-{dead}-abcd"
    old.mkdir()
    (old / "config.json").write_text("previous")
    (tmp_path / ".other.partial-1-x").mkdir()  # another target's: not ours to touch
    check_output_dir(tmp_path / "out")
    # the killed run had moved the old checkpoint aside: it comes back
    assert sorted(os.listdir(tmp_path)) == [".other.partial-1-x", "out"]
    assert (tmp_path / "out" / "config.json").read_text() == "previous"


_SLOW_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fair_calib_llmc.io.checkpoint import save_atomically

    class SlowModel:
        def save_pretrained(self, path, **kwargs):
            (Path(path) / "model.safetensors").write_bytes(b"x" * 4096)
            print("saving", flush=True)
            time.sleep(120)

    class Tokenizer:
        def save_pretrained(self, path):
            pass

    save_atomically(SlowModel(), Tokenizer(), sys.argv[1], overwrite=True)
    """
)


@pytest.mark.integration
def test_sigterm_during_save_loses_nothing_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("the previous checkpoint")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # llm-compressor logs to stdout on import
            if line.strip() == "saving":
                break
        else:
            raise AssertionError(proc.stderr.read())
        assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM
    assert "removed the partial checkpoint" in proc.stdout.read() + proc.stderr.read()
    assert os.listdir(tmp_path) == ["out"]
    assert _tree(out) == {"config.json": b"the previous checkpoint"}


@pytest.mark.unit
def test_save_atomically_refuses_the_model_directory(fp_model, tokenizer, tmp_path):
    before = _tree(tmp_path / "fp")
    with pytest.raises(OutputDirError, match="the model's own directory"):
        save_atomically(fp_model, tokenizer, tmp_path / "fp", overwrite=True)
    assert _tree(tmp_path / "fp") == before


class _FakeModel:
    """Writes a two-file "checkpoint": enough for save_atomically, no torch work."""

    def save_pretrained(self, path, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        (Path(path) / "config.json").write_text("{}")


class _FakeTokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")


@pytest.fixture
def mount_point(tmp_path, monkeypatch):
    """An empty directory that behaves like a mount point: ``os.path.ismount`` says so, and
    renaming it or renaming onto it fails with EBUSY, as the kernel does."""
    volume = tmp_path / "volume"
    volume.mkdir()
    real_ismount, real_rename, real_replace = os.path.ismount, os.rename, os.replace
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == volume or real_ismount(p))

    def busy(real):
        def rename(src, dst, *args, **kwargs):
            if volume in (Path(src), Path(dst)):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(dst))
            return real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "rename", busy(real_rename))
    monkeypatch.setattr(os, "replace", busy(real_replace))
    return volume


@pytest.mark.unit
def test_empty_mount_point_is_saved_into(mount_point):
    inode = mount_point.stat().st_ino
    assert save_atomically(_FakeModel(), _FakeTokenizer(), mount_point) == mount_point
    assert mount_point.stat().st_ino == inode  # the same directory, filled
    assert _tree(mount_point) == {
        "config.json": b"{}",
        "model.safetensors": b"weights",
        "tokenizer.json": b"{}",
    }
    assert sorted(os.listdir(mount_point.parent)) == ["volume"]  # nothing beside it


@pytest.mark.unit
def test_failed_move_into_a_mount_point_leaves_it_empty(mount_point, monkeypatch):
    real_rename = os.rename

    def fail_on_config(src, dst):
        if Path(dst).name == "config.json":
            raise OSError(errno.EIO, "I/O error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_on_config)
    with pytest.raises(OSError, match="I/O error"):
        save_atomically(_FakeModel(), _FakeTokenizer(), mount_point)
    assert os.listdir(mount_point) == []


@pytest.mark.unit
def test_read_only_mount_point_is_refused_before_stage_one(
    fp_model, tokenizer, mount_point, monkeypatch, no_stage_one
):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.parent == mount_point:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OutputDirError, match=r"volume.* is not writable \(Read-only file system\)"):
        quantize(fp_model, tokenizer, RECIPE, ["text"], output_dir=mount_point)


@pytest.mark.unit
def test_non_empty_mount_point_is_not_replaced(mount_point):
    (mount_point / "data.bin").write_bytes(b"mine")
    with pytest.raises(OutputDirError, match="is a mount point and not empty"):
        check_output_dir(mount_point, overwrite=True)
    assert _tree(mount_point) == {"data.bin": b"mine"}


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_real_tmpfs_mount_point(tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(volume)])
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        save_atomically(_FakeModel(), _FakeTokenizer(), volume)
        assert sorted(os.listdir(volume)) == ["config.json", "model.safetensors", "tokenizer.json"]
        for name in os.listdir(volume):
            (volume / name).unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(volume)], check=True)
        with pytest.raises(OutputDirError, match="is not writable"):
            check_output_dir(volume)
    finally:
        subprocess.run(["umount", str(volume)], check=True)


@pytest.mark.integration
def test_second_run_into_a_locked_directory_fails_first_naming_the_other(
    fp_model, tokenizer, tmp_path, no_stage_one
):
    out = tmp_path / "out"
    with output_locked_by_another_process(out) as pid:
        for overwrite in (False, True):
            with pytest.raises(OutputDirError, match=f"being written by another run \\(PID {pid},"):
                quantize(fp_model, tokenizer, RECIPE, ["t"], output_dir=out, overwrite=overwrite)
        with pytest.raises(OutputDirError, match=f"PID {pid}"):
            save_atomically(_FakeModel(), _FakeTokenizer(), out)
    assert sorted(os.listdir(tmp_path)) == ["fp"]  # the holder removed its lock file
    assert save_atomically(_FakeModel(), _FakeTokenizer(), out) == out  # free again


@pytest.mark.unit
def test_output_lock_is_reentrant_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with output_lock(out) as target:
        assert target == out and (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
        with output_lock(out):  # quantize() inside the CLI's lock, save_atomically inside both
            pass
        assert (tmp_path / ".out.lock").exists()
        save_atomically(_FakeModel(), _FakeTokenizer(), out)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with output_lock(tmp_path / "new" / "sub" / "out"):  # a run that fails before its save
        assert (tmp_path / "new" / "sub").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # leaves no directories behind


def _texts():
    """This file's first 1600 characters as of commit 3db18fc, in 400-character pieces."""
    return fixture_texts("checkpoint_texts")
