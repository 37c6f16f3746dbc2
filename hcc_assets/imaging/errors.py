"""Errors raised by ingest. Messages never contain PHI: they name series by number and
description and files by their position, never by patient name, path or date."""


class IngestError(Exception):
    """A patient's study cannot be turned into a trustworthy volume.

    The message says what is wrong; the orchestration layer prefixes the patient pseudonym.
    """
