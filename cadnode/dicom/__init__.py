"""DICOM plumbing shared by the stages that speak DIMSE: PDU reading, the gatekeeper in
front of the port, the service table, C-FIND matching, pixel decoding within limits."""
