"""One implementation of each cross-cutting concept.

Framework-free building blocks shared by every layer: it imports only the standard library, numpy and matplotlib; nothing in hcc_assets.

- `files`: atomic file writes and publishing a folder whole (hidden staging, `.complete` marker,
  rename into place). Standard library only, so the DICOM receiver can use it on a gateway
  machine that has only pydicom and pynetdicom.
- `versioning`: content versions (a short sha256 over canonical JSON or bytes).
- `figures`: PNG encoding (matplotlib figures, pixel arrays), inline thumbnails of at most 16 KB,
  and the training-curve figure.
- `errors`: exceptions every layer raises or catches (`PatientInputError`).

Every module imports only the standard library at module level; numpy and matplotlib (with
Pillow, which matplotlib requires) are imported inside the functions that need them, so importing
`hcc_assets.core` stays cheap; this `__init__` imports none of the modules.
"""
