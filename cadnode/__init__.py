"""cadnode: a DICOM-native computer-aided-detection node.

The flow is the architecture; one module per stage:
receive -> assemble -> route -> infer -> encode -> dispatch.
Stages share nothing but the database (`cadnode.core.db`).
"""

__version__ = "0.1.0"
