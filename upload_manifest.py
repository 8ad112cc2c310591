"""Define the Geneva manifest that GPU workers need, and add the embedding column.

    export GENEVA_TABLE_NAME=videos
    uv run python upload_manifest.py --bucket gs://your-bucket/path

The manifest (``--manifest-name``, default ``video-embeddings-v1``) is what
``conn.context(cluster=..., manifest=...)`` installs on the Ray workers: a conda
environment with the Python of ``.python-version``, ``ffmpeg<8`` for torchcodec and, through
pip, every package of ``uv.lock`` that the project needs at run time, each at its locked
version (what ``uv export --frozen --no-dev --no-emit-project`` lists); and a zip holding
``video_embeddings_udf.py`` and the ``video_embeddings`` package it imports, so that workers
can unpickle ``VideoEmbedding``. The column named by ``VIDEO_EMBEDDING_COL`` is then added
to the table ``GENEVA_TABLE_NAME``, unless it is already there. Nothing is backfilled.

``--preinstalled`` is for a Ray cluster whose nodes already have FFmpeg and these packages
(one started with ``ray start`` from this environment, say): the manifest installs nothing
and ships the zip alone; ``existing_cluster`` defines such a cluster for Geneva.
``--nvdec`` swaps PyPI's torchcodec, which decodes on the CPU only, for its CUDA build
from PyTorch's package index, so that GPU workers decode on NVDEC.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import tomllib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import video_embeddings
import video_embeddings_udf as vu

if TYPE_CHECKING:
    from geneva.cluster.mgr import GenevaCluster
    from geneva.db import Connection
    from geneva.manifest import GenevaManifest
    from geneva.table import Table

logger = logging.getLogger("upload_manifest")  # not __name__, which is __main__ as a script

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_MANIFEST_NAME = "video-embeddings-v1"
UDF_MODULE = Path(vu.__file__)
"""The module that defines ``VideoEmbedding``, which Geneva pickles by reference."""
UDF_PACKAGE = Path(video_embeddings.__file__).parent
"""The package of the UDF's stages, which ``UDF_MODULE`` imports."""
ZIP_CONTENTS = f"{UDF_MODULE.name} and the {UDF_PACKAGE.name}/ package"
"""What the zip holds, as ``describe`` and the log say it."""
CONDA_CHANNELS = ["conda-forge"]
FFMPEG = "ffmpeg<8"
"""torchcodec 0.8 loads the shared libraries of FFmpeg 4 to 7."""
PYPI = "https://pypi.org/simple"
PYTORCH_CUDA = "cu128"
"""The CUDA of PyPI's torch 2.9.0 Linux wheels (CUDA 12.8: ``nvidia-cuda-runtime-cu12``
12.8), and so the label of the torchcodec build that matches them."""
PYTORCH_INDEX = f"https://download.pytorch.org/whl/{PYTORCH_CUDA}"
"""PyTorch's package index of that CUDA, which has torchcodec's CUDA builds."""
CPUS_PER_GPU = 8
"""CPUs for decoding next to each GPU, for ``gpu_cluster``."""
MEMORY_GIB_PER_GPU = 16
"""Pod memory per GPU, for ``gpu_cluster``: the UDF reserves 8 GiB, and Ray keeps part of a
pod's memory for its object store."""


class SetupError(Exception):
    """Bad input, found before anything is written; reported as one line."""


# --- the manifest -----------------------------------------------------------------------


def locked_requirements(project_dir: Path = PROJECT_DIR) -> list[str]:
    """Every package of ``uv.lock`` that the project needs at run time, pinned to its
    locked version, in the form ``uv export --frozen --no-dev --no-emit-project
    --no-hashes`` gives: ``name==version``, with an environment marker where the lock
    needs the package only on some platforms (pip skips it elsewhere). The dev group is
    left out. Read when called: the lock is the one list; there is no second one to keep
    in step. Read with ``tomllib`` rather than by running ``uv export``, so that building
    the manifest needs no ``uv`` on the path; the tests compare the two."""
    name = tomllib.loads((project_dir / "pyproject.toml").read_text())["project"]["name"]
    packages = {
        p["name"]: p for p in tomllib.loads((project_dir / "uv.lock").read_text())["package"]
    }
    markers = _reachable(packages, name)
    requirements = []
    for package in sorted(markers):
        if package == name:
            continue
        locked = packages[package]
        source = locked.get("source", {})
        if source.get("registry") != PYPI:
            where = ", ".join(f"{k} {v}" for k, v in source.items())
            raise SetupError(
                f"uv.lock takes {package} from {where}, not PyPI: the manifest pins PyPI "
                "packages by version only"
            )
        marker = _marker(markers[package])
        requirements.append(f"{package}=={locked['version']}" + (f" ; {marker}" if marker else ""))
    return requirements


Conjunction = frozenset[str]
"""The markers of the dependency edges along one path from the project: all must hold."""


def _reachable(packages: dict[str, dict[str, Any]], root: str) -> dict[str, set[Conjunction]]:
    """For each package reachable from ``root`` through the lock's dependencies (and the
    optional dependencies of the extras asked for), the paths' conditions: the package is
    needed where any of them holds. A condition implied by another (a superset of its
    markers) is dropped; the empty one means always."""
    reach: dict[tuple[str, str | None], set[Conjunction]] = {(root, None): {frozenset()}}
    pending = [(root, None)]
    while pending:
        node = pending.pop()
        package, extra = node
        if extra is None:
            edges = packages[package].get("dependencies", [])
        else:
            edges = packages[package].get("optional-dependencies", {}).get(extra, [])
        for edge in edges:
            step = {edge["marker"]} if edge.get("marker") else set()
            for target in [
                (edge["name"], None),
                *((edge["name"], e) for e in edge.get("extra", [])),
            ]:
                known = reach.setdefault(target, set())
                grew = False
                for path in list(reach[node]):
                    condition = path | step
                    if any(c <= condition for c in known):
                        continue
                    known.difference_update({c for c in known if condition <= c})
                    known.add(condition)
                    grew = True
                if grew:
                    pending.append(target)
    by_package: dict[str, set[Conjunction]] = {}
    for (package, _), conditions in reach.items():
        known = by_package.setdefault(package, set())
        for condition in conditions:
            if not any(c <= condition for c in known):
                known.difference_update({c for c in known if condition <= c})
                known.add(condition)
    return by_package


def _marker(conditions: set[Conjunction]) -> str:
    """The PEP 508 marker of the union of ``conditions``; empty when one always holds."""
    if frozenset() in conditions:
        return ""

    def conjunction(condition: Conjunction) -> str:
        atoms = sorted(condition)
        if len(atoms) == 1:
            return atoms[0]
        return " and ".join(f"({a})" if " or " in a else a for a in atoms)

    terms = sorted(conjunction(c) for c in conditions)
    if len(terms) == 1:
        return terms[0]
    return " or ".join(f"({t})" if " and " in t or " or " in t else t for t in terms)


def nvdec_requirements(requirements: list[str]) -> list[str]:
    """``requirements`` with PyPI's torchcodec, which decodes on the CPU only, replaced by
    its CUDA build of the same version from PyTorch's index, and that index added. Every
    other pin becomes ``===``: with the index added, ``torch==2.9.0`` would also accept
    the index's ``2.9.0+cu128``, a local version that pip ranks above PyPI's build."""
    pins = []
    for requirement in requirements:
        pin, sep, marker = requirement.partition(" ; ")
        package, version = pin.split("==")
        if package == "torchcodec":
            pin = f"torchcodec=={version}+{PYTORCH_CUDA}"
        else:
            pin = f"{package}==={version}"
        pins.append(pin + sep + marker)
    if not any(p.startswith("torchcodec==") for p in pins):
        raise SetupError("uv.lock has no torchcodec to replace with its CUDA build")
    return [f"--extra-index-url {PYTORCH_INDEX}", *pins]


def conda_environment(project_dir: Path = PROJECT_DIR, *, nvdec: bool = False) -> dict[str, Any]:
    """A Ray runtime environment takes pip or conda, not both; FFmpeg is not on PyPI, so
    the environment is conda with the pip packages nested in it. ``nvdec`` installs
    torchcodec's CUDA build (``nvdec_requirements``)."""
    python = (project_dir / ".python-version").read_text().strip()
    pip = locked_requirements(project_dir)
    return {
        "channels": CONDA_CHANNELS,
        "dependencies": [
            f"python={python}",
            FFMPEG,
            "pip",
            {"pip": nvdec_requirements(pip) if nvdec else pip},
        ],
    }


def build_manifest(
    name: str, *, image: str | None = None, preinstalled: bool = False, nvdec: bool = False
) -> GenevaManifest:
    """The conda manifest, with torchcodec's CUDA build if ``nvdec``; with ``image``, one
    that runs head and workers on that image (FFmpeg and the Python stack baked in) with
    no conda environment; ``preinstalled``, one that installs nothing, for nodes that
    have everything already. ``nvdec`` goes with neither."""
    from geneva.manifest import GenevaManifest

    if nvdec and (image or preinstalled):
        raise ValueError("nvdec changes the conda environment, which image and preinstalled lack")
    if image:
        return GenevaManifest.create_pip(name).head_image(image).worker_image(image).build()
    if preinstalled:
        return GenevaManifest.create_pip(name).build()
    return GenevaManifest.create_conda(name).conda(conda_environment(nvdec=nvdec)).build()


@contextlib.contextmanager
def staged_package() -> Iterator[Path]:
    """A temporary src-layout project holding only the UDF module and its package,
    yielding its ``src``.

    Geneva packages the ``src`` folder of the project around the working directory, so
    with this folder as the working directory the zip holds ``video_embeddings_udf.py``
    and the ``video_embeddings`` package (without ``__pycache__``), and
    nothing else: what a worker imports to unpickle ``VideoEmbedding``. ``copy2`` and
    ``copytree`` keep the files' mtimes, which Geneva's zip name hashes: unchanged code
    is not uploaded again."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy2(PROJECT_DIR / "pyproject.toml", root)
        src = root / "src"
        src.mkdir()
        shutil.copy2(UDF_MODULE, src)
        shutil.copytree(
            UDF_PACKAGE,
            src / UDF_PACKAGE.name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        yield src


def package_zips(output_dir: Path, *, write: bool) -> list[Path]:
    """The zip(s) Geneva makes of the staged package, written to ``output_dir`` only
    when ``write``; the names are content hashes, the same as the upload's."""
    from geneva.packager.autodetect import package_local_env_into_zips

    with staged_package() as src, contextlib.chdir(src):
        zips = package_local_env_into_zips(output_dir, skip_site_packages=True, create_zips=write)
    return [Path(z) for group in zips for z in group]


def define_manifest(conn: Connection, manifest: GenevaManifest) -> None:
    """Upload the staged package and upsert the manifest under its name."""
    # geneva 0.17 marks define_manifest deprecated, but conn.context(manifest=NAME), the
    # flow this manifest is for, loads manifests that define_manifest stored.
    with (
        staged_package() as src,
        contextlib.chdir(src),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "Connection.define_manifest", DeprecationWarning)
        logger.info("uploading %s, defining manifest %r", ZIP_CONTENTS, manifest.name)
        conn.define_manifest(manifest.name, manifest)


# --- the table --------------------------------------------------------------------------


def connect(bucket: str) -> Connection:
    """Connect to the Geneva database at ``bucket``, or fail with one line if it cannot
    be listed. A local directory must exist already: ``geneva.connect`` would create it."""
    import geneva

    local = bucket.removeprefix("file://")
    if "://" not in local and not Path(local).is_dir():
        raise SetupError(f"cannot reach {bucket}: no such directory")
    logger.info("listing the tables in %s", bucket)
    try:
        conn = geneva.connect(bucket)
        conn.list_tables(limit=1)
    except Exception as e:  # whatever the store raised, the database cannot be read
        raise SetupError(f"cannot reach {bucket}: {_one_line(e)}") from e
    return conn


def open_table(conn: Connection, name: str, settings: vu.Settings) -> Table:
    """The table to add the column to, which must hold the URL column."""
    from lance_namespace.errors import TableNotFoundError

    try:
        tbl = conn.open_table(name)
    except TableNotFoundError as e:
        raise SetupError(f"table {name!r} does not exist in {conn.uri}") from e
    if settings.video_uri_col not in tbl.schema.names:
        raise SetupError(
            f"table {name!r} has no column {settings.video_uri_col!r} to read video URLs "
            "from (set VIDEO_URI_COL to the column that holds them)"
        )
    return tbl


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# --- the command ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What one run does, from the command line and the environment."""

    bucket: str
    table: str | None
    """The table to add the column to; None defines the manifest only (``video-embeddings
    index --cluster`` creates its table and adds its columns itself)."""
    manifest_name: str
    image: str | None
    preinstalled: bool
    nvdec: bool
    dry_run: bool
    zip_output_dir: Path | None
    """Where a dry run writes the zip; None writes none."""


def describe(manifest: GenevaManifest, zips: list[Path]) -> list[str]:
    """The lines that say what the manifest holds."""
    if manifest.conda:
        *conda, pip = manifest.conda["dependencies"]
        channels = ", ".join(manifest.conda["channels"])
        lines = [f"  conda environment ({channels}): {', '.join(conda)}"]
        packages = [r for r in pip["pip"] if not r.startswith("-")]
        cuda = " (torchcodec: its CUDA build)" if any(r.startswith("-") for r in pip["pip"]) else ""
        lines.append(f"  pip: {len(packages)} packages, each at its uv.lock version{cuda}")
        lines += [f"    {requirement}" for requirement in pip["pip"]]
    elif manifest.worker_image:
        lines = [f"  image of the head and the workers: {manifest.worker_image} (no conda)"]
    else:
        lines = ["  installs nothing: the nodes already have FFmpeg and the Python packages"]
    return lines + [f"  zip {z.name}: {ZIP_CONTENTS}" for z in zips]


def run(request: Request, settings: vu.Settings) -> None:
    """Check the bucket, the table and the settings, then define the manifest and add the
    column (when a table is named); or, on a dry run, print what would be done and write
    nothing."""
    conn = connect(request.bucket)
    tbl = open_table(conn, request.table, settings) if request.table else None
    manifest = build_manifest(
        request.manifest_name,
        image=request.image,
        preinstalled=request.preinstalled,
        nvdec=request.nvdec,
    )
    column = settings.embedding_col
    has_column = tbl is None or column in tbl.schema.names
    exists = f"table {request.table!r} already has column {column!r}"
    if tbl is None:
        exists = "no GENEVA_TABLE_NAME: no column added (index --cluster adds its own)"
    add = f"column {column!r} to table {request.table!r}: VideoEmbedding on "
    add += repr(settings.video_uri_col)

    if request.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            out = request.zip_output_dir
            zips = package_zips(out or Path(tmp), write=out is not None)
        print("dry run: nothing is written to the database")
        print(f"manifest {manifest.name!r} for {request.bucket}:")
        print("\n".join(describe(manifest, zips)))
        if out is not None:
            print(f"wrote {', '.join(str(z) for z in zips)}")
        print(f"{exists}: nothing else is written" if has_column else f"would add {add}")
        return

    define_manifest(conn, manifest)
    stored = next(m for m in conn.list_manifests() if m.name == manifest.name)
    print(f"defined manifest {manifest.name!r} in {request.bucket}:")
    print("\n".join(describe(stored, [Path(z) for group in stored.zips for z in group])))
    if tbl is None or has_column:
        print(f"{exists}: left as it is" if tbl is not None else exists)
        return
    logger.info("adding column %r to table %r", column, request.table)
    tbl.add_columns(vu.embedding_column(settings))
    print(f"added {add}")


def gpu_cluster(
    name: str = "gpu-cluster",
    *,
    namespace: str,
    image: str | None = None,
    gpus_per_worker: int = 1,
    workers: int = 1,
) -> GenevaCluster:
    """A KubeRay cluster definition for ``conn.define_cluster``: one GPU worker group of
    at most ``workers`` pods, each with ``gpus_per_worker`` GPUs and, per GPU,
    ``CPUS_PER_GPU`` CPUs and ``MEMORY_GIB_PER_GPU`` GiB. ``image`` (head and workers)
    defaults to Ray's image for this Ray and Python."""
    from geneva.cluster.builder import KubeRayClusterBuilder

    worker = (
        KubeRayClusterBuilder.gpu_worker(gpus_per_worker)
        .cpus(CPUS_PER_GPU * gpus_per_worker)
        .memory(f"{MEMORY_GIB_PER_GPU * gpus_per_worker}Gi")
        .replicas(workers)
        .max_replicas(workers)
    )
    cluster = KubeRayClusterBuilder.create(name).namespace(namespace)
    if image:
        worker = worker.image(image)
        cluster = cluster.head_group(image=image)
    return cluster.add_worker_group(worker.build()).build()


def existing_cluster(name: str, address: str) -> GenevaCluster:
    """A definition for ``conn.define_cluster`` of a Ray cluster that is already running,
    reached at ``address`` (``ray://head:10001``), whose nodes have the packages: pair it
    with a ``--preinstalled`` manifest. ``pip: None`` stops Geneva from having Ray
    pip-install its own version into a new environment for each job, which fails on an
    offline cluster and, online, only repeats what the nodes have. ``py_modules: None``
    stops it uploading its own package, which the nodes have too: with that upload, the
    first Ray client connection to a newly started cluster failed and was retried 30 s
    later."""
    from geneva.cluster.mgr import GenevaCluster

    cluster = GenevaCluster.create_external(name, address)
    return cluster.ray_init_kwargs({"runtime_env": {"pip": None, "py_modules": None}}).build()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Environment: GENEVA_TABLE_NAME names the table to add the column to (unset: "
        "the manifest only, for `video-embeddings index --cluster`); the UDF's own "
        "settings (VIDEO_URI_COL, VIDEO_EMBEDDING_COL, VJEPA_MODEL, ...) are read as in "
        "video_embeddings_udf and frozen into the column.",
    )
    parser.add_argument(
        "--bucket",
        required=True,
        help="the Geneva database: gs://bucket/path, s3://..., or a local directory",
    )
    parser.add_argument(
        "--manifest-name",
        default=DEFAULT_MANIFEST_NAME,
        help="name to store the manifest under, for conn.context(manifest=...) "
        f"(default: {DEFAULT_MANIFEST_NAME})",
    )
    parser.add_argument(
        "--image",
        help="a container image with FFmpeg and the Python stack baked in: head and "
        "workers run it, and the manifest has no conda environment",
    )
    parser.add_argument(
        "--preinstalled",
        action="store_true",
        help="for a Ray cluster whose nodes already have FFmpeg and the Python packages: "
        "the manifest installs nothing (see existing_cluster)",
    )
    parser.add_argument(
        "--nvdec",
        action="store_true",
        help=f"install torchcodec's CUDA build from PyTorch's index ({PYTORCH_INDEX}) "
        "instead of PyPI's, which decodes on the CPU only, so GPU workers decode on NVDEC",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the bucket and the table, print what would be uploaded and added, "
        "and write nothing to the database",
    )
    parser.add_argument(
        "--generate-zip",
        action="store_true",
        help="with --dry-run: also write the zip that would be uploaded to "
        "--zip-output-dir, to inspect it",
    )
    parser.add_argument(
        "--zip-output-dir",
        type=Path,
        default=Path(".geneva"),
        help="where --generate-zip writes the zip (default: .geneva)",
    )
    parser.add_argument("--verbose", action="store_true", help="log each step, Geneva's included")
    args = parser.parse_args(argv)
    if args.generate_zip and not args.dry_run:
        _refuse("--generate-zip only applies with --dry-run")
    if args.preinstalled and args.image:
        _refuse("--preinstalled and --image are two different clusters: pick one")
    if args.nvdec and args.preinstalled:
        _refuse(
            "--nvdec and --preinstalled: a preinstalled manifest installs nothing; "
            "install torchcodec's CUDA build on the nodes instead"
        )
    if args.nvdec and args.image:
        _refuse(
            "--nvdec and --image: an image manifest has no conda environment to add "
            "torchcodec's CUDA build to; bake it into the image instead"
        )
    return args


def _refuse(message: str) -> None:
    """Options that do not go together: one line on stderr, exit status 2 (argparse's)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Parse the arguments, read the environment once, and run; bad input is one line on
    stderr and exit status 1."""
    args = parse_args(argv)
    env = dict(os.environ) if environ is None else environ
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        table = env.get("GENEVA_TABLE_NAME") or None
        try:
            settings = vu.Settings.from_env(env)
        except ValueError as e:
            raise SetupError(str(e)) from e
        request = Request(
            bucket=args.bucket,
            table=table,
            manifest_name=args.manifest_name,
            image=args.image,
            preinstalled=args.preinstalled,
            nvdec=args.nvdec,
            dry_run=args.dry_run,
            zip_output_dir=args.zip_output_dir if args.generate_zip else None,
        )
        run(request, settings)
    except SetupError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
