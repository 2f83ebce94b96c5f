"""migrator: resumable, ledger-backed migration of DICOM instances into Orthanc."""

__version__ = "0.1.0"
