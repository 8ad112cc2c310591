"""upload_manifest.py against real local Geneva databases: the manifest row and its zip
(the UDF module and the ``video_embeddings`` package), the column, the dry run, the
errors, and the UDF unpickled from the table in a process that has only the packaged
files."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geneva
import numpy as np
import pyarrow as pa
import pytest
from conftest import moto_s3
from kubernetes.config import kube_config
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import upload_manifest
from video_embeddings_udf import (
    EMBEDDING_TYPE,
    Settings,
    VideoEmbedding,
    aggregate_mean,
    mean_vector_udf,
)

PROJECT = Path(upload_manifest.__file__).resolve().parent
MANIFEST = "video-embeddings-v1"
NUM_FRAMES = 16
VIDEO = "bikes.mp4"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: equal snapshots, nothing written."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def make_db(path: Path, video: str = "a.mp4") -> Path:
    geneva.connect(str(path)).create_table("videos", pa.table({"video_uri": [video]}))
    return path


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROJECT / "upload_manifest.py"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def locked_versions() -> dict[str, str]:
    lock = tomllib.loads((PROJECT / "uv.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"] if "version" in p}


def manifest_zips(manifest: Any) -> list[Path]:
    return [Path(uri.removeprefix("file://")) for group in manifest.zips for uri in group]


def packaged_files() -> dict[str, Path]:
    """What the zip must hold, by name in the zip: the UDF module and every file of the
    ``video_embeddings`` package it imports, bytecode caches aside."""
    package = PROJECT / "video_embeddings"
    files = {"video_embeddings_udf.py": PROJECT / "video_embeddings_udf.py"}
    for path in package.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files[path.relative_to(PROJECT).as_posix()] = path
    return dict(sorted(files.items()))


def zipped_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return sorted(z.namelist())


# --- real runs, as subprocesses ---------------------------------------------------------


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, shared_videos: Path
) -> dict[str, Any]:
    """A table with a ``video_uri`` column; then, as subprocesses, a verbose dry run that
    also writes the zip and a real run; then a second real run in-process; with snapshots
    in between."""
    tmp = tmp_path_factory.mktemp("upload")
    db = make_db(tmp / "db", str(shared_videos / VIDEO))
    work = tmp / "work"
    work.mkdir()
    env = {
        **os.environ,
        "GENEVA_TABLE_NAME": "videos",
        "VJEPA_MODEL": str(tiny_model_dir),
        "NUM_FRAMES": str(NUM_FRAMES),
    }
    before = snapshot(db)
    dry_run = ["--dry-run", "--generate-zip", "--zip-output-dir", str(tmp / "zips"), "--verbose"]
    dry = cli("--bucket", str(db), *dry_run, env=env, cwd=work)
    after_dry = snapshot(db)
    first = cli("--bucket", str(db), env=env, cwd=work)
    tbl = geneva.connect(str(db)).open_table("videos")
    version, schema = tbl.version, tbl.schema
    with contextlib.redirect_stdout(io.StringIO()) as out:  # in-process: Geneva is loaded
        code = upload_manifest.main(["--bucket", str(db)], env)
    second = subprocess.CompletedProcess([], code, out.getvalue(), "")
    return dict(
        db=db,
        tmp=tmp,
        work=work,
        dry=dry,
        first=first,
        second=second,
        before=before,
        after_dry=after_dry,
        version=version,
        schema=schema,
    )


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing_to_the_database(
    runs: dict[str, Any],
) -> None:
    """--dry-run leaves the database exactly as it was and the working directory empty;
    it prints the manifest and the column it would add, --verbose logs the steps, and
    --generate-zip writes the very zip the real run uploads, holding only the module and
    its package."""
    dry = runs["dry"]
    assert dry.returncode == 0, dry.stderr
    assert runs["after_dry"] == runs["before"]
    assert list(runs["work"].iterdir()) == []
    assert dry.stdout.startswith("dry run: nothing is written to the database\n")
    assert "  conda environment (conda-forge): python=3.11, ffmpeg<8, pip\n" in dry.stdout
    count = len(upload_manifest.locked_requirements())
    assert f"  pip: {count} packages, each at its uv.lock version\n" in dry.stdout
    assert "    torch==2.9.0\n" in dry.stdout
    assert "    tokenizers==" in dry.stdout  # not a project dependency: the whole lock
    assert dry.stdout.endswith(
        "would add column 'video_embedding' to table 'videos': VideoEmbedding on 'video_uri'\n"
    )
    assert f"INFO upload_manifest: listing the tables in {runs['db']}\n" in dry.stderr
    assert "INFO" not in runs["first"].stderr  # without --verbose
    [written] = (runs["tmp"] / "zips").iterdir()
    assert f"wrote {written}\n" in dry.stdout
    [uploaded] = manifest_zips(geneva.connect(str(runs["db"])).list_manifests()[0])
    assert written.name == uploaded.name
    assert f"  zip {written.name}: {upload_manifest.ZIP_CONTENTS}\n" in dry.stdout
    assert zipped_names(written) == list(packaged_files())


@pytest.mark.slow
def test_manifest_row_holds_the_conda_environment_and_the_udf_module(
    runs: dict[str, Any],
) -> None:
    """The manifest row: conda-forge, Python from .python-version, ffmpeg<8, and a pip
    list of every package of uv.lock the project needs, each at its locked version; its
    one zip, stored in the
    database, holds video_embeddings_udf.py and the video_embeddings package byte for
    byte, and nothing else."""
    assert runs["first"].returncode == 0, runs["first"].stderr
    [manifest] = geneva.connect(str(runs["db"])).list_manifests()
    assert manifest.name == MANIFEST
    python = (PROJECT / ".python-version").read_text().strip()
    *conda, pip = manifest.conda["dependencies"]
    assert manifest.conda["channels"] == ["conda-forge"]
    assert conda == [f"python={python}", "ffmpeg<8", "pip"]
    assert pip["pip"] == upload_manifest.locked_requirements()
    assert "geneva==0.17.0" in pip["pip"]
    assert manifest.head_image is None and manifest.worker_image is None
    [stored] = manifest_zips(manifest)
    assert stored.is_relative_to(runs["db"])
    files = packaged_files()
    assert {"video_embeddings/__init__.py", "video_embeddings/pipeline.py"} <= files.keys()
    assert zipped_names(stored) == list(files)
    with zipfile.ZipFile(stored) as z:
        for name, path in files.items():
            assert z.read(name) == path.read_bytes(), name
    assert f"defined manifest '{MANIFEST}' in {runs['db']}:\n" in runs["first"].stdout


@pytest.mark.slow
def test_column_is_added_once_with_its_type(runs: dict[str, Any]) -> None:
    """The first run adds the column as list<fixed_size_list<float32, 1024>>; the second
    says it is there and leaves the table at the same version, schema and UDF."""
    assert runs["first"].stdout.endswith(
        "added column 'video_embedding' to table 'videos': VideoEmbedding on 'video_uri'\n"
    )
    field = runs["schema"].field("video_embedding")
    assert field.type == pa.list_(pa.list_(pa.float32(), 1024)) == EMBEDDING_TYPE
    second = runs["second"]
    assert second.returncode == 0, second.stderr
    assert second.stdout.endswith(
        "table 'videos' already has column 'video_embedding': left as it is\n"
    )
    tbl = geneva.connect(str(runs["db"])).open_table("videos")
    assert tbl.schema.names == ["video_uri", "video_embedding"]
    assert tbl.version == runs["version"]
    assert tbl.schema.field("video_embedding").metadata == field.metadata
    assert len(geneva.connect(str(runs["db"])).list_manifests()) == 1


def test_staged_package_holds_the_module_and_package_with_their_mtimes() -> None:
    """The staged ``src`` holds the UDF module and the package's files, no bytecode
    caches, each with its source's mtime: Geneva names the zip by a hash of names and
    mtimes, so unchanged code keeps its zip."""
    with upload_manifest.staged_package() as src:
        staged = {p.relative_to(src).as_posix(): p for p in src.rglob("*") if p.is_file()}
        assert list(dict(sorted(staged.items()))) == list(packaged_files())
        for name, path in packaged_files().items():
            assert staged[name].stat().st_mtime_ns == path.stat().st_mtime_ns, name
    assert not src.exists()


UNPICKLE = """
import sys
import numpy as np
import pyarrow as pa
import geneva
from geneva.packager import DockerUDFPackager
from geneva.runners.ray.pipeline import fetch_udf

db, out = sys.argv[1:]
tbl = geneva.connect(db).open_table("videos")
udf = DockerUDFPackager().unmarshal(fetch_udf(tbl, "video_embedding"))
import video_embeddings.pipeline
import video_embeddings_udf
print(video_embeddings.pipeline.__file__)
print(video_embeddings_udf.__file__)
uri = tbl.to_arrow()["video_uri"][0].as_py()
embedding = udf(pa.record_batch({"video_uri": [uri]}))
mean = DockerUDFPackager().unmarshal(fetch_udf(tbl, "video_embedding_mean"))
means = mean(pa.record_batch({"video_embedding": embedding}))
np.save(out, np.array(embedding.to_pylist()[0]))
np.save(out + ".mean.npy", np.array(means.to_pylist()[0]))
"""


@pytest.mark.slow
def test_udf_unpickles_and_embeds_with_only_the_packaged_files(
    runs: dict[str, Any], tiny_model_dir: Path, shared_videos: Path
) -> None:
    """In a fresh process whose path holds the unzipped package and the third-party
    site-packages, without the project's editable install (no .pth processing), each
    column's UDF (the embedding and the mean vector) unpickles from the table and runs; the
    embedding's imports the module and the video_embeddings
    package from the unzipped files, loads the tiny checkpoint and embeds the shared clip
    as an in-process call does."""
    tbl = geneva.connect(str(runs["db"])).open_table("videos")
    if "video_embedding_mean" not in tbl.schema.names:  # the column index adds
        tbl.add_columns({"video_embedding_mean": (mean_vector_udf(), ["video_embedding"])})
    [stored] = manifest_zips(geneva.connect(str(runs["db"])).list_manifests()[0])
    assert "video_embeddings/pipeline.py" in zipped_names(stored)
    package = runs["tmp"] / "package"
    zipfile.ZipFile(stored).extractall(package)
    out = runs["tmp"] / "rows.npy"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VJEPA_MODEL"}}
    env["PYTHONPATH"] = os.pathsep.join([str(package), sysconfig.get_paths()["purelib"]])
    done = subprocess.run(
        [sys.executable, "-S", "-c", UNPICKLE, str(runs["db"]), str(out)],
        env=env,
        cwd=runs["tmp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    *_, stages, module = done.stdout.splitlines()
    assert stages == str(package / "video_embeddings" / "pipeline.py")
    assert module == str(package / "video_embeddings_udf.py")
    rows = np.load(out)
    assert rows.shape == (NUM_FRAMES, 1024)
    settings = Settings(model=str(tiny_model_dir), num_frames=NUM_FRAMES)
    batch = pa.record_batch({"video_uri": [str(shared_videos / VIDEO)]})
    expected = np.array(VideoEmbedding(settings)(batch).to_pylist()[0])
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(rows).sum() > 0
    mean = np.load(str(out) + ".mean.npy")
    np.testing.assert_allclose(mean, aggregate_mean(rows), rtol=1e-5, atol=1e-6)


# --- the pip list: the whole lock -----------------------------------------------------


ENVIRONMENTS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_machine": "aarch64"},
    "macos-arm64": {"sys_platform": "darwin", "platform_machine": "arm64"},
    "windows-amd64": {"sys_platform": "win32", "platform_machine": "AMD64", "os_name": "nt"},
    "linux-pypy": {
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "implementation_name": "pypy",
        "platform_python_implementation": "PyPy",
    },
    "emscripten": {"sys_platform": "emscripten", "platform_machine": "wasm32"},
}
"""Where the pip lists' markers are evaluated, all with Python 3.11."""


def installed_in(requirements: list[str], environment: dict[str, str]) -> dict[str, str]:
    """What pip installs from ``requirements`` in ``environment``: name to pinned version."""
    env = {"python_version": "3.11", "python_full_version": "3.11.9", **environment}
    pins = {}
    for requirement in map(Requirement, requirements):
        if requirement.marker is None or requirement.marker.evaluate(env):
            [spec] = requirement.specifier
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def uv_export() -> list[str]:
    """``uv export --frozen --no-dev --no-emit-project --no-hashes`` of the project, its
    requirement lines only."""
    uv = shutil.which("uv") or os.environ.get("UV") or shutil.which("uv", path=sys.prefix + "/bin")
    if uv is None:
        pytest.skip("uv is not on PATH: there is no uv export to compare the pip list with")
    done = subprocess.run(
        [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if line and line[0] not in "# "]


def test_pip_list_is_the_lock_export() -> None:
    """The pip list pins what ``uv export --frozen --no-dev --no-emit-project`` lists,
    torch's CUDA libraries, tokenizers and aiohttp among them: the same packages at the
    same versions, each installed in exactly the environments where uv's marker says."""
    pins = upload_manifest.locked_requirements()
    export = uv_export()
    assert [r.split(" ;")[0] for r in pins] == [r.split(" ;")[0] for r in export]
    for name, environment in ENVIRONMENTS.items():
        assert installed_in(pins, environment) == installed_in(export, environment), name
    linux = installed_in(pins, ENVIRONMENTS["linux-x86_64"])
    for package in ["huggingface-hub", "tokenizers", "aiohttp", "nvidia-cudnn-cu12", "triton"]:
        assert package in linux
    assert "nvidia-cudnn-cu12" not in installed_in(pins, ENVIRONMENTS["macos-arm64"])
    assert "pytest" not in linux and "video-embeddings" not in linux  # no dev, no project


def test_pip_list_pins_what_the_tests_run_with() -> None:
    """Every package pinned for this platform is installed here at its pinned version,
    the project's dependencies with pyproject's own pins among them."""
    pins = [r for r in map(Requirement, upload_manifest.locked_requirements())]
    here = [r for r in pins if r.marker is None or r.marker.evaluate()]
    assert len(here) > 100
    for pin in here:
        [spec] = pin.specifier
        assert spec.operator == "=="
        assert importlib.metadata.version(pin.name) == spec.version, pin.name
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    direct = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["dependencies"]}
    assert direct <= {canonicalize_name(p.name) for p in here}
    spec_pins = {"torch==2.9.0", "torchvision==0.24.0", "transformers==4.57.1"}
    spec_pins |= {"torchcodec==0.8.1", "geneva==0.17.0"}
    assert spec_pins <= set(upload_manifest.locked_requirements())


def test_pip_list_is_read_from_the_lock_when_called(tmp_path: Path) -> None:
    """A project whose uv.lock resolves tokenizers (which no pyproject entry names) to
    another version gets that version: the list is derived from the files, not kept by
    hand."""
    (tmp_path / "pyproject.toml").write_text((PROJECT / "pyproject.toml").read_text())
    tokenizers = locked_versions()["tokenizers"]
    lock = (PROJECT / "uv.lock").read_text()
    entry = f'name = "tokenizers"\nversion = "{tokenizers}"'
    assert entry in lock
    (tmp_path / "uv.lock").write_text(lock.replace(entry, 'name = "tokenizers"\nversion = "1.0.0"'))
    pins = upload_manifest.locked_requirements(tmp_path)
    assert "tokenizers==1.0.0" in pins
    assert f"tokenizers=={tokenizers}" not in pins


LOCK = """
version = 1
requires-python = "==3.11.*"

[[package]]
name = "app"
version = "0.1.0"
source = { editable = "." }
dependencies = [
    { name = "a", marker = "sys_platform == 'linux'" },
    { name = "b" },
    { name = "d", extra = ["x"] },
    { name = "e", marker = "sys_platform == 'win32'" },
]

[package.dev-dependencies]
dev = [{ name = "f" }]

[[package]]
name = "a"
version = "1.0"
source = { registry = "https://pypi.org/simple" }
dependencies = [{ name = "c" }, { name = "e" }]

[[package]]
name = "b"
version = "1.0"
source = { registry = "https://pypi.org/simple" }
dependencies = [{ name = "c", marker = "sys_platform == 'darwin' or sys_platform == 'win32'" }]

[[package]]
name = "c"
version = "1.0"
source = { registry = "https://pypi.org/simple" }
dependencies = [{ name = "a" }, { name = "g", marker = "platform_machine == 'x86_64'" }]

[[package]]
name = "d"
version = "1.0"
source = { registry = "https://pypi.org/simple" }

[package.optional-dependencies]
x = [{ name = "h" }]

[[package]]
name = "e"
version = "1.0"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "f"
version = "1.0"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "g"
version = "1.0"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "h"
version = "1.0"
source = { registry = "https://pypi.org/simple" }
"""


def test_markers_are_the_union_over_paths_and_the_dev_group_is_left_out(
    tmp_path: Path,
) -> None:
    """A package reached along several paths is needed where any of them is: each path
    needs every marker along it (through cycles too); one unconditional path drops the
    marker; an extra's optional dependencies count; the dev group does not."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "app"\n')
    (tmp_path / "uv.lock").write_text(LOCK)
    linux, win, mac = (
        "sys_platform == 'linux'",
        "sys_platform == 'win32'",
        "sys_platform == 'darwin'",
    )
    x86 = "platform_machine == 'x86_64'"
    assert upload_manifest.locked_requirements(tmp_path) == [
        # a: itself on Linux, or through c (b's) on macOS and Windows
        f"a==1.0 ; ({mac} or {win}) or {linux}",
        "b==1.0",
        f"c==1.0 ; ({mac} or {win}) or {linux}",
        "d==1.0",
        f"e==1.0 ; ({mac} or {win}) or {linux} or {win}",
        f"g==1.0 ; ({x86} and ({mac} or {win})) or ({x86} and {linux})",
        "h==1.0",
    ]


def test_a_package_from_outside_pypi_is_refused(tmp_path: Path) -> None:
    """A package the lock takes from git (or a path, or another index) cannot be pinned
    by version from PyPI: refused with one line."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "app"\n')
    git = 'source = { git = "https://example.com/d.git?rev=v1#abc" }'
    lock = LOCK.replace(
        'name = "d"\nversion = "1.0"\nsource = { registry = "https://pypi.org/simple" }',
        f'name = "d"\nversion = "1.0"\n{git}',
    )
    assert lock != LOCK
    (tmp_path / "uv.lock").write_text(lock)
    with pytest.raises(upload_manifest.SetupError, match="uv.lock takes d from git https://"):
        upload_manifest.locked_requirements(tmp_path)


# --- --nvdec ----------------------------------------------------------------------------


def test_nvdec_swaps_pypi_torchcodec_for_the_cuda_build() -> None:
    """--nvdec's pip list adds PyTorch's cu128 index and pins torchcodec's CUDA build of
    the locked version in place of PyPI's; every other package keeps its pin, written
    ``===`` so that the index's torch 2.9.0+cu128 cannot stand in for PyPI's 2.9.0."""
    plain = upload_manifest.conda_environment()
    nvdec = upload_manifest.conda_environment(nvdec=True)
    assert nvdec["dependencies"][:-1] == plain["dependencies"][:-1]
    index, *pins = nvdec["dependencies"][-1]["pip"]
    assert index == "--extra-index-url https://download.pytorch.org/whl/cu128"
    locked = plain["dependencies"][-1]["pip"]
    assert "torchcodec==0.8.1" in locked and "torchcodec==0.8.1" not in pins
    assert "torchcodec==0.8.1+cu128" in pins
    assert len(pins) == len(locked)
    for pin, lock in zip(pins, locked, strict=True):
        if pin.startswith("torchcodec"):
            continue
        assert pin == lock.replace("==", "===", 1)
    assert "torch===2.9.0" in pins
    [torch] = Requirement("torch===2.9.0").specifier
    assert torch.contains("2.9.0") and not torch.contains("2.9.0+cu128")
    assert SpecifierSet("==2.9.0").contains("2.9.0+cu128")  # why == will not do
    for name, environment in ENVIRONMENTS.items():
        cuda, cpu = installed_in(pins, environment), installed_in(locked, environment)
        assert cuda.pop("torchcodec") == "0.8.1+cu128"
        cpu.pop("torchcodec")
        assert cuda == cpu, name


def test_nvdec_manifest_is_stored_and_described(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = make_db(tmp_path / "db")
    env = {"GENEVA_TABLE_NAME": "videos"}
    assert upload_manifest.main(["--bucket", str(db), "--nvdec", "--dry-run"], env) == 0
    out = capsys.readouterr().out
    count = len(upload_manifest.locked_requirements())
    header = f"  pip: {count} packages, each at its uv.lock version (torchcodec: its CUDA build)\n"
    assert header in out
    assert "    --extra-index-url https://download.pytorch.org/whl/cu128\n" in out
    assert "    torchcodec==0.8.1+cu128\n" in out
    assert "    torchcodec==0.8.1\n" not in out
    assert geneva.connect(str(db)).list_manifests() == []
    assert upload_manifest.main(["--bucket", str(db), "--nvdec"], env) == 0
    [manifest] = geneva.connect(str(db)).list_manifests()
    assert manifest.conda == upload_manifest.conda_environment(nvdec=True)


REFUSED = {
    "preinstalled-image": (
        ["--preinstalled", "--image", "x:1"],
        "--preinstalled and --image are two different clusters: pick one",
    ),
    "nvdec-preinstalled": (
        ["--nvdec", "--preinstalled"],
        "--nvdec and --preinstalled: a preinstalled manifest installs nothing; "
        "install torchcodec's CUDA build on the nodes instead",
    ),
    "nvdec-image": (
        ["--nvdec", "--image", "x:1"],
        "--nvdec and --image: an image manifest has no conda environment to add "
        "torchcodec's CUDA build to; bake it into the image instead",
    ),
    "generate-zip": (["--generate-zip"], "--generate-zip only applies with --dry-run"),
}


@pytest.mark.parametrize(("argv", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_options_that_do_not_go_together_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    db = make_db(tmp_path / "db")
    before = snapshot(db)
    with pytest.raises(SystemExit) as exit_:
        upload_manifest.main(["--bucket", str(db), *argv], {"GENEVA_TABLE_NAME": "videos"})
    assert exit_.value.code == 2
    assert capsys.readouterr() == ("", f"error: {message}\n")
    assert snapshot(db) == before


# --- custom images, help --------------------------------------------------------------


def test_image_option_sets_both_images_and_skips_conda(tmp_path: Path) -> None:
    """--image stores head and worker images and no conda environment or pip list."""
    db = make_db(tmp_path / "db")
    env = {"GENEVA_TABLE_NAME": "videos"}
    assert upload_manifest.main(["--bucket", str(db), "--image", "registry/video:1"], env) == 0
    [manifest] = geneva.connect(str(db)).list_manifests()
    assert manifest.head_image == manifest.worker_image == "registry/video:1"
    assert manifest.conda == {} and manifest.pip == []
    assert zipped_names(manifest_zips(manifest)[0]) == list(packaged_files())


def test_preinstalled_installs_nothing_and_ships_the_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--preinstalled stores a manifest with no conda, pip or image, and the zip of the
    module and its package alone; it says so."""
    db = make_db(tmp_path / "db")
    env = {"GENEVA_TABLE_NAME": "videos"}
    assert upload_manifest.main(["--bucket", str(db), "--preinstalled"], env) == 0
    assert "  installs nothing: the nodes already have FFmpeg" in capsys.readouterr().out
    [manifest] = geneva.connect(str(db)).list_manifests()
    assert (manifest.conda, manifest.pip) == ({}, [])
    assert manifest.head_image is None and manifest.worker_image is None
    assert zipped_names(manifest_zips(manifest)[0]) == list(packaged_files())


def test_existing_cluster_definition_round_trips_without_pip_or_modules(tmp_path: Path) -> None:
    """existing_cluster's definition, stored and read back, is Geneva's external cluster
    at the address given, asking Ray for no pip environment and no uploaded modules (the
    nodes have both); tests/test_cluster.py runs backfills through it."""
    conn = geneva.connect(str(tmp_path / "db"))
    conn.define_cluster("ray", upload_manifest.existing_cluster("ray", "ray://head:10001"))
    [cluster] = conn.list_clusters()
    assert (cluster.name, cluster.cluster_type.value) == ("ray", "EXTERNAL_RAY")
    assert cluster.ray_address == "ray://head:10001"
    assert cluster.ray_init_kwargs == {"runtime_env": {"pip": None, "py_modules": None}}


def test_help_explains_every_option(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option, so a default reads whole
    with pytest.raises(SystemExit) as exit_:
        upload_manifest.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    options = ["--bucket", "--manifest-name", "--dry-run", "--generate-zip", "--zip-output-dir"]
    for option in [*options, "--verbose", "--image", "--preinstalled", "--nvdec"]:
        assert option in out
    assert "default: video-embeddings-v1" in out
    assert "GENEVA_TABLE_NAME" in out
    assert "https://download.pytorch.org/whl/cu128" in out


# --- errors: one line, exit 1, nothing written ------------------------------------------


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, and Lance's S3 settings pointing at it through the
    environment; the server is stopped afterwards. moto keeps its buckets per process,
    so other tests' buckets may be there; none is named ``missing``."""
    with moto_s3() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT", endpoint)
        monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        yield endpoint


def run_main(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    code = upload_manifest.main(argv, env)
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


BAD_INPUT = {
    "missing-table": ({"GENEVA_TABLE_NAME": "clips"}, "table 'clips' does not exist in {db}"),
    "no-uri-column": (
        {"GENEVA_TABLE_NAME": "other"},
        "table 'other' has no column 'video_uri' to read video URLs from "
        "(set VIDEO_URI_COL to the column that holds them)",
    ),
    "bad-setting": (
        {"GENEVA_TABLE_NAME": "videos", "NUM_FRAMES": "many"},
        "Invalid NUM_FRAMES ('many'). It must be an integer.",
    ),
}


def test_without_a_table_name_only_the_manifest_is_defined(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No GENEVA_TABLE_NAME: the manifest for a database whose tables
    ``video-embeddings index --cluster`` will create; no table is touched."""
    db = make_db(tmp_path / "db")
    tables = snapshot_tables(db)
    assert upload_manifest.main(["--bucket", str(db), "--preinstalled"], {}) == 0
    out = capsys.readouterr().out
    assert [m.name for m in geneva.connect(str(db)).list_manifests()] == ["video-embeddings-v1"]
    assert out.splitlines()[-1] == (
        "no GENEVA_TABLE_NAME: no column added (index --cluster adds its own)"
    )
    assert snapshot_tables(db) == tables


def snapshot_tables(db: Path) -> dict[str, list[str]]:
    conn = geneva.connect(str(db))
    return {name: conn.open_table(name).schema.names for name in conn.table_names()}


@pytest.mark.parametrize(("env", "message"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    message: str,
    dry_run: bool,
) -> None:
    db = make_db(tmp_path / "db")
    geneva.connect(str(db)).create_table("other", pa.table({"path": ["a.mp4"]}))
    before = snapshot(db)
    argv = ["--bucket", str(db)] + (["--dry-run"] if dry_run else [])
    assert run_main(argv, env, capsys) == (1, f"error: {message.format(db=db)}\n")
    assert snapshot(db) == before


def test_unreachable_local_directory_is_one_line_and_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "db"
    env = {"GENEVA_TABLE_NAME": "videos"}
    code, err = run_main(["--bucket", str(missing)], env, capsys)
    assert (code, err) == (1, f"error: cannot reach {missing}: no such directory\n")
    assert not (tmp_path / "no").exists()


def test_unreachable_bucket_is_one_line(
    s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bucket that does not exist on a real S3 server: the store's reason, on one
    line, and the bucket is not created."""
    import boto3

    env = {"GENEVA_TABLE_NAME": "videos"}
    code, err = run_main(["--bucket", "s3://missing/db"], env, capsys)
    assert code == 1
    assert err.startswith("error: cannot reach s3://missing/db: ")
    assert "NoSuchBucket" in err and err.count("\n") == 1
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert "missing" not in [b["Name"] for b in client.list_buckets()["Buckets"]]


# --- the cluster helper ----------------------------------------------------------------


KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "current-context": "none",
    "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:1"}}],
    "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
    "users": [{"name": "none", "user": {"token": "none"}}],
}
"""A kubeconfig that names a server nobody listens on: enough for Geneva to build its
Kubernetes clients, which these tests never call."""


def test_gpu_cluster_definition_round_trips_and_renders_gpu_pods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpu_cluster's definition, stored with define_cluster and read back, has the
    namespace, image, GPUs, CPUs, memory and worker count asked for; the KubeRay
    RayCluster that geneva renders from it requests those GPUs per pod. A kubeconfig
    pointing at nothing lets geneva build its Kubernetes clients; no request is made."""
    conn = geneva.connect(str(tmp_path / "db"))
    conn.define_cluster(
        "gpu-cluster",
        upload_manifest.gpu_cluster(
            namespace="video", image="registry/video:1", gpus_per_worker=2, workers=3
        ),
    )
    [cluster] = conn.list_clusters()
    assert cluster.name == "gpu-cluster"
    kuberay = cluster.kuberay
    assert kuberay.namespace == "video"
    assert kuberay.head_group.image == "registry/video:1"
    assert kuberay.head_group.num_gpus == 0
    [worker] = kuberay.worker_groups
    assert (worker.image, worker.num_gpus) == ("registry/video:1", 2)
    assert (worker.num_cpus, worker.memory) == (16, "32Gi")
    assert (worker.replicas, worker.max_replicas) == (3, 3)

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(KUBECONFIG))
    # kubernetes reads KUBECONFIG when imported, perhaps by an earlier test: set its default.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    definition = cluster.to_ray_cluster().definition
    assert definition["metadata"] == {"name": "gpu-cluster", "namespace": "video"}
    [group] = definition["spec"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "2"
    assert (group["replicas"], group["maxReplicas"]) == (3, 3)
    [container] = group["template"]["spec"]["containers"]
    assert container["image"] == "registry/video:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == 32 * 1024**3
    [head] = definition["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["image"] == "registry/video:1"
