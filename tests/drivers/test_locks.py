"""Output locks live inside the project (or in a per-user directory that is checked) and never follow a
symlink: nobody who can write to a shared directory can make a stage truncate another file. Real files, real
processes, and a real second Unix user when the tests run as root."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from mrpo.cli import main
from mrpo.errors import LockRefused, OutputLocked
from mrpo.locks import PROJECT_LOCK_DIR, lock_path, output_lock

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

HOLD_LOCK = """
import sys, time
from mrpo.locks import output_lock
with output_lock(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A directory that DVC would call a project (it has .dvc/), with params.yaml, as the working dir."""
    (tmp_path / ".dvc").mkdir()
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_project_output_is_locked_inside_the_project_and_an_outside_one_in_a_private_directory(
    project, tmp_path_factory
):
    inside = lock_path(project / "models/policy")
    assert inside.parent == project / PROJECT_LOCK_DIR
    assert lock_path("models/policy") == inside  # the same output by a relative path: the same lock

    outside = lock_path(tmp_path_factory.mktemp("elsewhere") / "policy")
    st = outside.parent.stat()
    assert outside.parent == Path(tempfile.gettempdir()) / f"mrpo-locks-{os.getuid()}"
    assert st.st_uid == os.getuid() and st.st_mode & 0o077 == 0


def test_a_planted_symlink_named_like_a_lock_is_refused_and_its_target_untouched(project, capsys):
    secret = project / "secret.txt"
    secret.write_text("root's own file\n")
    os.chmod(secret, 0o600)
    policy = project / "models/policy"
    planted = lock_path(policy)
    planted.symlink_to(secret)

    with pytest.raises(LockRefused, match=rf"lock file {planted} for {policy} .*symlink is refused"):
        with output_lock(policy, "train"):
            pass
    assert secret.read_text() == "root's own file\n"

    # The CLI: one line, exit 2, nothing written through the symlink.
    raw = yaml.safe_load(PARAMS.read_text())
    raw["train"]["output_dir"] = str(policy)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"lock file {planted}" in err and "Traceback" not in err
    assert secret.read_text() == "root's own file\n"

    # A hard link to another file is refused too (the lock would be truncated through it).
    planted.unlink()
    os.link(secret, planted)
    with pytest.raises(LockRefused, match="not a plain file with one link"):
        with output_lock(policy, "train"):
            pass
    assert secret.read_text() == "root's own file\n"


def test_two_processes_exclude_each_other_on_a_project_output(project):
    policy = project / "models/policy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(policy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=rf"being written by `mrpo train` \(pid {holder.pid} "):
            with output_lock("models/policy", "train"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(policy, "train"):
        pass


# ---------------------------------------------------------------- a second Unix user

PRINT_LOCK_PATH = "import sys\nfrom mrpo.locks import lock_path\nprint(lock_path(sys.argv[1]))"


@pytest.fixture
def second_user():
    """A real second Unix user, created for the test and removed after it (root only)."""
    if os.geteuid() != 0:
        pytest.skip("creating a second Unix user needs root")
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if not useradd or not userdel:
        pytest.skip("useradd/userdel not available")
    name = f"mrpolock{os.getpid()}"
    proc = subprocess.run([useradd, "--no-create-home", "--shell", "/bin/sh", name], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"useradd failed: {proc.stderr.decode().strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run([userdel, name], capture_output=True)


@pytest.fixture
def shared_tmp():
    """A directory like /tmp: world-writable and sticky, reachable by every user."""
    path = Path(tempfile.mkdtemp(prefix="mrpo-shared-", dir="/tmp"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_lock_directory_planted_by_another_user_is_refused(second_user, shared_tmp, tmp_path, monkeypatch):
    shared = shared_tmp
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    monkeypatch.delenv("MRPO_LOCK_DIR", raising=False)
    secret = tmp_path / "root-only"
    secret.write_text("root's own file\n")
    os.chmod(secret, 0o600)
    output = shared / "outside-any-project/policy"
    planted_dir = shared / f"mrpo-locks-{os.getuid()}"
    key_file = f"{hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:24]}.lock"

    # The other user makes root's lock directory first, open to all, with a symlink named like the lock.
    plant = f"mkdir -m 777 {planted_dir} && ln -s {secret} {planted_dir / key_file}"
    subprocess.run(["/bin/sh", "-c", plant], check=True, user=second_user.pw_uid, group=second_user.pw_gid)
    assert planted_dir.stat().st_uid == second_user.pw_uid

    refused = rf"lock directory {planted_dir} .* owned by uid {second_user.pw_uid}"
    with pytest.raises(LockRefused, match=refused):
        with output_lock(output, "diagnose"):
            pass
    assert secret.read_text() == "root's own file\n"


def test_another_users_stage_locks_in_its_own_directory(second_user, shared_tmp, monkeypatch):
    runnable = subprocess.run(
        ["/bin/sh", "-c", f"test -x {sys.executable} && {sys.executable} -c pass"],
        capture_output=True,
        user=second_user.pw_uid,
        group=second_user.pw_gid,
        cwd="/",
    )
    if runnable.returncode != 0:
        pytest.skip(f"{sys.executable} cannot be run by another user here")
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    monkeypatch.delenv("MRPO_LOCK_DIR", raising=False)
    output = shared_tmp / "outside-any-project/policy"
    shared = shared_tmp
    with output_lock(output, "diagnose"):  # root's own lock directory exists and is held
        other = subprocess.run(
            [sys.executable, "-c", PRINT_LOCK_PATH, str(output)],
            capture_output=True,
            text=True,
            user=second_user.pw_uid,
            group=second_user.pw_gid,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TMPDIR": str(shared)},
            cwd="/",
        )
    assert other.returncode == 0, other.stderr
    assert Path(other.stdout.strip()).parent == shared / f"mrpo-locks-{second_user.pw_uid}"
