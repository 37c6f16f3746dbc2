"""Writing the synthetic cohort in the transfer syntaxes scanners and PACS send.

The cohort is written as Explicit VR Little Endian (the fast path in cohort.py) and each file is
then re-encoded here, so every syntax carries the same pixels and tags. Encoders are the field's
plugins, through pydicom where it has one: pyjpegls (JPEG-LS), pylibjpeg-openjpeg (JPEG 2000),
pylibjpeg-rle / pydicom (RLE), pydicom (Deflate). pydicom has no JPEG Lossless (process 14, SV1)
encoder; python-gdcm's ImageChangeTransferSyntax writes that one.

One lossy syntax is offered too, to exercise how ingest flags lossy series: JPEG 2000 (lossy,
pylibjpeg-openjpeg at a fixed compression ratio). JPEG baseline needs 8-bit pixels (ours are 12) and
no installed plugin encodes JPEG extended. A lossy file gets a new SOP Instance UID (derived from
the old one: same seed, same bytes) and LossyImageCompression "01" with its ratio and method, as
DICOM asks.
"""

from __future__ import annotations

import tempfile
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
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
# the lossy `synth --transfer-syntax` names: the pixels differ from the lossless ones
LOSSY_TRANSFER_SYNTAXES: dict[str, UID] = {"jpeg2000-lossy": JPEG2000}
JPEG2000_LOSSY_RATIO = 10  # target compression ratio of the synthetic JPEG 2000 (lossy) files


def encode(data: bytes, name: str) -> bytes:
    """The Part-10 file `data` (Explicit VR Little Endian) re-encoded in the syntax `name`."""
    if name == DEFAULT_TRANSFER_SYNTAX:
        return data
    syntax = TRANSFER_SYNTAXES.get(name) or LOSSY_TRANSFER_SYNTAXES[name]
    dataset = dcmread(BytesIO(data))
    if name in LOSSY_TRANSFER_SYNTAXES:
        raw = len(dataset.PixelData)
        dataset.compress(syntax, j2k_cr=[JPEG2000_LOSSY_RATIO], generate_instance_uid=False)
        uid = generate_uid(entropy_srcs=[str(dataset.SOPInstanceUID), name])
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = uid
        dataset.LossyImageCompression = "01"
        dataset.LossyImageCompressionRatio = f"{raw / len(dataset.PixelData):.2f}"
        dataset.LossyImageCompressionMethod = "ISO_15444_1"
    elif syntax == JPEGLosslessSV1:
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
