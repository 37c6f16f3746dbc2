"""Writing the synthetic cohort in the transfer syntaxes scanners and PACS send.

The cohort is written as Explicit VR Little Endian (the fast path in cohort.py) and each file is
then re-encoded here, so every syntax carries the same pixels and tags. Encoders are the field's
plugins, through pydicom where it has one: pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000),
pylibjpeg-rle / pydicom (RLE), pydicom (Deflate). pydicom has no JPEG Lossless (process 14, SV1)
encoder; python-gdcm's ImageChangeTransferSyntax writes that one.
"""

from __future__ import annotations

import tempfile
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

# the `synth --transfer-syntax` names; all lossless
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "rle": RLELossless,
    "deflated": DeflatedExplicitVRLittleEndian,
}
DEFAULT_TRANSFER_SYNTAX = "explicit"


def encode(data: bytes, name: str) -> bytes:
    """The Part-10 file `data` (Explicit VR Little Endian) re-encoded in the syntax `name`."""
    if name == DEFAULT_TRANSFER_SYNTAX:
        return data
    syntax = TRANSFER_SYNTAXES[name]
    dataset = dcmread(BytesIO(data))
    if syntax == JPEGLosslessSV1:
        dataset.PixelData = _gdcm_encapsulated(data, syntax)
        dataset["PixelData"].VR = "OB"
        dataset["PixelData"].is_undefined_length = True
        dataset.file_meta.TransferSyntaxUID = syntax
    elif syntax == DeflatedExplicitVRLittleEndian:
        dataset.file_meta.TransferSyntaxUID = syntax  # pydicom deflates the dataset when it writes
    else:
        dataset.compress(syntax, generate_instance_uid=False)  # lossless: the same instance
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _gdcm_encapsulated(data: bytes, syntax: UID) -> bytes:
    """The encapsulated Pixel Data of `data` encoded by gdcm. Only the pixel element is taken from
    gdcm's file: its ImageWriter also rewrites the header (as Enhanced MR, without the
    per-slice geometry tags), which must stay the classic one."""
    import gdcm  # python-gdcm

    codes = {JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1}
    with tempfile.TemporaryDirectory(prefix="hcc-transcode-") as folder:
        source, target = Path(folder) / "in.dcm", Path(folder) / "out.dcm"
        source.write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        if not reader.Read():
            raise ValueError("gdcm cannot read the file to re-encode")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(codes[syntax]))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise ValueError(f"gdcm cannot encode {syntax.name}")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(target))
        if not writer.Write():
            raise ValueError(f"gdcm cannot write {syntax.name}")
        return dcmread(target).PixelData
