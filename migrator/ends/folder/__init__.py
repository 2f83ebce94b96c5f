"""A folder of DICOM files or an Orthanc storage folder (with or without its index)."""
