"""Image file endings nnU-Net reads (one place for the merge's, the predictor's and evaluation's file checks)."""

from __future__ import annotations


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
