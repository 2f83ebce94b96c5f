"""An Orthanc reached over its REST API: client, source and target."""
