"""The installed distribution: one import name in site-packages, the command line under both spellings.

Builds the wheel from this checkout (no build isolation: nothing is fetched) and installs it without
its dependencies into a clean venv, so what lands in site-packages is the wheel's own doing. The
dependencies come from this test's interpreter on PYTHONPATH: PYTHONPATH runs no .pth file, so the
editable install of this checkout cannot answer for the wheel.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools puts whatever an earlier build left in build/lib into the wheel
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", "benchmarks", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    wheel = next((tmp / "dist").glob("lstm_export-*.whl"))
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    before = {p.name for p in site.iterdir()}
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    return wheel, env_dir, site, before


def test_only_lstm_export_lands_in_site_packages(installed):
    wheel, _, site, before = installed
    added = {p.name for p in site.iterdir()} - before
    assert {n for n in added if not n.endswith(".dist-info")} == {"lstm_export"}, sorted(added)
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"lstm_export"}
    # the C sources compiled on first use and the committed tuning databases travel with it
    assert "lstm_export/native/lstm_kernel.c" in names
    assert {"lstm_export/runtimes/tvm_lstm/target/thread_pool.c",
            "lstm_export/runtimes/tvm_lstm/kernels/lowp/lowp_lstm.c"} <= set(names)
    assert any(n.startswith("lstm_export/runtimes/tvm_lstm/pipeline/tuning_db/") for n in names)


@pytest.mark.parametrize("command", [["bin/lstm-export"], ["bin/python", "-m", "lstm_export"]])
def test_the_command_line_runs_from_the_wheel(installed, command, tmp_path):
    _, env_dir, site, _ = installed
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    exe = [str(env_dir / command[0]), *command[1:]]
    code = "import lstm_export, lstm_export.runtimes.base as b; print(lstm_export.__file__, b.__file__)"
    where = subprocess.run([str(env_dir / "bin/python"), "-c", code], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(Path(p).is_relative_to(site) for p in where.stdout.split()), where.stdout
    version = subprocess.run([*exe, "--version"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip().startswith("lstm-export 0."), version
    listing = subprocess.run([*exe, "runtimes"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0 and "ort-cpu" in listing.stdout, listing.stderr[-2000:]
