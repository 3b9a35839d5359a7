"""The package as users get it: build the wheel, install it into a fresh virtual
environment (no download: it reuses this test environment's packages) and run
the README's "First run" commands as written. And the runtime alone: its
wheel in an environment that holds only what `keras-primer-runtime[cpu,
sentencepiece]` requires (no Keras, TensorFlow, JAX or PyTorch) generates
from an export the text this environment gives.

Also checks that this test environment itself holds one TensorFlow and one
ONNX Runtime (`tools/check_install.py` checks every documented `pip install`).
"""

import importlib.metadata
import json
import os
import re
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
# Left out of the copy of the checkout that the wheels are built from.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".ruff_cache"
)


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


def _missing_requirements(python, extras, distribution="keras-primer", recursive=False):
    """Requirements of `distribution[extras]` not satisfied in the environment of
    `python` (with `recursive`, also those of every requirement it has, down the
    tree; the check needs `packaging` there)."""
    code = f"""
import importlib.metadata as md, json
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
same = {SAME_MODULE!r}
missing, seen = [], set()
todo = [({distribution!r}, {tuple(extras)!r})]
while todo:
    owner, extras = todo.pop()
    for text in md.requires(owner) or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({{"extra": e}}) for e in extras or ("",)):
            continue
        name = same.get(req.name, req.name)
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            missing.append(owner + ": " + text)
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(owner + ": " + text + " (have " + version + ")")
        key = (canonicalize_name(name), tuple(sorted(req.extras)))
        if {recursive!r} and key not in seen:
            seen.add(key)
            todo.append((name, key[1]))
print(json.dumps(missing))
"""
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def build_wheel(project, dist):
    """The wheel of the project folder `project`, built into `dist` (no download)."""
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


def build_wheels(src, dist) -> list:
    """The wheels of both distributions built from the checkout `src`:
    keras-primer and keras-primer-runtime (from `src/runtime`)."""
    for project in (src / "runtime", src):
        build_wheel(project, dist)
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
        ignore=COPY_IGNORE,
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

    generated = False
    for line in readme_block("First run", "bash").strip().splitlines():
        result = subprocess.run(
            shlex.split(line), capture_output=True, text=True, env=env, cwd=work, timeout=1800
        )
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        if not line.startswith("python"):
            continue
        prompt = re.search(r"\.generate\('([^']+)'", line)
        if prompt:  # generated text: the prompt and more than spaces
            text = result.stdout.rstrip("\n")
            assert text.startswith(prompt.group(1)), text
            assert text[len(prompt.group(1)) :].strip(), text
            generated = True
        else:
            assert result.stdout.strip() == "True"  # loaded compiled
    assert generated, "the first 'First run' block prints no generated text"
    export = work / "runs" / "first" / "export"
    assert (export / "serving" / "first" / "1" / "saved_model.pb").is_file()
    assert (export / "serving" / "models.config").is_file()
    assert (export / "onnx" / "model.onnx").is_file()


# The runtime's CPU install with SentencePiece: the environment of the
# runtime-only test holds these distributions and what they require, nothing else.
RUNTIME_EXTRAS = ("cpu", "sentencepiece")
# Not one of them may be importable there.
NOT_IN_RUNTIME = ("tensorflow", "keras", "jax", "torch", "keras_primer")


def _requirement_closure(distribution, extras):
    """This environment's distributions that `distribution[extras]` requires,
    directly or through another, by their metadata (`importlib.metadata.requires`)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, todo = {}, [(distribution, tuple(extras))]
    while todo:
        owner, owner_extras = todo.pop()
        for text in importlib.metadata.requires(owner) or []:
            req = Requirement(text)
            if req.marker and not any(
                req.marker.evaluate({"extra": e}) for e in owner_extras or ("",)
            ):
                continue
            key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
            if key not in found:
                found[key] = importlib.metadata.distribution(req.name)
                todo.append((req.name, key[1]))
    return {canonicalize_name(d.metadata["Name"]): d for d in found.values()}


def _link_distributions(distributions, folder):
    """`folder` as a site-packages holding exactly `distributions`: a symlink for
    each of their installed files (package folders, `*.libs`, `*.dist-info`) and
    nothing else, so that a namespace folder shared with other distributions
    (protobuf's `google/`) brings only their files."""
    for dist in distributions:
        for file in dist.files:
            if file.parts[0] == "..":  # console scripts, outside site-packages
                continue
            source = dist.locate_file(file)
            target = folder / file
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)


@pytest.mark.slow
def test_runtime_wheel_alone_generates_from_an_export(tmp_path):
    """`keras-primer-runtime[cpu,sentencepiece]` alone (its wheel, NumPy, ONNX
    Runtime and what they require, sentencepiece; no Keras, TensorFlow, JAX,
    PyTorch or keras_primer) generates from an ONNX export the same text as
    this environment's `OrtGenerator`, greedy and sampled."""
    from export_helpers import make_lm

    from keras_primer.export import export_model
    from keras_primer_runtime import OrtGenerator

    # The runtime's wheel, from a copy of its folder (the checkout stays clean).
    shutil.copytree(os.path.join(ROOT, "runtime"), tmp_path / "runtime", ignore=COPY_IGNORE)
    build_wheel(tmp_path / "runtime", tmp_path / "dist")
    (wheel,) = (tmp_path / "dist").glob("keras_primer_runtime-*.whl")

    # A fresh environment (no pip either) that sees only the runtime's
    # requirements, linked from this environment (no download).
    needed = _requirement_closure("keras-primer-runtime", RUNTIME_EXTRAS)
    assert {"numpy", "onnxruntime", "sentencepiece"} <= set(needed), sorted(needed)
    assert not set(needed) & {"keras", "tensorflow", "tensorflow-cpu", "jax", "torch"}
    linked = tmp_path / "linked"
    _link_distributions(needed.values(), linked)
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
    with open(os.path.join(site_dir, "runtime_requirements.pth"), "w") as f:
        f.write(str(linked) + "\n")
    # This environment's pip installs into that one (`--python`).
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
        + ["-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert _missing_requirements(python, RUNTIME_EXTRAS, "keras-primer-runtime", True) == "[]"

    # Tiny random-weight models, bytes and SentencePiece (the `sentencepiece`
    # extra), exported to ONNX in this process; the text this environment's
    # OrtGenerator gives for them.
    prompts, new_tokens = ["ROMEO:", "To be, or", "Hi"], 12
    sampling = dict(temperature=1.0, top_k=20, top_p=0.95, seed=7)
    exports, expected = {}, {}
    for tokenizer in ("bytes", "sentencepiece"):
        model_path = str(tmp_path / f"{tokenizer}.keras")
        make_lm(tokenizer=tokenizer).save(model_path)
        export_model(model_path, str(tmp_path / tokenizer), saved_model=False)
        exports[tokenizer] = str(tmp_path / tokenizer / "onnx")
        here = OrtGenerator(exports[tokenizer])
        expected[tokenizer] = {
            "greedy": here.generate(prompts, max_new_tokens=new_tokens),
            "sampled": here.generate(prompts, max_new_tokens=new_tokens, **sampling),
        }
    assert os.path.isfile(os.path.join(exports["sentencepiece"], "tokenizer.model"))

    code = f"""
import importlib, importlib.metadata, json, sys
importable = []
for name in {NOT_IN_RUNTIME!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    importable.append(name)
import keras_primer_runtime
from keras_primer_runtime import OrtGenerator
texts = {{}}
for tokenizer, folder in {exports!r}.items():
    generator = OrtGenerator(folder)
    texts[tokenizer] = {{
        "greedy": generator.generate({prompts!r}, max_new_tokens={new_tokens}),
        "sampled": generator.generate({prompts!r}, max_new_tokens={new_tokens}, **{sampling!r}),
    }}
print(json.dumps({{
    "importable": importable,
    "runtime": keras_primer_runtime.__file__,
    "distributions": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
    "texts": texts,
    "frameworks_loaded": sorted({{m.split(".")[0] for m in sys.modules}} & set({NOT_IN_RUNTIME!r})),
}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")}
    result = subprocess.run(
        [python, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    there = json.loads(result.stdout.strip().splitlines()[-1])
    assert there["importable"] == [], there["importable"]
    assert there["frameworks_loaded"] == []
    assert there["runtime"].startswith(site_dir), there["runtime"]  # the wheel
    assert {check_install.normalize(n) for n in there["distributions"]} == set(needed) | {
        "keras-primer-runtime"
    }
    assert there["texts"] == expected
    for texts in expected.values():
        assert texts["sampled"] != texts["greedy"]  # sampling did sample
        assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts["greedy"], prompts))
