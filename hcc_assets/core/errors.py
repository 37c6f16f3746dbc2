"""Exceptions that every layer raises or catches. Standard library only.

Messages never contain PHI: they name series by number and description and files by their
position, never by patient name, path or date.
"""


class PatientInputError(Exception):
    """A problem with this patient's input; do not retry.

    The patient's study (or what an earlier step made of it) cannot be turned into a trustworthy
    result: unreadable or inconsistent DICOM, no usable T2 series, a volume or mask that is
    missing or does not fit. Running again gives the same error until the input changes, so the
    orchestration layer fails the step without retries (`hcc_assets.defs.patient_errors`).
    Raised by ingest, liver_mask and deep_embedding steps (and by the importers, per patient).

    The message says what is wrong; the orchestration layer prefixes the patient pseudonym.
    """
