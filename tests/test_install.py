"""The package as users get it: build the wheel, install it into a fresh virtual
environment (no download: it reuses this test environment's packages) and run
the README's "First run" commands as written.

Also checks that this test environment itself holds one TensorFlow and one
ONNX Runtime (`tools/check_install.py` checks every documented `pip install`).
"""

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest
from test_readme import readme_block
from test_registration import CORPUS

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
)
import check_install  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.tensorflow_only

# The test environment installs `tensorflow-cpu` where the package requires
# `tensorflow` (the same module; see requirements/test.txt).
SAME_MODULE = {"tensorflow": "tensorflow-cpu"}


def test_this_environment_is_coherent():
    installed = {
        check_install.normalize(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
    }
    assert check_install.problems(installed) == []


def test_check_install_rules():
    assert check_install.problems({"tensorflow": "2.21.0"}) == []
    found = check_install.problems({"tensorflow": "2.21.0", "tensorflow-cpu": "2.21.0"})
    assert found and "2 distributions provide the `tensorflow` module" in found[0]
    assert (
        "ONNX Runtime"
        in check_install.problems(
            {"tensorflow": "2.21", "onnxruntime": "1.30", "onnxruntime-gpu": "1.30"}
        )[0]
    )
    mixed = {
        "tensorflow": "2.21",
        "jax-cuda12-plugin": "0.10.2",
        "nvidia-cuda-runtime": "13.0.96",
        "nvidia-cufft": "12.0.0.61",
    }
    assert "several CUDA majors" in check_install.problems(mixed)[0]
    assert check_install.cuda_majors({"nvidia-cufft": "12.0", "nvidia-cublas": "13.1"}) == {
        "13": {"nvidia-cublas"}
    }
    assert check_install.pinned() == []  # the library gives ranges


def _missing_requirements(python, extras):
    """Requirements of keras-primer[extras] not satisfied in the environment of `python`."""
    code = f"""
import importlib.metadata as md, json
from packaging.requirements import Requirement
same = {SAME_MODULE!r}
missing = []
for text in md.requires("keras-primer"):
    req = Requirement(text)
    if req.marker and not any(req.marker.evaluate({{"extra": e}}) for e in {extras!r}):
        continue
    name = same.get(req.name, req.name)
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        missing.append(text)
        continue
    if not req.specifier.contains(version, prereleases=True):
        missing.append(text + " (have " + version + ")")
print(json.dumps(missing))
"""
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def build_wheels(src, dist) -> list:
    """The wheels of both distributions built from the checkout `src`:
    keras-primer and keras-primer-runtime (from `src/runtime`)."""
    for project in (src / "runtime", src):
        built = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-q",
                "-w",
                str(dist),
                str(project),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert built.returncode == 0, built.stderr[-3000:]
    (library,) = dist.glob("keras_primer-*.whl")
    (runtime,) = dist.glob("keras_primer_runtime-*.whl")
    return [library, runtime]


@pytest.mark.slow
def test_wheel_installs_and_first_run_works(tmp_path):
    # Build the wheel from a copy of the sources (the checkout stays clean).
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".ruff_cache"
        ),
    )
    wheels = build_wheels(src, tmp_path / "dist")

    # A fresh environment that sees this one's packages (a path entry, whose own
    # .pth files, such as an editable keras-primer, are not processed).
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=1800
    )
    python = str(venv / "bin" / "python")
    site_dir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(site_dir, "test_environment.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", *map(str, wheels)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert _missing_requirements(python, ["onnx", "serving", "train"]) == "[]"

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")}
    env["PATH"] = str(venv / "bin") + os.pathsep + env["PATH"]
    (tmp_path / "corpus.txt").write_text(CORPUS * 4)
    env["KERAS_PRIMER_SHAKESPEARE"] = str(tmp_path / "corpus.txt")
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run(
        [python, "-c", "import keras_primer_runtime; print(keras_primer_runtime.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        check=True,
    ).stdout
    assert where.startswith(site_dir), where  # the wheel, not the checkout

    shown = subprocess.run(
        ["keras-primer", "--help"], capture_output=True, text=True, env=env, cwd=work, timeout=1800
    )
    assert shown.returncode == 0 and "usage: keras-primer" in shown.stdout, shown.stderr

    for line in readme_block("First run", "bash").strip().splitlines():
        result = subprocess.run(
            shlex.split(line), capture_output=True, text=True, env=env, cwd=work, timeout=1800
        )
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        if line.startswith("python"):
            assert result.stdout.strip() == "True"  # loaded compiled
    export = work / "runs" / "first" / "export"
    assert (export / "serving" / "first" / "1" / "saved_model.pb").is_file()
    assert (export / "serving" / "models.config").is_file()
    assert (export / "onnx" / "model.onnx").is_file()
