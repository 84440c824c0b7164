"""Image file endings nnU-Net reads (one place for the merge's, the predictor's and evaluation's file checks)."""

from __future__ import annotations

import os


def supported_endings() -> list[str]:
    """Every file ending one of nnU-Net's readers handles, longest first ('.nii.gz' before '.gz'-less '.nii')."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    endings = {e for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}
    return sorted(endings, key=len, reverse=True)


def foreign_image_files(filenames: list[str], file_ending: str) -> list[str]:
    """The names among ``filenames`` that are images nnU-Net reads but do not end in ``file_ending``: a dataset
    mixing formats, whose odd files nnU-Net would silently skip."""
    others = [e for e in supported_endings() if not file_ending.lower().endswith(e)]
    return [f for f in filenames if not f.startswith(".") and not f.lower().endswith(file_ending.lower())
            and any(f.lower().endswith(e) for e in others)]


# ---- file checks shared by merge, predict and evaluate ------------------------------------------------------
# origin/direction may differ by float noise between the tools that wrote two files of one case
GEOMETRY_ATOL = 1e-3
# z-score and CT normalization work in float32: squares of values beyond this overflow (a +-3e38 image became a
# constant image), so images holding them are refused rather than normalized into nonsense
MAX_ABS_INTENSITY = 1e15


def check_compressed_stream(path: str) -> None:
    """Decompress a ``.gz`` file to its end: gzip's length and CRC checks catch truncation and corruption that
    ITK's NIfTI reader passes over (it fills a cut-off stream with zeros). Raises OSError/EOFError."""
    import gzip

    if not path.lower().endswith(".gz"):
        return
    with gzip.open(path, "rb") as f:
        while f.read(1 << 22):
            pass


def readers_for(file_ending: str) -> list[type]:
    """nnU-Net's reader classes for a file ending, in nnU-Net's order of preference."""
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    return [rw for rw in LIST_OF_IO_CLASSES if file_ending.lower() in rw.supported_file_endings]


def read_checked(path: str, what: str = "image", reader: type | None = None) -> tuple:
    """``(array, properties, reader class)`` of one image (``what="image"``) or label map (``"seg"``) file,
    read by ``reader`` or else by the first of nnU-Net's readers for its ending that reads it, as nnU-Net picks
    one, but without nnU-Net's printed tracebacks of the readers that fail. The gzip stream is verified to its
    end. Raises ``ValueError`` with the reason when no reader reads the file."""
    split = next((e for e in supported_endings() if path.lower().endswith(e)), None)
    if split is None:
        raise ValueError(f"not a format nnU-Net reads ({', '.join(supported_endings())})")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError("the file is empty (0 bytes)")
    import zlib

    try:
        check_compressed_stream(path)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise ValueError(f"broken gzip stream ({type(e).__name__}: {e})") from e
    errors = []
    for rw in [reader] if reader is not None else readers_for(split):
        try:
            arr, props = rw().read_images((path,)) if what == "image" else rw().read_seg(path)
            return arr, props, rw
        except Exception as e:  # readers raise anything from RuntimeError to AssertionError
            errors.append(f"{rw.__name__}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}")
    raise ValueError("; ".join(errors))


def image_dimension(props: dict) -> int:
    """2 or 3: the dimensionality of the file as stored (nnU-Net reads a 2d image as one slice, spacing 999)."""
    if "sitk_stuff" in props:
        return len(props["sitk_stuff"]["spacing"])
    return 2 if float(props["spacing"][0]) == 999 else 3


def geometry_of(props: dict) -> dict:
    """Spacing, origin and direction (or nibabel's affine) of nnU-Net reader properties, as arrays."""
    import numpy as np

    g = {"spacing": np.asarray(props["spacing"], float)}
    if "sitk_stuff" in props:
        g["origin"] = np.asarray(props["sitk_stuff"]["origin"], float)
        g["direction"] = np.asarray(props["sitk_stuff"]["direction"], float)
    if "nibabel_stuff" in props:
        g["affine"] = np.asarray(props["nibabel_stuff"].get("original_affine"), float)
    return g


def geometry_difference(a: dict, b: dict) -> str | None:
    """The first field (spacing, origin, direction, affine) in which two geometries differ beyond float noise,
    as ``"origin [..] vs [..]"``; None when they agree."""
    import numpy as np

    for k in a:
        if k not in b or a[k].shape != b[k].shape:
            return f"{k} differs"
        if k == "spacing" and not np.allclose(a[k], b[k], rtol=1e-3, atol=1e-6):
            return f"spacing {a[k].tolist()} vs {b[k].tolist()}"
        if k != "spacing" and not np.allclose(a[k], b[k], atol=GEOMETRY_ATOL):
            return f"{k} {np.round(a[k], 4).tolist()} vs {np.round(b[k], 4).tolist()}"
    return None


def intensity_problem(arr) -> str | None:
    """What makes an image unusable for normalization: NaN, infinite or too large values; None when fine."""
    import numpy as np

    if not np.issubdtype(arr.dtype, np.floating):
        big = np.abs(arr.astype(np.float64)) > MAX_ABS_INTENSITY if arr.dtype.itemsize >= 8 else None
    else:
        if not np.all(np.isfinite(arr)):
            return "contains NaN voxels" if np.isnan(arr).any() else "contains infinite voxels"
        big = np.abs(arr) > MAX_ABS_INTENSITY
    if big is not None and big.any():
        return (f"holds {int(big.sum())} voxel(s) beyond +-{MAX_ABS_INTENSITY:g} (e.g. {arr[big].flat[0]:.3g}), "
                "which float32 normalization cannot handle")
    return None
