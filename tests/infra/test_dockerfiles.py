"""The Dockerfiles, read structurally (no Docker engine here): base image, Ray and CUDA
versions, what gets copied, no secrets, a non-root user, and an entrypoint that exists."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.redaction import is_secret_key

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "infra" / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FILES = ("Dockerfile", "Dockerfile.gpu")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def arg_default(text: str, name: str) -> str:
    for ins, rest in instructions(text):
        if ins == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"ARG {name} has no default")


def base_image(text: str) -> str:
    frm = [rest for ins, rest in instructions(text) if ins == "FROM"]
    assert len(frm) == 1, "expected a single-stage build"
    return frm[0].replace("${RAY_VERSION}", arg_default(text, "RAY_VERSION"))


@pytest.mark.parametrize("name", FILES)
def test_base_image_is_ray_on_the_right_python(stack, name):
    image = base_image(stack.dockerfiles[name])
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    version, py, flavour = tag.split("-")
    assert py == "py311", image
    assert flavour == ("cpu" if name == "Dockerfile" else "cu128"), image


def test_gpu_image_pairs_cuda_base_with_matching_torch_wheels(stack):
    for name in FILES:
        text = stack.dockerfiles[name]
        flavour = base_image(text).rsplit("-", 1)[1]
        index = re.search(r"download\.pytorch\.org/whl/(\w+)", text)
        assert index and index.group(1) == flavour, f"{name}: torch index {index} vs base {flavour}"


def test_ray_version_is_one_across_images_and_cluster_and_fits_the_project(stack):
    versions = {arg_default(stack.dockerfiles[n], "RAY_VERSION") for n in FILES}
    assert len(versions) == 1, versions
    (version,) = versions
    assert stack.one("RayCluster")["spec"]["rayVersion"] == version
    deps = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    ray_req = next(r for r in deps if r.name == "ray")
    assert ray_req.specifier.contains(version), f"ray {version} does not satisfy {ray_req}"


@pytest.mark.parametrize("name", FILES)
def test_no_secret_is_baked_in(stack, name):
    for ins, rest in instructions(stack.dockerfiles[name]):
        if ins in ("ENV", "ARG", "LABEL"):
            keys = re.findall(r"([A-Za-z_][A-Za-z0-9_.]*)=", rest) or [rest.split()[0]]
            assert not [k for k in keys if is_secret_key(k)], f"{name}: {ins} {rest}"
        if ins in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|secrets?/|\.ini\b|\.pem\b|id_rsa", rest), rest
    ignore = (DOCKER_DIR / f"{name}.dockerignore").read_text().splitlines()
    assert "**" in ignore and "**/.env" in ignore and "**/*.env" in ignore


@pytest.mark.parametrize("name", FILES)
def test_copies_only_what_exists_and_is_not_ignored(stack, name):
    ignore = (DOCKER_DIR / f"{name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    for ins, rest in instructions(stack.dockerfiles[name]):
        if ins == "COPY":
            sources = [a for a in rest.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
                assert src in allowed, f"{name}: COPY {src} is excluded by the .dockerignore"


@pytest.mark.parametrize("name", FILES)
def test_runs_as_non_root_and_defaults_to_the_cli(stack, name):
    steps = instructions(stack.dockerfiles[name])
    users = [rest for ins, rest in steps if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    cmd = [rest for ins, rest in steps if ins in ("CMD", "ENTRYPOINT")]
    assert len(cmd) == 1
    args = json.loads(cmd[0])
    scripts = PYPROJECT["project"]["scripts"]
    assert args[0] in scripts, f"{name}: {args[0]} is not a console script of the project"
    assert scripts[args[0]] == "jobs.cli:main" and set(args[1:]) <= {"--help"}, args


CONSTRAINTS = DOCKER_DIR / "constraints.txt"
# An exact version: 2.60.0, 17.6-alpine3.22, RELEASE.2025-09-07T16-13-09Z (not 17-alpine, cpu).
_EXACT = re.compile(r"^(\d+\.\d+(\.\d+)?([-.][\w.]+)*|RELEASE\.\d{4}-\d{2}-\d{2}T[\d-]+Z)$")


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _pinned(image: str) -> bool:
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    _, _, tag = image.rpartition(":")
    return bool(_EXACT.match(tag))


def test_every_image_is_pinned_by_digest_or_exact_version(stack):
    images = [base_image(stack.dockerfiles[n]) for n in FILES]
    images += [stack.resolve(s["image"]) for s in stack.compose["services"].values()]
    for image in images:
        assert _pinned(image), f"{image} is pinned by a moving tag only"
    version = PYPROJECT["project"]["version"]
    project = {i for i in images if i.startswith("moe-pretrain:")}
    assert project == {f"moe-pretrain:{version}-cpu", f"moe-pretrain:{version}-gpu"}


def test_the_lock_satisfies_pyproject_and_the_image_versions(stack):
    pins = _pins()
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} violates {req}"
    text = stack.dockerfiles["Dockerfile"]
    assert pins["ray"] == arg_default(text, "RAY_VERSION")
    assert pins["torch"] == arg_default(text, "TORCH_VERSION")
    assert not [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"]


@pytest.mark.parametrize("name", FILES)
def test_every_pip_install_uses_the_lock(stack, name):
    steps = instructions(stack.dockerfiles[name])
    installs = [rest for ins, rest in steps if ins == "RUN" and "pip install" in rest]
    assert len(installs) == 2, installs
    pins = _pins()
    for rest in installs:
        args = shlex.split(rest)
        assert args[args.index("-c") + 1] == "infra/docker/constraints.txt", rest
        for arg in args[args.index("install") + 1 :]:
            if re.match(r"^[A-Za-z][\w.\[\],-]*(==.*)?$", arg) and not arg.startswith("-"):
                req = Requirement(arg.split("==")[0])
                assert canonicalize_name(req.name) in pins, f"{name}: {arg}"
    copies = [rest for ins, rest in steps if ins == "COPY"]
    assert any("infra/docker/constraints.txt" in c for c in copies)
    first_install = next(i for i, (ins, rest) in enumerate(steps) if "pip install" in rest)
    assert "constraints.txt" in steps[first_install - 1][1], "copy the lock before installing"
