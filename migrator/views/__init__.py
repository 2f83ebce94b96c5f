"""Read-only views of the ledger: reports, exports, verify's verdict and the web page."""
