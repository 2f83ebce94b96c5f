"""Test helpers: throwaway Orthanc servers, synthetic DICOM data and a fault-injecting proxy.

Used by the test-suite, the ``migrator demo`` command and the benchmarks.
"""

from migrator.testkit.dicomgen import (
    SyntheticInstance,
    iter_dataset,
    make_dataset,
    make_instance,
    upload_all,
)
from migrator.testkit.faults import (
    DropResponse,
    Pass,
    RandomFaults,
    Reset,
    ScriptedFaults,
    Stall,
    Status,
)
from migrator.testkit.orthanc import OrthancProcess, free_port
from migrator.testkit.proxy import Proxy

__all__ = [
    "DropResponse",
    "OrthancProcess",
    "Pass",
    "Proxy",
    "RandomFaults",
    "Reset",
    "ScriptedFaults",
    "Stall",
    "Status",
    "SyntheticInstance",
    "free_port",
    "iter_dataset",
    "make_dataset",
    "make_instance",
    "upload_all",
]
