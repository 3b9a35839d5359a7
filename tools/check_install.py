#!/usr/bin/env python
"""Resolves every documented `pip install keras-primer[...]` (and `keras-primer-runtime[...]`)
and checks it is coherent.

Resolution only (`pip install --dry-run --ignore-installed --report`, with
pip's `fast-deps`): pip reads each wheel's metadata, from the index's metadata
file or with HTTP range requests into the wheel, and downloads no large wheel
(without `fast-deps`, an index that serves no metadata files has pip
download every wheel whole: gigabytes for the GPU extras).
For each install listed in `INSTALLS` it asserts

* exactly one distribution provides the `tensorflow` module,
* at most one ONNX Runtime build (never `onnxruntime` beside `onnxruntime-gpu`),
* at most one CUDA major across every CUDA package pulled in,

and, for `pyproject.toml` itself, that the library's requirements are
ranges (no `==` pins: exact pins belong to requirements/, the test env),
but for its sibling `keras-primer-runtime`, built from runtime/ and released
with the same version. The runtime's own installs (`RUNTIME_INSTALLS`) must
resolve to no deep-learning framework at all. Until the sibling is on the
index, a requirement of it is replaced by its requirements, read from
runtime/pyproject.toml.

The requirements are read from `pyproject.toml` (no build needed) and
resolved against the public index as a user sees it (`pip --isolated`, so
local wheel folders and constraint files of this machine do not count).
Each resolution has a time limit; a network failure or a timeout fails the
check with the pip output, it never hangs.

    python tools/check_install.py            # all documented installs
    python tools/check_install.py onnx gpu   # only these extras sets (comma-separated)
    python tools/check_install.py runtime:cpu  # keras-primer-runtime[cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every install the README documents ("Install"), as the extras a user types
# in brackets, and the all-GPU combination.
INSTALLS = (
    "",
    "jax",
    "torch",
    "train",
    "onnx,serving",
    "gpu,onnx-gpu",
    "jax,train,onnx,serving",
    "torch,gpu,onnx-gpu,serving,train",
)

# The runtime's documented installs (README "Install"): no framework may come with them.
RUNTIME_INSTALLS = ("runtime:cpu", "runtime:cpu,sentencepiece", "runtime:gpu")
RUNTIME = "keras-primer-runtime"
RUNTIME_PYPROJECT = os.path.join(ROOT, "runtime", "pyproject.toml")
FRAMEWORKS = {"keras", "keras-hub", "jax", "jaxlib", "torch", "tf-keras"}

# Distributions that install the `tensorflow` / `onnxruntime` top-level module.
TENSORFLOW_PROVIDERS = {
    "tensorflow",
    "tensorflow-cpu",
    "tensorflow-gpu",
    "tensorflow-intel",
    "tensorflow-macos",
    "tensorflow-aarch64",
    "tensorflow-cpu-aws",
    "tf-nightly",
    "tf-nightly-cpu",
}
ORT_PROVIDERS = {
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
}
# CUDA 13 renamed NVIDIA's wheels without a `-cuXX` suffix; these carry the CUDA major
# in their own version number (nvidia-cufft does not, so it is not listed).
UNSUFFIXED_CUDA = {
    "nvidia-cuda-runtime",
    "nvidia-cuda-nvrtc",
    "nvidia-cuda-cupti",
    "nvidia-cuda-nvcc",
    "nvidia-cublas",
    "nvidia-nvjitlink",
    "cuda-toolkit",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: str, pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> list[str]:
    """The requirement strings of `keras-primer[extras]`, read from pyproject.toml
    (`runtime:extras`: of `keras-primer-runtime[extras]`), with each requirement
    of the sibling runtime replaced by the runtime's own requirements."""
    if extras.startswith("runtime:"):
        extras, pyproject = extras[len("runtime:") :], RUNTIME_PYPROJECT
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    reqs = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        if extra not in optional:
            raise SystemExit(
                f"check_install: {pyproject} has no extra {extra!r}; it has {sorted(optional)}"
            )
        reqs += optional[extra]
    expanded = []
    for req in reqs:
        sibling = re.fullmatch(rf"{RUNTIME}(?:\[([^\]]*)\])?==[^;]+", req.strip())
        if sibling:
            expanded += requirements("runtime:" + (sibling.group(1) or ""))
        else:
            expanded.append(req)
    return expanded


def pinned(pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> list[str]:
    """Requirements pinned with `==` or `===` (a library must give ranges),
    but the sibling `keras-primer-runtime`, released with the same version."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    every = list(project["dependencies"])
    for reqs in project.get("optional-dependencies", {}).values():
        every += reqs
    return [r for r in every if "==" in r.split(";")[0] and not r.startswith(RUNTIME)]


def cuda_majors(names_versions: dict[str, str]) -> dict[str, set[str]]:
    """CUDA major -> the distributions that imply it."""
    majors: dict[str, set[str]] = {}
    for name, version in names_versions.items():
        match = re.search(r"-cu(\d+)$", name) or re.match(r"jax-cuda(\d+)-", name)
        if match:
            major = match.group(1)
        elif name in UNSUFFIXED_CUDA:
            major = version.split(".")[0]
        else:
            continue
        majors.setdefault(major, set()).add(name)
    return majors


def problems(names_versions: dict[str, str], runtime_only: bool = False) -> list[str]:
    """What is incoherent in one resolved set of distributions (empty when fine).

    `runtime_only`: an install of the runtime alone, where no TensorFlow and
    no other deep-learning framework may appear.
    """
    found = []
    tf = sorted(TENSORFLOW_PROVIDERS & names_versions.keys())
    if runtime_only:
        frameworks = sorted((TENSORFLOW_PROVIDERS | FRAMEWORKS) & names_versions.keys())
        if frameworks:
            found.append(f"the runtime alone pulls in deep-learning frameworks: {frameworks}")
    elif len(tf) != 1:
        found.append(
            f"{len(tf)} distributions provide the `tensorflow` module: {tf} (need exactly one)"
        )
    ort = sorted(ORT_PROVIDERS & names_versions.keys())
    if len(ort) > 1:
        found.append(f"several ONNX Runtime builds that overwrite each other: {ort}")
    majors = cuda_majors(names_versions)
    if len(majors) > 1:
        found.append(
            "several CUDA majors: "
            + "; ".join(f"CUDA {m}: {sorted(n)[:4]}" for m, n in sorted(majors.items()))
        )
    return found


def resolve(reqs: list[str], timeout: float, python: str = sys.executable) -> dict[str, str]:
    """`{distribution: version}` that pip would install for `reqs` into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        command = [
            python,
            "-m",
            "pip",
            "--isolated",
            "--disable-pip-version-check",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            report,
            "--use-feature=fast-deps",  # why: the module docstring
            "--timeout",
            "30",
            "--retries",
            "1",
            *reqs,
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"pip did not resolve within {timeout:.0f} s (is PyPI reachable?)"
            ) from None
        if result.returncode != 0:
            raise RuntimeError(
                "pip could not resolve:\n" + (result.stderr or result.stdout)[-3000:]
            )
        with open(report) as f:
            data = json.load(f)
    return {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}


def check(extras: str, timeout: float) -> tuple[str, list[str], dict[str, str]]:
    runtime_only = extras.startswith("runtime:")
    name, bare = (RUNTIME, extras[len("runtime:") :]) if runtime_only else ("keras-primer", extras)
    spec = f"{name}[{bare}]" if bare else name
    try:
        resolved = resolve(requirements(extras), timeout)
    except RuntimeError as error:
        return spec, [str(error)], {}
    return spec, problems(resolved, runtime_only), resolved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "installs", nargs="*", help="extras sets to check (default: every documented one)"
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds per resolution (default 300)"
    )
    parser.add_argument("--jobs", type=int, default=4, help="resolutions in parallel (default 4)")
    parser.add_argument("--verbose", action="store_true", help="print every resolved distribution")
    args = parser.parse_args(argv)
    failed = False
    if pins := pinned():
        print(
            f"FAIL pyproject.toml pins exact versions (use ranges; pins go in requirements/): {pins}"
        )
        failed = True
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        installs = args.installs or INSTALLS + RUNTIME_INSTALLS
        results = list(pool.map(lambda e: check(e, args.timeout), installs))
    for spec, found, resolved in results:
        if found:
            failed = True
            print(f"FAIL pip install '{spec}'")
            for line in found:
                print("    " + line.replace("\n", "\n    "))
            continue
        tf = next((n for n in resolved if n in TENSORFLOW_PROVIDERS), None)
        ort = [n for n in resolved if n in ORT_PROVIDERS]
        cuda = sorted(cuda_majors(resolved)) or ["none"]
        print(
            f"ok   pip install '{spec}': {len(resolved)} distributions, "
            f"{f'{tf} {resolved[tf]}' if tf else 'no TensorFlow'}, "
            f"ONNX Runtime: {ort[0] + ' ' + resolved[ort[0]] if ort else 'none'}, CUDA: {cuda[0]}"
        )
        if args.verbose:
            print("    " + " ".join(f"{n}=={v}" for n, v in sorted(resolved.items())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
