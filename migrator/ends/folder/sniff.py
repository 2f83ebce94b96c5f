"""What a file that is not a Part-10 DICOM file is, told from its first bytes.

A folder to import holds DICOM next to anything else. A file is skipped as "not DICOM"
only when it is positively something else: one of Orthanc's JSON summaries or other JSON,
text, or a format with a magic number (images, documents, archives, media, programs).
None of these can begin a DICOM dataset written without preamble, whose first element is
in a low group (a zero byte within its first two), so none is mistaken for one.
"""

from __future__ import annotations

import codecs
import json
import mmap
import re
import struct

__all__ = [
    "NOT_DICOM_TEXT",
    "SKIP_JSON",
    "json_reason",
    "looks_like_dataset",
    "other_format",
    "starts_like_element",
]

SKIP_JSON = "JSON summary (DicomAsJson)"
NOT_DICOM_TEXT = "not DICOM: text"

_JSON_KEY = re.compile(r"^[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}$")
# JSON summaries are small; a bigger file starting with "{" is not one of them.
_MAX_JSON_SIZE = 64 * 1024 * 1024
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI "
    b"UL UN UR US UT UV".split()
)


def starts_like_element(head: bytes, size: int) -> bool:
    """Whether ``head`` can start a dataset of ``size`` bytes, elements in any order: an
    explicit VR in either byte order, or an implicit VR little endian length that fits."""
    if len(head) < 8 or head[:8] == bytes(8):
        return False
    if head[4:6] in _VRS:
        return True
    (length,) = struct.unpack_from("<I", head, 4)
    return length == 0xFFFFFFFF or length <= size - 8


def looks_like_dataset(head: bytes) -> bool:
    """Whether ``head`` starts like a dataset without preamble: the first element in the
    command, file meta or identifying group, in either byte order."""
    if len(head) < 8 or head[:8] == bytes(8):
        return False
    little = head[1] == 0 and head[0] in (0, 2, 8)
    return little or (head[0] == 0 and head[1] in (0, 2, 8))


def json_reason(data: bytes | mmap.mmap) -> str | None:
    """Why a file starting with "{" is skipped, or None when it is not JSON after all."""
    if len(data) > _MAX_JSON_SIZE:
        return None  # not one of Orthanc's summaries; the text test decides
    try:
        doc = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict) and doc and all(_JSON_KEY.match(k) for k in doc):
        return SKIP_JSON
    return "not DICOM: JSON document"


# Formats a file is positively known to be from its first bytes: (magic, offset, name).
# None of them can begin a DICOM dataset written without preamble (whose first element
# is in a low group: a zero byte within its first two).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG image"),
    (b"\xff\xd8\xff", 0, "JPEG image"),
    (b"GIF87a", 0, "GIF image"),
    (b"GIF89a", 0, "GIF image"),
    (b"II*\x00", 0, "TIFF image"),
    (b"MM\x00*", 0, "TIFF image"),
    (b"BM", 0, "BMP image"),
    (b"%PDF-", 0, "PDF document"),
    (b"PK\x03\x04", 0, "ZIP archive"),
    (b"PK\x05\x06", 0, "ZIP archive"),
    (b"\x1f\x8b", 0, "gzip archive"),
    (b"BZh", 0, "bzip2 archive"),
    (b"\xfd7zXZ\x00", 0, "xz archive"),
    (b"7z\xbc\xaf\x27\x1c", 0, "7-Zip archive"),
    (b"Rar!\x1a\x07", 0, "RAR archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", 0, "Office document"),
    (b"SQLite format 3\x00", 0, "SQLite database"),
    (b"\x7fELF", 0, "program"),
    (b"MZ", 0, "Windows program"),
    (b"ftyp", 4, "MP4/QuickTime video"),
    (b"RIFF", 0, "RIFF media (AVI, WAV, WebP)"),
    (b"\x1a\x45\xdf\xa3", 0, "Matroska/WebM video"),
    (b"OggS", 0, "Ogg media"),
    (b"ID3", 0, "MP3 audio"),
)
# Characters that do not occur in text (all C0 controls but tab, newlines, form feed and
# escape).
_NOT_TEXT = bytes(c for c in range(32) if c not in b"\t\n\r\f\x1b") + b"\x7f"


def other_format(head: bytes, brace_is_text: bool = False) -> str | None:
    """What a file without DICM marker positively is, from its first bytes, or None.

    A head starting with "{" is left to the JSON test (which needs the whole file) unless
    ``brace_is_text``. A head without any zero byte cannot begin a DICOM dataset (group
    and element numbers of the first element are small), so text is told apart safely.
    """
    for magic, offset, name in _MAGIC:
        if head.startswith(magic, offset):
            return f"not DICOM: {name}"
    if not brace_is_text and head.lstrip()[:1] == b"{":
        return None
    if _is_text(bytes(head)):
        return NOT_DICOM_TEXT
    return None


def _is_text(head: bytes) -> bool:
    if not head or head.translate(None, _NOT_TEXT) != head:
        return False
    try:
        # A multi-byte character cut at the end of the head is still text.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True
