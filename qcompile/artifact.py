"""The ``.qc`` artifact: one file holding a compiled model, written atomically.

A ``.qc`` file is a zip archive (deflated: the library's code shrinks about threefold; packed
weights hardly do, and cost little time to try) of

- ``manifest.json``: ``format`` (this module's :data:`FORMAT`), the qcompile and backend
  versions, the target, input and output shapes and dtypes, per-layer bits, methods and kernel
  kinds, the program's kernel calls in order (``program``: the value each computes and its
  kernel, which a profile names its rows by), sizes, and what else the compiler measured;
- the backend's files, e.g. ``model.so`` (the exported library) and ``params.npz`` (packed
  weights, thresholds and scales).

:func:`write` builds the archive in a temporary file next to ``path`` and renames it into place,
so a reader never sees half an artifact and a failure leaves nothing behind. :func:`read` checks
the archive, the manifest and the format version, and unpacks it into a temporary folder; a
corrupt, truncated or foreign file is an :class:`~qcompile.errors.ArtifactError` saying so.
"""

import json
import os
import tempfile
import zipfile
from pathlib import Path

from qcompile.errors import ArtifactError

FORMAT = 1
MANIFEST = "manifest.json"


def write(path: str | os.PathLike, manifest: dict, files: dict[str, str | os.PathLike]) -> Path:
    """Write the artifact ``path`` from ``manifest`` and ``files`` (archive name -> local file)."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder; give the path of a .qc file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            archive.writestr(MANIFEST, json.dumps(dict(manifest, format=FORMAT), indent=2))
            for name, local in files.items():
                archive.write(local, name)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read(path: str | os.PathLike, folder: str | os.PathLike) -> dict:
    """Unpack the artifact ``path`` into ``folder``; return its manifest."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise ArtifactError(f"{path} is corrupt ({bad} fails its checksum); compile the "
                                    "model again")
            manifest = json.loads(archive.read(MANIFEST))
            archive.extractall(folder)
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as error:
        raise ArtifactError(f"{path} is not a qcompile artifact or is damaged ({error}); "
                            "compile the model again") from None
    found = manifest.get("format")
    if found != FORMAT:
        raise ArtifactError(f"{path} has artifact format {found!r}, this qcompile reads format "
                            f"{FORMAT}: compile the model again with this version")
    return manifest
